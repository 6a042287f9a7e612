//! What an adversarial client tries, and what it must get: connections that
//! never send a request, idle HTTP/2 connections, stalled and truncated
//! bodies, unfinished messages piling up on one connection, odd content
//! types, malformed HTTP/1.1 and WebSocket handshakes. Each test talks to a
//! real server over real sockets, and each fails against a server without
//! the guard it names.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use streambridge::Transport;
use support::http::{decode_grpc_web, grpc_web_body, http1_client, http2_client, send};
use support::ws::{Sub, assert_one_round_trip, connect_with, refused_upgrade};
use support::{ServerAddr, TestServer, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SHORT: Duration = Duration::from_millis(300);

/// Reads until the server closes the connection; fails the test if it never does.
async fn closed_by_server(what: &str, socket: &mut TcpStream) -> Vec<u8> {
    let mut everything = Vec::new();
    // EOF or a reset both count as closed.
    let _ = within(what, socket.read_to_end(&mut everything)).await;
    everything
}

#[tokio::test]
async fn connections_that_send_nothing_or_half_a_preface_are_closed_and_free_their_slots() {
    let server = TestServer::start_with(|c| {
        c.max_connections = 4;
        c.http1_header_read_timeout = SHORT;
    })
    .await;
    let openings: [&[u8]; 4] = [b"", b"P", &H2_PREFACE[..10], H2_PREFACE];
    let mut silent = Vec::new();
    for opening in openings {
        let mut socket = TcpStream::connect(server.addr).await.unwrap();
        socket.write_all(opening).await.unwrap();
        silent.push(socket);
    }
    for (socket, opening) in silent.iter_mut().zip(openings) {
        let what = format!(
            "the server closes a connection that sent {:?}",
            String::from_utf8_lossy(opening)
        );
        let answer = closed_by_server(&what, socket).await;
        assert!(
            !answer.starts_with(b"HTTP/"),
            "no HTTP answer: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    // Every slot is free again: four clients get in.
    for _ in 0..4 {
        let mut socket = connect_with(&server, Sub::Json).await;
        assert_one_round_trip(&mut socket, Sub::Json, "in").await;
    }
}

/// An HTTP/2 connection (prior knowledge) driven by hyper's client, with the
/// task that runs it.
async fn h2_connection<B>(
    server: &TestServer,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    (sender, tokio::spawn(connection))
}

type PushedBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// A gRPC request (native or gRPC-Web) whose body the test writes piece by
/// piece through the returned sender; dropping the sender ends the body.
fn pushed_request(
    content_type: &str,
    content_length: Option<usize>,
) -> (Request<PushedBody>, mpsc::Sender<Result<Frame<Bytes>, Infallible>>) {
    let (pieces, body) = mpsc::channel(16);
    let mut request = Request::post("http://localhost/DataService/BidirectionalStream")
        .header("content-type", content_type)
        .header("te", "trailers");
    if let Some(length) = content_length {
        request = request.header("content-length", length);
    }
    (
        request.body(StreamBody::new(ReceiverStream::new(body))).unwrap(),
        pieces,
    )
}

async fn push(pieces: &mpsc::Sender<Result<Frame<Bytes>, Infallible>>, bytes: impl Into<Bytes>) {
    pieces.send(Ok(Frame::data(bytes.into()))).await.expect("body open");
}

/// A 5-byte gRPC message prefix that declares `length` bytes.
fn prefix(length: u32) -> Bytes {
    let mut bytes = BytesMut::new();
    bytes.put_u8(0);
    bytes.put_u32(length);
    bytes.freeze()
}

/// A native gRPC response read to its end: replies, status code and message.
async fn grpc_outcome(response: http::Response<hyper::body::Incoming>) -> (Vec<String>, String, String) {
    let (parts, body) = response.into_parts();
    let collected = within("gRPC body", body.collect()).await.expect("gRPC body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let replies = decode_grpc_web(collected.to_bytes()).replies;
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| parts.headers.get(name))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (replies, field("grpc-status"), field("grpc-message"))
}

#[tokio::test]
async fn an_idle_http2_connection_gets_goaway_but_one_with_a_quiet_call_does_not() {
    // Long enough for the client's first request on a loaded machine.
    let server = TestServer::start_with(|c| c.connection_idle_timeout = Duration::from_secs(1)).await;
    // A: a call that stays open and quiet.
    let (mut busy, _busy_task) = h2_connection::<PushedBody>(&server).await;
    let (request, pieces) = pushed_request("application/grpc", None);
    push(&pieces, grpc_web_body(&["one"])).await;
    let response = within("the quiet call starts", busy.send_request(request))
        .await
        .unwrap();
    let mut replies = response.into_body();
    let first = within("first reply", replies.frame()).await.unwrap().unwrap();
    assert_eq!(decode_grpc_web(first.into_data().unwrap()).replies, ["processed: one"]);

    // B: one request, then nothing: the server winds the connection down.
    let (mut idle, idle_task) = h2_connection::<Full<Bytes>>(&server).await;
    let metrics = Request::get("http://localhost/metrics").body(Full::default()).unwrap();
    let response = within("metrics over h2", idle.send_request(metrics)).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    within("the idle connection is closed", idle_task)
        .await
        .unwrap()
        .expect("closed gracefully (GOAWAY), not reset");

    // B idled out after A's call last changed, so A had as long to idle: it
    // must still take new calls, and its quiet call goes on.
    let (request, _second_pieces) = pushed_request("application/grpc", None);
    within("A still takes new streams", busy.send_request(request))
        .await
        .expect("no GOAWAY on a connection with a call in progress");
    push(&pieces, grpc_web_body(&["two"])).await;
    let next = within("second reply", replies.frame()).await.unwrap().unwrap();
    assert_eq!(decode_grpc_web(next.into_data().unwrap()).replies, ["processed: two"]);
}

#[tokio::test]
async fn a_grpc_web_body_that_stalls_fails_with_deadline_exceeded_and_frees_the_connection() {
    let server = TestServer::start_with(|c| c.request_body_timeout = SHORT).await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let early = grpc_web_body(&["early"]);
    let head = format!(
        "POST /DataService/BidirectionalStream HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web\r\n\
         Content-Length: {}\r\n\r\n",
        early.len() + 1000
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&early).await.unwrap();
    // ...and the other 1000 bytes never come.
    let answer = closed_by_server("the stalled request is answered and closed", &mut socket).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("processed: early"),
        "the reply already due comes first: {text}"
    );
    assert!(text.contains("grpc-status:4"), "DEADLINE_EXCEEDED: {text}");
    assert!(
        text.contains("request%20body%20stalled"),
        "the reason, percent-encoded: {text}"
    );
    within("the call is released", server.calls.wait_for(Transport::GrpcWeb, 0)).await;
}

#[tokio::test]
async fn a_native_grpc_body_that_ends_inside_a_message_fails_with_internal() {
    let server = TestServer::start().await;
    let (mut sender, _task) = h2_connection::<PushedBody>(&server).await;
    let (request, pieces) = pushed_request("application/grpc", None);
    push(&pieces, grpc_web_body(&["whole"])).await;
    push(&pieces, prefix(100)).await;
    drop(pieces);
    let response = within("response", sender.send_request(request)).await.unwrap();
    let (replies, code, message) = grpc_outcome(response).await;
    assert_eq!(replies, ["processed: whole"]);
    assert_eq!(code, "13", "INTERNAL, not OK: {message}");
    assert!(message.contains("truncated"), "{message}");
}

#[tokio::test]
async fn a_grpc_web_body_that_ends_inside_a_message_fails_over_http1_and_http2() {
    let server = TestServer::start().await;
    let mut body = BytesMut::from(&grpc_web_body(&["whole"])[..]);
    body.put_slice(&prefix(100));
    body.put_slice(b"abc");
    for client in [http1_client(), http2_client()] {
        let request = Request::post(server.http_url("/DataService/BidirectionalStream"))
            .header("content-type", "application/grpc-web")
            .body(Full::new(body.clone().freeze()))
            .unwrap();
        let result = decode_grpc_web(send(&client, request).await.body);
        assert_eq!(result.replies, ["processed: whole"]);
        assert_eq!(result.trailer("grpc-status"), Some("13"), "{result:?}");
        assert!(
            result.trailer("grpc-message").unwrap().contains("truncated"),
            "{result:?}"
        );
    }
}

#[tokio::test]
async fn unfinished_messages_on_one_connection_are_bounded_and_the_others_complete() {
    let server = TestServer::start_with(|c| {
        c.max_message_size = 64 * 1024;
        c.connection_message_buffer = 130 * 1024;
    })
    .await;
    let (sender, _task) = h2_connection::<PushedBody>(&server).await;
    // Three calls, each 40 KB into a 60 KB message: each reserves its 60 KB
    // from its prefix on, 180 KB on one connection.
    let data = "x".repeat(60_000);
    let message = grpc_web_body(&[&data]);
    let mut calls = Vec::new();
    for _ in 0..3 {
        let (request, pieces) = pushed_request("application/grpc", None);
        push(&pieces, message.slice(..40_000)).await;
        let mut sender = sender.clone();
        let response = tokio::spawn(async move { grpc_outcome(sender.send_request(request).await.unwrap()).await });
        calls.push((pieces, response));
    }
    // The call whose bytes came last is refused.
    let (pieces, responses): (Vec<_>, Vec<_>) = calls.into_iter().unzip();
    let (outcome, refused, others) = within("one call is refused", futures_util::future::select_all(responses)).await;
    let (_, code, why) = outcome.unwrap();
    assert_eq!(code, "8", "RESOURCE_EXHAUSTED: {why}");
    assert!(why.contains("--connection-message-buffer"), "{why}");
    // The other two finish their messages and complete normally.
    let mut pieces = pieces;
    pieces.swap_remove(refused); // the same reordering select_all did
    for (pieces, response) in pieces.into_iter().zip(others) {
        push(&pieces, message.slice(40_000..)).await;
        drop(pieces);
        let (replies, code, why) = within("the others complete", response).await.unwrap();
        assert_eq!(code, "0", "{why}");
        assert_eq!(replies, [format!("processed: {data}")]);
    }
}

#[tokio::test]
async fn a_native_grpc_message_that_stalls_midway_fails_but_a_quiet_stream_does_not() {
    let server = TestServer::start_with(|c| c.request_body_timeout = SHORT).await;
    let (mut sender, _task) = h2_connection::<PushedBody>(&server).await;
    // Quiet between messages: one message, then nothing (the call stays open).
    let (quiet_request, quiet_pieces) = pushed_request("application/grpc", None);
    push(&quiet_pieces, grpc_web_body(&["one"])).await;
    let quiet = within("quiet call", sender.send_request(quiet_request)).await.unwrap();
    let mut quiet_replies = quiet.into_body();
    let first = within("reply", quiet_replies.frame()).await.unwrap().unwrap();
    assert_eq!(decode_grpc_web(first.into_data().unwrap()).replies, ["processed: one"]);
    // Stalled inside a message: a whole message, then part of the next,
    // cut inside its prefix and inside its bytes.
    let next = grpc_web_body(&["next"]);
    for cut in [4, 7] {
        let (request, pieces) = pushed_request("application/grpc", None);
        push(&pieces, grpc_web_body(&["before"])).await;
        push(&pieces, next.slice(..cut)).await;
        let response = within("stalled call", sender.send_request(request)).await.unwrap();
        let (replies, code, message) = grpc_outcome(response).await;
        assert_eq!(replies, ["processed: before"], "cut at {cut}");
        assert_eq!(code, "4", "DEADLINE_EXCEEDED when cut at {cut}: {message}");
        assert!(message.contains("stalled"), "{message}");
    }
    // The quiet call was idle far longer than the stall timeout and goes on.
    push(&quiet_pieces, grpc_web_body(&["two"])).await;
    let second = within("reply", quiet_replies.frame()).await.unwrap().unwrap();
    assert_eq!(decode_grpc_web(second.into_data().unwrap()).replies, ["processed: two"]);
}

#[tokio::test]
async fn grpc_web_content_types_are_parsed_as_media_types() {
    let server = TestServer::start().await;
    for content_type in [
        "application/grpc-web; charset=utf-8",
        "APPLICATION/GRPC-WEB",
        "Application/Grpc-Web+Proto ; q=1",
    ] {
        for client in [http1_client(), http2_client()] {
            let request = Request::post(server.http_url("/DataService/BidirectionalStream"))
                .header("content-type", content_type)
                .body(Full::new(grpc_web_body(&["typed"])))
                .unwrap();
            let reply = send(&client, request).await;
            assert_eq!(reply.status, 200, "{content_type}: {}", reply.text());
            let answered_as = reply.headers["content-type"].to_str().unwrap();
            assert!(
                answered_as.starts_with("application/grpc-web"),
                "{content_type}: {answered_as}"
            );
            let result = decode_grpc_web(reply.body);
            assert_eq!(result.replies, ["processed: typed"], "{content_type}");
            assert_eq!(result.trailer("grpc-status"), Some("0"), "{content_type}");
        }
    }
}

#[tokio::test]
async fn native_grpc_content_types_are_case_insensitive() {
    let server = TestServer::start().await;
    let (mut sender, _task) = h2_connection::<Full<Bytes>>(&server).await;
    let request = Request::post("http://localhost/DataService/BidirectionalStream")
        .header("content-type", "APPLICATION/GRPC")
        .header("te", "trailers")
        .body(Full::new(grpc_web_body(&["loud"])))
        .unwrap();
    let response = within("response", sender.send_request(request)).await.unwrap();
    let (replies, code, message) = grpc_outcome(response).await;
    assert_eq!(
        (replies, code),
        (vec!["processed: loud".to_string()], "0".to_string()),
        "{message}"
    );
}

/// Sends `request` as raw bytes and returns everything the server answers
/// up to its close (a `Connection: close` request).
async fn raw_exchange(server: &TestServer, request: &str) -> String {
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    String::from_utf8_lossy(&closed_by_server("answer", &mut socket).await).into_owned()
}

#[tokio::test]
async fn http11_requests_without_exactly_one_host_get_400_with_a_reason() {
    let server = TestServer::start().await;
    for request in [
        "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw_exchange(&server, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{request:?}: {answer}");
        assert!(answer.contains("exactly one Host header"), "{answer}");
    }
    let answer = raw_exchange(&server, "GET / HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200"), "HTTP/1.0 needs no Host: {answer}");
}

#[tokio::test]
async fn websocket_handshakes_with_a_bad_key_http10_or_half_an_upgrade_are_refused() {
    let server = TestServer::start().await;
    for key in ["", "not base64!", "AAAAAAAAAAA=", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"] {
        let mut request = server.ws_url().into_client_request().unwrap();
        request.headers_mut().insert("sec-websocket-key", key.parse().unwrap());
        let (status, body) = refused_upgrade(request).await;
        assert_eq!(status, 400, "key {key:?}: {body}");
        assert!(body.contains("Sec-WebSocket-Key"), "{body}");
    }
    let answer = raw_exchange(
        &server,
        "GET /ws HTTP/1.0\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 400"), "{answer}");
    assert!(answer.contains("needs HTTP/1.1"), "{answer}"); // Both headers are needed: either alone is not an upgrade.
    for half in ["Connection: upgrade", "Connection: keep-alive\r\nUpgrade: websocket"] {
        let answer = raw_exchange(
            &server,
            &format!(
                "GET /ws HTTP/1.1\r\nHost: x\r\n{half}\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 426"), "{half}: {answer}");
    }
}

#[tokio::test]
async fn paths_no_file_can_have_get_404_with_a_body_and_no_redirect() {
    // A static directory with a subdirectory, which `//pkg` would be redirected to.
    let dir = std::env::temp_dir().join(format!("streambridge-static-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    std::fs::write(dir.join("pkg/app.js"), "// app").unwrap();
    let static_dir = dir.clone();
    let server = TestServer::start_with(move |c| c.static_dir = static_dir).await;
    assert_eq!(support::http::get(server.http_url("/pkg/app.js")).await.status, 200);
    let long_component = format!("/{}", "a".repeat(300));
    let long_path = format!("/{}", "abc/".repeat(1200));
    for path in ["//pkg", "//pkg/", long_component.as_str(), long_path.as_str()] {
        let reply = support::http::get(server.http_url(path)).await;
        let shown = &path[..path.len().min(20)];
        assert_eq!(reply.status, 404, "{shown}: {}", reply.text());
        assert!(reply.headers.get("location").is_none(), "{shown}: no redirect");
        assert!(reply.text().starts_with("404 not found"), "{shown}: {}", reply.text());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An HTTP session of the built-in service, and its id.
async fn http_session_id(server: &TestServer) -> support::http_session::HttpLink {
    support::http_session::open(server, "streambridge.v2.json", &[])
        .await
        .expect("session opens")
}

#[tokio::test]
async fn an_http_session_post_whose_body_stalls_is_answered_408_and_ends_the_session() {
    let server = TestServer::start_with(|c| c.request_body_timeout = SHORT).await;
    let mut link = http_session_id(&server).await;
    // A body announced as 100 bytes, of which 10 ever come.
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /ws?session={}&seq=0 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n[{{\"call\":1",
        link.id
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let answer = String::from_utf8_lossy(&closed_or_answered(&mut socket).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--request-body-timeout"), "{answer}");
    assert_eq!(link.next_event().await, None, "the session ended with it");
    assert_eq!(
        link.post(Bytes::from_static(b"[]")).await.0,
        http::StatusCode::NOT_FOUND
    );
}

/// Reads one HTTP answer (up to the server closing, or the end of its body).
async fn closed_or_answered(socket: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = within("an answer", socket.read(&mut buffer)).await.unwrap_or(0);
        if read == 0 {
            return answer;
        }
        answer.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            // A 204 has no body; otherwise the body is as long as it says.
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .and_then(|length| length.trim().parse::<usize>().ok());
            if head.starts_with("HTTP/1.1 204") || length.is_some_and(|length| body.len() >= length) {
                return answer;
            }
        }
    }
}

#[tokio::test]
async fn pipelined_posts_apply_in_seq_order_and_a_fifth_in_flight_is_refused_unread() {
    let server = TestServer::start().await;
    let mut link = http_session_id(&server).await;
    let open = r#"[{"call":1,"open":{"method":"/DataService/BidirectionalStream"}}]"#;
    assert_eq!(link.post(Bytes::from(open)).await.0, http::StatusCode::NO_CONTENT);
    // POSTs seq 1 to 4, each with only the first bytes of its body sent.
    let bodies: Vec<String> = (1..=4)
        .map(|seq| format!(r#"[{{"call":1,"message":{{"data":"m{seq}"}}}}]"#))
        .collect();
    let mut posts = Vec::new();
    for (seq, body) in (1..=4).zip(&bodies) {
        let mut post = TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "POST /ws?session={}&seq={seq} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            link.id,
            body.len()
        );
        post.write_all(head.as_bytes()).await.unwrap();
        post.write_all(&body.as_bytes()[..5]).await.unwrap();
        posts.push(post);
    }
    // A fifth, 4 MiB, is refused without being read once the four hold
    // their places (a session holds at most four bodies). Until they do (the
    // server may not have read their heads yet), it is a repeat of seq 0:
    // acknowledged, not applied.
    let client = http1_client();
    let url = server.http_url("/ws");
    let refused = within("the fifth is refused", async {
        loop {
            let body = Bytes::from(vec![b' '; 4 << 20]);
            let (status, text) = support::http_session::post(&client, &url, &link.id, 0, body, &[]).await;
            if status == http::StatusCode::CONFLICT {
                return text;
            }
            assert_eq!(status, http::StatusCode::NO_CONTENT, "{text}");
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(refused.contains("in flight"), "{refused}");
    // The four complete last to first; each is applied in its turn.
    for (post, body) in posts.iter_mut().zip(&bodies).rev() {
        post.write_all(&body.as_bytes()[5..]).await.unwrap();
    }
    for post in &mut posts {
        let answer = String::from_utf8_lossy(&closed_or_answered(post).await).into_owned();
        assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    }
    let mut seen = String::new();
    while seen.matches("processed").count() < 4 {
        seen.push_str(&link.next_non_ping().await.expect("the replies").data);
    }
    let order: Vec<usize> = (1..=4)
        .map(|i| seen.find(&format!("processed: m{i}")).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "applied in seq order: {seen}");
}
