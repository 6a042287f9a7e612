//! The one module that sees everything: the server's state, the router that
//! sends each request to exactly one transport, and [`Server`] itself.

mod server;

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::FromRef;
use axum::routing::{any, get, post};
use http::{Method, Request, Response, header};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::steer::Steer;

pub use server::{Server, ServerBuilder, StartError};

use crate::backend::data_service::GrpcDataService;
use crate::backend::{Backend, BackendContext, Services};
use crate::config::{Config, ConfigError};
use crate::ops::calls::ActiveCalls;
use crate::ops::health;
use crate::ops::shutdown::Drain;
use crate::ops::traces::Traces;
use crate::policy::auth::Auth;
use crate::policy::limits::{LimitSettings, RateLimits};
use crate::policy::origin::OriginPolicy;
use crate::policy::rules::Policy;
use crate::transport::grpc_framing::{FollowFraming, FramingSettings};
use crate::transport::http_session::HttpSessions;
use crate::transport::websocket::{SocketContext, WebSocketState};
use crate::transport::{grpc, grpc_web, http_session, static_files, websocket};

pub use crate::transport::HttpService;

/// The server's whole HTTP surface: one service per transport, and the
/// function that picks one for each request.
pub type TransportRouter = Steer<HttpService, fn(&Request<Body>, &[HttpService]) -> usize, Request<Body>>;

/// What the server's parts share from the start; the backend is built with
/// it, then the [`AppState`] around both. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    /// Live calls and the metrics registry.
    pub calls: ActiveCalls,
    /// The bearer token, if any.
    pub auth: Auth,
    /// Cancelled to start the graceful shutdown.
    pub shutdown: CancellationToken,
    /// The drain as calls watch it (follows `shutdown`).
    pub drain: Drain,
    /// Every task the server starts, waited for at the drain.
    pub tasks: TaskTracker,
}

impl Core {
    /// Fails if the token file, the JWT key set or the policy cannot be read.
    pub fn new(config: &Config) -> Result<Core, ConfigError> {
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let traces = config
            .otlp_endpoint
            .as_deref()
            .map(|endpoint| Traces::start(endpoint, &config.service_name))
            .transpose()
            .map_err(ConfigError::Invalid)?;
        let calls = ActiveCalls::default().with_traces(traces);
        let policy = Policy::load(config.policy.as_deref()).map_err(ConfigError::Invalid)?;
        let (token, jwt) = (config.bearer_token()?, config.jwt_verifier()?);
        // A rule no caller could ever satisfy is a mistake, not a lock.
        if let Some(rule) = policy.first_needing_a_caller()
            && token.is_none()
            && jwt.is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "--policy: rule {rule} asks for an authenticated caller, but neither --auth-token nor --jwt-jwks is set"
            )));
        }
        Ok(Core {
            auth: Auth::new(token, jwt, policy)
                .with_limits(RateLimits::new(LimitSettings {
                    calls: (config.limit_calls_per_second, config.limit_calls_burst),
                    messages: (config.limit_messages_per_second, config.limit_messages_burst),
                    trusted_proxies: config.trusted_proxies.clone(),
                }))
                .with_metrics(calls.metrics().clone()),
            calls,
            drain: Drain::follow(&shutdown, &tasks),
            shutdown,
            tasks,
        })
    }

    /// The built-in `DataService` alone, with health and reflection.
    pub fn builtin_backend(&self, config: &Config) -> Backend {
        let mut services = Services::default();
        self.add_data_service(&mut services, config);
        services
            .into_backend(&self.auth, &self.backend_context())
            .expect("the descriptors compiled by build.rs are valid")
    }

    /// What the backend shares of it.
    pub fn backend_context(&self) -> BackendContext {
        BackendContext {
            shutdown: self.shutdown.clone(),
            calls: self.calls.clone(),
            tasks: self.tasks.clone(),
        }
    }

    /// Adds the built-in `DataService` and its descriptors to `services`.
    pub fn add_data_service(&self, services: &mut Services, config: &Config) {
        services.add(GrpcDataService::server(self.drain.clone(), config.max_message_size));
        services.register_file_descriptor_set(crate::backend::health::FILE_DESCRIPTOR_SET);
    }
}

/// Everything the server's handlers share; each handler takes only its own
/// slice of it (axum's `FromRef`). Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    core: Core,
    origins: OriginPolicy,
    /// Whether the built-in `DataService` is served in process (WebSocket
    /// protocol v1 needs it).
    data_service: bool,
    /// The backend, and what sockets need of it.
    sockets: Arc<SocketContext>,
    /// Protocol v2's sessions over plain HTTP.
    http_sessions: HttpSessions,
}

impl AppState {
    /// The state of a server whose calls `backend` answers; `data_service`
    /// says whether that includes the built-in `DataService` in process.
    pub fn new(config: &Config, core: Core, backend: Backend, data_service: bool) -> AppState {
        let sockets = SocketContext::new(
            config,
            backend,
            core.auth.clone(),
            data_service.then(|| core.calls.clone()),
        );
        AppState {
            origins: OriginPolicy::new(&config.allowed_origins),
            http_sessions: HttpSessions::new(config, &sockets),
            sockets: Arc::new(sockets),
            data_service,
            core,
        }
    }

    /// What the server's parts share.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Whether the drain deadline cut a WebSocket v2 call.
    pub fn drain_cut_calls(&self) -> bool {
        self.sockets.cut.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl FromRef<AppState> for WebSocketState {
    fn from_ref(state: &AppState) -> Self {
        WebSocketState {
            origins: state.origins.clone(),
            auth: state.core.auth.clone(),
            drain: state.core.drain.clone(),
            tasks: state.core.tasks.clone(),
            context: state.sockets.clone(),
            v1_available: state.data_service,
            http_sessions: state.http_sessions.clone(),
        }
    }
}

impl FromRef<AppState> for health::Probe {
    fn from_ref(state: &AppState) -> Self {
        health::Probe::new(state.sockets.backend.clone())
    }
}

impl FromRef<AppState> for ActiveCalls {
    fn from_ref(state: &AppState) -> Self {
        state.core.calls.clone()
    }
}

/// The whole HTTP surface of the server: classifies each request by its
/// content type (and path) and hands it to exactly one transport; both gRPC
/// transports call `backend`.
pub fn router(config: &Config, state: AppState) -> TransportRouter {
    let backend = state.sockets.backend.clone();
    // Both gRPC transports reach the backend through the framing check.
    let framing = FramingSettings {
        max_message_size: config.max_message_size,
        stall_timeout: config.request_body_timeout,
    };
    let backend = FollowFraming::new(backend, framing);
    let grpc = grpc::service(backend.clone());
    let grpc_web = grpc_web::service(backend, state.origins.clone());
    let files = static_files::service(&config.static_dir);
    let sessions_cors = http_session::cors(&state.origins);
    let web = HttpService::new(
        axum::Router::new()
            .route("/ws", any(websocket::upgrade).layer(sessions_cors))
            .route("/metrics", get(health::metrics))
            .route("/healthz", get(health::healthz))
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
        // A CORS preflight: for the HTTP sessions at `/ws`, or for gRPC-Web.
        None if request.method() == Method::OPTIONS
            && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) =>
        {
            if request.uri().path() == "/ws" {
                Route::Web
            } else {
                Route::GrpcWeb
            }
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
