//! The `streambridge.v1.proto` encoding: one protobuf-encoded envelope message
//! per binary WebSocket frame.

use prost::Message;

use crate::{ClientFrame, DecodeError, ServerFrame, client_frame, empty_client_frame, server_frame};

/// Decodes a client frame received by the server.
pub fn decode_client_frame(payload: &[u8]) -> Result<client_frame::Frame, DecodeError> {
    ClientFrame::decode(payload)
        .map_err(|e| DecodeError(format!("invalid protobuf ClientFrame: {e}")))?
        .frame
        .ok_or_else(empty_client_frame)
}

/// Encodes a frame the server sends.
pub fn encode_server_frame(frame: server_frame::Frame) -> Vec<u8> {
    ServerFrame { frame: Some(frame) }.encode_to_vec()
}

/// Appends the `response` frame whose `StreamResponse.result` is `result`'s
/// pieces joined: the bytes [`encode_server_frame`] gives for it, without
/// the `String` (the server writes its v1 replies so, as it does v2's).
pub fn append_response_frame(result: &[&str], frame: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let result_len: usize = result.iter().map(|piece| piece.len()).sum();
    // proto3 leaves an empty string out; the oneof's message is written even when empty.
    let message_len = if result_len == 0 {
        0
    } else {
        key_len(1) + encoded_len_varint(result_len as u64) + result_len
    };
    encode_key(1, WireType::LengthDelimited, frame);
    encode_varint(message_len as u64, frame);
    if result_len > 0 {
        encode_key(1, WireType::LengthDelimited, frame);
        encode_varint(result_len as u64, frame);
        for piece in result {
            frame.extend_from_slice(piece.as_bytes());
        }
    }
}

/// Encodes a frame the client sends.
pub fn encode_client_frame(frame: client_frame::Frame) -> Vec<u8> {
    ClientFrame { frame: Some(frame) }.encode_to_vec()
}

/// Decodes a server frame received by the client.
pub fn decode_server_frame(payload: &[u8]) -> Result<server_frame::Frame, DecodeError> {
    ServerFrame::decode(payload)
        .map_err(|e| DecodeError(format!("invalid protobuf ServerFrame: {e}")))?
        .frame
        .ok_or_else(|| DecodeError("ServerFrame has neither response nor status".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CloseSend, Status, StreamRequest, StreamResponse};

    #[test]
    fn client_frames_round_trip() {
        for frame in [
            client_frame::Frame::Request(StreamRequest { data: "héllo".into() }),
            client_frame::Frame::Request(StreamRequest::default()),
            client_frame::Frame::CloseSend(CloseSend {}),
        ] {
            let bytes = encode_client_frame(frame.clone());
            assert_eq!(decode_client_frame(&bytes), Ok(frame));
        }
    }

    #[test]
    fn a_response_frame_from_pieces_is_the_frame_prost_writes() {
        for pieces in [&["processed: ", "x"][..], &["", ""], &["é", &"y".repeat(300)]] {
            let mut frame = Vec::new();
            append_response_frame(pieces, &mut frame);
            let expected = encode_server_frame(server_frame::Frame::Response(StreamResponse {
                result: pieces.concat(),
            }));
            assert_eq!(frame, expected, "{pieces:?}");
        }
    }

    #[test]
    fn server_frames_round_trip() {
        for frame in [
            server_frame::Frame::Response(StreamResponse {
                result: "processed: x".into(),
            }),
            server_frame::Frame::Status(Status {
                code: 3,
                message: "bad".into(),
            }),
        ] {
            let bytes = encode_server_frame(frame.clone());
            assert_eq!(decode_server_frame(&bytes), Ok(frame));
        }
    }

    #[test]
    fn an_empty_client_frame_is_an_error_naming_the_fields() {
        let err = decode_client_frame(&[]).unwrap_err();
        assert!(err.0.contains("neither request nor closeSend"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let err = decode_client_frame(&[0xff, 0xff, 0xff]).unwrap_err();
        assert!(err.0.starts_with("invalid protobuf ClientFrame"), "{err}");
    }
}
