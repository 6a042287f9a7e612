//! The accept loop: one TCP port, HTTP/1.1 and HTTP/2 (prior knowledge) by
//! hyper-util's auto builder, with the connection settings `axum::serve` does
//! not expose: `TCP_NODELAY`, an HTTP/1 header-read timeout against slowloris
//! clients, and a raised limit of concurrent HTTP/2 streams (hyper's default
//! of 200 would make the 201st gRPC call on a connection wait forever).
//!
//! Each connection is a task on the server's [`TaskTracker`]; when the
//! shutdown token fires the loop stops accepting and every connection is
//! asked to finish gracefully (HTTP/2 GOAWAY, HTTP/1 close after the response).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::config::Config;

/// The client's address, put in every request's extensions for logging.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// A connection that received RST streams faster than this is reset itself
/// (the HTTP/2 "rapid reset" attack, CVE-2023-44487).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 50;

/// Serves `service` on `listener` until `shutdown` fires.
pub async fn accept_loop<S>(
    listener: TcpListener,
    service: S,
    config: &Config,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let builder = connection_builder(config);
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let service = service.clone().map_request(move |request: Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(PeerAddr(peer));
            request
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("connection", %peer);
        tasks.spawn(
            async move {
                let mut connection = std::pin::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
}

fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.http1_header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS);
    builder
}
