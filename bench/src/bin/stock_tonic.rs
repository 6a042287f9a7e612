//! Benchmark peer: `DataService` in tonic exactly as `tonic-prost-build`
//! generates it by default (tonic-prost's codec, 8 KiB encode and decode
//! buffers per stream), the reply stream mapping the inbound `Streaming`
//! directly. Beside `bench-plain-tonic` (the same with streambridge's 1 KiB
//! codec buffers) it shows what that tuning changes; beside streambridge, what
//! a user of stock tonic would see.
//!
//! Usage: `bench-stock-tonic --listen 127.0.0.1:PORT`.

/// The same allocator as streambridge and the other Rust peers.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../peer/tonic_echo.rs"]
#[allow(
    dead_code,
    reason = "this peer serves tonic's default codegen, not LeanEcho (unused only outside tests)"
)]
mod tonic_echo;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

use generated::data_service_server::{DataService, DataServiceServer};
use streambridge_protocol::StreamRequest;
use tonic::{Request, Response, Status, Streaming};
use tonic_echo::ReplyStream;

/// The `DataService` tonic's code generator makes by default.
struct StockDataService;

#[tonic::async_trait]
impl DataService for StockDataService {
    type BidirectionalStreamStream = ReplyStream;

    async fn bidirectional_stream(
        &self,
        request: Request<Streaming<StreamRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        Ok(tonic_echo::echo(request))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_echo::serve("stock tonic", DataServiceServer::new(StockDataService)).await
}
