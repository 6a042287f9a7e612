//! The wire types of streambridge and the WebSocket envelope codec.
//!
//! Both the server and the WASM client compile this crate, so the envelope of
//! WebSocket protocol v1 (`proto/bridge.proto`, specified in
//! `docs/websocket-protocol.md`) is defined and decoded in exactly one place.
//!
//! # Layout
//!
//! - The generated types: [`StreamRequest`] / [`StreamResponse`] (the seed's
//!   contract, `proto/data_service.proto`) and the envelope [`ClientFrame`] /
//!   [`ServerFrame`] / [`Status`] (`proto/bridge.proto`).
//! - [`Subprotocol`]: the two WebSocket subprotocols and their names.
//! - [`code`]: the gRPC status codes, as every transport and the WASM client
//!   report them.
//! - [`proto`]: the binary encoding (`streambridge.v1.proto`), both directions.
//! - `json` (feature `json`): the proto3 JSON encoding (`streambridge.v1.json`),
//!   the server's half only (decode client frames, encode server frames).
//! - [`v2`]: protocol v2 (`proto/bridge_v2.proto`): many calls per socket,
//!   batched records; its types, subprotocol names and both encodings.
//! - [`grpc`]: gRPC's length-prefixed messages (the 5-byte prefix), read and
//!   written once for the server, the tests and the benchmarks.
//!
//! This crate knows nothing of sockets or transports: it turns bytes into
//! frames and back.

include!(concat!(env!("OUT_DIR"), "/_.rs"));

pub mod grpc;
#[cfg(feature = "json")]
pub mod json;
pub mod proto;
pub mod v2;

use std::fmt;

/// The gRPC status codes (`google.rpc.Code`), as numbers: what a WebSocket
/// `status` frame carries and what the WASM client's `StreamError.code` is.
/// The server maps its errors to these in one place (`server/error.rs`).
pub mod code {
    pub const OK: i32 = 0;
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const ALREADY_EXISTS: i32 = 6;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const ABORTED: i32 = 10;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const UNIMPLEMENTED: i32 = 12;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
    pub const DATA_LOSS: i32 = 15;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// A WebSocket subprotocol of protocol v1: how envelope frames are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subprotocol {
    /// `streambridge.v1.json`: text frames, proto3 JSON mapping of the envelope.
    Json,
    /// `streambridge.v1.proto`: binary frames, protobuf encoding of the envelope.
    Proto,
}

impl Subprotocol {
    /// Every subprotocol the server speaks, in the order it lists them in errors.
    pub const ALL: [Subprotocol; 2] = [Subprotocol::Json, Subprotocol::Proto];

    /// The name offered in `Sec-WebSocket-Protocol`.
    pub const fn name(self) -> &'static str {
        match self {
            Subprotocol::Json => "streambridge.v1.json",
            Subprotocol::Proto => "streambridge.v1.proto",
        }
    }

    /// The subprotocol with this exact name, if it is one of ours.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Subprotocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A frame that could not be decoded. The message says what was wrong, in
/// words fit for a `Status.message` sent back to the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

/// The `data` of the [`StreamRequest`] encoded in `message`, borrowed from
/// it: what `StreamRequest::decode` gives (the last `data` field wins,
/// unknown fields are skipped, what prost refuses is refused), without a
/// `String` or a reference count. How the v2 socket reads a request to its
/// built-in calls, which it answers at once.
pub fn stream_request_data(mut message: &[u8]) -> Result<&str, DecodeError> {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    let refused = |e: prost::DecodeError| DecodeError(e.to_string());
    let mut data = "";
    while !message.is_empty() {
        let (tag, wire_type) = decode_key(&mut message).map_err(refused)?;
        if tag != 1 {
            skip_field(wire_type, tag, &mut message, DecodeContext::default()).map_err(refused)?;
            continue;
        }
        if wire_type != WireType::LengthDelimited {
            return Err(DecodeError(format!(
                "data has wire type {wire_type:?}, not LengthDelimited"
            )));
        }
        let len = decode_varint(&mut message).map_err(refused)?;
        let Some(len) = usize::try_from(len).ok().filter(|&len| len <= message.len()) else {
            return Err(DecodeError("data runs past the end of the message".into()));
        };
        let (value, rest) = message.split_at(len);
        data = std::str::from_utf8(value).map_err(|_| DecodeError("data is not valid UTF-8".into()))?;
        message = rest;
    }
    Ok(data)
}

/// The error for a client frame whose `oneof frame` is empty: well-formed, but
/// neither a request nor a half-close.
fn empty_client_frame() -> DecodeError {
    DecodeError("ClientFrame has neither request nor closeSend; exactly one is required".into())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Every input the borrowing decoder takes or refuses, prost takes or
    /// refuses alike, with the same `data`.
    #[test]
    fn request_data_is_what_prost_decodes() {
        let encoded = |data: &str| StreamRequest { data: data.into() }.encode_to_vec();
        let mut inputs: Vec<Vec<u8>> = ["", "hi", "ü and 💡", &"x".repeat(300)].map(encoded).to_vec();
        let two = [encoded("first"), encoded("second")].concat();
        inputs.extend([
            two.clone(),
            // Unknown fields of each wire type around `data`.
            [
                &[0x10, 0x05][..],
                &encoded("a"),
                &[0x1d, 1, 2, 3, 4],
                &[0x21, 1, 2, 3, 4, 5, 6, 7, 8],
            ]
            .concat(),
            [&[0x2a, 0x02, b'z', b'z'][..], &encoded("b")].concat(),
            // Refused: not UTF-8 (also when a later field is), a wrong wire
            // type, tag 0, cut short, a length past the end.
            vec![0x0a, 0x02, 0xc3, 0x28],
            [&[0x0a, 0x01, 0xff][..], &encoded("ok")].concat(),
            vec![0x08, 0x01, b'A'],
            vec![0x0d, 0x01, b'A', b'B', b'C'],
            vec![0x00, 0x01],
            two[..two.len() - 1].to_vec(),
            vec![0x0a, 0x05, b'a'],
            vec![0x0a],
        ]);
        for input in inputs {
            let ours = stream_request_data(&input).map(str::to_owned).map_err(|_| ());
            let prost = StreamRequest::decode(&input[..]).map(|r| r.data).map_err(|_| ());
            assert_eq!(ours, prost, "{input:x?}");
        }
        assert_eq!(stream_request_data(&two), Ok("second"));
    }
}
