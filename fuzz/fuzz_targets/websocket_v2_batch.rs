//! WebSocket protocol v2 batches, as a client sends them: the decoders of
//! both encodings must never panic; a proto batch they accept must survive
//! an encode/decode round trip unchanged and decode the same from `Bytes`; a JSON batch they accept has
//! exactly one kind per record, and its `message`s are JSON texts. The
//! bytes are also a built-in request: the borrowing decoder the server
//! answers with must agree with prost's `StreamRequest` on them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use streambridge_protocol::v2::{self, json};

fuzz_target!(|data: &[u8]| {
    let borrowed = streambridge_protocol::stream_request_data(data).map(str::to_owned).ok();
    let prost = streambridge_protocol::StreamRequest::decode(data).map(|request| request.data).ok();
    assert_eq!(borrowed, prost, "StreamRequest data");
    if let Ok(batch) = v2::decode_client_batch(data) {
        let again = v2::decode_client_batch(&batch.encode_to_vec()[..]).expect("re-encoded batch decodes");
        assert_eq!(again, batch);
        // As the server decodes: from `Bytes`, each `message` a view, not a copy.
        let viewed = v2::decode_client_batch(prost::bytes::Bytes::copy_from_slice(data)).expect("same bytes decode");
        assert_eq!(viewed, batch);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(records) = json::decode_client_batch(text)
    {
        for record in records {
            if let json::JsonClientKind::Message(message) = record.kind {
                serde_json::from_str::<serde_json::Value>(message).expect("a message is JSON text");
            }
        }
    }
});
