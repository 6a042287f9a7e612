//! The records of protocol v2 as the socket meets them: what comes in
//! (a view into the WebSocket message that brought it), what goes out
//! (appended to a [`Batch`](super::batch::Batch) in the socket's encoding),
//! and the metadata rules both directions share.

use std::collections::HashMap;

use base64::Engine;
use bytes::Bytes;
use http::HeaderMap;
use streambridge_protocol::v2::{self, Encoding, client_record, server_record};
use tonic::Status;

/// A request message as it came, while its batch is applied: a view into
/// the WebSocket message that brought it. What has to wait is
/// [detached](Request::detached) first.
pub enum Request<'a> {
    /// A slice of the binary message (prost decodes `bytes` fields so).
    Proto(Bytes),
    /// A slice of the text message: no copy, no reference count, and
    /// already checked as UTF-8.
    Json(&'a str),
}

impl Request<'_> {
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// The message's bytes (a json message's text).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Request::Proto(bytes) => bytes,
            Request::Json(text) => text.as_bytes(),
        }
    }

    /// The message in its own allocation. A view would keep the whole
    /// WebSocket message alive, and the socket's budget
    /// (`--ws-socket-buffer`) counts only this message's bytes: a small
    /// request padded into a 4 MiB batch could pin 4 MiB per request.
    pub fn detached(&self) -> Payload {
        match self {
            Request::Proto(bytes) => Payload::Proto(Bytes::copy_from_slice(bytes)),
            Request::Json(text) => Payload::Json((*text).to_owned()),
        }
    }
}

/// A request message that waits (for response credit, or for its backend
/// to take it), in an allocation of its own.
pub enum Payload {
    Proto(Bytes),
    Json(String),
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Proto(bytes) => bytes.len(),
            Payload::Json(text) => text.len(),
        }
    }

    /// The message as a [`Request`] again, to be answered.
    pub fn as_request(&self) -> Request<'_> {
        match self {
            Payload::Proto(bytes) => Request::Proto(bytes.clone()),
            Payload::Json(text) => Request::Json(text),
        }
    }
}

/// A client record, decoded from either encoding.
pub enum Incoming<'a> {
    Open(v2::Open),
    Message(Request<'a>),
    CloseSend,
    Cancel,
    Window(u32),
}

impl Incoming<'_> {
    /// A proto record's kind; `None` for a record without one.
    pub fn from_proto(kind: Option<client_record::Kind>) -> Option<Incoming<'static>> {
        Some(match kind? {
            client_record::Kind::Open(open) => Incoming::Open(open),
            client_record::Kind::Message(bytes) => Incoming::Message(Request::Proto(bytes)),
            client_record::Kind::CloseSend(_) => Incoming::CloseSend,
            client_record::Kind::Cancel(_) => Incoming::Cancel,
            client_record::Kind::Window(window) => Incoming::Window(window),
        })
    }

    pub fn from_json(kind: v2::json::JsonClientKind<'_>) -> Incoming<'_> {
        use v2::json::JsonClientKind;
        match kind {
            JsonClientKind::Open(open) => Incoming::Open(*open),
            JsonClientKind::Message(text) => Incoming::Message(Request::Json(text)),
            JsonClientKind::CloseSend => Incoming::CloseSend,
            JsonClientKind::Cancel => Incoming::Cancel,
            JsonClientKind::Window(window) => Incoming::Window(window),
        }
    }
}

/// What a server record carries, before encoding.
pub enum Kind {
    Headers(HashMap<String, String>),
    /// A message in proto3 JSON (a proto message is appended with [`append_message`]).
    JsonMessage(String),
    Status(v2::Status),
    Window(u32),
    GoAway(v2::GoAway),
}

/// One record in the socket's encoding, appended to a batch being built
/// (see [`super::batch::Batch`]; the separators between JSON records are its job).
pub fn append(encoding: Encoding, call: u32, kind: Kind, out: &mut Vec<u8>) {
    use streambridge_protocol::v2::json::{JsonServerKind, encode_server_record};
    match encoding {
        Encoding::Proto => {
            let kind = match kind {
                Kind::Headers(metadata) => server_record::Kind::Headers(v2::Headers { metadata }),
                Kind::JsonMessage(json) => server_record::Kind::Message(Bytes::from(json)),
                Kind::Status(status) => server_record::Kind::Status(status),
                Kind::Window(window) => server_record::Kind::Window(window),
                Kind::GoAway(goaway) => server_record::Kind::Goaway(goaway),
            };
            v2::append_record(&v2::ServerRecord { call, kind: Some(kind) }, out);
        }
        Encoding::Json => out.extend_from_slice(
            match kind {
                Kind::Headers(metadata) => encode_server_record(call, JsonServerKind::Headers(&metadata)),
                Kind::JsonMessage(json) => encode_server_record(call, JsonServerKind::Message(&json)),
                Kind::Status(status) => encode_server_record(call, JsonServerKind::Status(&status)),
                Kind::Window(window) => encode_server_record(call, JsonServerKind::Window(window)),
                Kind::GoAway(goaway) => encode_server_record(call, JsonServerKind::GoAway(&goaway)),
            }
            .as_bytes(),
        ),
    }
}

/// A `message` record of an encoded message, appended to a batch being
/// built; on a json socket (only without the method's descriptors, never
/// in practice) as a base64 string.
pub fn append_message(encoding: Encoding, call: u32, message: &[u8], out: &mut Vec<u8>) {
    use streambridge_protocol::v2::json::{JsonServerKind, encode_server_record};
    match encoding {
        Encoding::Proto => v2::append_encoded_message_record(call, message, out),
        Encoding::Json => {
            let json = serde_json::to_string(&base64::engine::general_purpose::STANDARD.encode(message))
                .expect("a string serialises");
            out.extend_from_slice(encode_server_record(call, JsonServerKind::Message(&json)).as_bytes());
        }
    }
}

/// A call's last record.
pub fn status_record(status: &Status) -> Kind {
    Kind::Status(v2::Status {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: Bytes::copy_from_slice(status.details()),
        metadata: metadata_of(&status.metadata().clone().into_headers()),
    })
}

/// Headers a client may not set as metadata: HTTP's own, and gRPC's.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with("grpc-")
        || name.starts_with(':')
        || matches!(
            name,
            "content-type"
                | "te"
                | "host"
                | "connection"
                | "keep-alive"
                | "transfer-encoding"
                | "upgrade"
                | "content-length"
        )
}

/// Response metadata a client may see: everything but HTTP's and gRPC's own.
pub fn metadata_of(headers: &HeaderMap) -> HashMap<String, String> {
    headers
        .iter()
        .filter(|(name, _)| !is_reserved(name.as_str()) && name.as_str() != "date")
        .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?.to_string())))
        .collect()
}
