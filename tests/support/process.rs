//! The `streambridge` binary as a child process, for tests that need a real
//! signal or a process of its own.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{metrics_text, within};

/// The binary on an ephemeral port; killed if the test ends first.
pub struct ServerProcess {
    pub child: Child,
    pub server: super::TestAddr,
}

impl ServerProcess {
    pub async fn start(args: &[&str]) -> ServerProcess {
        Self::start_at("127.0.0.1:0", args).await
    }

    /// The binary listening on `listen` (a restart on the port it had).
    pub async fn start_at(listen: &str, args: &[&str]) -> ServerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_streambridge"))
            .args([
                "--listen",
                listen,
                "--static-dir",
                concat!(env!("CARGO_MANIFEST_DIR"), "/static"),
            ])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start streambridge");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = within("the server logs its address", async {
            loop {
                let line = lines.next_line().await.unwrap().expect("the server exited early");
                if let Some(at) = line.find("listening on ") {
                    let token = line[at + "listening on ".len()..].split_whitespace().next().unwrap();
                    break token.trim_end_matches(':').parse().unwrap();
                }
            }
        })
        .await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServerProcess {
            child,
            server: super::TestAddr(addr),
        }
    }

    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    #[allow(dead_code)] // not every test file sends it
    pub fn hangup(&self) {
        self.signal("-HUP");
    }

    fn signal(&self, which: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill").args([which, &pid]).status().unwrap();
        assert!(status.success());
    }
}

/// Waits until `/metrics` satisfies `condition`, re-reading it every 20 ms
/// (the server is another process: there is nothing to subscribe to).
pub async fn eventually(addr: std::net::SocketAddr, what: &str, condition: impl Fn(&str) -> bool) -> String {
    within(what, async {
        loop {
            let text = metrics_text(addr).await;
            if condition(&text) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
