//! The `streambridge` binary as a separate process: a real SIGTERM with calls
//! in flight, and 10 000 WebSockets (the server in its own process, as the
//! per-process descriptor limit of 20 000 requires), and SIGHUP reading the
//! policy again.

mod support;

use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use streambridge_protocol::StreamRequest;
use support::ServerAddr;
use support::process::{ServerProcess, eventually};
use support::ws::{Received, Sub, request_frame, send_all};
use support::{STEP_TIMEOUT, metric, metrics_text, within};
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_delivers_every_due_reply_then_unavailable_and_exits_in_time() {
    let process = ServerProcess::start(&["--drain-timeout", "10s"]).await;
    let server = &process.server;

    // A gRPC stream and a WebSocket, each with 5 requests received and not yet read back.
    let mut client = server.grpc_client().await;
    let (grpc_tx, grpc_rx) = mpsc::channel(16);
    for i in 0..5 {
        grpc_tx.send(StreamRequest { data: format!("g{i}") }).await.unwrap();
    }
    let mut grpc_replies = client
        .bidirectional_stream(ReceiverStream::new(grpc_rx))
        .await
        .unwrap()
        .into_inner();
    let mut socket = support::ws::connect(server, &[Sub::Json.name()]).await;
    send_all(&mut socket, (0..5).map(|i| request_frame(Sub::Json, &format!("w{i}")))).await;
    eventually(server.0, "the server has received all 10 requests", |text| {
        metric(text, r#"streambridge_messages_received_total{transport="grpc"}"#) == 5.0
            && metric(text, r#"streambridge_messages_received_total{transport="websocket"}"#) == 5.0
    })
    .await;

    process.terminate();

    for i in 0..5 {
        let reply = within("gRPC reply", grpc_replies.next()).await.unwrap().unwrap();
        assert_eq!(reply.result, format!("processed: g{i}"));
    }
    let status = within("gRPC status", grpc_replies.next()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let transcript = support::ws::read_to_close(&mut socket, Sub::Json).await;
    let expected: Vec<String> = (0..5).map(|i| format!("processed: w{i}")).collect();
    assert_eq!(transcript.responses(), expected);
    assert!(
        matches!(transcript.frames.last(), Some(Received::Status { code: 14, .. })),
        "{transcript:?}"
    );
    assert_eq!(transcript.close_code(), 1001);
    drop(grpc_tx);
    drop(socket);

    let mut child = process.child;
    let exit = within("the server exits", child.wait()).await.unwrap();
    assert!(exit.success(), "drained within the deadline: {exit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_websockets_open_and_close_and_nothing_leaks() {
    const SOCKETS: usize = 10_000;
    // Room for the scrapes beside the sockets: the default cap is exactly 10 000.
    let process = ServerProcess::start(&["--max-connections", "10100"]).await;
    let server = &process.server;
    let opened = futures_util::stream::iter(0..SOCKETS)
        .map(|n| async move {
            let mut socket = support::ws::connect(server, &[Sub::Proto.name()]).await;
            send_all(&mut socket, [request_frame(Sub::Proto, &format!("s{n}"))]).await;
            assert_eq!(
                support::ws::next_response(&mut socket, Sub::Proto).await,
                format!("processed: s{n}")
            );
            socket
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>();
    let mut sockets = tokio::time::timeout(STEP_TIMEOUT * 6, opened)
        .await
        .expect("10 000 sockets open");
    let live = metrics_text(server.0).await;
    assert_eq!(
        metric(&live, r#"streambridge_active_streams{transport="websocket"}"#),
        SOCKETS as f64
    );

    // Half close politely, half just vanish.
    let closing = sockets.drain(..).enumerate().map(|(n, mut socket)| async move {
        if n % 2 == 0 {
            let _ = futures_util::SinkExt::send(&mut socket, Message::Close(None)).await;
        }
        drop(socket);
    });
    futures_util::future::join_all(closing).await;
    let after = eventually(server.0, "every socket released", |text| {
        metric(text, r#"streambridge_active_streams{transport="websocket"}"#) == 0.0
            && metric(text, "streambridge_open_connections") == 1.0 // this scrape
    })
    .await;
    assert_eq!(
        metric(&after, r#"streambridge_messages_sent_total{transport="websocket"}"#),
        SOCKETS as f64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_still_open_at_the_drain_deadline_makes_the_exit_code_1() {
    let process = ServerProcess::start(&["--drain-timeout", "300ms", "--ws-close-timeout", "60s"]).await;
    // A client that sends and then never reads nor answers: after SIGTERM the
    // server waits for its Close (up to --ws-close-timeout) past the deadline.
    let mut socket = support::ws::connect(&process.server, &[Sub::Json.name()]).await;
    send_all(&mut socket, [request_frame(Sub::Json, "stuck")]).await;
    eventually(process.server.0, "the request arrived", |text| {
        metric(text, r#"streambridge_messages_received_total{transport="websocket"}"#) == 1.0
    })
    .await;
    process.terminate();
    let mut child = process.child;
    let exit = within("the server exits at the deadline", child.wait()).await.unwrap();
    assert_eq!(exit.code(), Some(1), "a drain cut short exits 1: {exit}");
    drop(socket);
}

/// Starts the binary with `args` and `env`, expecting it to refuse to start;
/// returns its exit code and what it printed on stderr.
async fn refused_start(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_streambridge"))
        .env("STREAMBRIDGE_LISTEN", "127.0.0.1:0") // a flag overrides it
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start streambridge");
    let output = within("the server refuses to start", child.wait_with_output())
        .await
        .unwrap();
    let code = output.status.code().expect("exited, not killed");
    (code, String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_flags_and_files_are_refused_at_start_with_a_message_naming_them() {
    let occupied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let occupied = occupied.local_addr().unwrap().to_string();
    let empty_file = std::env::temp_dir().join(format!("streambridge-empty-token-{}", std::process::id()));
    std::fs::write(&empty_file, "\n").unwrap();
    let empty_file = empty_file.to_str().unwrap().to_string();
    /// Arguments, environment, and the words stderr must contain.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (vec!["--auth-token", ""], vec![], vec!["--auth-token", "empty"]),
        (
            vec![],
            vec![("STREAMBRIDGE_AUTH_TOKEN", "")],
            vec!["--auth-token", "empty"],
        ),
        (vec!["--auth-token", "two words"], vec![], vec!["--auth-token", "' '"]),
        (
            vec!["--auth-token-file", &empty_file],
            vec![],
            vec!["--auth-token-file", "empty"],
        ),
        (
            vec!["--auth-token-file", "/nonexistent/token"],
            vec![],
            vec!["--auth-token-file /nonexistent/token"],
        ),
        (
            vec!["--jwt-jwks", "/nonexistent/jwks.json"],
            vec![],
            vec!["--jwt-jwks /nonexistent/jwks.json"],
        ),
        (vec!["--jwt-issuer", "https://x.test"], vec![], vec!["--jwt-jwks"]),
        (
            vec!["--jwt-jwks", "/nonexistent/jwks.json", "--jwt-claim-header", "sub"],
            vec![],
            vec!["--jwt-claim-header", "CLAIM=HEADER"],
        ),
        (vec!["--ws-ping-interval", "0"], vec![], vec!["--ws-ping-interval"]),
        (vec!["--ws-ping-interval", "0ms"], vec![], vec!["--ws-ping-interval"]),
        (vec!["--drain-timeout", "0s"], vec![], vec!["--drain-timeout"]),
        (vec!["--max-connections", "0"], vec![], vec!["--max-connections"]),
        (
            vec!["--http2-max-concurrent-streams", "0"],
            vec![],
            vec!["--http2-max-concurrent-streams"],
        ),
        (vec!["--ws-request-queue", "0"], vec![], vec!["--ws-request-queue"]),
        (vec!["--max-message-size", "0"], vec![], vec!["--max-message-size"]),
        (
            vec!["--connection-message-buffer", "1000"],
            vec![],
            vec!["--connection-message-buffer", "--max-message-size"],
        ),
        (
            vec![
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                "/nonexistent/key.pem",
            ],
            vec![],
            vec!["--tls-cert", "/nonexistent/cert.pem"],
        ),
        (vec!["--listen", &occupied], vec![], vec!["--listen", "cannot listen"]),
        (vec!["--upstream", "not a url"], vec![], vec!["--upstream", "not a URL"]),
        (
            vec!["--upstream", "ftp://127.0.0.1:9"],
            vec![],
            vec!["--upstream", "unknown scheme"],
        ),
        (
            vec!["--upstream", "127.0.0.1:9"],
            vec![],
            vec!["--upstream", "no scheme"],
        ),
        (
            vec!["--upstream", "http://127.0.0.1:9/api"],
            vec![],
            vec!["--upstream", "no path"],
        ),
        (
            vec![],
            vec![("STREAMBRIDGE_UPSTREAM", "grpc://x:1")],
            vec!["--upstream", "unknown scheme"],
        ),
        (
            vec![
                "--upstream",
                "http://127.0.0.1:9",
                "--upstream-ca",
                "/nonexistent/ca.pem",
            ],
            vec![],
            vec!["--upstream-ca", "https://"],
        ),
        (
            vec![
                "--upstream",
                "https://127.0.0.1:9",
                "--upstream-ca",
                "/nonexistent/ca.pem",
            ],
            vec![],
            vec!["--upstream-ca /nonexistent/ca.pem"],
        ),
    ];
    for (args, env, expected) in cases {
        let (code, stderr) = refused_start(&args, &env).await;
        assert_ne!(code, 0, "{args:?} {env:?} must not start");
        for words in expected {
            assert!(stderr.contains(words), "{args:?} {env:?}: {words:?} not in: {stderr}");
        }
    }
    std::fs::remove_file(&empty_file).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reads_the_policy_file_again() {
    let path = std::env::temp_dir().join(format!("streambridge-policy-{}-sighup.toml", std::process::id()));
    let rule = |allow: &str| format!("[[rules]]\nmethods = [\"/DataService/*\"]\nallow = \"{allow}\"\n");
    std::fs::write(&path, rule("anyone")).unwrap();
    let process = ServerProcess::start(&["--auth-token", "sighup-token", "--policy", path.to_str().unwrap()]).await;
    let call = |server: support::TestAddr| async move {
        let mut client = server.grpc_client().await;
        let requests = tokio_stream::iter([StreamRequest { data: "h".into() }]);
        let mut replies = client.bidirectional_stream(requests).await?.into_inner();
        replies.next().await.transpose().map(drop)
    };
    within("anyone may call", call(support::TestAddr(process.server.0)))
        .await
        .unwrap();
    std::fs::write(&path, rule("authenticated")).unwrap();
    process.hangup();
    // The signal is handled on the server's own time: ask until it shows.
    let status = within("the new rule holds", async {
        loop {
            if let Err(status) = call(support::TestAddr(process.server.0)).await {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    std::fs::remove_file(path).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_are_json_lines_with_log_format_json_and_never_carry_colour_codes_off_a_terminal() {
    for (format, json) in [("text", false), ("json", true)] {
        // Not through `ServerProcess`, which sets NO_COLOR: here only the
        // absence of a terminal may turn colours off.
        let mut child = Command::new(env!("CARGO_BIN_EXE_streambridge"))
            .args(["--listen", "127.0.0.1:0", "--log-format", format])
            .env_remove("NO_COLOR")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = within("the first log line", lines.next_line())
            .await
            .unwrap()
            .expect("a line");
        assert!(!line.contains('\u{1b}'), "{format}: colour codes in a pipe: {line:?}");
        assert!(line.contains("listening on"), "{format}: {line}");
        let parsed = serde_json::from_str::<serde_json::Value>(&line);
        assert_eq!(parsed.is_ok(), json, "{format}: {line}");
        if json {
            let fields = &parsed.unwrap()["fields"];
            assert!(fields["message"].as_str().unwrap().contains("listening on"), "{line}");
        }
    }
}
