//! The `streambridge.v2.json` encoding: a text WebSocket message is a JSON
//! array of records in proto3 JSON form (lowerCamelCase names, defaults
//! left out, `details` base64), except that a record's `message` is the
//! method's own input or output message as proto3 JSON. This module is the
//! envelope; turning a `message` into protobuf and back needs the method's
//! descriptors, which the server has and this crate does not.
//!
//! As proto3 JSON parsers do, decoding accepts lowerCamelCase and original
//! field names (`closeSend`, `close_send`), numbers or numeric strings for
//! integers, `null` for a default, and ignores unknown fields. A batch may
//! also be a single record object.

use std::collections::HashMap;

use base64::Engine;
use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use super::{GoAway, Open, Status};
use crate::DecodeError;

/// A record from the client, its `message` still the method's JSON text.
#[derive(Debug, PartialEq)]
pub struct JsonClientRecord<'a> {
    pub call: u32,
    pub kind: JsonClientKind<'a>,
}

/// The kind of a client record.
#[derive(Debug, PartialEq)]
pub enum JsonClientKind<'a> {
    /// Boxed: a batch is mostly messages, and a record is as large as its largest kind.
    Open(Box<Open>),
    /// The request message as JSON text, to be transcoded with the method's input type.
    Message(&'a str),
    CloseSend,
    Cancel,
    Window(u32),
}

/// A key of a record object (proto3 JSON parsers take the original field
/// names as well as the lowerCamelCase ones).
#[derive(Clone, Copy, PartialEq, Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum RecordKey {
    Call,
    Open,
    Message,
    #[serde(alias = "close_send")]
    CloseSend,
    Cancel,
    Window,
    #[serde(other)]
    Other,
}

impl RecordKey {
    /// The names of the fields, indexed by `key as usize` (in the order of the variants).
    const NAMES: [&str; 6] = ["call", "open", "message", "closeSend", "cancel", "window"];
}

/// What a record object holds, before its kinds are counted.
struct RecordFields<'a> {
    call: Option<u32>,
    /// The last kind present (a `null` value is absent).
    kind: Option<JsonClientKind<'a>>,
    kinds: usize,
}

#[derive(Deserialize)]
struct Empty {}

#[derive(Deserialize)]
struct OpenMirror {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    metadata: Option<HashMap<String, String>>,
    #[serde(default, rename = "timeoutMs", alias = "timeout_ms", deserialize_with = "proto_u32")]
    timeout_ms: Option<u32>,
    #[serde(default, deserialize_with = "proto_u32")]
    window: Option<u32>,
}

impl OpenMirror {
    fn into_open(self) -> Open {
        Open {
            method: self.method.unwrap_or_default(),
            metadata: self.metadata.unwrap_or_default(),
            timeout_ms: self.timeout_ms.unwrap_or_default(),
            window: self.window.unwrap_or_default(),
        }
    }
}

/// [`ProtoU32`], for serde's `deserialize_with`.
fn proto_u32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    ProtoU32.deserialize(deserializer)
}

/// A proto3 JSON `uint32`: a number or a string of digits; `null` is unset.
/// A visitor rather than an untagged enum: serde buffers an untagged
/// enum's value before trying each variant, and every record has a `call`.
struct ProtoU32;

impl<'de> DeserializeSeed<'de> for ProtoU32 {
    type Value = Option<u32>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<u32>, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for ProtoU32 {
    type Value = Option<u32>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a uint32 (a number, or a string of digits)")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Option<u32>, E> {
        Ok(None)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Option<u32>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<u32>, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Option<u32>, E> {
        u32::try_from(n)
            .map(Some)
            .map_err(|_| E::custom(format!("{n} is out of range for a uint32")))
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Option<u32>, E> {
        Err(E::custom(format!("{n} is not a uint32")))
    }

    fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<Option<u32>, E> {
        if f.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&f) {
            Ok(Some(f as u32))
        } else {
            Err(E::custom(format!("{f} is not a uint32")))
        }
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Option<u32>, E> {
        let n: u64 = text
            .parse()
            .map_err(|_| E::custom(format!("{text:?} is not a uint32")))?;
        self.visit_u64(n)
    }
}

/// Decodes one text WebSocket message from the client: an array of records,
/// or one record object. One pass over the text: each record's `message` is
/// left as a slice of it.
pub fn decode_client_batch(text: &str) -> Result<Vec<JsonClientRecord<'_>>, DecodeError> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let records = match text.trim_start().as_bytes().first() {
        // Room for as many records as the text could hold (the smallest,
        // `{"window":1}`, is 12 bytes), up to a few hundred: a batch of small
        // records is decoded without regrowing, one of large records does
        // not take a large allocation for a few of them.
        Some(b'[') => deserializer.deserialize_seq(BatchVisitor {
            capacity: (text.len() / 12).min(256),
        }),
        Some(b'{') => RecordSeed { index: 0 }
            .deserialize(&mut deserializer)
            .map(|record| vec![record]),
        _ => {
            return Err(DecodeError(
                "a batch is a JSON array of records (or one record object)".into(),
            ));
        }
    };
    records
        .and_then(|records| deserializer.end().map(|()| records))
        .map_err(|e| DecodeError(format!("invalid JSON batch: {e}")))
}

/// The records of a batch array, each an object.
struct BatchVisitor {
    capacity: usize,
}

impl<'de> Visitor<'de> for BatchVisitor {
    type Value = Vec<JsonClientRecord<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut records = Vec::with_capacity(self.capacity);
        while let Some(record) = seq.next_element_seed(RecordSeed { index: records.len() })? {
            records.push(record);
        }
        Ok(records)
    }
}

/// Record `index` of a batch: an object (serde's derive would take an
/// array for a struct too), with exactly one kind.
struct RecordSeed {
    index: usize,
}

impl<'de> DeserializeSeed<'de> for RecordSeed {
    type Value = JsonClientRecord<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let index = self.index;
        let fields = deserializer
            .deserialize_map(self)
            .map_err(|e| serde::de::Error::custom(format_args!("record {index}: {e}")))?;
        to_record(index, fields).map_err(|e| serde::de::Error::custom(e.0))
    }
}

impl<'de> Visitor<'de> for RecordSeed {
    type Value = RecordFields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record object")
    }

    /// Each field as it comes, straight into its kind; a `null` value is an
    /// absent field, a field given twice an error (as serde's derive has it).
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = RecordFields {
            call: None,
            kind: None,
            kinds: 0,
        };
        let mut seen = [false; RecordKey::NAMES.len()];
        while let Some(key) = map.next_key::<RecordKey>()? {
            if key != RecordKey::Other && std::mem::replace(&mut seen[key as usize], true) {
                return Err(serde::de::Error::duplicate_field(RecordKey::NAMES[key as usize]));
            }
            let kind = match key {
                RecordKey::Call => {
                    fields.call = map.next_value_seed(ProtoU32)?;
                    None
                }
                RecordKey::Open => map
                    .next_value::<Option<OpenMirror>>()?
                    .map(|open| JsonClientKind::Open(Box::new(open.into_open()))),
                RecordKey::Message => map
                    .next_value::<Option<&'de RawValue>>()?
                    .map(|message| JsonClientKind::Message(message.get())),
                RecordKey::CloseSend => map.next_value::<Option<Empty>>()?.map(|_| JsonClientKind::CloseSend),
                RecordKey::Cancel => map.next_value::<Option<Empty>>()?.map(|_| JsonClientKind::Cancel),
                RecordKey::Window => map.next_value_seed(ProtoU32)?.map(JsonClientKind::Window),
                RecordKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                    None
                }
            };
            if kind.is_some() {
                fields.kinds += 1;
                fields.kind = kind;
            }
        }
        Ok(fields)
    }
}

fn to_record(index: usize, fields: RecordFields<'_>) -> Result<JsonClientRecord<'_>, DecodeError> {
    if fields.kinds > 1 {
        return Err(DecodeError(format!(
            "record {index} has {} kinds; exactly one of open, message, closeSend, cancel, window is allowed",
            fields.kinds
        )));
    }
    let kind = fields.kind.ok_or_else(|| {
        DecodeError(format!(
            "record {index} has no kind; exactly one of open, message, closeSend, cancel, window is required"
        ))
    })?;
    Ok(JsonClientRecord {
        call: fields.call.unwrap_or_default(),
        kind,
    })
}

/// A record from the server, ready to be written.
pub enum JsonServerKind<'a> {
    Headers(&'a HashMap<String, String>),
    /// The response message, already proto3 JSON text.
    Message(&'a str),
    Status(&'a Status),
    Window(u32),
    GoAway(&'a GoAway),
}

#[derive(Serialize)]
struct ServerRecordOut<'a> {
    #[serde(skip_serializing_if = "is_zero")]
    call: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<HeadersOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    goaway: Option<GoAwayOut<'a>>,
}

#[derive(Serialize)]
struct HeadersOut<'a> {
    metadata: &'a HashMap<String, String>,
}

#[derive(Serialize)]
struct StatusOut<'a> {
    code: i32,
    #[serde(skip_serializing_if = "str::is_empty")]
    message: &'a str,
    #[serde(skip_serializing_if = "String::is_empty")]
    details: String,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    metadata: &'a HashMap<String, String>,
}

#[derive(Serialize)]
struct GoAwayOut<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    message: &'a str,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One server record as JSON text. The status code is always written, also
/// when it is 0, so a status reads as such at a glance.
pub fn encode_server_record(call: u32, kind: JsonServerKind<'_>) -> String {
    let mut out = ServerRecordOut {
        call,
        headers: None,
        status: None,
        window: None,
        goaway: None,
    };
    match kind {
        JsonServerKind::Message(json) => {
            // The message is JSON already: spliced in, not parsed again.
            let mut out = Vec::with_capacity(json.len() + 24);
            append_message_record(call, &mut out, |out| out.extend_from_slice(json.as_bytes()));
            return String::from_utf8(out).expect("JSON text around JSON text");
        }
        JsonServerKind::Headers(metadata) => out.headers = Some(HeadersOut { metadata }),
        JsonServerKind::Status(status) => {
            out.status = Some(StatusOut {
                code: status.code,
                message: &status.message,
                details: base64::engine::general_purpose::STANDARD.encode(&status.details),
                metadata: &status.metadata,
            })
        }
        JsonServerKind::Window(window) => out.window = Some(window),
        JsonServerKind::GoAway(goaway) => {
            out.goaway = Some(GoAwayOut {
                message: &goaway.message,
            })
        }
    }
    serde_json::to_string(&out).expect("strings, maps of strings and integers always serialise")
}

/// A `message` record of `call`, appended to a batch being built; `message`
/// appends the message's proto3 JSON (which must be valid JSON text).
pub fn append_message_record(call: u32, batch: &mut Vec<u8>, message: impl FnOnce(&mut Vec<u8>)) {
    if call == 0 {
        batch.extend_from_slice(br#"{"message":"#);
    } else {
        batch.extend_from_slice(br#"{"call":"#);
        // Not `write!`: the formatter is a measurable share of a reply.
        batch.extend_from_slice(itoa::Buffer::new().format(call).as_bytes());
        batch.extend_from_slice(br#","message":"#);
    }
    message(batch);
    batch.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_arrays_single_records_and_every_kind() {
        let batch = decode_client_batch(
            r#"[{"call":1,"open":{"method":"/DataService/BidirectionalStream","metadata":{"k":"v"},"timeoutMs":"5000","window":10}},
                {"call":1,"message":{"data":"hi"}},{"call":"1","closeSend":{}},{"call":1,"cancel":{}},{"call":1,"window":3}]"#,
        )
        .unwrap();
        assert_eq!(batch.len(), 5);
        let JsonClientKind::Open(open) = &batch[0].kind else {
            panic!()
        };
        assert_eq!(open.method, "/DataService/BidirectionalStream");
        assert_eq!(open.metadata["k"], "v");
        assert_eq!((open.timeout_ms, open.window), (5000, 10));
        assert_eq!(batch[1].kind, JsonClientKind::Message(r#"{"data":"hi"}"#));
        assert_eq!(batch[2].kind, JsonClientKind::CloseSend);
        assert_eq!(batch[3].kind, JsonClientKind::Cancel);
        assert_eq!(batch[4].kind, JsonClientKind::Window(3));
        let single = decode_client_batch(r#"{"call":2,"close_send":{},"unknown":1}"#).unwrap();
        assert_eq!(
            single,
            [JsonClientRecord {
                call: 2,
                kind: JsonClientKind::CloseSend
            }]
        );
    }

    #[test]
    fn refuses_what_is_not_exactly_one_record_kind() {
        for (text, says) in [
            ("5", "JSON array"),
            ("[1]", "record 0: invalid type: integer `1`, expected a record object"),
            (
                r#"[{"call":1,"cancel":{}},[1,{}]]"#,
                "record 1: invalid type: sequence, expected a record object",
            ),
            (r#"[{"call":1}]"#, "record 0 has no kind"),
            (r#"[{"call":1,"cancel":{},"window":2}]"#, "record 0 has 2 kinds"),
            (r#"[{"call":1,"window":-1}]"#, "record 0"),
            (r#"[{"call":4294967296,"cancel":{}}]"#, "out of range"),
            (
                r#"[{"call":1,"call":2,"cancel":{}}]"#,
                "record 0: duplicate field `call`",
            ),
            (
                r#"[{"call":1,"closeSend":{},"close_send":{}}]"#,
                "record 0: duplicate field `closeSend`",
            ),
            (
                r#"[{"call":1,"window":null,"window":2}]"#,
                "record 0: duplicate field `window`",
            ),
            ("[{", "invalid JSON batch"),
        ] {
            let error = decode_client_batch(text).unwrap_err();
            assert!(error.0.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn uint32_fields_take_numbers_and_strings_of_digits() {
        let window = |value: &str| match decode_client_batch(&format!(r#"[{{"call":1,"window":{value}}}]"#)) {
            Ok(batch) => match batch[0].kind {
                JsonClientKind::Window(n) => Ok(n),
                _ => Err("not a window".to_string()),
            },
            Err(e) => Err(e.0),
        };
        for (value, n) in [
            ("7", 7),
            (r#""7""#, 7),
            ("7.0", 7),
            ("1e2", 100),
            ("4294967295", u32::MAX),
        ] {
            assert_eq!(window(value), Ok(n), "{value}");
        }
        for (value, says) in [
            ("-1", "-1 is not a uint32"),
            ("1.5", "1.5 is not a uint32"),
            (r#""x""#, r#""x" is not a uint32"#),
            ("4294967296", "out of range"),
            (r#""4294967296""#, "out of range"),
            ("true", "expected a uint32"),
        ] {
            let error = window(value).unwrap_err();
            assert!(error.contains(says), "{value}: {error}");
        }
    }

    #[test]
    fn nulls_are_defaults() {
        let batch = decode_client_batch(r#"[{"call":null,"cancel":{},"window":null,"message":null}]"#).unwrap();
        assert_eq!(
            batch,
            [JsonClientRecord {
                call: 0,
                kind: JsonClientKind::Cancel
            }]
        );
    }

    #[test]
    fn server_records_encode_in_proto3_json_form() {
        assert_eq!(
            encode_server_record(1, JsonServerKind::Message(r#"{"result":"processed: hi"}"#)),
            r#"{"call":1,"message":{"result":"processed: hi"}}"#
        );
        let status = Status {
            code: 0,
            ..Default::default()
        };
        assert_eq!(
            encode_server_record(1, JsonServerKind::Status(&status)),
            r#"{"call":1,"status":{"code":0}}"#
        );
        let failed = Status {
            code: 3,
            message: "bad".into(),
            details: prost::bytes::Bytes::from_static(b"\x01\x02"),
            metadata: HashMap::from([("k".to_string(), "v".to_string())]),
        };
        assert_eq!(
            encode_server_record(7, JsonServerKind::Status(&failed)),
            r#"{"call":7,"status":{"code":3,"message":"bad","details":"AQI=","metadata":{"k":"v"}}}"#
        );
        let goaway = GoAway {
            message: "draining".into(),
        };
        assert_eq!(
            encode_server_record(0, JsonServerKind::GoAway(&goaway)),
            r#"{"goaway":{"message":"draining"}}"#
        );
        assert_eq!(
            encode_server_record(2, JsonServerKind::Window(128)),
            r#"{"call":2,"window":128}"#
        );
        for (call, expected) in [
            (0, r#"{"message":{}}"#),
            (10, r#"{"call":10,"message":{}}"#),
            (u32::MAX, r#"{"call":4294967295,"message":{}}"#),
        ] {
            let mut out = Vec::new();
            append_message_record(call, &mut out, |out| out.extend_from_slice(b"{}"));
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }
}
