//! WebSocket protocol v2 batches, as a client sends them: the decoders of
//! both encodings must never panic; a proto batch they accept must survive
//! an encode/decode round trip unchanged and decode the same from `Bytes`; a JSON batch they accept has
//! exactly one kind per record, and its `message`s are JSON texts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use streambridge_protocol::v2::{self, json};

fuzz_target!(|data: &[u8]| {
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
