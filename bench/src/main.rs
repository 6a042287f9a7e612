//! `streambridge-bench`: the harness behind `cargo xtask bench`.
//!
//! It starts each server under test in turn on a loopback port (a child
//! process: streambridge, plain tonic (tuned and stock), grpc-go, the naive
//! tokio-tungstenite bridge, Node `ws`), runs the scenarios of issue 5 against
//! it from this process (the load generator), and reports throughput, latency
//! (p50, p99, p99.9 from hdrhistogram) and the server's CPU time per message
//! read from `/proc/PID/stat`. Numbers are reported, never asserted.
//!
//! Fairness: by default the load generator runs on CPU 0 and every server on
//! CPU 1 (`sched_setaffinity`), so a cheaper server cannot hand its spare CPU
//! to the load generator and inflate its own throughput; `--no-pin` lets the
//! scheduler place both. Every scenario runs `--rounds` times (default 3),
//! the servers in alternating order, and the report gives the median and the
//! min–max of each figure; a target counts as met only when every round
//! meets it.
//!
//! Output: a table on stdout, and in `--out` (default `target/bench/`)
//! `results.json`, `results.md` and `chart.svg`.
//!
//! # Layout
//!
//! - [`servers`]: the five servers and how each is started and stopped.
//! - [`scenarios`]: the scenarios and the warm-up / measure / drain of one run.
//! - [`grpc_load`], [`ws_load`], [`grpc_web_load`]: the load of each transport.
//! - [`measure`]: phases, histograms, `/proc` readings.
//! - [`report`]: table, JSON, chart, and the targets as measured ratios.

mod grpc_load;
mod grpc_web_load;
mod http_session_load;
mod measure;
mod report;
mod scenarios;
mod servers;
mod ws2_load;
mod ws_load;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use report::{Machine, Outcome};
use scenarios::{Load, Timing, WsPacing};
use servers::{RunningServer, ServerKind, ServerPrograms};
use ws_load::Codec;

/// The fixed-rate scenario offers this share of the server's measured maximum.
const FIXED_RATE_SHARE: f64 = 0.7;

#[derive(Debug, Parser)]
#[command(
    name = "streambridge-bench",
    about = "Benchmarks streambridge against its peers (issue 5)"
)]
struct Args {
    /// A short run (CI): tiny durations, 16 B payloads only, 200 idle calls.
    #[arg(long)]
    quick: bool,
    /// Servers to run, comma-separated (default: every one whose program is available).
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
    /// Seconds of measurement per scenario (default 5, quick 1).
    #[arg(long)]
    seconds: Option<f64>,
    /// Idle calls of the memory scenarios (default 10000, quick 200).
    #[arg(long)]
    idle_calls: Option<usize>,
    /// The streambridge release binary.
    #[arg(long)]
    streambridge: PathBuf,
    /// The grpc-go server binary (built by `cargo xtask bench`).
    #[arg(long)]
    grpc_go: Option<PathBuf>,
    /// `bench/node` with its `node_modules` installed.
    #[arg(long)]
    node_dir: Option<PathBuf>,
    /// The nginx binary, for the "gRPC through a proxy" scenario.
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Where results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Run only the scenarios whose name contains this text (e.g. `ws-json 200x8`,
    /// `idle`): for profiling one scenario.
    #[arg(long)]
    only: Option<String>,
    /// Rounds of every scenario (default 3, quick 1); the servers alternate
    /// their order from round to round.
    #[arg(long)]
    rounds: Option<usize>,
    /// Let the scheduler place the servers and the load generator, instead
    /// of pinning the load generator to CPU 0 and the server to CPU 1.
    #[arg(long)]
    no_pin: bool,
    /// Keep the load generator's CPU busy (a task yielding in a loop), so
    /// that it never sleeps: on loopback the server's writes then do not pay
    /// for waking an idle CPU, which a remote client's would not either. A
    /// diagnostic (docs/benchmarks.md, "At the same message rate"); reported
    /// runs do not use it.
    #[arg(long)]
    busy_load_generator: bool,
    /// The command line to record in the report.
    #[arg(long, default_value = "cargo xtask bench")]
    command: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("streambridge-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let fd_limit = measure::raise_fd_limit();
    let timing = Timing {
        warmup: Duration::from_secs_f64(if args.quick { 0.3 } else { 1.5 }),
        measure: Duration::from_secs_f64(args.seconds.unwrap_or(if args.quick { 1.0 } else { 5.0 })),
        idle_calls: args.idle_calls.unwrap_or(if args.quick { 200 } else { 10_000 }),
        only: args.only.clone(),
        busy_load_generator: args.busy_load_generator,
    };
    // The clients' ends are here, the servers' in their own processes.
    if timing.idle_calls + 100 > fd_limit as usize {
        return Err(format!(
            "{} idle calls need more open files than the limit of {fd_limit}",
            timing.idle_calls
        ));
    }
    let payloads: &[usize] = if args.quick { &[16] } else { &[16, 1024] };
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    // Before the runtime starts: its threads inherit the harness's CPU.
    let pinning = pin_load_generator(args.no_pin)?;
    let own_dir = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .parent()
        .ok_or("no directory for the bench binary")?
        .to_path_buf();
    let programs = ServerPrograms {
        streambridge: args.streambridge.clone(),
        plain_tonic: own_dir.join("bench-plain-tonic"),
        stock_tonic: own_dir.join("bench-stock-tonic"),
        naive_ws: own_dir.join("bench-naive-ws"),
        added_service: own_dir.join("bench-added-service"),
        grpc_go: args.grpc_go.clone(),
        node_dir: args.node_dir.clone(),
        nginx: args.nginx.clone(),
        logs: args.out.join("logs"),
        server_cpu: pinning.server_cpu,
        backend_cpu: pinning.load_cpu,
    };
    let servers = selected_servers(args, &programs)?;
    if servers.contains(&ServerKind::StreambridgeEdge) || servers.contains(&ServerKind::StreambridgeAddedEdge) {
        servers::edge::send_tokens();
    }
    println!(
        "servers: {}; {:?} warm-up + {:?} measured per scenario; payloads {payloads:?} B; {} idle calls; \
         {rounds} round(s); {}",
        servers.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
        timing.warmup,
        timing.measure,
        timing.idle_calls,
        pinning.describe(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut all_rounds = Vec::new();
    for round in 0..rounds {
        let mut order = servers.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        println!("\n#### round {} of {rounds}", round + 1);
        let mut outcomes = Vec::new();
        for &server in &order {
            runtime.block_on(bench_server(server, &programs, payloads, &timing, &mut outcomes))?;
        }
        all_rounds.push(outcomes);
    }
    write_report(args, &timing, &pinning, &all_rounds)
}

/// Where the load generator and the servers run.
struct Pinning {
    /// The CPU the load generator was pinned to, if pinned.
    load_cpu: Option<usize>,
    /// The CPU every server is pinned to, if pinned.
    server_cpu: Option<usize>,
}

impl Pinning {
    fn describe(&self) -> String {
        match (self.load_cpu, self.server_cpu) {
            (Some(load), Some(server)) => format!("load generator pinned to CPU {load}, servers to CPU {server}"),
            _ => "unpinned (the scheduler places servers and load generator)".into(),
        }
    }
}

/// Pins this process (the load generator) to the first CPU it may use and
/// chooses the second for the servers, unless `unpinned` or fewer than two
/// CPUs are allowed (then it says so and runs unpinned).
fn pin_load_generator(unpinned: bool) -> Result<Pinning, String> {
    let unpinned_run = Pinning {
        load_cpu: None,
        server_cpu: None,
    };
    if unpinned {
        return Ok(unpinned_run);
    }
    let allowed = servers::allowed_cpus().map_err(|e| format!("reading the CPUs this process may use: {e}"))?;
    let [load, server, ..] = allowed[..] else {
        println!("only {} CPU allowed: running unpinned", allowed.len());
        return Ok(unpinned_run);
    };
    servers::pin_to_cpu(load).map_err(|e| format!("pinning the load generator to CPU {load}: {e}"))?;
    Ok(Pinning {
        load_cpu: Some(load),
        server_cpu: Some(server),
    })
}

fn selected_servers(args: &Args, programs: &ServerPrograms) -> Result<Vec<ServerKind>, String> {
    if args.servers.is_empty() {
        return Ok(ServerKind::ALL
            .into_iter()
            .filter(|k| match k {
                // Only on request (`--servers streambridge,streambridge-edge`).
                ServerKind::StreambridgeEdge | ServerKind::StreambridgeAddedEdge => false,
                ServerKind::GrpcGo => programs.grpc_go.is_some(),
                ServerKind::NodeWs => programs.node_dir.is_some(),
                ServerKind::NginxProxy => programs.nginx.is_some(),
                _ => true,
            })
            .collect());
    }
    args.servers
        .iter()
        .map(|name| ServerKind::from_name(name).ok_or_else(|| format!("unknown server `{name}`")))
        .collect()
}

/// The load scenarios of `server`'s transports, then its memory scenarios,
/// each memory scenario on a freshly started server.
async fn bench_server(
    server: ServerKind,
    programs: &ServerPrograms,
    payloads: &[usize],
    timing: &Timing,
    outcomes: &mut Vec<Outcome>,
) -> Result<(), String> {
    let running = programs.start(server)?;
    println!("\n== {server} (pid {}, {})", running.pid(), running.addr);
    for &payload in payloads {
        if server.speaks_grpc() {
            // A proxy or an added service is measured on the wide scenario
            // only: the baseline for its v2 rows.
            let shapes: &[(usize, usize, usize)] = if server.serves_users_service() || server.is_proxy() {
                &[(4, 50, 8)]
            } else {
                &[(1, 1, 1), (1, 1, 64), (4, 50, 8)]
            };
            for &(connections, streams, window) in shapes {
                let load = Load::Grpc {
                    connections,
                    streams,
                    window,
                };
                if timing.selects(&load.name()) {
                    outcomes.push(measure_load(&running, load, payload, timing, None).await);
                }
            }
        }
        if server.speaks_websocket() {
            let codecs: &[Codec] = if server.is_builtin_streambridge() {
                &[Codec::Json, Codec::Proto]
            } else {
                &[Codec::Json]
            };
            for &codec in codecs {
                for (sockets, window) in [(1, 1), (1, 64), (200, 8)] {
                    let pacing = WsPacing::Window(window);
                    let load = Load::Ws { codec, sockets, pacing };
                    if timing.selects(&load.name()) {
                        outcomes.push(measure_load(&running, load, payload, timing, None).await);
                    }
                }
                // This server's own 200x8 maximum of this round (absent with --only: no fixed-rate run).
                let wide = format!("ws-{} 200x8", codec.name());
                let maximum = outcomes
                    .iter()
                    .rev()
                    .find(|o| o.server == Some(server) && o.payload_bytes == payload && o.scenario == wide)
                    .and_then(|o| o.msgs_per_sec)
                    .unwrap_or(0.0);
                if maximum > 0.0 && timing.selects(&format!("ws-{} 200 fixed-rate", codec.name())) {
                    let rate = maximum * FIXED_RATE_SHARE;
                    let load = Load::Ws {
                        codec,
                        sockets: 200,
                        pacing: WsPacing::Rate(rate),
                    };
                    outcomes.push(measure_load(&running, load, payload, timing, Some(rate)).await);
                }
            }
        }
        let load = Load::GrpcWeb { connections: 16 };
        if server.is_builtin_streambridge() && timing.selects(&load.name()) {
            outcomes.push(measure_load(&running, load, payload, timing, None).await);
        }
        // The proxy and the added service run the same v2 load: their calls
        // to `/DataService/…` take the generic path (the path users'
        // services take), to the upstream or to the tonic service in process.
        if server.is_builtin_streambridge() || server.serves_users_service() {
            for codec in [Codec::Json, Codec::Proto] {
                let load = Load::WsV2 {
                    codec,
                    sockets: 200,
                    calls: 10,
                    pacing: WsPacing::Window(8),
                };
                if timing.selects(&load.name()) {
                    outcomes.push(measure_load(&running, load, payload, timing, None).await);
                }
                // The same over the HTTP fallback: its CPU per message beside the socket's.
                let load = Load::HttpV2 {
                    codec,
                    sessions: 200,
                    calls: 10,
                    window: 8,
                };
                if timing.selects(&load.name()) {
                    outcomes.push(measure_load(&running, load, payload, timing, None).await);
                }
                // At exactly the rate v1's fixed-rate scenario was offered this
                // round, so CPU per message compares at one message rate.
                let v1_rate = outcomes
                    .iter()
                    .rev()
                    .find(|o| {
                        o.server == Some(server)
                            && o.payload_bytes == payload
                            && o.scenario == format!("ws-{} 200 fixed-rate", codec.name())
                    })
                    .and_then(|o| o.offered_msgs_per_sec);
                let load = Load::WsV2 {
                    codec,
                    sockets: 200,
                    calls: 10,
                    pacing: WsPacing::Rate(v1_rate.unwrap_or(0.0)),
                };
                if let Some(rate) = v1_rate
                    && timing.selects(&load.name())
                {
                    outcomes.push(measure_load(&running, load, payload, timing, Some(rate)).await);
                }
            }
        }
    }
    drop(running);
    if server.speaks_websocket() && timing.selects("idle ws-json sockets") {
        let fresh = programs.start(server)?;
        let memory = scenarios::idle_websockets(&fresh, timing.idle_calls).await;
        outcomes.push(memory_outcome(&fresh, "idle ws-json sockets", memory));
    }
    if server.is_builtin_streambridge() || server.serves_users_service() {
        // 10 000 idle v2 sockets (no call), and 10 000 idle calls on 100
        // sockets (the generic path: the calls only).
        let sockets = timing.idle_calls;
        let scenarios = [
            ("idle ws2 sockets", sockets, 0),
            ("idle ws2 calls (100 per socket)", sockets.div_ceil(100), 100),
        ];
        let scenarios = if server.serves_users_service() {
            &scenarios[1..]
        } else {
            &scenarios[..]
        };
        for &(name, sockets, calls) in scenarios {
            if timing.selects(name) {
                let fresh = programs.start(server)?;
                let memory = scenarios::idle_ws2(&fresh, sockets, calls).await;
                outcomes.push(memory_outcome(&fresh, name, memory));
            }
        }
    }
    if server.is_builtin_streambridge() && timing.selects("idle http sessions") {
        let fresh = programs.start(server)?;
        // Each session holds a connection: kept well inside --max-connections (10 000).
        let memory = scenarios::idle_http_sessions(&fresh, timing.idle_calls.min(2000)).await;
        outcomes.push(memory_outcome(&fresh, "idle http sessions", memory));
    }
    if server.speaks_grpc() && !server.is_proxy() && timing.selects("idle grpc streams") {
        let fresh = programs.start(server)?;
        let memory = scenarios::idle_grpc_streams(&fresh, timing.idle_calls).await;
        outcomes.push(memory_outcome(&fresh, "idle grpc streams", memory));
    }
    Ok(())
}

async fn measure_load(
    server: &RunningServer,
    load: Load,
    payload: usize,
    timing: &Timing,
    offered: Option<f64>,
) -> Outcome {
    let mut outcome = Outcome {
        scenario: load.name(),
        server: Some(server.kind),
        payload_bytes: payload,
        offered_msgs_per_sec: offered,
        rounds: 1,
        ..Outcome::default()
    };
    let busy = timing.busy_load_generator.then(scenarios::keep_busy);
    let result = scenarios::run_load(server, load, payload, timing).await;
    drop(busy);
    match result {
        Ok(measured) => {
            let per_reply = match load {
                Load::GrpcWeb { .. } => grpc_web_load::MESSAGES_PER_CALL as u64,
                _ => 1,
            };
            let seconds = measured.elapsed.as_secs_f64();
            let messages = measured.stats.replies * per_reply;
            outcome.messages = Some(messages);
            outcome.seconds = Some(seconds);
            outcome.msgs_per_sec = Some(messages as f64 / seconds);
            if per_reply > 1 {
                outcome.calls_per_sec = Some(measured.stats.replies as f64 / seconds);
            }
            if measured.stats.replies > 0 {
                outcome.p50_us = Some(measured.stats.quantile_us(0.50));
                outcome.p99_us = Some(measured.stats.quantile_us(0.99));
                outcome.p999_us = Some(measured.stats.quantile_us(0.999));
                outcome.max_us = Some(measured.stats.latency.max() as f64 / 1000.0);
            }
            outcome.foreign_cpu_percent = Some(measured.foreign_cpu.as_secs_f64() * 100.0 / seconds);
            if messages > 0 {
                outcome.server_cpu_us_per_msg = Some(measured.server_cpu.as_secs_f64() * 1e6 / messages as f64);
            }
        }
        Err(error) => outcome.error = Some(error),
    }
    print_row(&outcome);
    outcome
}

fn memory_outcome(server: &RunningServer, scenario: &str, measured: Result<scenarios::IdleMemory, String>) -> Outcome {
    let mut outcome = Outcome {
        scenario: scenario.into(),
        server: Some(server.kind),
        payload_bytes: 16,
        rounds: 1,
        ..Outcome::default()
    };
    match measured {
        Ok(memory) => {
            outcome.idle_calls = Some(memory.calls);
            outcome.rss_before_kib = Some(memory.rss_before_kib);
            outcome.rss_after_kib = Some(memory.rss_after_kib);
            outcome.kib_per_idle_call = Some(memory.kib_per_call());
        }
        Err(error) => {
            outcome.idle_calls = Some(0);
            outcome.error = Some(error);
        }
    }
    print_row(&outcome);
    outcome
}

fn print_row(o: &Outcome) {
    let server = o.server.map_or("?", ServerKind::name);
    if let Some(error) = &o.error {
        println!(
            "{:<34} {:>5} B  {:<13} FAILED: {error}",
            o.scenario, o.payload_bytes, server
        );
    } else if let Some(kib) = o.kib_per_idle_call {
        println!(
            "{:<34} {:>5} B  {:<13} {:>7} idle calls: {:.1} KiB each",
            o.scenario,
            o.payload_bytes,
            server,
            o.idle_calls.unwrap_or(0),
            kib
        );
    } else {
        println!(
            "{:<34} {:>5} B  {:<13} {:>10.0} msg/s  p50 {:>9.1} µs  p99 {:>9.1} µs  p99.9 {:>9.1} µs  CPU {:>6.2} µs/msg  other {:>3.0}%",
            o.scenario,
            o.payload_bytes,
            server,
            o.msgs_per_sec.unwrap_or(0.0),
            o.p50_us.unwrap_or(0.0),
            o.p99_us.unwrap_or(0.0),
            o.p999_us.unwrap_or(0.0),
            o.server_cpu_us_per_msg.unwrap_or(0.0),
            o.foreign_cpu_percent.unwrap_or(0.0),
        );
    }
}

#[derive(serde::Serialize)]
struct Report<'a> {
    command: &'a str,
    quick: bool,
    machine: Machine,
    timing: &'a Timing,
    pinning: String,
    /// Medians over the rounds, with their spread.
    outcomes: &'a [Outcome],
    /// Every round as measured.
    rounds: &'a [Vec<Outcome>],
    targets: Vec<report::Check>,
}

fn write_report(args: &Args, timing: &Timing, pinning: &Pinning, rounds: &[Vec<Outcome>]) -> Result<(), String> {
    let machine = Machine::this();
    let aggregated = report::aggregate(rounds);
    let outcomes = aggregated.as_slice();
    let checks = report::checks_over_rounds(rounds);
    let tables = report::markdown(outcomes);
    let targets = report::checks_markdown(&checks);
    println!("\n{tables}\n{targets}");
    let title = format!(
        "streambridge vs peers · {} × {} · {} · medians of {} round(s) · {}",
        machine.nproc,
        machine.cpu_model,
        if args.quick { "quick run" } else { "full run" },
        rounds.len(),
        if pinning.server_cpu.is_some() {
            "pinned"
        } else {
            "unpinned"
        },
    );
    let out = &args.out;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let write = |name: &str, contents: String| {
        let path = out.join(name);
        std::fs::write(&path, contents).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
        Ok::<(), String>(())
    };
    let header = format!(
        "Medians of {} round(s), (min–max) beside them; {}.\n\n",
        rounds.len(),
        pinning.describe()
    );
    write("results.md", format!("{header}{tables}\n{targets}"))?;
    write("chart.svg", report::svg(outcomes, &title))?;
    let report = Report {
        command: &args.command,
        quick: args.quick,
        machine,
        timing,
        pinning: pinning.describe(),
        outcomes,
        rounds,
        targets: checks,
    };
    write(
        "results.json",
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?,
    )?;
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    println!("{} scenarios, {failed} failed", outcomes.len());
    Ok(())
}
