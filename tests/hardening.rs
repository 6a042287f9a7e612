//! Production behaviour, each with a real client on a real socket: metrics,
//! health and reflection, bearer-token auth and TLS on every transport,
//! slowloris, the connection cap, WebSocket liveness pings, backpressure
//! against a client that never reads, a ping flood, malformed native gRPC.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use streambridge::Transport;
use streambridge_protocol::StreamRequest;
use support::ServerAddr;
use support::http::{decode_grpc_web, grpc_web_body, http1_client, send};
use support::ws::{
    Sub, assert_one_round_trip, close_send_frame, connect_with, next_response, read_to_close, refused_upgrade,
    request_frame, send_all,
};
use support::{TestServer, metric, metrics_text, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::Code;
use tonic::metadata::MetadataValue;

#[tokio::test]
async fn metrics_count_streams_and_messages_and_return_to_zero() {
    let server = TestServer::start().await;
    let mut socket = connect_with(&server, Sub::Json).await;
    send_all(&mut socket, (0..3).map(|i| request_frame(Sub::Json, &format!("m{i}")))).await;
    for i in 0..3 {
        assert_eq!(next_response(&mut socket, Sub::Json).await, format!("processed: m{i}"));
    }
    let live = metrics_text(server.addr).await;
    assert_eq!(
        metric(&live, r#"streambridge_active_streams{transport="websocket"}"#),
        1.0,
        "{live}"
    );
    assert_eq!(
        metric(&live, r#"streambridge_messages_received_total{transport="websocket"}"#),
        3.0
    );
    assert_eq!(
        metric(&live, r#"streambridge_messages_sent_total{transport="websocket"}"#),
        3.0
    );
    assert!(
        metric(&live, "streambridge_open_connections") >= 2.0,
        "the socket and the scrape"
    );

    send_all(&mut socket, [request_frame(Sub::Json, "{broken")]).await; // valid frame
    send_all(&mut socket, [Message::text("{broken")]).await; // invalid frame: status 3
    let transcript = read_to_close(&mut socket, Sub::Json).await;
    assert_eq!(transcript.status().0, 3);
    drop(socket);
    within("released", server.calls.wait_for(Transport::WebSocket, 0)).await;
    let after = metrics_text(server.addr).await;
    assert_eq!(
        metric(&after, r#"streambridge_active_streams{transport="websocket"}"#),
        0.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            r#"streambridge_stream_errors_total{transport="websocket",code="3"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            r#"streambridge_stream_duration_seconds_count{transport="websocket"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn health_reports_serving_and_reflection_lists_the_services() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start().await;
    let channel = server.grpc_channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "DataService"] {
        let reply = within(
            "health",
            health.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await;
        assert_eq!(reply.unwrap().into_inner().status, 1, "SERVING for {service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = within(
        "reflection",
        reflection.server_reflection_info(tokio_stream::iter([request])),
    )
    .await
    .unwrap()
    .into_inner();
    let reply = within("reflection reply", replies.next()).await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("{reply:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"DataService".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
}

const TOKEN: &str = "t0ken-for-tests";

#[tokio::test]
async fn a_bad_or_missing_token_is_refused_on_every_transport() {
    let server = TestServer::start_with(|c| c.auth_token = Some(TOKEN.into())).await;
    token_guards_every_transport(&server).await;
}

#[tokio::test]
async fn a_token_read_from_a_file_guards_every_transport_without_its_newline() {
    let file = std::env::temp_dir().join(format!("streambridge-token-{}", std::process::id()));
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let server = TestServer::start_with(|c| c.auth_token_file = Some(file.clone())).await;
    token_guards_every_transport(&server).await;
    std::fs::remove_file(file).unwrap();
}

/// Without the token, or with a wrong one, every transport refuses; with it,
/// every transport serves.
async fn token_guards_every_transport(server: &TestServer) {
    // Native gRPC.
    let mut client = server.grpc_client().await;
    let outbound = tokio_stream::iter([StreamRequest { data: "x".into() }]);
    let status = within("no token", client.bidirectional_stream(outbound))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut request = tonic::Request::new(tokio_stream::iter([StreamRequest { data: "x".into() }]));
    request
        .metadata_mut()
        .insert("authorization", MetadataValue::from_static("Bearer wrong"));
    let status = within("bad token", client.bidirectional_stream(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(tokio_stream::iter([StreamRequest { data: "x".into() }]));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut replies = within("good token", client.bidirectional_stream(request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        within("reply", replies.next()).await.unwrap().unwrap().result,
        "processed: x"
    );

    // gRPC-Web.
    let grpc_web = |token: Option<&str>| {
        let mut request = Request::post(server.http_url("/DataService/BidirectionalStream"))
            .header("content-type", "application/grpc-web")
            .body(Full::new(grpc_web_body(&["w"])))
            .unwrap();
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    };
    let refused = send(&http1_client(), grpc_web(Some("wrong"))).await;
    let status = refused
        .headers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    let status = status.or_else(|| {
        decode_grpc_web(refused.body.clone())
            .trailer("grpc-status")
            .map(str::to_string)
    });
    assert_eq!(status.as_deref(), Some("16"));
    let allowed = send(&http1_client(), grpc_web(Some(TOKEN))).await;
    assert_eq!(decode_grpc_web(allowed.body).replies, vec!["processed: w".to_string()]);

    // WebSocket: refused before the upgrade; the token as a subprotocol entry or header works.
    for offers in [
        vec!["streambridge.v1.json"],
        vec!["streambridge.v1.json", "streambridge.bearer.wrong"],
    ] {
        let mut request = server.ws_url().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", offers.join(", ").parse().unwrap());
        let (status, body) = refused_upgrade(request).await;
        assert_eq!(status, 401, "{body}");
    }
    let mut socket = support::ws::connect(
        server,
        &["streambridge.bearer.t0ken-for-tests", "streambridge.v1.proto"],
    )
    .await;
    assert_one_round_trip(&mut socket, Sub::Proto, "p").await;
    let mut request = server.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .expect("the header works for non-browser clients");
}

#[tokio::test]
async fn a_slowloris_client_is_disconnected_after_the_header_timeout() {
    let server = TestServer::start_with(|c| c.http1_header_read_timeout = Duration::from_millis(300)).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: example\r\nX-Slow: 1\r\n")
        .await
        .unwrap(); // never finished
    let mut rest = Vec::new();
    // Ends with EOF or a reset; `within` fails the test if the server keeps it open.
    let _ = within("the server closes the connection", slow.read_to_end(&mut rest)).await;
    assert!(
        rest.is_empty(),
        "no answer to an unfinished request: {}",
        String::from_utf8_lossy(&rest)
    );
    // A well-behaved client is served meanwhile.
    let reply = send(
        &http1_client(),
        Request::get(server.http_url("/")).body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_after_the_header_timeout() {
    let server = TestServer::start_with(|c| c.http1_header_read_timeout = Duration::from_millis(300)).await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /nope HTTP/1.1\r\nHost: example\r\n\r\n")
        .await
        .unwrap();
    // The response comes, then the connection sits idle (keep-alive) until the server closes it;
    // `within` fails the test if it never does.
    let mut everything = Vec::new();
    let _ = within("the idle connection is closed", idle.read_to_end(&mut everything)).await;
    assert!(
        everything.starts_with(b"HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&everything)
    );
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_are_closed_and_old_ones_keep_working() {
    let server = TestServer::start_with(|c| c.max_connections = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut socket = connect_with(&server, Sub::Json).await;
        send_all(&mut socket, [request_frame(Sub::Json, "held")]).await;
        assert_eq!(next_response(&mut socket, Sub::Json).await, "processed: held");
        held.push(socket);
    }
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = within("the third connection is closed", third.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty(),
        "no HTTP answer past the cap: {}",
        String::from_utf8_lossy(&answer)
    );
    for socket in &mut held {
        send_all(socket, [request_frame(Sub::Json, "still"), close_send_frame(Sub::Json)]).await;
        assert_eq!(
            read_to_close(socket, Sub::Json).await.responses(),
            vec!["processed: still".to_string()]
        );
    }
    drop(held);
    within("slots freed", server.calls.wait_for(Transport::WebSocket, 0)).await;
    let text = metrics_text(server.addr).await;
    assert_eq!(metric(&text, "streambridge_connections_refused_total"), 1.0, "{text}");
}

#[tokio::test]
async fn a_websocket_peer_that_stops_answering_pings_is_cancelled() {
    let server = TestServer::start_with(|c| c.ws_ping_interval = Duration::from_millis(200)).await;
    let mut silent = connect_with(&server, Sub::Json).await;
    send_all(&mut silent, [request_frame(Sub::Json, "hello")]).await;
    assert_eq!(next_response(&mut silent, Sub::Json).await, "processed: hello");
    // From here the client never reads, so it never answers a ping.
    within("the call is cancelled", server.calls.wait_for(Transport::WebSocket, 0)).await;
    drop(silent);
}

#[tokio::test]
async fn a_websocket_peer_that_answers_pings_stays_connected() {
    let server = TestServer::start_with(|c| c.ws_ping_interval = Duration::from_millis(100)).await;
    let mut socket = connect_with(&server, Sub::Json).await;
    let mut pings = 0;
    while pings < 5 {
        match within("ping", socket.next()).await.unwrap().unwrap() {
            Message::Ping(_) => pings += 1, // tungstenite answers with a pong
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(server.calls.get(Transport::WebSocket), 1, "alive after five pings");
    assert_one_round_trip(&mut socket, Sub::Json, "late").await;
}

/// The largest buffer the kernel gives a socket here for `setting`
/// (`tcp_wmem` or `tcp_rmem`, third field): bytes that can wait in a socket
/// beyond what either program holds.
fn kernel_buffer_max(setting: &str) -> usize {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{setting}")).unwrap_or_default();
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or(32 << 20)
}

// Multi-threaded: the server must run while the flood runs, or the kernel
// buffers alone would stop the client and prove nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_read_no_further_than_its_queue_and_the_kernel_buffers() {
    const QUEUE: usize = 4;
    const PAYLOAD: usize = 256 * 1024;
    const CLIENT_BUFFER: usize = 64 * 1024;
    let server = TestServer::start_with(|c| c.ws_request_queue = QUEUE).await;
    // Small client buffers, so neither replies nor requests pile up on the
    // client's side of the kernel.
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(CLIENT_BUFFER as u32).unwrap();
    tcp.set_send_buffer_size(CLIENT_BUFFER as u32).unwrap();
    let tcp = tcp.connect(server.addr).await.unwrap();
    let mut request = server.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", Sub::Proto.name().parse().unwrap());
    let (mut flooder, _) = within("connect", tokio_tungstenite::client_async(request, tcp))
        .await
        .unwrap();

    // What the server may read from a client that reads nothing: the queued
    // requests, the replies that fit in the kernel's buffers (its send
    // buffer, our receive buffer; the kernel doubles what we ask for), a few
    // in hand. Memory follows: at most this many payloads.
    let replies_in_kernel = (kernel_buffer_max("tcp_wmem") + 2 * CLIENT_BUFFER) / PAYLOAD + 1;
    let bound = QUEUE + replies_in_kernel + 4;
    // Past that, requests can only wait in the kernel (its receive buffer,
    // our send buffer); twice all of it is more than a correct server ever
    // lets through, and what a server without the bound takes at once.
    let requests_in_kernel = (kernel_buffer_max("tcp_rmem") + 2 * CLIENT_BUFFER) / PAYLOAD + 1;
    let flood_size = 2 * (bound + requests_in_kernel);

    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut flood = tokio::spawn({
        let sent = sent.clone();
        async move {
            let payload = "f".repeat(PAYLOAD);
            for _ in 0..flood_size {
                flooder.send(request_frame(Sub::Proto, &payload)).await.unwrap();
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    // A correct server blocks the flood for good, so this waits out its
    // deadline; without the bound the flood (under 100 MB on loopback here)
    // is taken whole well within it. The deadline only bounds the search for
    // a failure: the test cannot be flaky against a correct server.
    let finished = tokio::time::timeout(Duration::from_secs(5), &mut flood).await.is_ok();
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        !finished,
        "the server took all {sent} messages of a client that reads nothing"
    );

    // Meanwhile a healthy client is served.
    let mut healthy = connect_with(&server, Sub::Json).await;
    for i in 0..20 {
        send_all(&mut healthy, [request_frame(Sub::Json, &format!("ok {i}"))]).await;
        assert_eq!(
            next_response(&mut healthy, Sub::Json).await,
            format!("processed: ok {i}")
        );
    }
    send_all(&mut healthy, [close_send_frame(Sub::Json)]).await;
    assert_eq!(read_to_close(&mut healthy, Sub::Json).await.status().0, 0);

    // Ending the calls publishes every count: the figure is exact.
    flood.abort();
    drop(flood.await);
    within("calls end", server.calls.wait_for(Transport::WebSocket, 0)).await;
    let text = metrics_text(server.addr).await;
    let read = metric(&text, r#"streambridge_messages_received_total{transport="websocket"}"#) as usize - 20;
    assert!(
        read <= bound,
        "the server read {read} of the flooder's {sent} messages; a queue of {QUEUE} allows {bound}"
    );
}

#[tokio::test]
async fn a_ping_flood_does_not_disturb_the_call() {
    let server = TestServer::start().await;
    let mut socket = connect_with(&server, Sub::Json).await;
    for _ in 0..10_000 {
        socket.feed(Message::Ping(Bytes::from_static(b"flood"))).await.unwrap();
    }
    send_all(
        &mut socket,
        [request_frame(Sub::Json, "after the flood"), close_send_frame(Sub::Json)],
    )
    .await;
    let transcript = read_to_close(&mut socket, Sub::Json).await;
    assert_eq!(transcript.responses(), vec!["processed: after the flood".to_string()]);
    assert_eq!(transcript.status().0, 0);
}

/// A message with StreamRequest's field number but raw bytes: invalid UTF-8
/// in a `string` field, which the server must reject, not accept or crash on.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRequest {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

#[tokio::test]
async fn a_malformed_native_grpc_message_fails_its_call_with_a_message_and_others_go_on() {
    let server = TestServer::start().await;
    let channel = server.grpc_channel().await;
    let mut grpc = tonic::client::Grpc::new(channel);
    within("ready", grpc.ready()).await.unwrap();
    let codec = tonic_prost::ProstCodec::<RawRequest, streambridge_protocol::StreamResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/DataService/BidirectionalStream");
    let requests = tokio_stream::iter([
        RawRequest { data: b"fine".to_vec() },
        RawRequest { data: vec![0xff, 0xfe] },
    ]);
    let mut replies = within("call", grpc.streaming(tonic::Request::new(requests), path, codec))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        within("first", replies.next()).await.unwrap().unwrap().result,
        "processed: fine"
    );
    let status = within("second", replies.next()).await.unwrap().unwrap_err();
    assert_eq!(
        status.code(),
        Code::Internal,
        "as the README's error table says: {status:?}"
    );
    assert!(status.message().contains("decode"), "says what failed: {status:?}");

    let mut client = server.grpc_client().await;
    let mut replies = client
        .bidirectional_stream(tokio_stream::iter([StreamRequest { data: "next".into() }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        within("other call", replies.next()).await.unwrap().unwrap().result,
        "processed: next"
    );
}

mod tls {
    use super::*;
    use rustls::pki_types::ServerName;
    use tokio_rustls::rustls;

    /// A self-signed certificate for `localhost`, written where the server reads it.
    struct TestCert {
        pem: String,
        dir: std::path::PathBuf,
    }

    impl Drop for TestCert {
        fn drop(&mut self) {
            // Every run made a directory per test thread and left it behind.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn test_cert() -> TestCert {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "streambridge-tls-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
        TestCert {
            pem: cert.cert.pem(),
            dir,
        }
    }

    async fn tls_stream(
        server: &TestServer,
        cert: &TestCert,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        within(
            "TLS handshake",
            support::tls::connector(&cert.pem, alpn).connect(name, tcp),
        )
        .await
        .expect("TLS handshake")
    }

    async fn tls_server(cert: &TestCert) -> TestServer {
        let dir = cert.dir.clone();
        TestServer::start_with(move |c| {
            c.tls_cert = Some(dir.join("cert.pem"));
            c.tls_key = Some(dir.join("key.pem"));
        })
        .await
    }

    #[tokio::test]
    async fn native_grpc_works_over_tls_with_alpn_h2() {
        let cert = test_cert();
        let server = tls_server(&cert).await;
        let stream = tls_stream(&server, &cert, &[b"h2"]).await;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let slot = std::sync::Mutex::new(Some(stream));
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let stream = slot.lock().unwrap().take().expect("one connection");
                async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream)) }
            }))
            .await
            .unwrap();
        let mut client = streambridge::grpc::DataServiceClient::new(channel);
        let requests = tokio_stream::iter([StreamRequest { data: "secure".into() }]);
        let mut replies = client.bidirectional_stream(requests).await.unwrap().into_inner();
        assert_eq!(
            within("reply", replies.next()).await.unwrap().unwrap().result,
            "processed: secure"
        );
    }

    #[tokio::test]
    async fn grpc_web_works_over_https() {
        let cert = test_cert();
        let server = tls_server(&cert).await;
        let stream = tls_stream(&server, &cert, &[b"http/1.1"]).await;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = Request::post("/DataService/BidirectionalStream")
            .header("host", "localhost")
            .header("content-type", "application/grpc-web")
            .body(Full::new(grpc_web_body(&["over https"])))
            .unwrap();
        let response = within("response", sender.send_request(request)).await.unwrap();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        let result = decode_grpc_web(body);
        assert_eq!(result.replies, vec!["processed: over https".to_string()]);
        assert_eq!(result.trailer("grpc-status"), Some("0"));
    }

    #[tokio::test]
    async fn wss_works() {
        let cert = test_cert();
        let server = tls_server(&cert).await;
        let stream = tls_stream(&server, &cert, &[b"http/1.1"]).await;
        let mut request = "wss://localhost/ws".into_client_request().unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "streambridge.v1.json".parse().unwrap());
        let (mut socket, _) = within("wss", tokio_tungstenite::client_async(request, stream))
            .await
            .unwrap();
        for frame in [request_frame(Sub::Json, "wss"), close_send_frame(Sub::Json)] {
            socket.feed(frame).await.unwrap();
        }
        socket.flush().await.unwrap();
        let mut texts = Vec::new();
        while let Some(Ok(Message::Text(text))) = within("frame", socket.next()).await {
            texts.push(text.to_string());
        }
        assert_eq!(
            texts,
            vec![
                r#"{"response":{"result":"processed: wss"}}"#,
                r#"{"status":{"code":0}}"#
            ]
        );
    }

    #[tokio::test]
    async fn after_the_tls_handshake_a_connection_that_sends_nothing_is_closed() {
        let cert = test_cert();
        let dir = cert.dir.clone();
        let server = TestServer::start_with(move |c| {
            c.tls_cert = Some(dir.join("cert.pem"));
            c.tls_key = Some(dir.join("key.pem"));
            c.http1_header_read_timeout = Duration::from_secs(1);
        })
        .await;
        for alpn in [&[&b"h2"[..]][..], &[b"http/1.1"], &[]] {
            let mut silent = tls_stream(&server, &cert, alpn).await;
            let mut answer = Vec::new();
            // EOF or an error (no close_notify) both mean closed; `within`
            // fails the test if the server keeps the connection.
            let _ = within("the server closes it", silent.read_to_end(&mut answer)).await;
            assert!(answer.is_empty(), "ALPN {alpn:?}: {}", String::from_utf8_lossy(&answer));
        }
    }

    #[tokio::test]
    async fn a_cleartext_client_gets_nothing_from_a_tls_port() {
        let cert = test_cert();
        let server = tls_server(&cert).await;
        let mut plain = TcpStream::connect(server.addr).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let _ = within("closed", plain.read_to_end(&mut answer)).await;
        // Nothing HTTP comes back: at most a TLS alert record (content type 21).
        assert!(
            answer.is_empty() || answer[0] == 21,
            "no cleartext answer on a TLS port: {}",
            String::from_utf8_lossy(&answer)
        );
    }
}

/// Calls are counted by the service that answers them, wherever it was
/// added: the built-in `DataService` (with its messages) and a service added
/// in process, live and by status, over native gRPC.
#[tokio::test]
async fn native_calls_to_the_built_in_and_to_an_added_service_are_counted_live_and_by_status() {
    use support::upstream::{EchoClient, EchoRequest, EchoUpstream};

    let built_in = TestServer::start().await;
    let mut client = built_in.grpc_client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .bidirectional_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for text in ["a", "b"] {
        tx.send(StreamRequest { data: text.into() }).await.unwrap();
        assert!(replies.message().await.unwrap().is_some());
    }
    within("the built-in call counted", built_in.calls.wait_for(Transport::Grpc, 1)).await;
    let live = metrics_text(built_in.addr).await;
    assert_eq!(
        metric(&live, r#"streambridge_active_streams{transport="grpc"}"#),
        1.0,
        "{live}"
    );
    drop(tx);
    while replies.message().await.unwrap().is_some() {}
    within("the built-in call ended", built_in.calls.wait_for(Transport::Grpc, 0)).await;
    let after = metrics_text(built_in.addr).await;
    assert_eq!(
        metric(&after, r#"streambridge_messages_received_total{transport="grpc"}"#),
        2.0,
        "{after}"
    );

    let (added, _cancelled) = EchoUpstream::added_to_bridge(|_| {}).await;
    let mut echo = EchoClient::new(added.grpc_channel().await);
    let failing = EchoRequest {
        text: "x".into(),
        fail_with: 9,
        ..Default::default()
    };
    let status = echo.unary(failing).await.expect_err("fails as asked");
    assert_eq!(status.code(), Code::FailedPrecondition);
    within("the added call ended", added.calls.wait_for(Transport::Grpc, 0)).await;
    let after = metrics_text(added.addr).await;
    assert_eq!(
        metric(&after, r#"streambridge_stream_errors_total{transport="grpc",code="9"}"#),
        1.0,
        "{after}"
    );
}
