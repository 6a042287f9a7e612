//! The ways in. Each submodule turns one wire protocol into calls on the
//! gRPC [backend](crate::backend): it knows its framing, its errors and its
//! limits, and nothing about what the called service does.
//!
//! - [`grpc`]: native gRPC (HTTP/2), straight to the backend;
//! - [`grpc_web`]: tonic-web's translation and CORS, for browsers;
//! - [`grpc_framing`]: what both gRPC transports check in a request body
//!   (truncation, stalls, the per-connection bound on unfinished messages);
//! - [`websocket`]: the `/ws` upgrade and its bridged calls;
//! - [`http_session`]: the same calls over plain HTTP at `/ws`, where
//!   WebSockets are blocked;
//! - [`webtransport`]: the same calls over WebTransport (HTTP/3, UDP), each
//!   on a QUIC stream of its own;
//! - [`static_files`]: the page and the WASM package.
//!
//! [`Transport`], the name of each way in, is defined with the call counts
//! that label by it (`ops::calls`), so that `ops` needs nothing of this module.

pub mod grpc;
pub mod grpc_framing;
pub mod grpc_web;
pub mod http_session;
pub mod static_files;
pub mod websocket;
pub mod webtransport;

pub use crate::ops::calls::Transport;

/// A query parameter's value, as sent (`/ws` parameters are protocol names,
/// session ids and tokens, none of which need percent-encoding).
pub(crate) fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// Any of the server's HTTP services (a transport, as the router holds it),
/// type-erased so the router can pick one.
pub type HttpService = tower::util::BoxCloneSyncService<
    http::Request<axum::body::Body>,
    http::Response<axum::body::Body>,
    std::convert::Infallible,
>;
