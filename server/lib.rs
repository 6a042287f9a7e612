//! streambridge: one port, four ways in, one stream processor.
//!
//! A client reaches `DataService.BidirectionalStream` by native gRPC (HTTP/2),
//! by gRPC-Web (browsers, HTTP/1.1 or HTTP/2), or by WebSocket frames bridged
//! into the same call; the same port serves the web page and its WASM client.
//! Whatever the way in, the replies come from the one [`processor`].
//!
//! # Layout
//!
//! - [`config`]: every flag and limit, with its environment variable and default.
//! - [`processor`]: the call's logic, `Stream` of requests to `Stream` of
//!   replies; knows no transport.
//! - [`grpc`]: native gRPC, the tonic service adapting tonic's types to the processor.
//! - `grpc_codec`: tonic-prost with small per-stream buffers.
//! - [`grpc_web`]: tonic-web and CORS around the same service, for browsers.
//! - `websocket`: the `/ws` upgrade and the bridged call (protocol v1).
//! - `static_files`: the page and the WASM package.
//! - [`router`]: which transport a request belongs to (content type, path).
//! - `listener`: the accept loop and per-connection HTTP settings.
//! - `shutdown`: signal handling and the drain deadline.
//! - [`error`]: how calls fail, and the one mapping to gRPC status and close code.
//! - [`calls`]: live calls per transport.
//!
//! Dependencies point inwards: transports depend on the processor, never the
//! reverse. The wire types and the WebSocket envelope codec live in the
//! `streambridge-protocol` crate, which the WASM client compiles too.

mod auth;
pub mod calls;
pub mod config;
pub mod error;
pub mod grpc;
mod grpc_codec;
pub mod grpc_web;
mod listener;
pub mod metrics;
mod operations;
pub mod origin;
pub mod processor;
mod shutdown;
mod static_files;
mod tls;
mod websocket;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::routing::{any, get, post};
use http::{Method, Request, Response, header};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::steer::Steer;
use tower::util::BoxCloneSyncService;

pub use calls::{ActiveCalls, Transport};
pub use config::Config;
pub use shutdown::termination_signal;

/// Any of the server's HTTP services, type-erased so the router can pick one.
pub type HttpService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The server's whole HTTP surface: one service per transport, and the
/// function that picks one for each request.
pub type TransportRouter = Steer<HttpService, fn(&Request<Body>, &[HttpService]) -> usize, Request<Body>>;

/// What every request handler may need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    calls: ActiveCalls,
    origins: origin::OriginPolicy,
    websocket: Arc<websocket::CallSettings>,
    auth: auth::Auth,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl AppState {
    /// The state for `config`; fails if the token file cannot be read.
    pub fn new(config: &Config) -> io::Result<AppState> {
        Ok(AppState {
            calls: ActiveCalls::default(),
            origins: origin::OriginPolicy::new(&config.allowed_origins),
            websocket: Arc::new(websocket::CallSettings {
                max_message_size: config.max_message_size,
                read_buffer_size: config.ws_read_buffer_size,
                write_buffer_size: config.ws_write_buffer_size,
                request_queue: config.ws_request_queue,
                close_timeout: config.ws_close_timeout,
                ping_interval: config.ws_ping_interval,
            }),
            auth: auth::Auth::new(config.bearer_token()?),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }
}

/// The whole HTTP surface of the server: classifies each request by its
/// content type (and path) and hands it to exactly one transport.
pub fn router(config: &Config, state: AppState) -> TransportRouter {
    let data_service = grpc::GrpcDataService::server(
        state.calls.clone(),
        state.shutdown.clone(),
        config.max_message_size,
        state.auth.clone(),
    );
    let grpc_routes = tonic::service::Routes::new(data_service)
        .add_service(operations::health_service(state.shutdown.clone()))
        .add_service(operations::reflection_service());
    let grpc = HttpService::new(tower::ServiceExt::<Request<Body>>::map_response(
        grpc_routes.clone(),
        |response: Response<tonic::body::Body>| response.map(Body::new),
    ));
    let grpc_web = grpc_web::service(grpc_routes, state.origins.clone());
    let files = static_files::service(&config.static_dir);
    let web = HttpService::new(
        axum::Router::new()
            .route("/ws", any(websocket::upgrade))
            .route("/metrics", get(operations::metrics))
            // POST to a gRPC-shaped path without a gRPC content type: say why
            // it fails; every other method there is a plain file request.
            .route(
                "/{service}/{method}",
                post(grpc_without_grpc_content_type).fallback(files.clone()),
            )
            .fallback(files)
            .with_state(state),
    );
    // The order matches `classify`.
    Steer::new(
        vec![grpc, grpc_web, web],
        |request: &Request<Body>, _: &[HttpService]| classify(request) as usize,
    )
}

/// Which service of [`router`] a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// `application/grpc[+proto]`: straight to tonic, no translation, no CORS.
    Grpc = 0,
    /// `application/grpc-web[-text][+proto]`, or a CORS preflight (only
    /// gRPC-Web calls are cross-origin HTTP requests worth allowing).
    GrpcWeb = 1,
    /// Everything else: `/ws`, the page, 404s.
    Web = 2,
}

fn classify(request: &Request<Body>) -> Route {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if content_type.starts_with(b"application/grpc-web") {
        Route::GrpcWeb
    } else if content_type.starts_with(b"application/grpc") {
        Route::Grpc
    } else if request.method() == Method::OPTIONS
        && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        Route::GrpcWeb
    } else {
        Route::Web
    }
}

/// A POST to a gRPC-shaped path that is not gRPC: the caller probably forgot
/// the content type, so say which ones are understood.
async fn grpc_without_grpc_content_type() -> (http::StatusCode, &'static str) {
    let message = "415 unsupported media type: gRPC methods take content-type application/grpc (native gRPC) \
                   or application/grpc-web, application/grpc-web-text (gRPC-Web)\n";
    (http::StatusCode::UNSUPPORTED_MEDIA_TYPE, message)
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    config: Config,
    state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Server {
    /// Binds `config.listen`; use port 0 for an ephemeral port.
    /// Fails if the address cannot be bound, or the TLS files or the token
    /// file cannot be read.
    pub async fn bind(config: Config) -> io::Result<Server> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let state = AppState::new(&config)?;
        let listener = TcpListener::bind(config.listen).await?;
        Ok(Server {
            listener,
            config,
            state,
            tls,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Live calls per transport, for tests and metrics.
    pub fn active_calls(&self) -> ActiveCalls {
        self.state.calls.clone()
    }

    /// Cancelling this token starts the graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// Serves until the shutdown token fires, then drains live calls for at
    /// most `--drain-timeout`. Returns whether the drain finished in time.
    pub async fn run(self) -> bool {
        let Server {
            listener,
            config,
            state,
            tls,
        } = self;
        let service = router(&config, state.clone());
        let settings = listener::ListenerSettings {
            tls,
            metrics: state.calls.metrics().clone(),
            tasks: state.tasks.clone(),
            shutdown: state.shutdown.clone(),
        };
        listener::accept_loop(listener, service, &config, settings).await;
        let drained = shutdown::drain(&state.tasks, config.drain_timeout).await;
        if !drained {
            tracing::warn!(timeout = ?config.drain_timeout, "drain deadline passed with calls still open");
        }
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, content_type: Option<&str>, preflight: bool) -> Request<Body> {
        let mut builder = Request::builder()
            .method(method)
            .uri("/DataService/BidirectionalStream");
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        if preflight {
            builder = builder.header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST");
        }
        builder.body(Body::empty()).unwrap()
    }

    #[test]
    fn requests_go_to_the_transport_their_content_type_names() {
        assert_eq!(
            classify(&request(Method::POST, Some("application/grpc"), false)),
            Route::Grpc
        );
        assert_eq!(
            classify(&request(Method::POST, Some("application/grpc+proto"), false)),
            Route::Grpc
        );
        assert_eq!(
            classify(&request(Method::POST, Some("application/grpc-web"), false)),
            Route::GrpcWeb
        );
        assert_eq!(
            classify(&request(Method::POST, Some("application/grpc-web-text+proto"), false)),
            Route::GrpcWeb
        );
        assert_eq!(classify(&request(Method::OPTIONS, None, true)), Route::GrpcWeb);
        assert_eq!(classify(&request(Method::GET, None, false)), Route::Web);
        assert_eq!(classify(&request(Method::POST, Some("text/plain"), false)), Route::Web);
    }
}
