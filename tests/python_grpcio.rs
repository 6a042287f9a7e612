//! A client nobody on this project wrote: Python grpcio, with stubs that
//! grpcio-tools generates from the seed's proto, streaming through the server.
//!
//! The interpreter comes from `STREAMBRIDGE_PYTHON`, or the virtualenv that
//! `cargo xtask test` provisions; without either the test fails and says how
//! to get one (it never silently skips).

mod support;

use std::process::Stdio;

use streambridge::Transport;
use support::{ServerAddr, TestServer, within};

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_with_stubs_from_the_seed_proto_streams_through_the_server() {
    let server = TestServer::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpcio_client.py");
    let child = tokio::process::Command::new(support::python())
        .arg(script)
        .arg(server.addr.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python client");
    let output = within("python client", child.wait_with_output())
        .await
        .expect("python client output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON summary line");
    assert_eq!(summary["seed_usage"], 5);
    assert_eq!(summary["pipelined"], 1000);
    assert_eq!(summary["interleaved"], 20);
    within("calls released", server.calls.wait_for(Transport::Grpc, 0)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_streams_still_sending_at_sigterm_read_the_drain_status_not_a_reset() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let process = support::process::ServerProcess::start(&[]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpcio_client.py");
    let mut child = tokio::process::Command::new(support::python())
        .arg(script)
        .arg(process.server.0.to_string())
        .arg("sending-at-shutdown")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python client");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within("every stream has replies", lines.next_line()).await.unwrap();
    assert_eq!(first.as_deref(), Some("READY"));

    process.terminate();

    let report = within("every stream ends", lines.next_line())
        .await
        .unwrap()
        .expect("a JSON report");
    let outcomes: Vec<serde_json::Value> = serde_json::from_str(&report).expect("JSON report");
    assert_eq!(outcomes.len(), 8, "{report}");
    for outcome in &outcomes {
        assert_eq!(outcome["code"], "UNAVAILABLE", "{report}");
        assert_eq!(
            outcome["details"], "server is shutting down; reconnect and retry",
            "{report}"
        );
    }
    let mut server = process.child;
    assert!(within("the server exits", server.wait()).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_streams_through_a_bridge_in_front_of_another_bridge() {
    // The upstream here is a second streambridge serving the built-in DataService.
    let inner = TestServer::start().await;
    let inner_url = inner.http_url("");
    let bridge = TestServer::start_with(|config| config.upstream = Some(inner_url.parse().unwrap())).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpcio_client.py");
    let output = within(
        "python client",
        tokio::process::Command::new(support::python())
            .arg(script)
            .arg(bridge.addr.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON summary line");
    assert_eq!(summary["seed_usage"], 5);
    assert_eq!(summary["pipelined"], 1000);
    assert_eq!(summary["interleaved"], 20);
}
