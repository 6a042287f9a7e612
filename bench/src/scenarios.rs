//! The scenarios of issue 5 and how one is run against a started server:
//! connect, warm up, measure (replies, latencies, the server's CPU time),
//! stop and drain. Memory scenarios open idle calls and read the server's
//! resident memory before and after.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt, stream};
use tokio::task::JoinHandle;

use crate::measure::{Control, Phase, TaskStats, cpu_time, machine_busy_time, resident_kib};
use crate::servers::RunningServer;
use crate::ws_load::{Codec, Frames, Pacing};
use crate::{grpc_load, grpc_web_load, http_session_load, ws_load, ws2_load};

/// Sockets or calls being opened at once while setting up a scenario.
const SETUP_CONCURRENCY: usize = 64;
/// How long tasks get to drain and end their calls after the stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long each phase of a load scenario lasts, and the idle-call count.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Timing {
    pub warmup: Duration,
    pub measure: Duration,
    pub idle_calls: usize,
    /// Only scenarios whose name contains this text run (profiling).
    pub only: Option<String>,
    /// `--busy-load-generator`: see [`keep_busy`].
    pub busy_load_generator: bool,
}

/// Keeps the load generator's runtime from ever sleeping until the returned
/// guard is dropped: a task that yields in a loop is always ready to run.
pub fn keep_busy() -> impl Drop {
    let task = tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    });
    AbortOnDrop(task)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Timing {
    /// Whether the scenario called `name` is to run.
    pub fn selects(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|only| name.contains(only))
    }
}

/// The traffic of one scenario.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// Native gRPC: `connections` x `streams` calls, `window` requests in flight each.
    Grpc {
        connections: usize,
        streams: usize,
        window: usize,
    },
    /// WebSocket: `sockets` calls, each paced by `pacing`.
    Ws {
        codec: Codec,
        sockets: usize,
        pacing: WsPacing,
    },
    /// gRPC-Web over HTTP/1.1: `connections` clients making 10-message calls.
    GrpcWeb { connections: usize },
    /// WebSocket protocol v2: `sockets` sockets x `calls` calls, each with
    /// `Window(n)` in flight, or all together at `Rate(messages per second)`.
    WsV2 {
        codec: Codec,
        sockets: usize,
        calls: u32,
        pacing: WsPacing,
    },
    /// Protocol v2 over HTTP (the fallback where WebSockets are blocked):
    /// the `WsV2` load with `window` in flight, on `sessions` HTTP sessions.
    HttpV2 {
        codec: Codec,
        sessions: usize,
        calls: u32,
        window: usize,
    },
}

/// How the sockets of a WebSocket scenario send.
#[derive(Clone, Copy, Debug)]
pub enum WsPacing {
    Window(usize),
    /// A total rate in messages per second over all sockets.
    Rate(f64),
}

impl Load {
    /// The scenario's name in the table: transport and shape.
    pub fn name(&self) -> String {
        match *self {
            Load::Grpc {
                connections: 1,
                streams: 1,
                window: 1,
            } => "grpc ping-pong".into(),
            Load::Grpc {
                connections: 1,
                streams: 1,
                window,
            } => format!("grpc 1 stream x {window}"),
            Load::Grpc {
                connections,
                streams,
                window,
            } => format!("grpc {connections}x{streams}x{window}"),
            Load::Ws {
                codec,
                sockets: 1,
                pacing: WsPacing::Window(1),
            } => format!("ws-{} ping-pong", codec.name()),
            Load::Ws {
                codec,
                sockets: 1,
                pacing: WsPacing::Window(window),
            } => format!("ws-{} 1 socket x {window}", codec.name()),
            Load::Ws {
                codec,
                sockets,
                pacing: WsPacing::Window(window),
            } => format!("ws-{} {sockets}x{window}", codec.name()),
            Load::Ws {
                codec,
                sockets,
                pacing: WsPacing::Rate(_),
            } => format!("ws-{} {sockets} fixed-rate", codec.name()),
            Load::GrpcWeb { connections } => format!("grpc-web {connections} conns x 10-msg calls"),
            Load::WsV2 {
                codec,
                sockets,
                calls,
                pacing: WsPacing::Window(window),
            } => format!("ws2-{} {sockets}x{calls}x{window}", codec.name()),
            Load::WsV2 {
                codec,
                sockets,
                calls,
                pacing: WsPacing::Rate(_),
            } => format!("ws2-{} {sockets}x{calls} fixed-rate", codec.name()),
            Load::HttpV2 {
                codec,
                sessions,
                calls,
                window,
            } => format!("http2-{} {sessions}x{calls}x{window}", codec.name()),
        }
    }
}

/// What a load scenario measured.
pub struct Measured {
    pub stats: TaskStats,
    pub elapsed: Duration,
    /// Server CPU time (user + system) over the measured window.
    pub server_cpu: Duration,
    /// CPU time of everything else on the machine (neither the server nor
    /// this load generator) over the window: other work disturbing the run.
    pub foreign_cpu: Duration,
}

/// Runs `load` with `payload`-byte messages against `server`.
pub async fn run_load(server: &RunningServer, load: Load, payload: usize, timing: &Timing) -> Result<Measured, String> {
    let control = Control::default();
    control.set(Phase::Warmup);
    let tasks = start_tasks(server.addr, load, payload, &control).await?;
    tokio::time::sleep(timing.warmup).await;
    let cpu_before = cpu_time(server.pid()).ok_or("server process gone")?;
    let own_before = cpu_time(std::process::id()).unwrap_or_default();
    let machine_before = machine_busy_time().unwrap_or_default();
    let started = Instant::now();
    control.set(Phase::Measure);
    tokio::time::sleep(timing.measure).await;
    control.set(Phase::Stop);
    let elapsed = started.elapsed();
    let cpu_after = cpu_time(server.pid()).ok_or("server process gone")?;
    let own = cpu_time(std::process::id())
        .unwrap_or_default()
        .saturating_sub(own_before);
    let machine = machine_busy_time().unwrap_or_default().saturating_sub(machine_before);
    let server_cpu = cpu_after.saturating_sub(cpu_before);
    let stats = join_all(tasks).await?;
    Ok(Measured {
        stats,
        elapsed,
        server_cpu,
        foreign_cpu: machine.saturating_sub(server_cpu + own),
    })
}

async fn start_tasks(
    addr: SocketAddr,
    load: Load,
    payload: usize,
    control: &Control,
) -> Result<Vec<JoinHandle<Result<TaskStats, String>>>, String> {
    let mut tasks = Vec::new();
    match load {
        Load::Grpc {
            connections,
            streams,
            window,
        } => {
            for _ in 0..connections {
                let channel = grpc_load::connect(addr).await?;
                for _ in 0..streams {
                    tasks.push(tokio::spawn(grpc_load::drive(
                        channel.clone(),
                        payload,
                        window,
                        control.clone(),
                    )));
                }
            }
        }
        Load::Ws { codec, sockets, pacing } => {
            let frames = Frames::new(codec, payload);
            let opened: Vec<_> = stream::iter(0..sockets)
                .map(|_| ws_load::connect(addr, codec, 64 * 1024))
                .buffer_unordered(SETUP_CONCURRENCY)
                .try_collect()
                .await?;
            for (index, socket) in opened.into_iter().enumerate() {
                let pacing = match pacing {
                    WsPacing::Window(window) => Pacing::Window(window),
                    WsPacing::Rate(rate) => {
                        let interval = Duration::from_secs_f64(sockets as f64 / rate);
                        let offset = interval.mul_f64(index as f64 / sockets as f64);
                        Pacing::Rate { interval, offset }
                    }
                };
                tasks.push(tokio::spawn(ws_load::drive(
                    socket,
                    frames.clone(),
                    pacing,
                    control.clone(),
                )));
            }
        }
        Load::GrpcWeb { connections } => {
            for _ in 0..connections {
                tasks.push(tokio::spawn(grpc_web_load::drive(addr, payload, control.clone())));
            }
        }
        Load::HttpV2 {
            codec,
            sessions,
            calls,
            window,
        } => {
            let opened: Vec<_> = stream::iter(0..sessions)
                .map(|_| http_session_load::connect(addr, codec))
                .buffer_unordered(SETUP_CONCURRENCY)
                .try_collect()
                .await?;
            for session in opened {
                tasks.push(tokio::spawn(ws2_load::drive(
                    session,
                    codec,
                    calls,
                    Pacing::Window(window),
                    payload,
                    control.clone(),
                )));
            }
        }
        Load::WsV2 {
            codec,
            sockets,
            calls,
            pacing,
        } => {
            let opened: Vec<_> = stream::iter(0..sockets)
                .map(|_| ws2_load::connect(addr, codec))
                .buffer_unordered(SETUP_CONCURRENCY)
                .try_collect()
                .await?;
            for (index, socket) in opened.into_iter().enumerate() {
                let pacing = match pacing {
                    WsPacing::Window(window) => Pacing::Window(window),
                    WsPacing::Rate(rate) => {
                        // Each tick sends one message on every call of the socket.
                        let interval = Duration::from_secs_f64(sockets as f64 * f64::from(calls) / rate);
                        let offset = interval.mul_f64(index as f64 / sockets as f64);
                        Pacing::Rate { interval, offset }
                    }
                };
                tasks.push(tokio::spawn(ws2_load::drive(
                    socket,
                    codec,
                    calls,
                    pacing,
                    payload,
                    control.clone(),
                )));
            }
        }
    }
    Ok(tasks)
}

/// Waits for every task to drain; the first failure fails the scenario.
async fn join_all(tasks: Vec<JoinHandle<Result<TaskStats, String>>>) -> Result<TaskStats, String> {
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let joined = tokio::time::timeout(DRAIN_TIMEOUT, futures_util::future::join_all(tasks)).await;
    let Ok(results) = joined else {
        aborts.iter().for_each(|a| a.abort());
        return Err(format!("calls did not end within {DRAIN_TIMEOUT:?} of the stop"));
    };
    let mut total = TaskStats::new();
    for result in results {
        total.merge(&result.map_err(|e| format!("load task panicked: {e}"))??);
    }
    Ok(total)
}

/// What a memory scenario measured.
pub struct IdleMemory {
    pub calls: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

impl IdleMemory {
    pub fn kib_per_call(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.calls as f64
    }
}

/// Resident memory per idle WebSocket call (open, one exchange done).
pub async fn idle_websockets(server: &RunningServer, calls: usize) -> Result<IdleMemory, String> {
    let frames = Frames::new(Codec::Json, 16);
    // Warm the server up (threads, allocator) with a few complete calls first.
    for _ in 0..8 {
        let mut socket = ws_load::open_idle(server.addr, frames.clone()).await?;
        ws_load::finish_call(&mut socket, &frames).await?;
    }
    let before = settled_rss(server).await?;
    let sockets: Vec<_> = stream::iter(0..calls)
        .map(|_| ws_load::open_idle(server.addr, frames.clone()))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    let after = settled_rss(server).await?;
    drop(sockets);
    Ok(IdleMemory {
        calls,
        rss_before_kib: before,
        rss_after_kib: after,
    })
}

/// Resident memory per idle WebSocket v2 call: `sockets` sockets with
/// `calls_per_socket` calls each (0: the sockets alone), each call after
/// one exchange.
pub async fn idle_ws2(server: &RunningServer, sockets: usize, calls_per_socket: u32) -> Result<IdleMemory, String> {
    for _ in 0..8 {
        drop(ws2_load::open_idle(server.addr, 4).await?);
    }
    let before = settled_rss(server).await?;
    let opened: Vec<_> = stream::iter(0..sockets)
        .map(|_| ws2_load::open_idle(server.addr, calls_per_socket))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    let after = settled_rss(server).await?;
    drop(opened);
    Ok(IdleMemory {
        calls: if calls_per_socket == 0 {
            sockets
        } else {
            sockets * calls_per_socket as usize
        },
        rss_before_kib: before,
        rss_after_kib: after,
    })
}

/// Resident memory per idle HTTP session (protocol v2 over HTTP, no call),
/// as `idle_ws2` measures idle sockets.
pub async fn idle_http_sessions(server: &RunningServer, sessions: usize) -> Result<IdleMemory, String> {
    for _ in 0..8 {
        drop(ws2_load::make_idle(http_session_load::connect(server.addr, Codec::Json).await?, 4).await?);
    }
    let before = settled_rss(server).await?;
    let opened: Vec<_> = stream::iter(0..sessions)
        .map(|_| http_session_load::connect(server.addr, Codec::Json))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    let after = settled_rss(server).await?;
    drop(opened);
    Ok(IdleMemory {
        calls: sessions,
        rss_before_kib: before,
        rss_after_kib: after,
    })
}

/// Resident memory per idle gRPC stream (open, one exchange done), over as
/// many connections as a limit of 1000 concurrent streams each needs.
pub async fn idle_grpc_streams(server: &RunningServer, calls: usize) -> Result<IdleMemory, String> {
    const STREAMS_PER_CONNECTION: usize = 1000;
    let warm = grpc_load::connect(server.addr).await?;
    for _ in 0..8 {
        drop(grpc_load::open_idle(warm.clone()).await?);
    }
    drop(warm);
    let before = settled_rss(server).await?;
    let mut channels = Vec::new();
    for _ in 0..calls.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(grpc_load::connect(server.addr).await?);
    }
    let streams: Vec<_> = stream::iter(0..calls)
        .map(|i| grpc_load::open_idle(channels[i / STREAMS_PER_CONNECTION].clone()))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    let after = settled_rss(server).await?;
    drop(streams);
    Ok(IdleMemory {
        calls,
        rss_before_kib: before,
        rss_after_kib: after,
    })
}

/// The server's resident memory once it has had a moment to settle.
async fn settled_rss(server: &RunningServer) -> Result<u64, String> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    resident_kib(server.pid()).ok_or_else(|| "server process gone".to_string())
}
