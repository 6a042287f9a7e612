//! Upstream mode (`--upstream`): a real bridge in front of a real tonic
//! upstream with every call type (`tests/support/upstream.rs`), reached by
//! real clients: tonic over native gRPC and raw gRPC-Web over HTTP/1.1 and
//! HTTP/2 (Python grpcio through a bridge: `tests/python_grpcio.rs`).

mod support;

use std::time::{Duration, Instant};

use ::http::Request;
use futures_util::StreamExt;
use http_body_util::Full;
use support::upstream::{EchoClient, EchoRequest, EchoUpstream, TestPki};
use support::{ServerAddr, TestServer, http, within};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const TOKEN: &str = "bridge-secret";

async fn bridge_to(upstream: &EchoUpstream) -> TestServer {
    bridge_with(upstream, |_| {}).await
}

async fn bridge_with(upstream: &EchoUpstream, adjust: impl FnOnce(&mut streambridge::Config)) -> TestServer {
    let url = upstream.url();
    TestServer::start_with(|config| {
        config.upstream = Some(url.parse().unwrap());
        adjust(config);
    })
    .await
}

async fn echo_client(server: &impl ServerAddr) -> EchoClient<Channel> {
    EchoClient::new(server.grpc_channel().await)
}

/// A bidi call with one exchange done: its requests' sender and its replies.
async fn live_bidi(
    client: &mut EchoClient<Channel>,
) -> (
    tokio::sync::mpsc::Sender<EchoRequest>,
    tonic::Streaming<support::upstream::EchoReply>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = within("bidi", client.bidi(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    tx.send(request("live")).await.unwrap();
    within("first reply", replies.next()).await.unwrap().unwrap();
    (tx, replies)
}

fn request(text: &str) -> EchoRequest {
    EchoRequest {
        text: text.into(),
        ..Default::default()
    }
}

/// Waits until the bridge's health (`""`) reports `want`, by its Watch
/// stream: each change is pushed, nothing is polled.
async fn health_becomes(server: &impl ServerAddr, want: ServingStatus) {
    let mut health = HealthClient::new(server.grpc_channel().await);
    let mut updates = health
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch health")
        .into_inner();
    within(&format!("health becomes {want:?}"), async {
        loop {
            let update: HealthCheckResponse = updates.next().await.expect("health stream open").expect("update");
            if update.status() == want {
                return;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn every_call_type_passes_through_with_headers_and_trailers() {
    let upstream = EchoUpstream::start().await;
    let bridge = bridge_to(&upstream).await;
    let mut client = echo_client(&bridge).await;

    let unary = within("unary", client.unary(request("one"))).await.unwrap();
    assert_eq!(
        unary.metadata().get("x-upstream-header").unwrap(),
        "from-upstream",
        "response headers pass"
    );
    assert_eq!(unary.into_inner().text, "one");

    let mut stream = within(
        "server stream",
        client.server_stream(EchoRequest {
            repeat: 3,
            ..request("s")
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let mut texts = Vec::new();
    while let Some(reply) = within("next reply", stream.next()).await {
        texts.push(reply.unwrap().text);
    }
    assert_eq!(texts, ["s 0", "s 1", "s 2"]);

    let requests = futures_util::stream::iter(["a", "b", "c"].map(request));
    let joined = within("client stream", client.client_stream(requests)).await.unwrap();
    assert_eq!(joined.into_inner().text, "a,b,c");

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = within("bidi", client.bidi(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    for text in ["x", "y"] {
        tx.send(request(text)).await.unwrap();
        let reply = within("bidi reply", replies.next()).await.unwrap().unwrap();
        assert_eq!(reply.text, text, "each reply comes before the next request is sent");
    }
    drop(tx);
    assert!(within("bidi end", replies.next()).await.is_none());
}

#[tokio::test]
async fn errors_keep_their_code_message_details_and_trailers() {
    let upstream = EchoUpstream::start().await;
    let bridge = bridge_to(&upstream).await;
    let mut client = echo_client(&bridge).await;
    let status = within(
        "failing unary",
        client.unary(EchoRequest {
            fail_with: Code::FailedPrecondition as i32,
            ..request("nope")
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "failed as asked: nope");
    assert_eq!(
        status.details(),
        support::upstream::failure_details(Code::FailedPrecondition as i32, "failed as asked: nope"),
        "grpc-status-details-bin passes"
    );
    assert_eq!(status.metadata().get("x-upstream-trailer").unwrap(), "from-upstream");

    // The same at the end of a stream, after its replies.
    let mut stream = client
        .server_stream(EchoRequest {
            repeat: 2,
            fail_with: Code::Aborted as i32,
            ..request("late")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(within("reply", stream.next()).await.unwrap().unwrap().text, "late 0");
    assert_eq!(within("reply", stream.next()).await.unwrap().unwrap().text, "late 1");
    let status = within("status", stream.next()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(
        status.details(),
        support::upstream::failure_details(Code::Aborted as i32, "failed as asked: late")
    );
}

#[tokio::test]
async fn metadata_is_forwarded_but_the_bridge_token_never_is() {
    let upstream = EchoUpstream::start().await;
    let bridge = bridge_with(&upstream, |config| config.auth_token = Some(TOKEN.into())).await;
    let mut client = echo_client(&bridge).await;

    let mut call = tonic::Request::new(request("m"));
    call.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    call.metadata_mut().insert("x-request-id", "42".parse().unwrap());
    call.metadata_mut()
        .insert_bin("x-trace-bin", tonic::metadata::MetadataValue::from_bytes(b"\x00\x01"));
    let seen = within("unary with metadata", client.unary(call))
        .await
        .unwrap()
        .into_inner()
        .metadata;
    assert_eq!(seen.get("x-request-id").map(String::as_str), Some("42"));
    assert_eq!(
        seen.get("x-trace-bin").map(String::as_str),
        Some("AAE"),
        "binary metadata passes (base64)"
    );
    assert!(
        !seen.contains_key("authorization"),
        "the bridge's token leaked: {seen:?}"
    );
    assert!(
        !seen.values().any(|value| value.contains(TOKEN)),
        "the bridge's token leaked: {seen:?}"
    );

    // Without the token the bridge refuses, and the upstream never sees the call.
    let status = within("unary without token", client.unary(request("no token")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // Health stays open to load balancers.
    let mut health = HealthClient::new(bridge.grpc_channel().await);
    within("health without token", health.check(HealthCheckRequest::default()))
        .await
        .expect("health is not behind the token");
}

#[tokio::test]
async fn the_deadline_goes_upstream_never_longer() {
    let upstream = EchoUpstream::start().await;
    let bridge = bridge_to(&upstream).await;
    let mut client = echo_client(&bridge).await;
    let mut call = tonic::Request::new(request("d"));
    call.set_timeout(Duration::from_secs(5));
    let seen = within("unary with deadline", client.unary(call))
        .await
        .unwrap()
        .into_inner();
    assert!(
        seen.timeout_ms > 0 && seen.timeout_ms <= 5000,
        "the upstream saw {} ms",
        seen.timeout_ms
    );
}

#[tokio::test]
async fn the_bridge_ends_a_call_at_its_deadline_if_the_upstream_never_answers() {
    // An "upstream" that accepts connections and never says a word: only
    // the bridge's own timer can end the call.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let bridge =
        TestServer::start_with(|config| config.upstream = Some(format!("http://{addr}").parse().unwrap())).await;
    // A raw HTTP/2 request: a tonic client would run its own timer for the
    // deadline and end the call itself.
    // EchoRequest { text } encodes as StreamRequest { data } does (field 1, a string).
    let body = http::grpc_web_body(&["never"]);
    let call = Request::post(bridge.http_url("/streambridge.testing.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(Full::new(body))
        .unwrap();
    let reply = within("call to a silent upstream", http::send(&http::http2_client(), call)).await;
    assert_eq!(reply.headers["grpc-status"], "4", "{:?}", reply.headers);
    assert!(
        reply.headers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("before%20the%20upstream%20answered"),
        "{:?}",
        reply.headers
    );
    held.abort();
}

#[tokio::test]
async fn a_client_that_goes_away_ends_the_upstream_call() {
    let mut upstream = EchoUpstream::start().await;
    let bridge = bridge_to(&upstream).await;

    // A reset stream: the client drops its bidi call.
    let mut client = echo_client(&bridge).await;
    let (tx, replies) = live_bidi(&mut client).await;
    let dropped = Instant::now();
    drop((replies, tx));
    let ended = within("the upstream sees the cancel", upstream.cancelled.recv()).await;
    assert_eq!(ended, Some("bidi"));
    eprintln!("stream reset reached the upstream after {:?}", dropped.elapsed());

    // A dropped connection: a server stream that hangs after its replies.
    let channel = bridge.grpc_channel().await;
    let mut client = EchoClient::new(channel);
    let mut stream = client
        .server_stream(EchoRequest {
            repeat: 1,
            hang: true,
            ..request("h")
        })
        .await
        .unwrap()
        .into_inner();
    within("first reply", stream.next()).await.unwrap().unwrap();
    let dropped = Instant::now();
    drop((stream, client));
    let ended = within("the upstream sees the connection go", upstream.cancelled.recv()).await;
    assert_eq!(ended, Some("server_stream"));
    eprintln!("dropped connection reached the upstream after {:?}", dropped.elapsed());
}

#[tokio::test]
async fn an_https_upstream_with_mutual_tls() {
    let pki = TestPki::new("mtls");
    let upstream = EchoUpstream::start_mutual_tls(&pki).await;
    let url = format!("https://{}", upstream.addr);
    let with_certificate = TestServer::start_with(|config| {
        config.upstream = Some(url.parse().unwrap());
        config.upstream_ca = Some(pki.file("ca.pem"));
        config.upstream_client_cert = Some(pki.file("client.pem"));
        config.upstream_client_key = Some(pki.file("client-key.pem"));
    })
    .await;
    let reply = within(
        "call over mutual TLS",
        echo_client(&with_certificate).await.unwrap_call("tls"),
    )
    .await;
    assert_eq!(reply, "tls");

    // Without its client certificate the upstream refuses the bridge.
    let without_certificate = TestServer::start_with(|config| {
        config.upstream = Some(url.parse().unwrap());
        config.upstream_ca = Some(pki.file("ca.pem"));
    })
    .await;
    let status = within(
        "call without a client certificate",
        echo_client(&without_certificate).await.unary(request("x")),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&url), "{status:?}");
}

/// One unary call, its reply's text.
trait UnaryText {
    async fn unwrap_call(self, text: &str) -> String;
}

impl UnaryText for EchoClient<Channel> {
    async fn unwrap_call(mut self, text: &str) -> String {
        self.unary(request(text)).await.expect("unary call").into_inner().text
    }
}

#[tokio::test]
async fn reflection_lists_the_upstreams_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let upstream = EchoUpstream::start().await;
    let bridge = bridge_to(&upstream).await;
    let mut reflection = ServerReflectionClient::new(bridge.grpc_channel().await);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = within(
        "reflection",
        reflection.server_reflection_info(futures_util::stream::iter([ask])),
    )
    .await
    .unwrap()
    .into_inner();
    let answer: ServerReflectionResponse = within("reflection answer", answers.next()).await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"streambridge.testing.Echo".to_string()), "{names:?}");
    assert!(!names.contains(&"DataService".to_string()), "{names:?}");
}

#[tokio::test]
async fn health_follows_the_upstream_down_and_back() {
    let upstream = EchoUpstream::start().await;
    let addr = upstream.addr;
    let bridge = bridge_to(&upstream).await;
    health_becomes(&bridge, ServingStatus::Serving).await;

    let healthz = http::get(bridge.http_url("/healthz")).await;
    assert_eq!(
        (healthz.status.as_u16(), healthz.text()),
        (200, "SERVING\n".to_string())
    );

    upstream.stop().await;
    health_becomes(&bridge, ServingStatus::NotServing).await;
    // The same over plain HTTP, for load balancers.
    let healthz = http::get(bridge.http_url("/healthz")).await;
    assert_eq!(
        (healthz.status.as_u16(), healthz.text()),
        (503, "NOT_SERVING\n".to_string())
    );
    let mut client = echo_client(&bridge).await;
    let started = Instant::now();
    let status = within("call while the upstream is down", client.unary(request("down")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&addr.to_string()),
        "the message names the upstream: {status:?}"
    );
    eprintln!("UNAVAILABLE after {:?}", started.elapsed());
    // The bridge still serves its page and its metrics.
    assert_eq!(http::get(bridge.http_url("/")).await.status, 200);
    assert_eq!(http::get(bridge.http_url("/metrics")).await.status, 200);

    let _upstream = EchoUpstream::start_on(addr).await;
    health_becomes(&bridge, ServingStatus::Serving).await;
    assert_eq!(http::get(bridge.http_url("/healthz")).await.status, 200);
    let reply = within("call after the upstream is back", client.unary(request("back")))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().text, "back");
}

#[tokio::test]
async fn an_upstream_that_never_was_fails_calls_with_unavailable() {
    // A port nothing listens on: bind one, then let it go.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let bridge =
        TestServer::start_with(|config| config.upstream = Some(format!("http://{addr}").parse().unwrap())).await;
    let mut client = echo_client(&bridge).await;
    let status = within("call", client.unary(request("x"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .contains(&format!("upstream http://{addr} unreachable")),
        "{status:?}"
    );
    let mut health = HealthClient::new(bridge.grpc_channel().await);
    let answer = within("health", health.check(HealthCheckRequest::default()))
        .await
        .unwrap();
    assert_eq!(answer.into_inner().status(), ServingStatus::NotServing);
}

#[tokio::test]
async fn an_oversize_upstream_message_is_refused_and_the_bridge_goes_on() {
    let upstream = EchoUpstream::start().await;
    let bridge = bridge_with(&upstream, |config| config.max_message_size = 1000).await;
    let mut client = echo_client(&bridge).await;
    let mut stream = client
        .server_stream(EchoRequest {
            repeat: 3,
            reply_bytes: 5000,
            ..request("big")
        })
        .await
        .unwrap()
        .into_inner();
    // The replies before the large one arrive; then the call ends.
    assert_eq!(within("reply", stream.next()).await.unwrap().unwrap().text, "big 0");
    assert_eq!(within("reply", stream.next()).await.unwrap().unwrap().text, "big 1");
    let status = within("status", stream.next()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-message-size"), "{status:?}");
    assert!(within("end", stream.next()).await.is_none());

    // A request over the limit is refused by the bridge itself.
    let status = within(
        "oversize request",
        client.unary(EchoRequest {
            text: "y".repeat(2000),
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("request message too large"), "{status:?}");

    let reply = within("next call", client.unary(request("fine"))).await.unwrap();
    assert_eq!(reply.into_inner().text, "fine");
}

/// One unary call to the upstream's `Echo/Unary` by gRPC-Web over `client`.
async fn grpc_web_unary(bridge: &TestServer, client: &http::HttpClient, content_type: &str) -> http::GrpcWebResult {
    // EchoRequest { text } encodes as StreamRequest { data } does (field 1, a string).
    let body = http::grpc_web_body(&["web"]);
    let text = content_type.contains("text");
    let body = if text {
        use base64::Engine;
        bytes::Bytes::from(base64::engine::general_purpose::STANDARD.encode(&body))
    } else {
        body
    };
    let request = Request::post(bridge.http_url("/streambridge.testing.Echo/Unary"))
        .header("content-type", content_type)
        .header("x-grpc-web", "1")
        // tonic-web answers in the encoding the client accepts.
        .header("accept", content_type)
        .body(Full::new(body))
        .unwrap();
    let reply = within("grpc-web call", http::send(client, request)).await;
    assert_eq!(reply.status, 200);
    if text {
        http::decode_grpc_web_text(&reply.body)
    } else {
        http::decode_grpc_web(reply.body.clone())
    }
}

#[tokio::test]
async fn grpc_web_binary_and_text_over_http1_and_http2_reach_the_upstream() {
    let upstream = EchoUpstream::start().await;
    let bridge = bridge_to(&upstream).await;
    for client in [http::http1_client(), http::http2_client()] {
        for content_type in ["application/grpc-web+proto", "application/grpc-web-text"] {
            let result = grpc_web_unary(&bridge, &client, content_type).await;
            assert_eq!(result.trailer("grpc-status"), Some("0"), "{content_type}");
            // EchoReply's field 1 is its text, as StreamResponse's is its result.
            assert_eq!(result.replies, ["web"], "{content_type}");
        }
    }
}

#[tokio::test]
async fn websocket_v1_is_refused_when_the_built_in_service_is_not_served() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let upstream = EchoUpstream::start().await;
    let bridge = bridge_to(&upstream).await;
    let mut request = bridge.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "streambridge.v1.json".parse().unwrap());
    let (status, body) = support::ws::refused_upgrade(request).await;
    assert_eq!(status, 501, "{body}");
    assert!(body.contains("only the built-in DataService"), "{body}");
}

#[tokio::test]
async fn proxied_calls_are_counted_live_and_by_status() {
    use streambridge::Transport;
    let upstream = EchoUpstream::start().await;
    let bridge = bridge_to(&upstream).await;
    let mut client = echo_client(&bridge).await;
    let (tx, mut replies) = live_bidi(&mut client).await;
    within("one live call counted", bridge.calls.wait_for(Transport::Grpc, 1)).await;
    drop(tx);
    assert!(within("end", replies.next()).await.is_none());
    within(
        "the call's count ends with it",
        bridge.calls.wait_for(Transport::Grpc, 0),
    )
    .await;

    let failed = within(
        "failing unary",
        client.unary(EchoRequest {
            fail_with: Code::FailedPrecondition as i32,
            ..request("x")
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(failed.code(), Code::FailedPrecondition);
    within("counted", bridge.calls.wait_for(Transport::Grpc, 0)).await;
    let metrics = support::metrics_text(bridge.addr).await;
    assert_eq!(
        support::metric(
            &metrics,
            r#"streambridge_stream_errors_total{transport="grpc",code="9"}"#
        ),
        1.0,
        "{metrics}"
    );
}
