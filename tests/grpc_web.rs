//! gRPC-Web (tonic-web) with a plain HTTP client over HTTP/1.1 and HTTP/2:
//! binary and text bodies, CORS, and malformed bodies.

mod support;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::ServerAddr;
use support::TestServer;
use support::http::{
    HttpClient, decode_grpc_web, decode_grpc_web_text, grpc_web_body, http1_client, http2_client, send,
};

const METHOD_PATH: &str = "/DataService/BidirectionalStream";

fn grpc_web_request(server: &TestServer, content_type: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::post(server.http_url(METHOD_PATH))
        .header("content-type", content_type)
        .header("x-grpc-web", "1")
        .header("origin", server.http_url(""))
        .body(Full::new(body))
        .unwrap()
}

fn ten_messages() -> Vec<String> {
    (0..10).map(|i| format!("web message {i}")).collect()
}

async fn binary_call_streams_back_every_reply_then_status_0(client: HttpClient) {
    let server = TestServer::start().await;
    let inputs = ten_messages();
    let body = grpc_web_body(&inputs.iter().map(String::as_str).collect::<Vec<_>>());
    let reply = send(&client, grpc_web_request(&server, "application/grpc-web+proto", body)).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web")
    );
    let result = decode_grpc_web(reply.body);
    let expected: Vec<String> = inputs.iter().map(|d| format!("processed: {d}")).collect();
    assert_eq!(result.replies, expected);
    assert_eq!(result.trailer("grpc-status"), Some("0"), "{:?}", result.trailers);
}

#[tokio::test]
async fn grpc_web_binary_over_http1_streams_back_every_reply_then_status_0() {
    binary_call_streams_back_every_reply_then_status_0(http1_client()).await;
}

#[tokio::test]
async fn grpc_web_binary_over_http2_streams_back_every_reply_then_status_0() {
    binary_call_streams_back_every_reply_then_status_0(http2_client()).await;
}

#[tokio::test]
async fn grpc_web_text_round_trips_base64_bodies() {
    let server = TestServer::start().await;
    let inputs = ten_messages();
    let body = STANDARD.encode(grpc_web_body(&inputs.iter().map(String::as_str).collect::<Vec<_>>()));
    let mut request = grpc_web_request(&server, "application/grpc-web-text", Bytes::from(body));
    // grpc-web clients in text mode ask for a text reply; tonic-web answers in the accepted encoding.
    request
        .headers_mut()
        .insert("accept", "application/grpc-web-text".parse().unwrap());
    let reply = send(&http1_client(), request).await;
    assert_eq!(reply.status, 200);
    let content_type = reply.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("application/grpc-web-text"),
        "{content_type}: {}",
        reply.text()
    );
    let result = decode_grpc_web_text(&reply.body);
    assert_eq!(result.replies.len(), 10);
    assert_eq!(result.replies[9], "processed: web message 9");
    assert_eq!(result.trailer("grpc-status"), Some("0"));
}

#[tokio::test]
async fn a_preflight_from_the_pages_own_origin_is_allowed_and_exposes_grpc_status() {
    let server = TestServer::start().await;
    let origin = server.http_url("");
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri(server.http_url(METHOD_PATH))
        .header("origin", &origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-grpc-web,x-user-agent")
        .body(Full::default())
        .unwrap();
    let reply = send(&http1_client(), preflight).await;
    assert!(reply.status.is_success(), "{}", reply.status);
    assert_eq!(reply.headers["access-control-allow-origin"], origin.as_str());
    let allowed = reply.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("x-grpc-web") && allowed.contains("content-type"),
        "{allowed}"
    );

    let call = grpc_web_request(&server, "application/grpc-web", grpc_web_body(&["cors"]));
    let reply = send(&http1_client(), call).await;
    assert_eq!(reply.headers["access-control-allow-origin"], origin.as_str());
    let exposed = reply.headers["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("grpc-status") && exposed.contains("grpc-message"),
        "{exposed}"
    );
}

#[tokio::test]
async fn a_preflight_from_a_foreign_origin_gets_no_cors_grant() {
    let server = TestServer::start().await;
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri(server.http_url(METHOD_PATH))
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .body(Full::default())
        .unwrap();
    let reply = send(&http1_client(), preflight).await;
    assert!(
        !reply.headers.contains_key("access-control-allow-origin"),
        "{:?}",
        reply.headers
    );
}

#[tokio::test]
async fn a_truncated_frame_ends_with_a_non_zero_grpc_status_and_a_message() {
    let server = TestServer::start().await;
    let mut body = grpc_web_body(&["complete"]).to_vec();
    body.extend_from_slice(&[0x00, 0x00, 0x00, 0x00, 100, 0x0a, 0x03]); // claims 100 bytes, has 2
    let reply = send(
        &http1_client(),
        grpc_web_request(&server, "application/grpc-web", Bytes::from(body)),
    )
    .await;
    let result = decode_grpc_web(reply.body.clone());
    let status = result
        .trailer("grpc-status")
        .or_else(|| reply.headers.get("grpc-status").map(|v| v.to_str().unwrap()));
    let status = status.expect("a grpc-status");
    assert_eq!(status, "13", "INTERNAL, as the README promises: {:?}", result.trailers);
    let message = result
        .trailer("grpc-message")
        .or_else(|| reply.headers.get("grpc-message").map(|v| v.to_str().unwrap()));
    assert!(
        message.is_some_and(|m| m.contains("truncated")),
        "{:?}",
        result.trailers
    );
    assert_eq!(
        result.replies,
        vec!["processed: complete".to_string()],
        "the complete message is still answered"
    );
}

#[tokio::test]
async fn an_oversize_grpc_web_message_is_resource_exhausted() {
    let server = TestServer::start_with(|c| c.max_message_size = 1024).await;
    let big = "b".repeat(4096);
    let reply = send(
        &http1_client(),
        grpc_web_request(&server, "application/grpc-web", grpc_web_body(&[&big])),
    )
    .await;
    let result = decode_grpc_web(reply.body.clone());
    let status = result
        .trailer("grpc-status")
        .or_else(|| reply.headers.get("grpc-status").map(|v| v.to_str().unwrap()));
    assert_eq!(status, Some("8"), "{:?} {:?}", result.trailers, reply.headers);
}
