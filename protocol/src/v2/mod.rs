//! WebSocket protocol v2 (`proto/bridge_v2.proto`, specified in
//! `docs/websocket-protocol.md`): many calls of any gRPC method on one
//! socket, many records per WebSocket message, flow control per call.
//!
//! - The generated types: [`ClientBatch`] / [`ClientRecord`] from the client,
//!   [`ServerBatch`] / [`ServerRecord`] from the server, and what they carry.
//! - [`Encoding`]: the two subprotocols and their names.
//! - [`encode_record`]: one record as the bytes of a `ServerBatch` entry, so a
//!   batch is the concatenation of its records ([`append_record`] and
//!   [`append_message_record`] write them straight into a batch;
//!   [`append_stream_response_record`] a built-in reply from its pieces).
//! - `json` (feature `json`): the proto3 JSON encoding of the records, with
//!   each `message` left as the method's own JSON.

include!(concat!(env!("OUT_DIR"), "/streambridge.v2.rs"));

#[cfg(feature = "json")]
pub mod json;

use std::fmt;

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// The response credit of a call whose `open.window` is 0, and the request
/// credit every call starts with.
pub const DEFAULT_WINDOW: u32 = 256;

/// How a v2 socket encodes its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// `streambridge.v2.json`: text messages, a JSON array of records.
    Json,
    /// `streambridge.v2.proto`: binary messages, one `ClientBatch` or `ServerBatch` each.
    Proto,
}

impl Encoding {
    /// Both, in the order the server lists them in errors.
    pub const ALL: [Encoding; 2] = [Encoding::Json, Encoding::Proto];

    /// The name offered in `Sec-WebSocket-Protocol`.
    pub const fn name(self) -> &'static str {
        match self {
            Encoding::Json => "streambridge.v2.json",
            Encoding::Proto => "streambridge.v2.proto",
        }
    }

    /// The encoding with this exact subprotocol name, if it is one of ours.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `record` as it sits inside a `ServerBatch` (field 1, length-delimited):
/// concatenating such entries gives the encoded batch.
pub fn encode_record(record: &ServerRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.encoded_len() + 6);
    append_record(record, &mut out);
    out
}

/// [`encode_record`], appended to a batch being built.
pub fn append_record(record: &ServerRecord, batch: &mut Vec<u8>) {
    prost::encoding::message::encode(1, record, batch);
}

/// A `message` record of `call` carrying `message`, appended to a batch
/// being built: the bytes [`encode_record`] gives for that record, without
/// first encoding the message into a buffer of its own.
pub fn append_message_record(call: u32, message: &impl Message, batch: &mut Vec<u8>) {
    append_message_record_with(call, message.encoded_len(), batch, |batch| {
        message.encode(batch).expect("a Vec grows to fit")
    });
}

/// A `message` record of `call` carrying `message`, already encoded,
/// appended to a batch being built.
pub fn append_encoded_message_record(call: u32, message: &[u8], batch: &mut Vec<u8>) {
    append_message_record_with(call, message.len(), batch, |batch| batch.extend_from_slice(message));
}

/// A `message` record of `call` carrying a `StreamResponse` whose `result`
/// is `result`'s pieces joined: the bytes [`append_message_record`] gives
/// for that response, without the `String` (the server answers its built-in
/// calls so, from the request's bytes).
pub fn append_stream_response_record(call: u32, result: &[&str], batch: &mut Vec<u8>) {
    let result_len: usize = result.iter().map(|piece| piece.len()).sum();
    // proto3 leaves an empty string out.
    let message_len = if result_len == 0 {
        0
    } else {
        key_len(1) + encoded_len_varint(result_len as u64) + result_len
    };
    append_message_record_with(call, message_len, batch, |batch| {
        if result_len > 0 {
            encode_key(1, WireType::LengthDelimited, batch);
            encode_varint(result_len as u64, batch);
            for piece in result {
                batch.extend_from_slice(piece.as_bytes());
            }
        }
    });
}

/// A `message` record of `call` whose message, `message_len` bytes, `write` appends.
fn append_message_record_with(call: u32, message_len: usize, batch: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    // Fields in number order, defaults left out, as prost writes a `ServerRecord`.
    let call_len = if call == 0 {
        0
    } else {
        key_len(1) + encoded_len_varint(call.into())
    };
    let record_len = call_len + key_len(3) + encoded_len_varint(message_len as u64) + message_len;
    encode_key(1, WireType::LengthDelimited, batch);
    encode_varint(record_len as u64, batch);
    if call != 0 {
        encode_key(1, WireType::Varint, batch);
        encode_varint(call.into(), batch);
    }
    encode_key(3, WireType::LengthDelimited, batch);
    encode_varint(message_len as u64, batch);
    let start = batch.len();
    write(batch);
    debug_assert_eq!(batch.len() - start, message_len, "the message is as long as announced");
}

/// A client batch from the bytes of a binary WebSocket message. From
/// [`Bytes`](prost::bytes::Bytes), each record's `message` is a view into
/// them, not a copy.
pub fn decode_client_batch(bytes: impl prost::bytes::Buf) -> Result<ClientBatch, crate::DecodeError> {
    // Sized up front: pushed one by one, the records would grow the Vec
    // several times for every batch.
    let mut batch = ClientBatch {
        records: Vec::with_capacity(count_records(bytes.chunk())),
    };
    batch
        .merge(bytes)
        .map_err(|e| crate::DecodeError(format!("invalid ClientBatch: {e}")))?;
    Ok(batch)
}

/// The `records` entries of an encoded `ClientBatch`, counted without
/// decoding them (as far as the framing holds: decoding reports the rest).
fn count_records(mut bytes: &[u8]) -> usize {
    use prost::encoding::{DecodeContext, decode_key, decode_varint, skip_field};
    let mut count = 0;
    while !bytes.is_empty() {
        let Ok((tag, wire_type)) = decode_key(&mut bytes) else {
            break;
        };
        if tag == 1 && wire_type == WireType::LengthDelimited {
            let Ok(len) = decode_varint(&mut bytes) else { break };
            let Some(rest) = usize::try_from(len).ok().and_then(|len| bytes.get(len..)) else {
                break;
            };
            bytes = rest;
            count += 1;
        } else if skip_field(wire_type, tag, &mut bytes, DecodeContext::default()).is_err() {
            break;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_records_are_a_server_batch() {
        let records = vec![
            ServerRecord {
                call: 1,
                kind: Some(server_record::Kind::Message(prost::bytes::Bytes::from_static(
                    b"\x0a\x01x",
                ))),
            },
            ServerRecord {
                call: 0,
                kind: Some(server_record::Kind::Goaway(GoAway {
                    message: "draining".into(),
                })),
            },
        ];
        let joined: Vec<u8> = records.iter().flat_map(encode_record).collect();
        assert_eq!(
            joined,
            ServerBatch {
                records: records.clone()
            }
            .encode_to_vec()
        );
        assert_eq!(ServerBatch::decode(&joined[..]).unwrap().records, records);
    }

    #[test]
    fn a_message_record_appended_in_place_is_the_record_prost_encodes() {
        // Call 0 leaves the field out; lengths cross the one-byte varint limit.
        for call in [0, 1, 127, 128, u32::MAX] {
            for size in [0, 1, 114, 115, 200, 20_000] {
                let message = crate::StreamResponse {
                    result: "r".repeat(size),
                };
                let mut batch = b"earlier".to_vec();
                append_message_record(call, &message, &mut batch);
                let expected = encode_record(&ServerRecord {
                    call,
                    kind: Some(server_record::Kind::Message(message.encode_to_vec().into())),
                });
                assert_eq!(batch[7..], expected[..], "call {call}, {size} bytes");
                // The same response from its pieces, split anywhere.
                for cut in [0, size / 2, size] {
                    let (head, tail) = message.result.split_at(cut);
                    let mut batch = b"earlier".to_vec();
                    append_stream_response_record(call, &[head, tail], &mut batch);
                    assert_eq!(batch[7..], expected[..], "call {call}, {size} bytes cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn records_are_counted_before_decoding() {
        let record = |call| ClientRecord {
            call,
            kind: Some(client_record::Kind::Window(1)),
        };
        let batch = ClientBatch {
            records: (1..=10).map(record).collect(),
        };
        let mut bytes = batch.encode_to_vec();
        assert_eq!(count_records(&bytes), 10);
        // Unknown fields of the batch are skipped, not counted.
        bytes.extend_from_slice(&[0x10, 0x05]);
        assert_eq!(count_records(&bytes), 10);
        assert_eq!(decode_client_batch(&bytes[..]).unwrap(), batch);
        // Broken framing stops the count; decoding reports it.
        assert_eq!(count_records(&[0x0a, 0x09, 0x08]), 0);
        assert!(decode_client_batch(&[0x0a, 0x09, 0x08][..]).is_err());
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
    }

    /// The example session of docs/protocol-v2.md, byte for byte.
    #[test]
    fn the_documented_proto_session_is_what_the_types_encode() {
        let open = ClientRecord {
            call: 1,
            kind: Some(client_record::Kind::Open(Open {
                method: "/DataService/BidirectionalStream".into(),
                ..Default::default()
            })),
        };
        let message = ClientRecord {
            call: 1,
            kind: Some(client_record::Kind::Message(prost::bytes::Bytes::from_static(
                b"\x0a\x02hi",
            ))),
        };
        let close_send = ClientRecord {
            call: 1,
            kind: Some(client_record::Kind::CloseSend(Empty {})),
        };
        let batch = ClientBatch {
            records: vec![open, message, close_send],
        };
        assert_eq!(
            hex(&batch.encode_to_vec()),
            "0a 26 08 01 12 22 0a 20 2f 44 61 74 61 53 65 72 76 69 63 65 2f 42 69 64 69 72 65 63 74 69 \
             6f 6e 61 6c 53 74 72 65 61 6d 0a 08 08 01 1a 04 0a 02 68 69 0a 04 08 01 22 00"
        );
        let reply = ServerRecord {
            call: 1,
            kind: Some(server_record::Kind::Message(prost::bytes::Bytes::from_static(
                b"\x0a\x0dprocessed: hi",
            ))),
        };
        assert_eq!(
            hex(&encode_record(&reply)),
            "0a 13 08 01 1a 0f 0a 0d 70 72 6f 63 65 73 73 65 64 3a 20 68 69"
        );
        let ok = ServerRecord {
            call: 1,
            kind: Some(server_record::Kind::Status(Status::default())),
        };
        assert_eq!(hex(&encode_record(&ok)), "0a 04 08 01 22 00");
    }

    #[test]
    fn names_round_trip() {
        for encoding in Encoding::ALL {
            assert_eq!(Encoding::from_name(encoding.name()), Some(encoding));
        }
        assert_eq!(Encoding::from_name("streambridge.v1.json"), None);
    }
}
