//! WebSocket protocol v2 on one socket: many calls of any method, records
//! batched into WebSocket messages, flow control per call
//! (`docs/protocol-v2.md`). Protocol v1 runs on the same machine,
//! as one implicit call in its own envelope ([`super::v1`]).
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
mod wire;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub use self::batch::goaway_batch;
pub use self::builtin::METHOD as BUILTIN_METHOD;
pub use self::socket::run;
pub use self::wire::{Closing, Wire};
use crate::backend::descriptors::Catalog;
use crate::backend::{Backend, GrpcService};
use crate::config::Config;
use crate::ops::calls::ActiveCalls;
use crate::policy::auth::Auth;
use crate::transport::Transport;

/// The limits of a socket, of either protocol (from [`crate::Config`]).
#[derive(Clone, Debug)]
pub struct SocketSettings {
    /// `--max-message-size`: the largest request or response message.
    pub max_message_size: usize,
    /// `--ws-read-buffer-size`: bytes read from the kernel at a time.
    pub read_buffer_size: usize,
    /// `--ws-write-buffer-size`: bytes of messages gathered before a write.
    pub write_buffer_size: usize,
    /// `--ws-request-queue`: WebSocket messages read ahead of writing the
    /// replies to them.
    pub read_ahead: usize,
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
    /// The request credit each call is kept topped up to
    /// ([`table::REQUEST_CREDIT`] on a WebSocket; more over HTTP, where each
    /// POST costs a round trip).
    pub request_credit: u16,
    /// The connection carries one call and ends with it (a WebTransport
    /// stream): once a call has been opened and none is live, it closes.
    pub single_call: bool,
}

/// What every socket shares. Cheap to clone.
#[derive(Clone)]
pub struct SocketContext {
    /// The gRPC backend every call is made on.
    pub backend: GrpcService,
    /// Descriptors for the json encoding.
    pub catalog: Catalog,
    /// How a call's own token (its `authorization` metadata) is checked.
    pub auth: Auth,
    pub settings: Arc<SocketSettings>,
    /// Set when the drain deadline cut a call (the exit code says so).
    pub cut: Arc<AtomicBool>,
    /// Set when this process runs the built-in `DataService`: its calls are
    /// answered on the socket's task ([`builtin`]) and counted here.
    pub data_service: Option<ActiveCalls>,
    /// The transport its sockets are (a label of their calls' metrics).
    pub transport: Transport,
}

impl SocketSettings {
    /// The largest batch a client may send: v2 carries records around each
    /// message, so a batch holding a message of the largest size fits with
    /// 64 KiB to spare (a WebSocket message, a POST, a WebTransport frame).
    pub fn largest_batch(&self) -> usize {
        self.max_message_size.saturating_add(64 * 1024)
    }
}

impl SocketContext {
    /// The sockets' context for a server whose calls `backend` answers;
    /// `data_service` counts the built-in service's calls, if it runs here.
    pub fn new(config: &Config, backend: Backend, auth: Auth, data_service: Option<ActiveCalls>) -> SocketContext {
        SocketContext {
            auth,
            backend: backend.service,
            catalog: backend.catalog,
            settings: Arc::new(SocketSettings {
                max_message_size: config.max_message_size,
                read_buffer_size: config.ws_read_buffer_size,
                write_buffer_size: config.ws_write_buffer_size,
                read_ahead: config.ws_request_queue,
                max_calls: config.ws_max_calls,
                socket_buffer: config.ws_socket_buffer,
                close_timeout: config.ws_close_timeout,
                ping_interval: config.ws_ping_interval,
                drain_timeout: config.drain_timeout,
                request_credit: table::REQUEST_CREDIT,
                single_call: false,
            }),
            cut: Arc::default(),
            data_service,
            transport: Transport::WebSocket,
        }
    }
}
