//! Deployment behind a load balancer (docs/deploy.md): two streambridge
//! instances behind `deploy/nginx.conf` and behind `deploy/haproxy.cfg`, each
//! file run as shipped with only addresses and paths replaced. Every
//! transport goes through TLS on the balancer's one port; then a rolling
//! restart while clients stream: nothing sent may be lost silently.
//!
//! Needs nginx and haproxy: `cargo xtask test-deploy` installs them (Debian
//! packages) and runs these with `--ignored`.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use streambridge::grpc::DataServiceClient;
use streambridge_protocol::StreamRequest;
use support::http::{decode_grpc_web, grpc_web_body};
use support::process::ServerProcess;
use support::within;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Nginx,
    Haproxy,
}

/// A CA and a certificate for `localhost` and 127.0.0.1, as files.
struct Pki {
    ca: String,
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: with rcgen's default for both, BoringSSL (grpcio)
        // takes the leaf for self-signed.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "streambridge deploy test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer).unwrap();
        let dir = std::env::temp_dir().join(format!("streambridge-deploy-{name}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("tls")).unwrap();
        std::fs::write(dir.join("tls/ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("tls/cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls/key.pem"), key.serialize_pem()).unwrap();
        // HAProxy takes the certificate and its key in one file.
        std::fs::write(dir.join("tls/haproxy.pem"), cert.pem() + &key.serialize_pem()).unwrap();
        Pki { ca: ca.pem(), dir }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on now (the balancers cannot report one they chose).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shipped config with this test's addresses and paths.
fn balancer_config(kind: Kind, port: u16, instances: [SocketAddr; 2], pki: &Pki) -> String {
    let dir = pki.dir.display().to_string();
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(match kind {
        Kind::Nginx => "deploy/nginx.conf",
        Kind::Haproxy => "deploy/haproxy.cfg",
    }))
    .unwrap();
    let replaced = shipped
        .replace("127.0.0.1:8081", &instances[0].to_string())
        .replace("127.0.0.1:8082", &instances[1].to_string())
        .replace("/etc/streambridge/", &format!("{dir}/"));
    let lines: Vec<String> = replaced
        .lines()
        // IPv6 listeners: this machine's loopback may have no ::1.
        .filter(|line| !line.contains("[::]:443") && !line.contains(":::443"))
        .map(|line| match kind {
            Kind::Nginx => line
                .replace("listen 443 ssl", &format!("listen 127.0.0.1:{port} ssl"))
                .replace("/run/streambridge-nginx.pid", &format!("{dir}/nginx.pid"))
                .replace("/var/log/nginx/", &format!("{dir}/")),
            Kind::Haproxy => line.replace("bind :443 ", &format!("bind 127.0.0.1:{port} ")),
        })
        .collect();
    let config = lines.join("\n") + "\n";
    assert!(
        config.contains(&port.to_string()),
        "the listen line moved in the shipped {kind:?} config"
    );
    config
}

/// A balancer process in front of `instances`, ready once `/healthz` answers through it.
struct Balancer {
    _child: Child,
    port: u16,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // SIGTERM to the master: it stops its workers too (a SIGKILL would
        // leave them running, holding the port).
        if let Some(pid) = self._child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            // Until it has exited: dropping the child kills it outright.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !matches!(self._child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Balancer {
    async fn start(kind: Kind, instances: [SocketAddr; 2], pki: &Pki) -> Balancer {
        let port = free_port();
        let config = pki.dir.join(match kind {
            Kind::Nginx => "nginx.conf",
            Kind::Haproxy => "haproxy.cfg",
        });
        std::fs::write(&config, balancer_config(kind, port, instances, pki)).unwrap();
        let mut command = match kind {
            Kind::Nginx => {
                let mut command = Command::new(std::env::var("NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into()));
                command.arg("-c").arg(&config).args(["-g", "daemon off;"]);
                command
            }
            Kind::Haproxy => {
                let mut command = Command::new(std::env::var("HAPROXY").unwrap_or_else(|_| "/usr/sbin/haproxy".into()));
                command.arg("-f").arg(&config).arg("-db");
                command
            }
        };
        let child = command
            .stdin(Stdio::null())
            // HAProxy logs every request to stdout; its alerts go to stderr.
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {kind:?}: {e} (cargo xtask test-deploy installs it)"));
        let balancer = Balancer { _child: child, port };
        within(&format!("{kind:?} serves /healthz"), async {
            // The balancer is another process with nothing to subscribe to:
            // ask until it answers (each attempt is a real request).
            loop {
                if let Ok((200, _)) = balancer.try_get(pki, "/healthz").await {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        balancer
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    async fn tls(&self, pki: &Pki, alpn: &[&[u8]]) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr()).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        support::tls::connector(&pki.ca, alpn).connect(name, tcp).await
    }

    /// One HTTP/1.1 request over TLS; the status and the body.
    async fn request(&self, pki: &Pki, request: http::Request<Full<Bytes>>) -> std::io::Result<(u16, Bytes)> {
        let tls = self.tls(pki, &[b"http/1.1"]).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(std::io::Error::other)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok((status, body))
    }

    async fn try_get(&self, pki: &Pki, path: &str) -> std::io::Result<(u16, Bytes)> {
        let request = http::Request::get(path)
            .header("host", format!("localhost:{}", self.port))
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.request(pki, request).await
    }

    /// A WebSocket over TLS offering `subprotocol`, as a browser page of the
    /// balancer's own origin opens it.
    async fn websocket(
        &self,
        pki: &Pki,
        subprotocol: &str,
    ) -> std::io::Result<tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>> {
        let tls = self.tls(pki, &[b"http/1.1"]).await?;
        let mut request = format!("wss://localhost:{}/ws", self.port)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", subprotocol.parse().unwrap());
        request
            .headers_mut()
            .insert("origin", format!("https://localhost:{}", self.port).parse().unwrap());
        let (socket, _) = tokio_tungstenite::client_async(request, tls)
            .await
            .map_err(std::io::Error::other)?;
        Ok(socket)
    }

    async fn grpc_channel(&self, pki: &Pki) -> Channel {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca))
            .domain_name("localhost");
        Channel::from_shared(format!("https://127.0.0.1:{}", self.port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("a TLS gRPC connection through the balancer")
    }
}

/// Instance `i`'s flags: `args`, and the route its HTTP sessions' ids
/// start with, which the shipped configs send their POSTs by (`s1`, `s2`).
fn instance_args<'a>(i: usize, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.extend(["--http-session-route", ["s1", "s2"][i]]);
    all
}

/// Two instances on ports of their own.
async fn instances(args: &[&str]) -> [ServerProcess; 2] {
    [
        ServerProcess::start(&instance_args(0, args)).await,
        ServerProcess::start(&instance_args(1, args)).await,
    ]
}

async fn every_transport(kind: Kind) {
    let pki = Pki::new(&format!("{kind:?}-transports"));
    let servers = instances(&[]).await;
    let balancer = Balancer::start(kind, [servers[0].server.0, servers[1].server.0], &pki).await;

    // The page and its package.
    let (status, page) = balancer.try_get(&pki, "/").await.unwrap();
    assert_eq!(status, 200, "{kind:?}: the page");
    assert!(String::from_utf8_lossy(&page).contains("<title>streambridge</title>"));
    let (status, _) = balancer.try_get(&pki, "/app.js").await.unwrap();
    assert_eq!(status, 200, "{kind:?}: the page's script");

    // Native gRPC over TLS (ALPN h2), tonic: several streams, spread over both instances.
    let channel = balancer.grpc_channel(&pki).await;
    for round in 0..4 {
        let mut client = DataServiceClient::new(channel.clone());
        let requests = (0..3).map(move |i| StreamRequest {
            data: format!("{round}-{i}"),
        });
        let replies: Vec<String> = within(
            "native gRPC through the balancer",
            client.bidirectional_stream(tokio_stream::iter(requests)),
        )
        .await
        .unwrap()
        .into_inner()
        .map(|reply| reply.unwrap().result)
        .collect()
        .await;
        assert_eq!(
            replies,
            (0..3).map(|i| format!("processed: {round}-{i}")).collect::<Vec<_>>(),
            "{kind:?}"
        );
    }

    // grpcio (Python) over TLS: a client nobody here wrote.
    let output = std::process::Command::new(support::python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/grpcio_client.py"))
        .arg(format!("localhost:{}", balancer.port))
        .env("GRPC_ROOT_CERT", pki.dir.join("tls/ca.pem"))
        .output()
        .expect("run the grpcio client");
    assert!(
        output.status.success(),
        "{kind:?}: grpcio through the balancer: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // gRPC-Web over HTTP/1.1 (binary).
    let request = http::Request::post("/DataService/BidirectionalStream")
        .header("host", format!("localhost:{}", balancer.port))
        .header("content-type", "application/grpc-web+proto")
        .header("origin", format!("https://localhost:{}", balancer.port))
        .body(Full::new(grpc_web_body(&["web"])))
        .unwrap();
    let (status, body) = balancer.request(&pki, request).await.unwrap();
    assert_eq!(status, 200, "{kind:?}: gRPC-Web");
    let result = decode_grpc_web(body);
    assert_eq!(result.replies, vec!["processed: web".to_string()], "{kind:?}");
    assert_eq!(result.trailer("grpc-status"), Some("0"), "{kind:?}");

    // WebSocket v1 (json) and v2 (json) over TLS.
    let mut v1 = balancer.websocket(&pki, "streambridge.v1.json").await.unwrap();
    v1.send(Message::text(r#"{"request":{"data":"v1"}}"#)).await.unwrap();
    v1.send(Message::text(r#"{"closeSend":{}}"#)).await.unwrap();
    let mut frames = Vec::new();
    while let Some(Ok(Message::Text(text))) = within("v1 frames", v1.next()).await {
        frames.push(text.to_string());
    }
    assert_eq!(
        frames,
        vec![r#"{"response":{"result":"processed: v1"}}"#, r#"{"status":{"code":0}}"#],
        "{kind:?}: WebSocket v1"
    );
    let mut v2 = balancer.websocket(&pki, "streambridge.v2.json").await.unwrap();
    v2.send(Message::text(
        r#"[{"call":1,"open":{"method":"/DataService/BidirectionalStream"}},{"call":1,"message":{"data":"v2"}},{"call":1,"closeSend":{}}]"#,
    ))
    .await
    .unwrap();
    let mut records = Vec::new();
    while !records.iter().any(|r: &serde_json::Value| r.get("status").is_some()) {
        let Some(Ok(Message::Text(text))) = within("v2 batches", v2.next()).await else {
            panic!("{kind:?}: the v2 socket ended early");
        };
        records.extend(serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap());
    }
    // Credit grants (`window`) come and go with the server's policy: the
    // replies and the status are what the call must show.
    records.retain(|r| r.get("window").is_none());
    assert_eq!(
        serde_json::Value::Array(records),
        serde_json::json!([{"call":1,"message":{"result":"processed: v2"}},{"call":1,"status":{"code":0}}]),
        "{kind:?}: WebSocket v2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx: cargo xtask test-deploy"]
async fn nginx_carries_every_transport() {
    every_transport(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs haproxy: cargo xtask test-deploy"]
async fn haproxy_carries_every_transport() {
    every_transport(Kind::Haproxy).await;
}

/// What one streaming client saw over a rolling restart.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    replied: AtomicU64,
    /// Calls that ended with a non-OK status (each with its one request in
    /// flight, if any, accounted for here).
    cut: AtomicU64,
    /// Requests in flight when their call was cut.
    unanswered: AtomicU64,
    /// Requests whose socket ended with neither a reply nor a status: lost
    /// silently. Must stay 0.
    lost: AtomicU64,
    /// The longest time from losing a call to the next reply, in ms.
    gap_ms: AtomicU64,
    /// Told of every reply (shared by all clients).
    advanced: Arc<tokio::sync::Notify>,
}

impl Tally {
    fn replied(&self) {
        self.replied.fetch_add(1, Ordering::Relaxed);
        self.advanced.notify_waiters();
    }

    fn gap(&self, since: Instant) {
        self.gap_ms
            .fetch_max(since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// A WebSocket v2 client that ping-pongs on one call and, when its call is
/// cut or its socket drained or dropped, opens a new socket and a new call.
async fn v2_client(balancer: Arc<Balancer>, pki: Arc<Pki>, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut seq = 0u64;
    let mut lost_at: Option<Instant> = None;
    'sockets: while !stop.load(Ordering::Relaxed) {
        let Ok(mut socket) = balancer.websocket(&pki, "streambridge.v2.json").await else {
            lost_at.get_or_insert_with(Instant::now);
            tokio::task::yield_now().await;
            continue;
        };
        let mut call = 0u32;
        // Set by `goaway`: new calls go to a new socket.
        let mut drained = false;
        'calls: loop {
            call += 1;
            // Whether the server has sent anything for this call (it started it).
            let mut started = false;
            // A window as large as the protocol allows: this client reads every reply at once.
            let open = format!(
                r#"[{{"call":{call},"open":{{"method":"/DataService/BidirectionalStream","window":{}}}}}]"#,
                u32::MAX
            );
            if socket.send(Message::text(open)).await.is_err() {
                continue 'sockets;
            }
            loop {
                if stop.load(Ordering::Relaxed) {
                    let close = format!(r#"[{{"call":{call},"closeSend":{{}}}}]"#);
                    let _ = socket.send(Message::text(close)).await;
                    return;
                }
                seq += 1;
                let message = format!(r#"[{{"call":{call},"message":{{"data":"{seq}"}}}}]"#);
                if socket.send(Message::text(message)).await.is_err() {
                    // Not sent: nothing to account for.
                    seq -= 1;
                    continue 'sockets;
                }
                tally.sent.fetch_add(1, Ordering::Relaxed);
                // The reply, or the call's status, or the socket's end.
                loop {
                    let text = match within("a v2 reply", socket.next()).await {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(_)) => continue,
                        _ if !started => {
                            // The socket closed before the server started this
                            // call: an `open` that crossed the server's goaway
                            // (docs/protocol-v2.md, "Drain"). Never
                            // processed, so retried; the application sees 14.
                            tally.unanswered.fetch_add(1, Ordering::Relaxed);
                            tally.cut.fetch_add(1, Ordering::Relaxed);
                            lost_at.get_or_insert_with(Instant::now);
                            continue 'sockets;
                        }
                        _ => {
                            // The socket ended with the request of a started
                            // call unanswered: the server ends every live call
                            // with a status first, so only a bug gets here.
                            tally.lost.fetch_add(1, Ordering::Relaxed);
                            lost_at.get_or_insert_with(Instant::now);
                            continue 'sockets;
                        }
                    };
                    let records: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
                    let mut replied = false;
                    for record in records {
                        if record["call"] == call {
                            started = true;
                        }
                        if record.get("goaway").is_some() {
                            drained = true;
                        } else if record["call"] == call && record.get("message").is_some() {
                            assert_eq!(record["message"]["result"], format!("processed: {seq}"));
                            replied = true;
                        } else if record["call"] == call && record.get("status").is_some() {
                            let code = record["status"]["code"].as_i64().unwrap_or(0);
                            assert_ne!(code, 0, "a status 0 before closeSend");
                            tally.cut.fetch_add(1, Ordering::Relaxed);
                            tally.unanswered.fetch_add(1, Ordering::Relaxed);
                            lost_at.get_or_insert_with(Instant::now);
                            // A new call: on a new socket if this one drains.
                            if drained {
                                continue 'sockets;
                            }
                            continue 'calls;
                        }
                    }
                    if replied {
                        tally.replied();
                        if let Some(since) = lost_at.take() {
                            tally.gap(since);
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// A native gRPC client (tonic, TLS) that ping-pongs on one stream and opens
/// a new one when a stream is cut.
async fn grpc_client(channel: Channel, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut seq = 0u64;
    let mut lost_at: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        // The first request goes in before the call is made, as grpcio and
        // grpc-go send it: nginx opens the upstream stream only once it has
        // a request message (docs/deploy.md), so a client that waits for the
        // response headers first would wait forever.
        let (tx, rx) = tokio::sync::mpsc::channel::<StreamRequest>(1);
        seq += 1;
        tx.send(StreamRequest { data: seq.to_string() }).await.unwrap();
        tally.sent.fetch_add(1, Ordering::Relaxed);
        let mut client = DataServiceClient::new(channel.clone());
        let call = client.bidirectional_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut replies = match within("a gRPC call starts", call).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                assert_ne!(status.code(), tonic::Code::Ok);
                tally.cut.fetch_add(1, Ordering::Relaxed);
                tally.unanswered.fetch_add(1, Ordering::Relaxed);
                lost_at.get_or_insert_with(Instant::now);
                continue;
            }
        };
        loop {
            // The reply to the one request in flight, or the stream's status.
            match within("a gRPC reply", replies.next()).await {
                Some(Ok(reply)) => {
                    assert_eq!(reply.result, format!("processed: {seq}"));
                    tally.replied();
                    if let Some(since) = lost_at.take() {
                        tally.gap(since);
                    }
                }
                Some(Err(status)) => {
                    assert_ne!(status.code(), tonic::Code::Ok);
                    tally.cut.fetch_add(1, Ordering::Relaxed);
                    tally.unanswered.fetch_add(1, Ordering::Relaxed);
                    lost_at.get_or_insert_with(Instant::now);
                    break;
                }
                None => panic!("a stream ended without a status while a request was unanswered"),
            }
            if stop.load(Ordering::Relaxed) {
                drop(tx);
                while let Some(Ok(_)) = replies.next().await {}
                return;
            }
            seq += 1;
            if tx.send(StreamRequest { data: seq.to_string() }).await.is_err() {
                // The call is over (its status comes next, with no request of ours in flight).
                seq -= 1;
                break;
            }
            tally.sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The WASM client in headless Chromium (tests/e2e/deploy-clients.mjs), as a
/// child process: it prints `ready` once every client has a reply, then runs
/// until it reads `stop` and prints its tallies as JSON.
struct BrowserClients {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl BrowserClients {
    async fn start(balancer: &Balancer, pki: &Pki, clients: usize, http_clients: usize) -> BrowserClients {
        let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
        let mut child = Command::new("node")
            .arg("deploy-clients.mjs")
            .current_dir(&e2e)
            .env("STREAMBRIDGE_BASE_URL", format!("https://localhost:{}", balancer.port))
            .env("STREAMBRIDGE_CLIENTS", clients.to_string())
            .env("STREAMBRIDGE_HTTP_CLIENTS", http_clients.to_string())
            .env("STREAMBRIDGE_CA_SPKI", spki_hash(pki))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node (cargo xtask test-deploy installs the e2e packages)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        within("the browser clients are ready", async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line == "ready" {
                    return;
                }
                eprintln!("browser: {line}");
            }
            panic!("the browser clients exited before they were ready");
        })
        .await;
        BrowserClients { child, lines }
    }

    /// After the restarts: waits until every browser client has replies again.
    async fn progressed(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"mark\n").await.unwrap();
        within("the browser clients get replies after the restarts", async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if line == "progressed" {
                    return;
                }
                eprintln!("browser: {line}");
            }
            panic!("the browser clients exited");
        })
        .await;
    }

    async fn stop(mut self) -> serde_json::Value {
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(b"stop\n").await.unwrap();
        within("the browser clients report", async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if let Ok(report) = serde_json::from_str::<serde_json::Value>(&line) {
                    return report;
                }
                eprintln!("browser: {line}");
            }
            panic!("the browser clients exited without a report");
        })
        .await
    }
}

/// Chromium trusts the test CA through `--ignore-certificate-errors-spki-list`:
/// the base64 SHA-256 of the server certificate's public key.
fn spki_hash(pki: &Pki) -> String {
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
            pki.dir.join("tls/cert.pem").display()
        ))
        .output()
        .expect("openssl");
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

async fn rolling_restart(kind: Kind) {
    const DRAIN: &str = "10s";
    let pki = Arc::new(Pki::new(&format!("{kind:?}-rolling")));
    let mut servers = instances(&["--drain-timeout", DRAIN]).await;
    let addrs = [servers[0].server.0, servers[1].server.0];
    let balancer = Arc::new(Balancer::start(kind, addrs, &pki).await);
    // Ten on WebSockets, five on the HTTP fallback (`transports: ['http']`).
    let mut browser = BrowserClients::start(&balancer, &pki, 10, 5).await;

    let stop = Arc::new(AtomicBool::new(false));
    let advanced = Arc::new(tokio::sync::Notify::new());
    let tally = || {
        Arc::new(Tally {
            advanced: advanced.clone(),
            ..Tally::default()
        })
    };
    let v2: Vec<Arc<Tally>> = (0..10).map(|_| tally()).collect();
    let grpc: Vec<Arc<Tally>> = (0..4).map(|_| tally()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for tally in &v2 {
        tasks.spawn(v2_client(balancer.clone(), pki.clone(), tally.clone(), stop.clone()));
    }
    let channel = balancer.grpc_channel(&pki).await;
    for tally in &grpc {
        tasks.spawn(grpc_client(channel.clone(), tally.clone(), stop.clone()));
    }
    let all: Vec<Arc<Tally>> = v2.iter().chain(&grpc).cloned().collect();
    // Clients announce every reply on `advanced`: the test waits for
    // progress without polling.
    let progress = |at_least: Vec<u64>| {
        let all = all.clone();
        let advanced = advanced.clone();
        async move {
            let behind = || {
                all.iter()
                    .zip(&at_least)
                    .any(|(tally, &n)| tally.replied.load(Ordering::Relaxed) < n)
            };
            let waited = tokio::time::timeout(support::STEP_TIMEOUT, async {
                loop {
                    let notified = advanced.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if !behind() {
                        return;
                    }
                    notified.await;
                }
            })
            .await;
            if waited.is_err() {
                let replied: Vec<u64> = all.iter().map(|t| t.replied.load(Ordering::Relaxed)).collect();
                panic!("{kind:?}: clients stopped getting replies: replied {replied:?}, wanted {at_least:?}");
            }
        }
    };
    let replied = || {
        all.iter()
            .map(|t| t.replied.load(Ordering::Relaxed) + 20)
            .collect::<Vec<_>>()
    };
    progress(vec![20; all.len()]).await;

    // Restart each instance in turn: SIGTERM, wait for its exit, start it
    // again on its port; the clients must carry on by themselves.
    let mut exits = Vec::new();
    for i in 0..2 {
        let started = Instant::now();
        servers[i].terminate();
        let status = within("the instance exits", servers[i].child.wait()).await.unwrap();
        exits.push((status.code(), started.elapsed()));
        servers[i] =
            ServerProcess::start_at(&addrs[i].to_string(), &instance_args(i, &["--drain-timeout", DRAIN])).await;
        progress(replied()).await;
    }
    browser.progressed().await;
    stop.store(true, Ordering::Relaxed);
    while let Some(result) = tasks.join_next().await {
        result.expect("a client task");
    }
    let report = browser.stop().await;

    // Nothing lost silently: every request got its reply, or its call a
    // non-OK status (counted as unanswered).
    for (name, tally) in v2.iter().map(|t| ("v2", t)).chain(grpc.iter().map(|t| ("grpc", t))) {
        let (sent, replied, unanswered, lost) = (
            tally.sent.load(Ordering::Relaxed),
            tally.replied.load(Ordering::Relaxed),
            tally.unanswered.load(Ordering::Relaxed),
            tally.lost.load(Ordering::Relaxed),
        );
        assert_eq!(lost, 0, "{kind:?} {name}: requests lost with their socket, no status");
        assert_eq!(
            sent,
            replied + unanswered,
            "{kind:?} {name}: sent {sent}, replied {replied}, cut {unanswered}"
        );
    }
    let clients = report["clients"].as_array().expect("browser clients");
    let over = |transport: &str| clients.iter().filter(|c| c["transport"] == transport).count();
    assert_eq!((over("websocket"), over("http")), (10, 5), "{kind:?}: {clients:?}");
    for client in clients {
        let sent = client["sent"].as_u64().unwrap();
        let replied = client["replied"].as_u64().unwrap();
        let unanswered = client["unanswered"].as_u64().unwrap();
        assert_eq!(sent, replied + unanswered, "{kind:?} browser client: {client}");
        assert!(
            client["repliedAfterRestart"].as_u64().unwrap() > 0,
            "{kind:?}: {client}"
        );
        // Only a restart cuts a stream: at each, the live one and perhaps a
        // retry that reached the draining instance first. (An HTTP session
        // whose POSTs reached the wrong instance would be cut at every turn.)
        assert!(
            client["cut"].as_u64().unwrap() <= 3 * 2,
            "{kind:?}: streams cut without a restart to cut them: {client}"
        );
    }
    for (code, took) in &exits {
        assert_eq!(*code, Some(0), "{kind:?}: the instance drained in time");
        assert!(
            *took < Duration::from_secs(10),
            "{kind:?}: exited within --drain-timeout ({took:?})"
        );
    }
    let sum = |tallies: &[Arc<Tally>], f: fn(&Tally) -> u64| tallies.iter().map(|t| f(t)).sum::<u64>();
    let max_gap = |tallies: &[Arc<Tally>]| {
        tallies
            .iter()
            .map(|t| t.gap_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    };
    // The figures docs/deploy.md reports (run with --nocapture to see them).
    eprintln!(
        "rolling restart behind {kind:?}: instances exited in {:?} (codes {:?}); \
         v2 (Rust, 10): {} requests, {} calls cut, longest gap {} ms; \
         gRPC (tonic, 4): {} requests, {} streams cut, longest gap {} ms; \
         browser (WASM client, 10 on WebSockets and 5 on the HTTP fallback): {}",
        exits.iter().map(|(_, t)| *t).collect::<Vec<_>>(),
        exits.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        sum(&v2, |t| t.sent.load(Ordering::Relaxed)),
        sum(&v2, |t| t.cut.load(Ordering::Relaxed)),
        max_gap(&v2),
        sum(&grpc, |t| t.sent.load(Ordering::Relaxed)),
        sum(&grpc, |t| t.cut.load(Ordering::Relaxed)),
        max_gap(&grpc),
        report["summary"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx, node and Chromium: cargo xtask test-deploy"]
async fn a_rolling_restart_behind_nginx_loses_nothing_silently() {
    rolling_restart(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs haproxy, node and Chromium: cargo xtask test-deploy"]
async fn a_rolling_restart_behind_haproxy_loses_nothing_silently() {
    rolling_restart(Kind::Haproxy).await;
}
