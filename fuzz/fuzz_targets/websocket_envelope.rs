//! The WebSocket envelope decoders take any bytes a client sends: they must
//! never panic, and whatever they accept must survive an encode/decode round
//! trip unchanged, in both encodings, and mean the same in both.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streambridge_protocol::{json, proto};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = proto::decode_client_frame(data) {
        let again = proto::decode_client_frame(&proto::encode_client_frame(frame.clone()));
        assert_eq!(again, Ok(frame));
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(frame) = json::decode_client_frame(text)
    {
        let again = json::decode_client_frame(&json::encode_client_frame(&frame));
        assert_eq!(again.as_ref(), Ok(&frame), "json round trip of {text:?}");
        // The binary encoding must carry the same frame.
        let binary = proto::decode_client_frame(&proto::encode_client_frame(frame.clone()));
        assert_eq!(binary, Ok(frame), "json and proto disagree on {text:?}");
    }
});
