//! Rate limits (`--limit-calls-per-second`, `--limit-calls-burst`,
//! `--trusted-proxy`, `--limit-messages-per-second`): a caller past its call
//! bucket gets RESOURCE_EXHAUSTED for new calls at once, on native gRPC,
//! gRPC-Web and WebSocket v2 (v1: 429 at the upgrade), while other callers'
//! buckets are untouched; a sender past its message bucket is slowed, and
//! loses nothing. One call a second
//! refills a bucket: each test drains one and checks the refusal comes
//! within a few calls of the burst, never sooner.

mod support;

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use streambridge_protocol::StreamRequest;
use support::ws::Sub;
use support::ws2::{proto_call_outcome, whole_call};
use support::{ServerAddr, TestServer, within};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::Code;

const BURST: usize = 3;

fn limited(config: &mut streambridge::Config) {
    config.limit_calls_per_second = std::num::NonZeroU32::new(1);
    config.limit_calls_burst = std::num::NonZeroU32::new(BURST as u32);
}

/// One call to the built-in service, as the client at `forwarded_for`
/// (through a proxy) if given.
async fn call(server: &impl ServerAddr, forwarded_for: Option<&str>) -> Result<(), tonic::Status> {
    let mut client = server.grpc_client().await;
    let mut request = tonic::Request::new(tokio_stream::iter([StreamRequest { data: "l".into() }]));
    if let Some(address) = forwarded_for {
        request
            .metadata_mut()
            .insert("x-forwarded-for", address.parse().unwrap());
    }
    let mut replies = within("call", client.bidirectional_stream(request)).await?.into_inner();
    within("reply", replies.next()).await.transpose()?;
    Ok(())
}

/// Calls until one is refused: how many went through, and the refusal.
/// The bucket refills by one a second, so a slow machine may see a few
/// more than the burst; never fewer.
async fn drain_bucket(server: &impl ServerAddr, forwarded_for: Option<&str>) -> (usize, tonic::Status) {
    for made in 0..BURST + 20 {
        if let Err(status) = call(server, forwarded_for).await {
            return (made, status);
        }
    }
    panic!("no refusal after {} calls", BURST + 20);
}

#[tokio::test]
async fn past_its_burst_a_client_gets_resource_exhausted_and_other_clients_do_not() {
    let proxy = TestServer::start_with(|c| {
        limited(c);
        c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let (made, status) = drain_bucket(&proxy, Some("203.0.113.1")).await;
    assert!(made >= BURST, "refused after {made} calls: {status:?}");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--limit-calls-per-second"), "{status:?}");
    // Another client behind the same trusted proxy has its own bucket.
    call(&proxy, Some("203.0.113.2")).await.unwrap();
    let text = support::metrics_text(proxy.addr).await;
    let refused = support::metric(&text, r#"streambridge_calls_refused_total{reason="rate_limited"}"#);
    assert_eq!(refused, 1.0, "{text}");
    // Health is never limited (load balancers poll it).
    let mut health = tonic_health::pb::health_client::HealthClient::new(proxy.grpc_channel().await);
    for _ in 0..BURST + 2 {
        within("health", health.check(tonic_health::pb::HealthCheckRequest::default()))
            .await
            .unwrap();
    }

    // Without --trusted-proxy, X-Forwarded-For is the client's word: ignored.
    let direct = TestServer::start_with(limited).await;
    let (made, _) = drain_bucket(&direct, Some("203.0.113.1")).await;
    assert!(made >= BURST);
    // Another claimed address gets no fresh burst (at most what refilled meanwhile).
    let (made, status) = drain_bucket(&direct, Some("203.0.113.2")).await;
    assert!(
        made < BURST,
        "a fresh bucket for a forged X-Forwarded-For: {made} calls"
    );
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

/// One gRPC-Web call to the built-in service: its `grpc-status`.
async fn grpc_web_call(server: &impl ServerAddr) -> String {
    let request = http::Request::post(server.http_url("/DataService/BidirectionalStream"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(http_body_util::Full::new(support::http::grpc_web_body(&["g"])))
        .unwrap();
    let reply = support::http::send(&support::http::http1_client(), request).await;
    let result = support::http::decode_grpc_web(reply.body.clone());
    // A refusal is trailers-only: its status is in the headers.
    reply
        .headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .or(result.trailer("grpc-status"))
        .expect("a grpc-status")
        .to_string()
}

#[tokio::test]
async fn on_grpc_web_a_call_past_the_limit_gets_resource_exhausted() {
    let server = TestServer::start_with(limited).await;
    let mut statuses = Vec::new();
    for _ in 0..BURST + 20 {
        let status = grpc_web_call(&server).await;
        let refused = status != "0";
        statuses.push(status);
        if refused {
            break;
        }
    }
    assert!(statuses.len() > BURST, "refused within the burst: {statuses:?}");
    assert_eq!(statuses.last().map(String::as_str), Some("8"), "{statuses:?}");
}

#[tokio::test]
async fn on_websockets_a_call_past_the_limit_ends_at_its_open_and_a_v1_upgrade_gets_429() {
    let server = TestServer::start_with(limited).await;
    let mut request = server.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "streambridge.v2.proto".parse().unwrap());
    let (mut socket, _) = within("v2", tokio_tungstenite::connect_async(request)).await.unwrap();
    let message = StreamRequest { data: "w".into() }.encode_to_vec();
    let mut codes = Vec::new();
    for call in (1..).step_by(2).take(BURST + 20) {
        socket
            .send(whole_call(
                call,
                "/DataService/BidirectionalStream",
                &[],
                message.clone(),
            ))
            .await
            .unwrap();
        let (_, status) = proto_call_outcome(&mut socket, call).await;
        let code = (status.code, status.message);
        codes.push(code.0);
        if code.0 != 0 {
            assert_eq!(code.0, 8, "{}", code.1);
            break;
        }
    }
    assert!(codes.len() > BURST && codes.last() == Some(&8), "{codes:?}");
    // v1's one call is counted at its upgrade (a cell may have come back
    // meanwhile: then the next upgrade finds the bucket empty).
    let mut refusal = None;
    for _ in 0..5 {
        let mut v1 = server.ws_url().into_client_request().unwrap();
        v1.headers_mut()
            .insert("sec-websocket-protocol", Sub::Json.name().parse().unwrap());
        match within("v1", tokio_tungstenite::connect_async(v1)).await {
            Ok(_) => continue,
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                refusal = Some(response.status().as_u16());
                break;
            }
            Err(error) => panic!("{error}"),
        }
    }
    assert_eq!(refusal, Some(429));
}

/// Request messages past `--limit-messages-per-second` wait for the bucket:
/// a fast sender on native gRPC (HTTP/2 flow control holds it) and on v1
/// (the socket stops reading) gets every reply, in order, and no sooner
/// than the bucket allows (a lower bound only; no machine can beat it).
#[tokio::test]
async fn a_fast_sender_is_slowed_by_the_message_limit_and_loses_nothing() {
    const RATE: u32 = 400;
    let server = TestServer::start_with(|config| {
        config.limit_messages_per_second = std::num::NonZeroU32::new(RATE);
        config.limit_messages_burst = std::num::NonZeroU32::new(RATE / 10);
    })
    .await;
    let sent: Vec<String> = (0..RATE).map(|i| format!("m{i}")).collect();
    let expected: Vec<String> = sent.iter().map(|m| format!("processed: {m}")).collect();

    let started = std::time::Instant::now();
    let mut client = server.grpc_client().await;
    let requests = tokio_stream::iter(sent.clone().into_iter().map(|data| StreamRequest { data }));
    let replies = within("call", client.bidirectional_stream(requests))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<String> = within("replies", replies.map(|reply| reply.unwrap().result).collect()).await;
    let took = started.elapsed();
    assert_eq!(got, expected, "native gRPC: every reply, in order");
    assert!(
        took >= std::time::Duration::from_millis(750),
        "native gRPC: {RATE} messages past a burst of {} in {took:?}",
        RATE / 10
    );

    let started = std::time::Instant::now();
    let mut socket = support::ws::connect_with(&server, Sub::Json).await;
    let transcript = support::ws::call_with(&mut socket, Sub::Json, &sent).await;
    let took = started.elapsed();
    assert_eq!(transcript.responses(), expected, "v1: every reply, in order");
    assert_eq!(transcript.status().0, 0);
    assert!(
        took >= std::time::Duration::from_millis(750),
        "v1: {RATE} messages in {took:?}"
    );
}
