//! Starts a real streambridge server on 127.0.0.1:0 for a test, and the
//! clients the tests talk to it with.

#![allow(dead_code)] // each test file uses a different part of this module

pub mod http;
pub mod http_session;
pub mod process;
pub mod tls;
pub mod upstream;
pub mod webtransport;
pub mod ws;
pub mod ws2;

use std::net::SocketAddr;
use std::time::Duration;

use streambridge::grpc::DataServiceClient;
use streambridge::{ActiveCalls, Config, Server};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Generous bound on how long a single step of a test may take before the
/// test fails instead of hanging. Not a synchronisation device: tests wait for
/// events, this only turns a hang into a failure.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// The address of a server started some other way (another process).
pub struct TestAddr(pub SocketAddr);

/// Where the clients of `support` connect.
pub trait ServerAddr {
    fn addr(&self) -> SocketAddr;

    fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr())
    }

    /// A fresh HTTP/2 connection.
    #[allow(async_fn_in_trait)]
    async fn grpc_channel(&self) -> Channel {
        Channel::from_shared(self.http_url(""))
            .unwrap()
            .connect()
            .await
            .expect("connect gRPC")
    }

    /// A tonic client on a fresh HTTP/2 connection.
    #[allow(async_fn_in_trait)]
    async fn grpc_client(&self) -> DataServiceClient<Channel> {
        DataServiceClient::new(self.grpc_channel().await)
    }
}

impl ServerAddr for TestAddr {
    fn addr(&self) -> SocketAddr {
        self.0
    }
}

impl ServerAddr for TestServer {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A server running in this test's runtime; shut down when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The UDP address of `--webtransport-listen`, when it is on.
    pub webtransport: Option<SocketAddr>,
    pub calls: ActiveCalls,
    shutdown: CancellationToken,
}

impl TestServer {
    /// A server with the default configuration.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// A server whose default configuration `adjust` changed first.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_built(adjust, |builder| builder).await
    }

    /// A server made by `build` (which adds services to the builder), its
    /// default configuration changed by `adjust` first.
    pub async fn start_built(
        adjust: impl FnOnce(&mut Config),
        build: impl FnOnce(streambridge::ServerBuilder) -> streambridge::ServerBuilder,
    ) -> TestServer {
        let mut config = Config::with_listen("127.0.0.1:0".parse().unwrap());
        config.static_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/static").into();
        adjust(&mut config);
        let server = build(Server::builder(config)).bind().await.expect("bind 127.0.0.1:0");
        let addr = server.local_addr().unwrap();
        let webtransport = server.webtransport_addr();
        let calls = server.active_calls();
        let shutdown = server.shutdown_token();
        tokio::spawn(server.run());
        TestServer {
            addr,
            webtransport,
            calls,
            shutdown,
        }
    }
}

impl TestServer {
    /// Starts the graceful shutdown (as SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Awaits `future`, failing the test if it takes longer than [`STEP_TIMEOUT`].
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP_TIMEOUT:?}: {what}"))
}

/// The server's `/metrics` text, fetched over a fresh connection.
pub async fn metrics_text(addr: std::net::SocketAddr) -> String {
    let request = ::http::Request::get(format!("http://{addr}/metrics"))
        .body(http_body_util::Full::default())
        .unwrap();
    let reply = http::send(&http::http1_client(), request).await;
    assert_eq!(reply.status, 200);
    reply.text()
}

/// The value of one sample (`name{labels}`) in a metrics text; 0 if absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The Python with grpcio: `STREAMBRIDGE_PYTHON`, or the virtualenv that
/// `cargo xtask test` provisions; without either the test fails and says how
/// to get one (it never silently skips).
pub fn python() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("STREAMBRIDGE_PYTHON") {
        return std::path::PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let venv_python = target.join("python-venv/bin/python");
    assert!(
        venv_python.exists(),
        "no Python with grpcio: run `cargo xtask test` (it provisions {}) or set STREAMBRIDGE_PYTHON",
        venv_python.display()
    );
    venv_python
}
