//! Protocol v2's HTTP binding (docs/protocol-v2.md, "HTTP binding") over
//! real sockets, with a client written from the spec
//! (`support/http_session.rs`): what is HTTP's own. The rules of v2
//! itself (calls, credit, errors, drain) run over both ways in
//! `websocket_v2.rs`.

mod support;

use bytes::Bytes;
use http::StatusCode;
use streambridge::Transport;
use support::http::http1_client;
use support::http_session::{self, HttpLink};
use support::ws2::{Enc, Got, V2, close_send, data, messages, open, open_windowed, status};
use support::{ServerAddr, TestServer, metric, metrics_text, within};

const JSON: &str = "streambridge.v2.json";

async fn session(server: &TestServer) -> HttpLink {
    http_session::open(server, JSON, &[]).await.expect("session opens")
}

fn batch(records: &str) -> Bytes {
    Bytes::from(records.to_string())
}

#[tokio::test]
async fn a_call_over_http_answers_on_the_down_stream_and_counts_as_http() {
    let server = TestServer::start().await;
    let mut socket = V2::connect_http(&server, Enc::Proto).await;
    socket.send(&[open(1), data(1, "a"), data(1, "b")]).await;
    let mut got = Vec::new();
    while messages(&got).len() < 2 {
        got.extend(socket.batch().await.expect("replies"));
    }
    assert_eq!(messages(&got), ["processed: a", "processed: b"]);
    let text = metrics_text(server.addr()).await;
    assert_eq!(metric(&text, r#"streambridge_active_streams{transport="http"}"#), 1.0);
    assert_eq!(
        metric(&text, r#"streambridge_active_streams{transport="websocket"}"#),
        0.0
    );
    socket.send(&[close_send(1)]).await;
    let end = socket.until_status(1, &mut Vec::new()).await;
    assert_eq!(status(&end).0, 0);
    within("call released", server.calls.wait_for(Transport::Http, 0)).await;
}

#[tokio::test]
async fn session_ids_start_with_the_instances_route_and_are_unguessable() {
    let server = TestServer::start_with(|config| config.http_session_route = Some("s1".into())).await;
    let (first, second) = (session(&server).await, session(&server).await);
    for link in [&first, &second] {
        let random = link.id.strip_prefix("s1.").expect("the route first");
        assert_eq!(random.len(), 22, "128 bits in base64url: {}", link.id);
    }
    assert_ne!(first.id, second.id);
}

#[tokio::test]
async fn sessions_past_the_cap_are_refused_with_503_until_one_ends() {
    let server = TestServer::start_with(|config| config.http_max_sessions = 2).await;
    let first = session(&server).await;
    let _second = session(&server).await;
    let (status, body) = http_session::open(&server, JSON, &[]).await.err().expect("refused");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("--http-max-sessions"), "{body}");
    // A WebSocket is not a session: it still opens.
    let _socket = V2::connect(&server, Enc::Json).await;
    // The client of the first goes away: its place frees once the server
    // sees its down-stream gone.
    drop(first);
    within("a place frees", async {
        loop {
            if let Ok(link) = http_session::open(&server, JSON, &[]).await {
                return link;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_freed_and_its_posts_get_404() {
    let server = TestServer::start_with(|config| {
        config.http_session_idle_timeout = std::time::Duration::from_millis(600);
    })
    .await;
    let mut live = session(&server).await;
    let mut silent = session(&server).await;
    silent.answer_pings = false;
    // The live one opens a call and answers its pings meanwhile (its own task).
    let (status, body) = live
        .post(batch(
            r#"[{"call":1,"open":{"method":"/DataService/BidirectionalStream"}}]"#,
        ))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let live = tokio::spawn(async move {
        for _ in 0..4 {
            let event = live.next_event().await.expect("pings keep coming");
            assert_eq!(event.name, "ping");
            assert_eq!(live.post(Bytes::new()).await.0, StatusCode::NO_CONTENT);
        }
        live
    });
    let mut pings = 0;
    while let Some(event) = silent.next_event().await {
        assert!(event.name == "ping", "nothing but pings: {event:?}");
        pings += 1;
    }
    assert!(pings >= 1, "the silent session was pinged before it was freed");
    let (status, body) = silent.post(batch("[]")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("ended or expired"), "{body}");
    // The live session outlived several idle timeouts, its call with it.
    let mut live = within("four pings answered", live).await.unwrap();
    let (status, _) = live
        .post(batch(
            r#"[{"call":1,"message":{"data":"still here"}},{"call":1,"closeSend":{}}]"#,
        ))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let replies = live.next_non_ping().await.expect("the reply");
    assert!(replies.data.contains("processed: still here"), "{replies:?}");
}

#[tokio::test]
async fn posts_to_unknown_sessions_or_without_parameters_say_what_to_do() {
    let server = TestServer::start().await;
    let client = http1_client();
    let url = server.http_url("/ws");
    let (status, body) = http_session::post(&client, &url, "nope", 0, batch("[]"), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body.contains("no HTTP session nope here") && body.contains("open a new session"),
        "{body}"
    );
    let reply = support::http::send(
        &client,
        http::Request::post(format!("{url}?session=x"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.text().contains("seq="), "{}", reply.text());
    let (status, body) = http_session::open(&server, "streambridge.v1.json", &[])
        .await
        .err()
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("protocol v2 only"), "{body}");
}

#[tokio::test]
async fn a_repeated_post_is_applied_once_and_a_lost_one_ends_the_session() {
    let server = TestServer::start_with(|config| {
        config.request_body_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    let mut link = session(&server).await;
    let first = batch(
        r#"[{"call":1,"open":{"method":"/DataService/BidirectionalStream"}},{"call":1,"message":{"data":"once"}}]"#,
    );
    assert_eq!(link.post(first.clone()).await.0, StatusCode::NO_CONTENT);
    // The same seq again (a retry by a proxy): acknowledged, not applied.
    assert_eq!(link.post_with_seq(0, first).await.0, StatusCode::NO_CONTENT);
    let (status, _) = link.post(batch(r#"[{"call":1,"closeSend":{}}]"#)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let mut records = String::new();
    while !records.contains("status") {
        records.push_str(&link.next_non_ping().await.expect("records").data);
    }
    assert_eq!(records.matches("processed: once").count(), 1, "{records}");
    // A POST ahead of its turn waits for the ones before it; one that never
    // comes (lost) ends the session when the wait is over.
    let (status, body) = link.post_with_seq(link.seq + 1, batch("[]")).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
    assert!(body.contains("waited for the POSTs before it"), "{body}");
    assert_eq!(link.next_event().await, None, "the down-stream ends");
    assert_eq!(link.post(batch("[]")).await.0, StatusCode::NOT_FOUND);
    // Further ahead than four POSTs in flight: a batch was lost for sure.
    let mut link = session(&server).await;
    let (status, body) = link.post_with_seq(4, batch("[]")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("skips 0"), "{body}");
    assert_eq!(link.next_event().await, None, "the down-stream ends");
}

#[tokio::test]
async fn an_oversize_post_is_refused_with_413_and_fails_the_session_with_8() {
    let server = TestServer::start_with(|config| config.max_message_size = 1000).await;
    let mut socket = V2::connect_http(&server, Enc::Json).await;
    socket.send(&[open(1)]).await;
    let link = socket.http();
    let (status, body) = link.post(vec![b' '; 1000 + 64 * 1024 + 1]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body.contains("--max-message-size"), "{body}");
    let got = socket.read_to_close().await;
    assert_eq!(status_of(&got, 1).0, 8, "{got:?}");
    assert_eq!(socket.closed.as_ref().map(|c| c.0), Some(1009));
}

fn status_of(got: &[Got], call: u32) -> (i32, String) {
    status(&got.iter().filter(|g| g.call() == call).cloned().collect::<Vec<_>>())
}

#[tokio::test]
async fn a_down_stream_nobody_reads_ends_the_session_and_cancels_its_calls() {
    let server = TestServer::start_with(|config| {
        config.http_session_idle_timeout = std::time::Duration::from_millis(800);
    })
    .await;
    let mut socket = V2::connect_http(&server, Enc::Json).await;
    // Replies of 100 KB each, as many as the credit allows, never read.
    let big = "x".repeat(100_000);
    socket.send(&[open_windowed(1, 1000)]).await;
    let mut sent = 0;
    // Until the server stops taking batches (its calls' replies are stuck
    // behind the unread down-stream) or the session is gone.
    loop {
        let (status, _) = socket
            .http()
            .post(Bytes::from(format!(r#"[{{"call":1,"message":{{"data":"{big}"}}}}]"#)))
            .await;
        if status != StatusCode::NO_CONTENT {
            assert_eq!(status, StatusCode::NOT_FOUND, "only because the session ended");
            break;
        }
        sent += 1;
        if server.calls.get(Transport::Http) == 0 {
            break;
        }
    }
    within("the call is cancelled", server.calls.wait_for(Transport::Http, 0)).await;
    assert!(sent >= 1);
    let (status, _) = socket.http().post(batch("[]")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the session is gone");
}

#[tokio::test]
async fn token_and_origin_are_checked_as_for_websockets() {
    let server = TestServer::start_with(|config| config.auth_token = Some("s3cret".into())).await;
    let (status, body) = http_session::open(&server, JSON, &[]).await.err().expect("no token");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let wrong = http_session::open(&server, JSON, &[("authorization", "Bearer nope")]).await;
    assert_eq!(wrong.err().map(|e| e.0), Some(StatusCode::UNAUTHORIZED));
    let mut link = http_session::open(&server, JSON, &[("authorization", "Bearer s3cret")])
        .await
        .expect("the token opens it");
    let foreign = [("origin", "http://evil.example")];
    let (status, body) = http_session::open(&server, JSON, &[("authorization", "Bearer s3cret"), foreign[0]])
        .await
        .err()
        .expect("another site's page");
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("--allowed-origin"), "{body}");
    // A POST from another site's page is refused too, and does not count.
    let url = server.http_url("/ws");
    let (status, _) = http_session::post(&http1_client(), &url, &link.id, 0, batch("[]"), &foreign).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        link.post(batch("[]")).await.0,
        StatusCode::NO_CONTENT,
        "seq 0 is still free"
    );
}

#[tokio::test]
async fn a_cancel_posted_ends_a_hanging_call_at_the_service() {
    let (server, mut cancelled) = support::upstream::EchoUpstream::added_to_bridge(|_| {}).await;
    let mut link = session(&server).await;
    let (status, body) = link
        .post(batch(
            r#"[{"call":1,"open":{"method":"/streambridge.testing.Echo/ServerStream"}},{"call":1,"message":{"text":"a","repeat":1,"hang":true}},{"call":1,"closeSend":{}}]"#,
        ))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let mut seen = String::new();
    while !seen.contains("\"a 0\"") && !seen.contains("a 0") {
        seen.push_str(&link.next_non_ping().await.expect("the first reply").data);
    }
    let text = metrics_text(server.addr()).await;
    assert_eq!(
        metric(&text, r#"streambridge_active_streams{transport="http"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        link.post(batch(r#"[{"call":1,"cancel":{}}]"#)).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        within("the service sees the cancel", cancelled.recv()).await,
        Some("server_stream")
    );
    within("call released", server.calls.wait_for(Transport::Http, 0)).await;
}

/// A page from another allowed origin reads the answers (CORS): the WASM
/// client's fallback works cross-origin, as its WebSocket does.
#[tokio::test]
async fn pages_of_allowed_origins_pass_cors_and_others_do_not() {
    let server = TestServer::start_with(|config| config.allowed_origins = vec!["http://app.example".into()]).await;
    let url = server.http_url("/ws");
    let client = http1_client();
    let preflight = |origin: &'static str| {
        http::Request::options(format!("{url}?protocol={JSON}"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .body(http_body_util::Full::default())
            .unwrap()
    };
    let allowed = support::http::send(&client, preflight("http://app.example")).await;
    assert!(allowed.status.is_success(), "{}", allowed.status);
    assert_eq!(allowed.headers["access-control-allow-origin"], "http://app.example");
    let methods = allowed.headers["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("GET") && methods.contains("POST"), "{methods}");
    let headers = allowed.headers["access-control-allow-headers"].to_str().unwrap();
    assert!(headers.contains("authorization"), "{headers}");
    let foreign = support::http::send(&client, preflight("http://evil.example")).await;
    assert!(
        !foreign.headers.contains_key("access-control-allow-origin"),
        "{:?}",
        foreign.headers
    );

    // The down-stream and the POSTs carry the origin back.
    let open = http::Request::get(format!("{url}?protocol={JSON}"))
        .header("origin", "http://app.example")
        .body(http_body_util::Full::default())
        .unwrap();
    let down = within("session open", client.request(open)).await.unwrap();
    assert_eq!(down.status(), StatusCode::OK);
    assert_eq!(down.headers()["access-control-allow-origin"], "http://app.example");
    let link = session(&server).await;
    let post = http::Request::post(format!("{url}?session={}&seq=0", link.id))
        .header("origin", "http://app.example")
        .body(http_body_util::Full::new(batch("[]")))
        .unwrap();
    let posted = support::http::send(&client, post).await;
    assert_eq!(posted.status, StatusCode::NO_CONTENT, "{}", posted.text());
    assert_eq!(posted.headers["access-control-allow-origin"], "http://app.example");
}
