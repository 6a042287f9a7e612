//! The `streambridge.v1.json` encoding: the proto3 JSON mapping of the
//! envelope, one object per text WebSocket frame: the server's half (decode
//! client frames, encode server frames), and the client's encoder for tests,
//! fuzzing and Rust clients.
//!
//! The mapping is written out with small serde mirror types instead of deriving
//! serde on the generated structs: a `oneof` maps to "exactly one of these
//! keys", which serde's derive cannot say, and borrowing the payload from the
//! frame avoids one allocation per message.
//!
//! As proto3 JSON parsers do, decoding accepts the lowerCamelCase and the
//! original field names (`closeSend` and `close_send`), treats `null` as the
//! default value, and ignores unknown fields (as the binary encoding does).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::{CloseSend, DecodeError, StreamRequest, client_frame, empty_client_frame, server_frame};

#[derive(Deserialize)]
struct JsonClientFrame<'a> {
    #[serde(borrow, default)]
    request: Option<JsonStreamRequest<'a>>,
    #[serde(default, rename = "closeSend", alias = "close_send")]
    close_send: Option<JsonEmpty>,
}

#[derive(Deserialize)]
struct JsonStreamRequest<'a> {
    #[serde(borrow, default)]
    data: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct JsonEmpty {}

#[derive(Serialize)]
enum JsonServerFrame<'a> {
    #[serde(rename = "response")]
    Response { result: &'a str },
    #[serde(rename = "status")]
    Status {
        code: i32,
        #[serde(skip_serializing_if = "str::is_empty")]
        message: &'a str,
    },
}

/// Decodes a client frame received by the server.
pub fn decode_client_frame(text: &str) -> Result<client_frame::Frame, DecodeError> {
    let frame: JsonClientFrame<'_> =
        serde_json::from_str(text).map_err(|e| DecodeError(format!("invalid JSON ClientFrame: {e}")))?;
    match (frame.request, frame.close_send) {
        (Some(request), None) => Ok(client_frame::Frame::Request(StreamRequest {
            data: request.data.map(Cow::into_owned).unwrap_or_default(),
        })),
        (None, Some(JsonEmpty {})) => Ok(client_frame::Frame::CloseSend(CloseSend {})),
        (Some(_), Some(_)) => Err(DecodeError(
            "ClientFrame carries both request and closeSend; exactly one is allowed".into(),
        )),
        (None, None) => Err(empty_client_frame()),
    }
}

#[derive(Serialize)]
enum JsonClientFrameOut<'a> {
    #[serde(rename = "request")]
    Request { data: &'a str },
    #[serde(rename = "closeSend")]
    CloseSend {},
}

/// Encodes a frame a client sends, as `decode_client_frame` reads it.
pub fn encode_client_frame(frame: &client_frame::Frame) -> String {
    let mirror = match frame {
        client_frame::Frame::Request(request) => JsonClientFrameOut::Request { data: &request.data },
        client_frame::Frame::CloseSend(_) => JsonClientFrameOut::CloseSend {},
    };
    serde_json::to_string(&mirror).expect("serialising plain strings cannot fail")
}

/// Encodes a frame the server sends. The status code is always written, also
/// when it is 0, so that a client can read `{"status":{"code":0}}` as is.
pub fn encode_server_frame(frame: &server_frame::Frame) -> String {
    let mirror = match frame {
        server_frame::Frame::Response(r) => JsonServerFrame::Response { result: &r.result },
        server_frame::Frame::Status(s) => JsonServerFrame::Status {
            code: s.code,
            message: &s.message,
        },
    };
    serde_json::to_string(&mirror).expect("serialising plain strings and integers cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Status, StreamResponse};

    fn request(data: &str) -> client_frame::Frame {
        client_frame::Frame::Request(StreamRequest { data: data.into() })
    }

    #[test]
    fn decodes_the_documented_frames() {
        assert_eq!(decode_client_frame(r#"{"request":{"data":"hi"}}"#), Ok(request("hi")));
        assert_eq!(
            decode_client_frame(r#"{"closeSend":{}}"#),
            Ok(client_frame::Frame::CloseSend(CloseSend {}))
        );
    }

    #[test]
    fn accepts_proto_field_names_defaults_nulls_and_unknown_fields() {
        assert_eq!(
            decode_client_frame(r#"{"close_send":{}}"#),
            Ok(client_frame::Frame::CloseSend(CloseSend {}))
        );
        assert_eq!(decode_client_frame(r#"{"request":{}}"#), Ok(request("")));
        assert_eq!(decode_client_frame(r#"{"request":{"data":null}}"#), Ok(request("")));
        assert_eq!(
            decode_client_frame(r#"{"request":{"data":"\u00e9","x":1},"y":2}"#),
            Ok(request("é"))
        );
    }

    #[test]
    fn rejects_frames_that_are_not_exactly_one_of_the_oneof() {
        let both = decode_client_frame(r#"{"request":{"data":"a"},"closeSend":{}}"#).unwrap_err();
        assert!(both.0.contains("both"), "{both}");
        let neither = decode_client_frame("{}").unwrap_err();
        assert!(neither.0.contains("neither request nor closeSend"), "{neither}");
    }

    #[test]
    fn rejects_malformed_json_with_the_parser_position() {
        let err = decode_client_frame(r#"{"request":"#).unwrap_err();
        assert!(err.0.starts_with("invalid JSON ClientFrame"), "{err}");
        assert!(err.0.contains("line 1"), "{err}");
        let wrong_type = decode_client_frame(r#"{"request":{"data":5}}"#).unwrap_err();
        assert!(wrong_type.0.contains("invalid type"), "{wrong_type}");
    }

    #[test]
    fn client_frames_encode_as_documented_and_round_trip() {
        assert_eq!(encode_client_frame(&request("hi")), r#"{"request":{"data":"hi"}}"#);
        let close = client_frame::Frame::CloseSend(CloseSend {});
        assert_eq!(encode_client_frame(&close), r#"{"closeSend":{}}"#);
        for frame in [request("\u{0}\"é"), close] {
            assert_eq!(decode_client_frame(&encode_client_frame(&frame)), Ok(frame));
        }
    }

    #[test]
    fn encodes_the_documented_frames() {
        let response = server_frame::Frame::Response(StreamResponse {
            result: "processed: \"hi\"".into(),
        });
        assert_eq!(
            encode_server_frame(&response),
            r#"{"response":{"result":"processed: \"hi\""}}"#
        );
        let ok = server_frame::Frame::Status(Status::default());
        assert_eq!(encode_server_frame(&ok), r#"{"status":{"code":0}}"#);
        let bad = server_frame::Frame::Status(Status {
            code: 3,
            message: "no".into(),
        });
        assert_eq!(encode_server_frame(&bad), r#"{"status":{"code":3,"message":"no"}}"#);
    }
}
