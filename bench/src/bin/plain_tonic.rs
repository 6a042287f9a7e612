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

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use streambridge::grpc::{DataService, DataServiceServer};
use streambridge_protocol::{StreamRequest, StreamResponse};
use tonic::{Request, Response, Status, Streaming};

type ReplyStream = Pin<Box<dyn Stream<Item = Result<StreamResponse, Status>> + Send>>;

/// The seed's semantics: one `"processed: " + data` per request, in order.
struct PlainDataService;

#[tonic::async_trait]
impl DataService for PlainDataService {
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
    println!("plain tonic listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(DataServiceServer::new(PlainDataService))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
