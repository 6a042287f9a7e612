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
//!
//! This crate knows nothing of sockets or transports: it turns bytes into
//! frames and back.

include!(concat!(env!("OUT_DIR"), "/_.rs"));

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

/// A [`StreamRequest`] whose `data` is a view into the bytes it was decoded
/// from (a [`Bytes`](prost::bytes::Bytes)), not a `String` of its own: the
/// same field, so the same wire form. What a server that answers in place
/// decodes a request as (the v2 socket's built-in calls).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamRequestView {
    #[prost(bytes = "bytes", tag = "1")]
    data: prost::bytes::Bytes,
}

impl StreamRequestView {
    /// The request's `data`; an error if it is not UTF-8 (a `string` field
    /// must be, and prost refuses a `StreamRequest` whose `data` is not).
    pub fn data(&self) -> Result<&str, DecodeError> {
        std::str::from_utf8(&self.data).map_err(|_| DecodeError("data is not valid UTF-8".into()))
    }
}

/// The error for a client frame whose `oneof frame` is empty: well-formed, but
/// neither a request nor a half-close.
fn empty_client_frame() -> DecodeError {
    DecodeError("ClientFrame has neither request nor closeSend; exactly one is required".into())
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost::bytes::Bytes;

    use super::*;

    #[test]
    fn a_request_view_reads_what_a_stream_request_encodes() {
        for data in ["", "hi", "ü and 💡", &"x".repeat(300)] {
            let bytes = Bytes::from(StreamRequest { data: data.into() }.encode_to_vec());
            let view = StreamRequestView::decode(bytes.clone()).unwrap();
            assert_eq!(view.data(), Ok(data));
            assert_eq!(view.encode_to_vec(), bytes);
            // A view, not a copy.
            assert!(data.is_empty() || bytes.as_ptr_range().contains(&view.data.as_ptr()));
        }
        // Unknown fields are skipped, as StreamRequest skips them.
        let mut unknown = StreamRequest { data: "a".into() }.encode_to_vec();
        unknown.extend_from_slice(&[0x10, 0x05]);
        assert_eq!(StreamRequestView::decode(&unknown[..]).unwrap().data(), Ok("a"));
        // `data` that is not UTF-8: refused by both.
        let not_utf8 = [0x0a, 0x02, 0xc3, 0x28];
        assert!(StreamRequest::decode(&not_utf8[..]).is_err());
        assert!(StreamRequestView::decode(&not_utf8[..]).unwrap().data().is_err());
    }
}
