//! The records the socket writes, gathered into WebSocket messages.

use bytes::Bytes;
use streambridge_protocol::v2::Encoding;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::records::{self, Kind};
use crate::transport::websocket::v1;

/// A batch is written once it reaches this size.
pub const BATCH_BYTES: usize = 64 * 1024;

/// How a socket's records become WebSocket messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Protocol v2: records gathered, many to a message.
    Records,
    /// Protocol v1: its one call's `message`s and `status` each in a frame
    /// of its own, in v1's envelope; records v1 has no frame for (headers,
    /// windows, goaway) are left out ([`v1`]).
    V1,
}

/// The next WebSocket message(s), each record encoded straight into the
/// message's bytes as it comes: a proto batch is its records one after the
/// other, a json batch their comma-separated list in brackets. A message is
/// full at [`BATCH_BYTES`] (a larger single record goes alone).
pub struct Batch {
    /// The socket's encoding (kept here only: the socket reads it from its batch).
    pub encoding: Encoding,
    /// The socket's protocol, as it frames records.
    pub framing: Framing,
    /// Finished messages, in order, before `open` (only after a burst of
    /// more than [`BATCH_BYTES`], or on v1, where each record is one).
    full: Vec<Message>,
    /// Bytes in `full`.
    full_bytes: usize,
    /// The message being filled (a json one without its closing bracket);
    /// empty when there is nothing in it.
    open: Vec<u8>,
}

impl Batch {
    pub fn new(encoding: Encoding, framing: Framing) -> Batch {
        Batch {
            encoding,
            framing,
            full: Vec::new(),
            full_bytes: 0,
            open: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.full.is_empty() && self.open.is_empty()
    }

    /// Enough for a write: no point gathering more before writing.
    pub fn is_full(&self) -> bool {
        match self.framing {
            Framing::Records => {
                !self.full.is_empty() || self.open.len() + usize::from(self.encoding == Encoding::Json) >= BATCH_BYTES
            }
            Framing::V1 => self.full_bytes >= BATCH_BYTES,
        }
    }

    /// Adds one record; `write` appends its encoding.
    pub fn append(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        if self.framing == Framing::V1 {
            let mut frame = Vec::with_capacity(64);
            write(&mut frame);
            let frame = self.message(frame);
            self.push_full(frame);
            return;
        }
        let json = self.encoding == Encoding::Json;
        if self.open.is_empty() {
            // Room for a typical batch of small records without regrowing.
            self.open.reserve(1024);
            if json {
                self.open.push(b'[');
            }
        } else if json {
            self.open.push(b',');
        }
        let start = self.open.len();
        write(&mut self.open);
        let first = start == usize::from(json);
        // A json message still needs its closing bracket.
        if !first && self.open.len() + usize::from(json) > BATCH_BYTES {
            // This record starts the next message.
            let mut next = Vec::with_capacity(self.open.len() - start + 1);
            if json {
                next.push(b'[');
            }
            next.extend_from_slice(&self.open[start..]);
            self.open.truncate(start - usize::from(json));
            let done = std::mem::replace(&mut self.open, next);
            let done = self.finished(done);
            self.push_full(done);
        }
    }

    /// Adds a record of `call`.
    pub fn record(&mut self, call: u32, kind: Kind) {
        let encoding = self.encoding;
        match self.framing {
            Framing::Records => self.append(|out| records::append(encoding, call, kind, out)),
            Framing::V1 => {
                if let Kind::Status(status) = kind {
                    self.append(|out| v1::append_status(encoding, status, out));
                }
            }
        }
    }

    /// A v1 text frame, written as text (no second look at its UTF-8).
    pub fn append_text(&mut self, frame: String) {
        debug_assert_eq!(self.framing, Framing::V1);
        self.push_full(Message::Text(Utf8Bytes::from(frame)));
    }

    fn push_full(&mut self, message: Message) {
        self.full_bytes += message.len();
        self.full.push(message);
    }

    fn finished(&self, mut message: Vec<u8>) -> Message {
        if self.encoding == Encoding::Json && self.framing == Framing::Records {
            message.push(b']');
        }
        self.message(message)
    }

    /// `bytes` as a message of the socket's kind.
    fn message(&self, bytes: Vec<u8>) -> Message {
        match self.encoding {
            Encoding::Proto => Message::Binary(bytes.into()),
            Encoding::Json => Message::Text(Utf8Bytes::try_from(Bytes::from(bytes)).expect("records are JSON text")),
        }
    }

    /// The messages to write, in order; the batch is empty after.
    pub fn take(&mut self) -> impl Iterator<Item = Message> + use<> {
        let open = std::mem::take(&mut self.open);
        self.full_bytes = 0;
        let last = (!open.is_empty()).then(|| self.finished(open));
        std::mem::take(&mut self.full).into_iter().chain(last)
    }
}

/// One batch holding only a `goaway` (call 0), as its bytes: what a
/// transport with a stream of its own for such records (WebTransport's
/// control stream) sends there.
pub fn goaway_batch(encoding: Encoding, message: &str) -> Bytes {
    let mut batch = Batch::new(encoding, Framing::Records);
    batch.record(
        0,
        Kind::GoAway(streambridge_protocol::v2::GoAway {
            message: message.to_string(),
        }),
    );
    batch.take().map(Message::into_data).collect::<Vec<_>>().concat().into()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use streambridge_protocol::v2;

    use super::*;

    /// Appends a `message` record of `size` bytes for `call`.
    fn message(batch: &mut Batch, call: u32, size: usize) {
        match batch.encoding {
            Encoding::Proto => {
                let message = vec![b'x'; size];
                batch.append(|out| records::append_message(Encoding::Proto, call, &message, out));
            }
            Encoding::Json => batch.record(call, Kind::JsonMessage(format!("\"{}\"", "x".repeat(size)))),
        }
    }

    /// The WebSocket messages a batch makes: for each, its size and the
    /// calls of its records, in order (each message decoded on its own).
    fn written(batch: &mut Batch) -> Vec<(usize, Vec<u32>)> {
        let encoding = batch.encoding;
        batch
            .take()
            .map(|message| {
                let bytes = message.into_data();
                let calls = match encoding {
                    Encoding::Proto => v2::ServerBatch::decode(&bytes[..])
                        .expect("a ServerBatch")
                        .records
                        .iter()
                        .map(|r| r.call)
                        .collect(),
                    Encoding::Json => serde_json::from_slice::<Vec<serde_json::Value>>(&bytes)
                        .expect("a JSON array")
                        .iter()
                        .map(|r| r["call"].as_u64().unwrap() as u32)
                        .collect(),
                };
                (bytes.len(), calls)
            })
            .collect()
    }

    #[test]
    fn a_batch_becomes_messages_of_at_most_64_kib_in_record_order() {
        for encoding in [Encoding::Proto, Encoding::Json] {
            let mut batch = Batch::new(encoding, Framing::Records);
            assert!(batch.is_empty() && !batch.is_full());
            for call in 1..=5 {
                message(&mut batch, call, 20_000);
            }
            assert!(batch.is_full(), "{encoding:?}: 100 KB is more than a message");
            let messages = written(&mut batch);
            assert!(batch.is_empty());
            let calls: Vec<_> = messages.iter().map(|(_, calls)| calls.clone()).collect();
            assert_eq!(calls, [vec![1, 2, 3], vec![4, 5]], "{encoding:?}");
            assert!(messages.iter().all(|(size, _)| *size <= BATCH_BYTES), "{encoding:?}");

            // A record larger than a message goes alone, between its neighbours.
            message(&mut batch, 6, 10);
            message(&mut batch, 7, 100_000);
            message(&mut batch, 8, 10);
            batch.record(9, Kind::Window(5));
            let calls: Vec<_> = written(&mut batch).into_iter().map(|(_, calls)| calls).collect();
            assert_eq!(calls, [vec![6], vec![7], vec![8, 9]], "{encoding:?}");
            assert_eq!(batch.take().count(), 0, "{encoding:?}: nothing left");

            // Two records that fill a message to the byte, brackets included, share
            // it; one byte more and the second starts the next.
            let mut alone = |size| {
                message(&mut batch, 1, size);
                written(&mut batch)[0].0
            };
            let json = usize::from(encoding == Encoding::Json);
            // Two records in one message: their sizes alone, less one bracket pair, plus a comma.
            let together = |a: usize, b: usize| a + b - json;
            let first = alone(30_000);
            let second = (BATCH_BYTES - first - 64..BATCH_BYTES)
                .find(|&size| together(first, alone(size)) == BATCH_BYTES)
                .expect("a size that fills the message");
            for (extra, expected) in [(0, vec![vec![1, 2]]), (1, vec![vec![1], vec![2]])] {
                message(&mut batch, 1, 30_000);
                message(&mut batch, 2, second + extra);
                let messages = written(&mut batch);
                let calls: Vec<_> = messages.iter().map(|(_, calls)| calls.clone()).collect();
                assert_eq!(calls, expected, "{encoding:?}, {extra} byte(s) over");
                assert!(messages.iter().all(|(size, _)| *size <= BATCH_BYTES), "{encoding:?}");
            }
        }
    }
}
