//! The project's chores, in Rust (`cargo xtask <verb>`), so they work the same
//! on every machine and need no shell scripts.
//!
//! - `cargo xtask test`: everything the project checks: provisions the pinned
//!   Python grpcio client in a virtualenv, then runs every Rust test,
//!   the integration tests included.
//! - `cargo xtask serve [ARGS]`: runs the server on 127.0.0.1:8080 with its
//!   page; ARGS go to `streambridge`.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("serve") => serve(&args[1..]),
        _ => Err(usage()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    "usage: cargo xtask <test | serve [streambridge args]>".to_string()
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
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
    command
}

/// Runs `command`, failing with its description if it fails.
fn run(command: &mut Command) -> Result {
    let description = format!("{command:?}");
    eprintln!("xtask: running {description}");
    let status = command
        .status()
        .map_err(|e| format!("cannot start {description}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{description} failed: {status}"))
    }
}

fn test() -> Result {
    let python = python_venv()?;
    run(cargo()
        .args(["test", "--workspace", "--exclude", "streambridge-client", "--locked"])
        .env("STREAMBRIDGE_PYTHON", &python))
}

fn serve(args: &[String]) -> Result {
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
        fs::read_to_string(&requirements_path).map_err(|e| format!("{}: {e}", requirements_path.display()))?;
    let venv = target_dir().join("python-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join("requirements.installed");
    if python.exists() && fs::read_to_string(&stamp).is_ok_and(|installed| installed == requirements) {
        return Ok(python);
    }
    let system_python = env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    run(Command::new(&system_python).args([
        OsStr::new("-m"),
        OsStr::new("venv"),
        OsStr::new("--clear"),
        venv.as_os_str(),
    ]))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements_path))?;
    fs::write(&stamp, requirements).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(python)
}
