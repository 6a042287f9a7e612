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
    run_watched(command, counts, &mut |_| {})
}

/// What wasm-bindgen-test-runner prints when Chromium never finished loading
/// its test page: the page's status line was still "Loading scripts...", so
/// none of the tests' code ran. Chromium's renderer can hang at that point
/// for the whole 300 s page-load timeout (wasm-bindgen/wasm-pack#783:
/// "Timed out receiving message from renderer"); here it did in about half
/// the runs while the client's page imported five JavaScript modules, and
/// not once since they are one (`web-client/js/runtime.js`).
const PAGE_NEVER_LOADED: &str = "Loading scripts...Failed to detect test as having been run";

/// [`run_counted`] for wasm-bindgen-test in Chromium: run once more, and
/// only once, when the browser never loaded the test page (no test code
/// ran, so there is nothing of ours to retry past; a page that hangs for a
/// reason of ours hangs the second time too). Counts come from the run
/// that counts.
pub fn run_counted_in_browser(command: &mut Command, counts: &mut TestCounts) -> Result {
    let mut first = TestCounts::default();
    let mut never_loaded = false;
    let outcome = run_watched(command, &mut first, &mut |line| {
        never_loaded |= line.contains(PAGE_NEVER_LOADED);
    });
    if outcome.is_ok() || !never_loaded {
        counts.passed += first.passed;
        counts.failed += first.failed;
        return outcome;
    }
    eprintln!("xtask: Chromium never loaded the test page (a renderer hang, before any test ran): once more");
    run_counted(command, counts)
}

fn run_watched(command: &mut Command, counts: &mut TestCounts, watch: &mut dyn FnMut(&str)) -> Result {
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
        watch(&line);
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

    /// A runner that fails the first time with `first_words` in its output
    /// and passes 2 tests the next time (a marker file remembers the first).
    fn flaky_runner(marker: &std::path::Path, first_words: &str) -> Command {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!(
                "if [ -e '{marker}' ]; then echo 'test result: ok. 2 passed; 0 failed;'; \
                 else touch '{marker}'; echo 'test result: ok. 6 passed; 0 failed;'; echo '{first_words}'; exit 1; fi",
                marker = marker.display()
            ),
        ]);
        command
    }

    fn marker(name: &str) -> std::path::PathBuf {
        let marker = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        marker
    }

    #[test]
    fn a_page_that_never_loaded_runs_once_more_and_only_the_second_run_counts() {
        let marker = marker("never-loaded");
        let mut counts = TestCounts::default();
        let never_loaded = "Loading scripts...Failed to detect test as having been run. It might have timed out.";
        let outcome = run_counted_in_browser(&mut flaky_runner(&marker, never_loaded), &mut counts);
        let _ = std::fs::remove_file(&marker);
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!((counts.passed, counts.failed), (2, 0));
    }

    #[test]
    fn any_other_failure_is_not_run_again() {
        let marker = marker("other-failure");
        let mut counts = TestCounts::default();
        let timed_out = "Running tests...Failed to detect test as having been run. It might have timed out.";
        let outcome = run_counted_in_browser(&mut flaky_runner(&marker, timed_out), &mut counts);
        let _ = std::fs::remove_file(&marker);
        assert!(outcome.is_err());
        assert_eq!((counts.passed, counts.failed), (6, 0));
    }
}
