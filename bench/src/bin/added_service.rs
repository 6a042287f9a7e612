//! Benchmark peer: streambridge as a library hosting its own tonic service,
//! as an embedder would (`ServerBuilder::add_service`), instead of the
//! built-in `DataService`. The service is the plain tonic peer's echo of the
//! same contract, so the load is the same; every transport reaches it as it
//! reaches any added service (WebSocket v2 through the generic call path).
//!
//! Usage: `bench-added-service [streambridge flags]`, e.g. `--listen 127.0.0.1:PORT`.

/// The same allocator as streambridge's binary and the other Rust peers.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../peer/tonic_echo.rs"]
#[expect(dead_code, reason = "this peer serves through streambridge, not tonic_echo::serve")]
mod tonic_echo;

use clap::Parser;
use streambridge::grpc::{DataServiceServer, FILE_DESCRIPTOR_SET};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = streambridge::Config::parse();
    let server = streambridge::Server::builder(config)
        .add_service(DataServiceServer::new(tonic_echo::LeanEcho))
        .register_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .bind()
        .await?;
    // As streambridge's own binary says it, so harnesses read both alike.
    let webtransport = server
        .webtransport_addr()
        .map(|udp| format!("WebTransport https://{udp}/ws (UDP)"))
        .unwrap_or_default();
    println!("added service listening on {}: {webtransport}", server.local_addr()?);
    server.run().await;
    Ok(())
}
