//! Protocol v2 records on the wire, in both encodings
//! (docs/protocol-v2.md).
//!
//! Outgoing: a [`Batch`] collects the records of one turn of the event loop
//! and becomes one WebSocket message. JSON records are written as text
//! directly (no JavaScript object per record); proto records are appended as
//! `ClientBatch.records` entries, so a batch is the concatenation of them.
//!
//! Incoming: a WebSocket message becomes a list of `(call, Incoming)`. JSON is
//! parsed by the browser (`JSON.parse`) and each `message` is handed to the
//! application as the object the parser made, never copied.

use std::cell::RefCell;
use std::collections::HashMap;

use base64::Engine;
use js_sys::{Array, Object, Reflect};
use prost::Message;
use prost::bytes::Bytes;
use streambridge_protocol::v2::{self, Encoding, client_record, server_record};
use wasm_bindgen::prelude::*;

use crate::error::CallStatus;

/// A batch is sent once it reaches this size; a larger single record goes alone.
pub const BATCH_LIMIT: usize = 64 * 1024;

/// One request message, encoded for the socket's encoding.
pub enum Payload {
    /// The method's input message as JSON text.
    Json(String),
    /// The method's input message as protobuf bytes.
    Proto(Vec<u8>),
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(text) => text.len(),
            Payload::Proto(bytes) => bytes.len(),
        }
    }
}

/// The records of one outgoing WebSocket message.
pub struct Batch {
    encoding: Encoding,
    json: String,
    proto: Vec<u8>,
}

/// A finished batch.
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

impl Frame {
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(text) => text.len(),
            Frame::Binary(bytes) => bytes.len(),
        }
    }
}

impl Batch {
    pub fn new(encoding: Encoding) -> Self {
        Batch {
            encoding,
            json: String::new(),
            proto: Vec::new(),
        }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.json.len() + self.proto.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch as a message; the batch is empty after.
    pub fn take(&mut self) -> Frame {
        match self.encoding {
            Encoding::Json => {
                self.json.push(']');
                Frame::Text(std::mem::take(&mut self.json))
            }
            Encoding::Proto => Frame::Binary(std::mem::take(&mut self.proto)),
        }
    }

    pub fn open(&mut self, call: u32, method: &str, metadata: &[(String, String)], timeout_ms: u32, window: u32) {
        match self.encoding {
            Encoding::Json => {
                let json = self.begin_json(call);
                json.push_str(r#""open":{"method":"#);
                push_json_string(json, method);
                if !metadata.is_empty() {
                    json.push_str(r#","metadata":{"#);
                    for (i, (key, value)) in metadata.iter().enumerate() {
                        if i > 0 {
                            json.push(',');
                        }
                        push_json_string(json, key);
                        json.push(':');
                        push_json_string(json, value);
                    }
                    json.push('}');
                }
                if timeout_ms > 0 {
                    json.push_str(&format!(r#","timeoutMs":{timeout_ms}"#));
                }
                if window > 0 {
                    json.push_str(&format!(r#","window":{window}"#));
                }
                json.push_str("}}");
            }
            Encoding::Proto => self.push_proto(
                call,
                client_record::Kind::Open(v2::Open {
                    method: method.to_string(),
                    metadata: metadata.iter().cloned().collect::<HashMap<_, _>>(),
                    timeout_ms,
                    window,
                }),
            ),
        }
    }

    pub fn message(&mut self, call: u32, payload: Payload) {
        match (self.encoding, payload) {
            (Encoding::Json, Payload::Json(text)) => {
                let json = self.begin_json(call);
                json.push_str(r#""message":"#);
                json.push_str(&text);
                json.push('}');
            }
            (Encoding::Proto, Payload::Proto(bytes)) => {
                self.push_proto(call, client_record::Kind::Message(Bytes::from(bytes)));
            }
            // Calls encode for their socket's encoding; a mismatch is a bug.
            _ => unreachable!("a payload of the other encoding"),
        }
    }

    pub fn close_send(&mut self, call: u32) {
        match self.encoding {
            Encoding::Json => self.begin_json(call).push_str(r#""closeSend":{}}"#),
            Encoding::Proto => self.push_proto(call, client_record::Kind::CloseSend(v2::Empty {})),
        }
    }

    pub fn cancel(&mut self, call: u32) {
        match self.encoding {
            Encoding::Json => self.begin_json(call).push_str(r#""cancel":{}}"#),
            Encoding::Proto => self.push_proto(call, client_record::Kind::Cancel(v2::Empty {})),
        }
    }

    pub fn window(&mut self, call: u32, credit: u32) {
        match self.encoding {
            Encoding::Json => self.begin_json(call).push_str(&format!(r#""window":{credit}}}"#)),
            Encoding::Proto => self.push_proto(call, client_record::Kind::Window(credit)),
        }
    }

    /// Starts a JSON record: `[` or `,`, then `{"call":N,`.
    fn begin_json(&mut self, call: u32) -> &mut String {
        self.json.push(if self.json.is_empty() { '[' } else { ',' });
        self.json.push_str(r#"{"call":"#);
        self.json.push_str(&call.to_string());
        self.json.push(',');
        &mut self.json
    }

    fn push_proto(&mut self, call: u32, kind: client_record::Kind) {
        let record = v2::ClientRecord { call, kind: Some(kind) };
        prost::encoding::message::encode(1, &record, &mut self.proto);
    }
}

/// Appends `text` as a JSON string literal.
pub fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A record from the server, for one call (or call 0: the socket).
pub enum Incoming {
    /// Response metadata, as a plain object.
    Headers(JsValue),
    Message(Received),
    Status(CallStatus),
    Window(u32),
    GoAway,
}

/// One response message: the parsed JSON object (json) or its bytes (proto).
pub enum Received {
    Json(JsValue),
    Proto(Bytes),
}

/// Property names, made once: looking a field up by a cached string is what
/// keeps per-record dispatch cheap.
struct Keys {
    message: JsValue,
    code: JsValue,
    metadata: JsValue,
    details: JsValue,
    result: JsValue,
}

thread_local! {
    static KEYS: RefCell<Option<Keys>> = const { RefCell::new(None) };
}

/// `"result"`, the field of `DataService`'s reply, without making the string again.
pub fn result_key() -> JsValue {
    with_keys(|keys| keys.result.clone())
}

fn with_keys<T>(f: impl FnOnce(&Keys) -> T) -> T {
    KEYS.with(|keys| {
        let mut keys = keys.borrow_mut();
        let keys = keys.get_or_insert_with(|| Keys {
            message: "message".into(),
            code: "code".into(),
            metadata: "metadata".into(),
            details: "details".into(),
            result: "result".into(),
        });
        f(keys)
    })
}

#[wasm_bindgen(module = "/js/runtime.js")]
extern "C" {
    /// `[heads, values]`: per record its call and kind, and its value; `null`
    /// if a record is not an object; throws if the text is not JSON.
    #[wasm_bindgen(js_name = splitBatch, catch)]
    fn split_batch(text: &JsValue) -> Result<JsValue, JsValue>;
}

/// The records of a `streambridge.v2.json` message (a JavaScript string).
pub fn decode_text(text: &JsValue) -> Result<Vec<(u32, Incoming)>, String> {
    let split = split_batch(text).map_err(|_| "the server sent text that is not JSON".to_string())?;
    if split.is_null() {
        return Err("the server sent a record that is not an object".to_string());
    }
    let split: Array = split.unchecked_into();
    let heads = js_sys::Uint32Array::from(split.get(0)).to_vec();
    let values: Array = split.get(1).unchecked_into();
    with_keys(|keys| {
        let mut out = Vec::with_capacity(heads.len() / 2);
        for (i, head) in heads.chunks_exact(2).enumerate() {
            let (call, kind) = (head[0], head[1]);
            let value = || values.get(i as u32);
            let incoming = match kind {
                0 => Incoming::Message(Received::Json(value())),
                1 => Incoming::Window(value().as_f64().unwrap_or(0.0) as u32),
                2 => Incoming::Status(json_status(&value(), keys)),
                3 => Incoming::Headers(value()),
                4 => Incoming::GoAway,
                // A kind this client does not know (a newer server): skip it.
                _ => continue,
            };
            out.push((call, incoming));
        }
        Ok(out)
    })
}

fn json_status(status: &JsValue, keys: &Keys) -> CallStatus {
    let code = get(status, &keys.code).as_f64().unwrap_or(0.0) as i32;
    let message = get(status, &keys.message).as_string().unwrap_or_default();
    let details = get(status, &keys.details)
        .as_string()
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .filter(|details| !details.is_empty());
    CallStatus {
        code,
        message,
        details,
        metadata: object_or_empty(get(status, &keys.metadata)),
    }
}

/// The records of a `streambridge.v2.proto` message.
pub fn decode_binary(bytes: &[u8]) -> Result<Vec<(u32, Incoming)>, String> {
    let batch =
        v2::ServerBatch::decode(bytes).map_err(|e| format!("the server sent an undecodable ServerBatch: {e}"))?;
    Ok(batch
        .records
        .into_iter()
        .filter_map(|record| {
            let incoming = match record.kind? {
                server_record::Kind::Headers(headers) => Incoming::Headers(metadata_object(headers.metadata)),
                server_record::Kind::Message(message) => Incoming::Message(Received::Proto(message)),
                server_record::Kind::Status(status) => Incoming::Status(CallStatus {
                    code: status.code,
                    message: status.message,
                    details: (!status.details.is_empty()).then(|| status.details.to_vec()),
                    metadata: metadata_object(status.metadata),
                }),
                server_record::Kind::Window(window) => Incoming::Window(window),
                server_record::Kind::Goaway(_) => Incoming::GoAway,
            };
            Some((record.call, incoming))
        })
        .collect())
}

fn get(object: &JsValue, key: &JsValue) -> JsValue {
    Reflect::get(object, key).unwrap_or(JsValue::UNDEFINED)
}

fn object_or_empty(value: JsValue) -> JsValue {
    if value.is_object() { value } else { Object::new().into() }
}

fn metadata_object(metadata: HashMap<String, String>) -> JsValue {
    let object = Object::new();
    for (key, value) in metadata {
        let _ = Reflect::set(&object, &key.into(), &value.into());
    }
    object.into()
}

#[cfg(all(test, target_arch = "wasm32"))]
mod tests {
    use wasm_bindgen_test::{wasm_bindgen_test as test, wasm_bindgen_test_configure};

    use super::*;

    wasm_bindgen_test_configure!(run_in_browser);

    #[test]
    fn json_strings_escape_what_json_requires() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#);
    }

    #[test]
    fn a_json_batch_is_an_array_of_records() {
        let mut batch = Batch::new(Encoding::Json);
        batch.open(
            1,
            "/DataService/BidirectionalStream",
            &[("k".into(), "v".into())],
            5000,
            1024,
        );
        batch.message(1, Payload::Json(r#"{"data":"hi"}"#.into()));
        batch.window(1, 512);
        batch.close_send(1);
        batch.cancel(1);
        let Frame::Text(text) = batch.take() else {
            panic!("json is text")
        };
        assert_eq!(
            text,
            concat!(
                r#"[{"call":1,"open":{"method":"/DataService/BidirectionalStream","metadata":{"k":"v"},"timeoutMs":5000,"window":1024}},"#,
                r#"{"call":1,"message":{"data":"hi"}},{"call":1,"window":512},{"call":1,"closeSend":{}},{"call":1,"cancel":{}}]"#
            )
        );
        assert!(batch.is_empty());
    }

    #[test]
    fn json_records_decode_with_proto3_defaults() {
        let records = decode_text(&JsValue::from_str(concat!(
            r#"[{"call":1,"headers":{"metadata":{"k":"v"}}},{"call":1,"message":{"result":"processed: a"}},"#,
            r#"{"call":1,"window":"256"},{"call":1,"status":{"message":"m","details":"AQI="}},"#,
            r#"{"goaway":{"message":"draining"}},{"call":2,"unknownKind":{}}]"#
        )))
        .unwrap();
        assert_eq!(records.len(), 5, "the unknown kind is skipped");
        assert!(matches!(&records[0], (1, Incoming::Headers(h)) if Reflect::get(h, &"k".into()).unwrap() == "v"));
        assert!(matches!(&records[1], (1, Incoming::Message(Received::Json(_)))));
        assert!(matches!(&records[2], (1, Incoming::Window(256))));
        let (1, Incoming::Status(status)) = &records[3] else {
            panic!("a status")
        };
        assert_eq!((status.code, status.message.as_str()), (0, "m"));
        assert_eq!(status.details.as_deref(), Some(&[1u8, 2][..]));
        assert!(matches!(&records[4], (0, Incoming::GoAway)));
        assert!(decode_text(&"[1]".into()).is_err());
        assert!(decode_text(&"not json".into()).is_err());
    }

    #[test]
    fn a_proto_batch_decodes_as_a_client_batch() {
        let mut batch = Batch::new(Encoding::Proto);
        batch.open(3, "/m", &[], 0, 0);
        batch.message(3, Payload::Proto(vec![10, 2, b'h', b'i']));
        batch.close_send(3);
        let Frame::Binary(bytes) = batch.take() else {
            panic!("proto is binary")
        };
        let decoded = v2::ClientBatch::decode(bytes.as_slice()).unwrap();
        let kinds: Vec<_> = decoded.records.iter().map(|r| (r.call, r.kind.clone())).collect();
        assert_eq!(
            kinds,
            vec![
                (
                    3,
                    Some(client_record::Kind::Open(v2::Open {
                        method: "/m".into(),
                        ..Default::default()
                    }))
                ),
                (
                    3,
                    Some(client_record::Kind::Message(Bytes::from_static(&[10, 2, b'h', b'i'])))
                ),
                (3, Some(client_record::Kind::CloseSend(v2::Empty {}))),
            ]
        );
    }
}
