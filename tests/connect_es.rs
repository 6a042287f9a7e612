//! The connect-es transport (`streambridge-client/connect`) end to end:
//! this test starts the bridges, a service added in process and an
//! upstream behind a second bridge (both the test echo of
//! `tests/proto/echo.proto`: every call type, metadata, deadlines, rich
//! errors), then runs `tests/e2e/connect/connect-es.mjs`, which generates
//! the clients with protoc-gen-es, bundles them with esbuild and drives them
//! in headless Chromium; last it checks that the calls the page aborted
//! were cancelled on the servers.
//!
//! Ignored by plain `cargo test`: it needs the WASM package and the e2e
//! node modules, which `cargo xtask test` builds and then runs it.

mod support;

use support::upstream::EchoUpstream;
use support::{ServerAddr, TestServer, webtransport, within};

#[tokio::test]
#[ignore = "needs static/pkg and tests/e2e/node_modules: cargo xtask test runs it"]
async fn connect_es_clients_run_on_the_transport_through_an_added_service_and_an_upstream() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let static_dir = std::env::temp_dir().join(format!("streambridge-connect-es-{}", std::process::id()));
    std::fs::create_dir_all(&static_dir).unwrap();
    let page = static_dir.clone();
    let (added, mut added_cancelled) = EchoUpstream::added_to_bridge(|config| config.static_dir = page).await;
    let mut upstream = EchoUpstream::start().await;
    let upstream_url: http::Uri = upstream.url().parse().unwrap();
    let page = static_dir.clone();
    let bridge = TestServer::start_with(move |config| {
        config.static_dir = page;
        config.upstream = Some(upstream_url);
    })
    .await;
    // The added service again, behind a bridge with TLS and WebTransport.
    let cert = webtransport::cert().await;
    let page = static_dir.clone();
    let (over_wt, mut over_wt_cancelled) = EchoUpstream::added_to_bridge(|config| {
        config.static_dir = page;
        cert.configure(config);
    })
    .await;
    let hash: String = cert.hash.as_ref().iter().map(|byte| format!("{byte:02x}")).collect();
    let bridges = serde_json::json!([
        { "name": "an added service", "address": added.addr().to_string() },
        { "name": "an upstream", "address": bridge.addr().to_string() },
        {
            "name": "an added service",
            "address": over_wt.addr().to_string(),
            "webtransport": over_wt.webtransport.expect("WebTransport is on").to_string(),
            "hash": hash,
        },
    ]);

    let node = tokio::process::Command::new("node")
        .args(["--test", "--test-reporter=spec", "connect/connect-es.mjs"])
        .current_dir(root.join("tests/e2e"))
        .env("STREAMBRIDGE_STATIC_DIR", &static_dir)
        .env("STREAMBRIDGE_BRIDGES", bridges.to_string())
        .status();
    let status = tokio::time::timeout(std::time::Duration::from_secs(300), node)
        .await
        .expect("the browser test ends within 5 minutes")
        .expect("node runs");
    let _ = std::fs::remove_dir_all(&static_dir);
    assert!(status.success(), "tests/e2e/connect/connect-es.mjs failed: {status}");

    // The page's AbortSignal (and its deadline) ended the calls on the servers too.
    for cancelled in [&mut added_cancelled, &mut upstream.cancelled, &mut over_wt_cancelled] {
        let mut seen = Vec::new();
        while !(seen.contains(&"server_stream") && seen.contains(&"unary")) {
            seen.push(
                within("the servers see the cancellations", cancelled.recv())
                    .await
                    .unwrap(),
            );
        }
    }
}
