//! The plain-HTTP surface: the page, 404s, and requests that belong to no
//! transport get a clear answer.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use streambridge_protocol::StreamRequest;
use support::ServerAddr;
use support::http::{get, http1_client, send};
use support::{TestServer, within};
use tonic::Code;

#[tokio::test]
async fn the_index_page_is_served_at_the_root() {
    let server = TestServer::start().await;
    let reply = get(server.http_url("/")).await;
    assert_eq!(reply.status, 200);
    assert!(reply.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(reply.text().contains("streambridge"), "{}", reply.text());
}

#[tokio::test]
async fn an_unknown_path_is_404_with_a_body_naming_it() {
    let server = TestServer::start().await;
    let reply = get(server.http_url("/nope.txt")).await;
    assert_eq!(reply.status, 404);
    assert!(reply.text().contains("/nope.txt"), "{}", reply.text());
}

#[tokio::test]
async fn a_plain_get_of_the_websocket_path_says_an_upgrade_is_needed() {
    let server = TestServer::start().await;
    let reply = get(server.http_url("/ws")).await;
    assert_eq!(reply.status, 426);
    assert!(reply.text().contains("WebSocket"), "{}", reply.text());
}

#[tokio::test]
async fn an_unknown_grpc_method_is_unimplemented() {
    let server = TestServer::start().await;
    let channel = server.grpc_channel().await;
    let mut grpc = tonic::client::Grpc::new(channel);
    within("ready", grpc.ready()).await.unwrap();
    let codec = tonic_prost::ProstCodec::<StreamRequest, StreamRequest>::default();
    let path = http::uri::PathAndQuery::from_static("/DataService/NoSuchMethod");
    let status = within(
        "call",
        grpc.unary(tonic::Request::new(StreamRequest::default()), path, codec),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    within("ready", grpc.ready()).await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/other.Service/Method");
    let codec = tonic_prost::ProstCodec::<StreamRequest, StreamRequest>::default();
    let status = within(
        "call",
        grpc.unary(tonic::Request::new(StreamRequest::default()), path, codec),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test]
async fn a_grpc_path_with_a_foreign_content_type_is_415_naming_the_right_ones() {
    let server = TestServer::start().await;
    let request = Request::post(server.http_url("/DataService/BidirectionalStream"))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let reply = send(&http1_client(), request).await;
    assert_eq!(reply.status, 415);
    assert!(reply.text().contains("application/grpc"), "{}", reply.text());
}

#[tokio::test]
async fn a_post_to_a_page_is_405_with_a_body() {
    let server = TestServer::start().await;
    let request = Request::post(server.http_url("/index.html"))
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let reply = send(&http1_client(), request).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.headers["allow"], "GET, HEAD");
    assert!(
        reply.text().starts_with("405 method not allowed: POST /index.html"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn a_post_to_a_two_segment_page_path_is_405_not_a_grpc_refusal() {
    let server = TestServer::start().await;
    for path in [
        "/pkg/streambridge_client.js",
        "/pkg/streambridge_client_bg.wasm",
        "/docs/a-b",
    ] {
        let request = Request::post(server.http_url(path))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let reply = send(&http1_client(), request).await;
        assert_eq!(reply.status, 405, "{path}: {}", reply.text());
        assert!(
            reply.text().contains("pages take GET or HEAD"),
            "{path}: {}",
            reply.text()
        );
    }
}

#[tokio::test]
async fn a_get_of_a_two_segment_path_is_a_file_request() {
    let server = TestServer::start().await;
    let reply = get(server.http_url("/pkg/missing.js")).await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert!(reply.text().contains("/pkg/missing.js"));
}
