//! The servers under test and how to run each on a loopback port.
//!
//! Every server is a child process of the harness (never in-process: its CPU
//! time and memory are read from `/proc/PID`), started with its defaults on a
//! free port of 127.0.0.1, its output sent to `target/bench/logs/`, and
//! killed when the [`RunningServer`] is dropped.

use std::fmt;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKind {
    /// This project's server, release build, default flags.
    Streambridge,
    /// `bench-plain-tonic`: the same DataService in plain tonic, with
    /// streambridge's small codec buffers.
    PlainTonic,
    /// `bench-stock-tonic`: the same in tonic exactly as its code generator
    /// makes it (default 8 KiB codec buffers).
    StockTonic,
    /// The seed's Go server on Debian's grpc-go 1.33.
    GrpcGo,
    /// `bench-naive-ws`: tokio-tungstenite defaults, a flush per reply.
    NaiveWs,
    /// `bench/node/server.js`: Node with the `ws` package.
    NodeWs,
    /// `streambridge --upstream` in front of `bench-plain-tonic`: the
    /// bridge as a gRPC proxy. Its CPU is the proxy's alone.
    StreambridgeProxy,
    /// nginx 1.22 (`grpc_pass`, one worker, no master) in front of
    /// `bench-plain-tonic`: the proxy people already run.
    NginxProxy,
    /// `bench-added-service`: streambridge hosting an embedder's own tonic
    /// echo (`add_service`) instead of the built-in `DataService`.
    StreambridgeAdded,
    /// streambridge with the production edge on: JWTs (a key set the
    /// harness makes), a policy file and call rate limits far above the
    /// load. Its clients send the harness's token (so do the other
    /// streambridge's in the same run: unchecked there, it costs nothing).
    StreambridgeEdge,
    /// `bench-added-service` with the same edge on: the edge on the path
    /// users' services take (WebSocket v2's generic calls, native gRPC).
    StreambridgeAddedEdge,
}

impl ServerKind {
    pub const ALL: [ServerKind; 11] = [
        ServerKind::Streambridge,
        ServerKind::PlainTonic,
        ServerKind::StockTonic,
        ServerKind::GrpcGo,
        ServerKind::NaiveWs,
        ServerKind::NodeWs,
        ServerKind::StreambridgeProxy,
        ServerKind::NginxProxy,
        ServerKind::StreambridgeAdded,
        ServerKind::StreambridgeEdge,
        ServerKind::StreambridgeAddedEdge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Streambridge => "streambridge",
            ServerKind::PlainTonic => "plain-tonic",
            ServerKind::StockTonic => "stock-tonic",
            ServerKind::GrpcGo => "grpc-go",
            ServerKind::NaiveWs => "naive-ws",
            ServerKind::NodeWs => "node-ws",
            ServerKind::StreambridgeProxy => "streambridge-proxy",
            ServerKind::NginxProxy => "nginx-proxy",
            ServerKind::StreambridgeAdded => "streambridge-added",
            ServerKind::StreambridgeEdge => "streambridge-edge",
            ServerKind::StreambridgeAddedEdge => "streambridge-added-edge",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn speaks_grpc(self) -> bool {
        matches!(
            self,
            ServerKind::Streambridge
                | ServerKind::PlainTonic
                | ServerKind::StockTonic
                | ServerKind::GrpcGo
                | ServerKind::StreambridgeAdded
                | ServerKind::StreambridgeEdge
                | ServerKind::StreambridgeAddedEdge
        ) || self.is_proxy()
    }

    /// streambridge with WebSocket protocol v2 to a service that is not the
    /// built-in one (the generic call path users' services take).
    pub fn serves_users_service(self) -> bool {
        matches!(
            self,
            ServerKind::StreambridgeProxy | ServerKind::StreambridgeAdded | ServerKind::StreambridgeAddedEdge
        )
    }

    /// streambridge serving its built-in `DataService` (with or without the edge).
    pub fn is_builtin_streambridge(self) -> bool {
        matches!(self, ServerKind::Streambridge | ServerKind::StreambridgeEdge)
    }

    /// A proxy in front of `bench-plain-tonic` (the "gRPC through a proxy" scenario).
    pub fn is_proxy(self) -> bool {
        matches!(self, ServerKind::StreambridgeProxy | ServerKind::NginxProxy)
    }

    pub fn speaks_websocket(self) -> bool {
        matches!(
            self,
            ServerKind::Streambridge | ServerKind::StreambridgeEdge | ServerKind::NaiveWs | ServerKind::NodeWs
        )
    }
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the server programs are.
#[derive(Clone, Debug)]
pub struct ServerPrograms {
    pub streambridge: PathBuf,
    pub plain_tonic: PathBuf,
    pub stock_tonic: PathBuf,
    pub naive_ws: PathBuf,
    pub added_service: PathBuf,
    pub grpc_go: Option<PathBuf>,
    /// `bench/node`, with its `node_modules` installed.
    pub node_dir: Option<PathBuf>,
    /// The nginx binary (Debian's `nginx-light`).
    pub nginx: Option<PathBuf>,
    pub logs: PathBuf,
    /// The CPU every server is pinned to, if any.
    pub server_cpu: Option<usize>,
    /// The CPU a proxy's backend is pinned to (the load generator's), if any:
    /// it never competes with the proxy being measured.
    pub backend_cpu: Option<usize>,
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set for the kernel to fill;
    // CPU_ISSET only reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|cpu| libc::CPU_ISSET(*cpu, &set))
            .collect())
    }
}

/// Pins the calling process (and the threads it starts later) to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it,
    // and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl ServerPrograms {
    fn command(&self, kind: ServerKind, listen: SocketAddr, backend: Option<SocketAddr>) -> Result<Command, String> {
        let listen_addr = listen;
        let listen = listen.to_string();
        let mut command = match kind {
            ServerKind::StreambridgeProxy => {
                let backend = backend.ok_or("a proxy needs its backend")?;
                // The backend has no reflection: WebSocket v2 JSON calls need
                // `DataService`'s descriptors from a file.
                let descriptors = self.logs.join("data_service.desc");
                std::fs::write(&descriptors, streambridge::grpc::FILE_DESCRIPTOR_SET)
                    .map_err(|e| format!("{}: {e}", descriptors.display()))?;
                let mut c = Command::new(&self.streambridge);
                c.env("RUST_LOG", "warn")
                    .args(["--upstream", &format!("http://{backend}")])
                    .arg("--descriptor-set")
                    .arg(descriptors);
                c
            }
            ServerKind::NginxProxy => {
                let program = self
                    .nginx
                    .as_ref()
                    .ok_or("nginx not installed (apt-get install nginx-light)")?;
                let backend = backend.ok_or("a proxy needs its backend")?;
                let conf = self.write_nginx_conf(listen_addr, backend)?;
                let mut c = Command::new(program);
                c.arg("-c").arg(conf).arg("-p").arg(&self.logs);
                return Ok(c);
            }
            ServerKind::Streambridge => {
                let mut c = Command::new(&self.streambridge);
                c.env("RUST_LOG", "warn");
                c
            }
            ServerKind::StreambridgeAdded => {
                let mut c = Command::new(&self.added_service);
                c.env("RUST_LOG", "warn");
                c
            }
            ServerKind::StreambridgeEdge | ServerKind::StreambridgeAddedEdge => {
                let edge = edge::files(&self.logs)?;
                let program = match kind {
                    ServerKind::StreambridgeEdge => &self.streambridge,
                    _ => &self.added_service,
                };
                let mut c = Command::new(program);
                c.env("RUST_LOG", "warn")
                    .arg("--jwt-jwks")
                    .arg(&edge.jwks)
                    .args(["--jwt-audience", edge::AUDIENCE, "--jwt-claim-header", "sub=x-user-id"])
                    .arg("--policy")
                    .arg(&edge.policy)
                    .args(["--limit-calls-per-second", "1000000"])
                    .args(["--limit-messages-per-second", "100000000"]);
                c
            }
            ServerKind::PlainTonic => Command::new(&self.plain_tonic),
            ServerKind::StockTonic => Command::new(&self.stock_tonic),
            ServerKind::NaiveWs => Command::new(&self.naive_ws),
            ServerKind::GrpcGo => {
                let program = self.grpc_go.as_ref().ok_or("grpc-go server not built")?;
                let mut c = Command::new(program);
                // As many threads as the tokio servers get: the cores it may use.
                let cores = match self.server_cpu {
                    Some(_) => 1,
                    None => std::thread::available_parallelism().map_or(2, |n| n.get()),
                };
                c.env("GOMAXPROCS", cores.to_string());
                c
            }
            ServerKind::NodeWs => {
                let dir = self.node_dir.as_ref().ok_or("Node server not installed")?;
                let mut c = Command::new("node");
                c.arg(dir.join("server.js")).arg(&listen);
                return Ok(c);
            }
        };
        command.args(["--listen", &listen]);
        Ok(command)
    }

    /// nginx's configuration for the proxy scenario: one process (no
    /// master, one worker), h2c in, `grpc_pass` out over kept-alive
    /// connections, no access log, timeouts far past any run, and no limit
    /// on a call's total request bytes (nginx's default of 1 MiB resets a
    /// long stream once its messages add up to it).
    fn write_nginx_conf(&self, listen: SocketAddr, backend: SocketAddr) -> Result<PathBuf, String> {
        let logs = self.logs.display();
        let conf = format!(
            "master_process off;\ndaemon off;\nworker_processes 1;\npid {logs}/nginx.pid;\n\
             error_log {logs}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_max_body_size 0;\n  client_body_temp_path {logs}/nginx-tmp;\n\
               proxy_temp_path {logs}/nginx-tmp;\n  fastcgi_temp_path {logs}/nginx-tmp;\n\
               uwsgi_temp_path {logs}/nginx-tmp;\n  scgi_temp_path {logs}/nginx-tmp;\n\
               upstream echo {{ server {backend}; keepalive 16; }}\n\
               server {{\n    listen {listen} http2;\n    http2_max_concurrent_streams 1000;\n\
                 location / {{ grpc_pass grpc://echo; grpc_read_timeout 1h; grpc_send_timeout 1h; }}\n  }}\n}}\n"
        );
        let path = self.logs.join("nginx.conf");
        std::fs::write(&path, conf).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }

    /// Starts `kind` on a free loopback port and waits until it accepts
    /// connections; a proxy's backend (`bench-plain-tonic`) first.
    pub fn start(&self, kind: ServerKind) -> Result<RunningServer, String> {
        let backend = if kind.is_proxy() {
            let backend = self.spawn(ServerKind::PlainTonic, None, self.backend_cpu)?;
            Some(backend)
        } else {
            None
        };
        let mut server = self.spawn(kind, backend.as_ref().map(|b| b.addr), self.server_cpu)?;
        server.backend = backend.map(Box::new);
        Ok(server)
    }

    fn spawn(
        &self,
        kind: ServerKind,
        backend: Option<SocketAddr>,
        cpu: Option<usize>,
    ) -> Result<RunningServer, String> {
        let addr = free_port()?;
        let mut command = self.command(kind, addr, backend)?;
        std::fs::create_dir_all(&self.logs).map_err(|e| format!("{}: {e}", self.logs.display()))?;
        let log_path = self.logs.join(format!("{kind}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
        if let Some(cpu) = cpu {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only the affinity syscall runs.
            unsafe {
                command.pre_exec(move || pin_to_cpu(cpu));
            }
        }
        let child = command.spawn().map_err(|e| format!("starting {kind}: {e}"))?;
        let mut server = RunningServer {
            kind,
            addr,
            child,
            backend: None,
        };
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }
}

/// A free port on 127.0.0.1 (below the ephemeral range is not guaranteed, but
/// the kernel hands out one nobody holds).
fn free_port() -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener.local_addr().map_err(|e| e.to_string())
}

/// A started server (and a proxy's backend); killed on drop.
pub struct RunningServer {
    pub kind: ServerKind,
    pub addr: SocketAddr,
    child: Child,
    backend: Option<Box<RunningServer>>,
}

impl RunningServer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited at start ({status}); see target/bench/logs/",
                    self.kind
                ));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not listen on {} within {timeout:?}",
                    self.kind, self.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the edge server checks, and the token every client sends.
pub mod edge {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    pub const AUDIENCE: &str = "streambridge-bench";

    /// The key set and policy files, in the logs directory.
    pub struct Files {
        pub jwks: PathBuf,
        pub policy: PathBuf,
    }

    /// The key the harness signs with (made once per run), and its token.
    struct Key {
        jwks: String,
        token: String,
    }

    fn key() -> &'static Key {
        static KEY: OnceLock<Key> = OnceLock::new();
        KEY.get_or_init(|| {
            use base64::Engine;
            let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("a key");
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("a key");
            let point = pair.public_key().as_ref();
            let jwks = serde_json::json!({ "keys": [{ "kty": "EC", "crv": "P-256", "kid": "bench",
                "x": b64(&point[1..33]), "y": b64(&point[33..]) }] })
            .to_string();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let claims =
                serde_json::json!({ "sub": "bench", "aud": AUDIENCE, "scope": "bench", "exp": now + 24 * 3600 });
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            header.kid = Some("bench".into());
            let token = jsonwebtoken::encode(
                &header,
                &claims,
                &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
            )
            .expect("a token");
            Key { jwks, token }
        })
    }

    static TOKEN_ON: OnceLock<()> = OnceLock::new();

    /// The token clients send, if [`send_tokens`] was called.
    pub fn token() -> Option<&'static str> {
        TOKEN_ON.get().map(|()| key().token.as_str())
    }

    /// From now on every client sends the token (call before any load runs,
    /// so that both streambridge servers of a run see the same requests).
    pub fn send_tokens() {
        let _ = TOKEN_ON.set(());
    }

    /// Writes the key set and a policy that every call of the load passes
    /// (a caller with the `bench` scope), and returns their paths.
    pub fn files(logs: &Path) -> Result<Files, String> {
        let files = Files {
            jwks: logs.join("edge-jwks.json"),
            policy: logs.join("edge-policy.toml"),
        };
        let policy = "[[rules]]\nmethods = [\"/grpc.health.v1.Health/*\"]\nallow = \"anyone\"\n\n\
                      [[rules]]\nmethods = [\"/DataService/*\"]\nallow = \"authenticated\"\nclaims = { scope = \"bench\" }\n";
        std::fs::write(&files.jwks, &key().jwks).map_err(|e| format!("{}: {e}", files.jwks.display()))?;
        std::fs::write(&files.policy, policy).map_err(|e| format!("{}: {e}", files.policy.display()))?;
        Ok(files)
    }
}
