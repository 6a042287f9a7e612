//! streambridge: one port, four ways in, one stream processor.
//!
//! A client reaches `DataService.BidirectionalStream` by native gRPC (HTTP/2),
//! by gRPC-Web (browsers, HTTP/1.1 or HTTP/2), or by WebSocket frames bridged
//! into the same call; the same port serves the web page and its WASM client.
//! Whatever the way in, the replies come from the one processor.
//!
//! The public API is small: [`Config`] and [`ConfigError`] (every flag and
//! its checks), [`Server`] and [`StartError`] (bind, run, shut down),
//! [`ActiveCalls`] and [`Transport`] (live calls, for tests and embedders),
//! [`termination_signal`], the generated [`grpc`] client and server types,
//! and [`router`] with [`AppState`], [`TransportRouter`] and [`HttpService`]
//! (the whole HTTP surface as one tower service, for your own accept loop or
//! a fuzzer).
//!
//! # Layout
//!
//! - `config`: every flag and limit, with its environment variable and default.
//! - `processor`: the call's logic, `Stream` of requests to `Stream` of
//!   replies; knows no transport.
//! - [`grpc`]: native gRPC, the tonic service adapting tonic's types to the processor.
//! - `grpc_codec`: tonic-prost with small per-stream buffers.
//! - `grpc_framing`: truncated messages and the per-connection bound on
//!   unfinished ones, for native gRPC and gRPC-Web.
//! - `grpc_web`: tonic-web and CORS around the same service, for browsers.
//! - `websocket`: the `/ws` upgrade and the bridged call (protocol v1).
//! - `static_files`: the page and the WASM package.
//! - [`router`]: which transport a request belongs to (content type, path, Host).
//! - `listener`: the accept loop and per-connection HTTP settings.
//! - `connection`: what each connection owes: a first request in time, a
//!   request now and then.
//! - `tls`: the rustls acceptor.
//! - `auth`, `origin`: the bearer token and the origin policy.
//! - `operations`, `metrics`: health, reflection and `/metrics`.
//! - `shutdown`: signal handling and the drain deadline.
//! - `error`: how calls fail, and the one mapping to gRPC status and close code.
//! - `calls`: live calls per transport.
//!
//! Dependencies point inwards: transports depend on the processor, never the
//! reverse. The wire types and the WebSocket envelope codec live in the
//! `streambridge-protocol` crate, which the WASM client compiles too.

#![warn(missing_docs)]

mod auth;
mod calls;
mod config;
mod connection;
mod error;
pub mod grpc;
mod grpc_codec;
mod grpc_framing;
mod grpc_web;
mod listener;
mod metrics;
mod operations;
mod origin;
mod processor;
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
pub use config::{Config, ConfigError};
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
    pub fn new(config: &Config) -> Result<AppState, ConfigError> {
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
    // Both gRPC transports reach the services through the framing check.
    let framing = grpc_framing::FramingSettings {
        max_message_size: config.max_message_size,
        stall_timeout: config.request_body_timeout,
    };
    let grpc_routes = grpc_framing::FollowFraming::new(grpc_routes, framing);
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
    let bad_request = HttpService::new(tower::service_fn(|_: Request<Body>| async {
        let body = "400 bad request: an HTTP/1.1 request needs exactly one Host header (RFC 9112, section 3.2)\n";
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = http::StatusCode::BAD_REQUEST;
        Ok::<_, Infallible>(response)
    }));
    // The order matches `Route`.
    Steer::new(
        vec![grpc, grpc_web, web, bad_request],
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
    /// Not a valid HTTP request at all: answered 400.
    BadRequest = 3,
}

fn classify(request: &Request<Body>) -> Route {
    if request.version() == http::Version::HTTP_11 && !has_one_host(request.headers()) {
        return Route::BadRequest;
    }
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    match grpc_web::GrpcMediaType::of(content_type) {
        Some(grpc_web::GrpcMediaType::GrpcWeb(_)) => Route::GrpcWeb,
        Some(grpc_web::GrpcMediaType::Grpc) => Route::Grpc,
        None if request.method() == Method::OPTIONS
            && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) =>
        {
            Route::GrpcWeb
        }
        None => Route::Web,
    }
}

/// RFC 9112: an HTTP/1.1 request carries exactly one `Host`.
fn has_one_host(headers: &http::HeaderMap) -> bool {
    let mut hosts = headers.get_all(header::HOST).iter();
    hosts.next().is_some() && hosts.next().is_none()
}

/// A POST to a gRPC-shaped path that is not gRPC: the caller probably forgot
/// the content type, so say which ones are understood. A POST to any other
/// two-segment path (`/pkg/app.js`) is a page request, answered 405.
async fn grpc_without_grpc_content_type(method: Method, uri: http::Uri) -> axum::response::Response {
    use axum::response::IntoResponse;
    if !is_grpc_method_path(uri.path()) {
        return static_files::method_not_allowed(method, uri).await.into_response();
    }
    let message = "415 unsupported media type: gRPC methods take content-type application/grpc (native gRPC) \
                   or application/grpc-web, application/grpc-web-text (gRPC-Web)\n";
    (http::StatusCode::UNSUPPORTED_MEDIA_TYPE, message).into_response()
}

/// `/package.Service/Method`: a dotted service name and a method identifier,
/// as protobuf names them (a file name has a dot in its last segment).
fn is_grpc_method_path(path: &str) -> bool {
    let identifier = |name: &str| {
        name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match path.strip_prefix('/').and_then(|rest| rest.split_once('/')) {
        Some((service, method)) => service.split('.').all(identifier) && identifier(method),
        None => false,
    }
}

/// Why a server could not start; each names the flag or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag's value, or a file a flag names (the token file).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS certificate or key.
    #[error("--tls-cert/--tls-key: {0}")]
    Tls(io::Error),
    /// The listening address.
    #[error("--listen {addr}: cannot listen: {source}")]
    Listen {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
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
    /// Fails if the configuration is inconsistent, the TLS files or the
    /// token file cannot be read, or the address cannot be bound.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        config.validate()?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key).map_err(StartError::Tls)?),
            _ => None,
        };
        let state = AppState::new(&config)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
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
            .uri("/DataService/BidirectionalStream")
            .header(header::HOST, "example");
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

    #[test]
    fn media_types_are_parsed_not_prefix_matched() {
        for (content_type, route) in [
            ("application/grpc-web; charset=utf-8", Route::GrpcWeb),
            ("APPLICATION/GRPC-WEB-TEXT", Route::GrpcWeb),
            ("Application/Grpc-Web+Proto ; x=y", Route::GrpcWeb),
            ("APPLICATION/GRPC", Route::Grpc),
            ("application/grpc+proto;charset=x", Route::Grpc),
            ("application/grpcx", Route::Web),
            ("application/grpc-webby", Route::Web),
            ("application/grpc-web+json", Route::Web),
        ] {
            assert_eq!(
                classify(&request(Method::POST, Some(content_type), false)),
                route,
                "{content_type}"
            );
        }
    }

    #[test]
    fn grpc_method_paths_are_told_from_file_paths() {
        assert!(is_grpc_method_path("/DataService/BidirectionalStream"));
        assert!(is_grpc_method_path("/grpc.health.v1.Health/Check"));
        assert!(!is_grpc_method_path("/pkg/streambridge_client.js"));
        assert!(!is_grpc_method_path("/docs/a-b"));
        assert!(!is_grpc_method_path("/a..b/C"));
        assert!(!is_grpc_method_path("/index.html"));
    }

    #[test]
    fn an_http11_request_without_exactly_one_host_is_a_bad_request() {
        let mut none = request(Method::GET, None, false);
        none.headers_mut().remove(header::HOST);
        assert_eq!(classify(&none), Route::BadRequest);
        let mut two = request(Method::GET, None, false);
        two.headers_mut().append(header::HOST, "other".parse().unwrap());
        assert_eq!(classify(&two), Route::BadRequest);
        let mut http10 = request(Method::GET, None, false);
        http10.headers_mut().remove(header::HOST);
        *http10.version_mut() = http::Version::HTTP_10;
        assert_eq!(classify(&http10), Route::Web, "HTTP/1.0 needs no Host");
    }
}
