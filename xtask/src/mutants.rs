//! `cargo xtask mutants [ARGS]`: mutation testing of the safety-critical code
//! with cargo-mutants (installed at a pinned version when missing; never part
//! of `cargo xtask test` or CI's default path: a full run takes hours on two
//! cores).
//!
//! Each mutant (a function body replaced by a default value, an operator
//! flipped, a condition negated) is built and the Rust tests of the server
//! are run against it; a mutant the tests do not catch marks behaviour no
//! test guards. The files are the ones whose failure a user would feel as a
//! security or reliability bug: backpressure and limits, connection
//! deadlines, the gRPC framing checks, auth, origins, shutdown, the error
//! table. ARGS go to cargo-mutants (e.g. `--file server/policy/auth.rs` to narrow a
//! run, `--list` to see the mutants). Results: `target/mutants/mutants.out/`
//! (`caught.txt`, `missed.txt`, `timeout.txt`, `unviable.txt`); the report
//! per file is kept in `docs/testing.md`.

use std::process::Command;

use crate::process::run;
use crate::{Result, cargo, target_dir};

/// The cargo-mutants version this project's reports were made with.
const CARGO_MUTANTS_VERSION: &str = "27.1.0";

/// The safety-critical files (see the module docs).
const FILES: [&str; 14] = [
    "server/transport/websocket/*.rs",
    "server/net/listener.rs",
    "server/net/connection.rs",
    "server/transport/grpc_framing.rs",
    "server/policy/auth.rs",
    "server/policy/origin.rs",
    "server/ops/shutdown.rs",
    "server/error.rs",
    "server/config.rs",
    "server/transport/static_files.rs",
    "server/backend/upstream.rs",
    "server/backend/descriptors.rs",
    "server/transport/websocket/v2/*.rs",
    "server/ops/calls.rs",
];

/// The tests run against each mutant: the server's own, without the ones
/// that need Python or a browser (the Rust suites cover the same code).
const TEST_ARGS: [&str; 19] = [
    "--lib",
    "--test",
    "grpc",
    "--test",
    "abuse",
    "--test",
    "hardening",
    "--test",
    "websocket",
    "--test",
    "grpc_web",
    "--test",
    "http",
    "--test",
    "process",
    "--test",
    "upstream",
    "--test",
    "websocket_v2",
];

pub fn run_mutants(args: &[String]) -> Result {
    install()?;
    let mut command = cargo();
    command
        .args(["mutants", "--package", "streambridge", "--no-shuffle"])
        .arg("--output")
        .arg(target_dir().join("mutants"));
    // With --file in ARGS the caller narrows the run; otherwise every safety-critical file.
    if !args.iter().any(|a| a == "--file" || a.starts_with("--file=")) {
        for file in FILES {
            command.args(["--file", file]);
        }
    }
    command.args(args).arg("--").args(TEST_ARGS);
    run(&mut command)
}

fn install() -> Result {
    let installed = Command::new("cargo")
        .args(["mutants", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_MUTANTS_VERSION));
    if installed {
        return Ok(());
    }
    run(Command::new("cargo").args([
        "install",
        "--locked",
        "cargo-mutants",
        "--version",
        CARGO_MUTANTS_VERSION,
    ]))
}
