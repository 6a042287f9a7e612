//! Any request body sent to the gRPC-Web endpoint (binary or text encoding,
//! chosen by the first byte) must end with a response that carries a
//! `grpc-status`, within a bounded time: never a hang, never a panic.
#![no_main]

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use streambridge::{AppState, Config, Core, TransportRouter, router};
use tower::ServiceExt;

struct Harness {
    runtime: tokio::runtime::Runtime,
    router: TransportRouter,
}

// The router is not `Sync` (tower's `Steer`); libFuzzer runs one input at a time anyway.
static HARNESS: LazyLock<Mutex<Harness>> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = Config::with_listen("127.0.0.1:0".parse().unwrap());
    let router = runtime.block_on(async {
        let core = Core::new(&config).unwrap();
        let backend = core.builtin_backend(&config);
        router(&config, AppState::new(&config, core, backend, true))
    });
    Mutex::new(Harness { runtime, router })
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let content_type = if mode & 1 == 0 {
        "application/grpc-web+proto"
    } else {
        "application/grpc-web-text"
    };
    let request = Request::post("/DataService/BidirectionalStream")
        // HTTP/1.1 requires it (the server answers 400 without one), as every client sends it.
        .header("host", "localhost")
        .header("content-type", content_type)
        .header("accept", content_type)
        .body(Body::from(body.to_vec()))
        .unwrap();
    let harness = HARNESS.lock().unwrap();
    let response = harness.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            let response = harness.router.clone().oneshot(request).await.unwrap();
            let (parts, body) = response.into_parts();
            let collected = body.collect().await.expect("the body ends cleanly");
            (parts, collected.to_bytes())
        })
        .await
        .expect("a gRPC-Web call always ends")
    });
    let (parts, bytes) = response;
    let text_mode = parts
        .headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc-web-text"));
    let body = if text_mode {
        decode_text_body(&bytes)
    } else {
        bytes.to_vec()
    };
    let in_headers = parts.headers.contains_key("grpc-status");
    let in_body = body.windows(b"grpc-status".len()).any(|w| w == b"grpc-status");
    assert!(in_headers || in_body, "no grpc-status in {parts:?} / {body:?}");
});

/// A grpc-web-text body: base64 chunks, each padded, concatenated.
fn decode_text_body(body: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let mut decoded = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let end = match rest.iter().position(|&b| b == b'=') {
            Some(at) => at + rest[at..].iter().take_while(|&&b| b == b'=').count(),
            None => rest.len(),
        };
        decoded.extend(
            base64::engine::general_purpose::STANDARD
                .decode(&rest[..end])
                .expect("the server sends valid base64"),
        );
        rest = &rest[end..];
    }
    decoded
}
