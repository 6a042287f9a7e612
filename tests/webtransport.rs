//! Protocol v2 over WebTransport (`--webtransport-listen`,
//! docs/protocol-v2.md §12) with wtransport's native client: each call on a
//! stream of its own, the control stream, refusals with a code and reason,
//! limits, drain.

mod support;

use std::time::Duration;

use streambridge::Transport;
use support::upstream::{EchoRequest, EchoUpstream};
use support::webtransport::{self, WtStream};
use support::within;
use support::ws2::{Enc, Got, Rec, V2, close_send, data, messages, open, open_windowed, status};

const PROTO: &str = "/ws?protocol=streambridge.v2.proto";

/// One call on a stream of its own: `texts` in, its replies and status out.
async fn call_on_stream(
    connection: &wtransport::Connection,
    enc: Enc,
    texts: &[&str],
) -> (Vec<Got>, Option<(u16, String)>) {
    let mut stream = V2::on_stream(WtStream::open(connection).await, enc);
    let mut records = vec![open(1)];
    records.extend(texts.iter().map(|text| data(1, text)));
    records.push(close_send(1));
    stream.send(&records).await;
    let got = stream.until_status(1, &mut Vec::new()).await;
    // The stream carries one call: the server ends it after the status.
    assert!(stream.batch().await.is_none(), "nothing after the call's status");
    (got, stream.closed.take())
}

#[tokio::test]
async fn a_call_runs_on_a_stream_of_its_own_and_the_stream_ends_with_it() {
    let server = webtransport::start(|_| {}).await;
    for (enc, query) in [(Enc::Proto, PROTO), (Enc::Json, "/ws?protocol=streambridge.v2.json")] {
        let session = server.session(query, &[]).await.expect("the session opens");
        let (got, closed) = call_on_stream(&session, enc, &["a", "b"]).await;
        assert_eq!(messages(&got), ["processed: a", "processed: b"]);
        assert_eq!(status(&got), (0, String::new()));
        assert_eq!(closed, Some((1000, String::new())), "a normal close after the call");
        // Another call, another stream, on the same session.
        let (got, _) = call_on_stream(&session, enc, &["c"]).await;
        assert_eq!(messages(&got), ["processed: c"]);
    }
}

#[tokio::test]
async fn a_client_that_finishes_its_side_still_gets_every_reply() {
    let server = webtransport::start(|_| {}).await;
    let session = server.proto_session().await;
    let mut call = V2::on_stream(WtStream::open(&session).await, Enc::Proto);
    let mut records = vec![open(1)];
    records.extend((0..100).map(|i| data(1, &format!("m{i}"))));
    records.push(close_send(1));
    call.send(&records).await;
    // Nothing more to send: the client ends its side at once (FIN).
    call.stream().finish().await;
    let got = call.until_status(1, &mut Vec::new()).await;
    assert_eq!(messages(&got).len(), 100, "{got:?}");
    assert_eq!(status(&got), (0, String::new()));
}

#[tokio::test]
async fn a_live_call_counts_as_webtransport() {
    let server = webtransport::start(|_| {}).await;
    let session = server.proto_session().await;
    let mut call = V2::on_stream(WtStream::open(&session).await, Enc::Proto);
    call.send(&[open(1), data(1, "live")]).await;
    assert_eq!(messages(&call.batch().await.unwrap()), ["processed: live"]);
    let calls = &server.server.calls;
    assert_eq!(calls.get(Transport::WebTransport), 1);
    assert_eq!(calls.get(Transport::WebSocket), 0);
    let text = calls.metrics().render();
    assert!(
        text.contains(r#"streambridge_active_streams{transport="webtransport"} 1"#),
        "{text}"
    );
    call.send(&[close_send(1)]).await;
    assert_eq!(status(&call.until_status(1, &mut Vec::new()).await).0, 0);
    within("call released", calls.wait_for(Transport::WebTransport, 0)).await;
}

#[tokio::test]
async fn calls_on_one_session_run_side_by_side_and_a_stalled_one_holds_up_no_other() {
    let server = webtransport::start(|_| {}).await;
    let session = server.proto_session().await;
    // A call that asks for one reply at a time and then reads nothing.
    let mut stalled = V2::on_stream(WtStream::open(&session).await, Enc::Proto);
    let mut records = vec![open_windowed(1, 1)];
    records.extend((0..200).map(|i| data(1, &format!("s{i}"))));
    stalled.send(&records).await;
    // Others on the same session meanwhile: all answered.
    let calls = (0..20).map(|i| {
        let session = &session;
        async move { call_on_stream(session, Enc::Proto, &[&format!("c{i}")]).await.0 }
    });
    let answered = futures_util::future::join_all(calls).await;
    for (i, got) in answered.iter().enumerate() {
        assert_eq!(messages(got), [format!("processed: c{i}")]);
    }
    // The stalled call is still there, its first reply waiting.
    let first = stalled.batch().await.expect("the stalled call's first batch");
    assert!(first.contains(&Got::Message(1, "processed: s0".into())), "{first:?}");
}

#[tokio::test]
async fn the_control_stream_carries_goaway_and_the_session_ends_after_its_calls() {
    let server = webtransport::start(|config| {
        config.drain_timeout = Duration::from_secs(30);
        config.ws_close_timeout = Duration::from_millis(200);
    })
    .await;
    let session = server.proto_session().await;
    let mut control = within("the control stream", session.accept_uni())
        .await
        .expect("the server opens it");
    // An admitted session is told so first: an empty batch.
    assert_eq!(
        webtransport::control_frame(&mut control).await,
        (webtransport::BATCH, vec![])
    );
    let mut live = V2::on_stream(WtStream::open(&session).await, Enc::Proto);
    live.send(&[open(1), data(1, "before")]).await;
    assert_eq!(messages(&live.batch().await.unwrap()), ["processed: before"]);

    server.server.shutdown();
    let (kind, batch) = webtransport::control_frame(&mut control).await;
    assert_eq!(kind, webtransport::BATCH);
    let records = <streambridge_protocol::v2::ServerBatch as prost::Message>::decode(&batch[..])
        .unwrap()
        .records;
    assert!(
        matches!(&records[..], [record] if record.call == 0
            && matches!(&record.kind, Some(streambridge_protocol::v2::server_record::Kind::Goaway(_)))),
        "{records:?}"
    );

    // The built-in service ends its calls at the drain (14: retry elsewhere),
    // as on every transport; the stream closes after the status.
    let rest = live.read_to_close().await;
    assert_eq!(status(&rest).0, 14, "{rest:?}");
    // Its streams done, the server closes the session (the client did not).
    match within("the server closes the session", session.closed()).await {
        wtransport::error::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.code().into_inner(), 0);
            assert_eq!(close.reason(), b"server shutting down");
        }
        other => panic!("not closed by the server: {other}"),
    }
}

#[tokio::test]
async fn refused_sessions_are_closed_with_a_code_and_a_reason() {
    let server = webtransport::start(|config| {
        config.auth_token = Some("s3cret".into());
        config.allowed_origins = vec!["https://app.example".into()];
        config.ws_close_timeout = Duration::from_millis(200);
    })
    .await;
    let refusals = [
        (
            "/elsewhere?protocol=streambridge.v2.proto&token=s3cret",
            vec![],
            4404,
            "/ws",
        ),
        ("/ws?token=s3cret", vec![], 4400, "protocol=streambridge.v2.proto"),
        (PROTO, vec![], 4401, "token"),
        ("/ws?protocol=streambridge.v2.proto&token=wrong", vec![], 4401, "token"),
        (
            "/ws?protocol=streambridge.v2.proto&token=s3cret",
            vec![("origin", "https://evil.example")],
            4403,
            "--allowed-origin",
        ),
    ];
    for (path, headers, code, says) in refusals {
        let (closed_with, reason) = server.refusal(path, &headers).await;
        assert_eq!(closed_with, code, "{path} {headers:?}: {reason}");
        assert!(reason.contains(says), "{path}: {reason}");
    }
    // A client that does not close after being told is closed by the server
    // (after --ws-close-timeout), with the same code and reason.
    let deaf = server.session(PROTO, &[]).await.unwrap();
    match within("the server closes it", deaf.closed()).await {
        wtransport::error::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.code().into_inner(), 4401);
            assert!(String::from_utf8_lossy(close.reason()).contains("token"));
        }
        other => panic!("not an application close: {other}"),
    }
    // The token as a parameter (browsers cannot send headers), or as a header.
    for (path, headers) in [
        (
            "/ws?protocol=streambridge.v2.proto&token=s3cret",
            vec![("origin", "https://app.example")],
        ),
        (PROTO, vec![("authorization", "Bearer s3cret")]),
    ] {
        let session = server.session(path, &headers).await.unwrap();
        let (got, _) = call_on_stream(&session, Enc::Proto, &["in"]).await;
        assert_eq!(messages(&got), ["processed: in"], "{path}");
    }
}

#[tokio::test]
async fn sessions_past_the_cap_are_closed_with_4503() {
    let server = webtransport::start(|config| config.webtransport_max_sessions = 1).await;
    let first = server.proto_session().await;
    let (code, reason) = server.refusal(PROTO, &[]).await;
    assert_eq!(code, 4503, "{reason}");
    assert!(reason.contains("--webtransport-max-sessions"), "{reason}");
    // The first is unaffected.
    let (got, _) = call_on_stream(&first, Enc::Proto, &["still"]).await;
    assert_eq!(messages(&got), ["processed: still"]);
}

#[tokio::test]
async fn streams_past_the_calls_limit_wait_until_one_ends() {
    let server = webtransport::start(|config| config.ws_max_calls = 2).await;
    let session = server.proto_session().await;
    let mut held = Vec::new();
    for call in 0..2 {
        let mut stream = V2::on_stream(WtStream::open(&session).await, Enc::Proto);
        stream.send(&[open(1), data(1, &format!("held {call}"))]).await;
        assert_eq!(
            messages(&stream.batch().await.unwrap()),
            [format!("processed: held {call}")]
        );
        held.push(stream);
    }
    // QUIC gives no third stream while two are open.
    let third = session.open_bi();
    let mut third = std::pin::pin!(third);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), third.as_mut())
            .await
            .is_err(),
        "a third stream opened past --ws-max-calls 2"
    );
    // One ends: the third opens.
    let mut first = held.remove(0);
    first.send(&[close_send(1)]).await;
    while first.batch().await.is_some() {}
    first.stream().finish().await;
    drop(first);
    within("the third stream", async { third.await.unwrap().await })
        .await
        .expect("opens once one ended");
}

#[tokio::test]
async fn an_oversize_frame_ends_its_stream_with_1009_and_only_that_stream() {
    let server = webtransport::start(|config| config.max_message_size = 1024).await;
    let session = server.proto_session().await;
    let mut big = V2::on_stream(WtStream::open(&session).await, Enc::Proto);
    big.send(&[open(1)]).await;
    // A frame header announcing more than --max-message-size + 64 KiB.
    big.stream().write_raw(&(70 * 1024u32).to_be_bytes()).await;
    let got = big.read_to_close().await;
    assert_eq!(status(&got).0, 8, "{got:?}");
    assert_eq!(big.closed.as_ref().map(|c| c.0), Some(1009));
    // The session and its other streams go on.
    let (got, _) = call_on_stream(&session, Enc::Proto, &["fine"]).await;
    assert_eq!(messages(&got), ["processed: fine"]);
}

#[tokio::test]
async fn a_stream_reset_by_the_client_cancels_its_call_at_the_service() {
    let cert = webtransport::cert().await;
    let (bridge, mut cancelled) = EchoUpstream::added_to_bridge(|config| cert.configure(config)).await;
    let server = webtransport::WtServer::new(bridge, cert);
    let session = server.proto_session().await;
    let mut call = V2::on_stream(WtStream::open(&session).await, Enc::Proto);
    let request = EchoRequest {
        text: "hang".into(),
        repeat: 1,
        hang: true,
        ..Default::default()
    };
    call.send(&[
        Rec::Open {
            call: 1,
            method: "/streambridge.testing.Echo/ServerStream".into(),
            window: 0,
            timeout_ms: 0,
        },
        Rec::Raw {
            call: 1,
            json: String::new(),
            proto: prost::Message::encode_to_vec(&request),
        },
        close_send(1),
    ])
    .await;
    assert_eq!(messages(&call.batch().await.unwrap()), ["hang 0"]);
    let Some(stream) = call.into_stream() else {
        unreachable!()
    };
    stream.reset(0);
    assert_eq!(
        within("the service sees the call cancelled", cancelled.recv()).await,
        Some("server_stream")
    );
}

#[tokio::test]
async fn a_frame_of_unknown_kind_resets_its_stream_and_only_that_stream() {
    let server = webtransport::start(|_| {}).await;
    let session = server.proto_session().await;
    let mut stream = WtStream::open(&session).await;
    stream.write_frame(7, b"?").await;
    assert_eq!(stream.read_frame().await, None);
    assert_eq!(stream.reset, Some(1002), "reset with the protocol-error code");
    let (got, _) = call_on_stream(&session, Enc::Proto, &["fine"]).await;
    assert_eq!(messages(&got), ["processed: fine"]);
}

#[tokio::test]
async fn a_stream_that_brings_no_frame_in_time_is_reset_and_frees_its_slot() {
    let server = webtransport::start(|config| {
        config.request_body_timeout = Duration::from_millis(300);
        config.ws_max_calls = 1;
    })
    .await;
    let session = server.proto_session().await;
    // Opened, and nothing written after the stream's header.
    let mut silent = WtStream::open(&session).await;
    assert_eq!(silent.read_frame().await, None);
    assert_eq!(silent.reset, Some(1008), "reset with the policy-violation code");
    // The server also stopped reading it; a browser's QUIC stack answers
    // that with a reset of its own side, quinn leaves it to the application:
    // here, dropping the stream.
    drop(silent);
    // Its slot (the session's only one) is free again.
    let (got, _) = call_on_stream(&session, Enc::Proto, &["after"]).await;
    assert_eq!(messages(&got), ["processed: after"]);
}
