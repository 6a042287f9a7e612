//! The ways in. Each submodule turns one wire protocol into calls on the
//! gRPC [backend](crate::backend): it knows its framing, its errors and its
//! limits, and nothing about what the called service does.
//!
//! - [`grpc`]: native gRPC (HTTP/2), straight to the backend;
//! - [`grpc_web`]: tonic-web's translation and CORS, for browsers;
//! - [`grpc_framing`]: what both gRPC transports check in a request body
//!   (truncation, stalls, the per-connection bound on unfinished messages);
//! - [`websocket`]: the `/ws` upgrade and its bridged calls;
//! - [`static_files`]: the page and the WASM package.

pub mod grpc;
pub mod grpc_framing;
pub mod grpc_web;
pub mod static_files;
pub mod websocket;

use std::fmt;

/// The ways into the server's calls; a label on every call metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Native gRPC over HTTP/2.
    Grpc,
    /// gRPC-Web (binary or text) over HTTP/1.1 or HTTP/2.
    GrpcWeb,
    /// The WebSocket bridge at `/ws`.
    WebSocket,
}

impl Transport {
    /// Every transport, in [`Transport::index`] order.
    pub const ALL: [Transport; 3] = [Transport::Grpc, Transport::GrpcWeb, Transport::WebSocket];

    /// A dense index, for per-transport arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Grpc => "grpc",
            Transport::GrpcWeb => "grpc-web",
            Transport::WebSocket => "websocket",
        })
    }
}
