//! The `streambridge` binary: parse the configuration, set up logging, serve
//! until SIGINT/SIGTERM, drain. Everything else lives in the library.

use std::process::ExitCode;

/// jemalloc rather than glibc's malloc: measured at 10 000 idle WebSockets it
/// keeps 4.3 KiB resident per socket where glibc keeps 7.1 KiB (its per-thread
/// arenas fragment under many small, long-lived allocations), and gRPC streams
/// stay at 4.3 KiB (mimalloc, also tried, doubled those). See docs/benchmarks.md.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::io::IsTerminal;

use clap::Parser;
use streambridge::{Config, LogFormat, Server, termination_signal};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        // Colour codes only for a person at a terminal, never into a file or a collector.
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    match config.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let server = match Server::bind(config.clone()).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("streambridge: {error}");
            return ExitCode::FAILURE;
        }
    };
    let address = server
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.listen.to_string());
    let (scheme, ws) = if config.tls_cert.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let webtransport = server
        .webtransport_addr()
        .map(|udp| format!("; WebTransport https://{udp}/ws (UDP)"))
        .unwrap_or_default();
    tracing::info!(
        "streambridge listening on {address}: page {scheme}://{address}/, WebSocket {ws}://{address}/ws, gRPC and gRPC-Web on the same port{webtransport}"
    );
    let shutdown = server.shutdown_token();
    tokio::spawn(async move {
        termination_signal().await;
        tracing::info!("signal received; draining");
        shutdown.cancel();
    });
    if server.run().await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
