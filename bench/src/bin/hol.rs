//! `streambridge-hol`: head-of-line blocking under packet loss, WebSocket
//! against WebTransport (issue 28). Needs root, iproute2 and nftables.
//!
//! In a network namespace made for the run (its own loopback: the machine's
//! is never touched), with `--loss` % of the namespace's packets dropped at
//! random by an nftables rule, one client session carries two calls of
//! `DataService.BidirectionalStream`: a **bulk** call keeping 16 KiB
//! messages in flight, and a light **ping-pong** call (16 B, one at a time,
//! one every `--ping-every`). Reported: the ping-pong's latency (p50, p99,
//! p99.9) and the bulk call's throughput, over one WebSocket (both calls on
//! one TCP stream) and over one WebTransport session (each call on its own
//! QUIC stream), rounds alternating, each server on CPU 1 and the client on
//! CPU 0. Numbers are reported, never asserted.
//!
//! ```text
//! streambridge-hol --streambridge target/release/streambridge [--loss 1] [--rounds 5] [--seconds 10]
//! ```
//!
//! The client runs inside the namespace: the binary starts itself there
//! (`ip netns exec … streambridge-hol measure …`) and reads its result.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use streambridge_protocol::StreamRequest;
use streambridge_protocol::v2::{ClientBatch, ClientRecord, Open, ServerBatch, client_record, server_record};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const METHOD: &str = "/DataService/BidirectionalStream";
const BULK: u32 = 1;
const PING: u32 = 2;
/// The bulk call's message, and how many it keeps in flight.
const BULK_BYTES: usize = 16 * 1024;
const BULK_IN_FLIGHT: usize = 32;

#[derive(Parser)]
#[command(
    name = "streambridge-hol",
    about = "Head-of-line blocking under loss: WebSocket vs WebTransport"
)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// The streambridge binary (release); or `bench-added-service` (the
    /// bench crate's), which serves the same method as an added service:
    /// the generic call path users' own services take.
    #[arg(long, default_value = "target/release/streambridge")]
    streambridge: PathBuf,
    /// Percent of packets dropped in the namespace.
    #[arg(long, default_value_t = 1)]
    loss: u32,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds each transport is measured per round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Milliseconds between two pings.
    #[arg(long, default_value_t = 5)]
    ping_every: u64,
    /// Limit the namespace's loopback to this many Mbit/s (a `tbf` qdisc,
    /// 50 ms of queue): a bottleneck, so that the bulk call builds a queue
    /// and losses cost a round trip of it (0: no limit).
    #[arg(long, default_value_t = 0)]
    rate_mbit: u32,
    /// Where to write the results as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Mode {
    /// Server CPU per message, WebSocket against WebTransport, without loss:
    /// `--sessions` x `--calls` x `--in-flight` of 16 B messages.
    Cpu {
        #[arg(long, default_value_t = 200)]
        sessions: usize,
        #[arg(long, default_value_t = 10)]
        calls: usize,
        #[arg(long, default_value_t = 8)]
        in_flight: usize,
    },
    /// (Inside the namespace) drives the `cpu` load on one transport, prints
    /// the replies it got as one JSON line.
    Load {
        #[arg(long)]
        transport: String,
        #[arg(long)]
        addr: String,
        #[arg(long, default_value = "")]
        hash: String,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        sessions: usize,
        #[arg(long)]
        calls: usize,
        #[arg(long)]
        in_flight: usize,
    },
    /// (Inside the namespace) measures one transport, prints one JSON line.
    Measure {
        #[arg(long)]
        transport: String,
        /// `127.0.0.1:PORT` of the server for this transport.
        #[arg(long)]
        addr: String,
        /// The WebTransport certificate's SHA-256, hex.
        #[arg(long, default_value = "")]
        hash: String,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        ping_every: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Measured {
    transport: String,
    pings: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    bulk_mib_per_s: f64,
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    match args.mode {
        Some(Mode::Measure {
            transport,
            addr,
            hash,
            seconds,
            ping_every,
        }) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let measured = runtime.block_on(measure(&transport, &addr, &hash, seconds, ping_every))?;
            println!("{}", serde_json::to_string(&measured).map_err(|e| e.to_string())?);
            Ok(())
        }
        Some(Mode::Load {
            transport,
            addr,
            hash,
            seconds,
            sessions,
            calls,
            in_flight,
        }) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let replies = runtime.block_on(load(&transport, &addr, &hash, seconds, sessions, calls, in_flight))?;
            println!("{replies}");
            Ok(())
        }
        Some(Mode::Cpu {
            sessions,
            calls,
            in_flight,
        }) => cpu(&args, sessions, calls, in_flight),
        None => orchestrate(&args),
    }
}

/// A network namespace, deleted when dropped.
struct Namespace(String);

impl Namespace {
    fn create() -> Result<Namespace, String> {
        let name = format!("streambridge-hol-{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let namespace = Namespace(name);
        // A network's MTU, not loopback's 64 KiB: TCP segments and QUIC
        // packets of the sizes a real path carries, and lose.
        namespace.exec(&["ip", "link", "set", "lo", "mtu", "1500", "up"])?;
        Ok(namespace)
    }

    fn exec(&self, command: &[&str]) -> Result<(), String> {
        let mut args = vec!["netns", "exec", &self.0];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    /// `command` in the namespace, on `cpu`, its stdout piped.
    fn spawn(&self, cpu: u32, command: &[&str]) -> Result<Child, String> {
        Command::new("ip")
            .args(["netns", "exec", &self.0, "taskset", "-c", &cpu.to_string()])
            .args(command)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{command:?}: {e}"))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let status = Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("{program}: {e} (this benchmark needs root, iproute2 and nftables)"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {args:?}: {status}"))
    }
}

/// A streambridge in the namespace; killed when dropped.
struct Server {
    child: Child,
    tcp: String,
    udp: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(namespace: &Namespace, program: &str, extra: &[&str]) -> Result<Server, String> {
    let mut command = vec![program, "--listen", "127.0.0.1:0"];
    command.extend_from_slice(extra);
    let mut child = namespace.spawn(1, &command)?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(rest) = line.split("listening on ").nth(1) {
            let tcp = rest.split(':').take(2).collect::<Vec<_>>().join(":");
            let udp = line
                .split("WebTransport https://")
                .nth(1)
                .and_then(|rest| rest.split("/ws").next())
                .map(str::to_string);
            // Keep draining the server's log so it never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return Ok(Server { child, tcp, udp });
        }
    }
    Err(format!("{program} exited before it listened"))
}

/// The namespace, a plain server (WebSocket) and a TLS one (WebTransport)
/// in it, and what the client needs to reach them.
struct Setup {
    ws_server: Server,
    wt_server: Server,
    udp: String,
    hash: String,
    me: String,
    dir: PathBuf,
    namespace: Namespace,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(args: &Args) -> Result<Setup, String> {
    let program = args
        .streambridge
        .canonicalize()
        .map_err(|e| format!("{}: {e}", args.streambridge.display()))?;
    let program = program.to_string_lossy().into_owned();
    let dir = std::env::temp_dir().join(format!("streambridge-hol-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let identity = wtransport::Identity::self_signed_builder()
        .subject_alt_names(["localhost", "127.0.0.1"])
        .from_now_utc()
        .validity_days(13)
        .build()
        .map_err(|e| e.to_string())?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    // Not wtransport's `store_pemfile`: it does not flush its tokio file.
    let chain: String = identity
        .certificate_chain()
        .as_slice()
        .iter()
        .map(|c| c.to_pem())
        .collect();
    std::fs::write(&cert, chain).map_err(|e| e.to_string())?;
    std::fs::write(&key, identity.private_key().to_secret_pem()).map_err(|e| e.to_string())?;
    let hash: String = identity.certificate_chain().as_slice()[0]
        .hash()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Servers first, then the loss: start-up is not what is measured.
    let namespace = Namespace::create()?;
    let ws_server = start_server(&namespace, &program, &[])?;
    let (cert, key) = (cert.to_string_lossy(), key.to_string_lossy());
    let wt_server = start_server(
        &namespace,
        &program,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--webtransport-listen",
            "127.0.0.1:0",
        ],
    )?;
    let udp = wt_server
        .udp
        .clone()
        .ok_or("the server did not say where WebTransport listens")?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    Ok(Setup {
        ws_server,
        wt_server,
        udp,
        hash,
        me: me.to_string_lossy().into_owned(),
        dir,
        namespace,
    })
}

/// User plus system CPU time of a process so far.
fn cpu_time(pid: u32) -> Result<Duration, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .ok_or("a /proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().map_err(|e| e.to_string())? + fields[12].parse::<u64>().map_err(|e| e.to_string())?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

fn cpu(args: &Args, sessions: usize, calls: usize, in_flight: usize) -> Result<(), String> {
    let setup = setup(args)?;
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            ["websocket", "webtransport"]
        } else {
            ["webtransport", "websocket"]
        };
        for transport in order {
            let (addr, server) = if transport == "websocket" {
                (&setup.ws_server.tcp, &setup.ws_server)
            } else {
                (&setup.udp, &setup.wt_server)
            };
            let pid = server.child.id();
            let mut child = setup.namespace.spawn(
                0,
                &[
                    &setup.me,
                    "load",
                    "--transport",
                    transport,
                    "--addr",
                    addr,
                    "--hash",
                    &setup.hash,
                    "--seconds",
                    &args.seconds.to_string(),
                    "--sessions",
                    &sessions.to_string(),
                    "--calls",
                    &calls.to_string(),
                    "--in-flight",
                    &in_flight.to_string(),
                ],
            )?;
            let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
            match lines.next() {
                Some(Ok(line)) if line == "ready" => {}
                other => return Err(format!("{transport}: the load did not start: {other:?}")),
            }
            let before = cpu_time(pid)?;
            let line = lines.next().and_then(Result::ok).unwrap_or_default();
            let used = cpu_time(pid)? - before;
            child.wait().map_err(|e| e.to_string())?;
            let replies: u64 = line.trim().parse().map_err(|e| format!("{transport}: {e}: {line}"))?;
            let per_message_us = used.as_secs_f64() * 1e6 / (2 * replies.max(1)) as f64;
            let rate = replies as f64 / args.seconds as f64;
            println!(
                "round {}: {transport:<12} {rate:>9.0} replies/s, server CPU {:.2} s, {per_message_us:.2} µs per message (in + out)",
                round + 1,
                used.as_secs_f64()
            );
            rows.push((transport.to_string(), rate, per_message_us));
        }
    }
    let spread = |transport: &str, pick: fn(&(String, f64, f64)) -> f64| {
        let mut values: Vec<f64> = rows.iter().filter(|r| r.0 == transport).map(pick).collect();
        values.sort_by(f64::total_cmp);
        let n = values.len();
        format!("{:.2} ({:.2}–{:.2})", values[n / 2], values[0], values[n - 1])
    };
    println!(
        "\n{sessions} sessions x {calls} calls x {in_flight} in flight, 16 B, {} rounds x {} s; median (min–max)",
        args.rounds, args.seconds
    );
    for transport in ["websocket", "webtransport"] {
        println!(
            "{transport:<12} {} replies/s, server CPU {} µs per message",
            spread(transport, |r| r.1),
            spread(transport, |r| r.2)
        );
    }
    Ok(())
}

fn orchestrate(args: &Args) -> Result<(), String> {
    let setup = setup(args)?;
    if args.loss > 0 {
        add_loss(&setup.namespace, args.loss)?;
    }
    if args.rate_mbit > 0 {
        let rate = format!("{}mbit", args.rate_mbit);
        setup.namespace.exec(&[
            "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", &rate, "burst", "64kb", "latency", "50ms",
        ])?;
    }
    let (me, hash, udp) = (&setup.me, &setup.hash, &setup.udp);
    let namespace = &setup.namespace;
    let ws_server = &setup.ws_server;
    let mut results: Vec<Measured> = Vec::new();
    for round in 0..args.rounds {
        // Alternating order, so neither transport always goes first.
        let order = if round % 2 == 0 {
            ["websocket", "webtransport"]
        } else {
            ["webtransport", "websocket"]
        };
        for transport in order {
            let addr = if transport == "websocket" { &ws_server.tcp } else { udp };
            let seconds = args.seconds.to_string();
            let ping_every = args.ping_every.to_string();
            let child = namespace.spawn(
                0,
                &[
                    me,
                    "measure",
                    "--transport",
                    transport,
                    "--addr",
                    addr,
                    "--hash",
                    hash,
                    "--seconds",
                    &seconds,
                    "--ping-every",
                    &ping_every,
                ],
            )?;
            let output = child.wait_with_output().map_err(|e| e.to_string())?;
            let line = String::from_utf8_lossy(&output.stdout);
            let measured: Measured =
                serde_json::from_str(line.trim()).map_err(|e| format!("{transport}: {e}: {line}"))?;
            println!(
                "round {}: {:<12} pings {:>6}  p50 {:>7.2} ms  p99 {:>8.2} ms  p99.9 {:>8.2} ms  max {:>8.2} ms  bulk {:>7.1} MiB/s",
                round + 1,
                measured.transport,
                measured.pings,
                measured.p50_ms,
                measured.p99_ms,
                measured.p999_ms,
                measured.max_ms,
                measured.bulk_mib_per_s
            );
            results.push(measured);
        }
    }
    report(&results, args);
    if let Some(out) = &args.out {
        let json = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
        std::fs::write(out, json).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(())
}

fn add_loss(namespace: &Namespace, loss: u32) -> Result<(), String> {
    namespace.exec(&["nft", "add", "table", "inet", "lossy"])?;
    namespace.exec(&[
        "nft",
        "add chain inet lossy out { type filter hook output priority 0; }",
    ])?;
    namespace.exec(&[
        "nft",
        &format!("add rule inet lossy out numgen random mod 100 < {loss} drop"),
    ])
}

/// Median and spread of each transport's p99, and their ratio per round.
fn report(results: &[Measured], args: &Args) {
    let of = |transport: &str, pick: fn(&Measured) -> f64| -> Vec<f64> {
        results.iter().filter(|m| m.transport == transport).map(pick).collect()
    };
    let spread = |mut values: Vec<f64>| -> String {
        values.sort_by(f64::total_cmp);
        match values.len() {
            0 => "-".into(),
            n => format!("{:.2} ({:.2}–{:.2})", values[n / 2], values[0], values[n - 1]),
        }
    };
    let limit = if args.rate_mbit > 0 {
        format!(", {} Mbit/s bottleneck", args.rate_mbit)
    } else {
        String::new()
    };
    println!(
        "\n{} % loss{limit}, {} rounds x {} s, ping every {} ms; median (min–max)",
        args.loss, args.rounds, args.seconds, args.ping_every
    );
    for transport in ["websocket", "webtransport"] {
        println!(
            "{transport:<12} ping p50 {} ms, p99 {} ms, p99.9 {} ms; bulk {} MiB/s",
            spread(of(transport, |m| m.p50_ms)),
            spread(of(transport, |m| m.p99_ms)),
            spread(of(transport, |m| m.p999_ms)),
            spread(of(transport, |m| m.bulk_mib_per_s)),
        );
    }
    let ratios: Vec<f64> = of("webtransport", |m| m.p99_ms)
        .iter()
        .zip(of("websocket", |m| m.p99_ms))
        .map(|(wt, ws)| wt / ws)
        .collect();
    println!(
        "webtransport p99 / websocket p99, per round: {} (target ≤ 0.5)",
        spread(ratios)
    );
}

// ---------------------------------------------------------------- the client

/// Records of protocol v2 for the two calls.
fn open(call: u32, window: u32) -> ClientRecord {
    ClientRecord {
        call,
        kind: Some(client_record::Kind::Open(Open {
            method: METHOD.into(),
            metadata: Default::default(),
            timeout_ms: 0,
            window,
        })),
    }
}

fn message(call: u32, bytes: usize) -> ClientRecord {
    let data = "x".repeat(bytes);
    ClientRecord {
        call,
        kind: Some(client_record::Kind::Message(
            StreamRequest { data }.encode_to_vec().into(),
        )),
    }
}

fn window(call: u32, n: u32) -> ClientRecord {
    ClientRecord {
        call,
        kind: Some(client_record::Kind::Window(n)),
    }
}

fn batch(records: Vec<ClientRecord>) -> Bytes {
    ClientBatch { records }.encode_to_vec().into()
}

/// Replies (messages) per call in one server batch.
fn calls_replied(bytes: &[u8]) -> Result<Vec<u32>, String> {
    let batch = ServerBatch::decode(bytes).map_err(|e| e.to_string())?;
    let mut calls = Vec::new();
    for record in batch.records {
        match record.kind {
            Some(server_record::Kind::Message(_)) => calls.push(record.call),
            Some(server_record::Kind::Status(status)) if status.code != 0 => {
                return Err(format!(
                    "call {} failed: {} {}",
                    record.call, status.code, status.message
                ));
            }
            _ => {}
        }
    }
    Ok(calls)
}

/// What the two calls share: a way to send a batch of one call, and the
/// replies of each call as they come.
struct Lanes {
    send: mpsc::UnboundedSender<(u32, Bytes)>,
    bulk_replies: mpsc::UnboundedReceiver<()>,
    ping_replies: mpsc::UnboundedReceiver<()>,
}

async fn measure(transport: &str, addr: &str, hash: &str, seconds: u64, ping_every: u64) -> Result<Measured, String> {
    let mut lanes = match transport {
        "websocket" => websocket_lanes(addr).await?,
        "webtransport" => webtransport_lanes(addr, hash).await?,
        other => return Err(format!("unknown transport {other}")),
    };
    // The bulk call: BULK_IN_FLIGHT messages in flight, each reply replaced.
    let mut first = vec![open(BULK, 1024)];
    first.extend((0..BULK_IN_FLIGHT).map(|_| message(BULK, BULK_BYTES)));
    lanes.send.send((BULK, batch(first))).map_err(|e| e.to_string())?;
    lanes
        .send
        .send((PING, batch(vec![open(PING, 1024)])))
        .map_err(|e| e.to_string())?;
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut histogram = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut bulk_done = 0u64;
    let send = lanes.send.clone();
    let bulk_task = async {
        let mut taken = 0u32;
        while lanes.bulk_replies.recv().await.is_some() {
            bulk_done += 1;
            taken += 1;
            let mut records = vec![message(BULK, BULK_BYTES)];
            if taken >= 512 {
                records.push(window(BULK, taken));
                taken = 0;
            }
            if send.send((BULK, batch(records))).is_err() {
                break;
            }
        }
    };
    let ping_task = async {
        let mut taken = 0u32;
        while Instant::now() < until {
            let sent = Instant::now();
            let mut records = vec![message(PING, 16)];
            if taken >= 512 {
                records.push(window(PING, taken));
                taken = 0;
            }
            lanes.send.send((PING, batch(records))).map_err(|e| e.to_string())?;
            lanes.ping_replies.recv().await.ok_or("the ping call ended")?;
            taken += 1;
            let _ = histogram.record(sent.elapsed().as_micros() as u64);
            tokio::time::sleep_until((sent + Duration::from_millis(ping_every)).into()).await;
        }
        Ok::<(), String>(())
    };
    let started = Instant::now();
    tokio::select! {
        () = bulk_task => return Err("the bulk call ended".into()),
        pinged = ping_task => pinged?,
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ms = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
    Ok(Measured {
        transport: transport.into(),
        pings: histogram.len(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
        bulk_mib_per_s: bulk_done as f64 * BULK_BYTES as f64 / elapsed / (1024.0 * 1024.0),
    })
}

/// Both calls on one WebSocket.
async fn websocket_lanes(addr: &str) -> Result<Lanes, String> {
    let socket = ws_socket(addr).await?;
    let (mut sink, mut stream) = socket.split();
    let (send, mut outgoing) = mpsc::unbounded_channel::<(u32, Bytes)>();
    tokio::spawn(async move {
        while let Some((_, bytes)) = outgoing.recv().await {
            if sink.send(Message::Binary(bytes)).await.is_err() {
                return;
            }
        }
    });
    let (bulk_tx, bulk_replies) = mpsc::unbounded_channel();
    let (ping_tx, ping_replies) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let Message::Binary(bytes) = message else { continue };
            let Ok(calls) = calls_replied(&bytes) else { return };
            for call in calls {
                let _ = if call == BULK {
                    bulk_tx.send(())
                } else {
                    ping_tx.send(())
                };
            }
        }
    });
    Ok(Lanes {
        send,
        bulk_replies,
        ping_replies,
    })
}

/// Each call on a stream of its own of one WebTransport session.
async fn webtransport_lanes(addr: &str, hash: &str) -> Result<Lanes, String> {
    let endpoint = wt_endpoint(hash)?;
    let session = endpoint
        .connect(format!("https://{addr}/ws?protocol=streambridge.v2.proto"))
        .await
        .map_err(|e| e.to_string())?;
    let (send, mut outgoing) = mpsc::unbounded_channel::<(u32, Bytes)>();
    let mut writers = Vec::new();
    let mut replies_of = Vec::new();
    for _ in [BULK, PING] {
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        let (mut write, read) = session
            .open_bi()
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (frames_tx, mut frames) = mpsc::unbounded_channel::<Bytes>();
        tokio::spawn(async move {
            while let Some(batch) = frames.recv().await {
                if write.write_all(&wt_frame(&batch)).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut reader = FrameReader::new(read);
            while let Some(calls) = reader.next_replies().await {
                for _ in calls {
                    let _ = tx.send(());
                }
            }
        });
        writers.push(frames_tx);
        replies_of.push(rx);
    }
    tokio::spawn(async move {
        // Keep the session open while the lanes are used.
        let _session = session;
        while let Some((call, bytes)) = outgoing.recv().await {
            let writer = if call == BULK { &writers[0] } else { &writers[1] };
            if writer.send(bytes).is_err() {
                return;
            }
        }
    });
    let ping_replies = replies_of.pop().expect("two lanes");
    let bulk_replies = replies_of.pop().expect("two lanes");
    Ok(Lanes {
        send,
        bulk_replies,
        ping_replies,
    })
}

// ------------------------------------------------- the CPU-per-message load

/// Drives `sessions` x `calls` calls, `in_flight` 16 B messages in flight on
/// each, for `seconds`; returns the replies counted.
async fn load(
    transport: &str,
    addr: &str,
    hash: &str,
    seconds: u64,
    sessions: usize,
    calls: usize,
    in_flight: usize,
) -> Result<u64, String> {
    let replies = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Set once every call is under way: set-up (handshakes) is not measured.
    let deadline: Deadline = std::sync::Arc::default();
    match transport {
        "websocket" => {
            for _ in 0..sessions {
                let socket = ws_socket(addr).await?;
                tokio::spawn(ws_session(socket, calls, in_flight, replies.clone(), deadline.clone()));
            }
        }
        "webtransport" => {
            let endpoint = wt_endpoint(hash)?;
            for _ in 0..sessions {
                let session = endpoint
                    .connect(format!("https://{addr}/ws?protocol=streambridge.v2.proto"))
                    .await
                    .map_err(|e| e.to_string())?;
                let session = std::sync::Arc::new(session);
                for _ in 0..calls {
                    let (send, recv) = session
                        .open_bi()
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())?;
                    tokio::spawn(wt_call(
                        session.clone(),
                        send,
                        recv,
                        in_flight,
                        replies.clone(),
                        deadline.clone(),
                    ));
                }
            }
        }
        other => return Err(format!("unknown transport {other}")),
    }
    // Counted from the moment every call is under way; the orchestrator
    // reads the server's CPU time at "ready" and at the end.
    let started = Instant::now();
    let _ = deadline.set(started + Duration::from_secs(seconds));
    let from = replies.load(std::sync::atomic::Ordering::Relaxed);
    println!("ready");
    tokio::time::sleep_until((started + Duration::from_secs(seconds)).into()).await;
    Ok(replies.load(std::sync::atomic::Ordering::Relaxed) - from)
}

/// When the load stops sending (unset while it is being set up).
type Deadline = std::sync::Arc<std::sync::OnceLock<Instant>>;

fn sending(deadline: &Deadline) -> bool {
    deadline.get().is_none_or(|deadline| Instant::now() < *deadline)
}

async fn ws_socket(addr: &str) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, String> {
    let mut request = format!("ws://{addr}/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "streambridge.v2.proto".parse().expect("a header value"),
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (socket, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(socket)
}

fn wt_endpoint(hash: &str) -> Result<wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>, String> {
    let bytes: Vec<u8> = (0..hash.len() / 2)
        .map(|i| u8::from_str_radix(&hash[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let digest = wtransport::tls::Sha256Digest::new(bytes.try_into().map_err(|_| "a 32-byte hash")?);
    let config = wtransport::ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([digest])
        .build();
    wtransport::Endpoint::client(config).map_err(|e| e.to_string())
}

/// Every reply replaced by a new request in the batch sent after each read;
/// response credit granted back every 512 replies of a call.
fn replacements(calls: &[u32], taken: &mut std::collections::HashMap<u32, u32>, sending: bool) -> Vec<ClientRecord> {
    let mut records = Vec::new();
    for &call in calls {
        if sending {
            records.push(message(call, 16));
        }
        let count = taken.entry(call).or_default();
        *count += 1;
        if *count >= 512 {
            records.push(window(call, *count));
            *count = 0;
        }
    }
    records
}

async fn ws_session(
    socket: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    calls: usize,
    in_flight: usize,
    replies: std::sync::Arc<std::sync::atomic::AtomicU64>,
    deadline: Deadline,
) {
    let (mut sink, mut stream) = socket.split();
    let mut first = Vec::new();
    for call in 1..=calls as u32 {
        first.push(open(call, 1024));
        first.extend((0..in_flight).map(|_| message(call, 16)));
    }
    if sink.send(Message::Binary(batch(first))).await.is_err() {
        return;
    }
    let mut taken = std::collections::HashMap::new();
    while let Some(Ok(message)) = stream.next().await {
        let Message::Binary(bytes) = message else { continue };
        let Ok(got) = calls_replied(&bytes) else { return };
        replies_counted(&replies, got.len());
        let records = replacements(&got, &mut taken, sending(&deadline));
        if !records.is_empty() && sink.send(Message::Binary(batch(records))).await.is_err() {
            return;
        }
    }
}

fn replies_counted(replies: &std::sync::atomic::AtomicU64, n: usize) {
    replies.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
}

async fn wt_call(
    _session: std::sync::Arc<wtransport::Connection>,
    mut send: wtransport::SendStream,
    recv: wtransport::RecvStream,
    in_flight: usize,
    replies: std::sync::Arc<std::sync::atomic::AtomicU64>,
    deadline: Deadline,
) {
    let mut first = vec![open(1, 1024)];
    first.extend((0..in_flight).map(|_| message(1, 16)));
    if send.write_all(&wt_frame(&batch(first))).await.is_err() {
        return;
    }
    let mut taken = std::collections::HashMap::new();
    let mut reader = FrameReader::new(recv);
    while let Some(got) = reader.next_replies().await {
        replies_counted(&replies, got.len());
        let records = replacements(&got, &mut taken, sending(&deadline));
        if !records.is_empty() && send.write_all(&wt_frame(&batch(records))).await.is_err() {
            return;
        }
    }
}

/// A batch as a WebTransport stream's BATCH frame (docs/protocol-v2.md §12).
fn wt_frame(batch: &[u8]) -> BytesMut {
    let mut frame = BytesMut::with_capacity(5 + batch.len());
    frame.put_u32(batch.len() as u32 + 1);
    frame.put_u8(0);
    frame.put_slice(batch);
    frame
}

/// A WebTransport stream's frames, read as the calls they reply to.
struct FrameReader {
    recv: wtransport::RecvStream,
    buffer: BytesMut,
    chunk: Vec<u8>,
}

impl FrameReader {
    fn new(recv: wtransport::RecvStream) -> FrameReader {
        FrameReader {
            recv,
            buffer: BytesMut::new(),
            chunk: vec![0u8; 64 * 1024],
        }
    }

    /// The calls replied to in the next frames that have arrived (at least
    /// one frame); `None` at the stream's end, a CLOSE or a failed call.
    async fn next_replies(&mut self) -> Option<Vec<u32>> {
        loop {
            let mut got = Vec::new();
            let mut framed = false;
            while self.buffer.len() >= 4 {
                let length = u32::from_be_bytes(self.buffer[..4].try_into().expect("4 bytes")) as usize;
                if self.buffer.len() < 4 + length {
                    break;
                }
                self.buffer.advance(4);
                let mut frame = self.buffer.split_to(length);
                if frame.get_u8() != 0 {
                    return None;
                }
                got.extend(calls_replied(&frame).ok()?);
                framed = true;
            }
            if framed {
                return Some(got);
            }
            match self.recv.read(&mut self.chunk).await {
                Ok(Some(n)) => self.buffer.extend_from_slice(&self.chunk[..n]),
                _ => return None,
            }
        }
    }
}
