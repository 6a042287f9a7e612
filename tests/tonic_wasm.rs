//! tonic clients in the browser (`streambridge-client`'s `tonic` feature)
//! end to end: this test adds the test echo of `tests/proto/echo.proto` to a
//! bridge, then builds and runs `web-client/tonic-test` (a client generated
//! by tonic-prost-build, in wasm32) in headless Chromium against it with
//! wasm-bindgen-test; last it checks that the calls the page dropped were
//! cancelled at the service.
//!
//! Ignored by plain `cargo test`: it needs the wasm32 target, chromedriver and
//! wasm-bindgen-test-runner, which `cargo xtask test` provides (and passes in
//! the environment: `CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER`, `CHROMEDRIVER`).

mod support;

use support::upstream::EchoUpstream;
use support::{ServerAddr, webtransport, within};

#[tokio::test]
#[ignore = "needs the wasm32 target, chromedriver and wasm-bindgen-test-runner: cargo xtask test runs it"]
async fn a_tonic_generated_client_runs_in_the_browser_over_the_channel() {
    // wasm-bindgen-test serves its page from an origin of its own.
    let (bridge, mut cancelled) =
        EchoUpstream::added_to_bridge(|config| config.allowed_origins = vec!["*".into()]).await;
    // The same service behind a bridge with TLS and WebTransport.
    let cert = webtransport::cert().await;
    let (over_wt, _) = EchoUpstream::added_to_bridge(|config| {
        config.allowed_origins = vec!["*".into()];
        cert.configure(config);
    })
    .await;
    let hash: String = cert.hash.as_ref().iter().map(|byte| format!("{byte:02x}")).collect();
    let over_wt = webtransport::WtServer::new(over_wt, cert);

    let mut cargo = tokio::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .args([
            "test",
            "-p",
            "streambridge-tonic-test",
            "--target",
            "wasm32-unknown-unknown",
            "--locked",
        ])
        // Panics and console output of a failing test are shown with it.
        .args(["--", "--nocapture"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("STREAMBRIDGE_TEST_WS_URL", format!("ws://{}/ws", bridge.addr()))
        .env("STREAMBRIDGE_TEST_WT_URL", format!("https://{}/ws", over_wt.udp))
        .env("STREAMBRIDGE_TEST_WT_HASH", hash)
        .kill_on_drop(true);
    // What cargo set for this test's own build would leak into that one's.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_") || name.starts_with("CARGO_MANIFEST_") || name == "CARGO_CRATE_NAME" {
            cargo.env_remove(name.as_ref());
        }
    }
    let status = tokio::time::timeout(std::time::Duration::from_secs(900), cargo.status())
        .await
        .expect("the wasm tests are built and run within 15 minutes")
        .expect("cargo runs");
    assert!(
        status.success(),
        "web-client/tonic-test failed in the browser: {status}"
    );

    // Dropping the response streams ended the calls at the service.
    let mut seen = Vec::new();
    while !(seen.contains(&"server_stream") && seen.contains(&"bidi")) {
        seen.push(
            within("the service sees the dropped calls cancelled", cancelled.recv())
                .await
                .unwrap(),
        );
    }
}
