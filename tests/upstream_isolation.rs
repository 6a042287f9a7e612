//! Upstream mode under a hostile client (or upstream): what one caller does
//! must cost only that caller. A real bridge in front of a real tonic
//! upstream (`tests/support/upstream.rs`), reached by WebSocket v2 sockets
//! and tonic over native gRPC.
//!
//! - a v2 call that grants no response credit while its upstream floods it
//!   (tiny messages each in its own DATA frame, or 20 KB ones) holds only its
//!   own HTTP/2 stream: every other call on the shared upstream connection
//!   keeps working, and the starved call resumes when it grants credit;
//! - method names clients invent are refused or remembered: bounded memory,
//!   one reflection request per name, coalesced, rate-capped;
//! - an upstream's odd `grpc-status` values do not become metric labels;
//! - an upstream that dies ends every live call with UNAVAILABLE naming it,
//!   whether the call was reading or waiting for credit.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use support::upstream::{EchoClient, EchoRequest, EchoUpstream, Reflection, Relay};
use support::ws2::{Enc, Got, Rec, V2, close_send, json_echo_unary, status};
use support::{ServerAddr, TestServer, metrics_text, within};
use tonic::transport::Channel;

const BIDI: &str = "/streambridge.testing.Echo/Bidi";

async fn bridge_with(url: String, adjust: impl FnOnce(&mut streambridge::Config)) -> TestServer {
    TestServer::start_with(|config| {
        config.upstream = Some(url.parse().unwrap());
        adjust(config);
    })
    .await
}

fn varint(value: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    prost::encoding::encode_varint(value, &mut bytes);
    bytes
}

/// An `EchoRequest` asking for `repeat` replies of `reply_bytes` padding,
/// each in a DATA frame of its own, in protobuf.
fn flood(repeat: u32, reply_bytes: u32) -> Vec<u8> {
    [
        vec![0x0a, 1, b'f'],
        vec![0x10],
        varint(repeat.into()),
        vec![0x18],
        varint(reply_bytes.into()),
        vec![0x30, 1],
    ]
    .concat()
}

fn open(call: u32, method: &str, window: u32) -> Rec {
    Rec::Open {
        call,
        method: method.into(),
        window,
        timeout_ms: 0,
    }
}

fn raw(call: u32, proto: Vec<u8>) -> Rec {
    Rec::Raw {
        call,
        json: String::new(),
        proto,
    }
}

/// Reads until every call in `calls` has had a message.
async fn first_messages(socket: &mut V2, calls: &[u32]) {
    let mut waiting: Vec<u32> = calls.to_vec();
    while !waiting.is_empty() {
        let batch = socket.batch().await.expect("the socket stays open");
        for got in batch {
            if let Got::Status(call, code, message) = &got {
                panic!("call {call} ended ({code}: {message}) while it was starved");
            }
            if let Got::Message(call, _) = got {
                waiting.retain(|c| *c != call);
            }
        }
    }
}

/// A tonic bidi call to the upstream through the bridge, echoing `rounds`
/// times or until `until`, each echo checked.
async fn keep_echoing(client: &mut EchoClient<Channel>, name: String, until: Instant) -> usize {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = within(
        "a bystander's bidi call",
        client.bidi(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap_or_else(|status| panic!("{name}: {status:?}"))
    .into_inner();
    let mut rounds = 0;
    while rounds == 0 || Instant::now() < until {
        let text = format!("{name} {rounds}");
        tx.send(EchoRequest {
            text: text.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let reply = within(&format!("{name}'s echo {rounds}"), replies.next())
            .await
            .unwrap_or_else(|| panic!("{name}: the call ended"))
            .unwrap_or_else(|status| panic!("{name}: {status:?}"));
        assert_eq!(reply.text, text);
        rounds += 1;
        // One round trip at a time, paced so 20 calls do not busy the machine.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rounds
}

/// A v2 bystander: one bidi call on its own socket, echoing until `until`.
async fn keep_echoing_v2(bridge: &TestServer, until: Instant) -> usize {
    let mut socket = V2::connect(bridge, Enc::Proto).await;
    socket.send(&[open(1, BIDI, 0)]).await;
    let mut rounds = 0;
    while rounds == 0 || Instant::now() < until {
        let text = format!("v2 {rounds}");
        // The reply's credit goes back with the request, as a reader does.
        let request = raw(1, [vec![0x0a, text.len() as u8], text.clone().into_bytes()].concat());
        socket.send(&[request, Rec::Window { call: 1, n: 1 }]).await;
        // Grants of request credit may come first.
        let reply = loop {
            let got = socket.batch().await.expect("the bystander's socket stays open");
            let mut got: Vec<_> = got
                .into_iter()
                .filter(|g| !matches!(g, Got::Window(..) | Got::Headers(_)))
                .collect();
            if let Some(reply) = got.pop() {
                assert!(got.is_empty(), "round {rounds}: {got:?}");
                break reply;
            }
        };
        assert_eq!(reply, Got::Message(1, text), "round {rounds}");
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    socket.send(&[close_send(1)]).await;
    assert_eq!(status(&socket.until_status(1, &mut Vec::new()).await).0, 0);
    rounds
}

/// `calls` v2 calls, each flooded with `reply_bytes`-byte replies (one
/// DATA frame each) and granting one reply of credit, never more, beside
/// bystanders on the same upstream connection: 10 native bidi calls and a v2
/// socket, echoing for 10 s (with hyper's default windows the connection
/// was lost, or every call on it froze, within two seconds). Then credit
/// resumes the starved calls: held back, not ended.
async fn starved_calls_beside_bystanders(calls: u32, reply_bytes: u32) {
    let upstream = EchoUpstream::start().await;
    let bridge = bridge_with(upstream.url(), |_| {}).await;

    let mut attacker = V2::connect(&bridge, Enc::Proto).await;
    let repeat = if reply_bytes > 1000 { 100_000 } else { 1_000_000 };
    let ids: Vec<u32> = (1..=calls).collect();
    let records: Vec<Rec> = ids
        .iter()
        .flat_map(|&call| [open(call, BIDI, 1), raw(call, flood(repeat, reply_bytes))])
        .collect();
    attacker.send(&records).await;
    first_messages(&mut attacker, &ids).await;

    let until = Instant::now() + Duration::from_secs(10);
    let channel = bridge.grpc_channel().await;
    let natives = (0..10).map(|i| {
        let mut client = EchoClient::new(channel.clone());
        async move { keep_echoing(&mut client, format!("native {i}"), until).await }
    });
    let (native_rounds, v2_rounds) =
        tokio::join!(futures_util::future::join_all(natives), keep_echoing_v2(&bridge, until));
    assert!(native_rounds.iter().all(|&n| n > 1), "{native_rounds:?}");
    assert!(v2_rounds > 1);

    let grants: Vec<Rec> = ids.iter().map(|&call| Rec::Window { call, n: 3 }).collect();
    attacker.send(&grants).await;
    let mut resumed = std::collections::HashMap::<u32, usize>::new();
    while ids.iter().any(|call| resumed.get(call).copied().unwrap_or(0) < 3) {
        for got in attacker.batch().await.expect("the attacker's socket stays open") {
            match got {
                Got::Status(call, code, message) => panic!("starved call {call} ended ({code}: {message})"),
                Got::Message(call, _) => *resumed.entry(call).or_default() += 1,
                _ => {}
            }
        }
    }
    let cancels: Vec<Rec> = ids.iter().map(|&call| Rec::Cancel { call }).collect();
    attacker.send(&cancels).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starved_call_of_tiny_replies_holds_only_its_own_stream() {
    starved_calls_beside_bystanders(1, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_starved_calls_of_tiny_replies_hold_only_their_own_streams() {
    starved_calls_beside_bystanders(3, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starved_call_of_20_kb_replies_holds_only_its_own_stream() {
    starved_calls_beside_bystanders(1, 20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_starved_calls_of_20_kb_replies_hold_only_their_own_streams() {
    starved_calls_beside_bystanders(3, 20_000).await;
}

/// The status of one v2 call to `method` that sends nothing.
async fn open_status(socket: &mut V2, call: u32, method: &str) -> (i32, String) {
    socket.send(&[open(call, method, 0), close_send(call)]).await;
    status(&socket.until_status(call, &mut Vec::new()).await)
}

#[tokio::test]
async fn invented_names_cost_one_reflection_request_each_and_long_ones_none() {
    let upstream = EchoUpstream::start().await;
    let asked = upstream.reflection_requests.clone();
    let bridge = bridge_with(upstream.url(), |config| config.reflection_lookups_per_second = 100_000).await;
    let mut socket = V2::connect(&bridge, Enc::Json).await;

    // 1 000 names of 100 KB: refused before any look-up, nothing kept.
    for call in 1..=1000u32 {
        let name = format!("/{}{call}.S/M", "n".repeat(100_000));
        let (code, message) = open_status(&mut socket, call, &name).await;
        assert_eq!(code, 3, "{message}");
    }
    assert_eq!(asked.v1_count() + asked.v1alpha_count(), 0);

    // 50 short invented names, each opened twice: one request per name.
    for round in 0..2 {
        for i in 0..50u32 {
            let call = 2000 + round * 100 + i;
            let (code, message) = open_status(&mut socket, call, &format!("/invented.S{i}/M")).await;
            assert_eq!(code, 12, "{message}");
        }
    }
    assert_eq!(asked.v1_count(), 50);
    assert_eq!(asked.v1alpha_count(), 0);

    // A known service: described once; its unknown methods, and a message
    // type asked as a service, cost nothing more once seen.
    assert_eq!(status(&json_echo_unary(&mut socket, 3000, "known").await).0, 0);
    let described = asked.v1_count();
    for call in 3001..3021 {
        assert_eq!(
            open_status(&mut socket, call, "/streambridge.testing.Echo/Nope")
                .await
                .0,
            12
        );
    }
    for call in 3021..3041 {
        assert_eq!(
            open_status(&mut socket, call, "/streambridge.testing.EchoRequest/M")
                .await
                .0,
            12
        );
    }
    assert!(
        asked.v1_count() <= described + 1,
        "{} after {described}",
        asked.v1_count()
    );
}

#[tokio::test]
async fn concurrent_opens_of_one_new_name_share_one_request() {
    let upstream = EchoUpstream::start().await;
    let asked = upstream.reflection_requests.clone();
    let bridge = bridge_with(upstream.url(), |_| {}).await;
    // 4 sockets x 100 calls, every open in flight at once.
    let mut sockets = Vec::new();
    for _ in 0..4 {
        let mut socket = V2::connect(&bridge, Enc::Json).await;
        let opens: Vec<Rec> = (1..=100).map(|call| open(call, "/fresh.Name/M", 0)).collect();
        socket.send(&opens).await;
        sockets.push(socket);
    }
    for socket in &mut sockets {
        let mut ended = 0;
        while ended < 100 {
            for got in socket.batch().await.expect("open") {
                if let Got::Status(_, code, message) = got {
                    assert_eq!(code, 12, "{message}");
                    ended += 1;
                }
            }
        }
    }
    assert_eq!(asked.v1_count(), 1);
}

#[tokio::test]
async fn an_upstream_without_reflection_v1_is_asked_v1alpha_directly_after_the_first_miss() {
    let upstream = EchoUpstream::start_with_reflection(Reflection::V1alphaOnly).await;
    let asked = upstream.reflection_requests.clone();
    let bridge = bridge_with(upstream.url(), |_| {}).await;
    let mut socket = V2::connect(&bridge, Enc::Json).await;
    for call in 1..=10 {
        assert_eq!(
            open_status(&mut socket, call, &format!("/invented.S{call}/M")).await.0,
            12
        );
    }
    // v1 is asked once: its UNIMPLEMENTED is remembered. v1alpha once per name.
    assert_eq!(asked.v1_count(), 1);
    assert_eq!(asked.v1alpha_count(), 10);
}

#[tokio::test]
async fn look_ups_past_the_rate_cap_fail_unavailable_and_are_not_remembered() {
    let upstream = EchoUpstream::start().await;
    let asked = upstream.reflection_requests.clone();
    let bridge = bridge_with(upstream.url(), |config| config.reflection_lookups_per_second = 3).await;
    let mut socket = V2::connect(&bridge, Enc::Json).await;
    let opens: Vec<Rec> = (1..=30)
        .map(|call| open(call, &format!("/burst.S{call}/M"), 0))
        .collect();
    socket.send(&opens).await;
    let mut codes = Vec::new();
    while codes.len() < 30 {
        for got in socket.batch().await.expect("open") {
            if let Got::Status(_, code, message) = got {
                if code == 14 {
                    assert!(message.contains("--reflection-lookups-per-second"), "{message}");
                }
                codes.push(code);
            }
        }
    }
    let refused = codes.iter().filter(|&&c| c == 14).count();
    assert!(refused >= 20, "{codes:?}");
    assert_eq!(refused + asked.v1_count(), 30, "{codes:?}");
    assert!(codes.iter().all(|&c| c == 12 || c == 14), "{codes:?}");
}

/// An upstream that answers every call trailers-only with the `grpc-status`
/// its client asked for in `x-status`, whatever it is.
async fn odd_status_upstream() -> SocketAddr {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|request: ::http::Request<hyper::body::Incoming>| async move {
                        let status = request
                            .headers()
                            .get("x-status")
                            .cloned()
                            .unwrap_or(::http::HeaderValue::from_static("0"));
                        Ok::<_, Infallible>(
                            ::http::Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", status)
                                .body(http_body_util::Empty::<Bytes>::new())
                                .unwrap(),
                        )
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstreams_odd_status_codes_are_counted_as_unknown() {
    let upstream = odd_status_upstream().await;
    let bridge = bridge_with(format!("http://{upstream}"), |_| {}).await;
    let mut client = EchoClient::new(bridge.grpc_channel().await);
    for odd in ["999", "-1", "17", "4294967296", "abc"] {
        let mut request = tonic::Request::new(EchoRequest::default());
        request.metadata_mut().insert("x-status", odd.parse().unwrap());
        let status = client.unary(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unknown, "{odd}");
    }
    let text = metrics_text(bridge.addr).await;
    let codes: Vec<i64> = text
        .lines()
        .filter(|line| line.starts_with("streambridge_stream_errors_total{"))
        .filter_map(|line| line.split("code=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect();
    assert!(!codes.is_empty(), "{text}");
    assert!(codes.iter().all(|code| (0..=16).contains(code)), "{codes:?}");
}

#[tokio::test]
async fn an_upstream_that_dies_ends_reading_and_starved_calls_with_unavailable() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let upstream = EchoUpstream::start().await;
    let relay = Relay::start(upstream.addr).await;
    let bridge = bridge_with(relay.url(), |_| {}).await;

    // Call 1 reads (its upstream waits for more requests), call 2 waits for
    // credit with replies queued behind it; a native call reads too.
    let mut socket = V2::connect(&bridge, Enc::Proto).await;
    socket
        .send(&[
            open(1, BIDI, 0),
            raw(1, vec![0x0a, 1, b'r']),
            open(2, BIDI, 1),
            raw(2, flood(1_000_000, 0)),
        ])
        .await;
    first_messages(&mut socket, &[1, 2]).await;
    let mut native = EchoClient::new(bridge.grpc_channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = native
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(EchoRequest {
        text: "n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    within("the native echo", replies.next()).await.unwrap().unwrap();
    let mut health = HealthClient::new(bridge.grpc_channel().await);
    let mut watch = health.watch(HealthCheckRequest::default()).await.unwrap().into_inner();
    let mut health_becomes = async |want: ServingStatus| {
        within(&format!("health reports {want:?}"), async {
            while let Some(update) = watch.next().await {
                if update.unwrap().status() == want {
                    return;
                }
            }
            panic!("the health watch ended");
        })
        .await
    };
    health_becomes(ServingStatus::Serving).await;

    relay.cut();

    let named = format!("upstream {}", relay.url());
    let mut ended = Vec::new();
    while ended.len() < 2 {
        for got in socket.batch().await.expect("the socket stays open") {
            if let Got::Status(call, code, message) = got {
                assert_eq!(code, 14, "call {call}: {message}");
                assert!(message.contains(&named), "call {call}: {message}");
                ended.push(call);
            }
        }
    }
    ended.sort_unstable();
    assert_eq!(ended, [1, 2]);
    let ended = within("the native call ends", async {
        loop {
            match replies.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return status,
                None => panic!("the native call ended OK"),
            }
        }
    })
    .await;
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains(&named), "{ended:?}");
    // The monitor learns it too.
    health_becomes(ServingStatus::NotServing).await;
    // The socket goes on: a new call opens, and fails as the upstream is gone.
    assert_eq!(
        open_status(&mut socket, 3, "/streambridge.testing.Echo/Unary").await.0,
        14
    );
}

#[tokio::test]
async fn calls_waiting_unread_past_the_parking_limit_end_resource_exhausted() {
    let upstream = EchoUpstream::start().await;
    let bridge = bridge_with(upstream.url(), |config| config.upstream_max_parked_calls = 2).await;
    let mut socket = V2::connect(&bridge, Enc::Proto).await;
    socket
        .send(&[
            open(1, BIDI, 1),
            raw(1, flood(1_000_000, 0)),
            open(2, BIDI, 1),
            raw(2, flood(1_000_000, 0)),
        ])
        .await;
    first_messages(&mut socket, &[1, 2]).await;
    // A third flooded call has no room to wait: it ends, after its one reply.
    socket.send(&[open(3, BIDI, 1), raw(3, flood(1_000_000, 0))]).await;
    let (code, message) = status(&socket.until_status(3, &mut Vec::new()).await);
    assert_eq!(code, 8, "{message}");
    assert!(message.contains("--upstream-max-parked-calls"), "{message}");
    // A parked call that goes frees its place for the next.
    socket.send(&[Rec::Cancel { call: 1 }]).await;
    assert_eq!(status(&socket.until_status(1, &mut Vec::new()).await).0, 1);
    socket.send(&[open(4, BIDI, 1), raw(4, flood(1_000_000, 0))]).await;
    first_messages(&mut socket, &[4]).await;
    socket.send(&[Rec::Window { call: 4, n: 2 }]).await;
    first_messages(&mut socket, &[4]).await;
    // The parked calls are still live.
    socket.send(&[Rec::Cancel { call: 2 }, Rec::Cancel { call: 4 }]).await;
    let mut ended = Vec::new();
    while ended.len() < 2 {
        for got in socket.batch().await.expect("open") {
            if let Got::Status(call, code, _) = got {
                assert_eq!(code, 1, "call {call}");
                ended.push(call);
            }
        }
    }
}

#[tokio::test]
async fn calls_whose_socket_is_not_read_park_too_and_past_the_limit_end() {
    let mut upstream = EchoUpstream::start().await;
    let bridge = bridge_with(upstream.url(), |config| config.upstream_max_parked_calls = 2).await;
    let mut socket = V2::connect(&bridge, Enc::Proto).await;
    // Credit enough for ever; the client simply stops reading its socket.
    let records: Vec<Rec> = (1..=3)
        .flat_map(|call| [open(call, BIDI, u32::MAX), raw(call, flood(1_000_000, 20_000))])
        .collect();
    socket.send(&records).await;
    // Once the socket's writes back up, the calls wait for room: two park,
    // the third is ended, which resets its upstream stream.
    assert_eq!(
        within("a call's upstream stream is reset", upstream.cancelled.recv()).await,
        Some("bidi")
    );
    let mut ended = None;
    while ended.is_none() {
        for got in socket.batch().await.expect("the socket stays open") {
            if let Got::Status(call, code, message) = got {
                ended = Some((call, code, message));
            }
        }
    }
    let (call, code, message) = ended.unwrap();
    assert_eq!(code, 8, "call {call}: {message}");
    assert!(message.contains("--upstream-max-parked-calls"), "{message}");
    let cancels: Vec<Rec> = (1..=3).map(|call| Rec::Cancel { call }).collect();
    socket.send(&cancels).await;
}
