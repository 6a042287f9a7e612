//! What the two tonic benchmark peers (`bench-plain-tonic`,
//! `bench-stock-tonic`) share: the seed's reply logic in its leanest tonic
//! shape (the inbound `Streaming` mapped, no task, no channel) and the
//! server around it. They differ only in the generated `DataService` they
//! implement (which codec buffers it uses), so each binary is that trait's
//! impl, calling [`echo`], and a `main` calling [`serve`]; the lean one
//! ([`LeanEcho`]) is here, shared with `bench-added-service`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use streambridge_protocol::{StreamRequest, StreamResponse};
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

/// The reply stream of both peers.
pub type ReplyStream = Pin<Box<dyn Stream<Item = Result<StreamResponse, Status>> + Send>>;

/// The seed's semantics: one `"processed: " + data` per request, in order.
pub fn echo(request: Request<Streaming<StreamRequest>>) -> Response<ReplyStream> {
    let replies = request.into_inner().map(|item| {
        item.map(|request| StreamResponse {
            result: format!("processed: {}", request.data),
        })
    });
    Response::new(Box::pin(replies))
}

/// The echo as streambridge's generated `DataService` (its 1 KiB codec
/// buffers): the plain tonic peer's service, and the one
/// `bench-added-service` adds to streambridge.
pub struct LeanEcho;

#[tonic::async_trait]
impl streambridge::grpc::DataService for LeanEcho {
    type BidirectionalStreamStream = ReplyStream;

    async fn bidirectional_stream(
        &self,
        request: Request<Streaming<StreamRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        Ok(echo(request))
    }
}

/// Serves `service` alone on `--listen ADDR` (default 127.0.0.1:50051), with
/// `TCP_NODELAY`, and logs `NAME listening on ADDR`.
pub async fn serve<S>(name: &str, service: S) -> Result<(), Box<dyn std::error::Error>>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listen: SocketAddr = match std::env::args().skip_while(|a| a != "--listen").nth(1) {
        Some(addr) => addr.parse()?,
        None => "127.0.0.1:50051".parse()?,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("{name} listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
