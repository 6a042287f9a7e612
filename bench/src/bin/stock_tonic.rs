//! Benchmark peer: `DataService` in tonic exactly as `tonic-prost-build`
//! generates it by default (tonic-prost's codec, 8 KiB encode and decode
//! buffers per stream), the reply stream mapping the inbound `Streaming`
//! directly. Beside `bench-plain-tonic` (the same with streambridge's 1 KiB
//! codec buffers) it shows what that tuning changes; beside streambridge, what
//! a user of stock tonic would see.
//!
//! Usage: `bench-stock-tonic --listen 127.0.0.1:PORT`.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use streambridge_protocol::{StreamRequest, StreamResponse};
use tonic::{Request, Response, Status, Streaming};

/// The same allocator as streambridge and the other Rust peers.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

use generated::data_service_server::{DataService, DataServiceServer};

type ReplyStream = Pin<Box<dyn Stream<Item = Result<StreamResponse, Status>> + Send>>;

/// The seed's semantics: one `"processed: " + data` per request, in order.
struct StockDataService;

#[tonic::async_trait]
impl DataService for StockDataService {
    type BidirectionalStreamStream = ReplyStream;

    async fn bidirectional_stream(
        &self,
        request: Request<Streaming<StreamRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let replies = request.into_inner().map(|item| {
            item.map(|request| StreamResponse {
                result: format!("processed: {}", request.data),
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen: SocketAddr = match std::env::args().skip_while(|a| a != "--listen").nth(1) {
        Some(addr) => addr.parse()?,
        None => "127.0.0.1:50051".parse()?,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("stock tonic listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(DataServiceServer::new(StockDataService))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
