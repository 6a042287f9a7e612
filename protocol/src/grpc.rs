//! gRPC's length-prefixed messages: the one reader and writer of the 5-byte
//! prefix (a compression flag and a big-endian length) that the server's
//! WebSocket calls, its upstream proxy, the tests and the benchmarks share.
//!
//! The reader slices whole messages out of the chunks it is given without
//! copying them; only a message cut by a chunk's end is copied, once, when
//! the next chunk comes. It checks each declared length against a limit as
//! soon as the prefix is complete, before any of the message is held.
//!
//! The [`PrefixCursor`] follows a body that passes on as it is (a request
//! body on its way to tonic, an upstream's response on its way to the
//! client): it holds none of the messages' bytes, and tells each prefix as
//! it completes.

use std::fmt;

use prost::bytes::{BufMut, Bytes};

/// The prefix before every message.
pub const PREFIX_LEN: usize = 5;

/// Why a message cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageError {
    /// The compression flag is set: the reader does not decompress.
    Compressed,
    /// The declared length is over the limit.
    TooLarge { length: usize, limit: usize },
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::Compressed => f.write_str("a compressed message (the bridge does not decompress)"),
            MessageError::TooLarge { length, limit } => {
                write!(f, "a message of {length} bytes; the limit is {limit}")
            }
        }
    }
}

/// Reads messages out of a body's chunks, in order.
#[derive(Debug)]
pub struct MessageReader {
    /// The chunk being read, from `pos` on.
    current: Bytes,
    pos: usize,
    /// A message cut by a chunk's end, completed here from the next chunk's
    /// front (only its own bytes are copied, never the rest of the chunk).
    cut: Vec<u8>,
    /// `cut` holds a whole message already returned: cleared on the next read.
    cut_read: bool,
    limit: usize,
}

impl MessageReader {
    /// A reader refusing messages longer than `limit` bytes.
    pub fn new(limit: usize) -> MessageReader {
        MessageReader {
            current: Bytes::new(),
            pos: 0,
            cut: Vec::new(),
            cut_read: false,
            limit,
        }
    }

    /// Adds the body's next chunk. Call it only once
    /// [`MessageReader::next_message`] has said `Ok(None)`: what is left
    /// then is part of one message.
    pub fn push(&mut self, chunk: Bytes) {
        if self.cut_read {
            self.cut.clear();
            self.cut_read = false;
        }
        self.cut.extend_from_slice(&self.current[self.pos..]);
        self.current = chunk;
        self.pos = 0;
        if self.cut.is_empty() {
            return;
        }
        if self.cut.len() < PREFIX_LEN {
            self.take_into_cut(PREFIX_LEN - self.cut.len());
            if self.cut.len() < PREFIX_LEN {
                return;
            }
        }
        // A refused prefix is reported by `next_message`.
        if let Ok(length) = declared_length(&self.cut, self.limit) {
            self.take_into_cut(PREFIX_LEN + length - self.cut.len());
        }
    }

    /// Moves up to `wanted` bytes from the chunk's front to `cut`.
    fn take_into_cut(&mut self, wanted: usize) {
        let take = wanted.min(self.current.len() - self.pos);
        self.cut.extend_from_slice(&self.current[self.pos..self.pos + take]);
        self.pos += take;
    }

    /// The next whole message, if one is here: a view into the chunk it
    /// came in (or into the reader, for one cut by a chunk's end).
    pub fn next_message(&mut self) -> Result<Option<&[u8]>, MessageError> {
        if self.cut_read {
            self.cut.clear();
            self.cut_read = false;
        }
        if !self.cut.is_empty() {
            let Some(length) = whole(&self.cut, self.limit)? else {
                return Ok(None);
            };
            self.cut_read = true;
            return Ok(Some(&self.cut[PREFIX_LEN..PREFIX_LEN + length]));
        }
        let Some(length) = whole(&self.current[self.pos..], self.limit)? else {
            return Ok(None);
        };
        let start = self.pos + PREFIX_LEN;
        self.pos = start + length;
        Ok(Some(&self.current[start..self.pos]))
    }

    /// Whether a whole message is here for `next_message`; `Err` as soon as
    /// the next message's prefix is complete and refused.
    pub fn ready(&self) -> Result<bool, MessageError> {
        let unread = if !self.cut.is_empty() && !self.cut_read {
            &self.cut[..]
        } else {
            &self.current[self.pos..]
        };
        whole(unread, self.limit).map(|length| length.is_some())
    }

    /// Bytes held: of messages not yet read, or of an unfinished one.
    pub fn buffered(&self) -> usize {
        let cut = if self.cut_read { 0 } else { self.cut.len() };
        cut + self.current.len() - self.pos
    }
}

/// A message's prefix, as a [`PrefixCursor`] completes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// Where in the chunk the prefix ends: the message's bytes start there,
    /// and the prefix [`PREFIX_LEN`] bytes before (which may be before the
    /// chunk, for a prefix cut by the previous chunk's end).
    pub end: usize,
    /// The compression flag.
    pub compressed: bool,
    /// The declared length.
    pub length: usize,
}

/// Follows a body's messages as its chunks pass, holding none of their
/// bytes: only the part of a prefix cut by a chunk's end (at most 4 bytes).
#[derive(Clone, Debug, Default)]
pub struct PrefixCursor {
    prefix: [u8; PREFIX_LEN],
    prefix_len: usize,
    /// The current message's declared length, once its prefix is complete.
    declared: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
}

impl PrefixCursor {
    /// Follows the framing through `chunk`, calling `each` with every
    /// prefix completed in it, in order; stops at the first `Err` (the
    /// cursor then stands just after that prefix) and returns it.
    pub fn advance<E>(&mut self, chunk: &[u8], mut each: impl FnMut(Prefix) -> Result<(), E>) -> Result<(), E> {
        let mut pos = 0;
        while pos < chunk.len() {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len() - pos);
                self.remaining -= n;
                pos += n;
                continue;
            }
            let n = (PREFIX_LEN - self.prefix_len).min(chunk.len() - pos);
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&chunk[pos..pos + n]);
            self.prefix_len += n;
            pos += n;
            if self.prefix_len == PREFIX_LEN {
                self.prefix_len = 0;
                self.declared =
                    u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]) as usize;
                self.remaining = self.declared;
                each(Prefix {
                    end: pos,
                    compressed: self.prefix[0] != 0,
                    length: self.declared,
                })?;
            }
        }
        Ok(())
    }

    /// Bytes of an unfinished prefix seen so far (0 outside a prefix).
    pub fn in_prefix(&self) -> usize {
        self.prefix_len
    }

    /// The current message's declared length (its last one between messages).
    pub fn declared(&self) -> usize {
        self.declared
    }

    /// Bytes of the current message still to come.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Whether the body stands inside a message (its prefix, or its bytes):
    /// it may not end here.
    pub fn inside_message(&self) -> bool {
        self.prefix_len > 0 || self.remaining > 0
    }
}

/// The length of the message `buffer` starts with, if it is whole.
fn whole(buffer: &[u8], limit: usize) -> Result<Option<usize>, MessageError> {
    if buffer.len() < PREFIX_LEN {
        return Ok(None);
    }
    let length = declared_length(buffer, limit)?;
    Ok((buffer.len() >= PREFIX_LEN + length).then_some(length))
}

/// The length `prefix` declares, checked.
fn declared_length(prefix: &[u8], limit: usize) -> Result<usize, MessageError> {
    if prefix[0] != 0 {
        return Err(MessageError::Compressed);
    }
    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if length > limit {
        return Err(MessageError::TooLarge { length, limit });
    }
    Ok(length)
}

/// Appends `message` with its prefix (uncompressed).
pub fn put_message(out: &mut impl BufMut, message: &[u8]) {
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).expect("a gRPC message is shorter than 4 GiB"));
    out.put_slice(message);
}

/// The messages of `framed`, a buffer of whole prefixed messages this
/// process wrote itself (with [`put_message`]): not checked, a short tail is
/// ignored.
pub fn each_message(mut framed: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if framed.len() < PREFIX_LEN {
            return None;
        }
        let length = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
        let end = (PREFIX_LEN + length).min(framed.len());
        let message = &framed[PREFIX_LEN..end];
        framed = &framed[end..];
        Some(message)
    })
}

#[cfg(test)]
mod tests {
    use prost::bytes::BytesMut;

    use super::*;

    #[test]
    fn messages_split_anywhere_come_out_whole_and_in_order() {
        let messages: Vec<Vec<u8>> = (0..6).map(|n| vec![n as u8; n * 7]).collect();
        let mut wire = BytesMut::new();
        for message in &messages {
            put_message(&mut wire, message);
        }
        let wire = wire.freeze();
        for chunk in 1..wire.len() {
            let mut reader = MessageReader::new(100);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                reader.push(Bytes::copy_from_slice(piece));
                while let Some(message) = reader.next_message().unwrap() {
                    got.push(message.to_vec());
                }
                assert_eq!(reader.ready(), Ok(false));
            }
            assert_eq!(got, messages, "chunks of {chunk}");
            let again: Vec<Vec<u8>> = each_message(&wire).map(<[u8]>::to_vec).collect();
            assert_eq!(again, messages);
            assert_eq!(reader.buffered(), 0);
        }
    }

    #[test]
    fn the_cursor_tells_each_prefix_where_it_ends_however_the_body_is_cut() {
        let mut wire = BytesMut::new();
        for length in [0, 3, 300] {
            put_message(&mut wire, &vec![7; length]);
        }
        wire[PREFIX_LEN] = 1; // the second message's flag: compressed
        for chunk in 1..wire.len() {
            let mut cursor = PrefixCursor::default();
            let mut seen = Vec::new();
            let mut offset = 0;
            for piece in wire.chunks(chunk) {
                cursor
                    .advance(piece, |prefix| {
                        seen.push((offset + prefix.end, prefix.compressed, prefix.length));
                        Ok::<_, ()>(())
                    })
                    .unwrap();
                offset += piece.len();
            }
            assert_eq!(
                seen,
                [(5, false, 0), (10, true, 3), (18, false, 300)],
                "chunks of {chunk}"
            );
            assert!(!cursor.inside_message());
        }
        let mut cursor = PrefixCursor::default();
        assert_eq!(
            cursor.advance(&wire[..12], |p| if p.length == 3 { Err(p.end) } else { Ok(()) }),
            Err(10)
        );
        assert_eq!(
            (cursor.remaining(), cursor.declared()),
            (3, 3),
            "stands after the refused prefix"
        );
        let mut cursor = PrefixCursor::default();
        cursor.advance(&wire[..2], |_| Ok::<_, ()>(())).unwrap();
        assert_eq!((cursor.in_prefix(), cursor.inside_message()), (2, true));
    }

    #[test]
    fn a_message_over_the_limit_or_compressed_is_refused_at_its_prefix() {
        let mut reader = MessageReader::new(10);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 11]));
        assert_eq!(reader.ready(), Err(MessageError::TooLarge { length: 11, limit: 10 }));
        assert_eq!(
            reader.next_message(),
            Err(MessageError::TooLarge { length: 11, limit: 10 })
        );
        let mut reader = MessageReader::new(10);
        reader.push(Bytes::from_static(&[1, 0, 0, 0, 1, 9]));
        assert_eq!(reader.next_message(), Err(MessageError::Compressed));
        let mut reader = MessageReader::new(10);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 10, 1]));
        assert_eq!(reader.ready(), Ok(false));
        assert_eq!(reader.next_message(), Ok(None));
    }
}
