//! WebSocket protocol v2 against the spec (docs/websocket-protocol.md), in
//! both encodings, with a client written from the spec
//! (`support/ws2.rs`): many calls per socket, batches, flow control, every
//! per-call and socket-level error, the drain; through the built-in
//! service, a service added in process and an upstream.

mod support;

use support::upstream::EchoUpstream;
use support::ws2::{
    BIDI, Enc, Got, Rec, V2, Via, close_send, data, every_way, json_echo_unary, messages, open, status,
};
use support::{TestServer, within};

#[tokio::test]
async fn many_calls_interleave_on_one_socket_and_each_ends_with_its_status() {
    let server = TestServer::start().await;
    for (enc, via) in every_way() {
        let mut socket = V2::connect_via(&server, enc, via).await;
        // Three calls opened in one batch, their messages interleaved.
        socket
            .send(&[
                open(1),
                open(2),
                open(3),
                data(1, "a1"),
                data(2, "b1"),
                data(3, "c1"),
                data(1, "a2"),
            ])
            .await;
        socket
            .send(&[close_send(2), data(3, "c2"), close_send(1), close_send(3)])
            .await;
        let mut others = Vec::new();
        let first = socket.until_status(1, &mut others).await;
        assert_eq!(messages(&first), ["processed: a1", "processed: a2"], "{enc:?}/{via:?}");
        assert_eq!(status(&first).0, 0, "{enc:?}/{via:?}");
        let mut second = others.clone();
        second.retain(|g| g.call() == 2);
        let mut third: Vec<Got> = others.into_iter().filter(|g| g.call() == 3).collect();
        if !matches!(second.last(), Some(Got::Status(..))) {
            second.extend(socket.until_status(2, &mut third).await);
        }
        if !matches!(third.last(), Some(Got::Status(..))) {
            third.extend(socket.until_status(3, &mut Vec::new()).await);
        }
        let of = |call| if call == 2 { second.clone() } else { third.clone() };
        assert_eq!(messages(&of(2)), ["processed: b1"], "{enc:?}/{via:?}");
        assert_eq!(messages(&of(3)), ["processed: c1", "processed: c2"], "{enc:?}/{via:?}");
        assert_eq!(status(&of(2)).0, 0);
        assert_eq!(status(&of(3)).0, 0);
    }
}

#[tokio::test]
async fn json_messages_are_the_methods_own_json_and_a_single_record_is_accepted() {
    use futures_util::SinkExt;
    let server = TestServer::start().await;
    let mut socket = V2::connect(&server, Enc::Json).await;
    // One record object instead of an array; camelCase and snake_case alike.
    socket
        .ws()
        .send(tokio_tungstenite::tungstenite::Message::text(
            r#"{"call":1,"open":{"method":"/DataService/BidirectionalStream","timeout_ms":60000}}"#,
        ))
        .await
        .unwrap();
    socket
        .ws()
        .send(tokio_tungstenite::tungstenite::Message::text(
            r#"[{"call":1,"message":{"data":"hi","unknownField":1}},{"call":1,"close_send":{}}]"#,
        ))
        .await
        .unwrap();
    let got = socket.until_status(1, &mut Vec::new()).await;
    assert_eq!(messages(&got), ["processed: hi"]);
    assert_eq!(status(&got).0, 0);
}

/// What the per-call rules are tried on: a bidi method, how to make its
/// request message, and what it answers to one.
struct Target {
    method: &'static str,
    message: fn(u32, &str) -> Rec,
    reply: fn(&str) -> String,
}

const BUILT_IN: Target = Target {
    method: BIDI,
    message: data,
    reply: |text| format!("processed: {text}"),
};

const UPSTREAM_ECHO: Target = Target {
    method: "/streambridge.testing.Echo/Bidi",
    message: |call, text| Rec::Raw {
        call,
        json: serde_json::json!({ "text": text }).to_string(),
        proto: string_field(text),
    },
    reply: |text| text.to_string(),
};

#[tokio::test]
async fn per_call_failures_end_only_that_call() {
    let server = TestServer::start_with(|config| {
        config.max_message_size = 1000;
        config.ws_max_calls = 3;
    })
    .await;
    per_call_failures(&server, &BUILT_IN).await;
}

#[tokio::test]
async fn per_call_failures_end_only_that_call_through_an_upstream() {
    let upstream = EchoUpstream::start().await;
    let url = upstream.url();
    let bridge = TestServer::start_with(|config| {
        config.upstream = Some(url.parse().unwrap());
        config.max_message_size = 1000;
        config.ws_max_calls = 3;
    })
    .await;
    per_call_failures(&bridge, &UPSTREAM_ECHO).await;
}

async fn per_call_failures(server: &TestServer, target: &Target) {
    let open = |call| open_method(call, target.method, 0);
    let message = target.message;
    for (enc, via) in every_way() {
        let mut socket = V2::connect_via(server, enc, via).await;
        let mut others = Vec::new();
        // A live neighbour that must survive everything below.
        socket.send(&[open(1), message(1, "before")]).await;

        // Unknown method: 12.
        socket.send(&[open_method(2, "/nope.Service/Missing", 0)]).await;
        assert_eq!(
            status(&socket.until_status(2, &mut others).await).0,
            12,
            "{enc:?}/{via:?}"
        );

        // A message that is not the method's input type: 3.
        socket
            .send(&[
                open(3),
                Rec::Raw {
                    call: 3,
                    json: r#"{"data":5,"text":5}"#.into(),
                    proto: vec![0x0a, 0xff],
                },
            ])
            .await;
        assert_eq!(
            status(&socket.until_status(3, &mut others).await).0,
            3,
            "{enc:?}/{via:?}"
        );

        // A message after closeSend: 3.
        socket.send(&[open(4), close_send(4), message(4, "late")]).await;
        assert_eq!(
            status(&socket.until_status(4, &mut others).await).0,
            3,
            "{enc:?}/{via:?}"
        );

        // cancel: 1.
        socket.send(&[open(5), Rec::Cancel { call: 5 }]).await;
        assert_eq!(
            status(&socket.until_status(5, &mut others).await).0,
            1,
            "{enc:?}/{via:?}"
        );

        // timeoutMs passed: 4.
        socket.send(&[open_method(6, target.method, 100)]).await;
        assert_eq!(
            status(&socket.until_status(6, &mut others).await).0,
            4,
            "{enc:?}/{via:?}"
        );

        // A message over --max-message-size: 8.
        socket.send(&[open(7), message(7, &"x".repeat(2000))]).await;
        assert_eq!(
            status(&socket.until_status(7, &mut others).await).0,
            8,
            "{enc:?}/{via:?}"
        );

        // More live calls than --ws-max-calls (3): 8 for the new one.
        socket.send(&[open(8), open(9), open(10)]).await;
        let refused = socket.until_status(10, &mut others).await;
        assert_eq!(status(&refused).0, 8, "{enc:?}/{via:?}");
        assert!(status(&refused).1.contains("--ws-max-calls"), "{refused:?}");

        // Records for calls that are not live are ignored.
        socket
            .send(&[message(5, "ended"), message(99, "never opened"), close_send(42)])
            .await;

        // The neighbour still works.
        socket
            .send(&[message(1, "after"), close_send(1), close_send(8), close_send(9)])
            .await;
        let first = socket.until_status(1, &mut others).await;
        let all: Vec<_> = others
            .iter()
            .chain(first.iter())
            .filter(|g| g.call() == 1)
            .cloned()
            .collect();
        assert_eq!(
            messages(&all),
            [(target.reply)("before"), (target.reply)("after")],
            "{enc:?}/{via:?}"
        );
        assert_eq!(status(&first).0, 0);
    }
}

/// What keeps a path's server side alive for the length of a test: the
/// upstream, or the added service's cancellation receiver.
#[allow(dead_code, reason = "held, not read")]
enum Behind {
    Nothing,
    Upstream(EchoUpstream),
    Added(tokio::sync::mpsc::UnboundedReceiver<&'static str>),
}

/// Every way a v2 call is answered: the built-in service's plug-in on the
/// socket's own task, and a gRPC request on the backend (the generic
/// plug-in) to a service added in process and to an upstream. Each
/// flow-control rule is tried on all three.
async fn every_path(configure: fn(&mut streambridge::Config)) -> Vec<(TestServer, &'static Target, Behind)> {
    let built_in = TestServer::start_with(configure).await;
    let (added, cancelled) = EchoUpstream::added_to_bridge(configure).await;
    let upstream = EchoUpstream::start().await;
    let url: http::Uri = upstream.url().parse().unwrap();
    let bridge = TestServer::start_with(move |config| {
        configure(config);
        config.upstream = Some(url);
    })
    .await;
    vec![
        (built_in, &BUILT_IN, Behind::Nothing),
        (added, &UPSTREAM_ECHO, Behind::Added(cancelled)),
        (bridge, &UPSTREAM_ECHO, Behind::Upstream(upstream)),
    ]
}

fn open_windowed_on(target: &Target, call: u32, window: u32) -> Rec {
    Rec::Open {
        call,
        method: target.method.into(),
        window,
        timeout_ms: 0,
    }
}

#[tokio::test]
async fn response_credit_holds_replies_back_and_an_unread_call_stalls_only_itself() {
    for (server, target, _behind) in every_path(|_| {}).await {
        let (message, reply) = (target.message, |texts: &[&str]| -> Vec<String> {
            texts.iter().map(|t| (target.reply)(t)).collect()
        });
        for (enc, via) in every_way() {
            let mut socket = V2::connect_via(&server, enc, via).await;
            socket.send(&[open_windowed_on(target, 1, 2)]).await;
            let five: Vec<Rec> = (0..5).map(|i| message(1, &format!("m{i}"))).collect();
            socket.send(&five).await;
            // A busy neighbour runs to its end while call 1 waits for credit.
            socket
                .send(&[
                    open_windowed_on(target, 2, 0),
                    message(2, "x"),
                    message(2, "y"),
                    close_send(2),
                ])
                .await;
            let mut others = Vec::new();
            let neighbour = socket.until_status(2, &mut others).await;
            assert_eq!(messages(&neighbour), reply(&["x", "y"]));
            // A backend may answer call 1 after its neighbour ended (the
            // server reads both calls' records at once): wait for what its
            // credit allows, whole batches, so a reply beyond it shows too.
            while others.iter().filter(|g| matches!(g, Got::Message(1, _))).count() < 2 {
                others.extend(socket.batch().await.expect("open"));
            }
            let held: Vec<_> = others.iter().filter(|g| g.call() == 1).cloned().collect();
            assert_eq!(
                messages(&held),
                reply(&["m0", "m1"]),
                "{enc:?}/{via:?}: only the credit"
            );
            // More credit releases the rest.
            socket.send(&[Rec::Window { call: 1, n: 3 }, close_send(1)]).await;
            let rest = socket.until_status(1, &mut Vec::new()).await;
            assert_eq!(messages(&rest), reply(&["m2", "m3", "m4"]), "{enc:?}/{via:?}");
            assert_eq!(status(&rest).0, 0);
        }
    }
}

#[tokio::test]
async fn request_credit_is_granted_as_requests_are_consumed_and_enforced() {
    for (server, target, _behind) in every_path(|_| {}).await {
        request_credit(&server, target).await;
    }
}

async fn request_credit(server: &TestServer, target: &Target) {
    let data = target.message;
    let open_windowed = |call, window| open_windowed_on(target, call, window);
    for (enc, via) in every_way() {
        let mut socket = V2::connect_via(server, enc, via).await;
        // 600 requests in batches of 100, each sent only when the credit allows
        // (the replies' credit is no limit here).
        socket.send(&[open_windowed(1, 1000)]).await;
        let mut credit: u64 = 256;
        let mut sent: u64 = 0;
        let mut got = Vec::new();
        while sent < 600 {
            let room = (credit - sent).min(100).min(600 - sent);
            if room > 0 {
                let batch: Vec<Rec> = (sent..sent + room).map(|i| data(1, &i.to_string())).collect();
                socket.send(&batch).await;
                sent += room;
                continue;
            }
            for g in socket.batch().await.expect("open") {
                if let Got::Window(1, n) = g {
                    credit += u64::from(n);
                }
                got.push(g);
            }
        }
        socket.send(&[close_send(1)]).await;
        got.extend(socket.until_status(1, &mut Vec::new()).await);
        assert_eq!(messages(&got).len(), 600, "{enc:?}/{via:?}");
        assert!(credit > 256, "{enc:?}/{via:?}: the server granted credit");
        assert_eq!(status(&got).0, 0);

        // 257 requests at once, before any grant: the call ends with 8.
        let mut socket = V2::connect_via(server, enc, via).await;
        let mut batch = vec![open_windowed(1, 1000)];
        batch.extend((0..257).map(|i| data(1, &i.to_string())));
        socket.send(&batch).await;
        let got = socket.until_status(1, &mut Vec::new()).await;
        let (code, message) = status(&got);
        assert_eq!(code, 8, "{enc:?}/{via:?}: {message}");
        assert!(message.contains("credit"), "{message}");
    }
}

#[tokio::test]
async fn socket_errors_end_every_call_then_close_with_the_matching_code() {
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start_with(|config| config.max_message_size = 1000).await;
    for (enc, via) in every_way() {
        let bad_batch = match enc {
            Enc::Json => Message::text("[{\"call\":"),
            Enc::Proto => Message::binary(vec![0xff, 0xff, 0xff]),
        };
        let wrong_type = match enc {
            Enc::Json => Message::binary(vec![1, 2, 3]),
            Enc::Proto => Message::text("[]"),
        };
        let huge = match enc {
            Enc::Json => Message::text(format!("[\"{}\"]", "x".repeat(1000 + 64 * 1024))),
            Enc::Proto => Message::binary(vec![0u8; 1000 + 64 * 1024 + 10]),
        };
        for (what, message, code, close) in [
            ("undecodable batch", Some(bad_batch), 3, 1007),
            ("call id 0", None, 3, 1007),
            ("ids not increasing", None, 3, 1007),
            ("wrong message type", Some(wrong_type), 3, 1003),
            ("message too large", Some(huge), 8, 1009),
        ] {
            let mut socket = V2::connect_via(&server, enc, via).await;
            socket.send(&[open(5), data(5, "due")]).await;
            let mut got = Vec::new();
            while !messages(&got).contains(&"processed: due".to_string()) {
                got.extend(socket.batch().await.unwrap());
            }
            match (what, message) {
                // HTTP carries bytes, not typed messages.
                ("wrong message type", _) if via == Via::Http => continue,
                (_, Some(message)) => socket.send_raw(message).await,
                ("call id 0", None) => socket.send(&[close_send(0)]).await,
                (_, None) => socket.send(&[open(3)]).await,
            }
            got.extend(socket.read_to_close().await);
            let mine: Vec<_> = got.iter().filter(|g| g.call() == 5).cloned().collect();
            assert_eq!(messages(&mine), ["processed: due"], "{enc:?}/{via:?} {what}");
            assert_eq!(status(&mine).0, code, "{enc:?}/{via:?} {what}: {mine:?}");
            assert_eq!(
                socket.closed.as_ref().map(|c| c.0),
                Some(close),
                "{enc:?}/{via:?} {what}: {:?}",
                socket.closed
            );
        }
    }
}

#[tokio::test]
async fn an_oversize_message_still_in_flight_does_not_reset_away_the_status_and_close() {
    // The server refuses the message at its header, long before the rest of
    // its 32 MiB has arrived. Those bytes must be read and dropped, not left
    // unread: closing a TCP socket with unread data sends a reset, and the
    // reset destroys what the client has not read yet (the status, the
    // Close). The client here reads only once its whole send is through.
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start_with(|config| config.max_message_size = 1000).await;
    for enc in Enc::BOTH {
        let mut socket = V2::connect(&server, enc).await;
        socket.send(&[open(5), data(5, "due")]).await;
        let huge = vec![b'x'; 32 * 1024 * 1024];
        let huge = match enc {
            Enc::Json => Message::text(String::from_utf8(huge).unwrap()),
            Enc::Proto => Message::binary(huge),
        };
        within("the whole oversize message is taken", socket.ws().send(huge))
            .await
            .expect("the server reads (and drops) the rest of the message instead of resetting");
        let got = socket.read_to_close().await;
        let mine: Vec<_> = got.iter().filter(|g| g.call() == 5).cloned().collect();
        assert_eq!(messages(&mine), ["processed: due"], "{enc:?}");
        assert_eq!(status(&mine).0, 8, "{enc:?}: {mine:?}");
        assert_eq!(socket.closed.as_ref().map(|c| c.0), Some(1009), "{enc:?}");
    }
}

/// An `EchoRequest { text, repeat: 2 }` in both encodings (its field 1 is
/// a string, as `StreamRequest`'s is).
fn echo(call: u32, text: &str) -> Rec {
    Rec::Raw {
        call,
        json: serde_json::json!({ "text": text, "repeat": 2 }).to_string(),
        proto: [string_field(text), vec![0x10, 2]].concat(),
    }
}

/// Field 1, a string, in protobuf.
fn string_field(text: &str) -> Vec<u8> {
    let mut bytes = vec![0x0a];
    prost::encoding::encode_varint(text.len() as u64, &mut bytes);
    bytes.extend_from_slice(text.as_bytes());
    bytes
}

fn open_method(call: u32, method: &str, timeout_ms: u32) -> Rec {
    Rec::Open {
        call,
        method: method.into(),
        window: 0,
        timeout_ms,
    }
}

#[tokio::test]
async fn drain_sends_goaway_refuses_new_calls_lets_live_ones_finish_then_closes_1001() {
    // The bridge ends no call at the drain before its deadline, whatever
    // answers it. The built-in service ends its own calls with UNAVAILABLE,
    // as it does on every transport; the echo, added or upstream, does not.
    for (enc, via) in every_way() {
        for (server, target, _behind) in
            every_path(|config| config.drain_timeout = std::time::Duration::from_secs(2)).await
        {
            let mut socket = V2::connect_via(&server, enc, via).await;
            socket
                .send(&[open_windowed_on(target, 1, 0), (target.message)(1, "one")])
                .await;
            let mut got = Vec::new();
            while messages(&got).is_empty() {
                got.extend(socket.batch().await.unwrap());
            }
            server.shutdown();
            while !got.iter().any(|g| matches!(g, Got::GoAway(_))) {
                got.extend(socket.batch().await.expect("goaway before close"));
            }
            if std::ptr::eq(target, &BUILT_IN) {
                // Its only call ended, the socket closes: an `open` now could
                // find it closed (the race §7 leaves to the client).
                // (Its status comes with the goaway, or after it.)
                let mut ended: Vec<Got> = got.iter().filter(|g| g.call() == 1).cloned().collect();
                if !matches!(ended.last(), Some(Got::Status(..))) {
                    ended.extend(socket.until_status(1, &mut Vec::new()).await);
                }
                let (code, message) = status(&ended);
                assert_eq!(
                    code, 14,
                    "{enc:?}/{via:?}: the built-in service ends its calls at the drain"
                );
                assert!(message.contains("shutting down"), "{message}");
            } else if via == Via::Http {
                // The draining server's listener is closed and its idle
                // connections wound down: a POST may not reach it any more
                // (docs/protocol-v2.md, "HTTP binding", drain). The down-stream
                // still brings everything, and the call's end at the deadline.
                let cut = socket.until_status(1, &mut got).await;
                let (code, message) = status(&cut);
                assert_eq!(code, 14, "{enc:?}/{via:?} {}: {message}", target.method);
                assert!(message.contains("--drain-timeout"), "{message}");
            } else {
                socket.send(&[open_windowed_on(target, 2, 0)]).await;
                let refused = socket.until_status(2, &mut got).await;
                assert_eq!(status(&refused).0, 14, "{enc:?}/{via:?} {}", target.method);
                socket.send(&[(target.message)(1, "two"), close_send(1)]).await;
                let live = socket.until_status(1, &mut got).await;
                assert_eq!(
                    messages(&live),
                    [(target.reply)("two")],
                    "{enc:?}/{via:?} {}: the live call runs on",
                    target.method
                );
                assert_eq!(status(&live).0, 0);
            }
            socket.read_to_close().await;
            assert_eq!(socket.closed.as_ref().map(|c| c.0), Some(1001), "{enc:?}/{via:?}");
        }
    }
}

#[tokio::test]
async fn a_calls_deadline_ends_it_with_4_on_every_path() {
    for (server, target, _behind) in every_path(|_| {}).await {
        for (enc, via) in every_way() {
            let mut socket = V2::connect_via(&server, enc, via).await;
            socket
                .send(&[
                    Rec::Open {
                        call: 1,
                        method: target.method.into(),
                        window: 0,
                        timeout_ms: 300,
                    },
                    (target.message)(1, "before"),
                ])
                .await;
            let got = socket.until_status(1, &mut Vec::new()).await;
            assert_eq!(
                messages(&got),
                [(target.reply)("before")],
                "{enc:?}/{via:?} {}",
                target.method
            );
            let (code, message) = status(&got);
            assert_eq!(code, 4, "{enc:?}/{via:?} {}: {message}", target.method);
            assert!(message.contains("timeoutMs 300"), "{message}");
            // The socket goes on: a new call after the deadline works.
            socket
                .send(&[
                    open_windowed_on(target, 2, 0),
                    (target.message)(2, "after"),
                    close_send(2),
                ])
                .await;
            let next = socket.until_status(2, &mut Vec::new()).await;
            assert_eq!(status(&next).0, 0, "{enc:?}/{via:?}");
        }
    }
}

#[tokio::test]
async fn calls_reach_an_upstream_by_method_name_in_both_encodings() {
    let upstream = EchoUpstream::start().await;
    let url = upstream.url();
    let bridge = TestServer::start_with(|config| config.upstream = Some(url.parse().unwrap())).await;
    for (enc, via) in every_way() {
        let mut socket = V2::connect_via(&bridge, enc, via).await;
        socket
            .send(&[
                open_method(1, "/streambridge.testing.Echo/Unary", 5000),
                echo(1, "u"),
                close_send(1),
                open_method(2, "/streambridge.testing.Echo/Bidi", 0),
                echo(2, "b"),
                close_send(2),
            ])
            .await;
        let mut others = Vec::new();
        let unary = socket.until_status(1, &mut others).await;
        assert_eq!(messages(&unary), ["u"], "{enc:?}/{via:?}: {unary:?}");
        assert!(
            unary.iter().any(|g| matches!(g, Got::Headers(1))),
            "{enc:?}/{via:?}: headers pass"
        );
        assert_eq!(status(&unary).0, 0);
        let mut bidi: Vec<Got> = others.into_iter().filter(|g| g.call() == 2).collect();
        bidi.extend(socket.until_status(2, &mut Vec::new()).await);
        assert_eq!(messages(&bidi), ["b", "b"], "{enc:?}/{via:?}");
        assert_eq!(status(&bidi).0, 0);
    }
}

#[tokio::test]
async fn v1_subprotocols_still_work_beside_v2() {
    let server = TestServer::start().await;
    let mut socket = support::ws::connect(&server, &["streambridge.v1.json"]).await;
    support::ws::assert_one_round_trip(&mut socket, support::ws::Sub::Json, "v1").await;
    let mut v2 = V2::connect(&server, Enc::Json).await;
    v2.send(&[open(1), data(1, "v2"), close_send(1)]).await;
    let got = within("v2 call", v2.until_status(1, &mut Vec::new())).await;
    assert_eq!(messages(&got), ["processed: v2"]);
}

#[tokio::test]
async fn metadata_deadline_headers_and_error_details_cross_to_the_upstream_and_back() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let upstream = EchoUpstream::start().await;
    let url = upstream.url();
    let bridge = TestServer::start_with(|config| config.upstream = Some(url.parse().unwrap())).await;
    let mut socket = V2::connect(&bridge, Enc::Json).await;
    socket
        .ws()
        .send(Message::text(
            r#"[{"call":1,"open":{"method":"/streambridge.testing.Echo/Unary","metadata":{"x-request-id":"7","x-trace-bin":"AAE="},"timeoutMs":5000}},
                {"call":1,"message":{"text":"m"}},{"call":1,"closeSend":{}},
                {"call":2,"open":{"method":"/streambridge.testing.Echo/Unary"}},
                {"call":2,"message":{"text":"no","failWith":9}},{"call":2,"closeSend":{}}]"#,
        ))
        .await
        .unwrap();
    let mut records: Vec<serde_json::Value> = Vec::new();
    while records.iter().filter(|r| r.get("status").is_some()).count() < 2 {
        let message = within("records", socket.ws().next()).await.unwrap().unwrap();
        records.extend(serde_json::from_str::<Vec<serde_json::Value>>(message.to_text().unwrap()).unwrap());
    }
    let of = |call: u64| records.iter().filter(move |r| r["call"] == call);
    let reply = of(1).find_map(|r| r.get("message")).expect("a reply");
    assert_eq!(reply["metadata"]["x-request-id"], "7", "{reply}");
    assert_eq!(reply["metadata"]["x-trace-bin"], "AAE=", "{reply}");
    let timeout: u64 = reply["timeoutMs"].as_str().unwrap().parse().unwrap();
    assert!(timeout > 0 && timeout <= 5000, "the upstream saw {timeout} ms");
    let headers = of(1).find_map(|r| r.get("headers")).expect("response metadata");
    assert_eq!(headers["metadata"]["x-upstream-header"], "from-upstream");
    let failed = of(2).find_map(|r| r.get("status")).unwrap();
    assert_eq!(failed["code"], 9, "{failed}");
    assert_eq!(failed["message"], "failed as asked: no");
    let details = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        support::upstream::failure_details(9, "failed as asked: no"),
    );
    assert_eq!(failed["details"], details.as_str(), "grpc-status-details-bin, base64");
    assert_eq!(failed["metadata"]["x-upstream-trailer"], "from-upstream");
}

#[tokio::test]
async fn closing_the_socket_cancels_its_calls_at_the_upstream() {
    let mut upstream = EchoUpstream::start().await;
    let url = upstream.url();
    let bridge = TestServer::start_with(|config| config.upstream = Some(url.parse().unwrap())).await;
    for (enc, via) in every_way() {
        let mut socket = V2::connect_via(&bridge, enc, via).await;
        socket
            .send(&[open_method(1, "/streambridge.testing.Echo/Bidi", 0), echo(1, "live")])
            .await;
        let mut got = Vec::new();
        while messages(&got).len() < 2 {
            got.extend(socket.batch().await.unwrap());
        }
        drop(socket);
        let ended = within("the upstream sees the cancel", upstream.cancelled.recv()).await;
        assert_eq!(ended, Some("bidi"), "{enc:?}/{via:?}");
    }
}

#[tokio::test]
async fn the_readme_example_health_and_data_on_one_socket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start().await;
    let mut socket = V2::connect(&server, Enc::Json).await;
    let batch = serde_json::json!([
        { "call": 1, "open": { "method": "/DataService/BidirectionalStream" } },
        { "call": 1, "message": { "data": "hello" } },
        { "call": 2, "open": { "method": "/grpc.health.v1.Health/Check" } },
        { "call": 2, "message": {} },
        { "call": 2, "closeSend": {} },
        { "call": 1, "closeSend": {} },
    ]);
    socket.ws().send(Message::text(batch.to_string())).await.unwrap();
    let mut records: Vec<serde_json::Value> = Vec::new();
    while records.iter().filter(|r| r.get("status").is_some()).count() < 2 {
        let message = within("records", socket.ws().next()).await.unwrap().unwrap();
        records.extend(serde_json::from_str::<Vec<serde_json::Value>>(message.to_text().unwrap()).unwrap());
    }
    let message = |call: u64| {
        records
            .iter()
            .find(|r| r["call"] == call && r.get("message").is_some())
            .unwrap()["message"]
            .clone()
    };
    assert_eq!(message(1), serde_json::json!({ "result": "processed: hello" }));
    assert_eq!(message(2), serde_json::json!({ "status": "SERVING" }));
    for call in [1u64, 2] {
        let status = records
            .iter()
            .find(|r| r["call"] == call && r.get("status").is_some())
            .unwrap();
        assert_eq!(status["status"]["code"], 0, "{records:?}");
    }
}

#[tokio::test]
async fn a_full_socket_buffer_never_holds_back_the_credit_that_would_empty_it() {
    // Call 1 may take one reply; its other requests wait in the socket's
    // buffer (10 000 bytes) and fill it (on the generic path tonic's encoder
    // pulls replies ahead up to 32 KiB, so 60 KB of requests leave more than
    // the buffer behind). Only the `window` record the client sends next can
    // move call 1: the socket must read it.
    for (server, target, _behind) in every_path(|config| config.ws_socket_buffer = 10_000).await {
        for (enc, via) in every_way() {
            let mut socket = V2::connect_via(&server, enc, via).await;
            let mut batch = vec![open_windowed_on(target, 1, 1)];
            batch.extend((0..60).map(|i| (target.message)(1, &format!("{i:0>1000}"))));
            socket.send(&batch).await;
            let mut got = Vec::new();
            while messages(&got).is_empty() {
                got.extend(socket.batch().await.unwrap());
            }
            socket.send(&[Rec::Window { call: 1, n: 100 }, close_send(1)]).await;
            got.extend(socket.until_status(1, &mut Vec::new()).await);
            assert_eq!(messages(&got).len(), 60, "{enc:?}/{via:?}: nothing lost");
            assert_eq!(status(&got).0, 0, "{enc:?}/{via:?}");
            // Every byte came back to the buffer: as much again passes on a new call.
            let mut batch = vec![open_windowed_on(target, 2, 100)];
            batch.extend((0..60).map(|i| (target.message)(2, &format!("{i:0>1000}"))));
            batch.push(close_send(2));
            socket.send(&batch).await;
            let again = socket.until_status(2, &mut Vec::new()).await;
            assert_eq!(status(&again).0, 0, "{enc:?}/{via:?}: {:?}", status(&again));
            assert_eq!(messages(&again).len(), 60, "{enc:?}/{via:?}");
        }
    }
}

#[tokio::test]
async fn credit_saturates_and_a_zero_window_is_ignored() {
    for (server, target, _behind) in every_path(|_| {}).await {
        let (data, reply) = (target.message, target.reply);
        let open_windowed = |call, window| open_windowed_on(target, call, window);
        for (enc, via) in every_way() {
            let mut socket = V2::connect_via(&server, enc, via).await;
            socket
                .send(&[
                    open_windowed(1, u32::MAX),
                    Rec::Window { call: 1, n: u32::MAX },
                    Rec::Window { call: 1, n: 0 },
                    data(1, "a"),
                    data(1, "b"),
                    close_send(1),
                ])
                .await;
            let got = socket.until_status(1, &mut Vec::new()).await;
            assert_eq!(messages(&got), [reply("a"), reply("b")], "{enc:?}/{via:?}");
            assert_eq!(status(&got).0, 0);
            // A zero window grants nothing: a call opened with one reply of
            // credit gets exactly one until real credit comes.
            socket
                .send(&[
                    open_windowed(2, 1),
                    Rec::Window { call: 2, n: 0 },
                    data(2, "x"),
                    data(2, "y"),
                    open_windowed(3, 0),
                    data(3, "z"),
                    close_send(3),
                ])
                .await;
            let mut others = Vec::new();
            socket.until_status(3, &mut others).await;
            let held: Vec<_> = others.iter().filter(|g| g.call() == 2).cloned().collect();
            assert_eq!(messages(&held), [reply("x")], "{enc:?}/{via:?}");
            socket.send(&[Rec::Window { call: 2, n: 1 }, close_send(2)]).await;
            let rest = socket.until_status(2, &mut Vec::new()).await;
            assert_eq!(messages(&rest), [reply("y")], "{enc:?}/{via:?}");
        }
    }
}

/// One JSON unary call to the upstream's Echo over v2: its reply text, or its status.
async fn json_echo(bridge: &TestServer) -> Result<String, (i32, String)> {
    let mut socket = V2::connect(bridge, Enc::Json).await;
    let got = json_echo_unary(&mut socket, 1, "described").await;
    match status(&got) {
        (0, _) => Ok(messages(&got).concat()),
        failed => Err(failed),
    }
}

#[tokio::test]
async fn json_descriptors_come_from_v1alpha_reflection_or_descriptor_set_files() {
    use support::upstream::{ECHO_DESCRIPTORS, Reflection};
    // Reflection v1alpha only (grpcio-reflection's case): the bridge falls back to it.
    let upstream = EchoUpstream::start_with_reflection(Reflection::V1alphaOnly).await;
    let url = upstream.url();
    let bridge = TestServer::start_with(|config| config.upstream = Some(url.parse().unwrap())).await;
    assert_eq!(json_echo(&bridge).await, Ok("described".to_string()));

    // No reflection at all: unknown method (12), unless --descriptor-set describes it.
    let silent = EchoUpstream::start_with_reflection(Reflection::None).await;
    let url = silent.url();
    let bridge = TestServer::start_with(|config| config.upstream = Some(url.parse().unwrap())).await;
    let (code, message) = json_echo(&bridge).await.unwrap_err();
    assert_eq!(code, 12, "{message}");
    assert!(message.contains("reflection"), "{message}");
    let file = std::env::temp_dir().join(format!("streambridge-echo-{}.desc", std::process::id()));
    std::fs::write(&file, ECHO_DESCRIPTORS).unwrap();
    let described = TestServer::start_with(|config| {
        config.upstream = Some(url.parse().unwrap());
        config.descriptor_sets = vec![file.clone()];
    })
    .await;
    assert_eq!(json_echo(&described).await, Ok("described".to_string()));
    std::fs::remove_file(&file).unwrap();
}

/// `--limit-messages-per-second` slows a sender that keeps to its credit on
/// every path: every request answered, in order, none refused, and no
/// sooner than the bucket allows. Only a lower bound on the time, which no
/// machine however fast can beat; never an upper one.
#[tokio::test]
async fn a_message_rate_limit_slows_a_sender_on_every_path_and_loses_nothing() {
    fn limited(config: &mut streambridge::Config) {
        config.limit_messages_per_second = std::num::NonZeroU32::new(1000);
        config.limit_messages_burst = std::num::NonZeroU32::new(100);
    }
    for (server, target, _behind) in every_path(limited).await {
        let started = std::time::Instant::now();
        // 1200 requests, each answered (and 256 more past the credit: 8).
        request_credit(&server, target).await;
        let took = started.elapsed();
        // 1100 past the burst at 1000 a second (each call may take a
        // few tokens ahead: 6 here).
        assert!(
            took >= std::time::Duration::from_millis(1000),
            "{}: 1200 requests in {took:?}, faster than the bucket",
            target.method
        );
    }
}
