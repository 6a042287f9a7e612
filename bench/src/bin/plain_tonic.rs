//! Benchmark peer: a plain tonic server with the same `DataService` and
//! nothing else (no gRPC-Web, no WebSocket, no call accounting, no shutdown
//! drain). The reply stream maps the inbound `Streaming` directly, the
//! leanest shape tonic offers, so it is the bar that streambridge's native
//! gRPC path has to match.
//!
//! Usage: `bench-plain-tonic --listen 127.0.0.1:PORT`.

/// The same allocator as streambridge's binary and the other Rust peers.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../peer/tonic_echo.rs"]
mod tonic_echo;

use streambridge::grpc::DataServiceServer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_echo::serve("plain tonic", DataServiceServer::new(tonic_echo::LeanEcho)).await
}
