//! Running commands: plainly, with their test counts read from their output,
//! and the streambridge server as a child process on an ephemeral port.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::{Result, root, target_dir};

/// Runs `command`, failing with its description if it fails.
pub fn run(command: &mut Command) -> Result {
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

/// Tests counted across every runner of `cargo xtask test`.
#[derive(Default)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
}

impl TestCounts {
    /// Reads a runner's closing line: libtest's (cargo, wasm-bindgen-test)
    /// `test result: ok. 3 passed; 0 failed; …` or TAP's `# pass 3` / `# fail 0`.
    fn record(&mut self, line: &str) {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(number)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(number) = number.parse::<u64>() else { continue };
                match kind {
                    "passed" => self.passed += number,
                    "failed" => self.failed += number,
                    _ => {}
                }
            }
        } else if let Some(number) = line.strip_prefix("# pass ").and_then(|n| n.parse::<u64>().ok()) {
            self.passed += number;
        } else if let Some(number) = line.strip_prefix("# fail ").and_then(|n| n.parse::<u64>().ok()) {
            self.failed += number;
        }
    }
}

/// Runs a test command, echoing its output and adding its counts.
pub fn run_counted(command: &mut Command, counts: &mut TestCounts) -> Result {
    let description = format!("{command:?}");
    eprintln!("xtask: running {description}");
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {description}: {e}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading {description}: {e}"))?;
        println!("{line}");
        counts.record(&line);
    }
    let status = child.wait().map_err(|e| format!("{description}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{description} failed: {status}"))
    }
}

/// The debug `streambridge` binary, listening on 127.0.0.1 at a port the OS
/// picked; killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub addr: String,
}

impl ServerProcess {
    pub fn start(extra_args: &[&str]) -> Result<ServerProcess> {
        let mut command = Command::new(target_dir().join("debug/streambridge"));
        command.args(extra_args);
        Self::spawn(command)
    }

    /// Runs `command` (a streambridge binary, or a wrapper such as `taskset`
    /// around one) on 127.0.0.1:0 with the page.
    pub fn spawn(mut command: Command) -> Result<ServerProcess> {
        let description = format!("{command:?}");
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--static-dir"])
            .arg(root().join("static"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {description}: {e}"))?;
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        // The server logs its bound address first; the OS chose the port.
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                return Err("the server exited before it logged its address".into());
            };
            if let Some(at) = line.find("listening on ") {
                let token = line[at + "listening on ".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or_default();
                break token.trim_end_matches(':').to_string();
            }
        };
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        eprintln!("xtask: server listening on {addr}");
        Ok(ServerProcess { child, addr })
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_read_from_libtest_and_tap_closing_lines() {
        let mut counts = TestCounts::default();
        counts.record("test result: ok. 14 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        counts.record("test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        counts.record("# pass 3");
        counts.record("# fail 0");
        counts.record("ok 1 - some test");
        assert_eq!((counts.passed, counts.failed), (19, 1));
    }
}
