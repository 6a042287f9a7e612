//! WebSocket protocol v2 on one socket: many calls of any method, records
//! batched into WebSocket messages, flow control per call
//! (`docs/websocket-protocol-v2.md`).
//!
//! One task owns the socket and drives every call on it: there is no task
//! and no channel per call. The layout follows the call machine:
//!
//! - [`socket`]: the socket's loop, and the protocol's rules applied to
//!   every call once (credit both ways, the byte budget, deadlines, cancel,
//!   drain, the `status` each call ends with);
//! - [`table`]: the live calls by id, the plug-ins that answer them, and the
//!   wakers through which a call's backend tells the socket it has news;
//! - [`grpc_call`]: the generic plug-in, a gRPC request on the backend (the
//!   same one native gRPC makes: the bridge has no code per service);
//! - [`builtin`]: the built-in `DataService`'s plug-in, its processor called
//!   on the socket's task;
//! - [`records`] and [`batch`]: records in, records out, gathered into
//!   WebSocket messages;
//! - [`budget`]: the socket's byte budget for requests not yet consumed.
//!
//! Bounds: request messages per call by the client's request credit (256
//! plus what the server grants as the backend consumes them), request bytes
//! per socket by `--ws-socket-buffer` (past it the socket is not read),
//! response messages per call by the client's response credit, live calls
//! by `--ws-max-calls`; the records a socket gathers by its batch, which it
//! writes before it polls more.

mod batch;
mod budget;
mod builtin;
mod grpc_call;
mod records;
mod socket;
mod table;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub use self::socket::run;
use crate::backend::GrpcService;
use crate::backend::descriptors::Catalog;
use crate::ops::calls::ActiveCalls;

/// The limits of a v2 socket (from [`crate::Config`]).
#[derive(Clone, Debug)]
pub struct V2Settings {
    /// `--max-message-size`: the largest request or response message.
    pub max_message_size: usize,
    /// `--ws-max-calls`: live calls per socket.
    pub max_calls: usize,
    /// `--ws-socket-buffer`: request bytes not yet consumed, per socket.
    pub socket_buffer: usize,
    /// How long to wait for the peer's Close after ours.
    pub close_timeout: Duration,
    /// Ping interval; a peer silent for a whole interval is gone.
    pub ping_interval: Duration,
    /// `--drain-timeout`: how long live calls may run after `goaway`.
    pub drain_timeout: Duration,
}

/// What every v2 socket shares. Cheap to clone.
#[derive(Clone)]
pub struct V2Context {
    /// The gRPC backend every call is made on.
    pub backend: GrpcService,
    /// Descriptors for the json encoding.
    pub catalog: Catalog,
    pub settings: Arc<V2Settings>,
    /// Set when the drain deadline cut a call (the exit code says so).
    pub cut: Arc<AtomicBool>,
    /// Set when this process runs the built-in `DataService`: its calls are
    /// answered on the socket's task ([`builtin`]) and counted here.
    pub data_service: Option<ActiveCalls>,
}
