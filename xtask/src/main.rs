//! The project's chores, in Rust (`cargo xtask <verb>`), so they work the same
//! on every machine and need no shell scripts.
//!
//! - `cargo xtask test`: everything the project checks, in one command:
//!   provisions the pinned Python grpcio client, runs every Rust test, builds
//!   the WASM package, runs its wasm-bindgen tests in headless Chromium
//!   against a live server, then the end-to-end page tests (playwright-core,
//!   Debian's Chromium) and the TypeScript check. Ends with one
//!   `summary: N passed, M failed` line.
//! - `cargo xtask test-deploy`: the deployment tests (`tests/deploy.rs`):
//!   two instances behind `deploy/nginx.conf` and `deploy/haproxy.cfg`, every
//!   transport over TLS, and a rolling restart with clients streaming.
//!   Installs Debian's `nginx-light` and `haproxy` when missing (as root).
//! - `cargo xtask build-web`: the WASM package into `static/pkg/`.
//! - `cargo xtask build-chat`: `build-web`, then the chat example's page
//!   (`examples/chat/web/dist`: protoc-gen-es client on the connect-es
//!   transport).
//! - `cargo xtask serve [ARGS]`: `build-web`, then the server (release) on
//!   127.0.0.1:8080 with its page; ARGS go to `streambridge`.
//! - `cargo xtask bench [--quick] [ARGS]`: the benchmarks (`bench/`), servers
//!   and load generator pinned to different CPUs, three rounds, medians and
//!   spread, then the browser benchmark; see `docs/benchmarks.md`.
//! - `cargo xtask bench-browser [--quick]`: only the browser benchmarks (the
//!   WASM client against raw WebSocket in headless Chromium, then the
//!   connect-es transport against both).
//! - `cargo xtask mutants [ARGS]`: mutation testing of the safety-critical
//!   files with cargo-mutants; see `docs/testing.md`.
//!
//! Tools are installed when missing, at pinned versions: the
//! `wasm32-unknown-unknown` target, `wasm-bindgen-cli` at exactly the
//! `wasm-bindgen` version of `Cargo.lock`, the Python virtualenv, the npm
//! packages of `tests/e2e/package-lock.json` and
//! `examples/chat/web/package-lock.json`. Chromium and chromedriver come
//! from the system (Debian packages `chromium`, `chromium-driver`).

mod bench;
mod mutants;
mod process;
mod web;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use process::{ServerProcess, TestCounts, run, run_counted, run_counted_in_browser};

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("build-web") => web::build().map(|_| ()),
        Some("build-chat") => web::build().and_then(|_| web::build_chat_page()),
        Some("serve") => serve(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("bench-browser") => bench::run_browser(&args[1..]),
        Some("test-deploy") => test_deploy(),
        Some("mutants") => mutants::run_mutants(&args[1..]),
        _ => Err(
            "usage: cargo xtask <test | test-deploy | build-web | build-chat | serve [streambridge args] | bench [--quick] | bench-browser [--quick] | mutants [args]>"
                .to_string(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    // `cargo run` sets it at run time too; the compile-time value would be the
    // checkout the binary was first built in, which a shared target dir can
    // outlive (a cached xtask run from a new clone would work on the old one).
    let manifest_dir =
        env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where cargo puts build products; caches (the Python virtualenv) live there too.
fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn cargo() -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    // `cargo run -p xtask` describes xtask to it (`CARGO_MANIFEST_DIR`,
    // `CARGO_PKG_NAME`, ...), and ring's build script reruns when any of
    // those change: every build from here and every build from a shell then
    // rebuilt ring, rustls and tonic for the other.
    for (name, _) in env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE"].contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    command
}

fn test() -> Result {
    let python = python_venv()?;
    let mut counts = TestCounts::default();
    let outcome = (|| {
        run_counted(
            cargo()
                .args(["test", "--workspace", "--exclude", "streambridge-client", "--locked"])
                .env("STREAMBRIDGE_PYTHON", &python),
            &mut counts,
        )?;
        web::build()?;
        run(cargo().args(["build", "--bin", "streambridge", "--example", "chat", "--locked"]))?;
        web::build_chat_page()?;
        browser_tests(&mut counts)
    })();
    println!("summary: {} passed, {} failed", counts.passed, counts.failed);
    outcome
}

/// `cargo xtask test-deploy`: see the module documentation.
fn test_deploy() -> Result {
    bench::ensure_binaries(
        &[("/usr/sbin/nginx", "nginx-light"), ("/usr/sbin/haproxy", "haproxy")],
        "the deployment tests' load balancers",
    )?;
    let python = python_venv()?;
    // The page and the WASM client go through the balancers too.
    web::build()?;
    web::npm_ci(&root().join("tests/e2e"))?;
    let mut counts = TestCounts::default();
    let outcome = run_counted(
        cargo()
            .args(["test", "--locked", "--test", "deploy", "--", "--ignored", "--nocapture"])
            // Each test runs two instances, a balancer and its clients: one at a time.
            .arg("--test-threads=1")
            .env("STREAMBRIDGE_PYTHON", &python),
        &mut counts,
    );
    println!("summary: {} passed, {} failed", counts.passed, counts.failed);
    outcome
}

/// The bearer token of the server the wasm-bindgen tests talk to.
const WASM_TEST_TOKEN: &str = "wasm-test-token";

/// Where wasm-bindgen-test finds chromedriver.
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// `command` (a `cargo test` of wasm32 code, or one that runs such) set up
/// to run its tests in headless Chromium with wasm-bindgen-test.
fn in_browser(command: &mut Command) -> &mut Command {
    command
        .env(
            "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER",
            web::cargo_bin("wasm-bindgen-test-runner"),
        )
        .env("CHROMEDRIVER", CHROMEDRIVER)
        .env(
            "WASM_BINDGEN_TEST_WEBDRIVER_JSON",
            root().join("web-client/webdriver.json"),
        )
        .env("WASM_BINDGEN_TEST_TIMEOUT", "120")
}

/// The WASM client's tests and the page's, each against its own live server.
fn browser_tests(counts: &mut TestCounts) -> Result {
    if !Path::new(CHROMEDRIVER).exists() {
        return Err("chromedriver not found: apt-get install chromium chromium-driver".into());
    }
    {
        // wasm-bindgen-test serves its test page from its own origin, which
        // a default server would refuse (403): allow any origin here.
        // With a token, so the client's token option is exercised too.
        let server = ServerProcess::start(&["--allowed-origin", "*", "--auth-token", WASM_TEST_TOKEN])?;
        run_counted_in_browser(
            in_browser(cargo().args([
                "test",
                "-p",
                "streambridge-client",
                "--target",
                "wasm32-unknown-unknown",
                "--locked",
                // The tonic channel's own unit tests too; the rest is the same code.
                "--features",
                "tonic",
            ]))
            .env("STREAMBRIDGE_TEST_WS_URL", format!("ws://{}/ws", server.addr))
            .env("STREAMBRIDGE_TEST_TOKEN", WASM_TEST_TOKEN),
            counts,
        )?;
    }
    // The tonic channel: the Rust test adds the test echo to a bridge, then
    // builds and runs web-client/tonic-test in Chromium against it.
    run_counted_in_browser(
        in_browser(cargo().args(["test", "--locked", "--test", "tonic_wasm", "--", "--ignored"])),
        counts,
    )?;
    let e2e = root().join("tests/e2e");
    web::npm_ci(&e2e)?;
    // The connect-es transport: the Rust test starts the services (in
    // process and upstream) and drives tests/e2e/connect in Chromium.
    run_counted(
        cargo().args(["test", "--locked", "--test", "connect_es", "--", "--ignored"]),
        counts,
    )?;
    let server = ServerProcess::start(&[])?;
    run_counted(
        Command::new("node")
            .args(["--test", "--test-reporter=tap"])
            .current_dir(&e2e)
            .env("STREAMBRIDGE_BASE_URL", format!("http://{}", server.addr))
            // origin.test.mjs starts its own server, with an allowed origin it chooses.
            .env("STREAMBRIDGE_BIN", target_dir().join("debug/streambridge"))
            // chat.test.mjs: the chat example, serving its page.
            .env("STREAMBRIDGE_CHAT_BIN", target_dir().join("debug/examples/chat")),
        counts,
    )
}

fn serve(args: &[String]) -> Result {
    web::build()?;
    let mut command = cargo();
    command
        .args(["run", "--release", "--locked", "--bin", "streambridge", "--"])
        .args(args);
    run(&mut command)
}

/// A virtualenv with the pinned packages of `tests/python/requirements.txt`,
/// made once and remade only when the requirements change. Returns its python.
fn python_venv() -> Result<PathBuf> {
    let requirements_path = root().join("tests/python/requirements.txt");
    let requirements =
        std::fs::read_to_string(&requirements_path).map_err(|e| format!("{}: {e}", requirements_path.display()))?;
    let venv = target_dir().join("python-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join("requirements.installed");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|installed| installed == requirements) {
        return Ok(python);
    }
    let system_python = env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    run(Command::new(&system_python).args(["-m", "venv", "--clear"]).arg(&venv))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements_path))?;
    std::fs::write(&stamp, requirements).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(python)
}
