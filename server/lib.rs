//! streambridge: one port, four ways in, one gRPC backend.
//!
//! A client reaches the server's gRPC services by native gRPC (HTTP/2), by
//! gRPC-Web (browsers, HTTP/1.1 or HTTP/2), or by WebSocket frames bridged
//! into the same call; the same port serves the web page and its WASM
//! client. What answers the calls is the built-in `DataService` (the
//! default), your own tonic services ([`ServerBuilder::add_service`]), or
//! another gRPC server (`--upstream`).
//!
//! The public API is small: [`Config`] and [`ConfigError`] (every flag and
//! its checks), [`Server`], [`ServerBuilder`] and [`StartError`] (choose the
//! services, bind, run, shut down), [`ActiveCalls`] and [`Transport`] (live
//! calls, for tests and embedders), [`termination_signal`], the generated
//! [`grpc`] client and server types of `DataService`, and [`router`] with
//! [`AppState`], [`TransportRouter`], [`HttpService`] and [`GrpcService`]
//! (the whole HTTP surface as one tower service, for your own accept loop or
//! a fuzzer).
//!
//! # Layout
//!
//! The folders are the architecture; every arrow points inward, towards the
//! backend.
//!
//! - `app`: the one module that sees everything: state, the router that
//!   sends each request to one transport, [`Server`] and its builder.
//! - `transport`: the ways in: `grpc`, `grpc_web`, `grpc_framing` (what both
//!   gRPC transports check in a body), `websocket`, `static_files`.
//! - `backend`: what answers calls, as one gRPC service: the built-in
//!   `data_service` over its transport-free `processor`, added services, or
//!   the `upstream` proxy.
//! - `net`: the accept loop, per-connection obligations, TLS.
//! - `policy`: the bearer token and the origin policy.
//! - `ops`: live calls, metrics, health and reflection, shutdown.
//! - `config`: every flag and limit; `error`: how calls fail, and the one
//!   mapping to gRPC status and close code.
//!
//! The wire types and the WebSocket envelope codec live in the
//! `streambridge-protocol` crate, which the WASM client compiles too.

#![warn(missing_docs)]

mod app;
mod backend;
mod config;
mod error;
mod net;
mod ops;
mod policy;
mod transport;

pub use app::{AppState, Core, HttpService, Server, ServerBuilder, StartError, TransportRouter, router};
pub use backend::GrpcService;
pub use backend::upstream::UpstreamError;
pub use config::{Config, ConfigError, LogFormat};
pub use ops::calls::ActiveCalls;
pub use ops::shutdown::termination_signal;
pub use policy::jwt::{Claims, Identity};
pub use transport::Transport;

/// The built-in `DataService`: its generated client and server types.
pub mod grpc {
    pub use crate::backend::data_service::{DataService, DataServiceClient, DataServiceServer, GrpcDataService};
    /// The encoded `FileDescriptorSet` of `proto/` (`DataService` and its
    /// messages), e.g. for `--descriptor-set` in front of an upstream that
    /// serves `DataService` without reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = crate::backend::health::FILE_DESCRIPTOR_SET;
}
