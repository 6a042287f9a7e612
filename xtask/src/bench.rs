//! `cargo xtask bench [--quick] [ARGS]`: the benchmarks of issue 5.
//!
//! Provisions the peers, builds the release binaries, then runs
//! `streambridge-bench` (the harness in `bench/`), which starts each server on
//! a loopback port, loads it, and writes `target/bench/results.{json,md}` and
//! `target/bench/chart.svg`. ARGS go to the harness (`--servers`, `--seconds`,
//! `--idle-calls`; see `streambridge-bench --help`).
//!
//! - grpc-go: Debian's Go toolchain and grpc-go 1.33 (installed with apt-get
//!   when missing), built in GOPATH mode under `target/bench/go/`: no module
//!   downloads. Only for full runs, or when `--servers` names `grpc-go`.
//! - Node `ws`: `npm ci` in `bench/node/` (pinned by its package-lock.json).
//! - nginx: Debian's `nginx-light` (installed with apt-get when missing), the
//!   proxy of the "gRPC through a proxy" scenario.
//!
//! - The browser: `tests/e2e/browser-bench.mjs` (and `connect/bench.mjs`,
//!   `webtransport-bench.mjs`) in headless Chromium (pinned
//!   to CPU 0) against the release server (CPU 1), the WASM client against raw
//!   WebSocket; results in `target/bench/browser.json`.
//!
//! `--quick` (CI) runs streambridge, plain tonic, the naive bridge and Node
//! `ws` (when node is installed) for about a second per scenario, 16 B
//! payloads, 200 idle calls: it keeps every code path working; its numbers
//! mean nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{ServerProcess, run as run_command};
use crate::web::{self, npm_ci};
use crate::{Result, cargo, root, target_dir};

/// Debian packages grpc-go is built from (GOPATH mode, see docs/benchmarks.md).
const GO_PACKAGES: [&str; 6] = [
    "golang-go",
    "golang-google-grpc-dev",
    "protoc-gen-go-grpc",
    "golang-google-protobuf-dev",
    "golang-github-golang-protobuf-1-5-dev",
    "protobuf-compiler",
];

pub fn run(args: &[String]) -> Result {
    let quick = args.iter().any(|a| a == "--quick");
    let wants_grpc_go = args.iter().any(|a| a.contains("grpc-go"));
    run_command(cargo().args(["build", "--release", "--locked", "-p", "streambridge-bench"]))?;
    run_command(cargo().args(["build", "--release", "--locked", "--bin", "streambridge"]))?;
    let release = target_dir().join("release");
    let mut harness = Command::new(release.join("streambridge-bench"));
    harness
        .current_dir(root())
        .arg("--streambridge")
        .arg(release.join("streambridge"))
        .arg("--out")
        .arg(target_dir().join("bench"))
        .arg("--command")
        .arg(
            ["cargo xtask bench"]
                .into_iter()
                .chain(args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
        );
    if !quick || wants_grpc_go {
        harness.arg("--grpc-go").arg(build_grpc_go()?);
    }
    ensure_binaries(&[(NGINX, "nginx-light")], "the nginx proxy peer")?;
    harness.arg("--nginx").arg(NGINX);
    let node_dir = root().join("bench/node");
    if which("node") && which("npm") {
        npm_ci(&node_dir)?;
        harness.arg("--node-dir").arg(&node_dir);
    } else if quick {
        eprintln!("xtask: node/npm not found: the quick run skips Node `ws`");
    } else {
        return Err("node and npm are needed for the Node `ws` peer (Node 20: apt-get install nodejs npm)".into());
    }
    harness.args(args);
    run_command(&mut harness)?;
    browser(quick)
}

/// `cargo xtask bench-browser [--quick]`: the browser benchmark alone.
pub fn run_browser(args: &[String]) -> Result {
    run_command(cargo().args(["build", "--release", "--locked", "--bin", "streambridge"]))?;
    run_command(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "streambridge-bench",
        "--bin",
        "bench-added-service",
    ]))?;
    browser(args.iter().any(|a| a == "--quick"))
}

/// The browser benchmarks, Chromium and the server on different CPUs: the
/// page's own throughput demo (`tests/e2e/browser-bench.mjs`), the
/// connect-es transport (`tests/e2e/connect/bench.mjs`), then WebTransport
/// against the WebSocket (`tests/e2e/webtransport-bench.mjs`).
fn browser(quick: bool) -> Result {
    web::build()?;
    let e2e = root().join("tests/e2e");
    npm_ci(&e2e)?;
    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut server = Command::new("taskset");
    server.args(["-c", "1"]).arg(target_dir().join("release/streambridge"));
    let server = ServerProcess::spawn(server)?;
    let mut node = Command::new("taskset");
    node.args(["-c", "0", "node", "browser-bench.mjs"])
        .current_dir(&e2e)
        .env("STREAMBRIDGE_BASE_URL", format!("http://{}", server.addr))
        .env("BENCH_OUT", target_dir().join("bench/browser.json"));
    if quick {
        node.env("BENCH_ROUNDS", "1")
            .env("BENCH_CLIENT_MESSAGES", "20000")
            .env("BENCH_RAW_MESSAGES", "1000");
    }
    run_command(&mut node)?;
    // connect-es on the transport, against the typed stream and raw (issue 25).
    let mut node = Command::new("taskset");
    node.args(["-c", "0", "node", "connect/bench.mjs"])
        .current_dir(&e2e)
        .env("STREAMBRIDGE_BASE_URL", format!("http://{}", server.addr))
        .env("BENCH_OUT", target_dir().join("bench/browser-connect.json"));
    if quick {
        node.env("BENCH_ROUNDS", "1")
            .env("BENCH_CLIENT_MESSAGES", "20000")
            .env("BENCH_RAW_MESSAGES", "1000")
            .env("BENCH_UNARY_CALLS", "100");
    }
    run_command(&mut node)?;
    // WebTransport against the WebSocket, both to a TLS server of the
    // script's own (issue 28), through an added service: the generic call
    // path users' services take. The script pins the server to CPU 1.
    let mut node = Command::new("taskset");
    node.args(["-c", "0", "node", "webtransport-bench.mjs"])
        .current_dir(&e2e)
        .env("STREAMBRIDGE_BIN", target_dir().join("release/bench-added-service"))
        .env("BENCH_OUT", target_dir().join("bench/browser-webtransport.json"));
    if quick {
        node.env("BENCH_ROUNDS", "1")
            .env("BENCH_MESSAGES", "20000")
            .env("BENCH_PINGS", "200");
    }
    run_command(&mut node)
}

fn which(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Debian's nginx binary (package `nginx-light`), the proxy the
/// "gRPC through a proxy" scenario compares with.
const NGINX: &str = "/usr/sbin/nginx";

/// Installs the Debian packages of grpc-go when any is missing.
fn ensure_go_packages() -> Result {
    ensure_debian_packages(&GO_PACKAGES, "the grpc-go peer")
}

/// Installs the Debian package of each `(binary, package)` whose binary is
/// missing (a binary from another package, such as full nginx, will do).
pub fn ensure_binaries(binaries: &[(&str, &str)], what: &str) -> Result {
    let missing: Vec<&str> = binaries
        .iter()
        .filter(|(binary, _)| !Path::new(binary).exists())
        .map(|(_, package)| *package)
        .collect();
    ensure_debian_packages(&missing, what)
}

/// Installs whichever of `packages` is missing, with apt-get.
fn ensure_debian_packages(packages: &[&str], what: &str) -> Result {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} for {what}", missing.join(" "));
    run_command(Command::new("apt-get").arg("update"))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Builds the seed's Go server (`bench/go/server.go`) against Debian's
/// grpc-go in GOPATH mode; returns the binary.
fn build_grpc_go() -> Result<PathBuf> {
    ensure_go_packages()?;
    let work = target_dir().join("bench/go");
    let gopath = work.join("gopath");
    let package = gopath.join("src/sbbench");
    let generated = package.join("pb");
    let server_dir = package.join("server");
    let bin = work.join("bin");
    for dir in [&generated, &server_dir, &bin] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let go = |command: &mut Command| {
        command
            .env("GO111MODULE", "off")
            .env("GOPATH", format!("{}:/usr/share/gocode", gopath.display()))
            .env("GOCACHE", work.join("cache"))
            .env("GOFLAGS", "");
    };
    // protoc-gen-go from Debian's protobuf sources (its 1.28 generator).
    let mut build_plugin = Command::new("go");
    build_plugin
        .args(["build", "-o"])
        .arg(bin.join("protoc-gen-go"))
        .arg("google.golang.org/protobuf/cmd/protoc-gen-go");
    go(&mut build_plugin);
    run_command(&mut build_plugin)?;
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    run_command(
        Command::new("protoc")
            .env("PATH", &path)
            .arg("-I")
            .arg(root().join("proto"))
            .arg(format!("--go_out={}", generated.display()))
            .arg(format!("--go-grpc_out={}", generated.display()))
            .args([
                "--go_opt=paths=source_relative",
                "--go_opt=Mdata_service.proto=sbbench/pb",
                "--go-grpc_opt=paths=source_relative",
                "--go-grpc_opt=Mdata_service.proto=sbbench/pb",
                "data_service.proto",
            ]),
    )?;
    copy(&root().join("bench/go/server.go"), &server_dir.join("server.go"))?;
    let binary = bin.join("grpc-go-server");
    let mut build_server = Command::new("go");
    build_server.args(["build", "-o"]).arg(&binary).arg("sbbench/server");
    go(&mut build_server);
    run_command(&mut build_server)?;
    Ok(binary)
}

fn copy(from: &Path, to: &Path) -> Result {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}
