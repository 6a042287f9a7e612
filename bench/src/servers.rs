//! The five servers under test and how to run each on a loopback port.
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
}

impl ServerKind {
    pub const ALL: [ServerKind; 6] = [
        ServerKind::Streambridge,
        ServerKind::PlainTonic,
        ServerKind::StockTonic,
        ServerKind::GrpcGo,
        ServerKind::NaiveWs,
        ServerKind::NodeWs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Streambridge => "streambridge",
            ServerKind::PlainTonic => "plain-tonic",
            ServerKind::StockTonic => "stock-tonic",
            ServerKind::GrpcGo => "grpc-go",
            ServerKind::NaiveWs => "naive-ws",
            ServerKind::NodeWs => "node-ws",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn speaks_grpc(self) -> bool {
        matches!(
            self,
            ServerKind::Streambridge | ServerKind::PlainTonic | ServerKind::StockTonic | ServerKind::GrpcGo
        )
    }

    pub fn speaks_websocket(self) -> bool {
        matches!(
            self,
            ServerKind::Streambridge | ServerKind::NaiveWs | ServerKind::NodeWs
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
    pub grpc_go: Option<PathBuf>,
    /// `bench/node`, with its `node_modules` installed.
    pub node_dir: Option<PathBuf>,
    pub logs: PathBuf,
    /// The CPU every server is pinned to, if any.
    pub server_cpu: Option<usize>,
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
    fn command(&self, kind: ServerKind, listen: SocketAddr) -> Result<Command, String> {
        let listen = listen.to_string();
        let mut command = match kind {
            ServerKind::Streambridge => {
                let mut c = Command::new(&self.streambridge);
                c.env("RUST_LOG", "warn");
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

    /// Starts `kind` on a free loopback port and waits until it accepts connections.
    pub fn start(&self, kind: ServerKind) -> Result<RunningServer, String> {
        let addr = free_port()?;
        let mut command = self.command(kind, addr)?;
        std::fs::create_dir_all(&self.logs).map_err(|e| format!("{}: {e}", self.logs.display()))?;
        let log_path = self.logs.join(format!("{kind}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
        if let Some(cpu) = self.server_cpu {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only the affinity syscall runs.
            unsafe {
                command.pre_exec(move || pin_to_cpu(cpu));
            }
        }
        let child = command.spawn().map_err(|e| format!("starting {kind}: {e}"))?;
        let mut server = RunningServer { kind, addr, child };
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

/// A started server; killed on drop.
pub struct RunningServer {
    pub kind: ServerKind,
    pub addr: SocketAddr,
    child: Child,
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
