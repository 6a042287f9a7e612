//! The accept loop: one TCP port, HTTP/1.1 and HTTP/2 (prior knowledge, or
//! ALPN under TLS) by hyper-util's auto builder, with the connection settings
//! `axum::serve` does not expose:
//!
//! - `TCP_NODELAY` on every socket (replies are small and latency matters);
//! - an HTTP/1 header-read timeout, which also bounds the TLS handshake, so a
//!   slowloris client is cut off;
//! - HTTP/2: a limit of concurrent streams per connection (hyper's default of
//!   200 would make the 201st gRPC call wait forever), a cap on pending resets
//!   (the "rapid reset" attack), keepalive PINGs with a timeout, a maximum
//!   header list size;
//! - a cap on open connections: past it, a new connection is closed right
//!   after accept, and the ones already open keep working;
//! - a first request within the header-read timeout of accept, and a request
//!   now and then after that ([`super::connection`]), so a connection that
//!   sends nothing cannot keep its place under the cap;
//! - a per-connection bound on the bytes of unfinished gRPC messages
//!   ([`crate::transport::grpc_framing`]), handed to the calls in the request extensions.
//!
//! Each connection is a task on the server's `TaskTracker`; when the shutdown
//! token fires the loop stops accepting and every connection is asked to
//! finish gracefully (HTTP/2 GOAWAY, HTTP/1 close after the response).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::connection::{Activity, Expiry, TrackRequests, WatchedIo};
use super::message_buffer::MessageBuffer;
use crate::config::Config;
use crate::ops::metrics::{ConnectionGauge, Metrics};

/// The client's address, put in every request's extensions for logging.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// A connection's place under the connection cap and in the open-connections
/// gauge. Every request carries a clone, so a connection that leaves hyper
/// (a WebSocket upgrade) keeps its place until its socket closes too.
#[derive(Clone)]
pub struct ConnectionLease(#[allow(dead_code)] Arc<(OwnedSemaphorePermit, ConnectionGauge)>);

/// A connection that received RST streams faster than this is reset itself
/// (the HTTP/2 "rapid reset" attack, CVE-2023-44487).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 50;

/// What the accept loop needs besides the service.
pub struct ListenerSettings {
    pub tls: Option<TlsAcceptor>,
    pub metrics: Arc<Metrics>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

/// Serves `service` on `listener` until the shutdown token fires.
pub async fn accept_loop<S>(listener: TcpListener, service: S, config: &Config, settings: ListenerSettings)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + Unpin + 'static,
{
    let builder = connection_builder(config);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let deadlines = Deadlines {
        first_request: config.http1_header_read_timeout,
        idle: config.connection_idle_timeout,
    };
    let message_buffer_limit = config.connection_message_buffer;
    let ListenerSettings {
        tls,
        metrics,
        tasks,
        shutdown,
    } = settings;
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Per connection at debug only: a flood must not flood the log too.
            tracing::debug!(%peer, limit = config.max_connections, "connection limit reached; closing new connection");
            metrics.connection_refused();
            drop(stream);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let lease = ConnectionLease(Arc::new((slot, metrics.connection_opened())));
        let message_buffer = MessageBuffer::new(message_buffer_limit);
        let service = service.clone().map_request(move |request: Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(PeerAddr(peer));
            request.extensions_mut().insert(lease.clone());
            request.extensions_mut().insert(message_buffer.clone());
            request
        });
        let (builder, tls, shutdown) = (builder.clone(), tls.clone(), shutdown.clone());
        let span = tracing::debug_span!("connection", %peer);
        tasks.spawn(
            async move {
                let activity = Activity::new();
                let connection = Connection {
                    builder: &builder,
                    activity: activity.clone(),
                    deadlines,
                    shutdown,
                };
                match tls {
                    None => connection.serve(stream, service).await,
                    Some(tls) => {
                        let handshake =
                            tokio::time::timeout_at(activity.deadline(deadlines.first_request), tls.accept(stream));
                        match handshake.await {
                            Ok(Ok(stream)) => connection.serve(stream, service).await,
                            Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// The timeouts every connection is held to (see [`super::connection`]).
#[derive(Clone, Copy)]
struct Deadlines {
    /// From accept to a complete request head or HTTP/2 handshake.
    first_request: Duration,
    /// With no request in progress.
    idle: Duration,
}

/// One accepted connection, ready to be served.
struct Connection<'a> {
    builder: &'a auto::Builder<TokioExecutor>,
    activity: Arc<Activity>,
    deadlines: Deadlines,
    shutdown: CancellationToken,
}

impl Connection<'_> {
    /// Serves the connection until it ends. It is wound down gracefully when
    /// the server shuts down or the connection idles, and dropped outright if
    /// no request came in time (there is nothing to wind down).
    async fn serve<I, S>(self, io: I, service: S)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + Unpin + 'static,
    {
        let io = TokioIo::new(WatchedIo::new(io, self.activity.clone()));
        let service = TrackRequests::new(service, self.activity.clone());
        let connection = self
            .builder
            .serve_connection_with_upgrades(io, TowerToHyperService::new(service));
        let mut connection = std::pin::pin!(connection);
        let expired = self.activity.expired(self.deadlines.first_request, self.deadlines.idle);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = self.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            expiry = expired => match expiry {
                Expiry::NoRequest => {
                    tracing::debug!(timeout = ?self.deadlines.first_request, "no request in time; closing");
                    return;
                }
                Expiry::Idle => {
                    tracing::debug!(timeout = ?self.deadlines.idle, "connection idle; winding it down");
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            },
        };
        if let Err(error) = result {
            tracing::debug!(%error, "connection ended with an error");
        }
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
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .keep_alive_interval(config.http2_keepalive_interval)
        .keep_alive_timeout(config.http2_keepalive_timeout)
        .max_header_list_size(config.http2_max_header_list_size);
    builder
}
