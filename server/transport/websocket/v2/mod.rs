//! WebSocket protocol v2 on one socket: many calls of any method, records
//! batched into WebSocket messages, flow control per call (see
//! `docs/websocket-protocol.md`, "Protocol v2").
//!
//! One task owns the socket: it reads batches, checks each record against
//! the rules, and hands messages to the calls; it gathers the records the
//! calls produce and writes them, as many as are ready in one WebSocket
//! message (never waiting for more, at most 64 KiB unless a single record is
//! larger). Each call is a task of its own ([`call`]) making a gRPC request
//! on the backend, the same one native gRPC uses: the bridge has no code per
//! service. The one exception is the built-in `DataService` when this
//! process runs it: its calls are answered on the socket's task itself
//! ([`builtin`]), with no task, channel or gRPC framing per call.
//!
//! Bounds: request messages per call by the client's request credit (256
//! plus what the server grants as the backend consumes them), request bytes
//! per socket by `--ws-socket-buffer` (past it the socket is not read),
//! response messages per call by the client's response credit, records in
//! flight to the writer by a bounded queue, live calls by `--ws-max-calls`.

mod budget;
mod builtin;
mod call;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use streambridge_protocol::v2::{self, Encoding, client_record};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::task::TaskTracker;
use tonic::{Code, Status};

use self::budget::Budget;
use self::builtin::{BuiltinCall, SocketSide};
use self::call::{Abort, CallSpec, Kind};
use super::call::drain_after_close;
use crate::backend::GrpcService;
use crate::backend::descriptors::Catalog;
use crate::error::Error;
use crate::ops::calls::ActiveCalls;
use crate::ops::metrics::StreamMetrics;
use crate::ops::shutdown::{Drain, DrainCheck};
use crate::transport::Transport;

/// A batch is written once it reaches this size.
const BATCH_BYTES: usize = 64 * 1024;
/// Records on their way from the calls to the writer.
const OUT_QUEUE: usize = 1024;

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

/// A request message as it came, while its batch is applied: a view into
/// the WebSocket message that brought it. What has to wait is
/// [detached](Request::detached) first.
pub enum Request<'a> {
    /// A slice of the binary message (prost decodes `bytes` fields so).
    Proto(Bytes),
    /// A slice of the text message: no copy, no reference count, and
    /// already checked as UTF-8.
    Json(&'a str),
}

impl Request<'_> {
    fn len(&self) -> usize {
        match self {
            Request::Proto(bytes) => bytes.len(),
            Request::Json(text) => text.len(),
        }
    }

    /// The message in its own allocation. A view would keep the whole
    /// WebSocket message alive, and the socket's budget
    /// (`--ws-socket-buffer`) counts only this message's bytes: a small
    /// request padded into a 4 MiB batch could pin 4 MiB per request.
    pub fn detached(&self) -> Payload {
        match self {
            Request::Proto(bytes) => Payload::Proto(Bytes::copy_from_slice(bytes)),
            Request::Json(text) => Payload::Json((*text).to_owned()),
        }
    }
}

/// A request message that waits (for response credit, or for its call's
/// task), in an allocation of its own; decoded from JSON only by the call.
pub enum Payload {
    Proto(Bytes),
    Json(String),
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Proto(bytes) => bytes.len(),
            Payload::Json(text) => text.len(),
        }
    }

    /// The message as a [`Request`] again, to be answered.
    pub fn as_request(&self) -> Request<'_> {
        match self {
            Payload::Proto(bytes) => Request::Proto(bytes.clone()),
            Payload::Json(text) => Request::Json(text),
        }
    }
}

/// What calls send the socket's writer.
pub enum Out {
    /// Headers or a message.
    Record(Bytes),
    /// Messages of one call, in order.
    Records(Vec<Bytes>),
    /// The call's last record.
    Status { call: u32, record: Bytes },
    /// More request credit for the client.
    Grant { call: u32, amount: u32, record: Bytes },
}

/// What the socket needs to see of a call's state to decide whether it
/// may read past a full budget.
#[derive(Debug, Default)]
pub struct CallGauge {
    /// Bytes of this call's requests not yet consumed.
    held: AtomicUsize,
    /// The call waits for response credit.
    starved: AtomicBool,
}

impl CallGauge {
    pub fn consumed(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub fn set_starved(&self, starved: bool) {
        self.starved.store(starved, Ordering::Release);
    }
}

/// A call the socket knows: what the client may send, and where it goes.
/// Small on purpose (see [`BuiltinCall`]): the socket looks it up for every
/// record.
struct LiveCall {
    /// Request messages the client may still send: 256 at `open`, plus
    /// every grant written to it, less every message it sent.
    request_credit: u32,
    closed_send: bool,
    route: Route,
}

/// The live calls of a socket by id. Looked up for every record: hashed
/// with foldhash (ids are small integers, and at most `--ws-max-calls` of
/// them live at once, so the DoS resistance of SipHash buys nothing).
type CallTable = HashMap<u32, LiveCall, foldhash::fast::RandomState>;

/// Who answers a call.
enum Route {
    /// Its own task, a gRPC request on the backend ([`call`]). Boxed: the
    /// built-in route is the one that must stay small.
    Task(Box<TaskCall>),
    /// The socket's task, through the processor ([`builtin`]).
    Builtin(BuiltinCall),
}

/// The socket's side of a call running as a task.
struct TaskCall {
    /// `None` after `closeSend`.
    requests: Option<mpsc::UnboundedSender<Payload>>,
    response_credit: Arc<Semaphore>,
    abort: Abort,
    gauge: Arc<CallGauge>,
}

impl LiveCall {
    /// Whether the socket may read past a full budget for this call: it
    /// holds no budget, or it waits for response credit (which only a
    /// record the socket has not read yet can give).
    fn lets_socket_read(&self) -> bool {
        match &self.route {
            Route::Task(task) => {
                task.gauge.held.load(Ordering::Acquire) == 0 || task.gauge.starved.load(Ordering::Acquire)
            }
            Route::Builtin(builtin) => builtin.lets_socket_read(),
        }
    }
}

/// The next WebSocket message(s), each record encoded straight into the
/// message's bytes as it comes: a proto batch is its records one after the
/// other, a json batch their comma-separated list in brackets. A message is
/// full at [`BATCH_BYTES`] (a larger single record goes alone).
pub struct Batch {
    /// The socket's encoding (kept here only: the socket reads it from its batch).
    encoding: Encoding,
    /// Finished messages, in order, before `open` (only after a burst of
    /// more than [`BATCH_BYTES`]).
    full: Vec<Vec<u8>>,
    /// The message being filled (a json one without its closing bracket);
    /// empty when there is nothing in it.
    open: Vec<u8>,
}

impl Batch {
    fn new(encoding: Encoding) -> Batch {
        Batch {
            encoding,
            full: Vec::new(),
            open: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.full.is_empty() && self.open.is_empty()
    }

    /// Enough for a message: no point gathering more before writing.
    fn is_full(&self) -> bool {
        !self.full.is_empty() || self.open.len() + usize::from(self.encoding == Encoding::Json) >= BATCH_BYTES
    }

    /// Adds one record; `write` appends its encoding.
    pub fn append(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let json = self.encoding == Encoding::Json;
        if self.open.is_empty() {
            // Room for a typical batch of small records without regrowing.
            self.open.reserve(1024);
            if json {
                self.open.push(b'[');
            }
        } else if json {
            self.open.push(b',');
        }
        let start = self.open.len();
        write(&mut self.open);
        let first = start == usize::from(json);
        // A json message still needs its closing bracket.
        if !first && self.open.len() + usize::from(json) > BATCH_BYTES {
            // This record starts the next message.
            let mut next = Vec::with_capacity(self.open.len() - start + 1);
            if json {
                next.push(b'[');
            }
            next.extend_from_slice(&self.open[start..]);
            self.open.truncate(start - usize::from(json));
            let done = std::mem::replace(&mut self.open, next);
            self.full.push(self.finished(done));
        }
    }

    /// Adds a record encoded elsewhere (by a call's task).
    pub fn append_encoded(&mut self, record: &[u8]) {
        self.append(|out| out.extend_from_slice(record));
    }

    /// Adds a record of `call`.
    pub fn record(&mut self, call: u32, kind: Kind) {
        let encoding = self.encoding;
        self.append(|out| call::append(encoding, call, kind, out));
    }

    fn finished(&self, mut message: Vec<u8>) -> Vec<u8> {
        if self.encoding == Encoding::Json {
            message.push(b']');
        }
        message
    }

    /// The messages to write, in order; the batch is empty after.
    fn take(&mut self) -> impl Iterator<Item = Vec<u8>> + use<> {
        let open = std::mem::take(&mut self.open);
        let last = (!open.is_empty()).then(|| self.finished(open));
        std::mem::take(&mut self.full).into_iter().chain(last)
    }
}

/// How the socket ends.
struct Closing {
    code: CloseCode,
    reason: String,
}

/// Runs a v2 socket until it closes.
///
/// Not an `async fn`: one moves its arguments into locals of its future and
/// keeps their first slots as well (rust-lang/rust#62958), which for the
/// socket is 328 bytes of every idle socket's task.
#[expect(clippy::manual_async_fn, reason = "an async fn would hold the socket twice")]
pub fn run<S>(
    mut socket: WebSocketStream<S>,
    encoding: Encoding,
    context: Arc<V2Context>,
    drain: &Drain,
    tasks: TaskTracker,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let settings = context.settings.clone();
        let mut state = Socket {
            context,
            calls: CallTable::default(),
            last_open: 0,
            budget: Budget::new(settings.socket_buffer),
            lines: None,
            batch: Batch::new(encoding),
            deadlines: BTreeSet::new(),
            unsettled: Vec::new(),
            messages: None,
            closing: None,
            draining: false,
            over_budget: false,
            tasks,
        };
        let mut ping = tokio::time::interval_at(Instant::now() + settings.ping_interval, settings.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heard_since_ping = true;
        let mut drain_deadline: Option<Instant> = None;
        let mut drain_check = DrainCheck::new(drain);

        loop {
            if !state.batch.is_empty() {
                if !state.flush(&mut socket, &settings).await {
                    return state.cancel_all();
                }
                heard_since_ping = true;
            }
            if (state.closing.is_some() || state.draining) && state.calls.is_empty() {
                let closing = state.closing.take().unwrap_or(Closing {
                    code: CloseCode::Away,
                    reason: "server shutting down".into(),
                });
                close(&mut socket, closing, settings.close_timeout).await;
                return;
            }
            let reading = state.closing.is_none();
            let may_read = reading && state.may_read();
            // One timer for both kinds of deadline: each timer in the `select!`
            // below would add its size to every socket, idle or not.
            let next_deadline = match (
                drain_deadline.filter(|_| !state.calls.is_empty()),
                state.deadlines.first(),
            ) {
                (Some(drain), Some(&(call, _))) => Some(drain.min(call)),
                (drain, call) => drain.or(call.map(|&(at, _)| at)),
            };
            tokio::select! {
                biased;
                _ = ping.tick() => {
                    if !heard_since_ping {
                        tracing::debug!("peer did not answer the last ping; cancelling its calls");
                        return state.cancel_all();
                    }
                    heard_since_ping = false;
                    if !matches!(tokio::time::timeout(settings.ping_interval * 2, socket.send(Message::Ping(Bytes::new()))).await, Ok(Ok(()))) {
                        return state.cancel_all();
                    }
                }
                out = recv(&mut state.lines) => {
                    state.on_out(out);
                    while !state.batch.is_full() {
                        match state.lines.as_mut().and_then(Lines::try_recv) {
                            Some(out) => state.on_out(out),
                            None => break,
                        }
                    }
                }
                frame = socket.next(), if may_read => {
                    heard_since_ping = true;
                    state.over_budget = !state.budget.has_room();
                    match frame {
                        Some(Ok(message)) => {
                            if let Gone::Yes = state.on_message(message, &mut socket, &settings).await {
                                return state.cancel_all();
                            }
                        }
                        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => state.socket_error(
                            Code::ResourceExhausted,
                            format!("a WebSocket message of {size} bytes is larger than {max_size} (--max-message-size plus 64 KiB)"),
                            CloseCode::Size,
                        ),
                        Some(Err(WsError::Utf8(_))) => state.socket_error(
                            Code::InvalidArgument,
                            "a text message is not valid UTF-8".into(),
                            CloseCode::Invalid,
                        ),
                        Some(Err(_)) | None => return state.cancel_all(),
                    }
                }
                () = state.budget.changed(), if reading && !may_read => {}
                // Not `CancellationToken::cancelled`: polling that locks the one
                // token every socket shares, on every turn of every socket's loop.
                () = std::future::poll_fn(|cx| drain_check.poll_idle(cx)), if !state.draining => {
                    state.draining = true;
                    let message = "server shutting down: finish your calls, open new ones elsewhere".into();
                    state.batch.record(0, Kind::GoAway(v2::GoAway { message }));
                    // The built-in service ends its calls at the drain, as it does on
                    // every transport (status 14: safe to retry elsewhere).
                    for call in state.builtin_calls() {
                        state.end_call(call, Error::ShuttingDown.into());
                    }
                    // Cut calls a little before the server's own deadline, so their status gets out.
                    let margin = (settings.drain_timeout / 10).min(Duration::from_secs(1));
                    drain_deadline = Some(Instant::now() + settings.drain_timeout.saturating_sub(margin));
                }
                () = sleep_until(next_deadline), if next_deadline.is_some() => {
                    let now = Instant::now();
                    if drain_deadline.is_some_and(|at| at <= now) && !state.calls.is_empty() {
                        drain_deadline = None;
                        state.context.cut.store(true, Ordering::Relaxed);
                        for call in state.calls.keys().copied().collect::<Vec<_>>() {
                            state.end_call(call, Status::unavailable("server shutting down: the drain deadline (--drain-timeout) passed"));
                        }
                    }
                    while let Some(&(at, call)) = state.deadlines.first() && at <= now {
                        state.deadlines.pop_first();
                        let timeout_ms = match state.calls.get(&call).map(|live| &live.route) {
                            Some(Route::Builtin(builtin)) => builtin.deadline().map_or(0, |(_, ms)| ms),
                            _ => continue,
                        };
                        state.end_call(call, Status::deadline_exceeded(format!("the call's deadline (timeoutMs {timeout_ms}) passed")));
                    }
                }
            }
        }
    }
}

/// What a built-in call is served with: the socket's budget, batch and
/// message tally (made at its first built-in message). Fields, not
/// `&mut Socket`: the call itself is borrowed from the socket's table.
fn socket_side<'a>(
    budget: &'a Budget,
    batch: &'a mut Batch,
    messages: &'a mut Option<Box<StreamMetrics>>,
    context: &V2Context,
) -> SocketSide<'a> {
    SocketSide {
        budget,
        batch,
        messages: messages.get_or_insert_with(|| builtin_messages(context)),
    }
}

/// Message counters for a socket's built-in calls.
fn builtin_messages(context: &V2Context) -> Box<StreamMetrics> {
    let calls = context
        .data_service
        .as_ref()
        .expect("built-in calls only where the service runs");
    Box::new(calls.metrics().message_counters(Transport::WebSocket))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Sends our Close and waits (bounded) for the peer's, so that frames still
/// in flight are not answered with a reset (which would destroy the
/// statuses and the Close the peer has not read yet).
async fn close<S>(socket: &mut WebSocketStream<S>, closing: Closing, timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // After a message over the size limit tungstenite cannot parse the
    // stream any more: the rest of that message is still on its way.
    let framing_intact = closing.code != CloseCode::Size;
    let frame = CloseFrame {
        code: closing.code,
        reason: Utf8Bytes::from(closing.reason),
    };
    let _ = tokio::time::timeout(timeout, async {
        if socket.close(Some(frame)).await.is_ok() {
            drain_after_close(socket, framing_intact).await;
        }
    })
    .await;
}

enum Gone {
    Yes,
    No,
}

struct Socket {
    context: Arc<V2Context>,
    calls: CallTable,
    last_open: u32,
    budget: Budget,
    /// From the calls to the writer; made at the first `open`, so an idle
    /// socket holds no channel.
    lines: Option<Lines>,
    /// Records of the next batch.
    batch: Batch,
    /// When the built-in calls' deadlines pass (the generic calls keep their own).
    deadlines: BTreeSet<(Instant, u32)>,
    /// Built-in calls with something to settle once the current incoming
    /// batch is applied (a grant to count, or their end).
    unsettled: Vec<u32>,
    /// The built-in calls' message counts (made at the first message).
    /// Boxed: inline, its 40 bytes would be in every idle socket's task.
    messages: Option<Box<StreamMetrics>>,
    /// Set by a socket error: no more reading; close once the calls are done.
    closing: Option<Closing>,
    /// `goaway` sent.
    draining: bool,
    /// The batch being applied was read while the budget was used up.
    over_budget: bool,
    tasks: TaskTracker,
}

impl Socket {
    /// Whether the socket may read: the budget has room, or every call
    /// holding it waits for response credit (only a `window` record, which
    /// is still unread, can move them: not reading would wait forever).
    fn may_read(&self) -> bool {
        self.budget.has_room() || self.calls.values().all(LiveCall::lets_socket_read)
    }

    fn on_out(&mut self, out: Out) {
        match out {
            Out::Record(record) => self.batch.append_encoded(&record),
            Out::Records(records) => {
                for record in records {
                    self.batch.append_encoded(&record);
                }
            }
            Out::Status { call, record } => {
                self.calls.remove(&call);
                self.batch.append_encoded(&record);
            }
            Out::Grant { call, amount, record } => {
                // A call that ended takes no more grants: its status was its last record.
                if let Some(live) = self.calls.get_mut(&call) {
                    live.request_credit = live.request_credit.saturating_add(amount);
                    self.batch.append_encoded(&record);
                }
            }
        }
    }

    /// Ends `call` with `status` (OK included): a task call is told to (it
    /// sends its replies already due, then the status); a built-in call ends
    /// here.
    fn end_call(&mut self, call: u32, status: Status) {
        let Some(live) = self.calls.get(&call) else { return };
        if let Route::Task(task) = &live.route {
            task.abort.abort(status);
            return;
        }
        let Some(LiveCall {
            route: Route::Builtin(builtin),
            ..
        }) = self.calls.remove(&call)
        else {
            unreachable!("the call was just seen to be built-in")
        };
        self.end_builtin(call, builtin, status);
    }

    fn end_builtin(&mut self, call: u32, builtin: BuiltinCall, status: Status) {
        if let Some((at, _)) = builtin.deadline() {
            self.deadlines.remove(&(at, call));
        }
        builtin.finish(&status, &self.budget);
        self.batch.record(call, Kind::Status(call::to_record_status(&status)));
    }

    /// Lets a built-in call answer what it may; a request that does not
    /// decode ends it. What else follows is settled once the whole incoming
    /// batch is applied ([`Socket::settle`]).
    fn serve(&mut self, call: u32) {
        let Some(live) = self.calls.get_mut(&call) else { return };
        let Route::Builtin(builtin) = &mut live.route else {
            return;
        };
        let mut side = socket_side(&self.budget, &mut self.batch, &mut self.messages, &self.context);
        let served = builtin.serve(call, &mut side).map(|()| builtin.needs_settling());
        self.after_serving(call, served);
    }

    /// Notes that a built-in call has something to settle after this
    /// incoming batch (most messages leave nothing: then the call is not
    /// looked up again), or ends it.
    fn after_serving(&mut self, call: u32, served: Result<bool, Status>) {
        match served {
            Ok(true) => {
                if self.unsettled.last() != Some(&call) {
                    self.unsettled.push(call);
                }
            }
            Ok(false) => {}
            Err(status) => self.end_call(call, status),
        }
    }

    /// After an incoming batch: the built-in calls that granted during it count
    /// the request credit they granted (its `window` records go out before
    /// the socket reads again, so the client's next messages may use it),
    /// and those with nothing left to answer after `closeSend` end with OK.
    /// Not earlier: a message behind the `closeSend` in the same batch must
    /// still meet a live call (and end it with 3).
    fn settle(&mut self) {
        for call in std::mem::take(&mut self.unsettled) {
            let Some(live) = self.calls.get_mut(&call) else {
                continue;
            };
            let Route::Builtin(builtin) = &mut live.route else {
                continue;
            };
            live.request_credit = live.request_credit.saturating_add(builtin.take_unsent_grants());
            if builtin.is_done() {
                self.end_call(call, Status::ok(""));
            }
        }
        if let Some(messages) = &self.messages {
            messages.publish();
        }
    }

    fn builtin_calls(&self) -> Vec<u32> {
        self.calls
            .iter()
            .filter(|(_, live)| matches!(live.route, Route::Builtin(_)))
            .map(|(call, _)| *call)
            .collect()
    }

    /// Writes the gathered records, 64 KiB per WebSocket message. A peer
    /// that takes none of a message for two ping intervals is gone (the
    /// last message and the flush share one deadline: the usual batch is one
    /// message, and a deadline costs a timer).
    async fn flush<S>(&mut self, socket: &mut WebSocketStream<S>, settings: &V2Settings) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let encoding = self.batch.encoding;
        let deadline = settings.ping_interval * 2;
        let mut messages = self.batch.take().peekable();
        while let Some(bytes) = messages.next() {
            let message = match encoding {
                Encoding::Proto => Message::Binary(bytes.into()),
                Encoding::Json => {
                    Message::Text(Utf8Bytes::try_from(Bytes::from(bytes)).expect("records are JSON text"))
                }
            };
            let last = messages.peek().is_none();
            let mut write = std::pin::pin!(async {
                socket.feed(message).await?;
                if last { socket.flush().await } else { Ok(()) }
            });
            // The usual write completes at once: the timer (reading the
            // clock, arming and disarming it) only for one that has to wait.
            let written = match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
                Poll::Ready(written) => written.is_ok(),
                Poll::Pending => matches!(tokio::time::timeout(deadline, write).await, Ok(Ok(()))),
            };
            if !written {
                return false;
            }
        }
        true
    }

    async fn on_message<S>(&mut self, message: Message, socket: &mut WebSocketStream<S>, settings: &V2Settings) -> Gone
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match (message, self.batch.encoding) {
            (Message::Binary(bytes), Encoding::Proto) => match v2::decode_client_batch(bytes) {
                Ok(batch) => {
                    for record in batch.records {
                        if !self.on_proto_record(record) {
                            break;
                        }
                    }
                    self.settle();
                }
                Err(error) => self.socket_error(Code::InvalidArgument, error.0, CloseCode::Invalid),
            },
            (Message::Text(text), Encoding::Json) => match v2::json::decode_client_batch(&text) {
                Ok(batch) => {
                    for record in batch {
                        if !self.on_json_record(record) {
                            break;
                        }
                    }
                    self.settle();
                }
                Err(error) => self.socket_error(Code::InvalidArgument, error.0, CloseCode::Invalid),
            },
            (Message::Text(_), Encoding::Proto) => self.socket_error(
                Code::InvalidArgument,
                "text message on streambridge.v2.proto, which takes binary messages".into(),
                CloseCode::Unsupported,
            ),
            (Message::Binary(_), Encoding::Json) => self.socket_error(
                Code::InvalidArgument,
                "binary message on streambridge.v2.json, which takes text messages".into(),
                CloseCode::Unsupported,
            ),
            (Message::Ping(_), _) => {
                // tungstenite queued the pong: send it now.
                if !matches!(
                    tokio::time::timeout(settings.ping_interval * 2, socket.flush()).await,
                    Ok(Ok(()))
                ) {
                    return Gone::Yes;
                }
            }
            (Message::Pong(_) | Message::Frame(_), _) => {}
            (Message::Close(_), _) => {
                // The peer closed: answer its Close, cancel what is left.
                let _ = tokio::time::timeout(settings.close_timeout, socket.flush()).await;
                return Gone::Yes;
            }
        }
        Gone::No
    }

    fn on_proto_record(&mut self, record: v2::ClientRecord) -> bool {
        let kind = match record.kind {
            Some(client_record::Kind::Open(open)) => Incoming::Open(open),
            Some(client_record::Kind::Message(bytes)) => Incoming::Message(Request::Proto(bytes)),
            Some(client_record::Kind::CloseSend(_)) => Incoming::CloseSend,
            Some(client_record::Kind::Cancel(_)) => Incoming::Cancel,
            Some(client_record::Kind::Window(window)) => Incoming::Window(window),
            None => {
                self.socket_error(
                    Code::InvalidArgument,
                    format!("a record for call {} has no kind", record.call),
                    CloseCode::Invalid,
                );
                return false;
            }
        };
        self.on_record(record.call, kind)
    }

    fn on_json_record(&mut self, record: v2::json::JsonClientRecord<'_>) -> bool {
        use v2::json::JsonClientKind;
        let kind = match record.kind {
            JsonClientKind::Open(open) => Incoming::Open(*open),
            JsonClientKind::Message(text) => Incoming::Message(Request::Json(text)),
            JsonClientKind::CloseSend => Incoming::CloseSend,
            JsonClientKind::Cancel => Incoming::Cancel,
            JsonClientKind::Window(window) => Incoming::Window(window),
        };
        self.on_record(record.call, kind)
    }

    /// Applies one record; false once the socket has failed.
    fn on_record(&mut self, call: u32, kind: Incoming<'_>) -> bool {
        if call == 0 {
            self.socket_error(
                Code::InvalidArgument,
                "call 0 is reserved for the server's socket-level records".into(),
                CloseCode::Invalid,
            );
            return false;
        }
        match kind {
            Incoming::Open(open) => return self.open(call, open),
            Incoming::Message(payload) => self.message(call, payload),
            Incoming::CloseSend => {
                let Some(live) = self.calls.get_mut(&call) else {
                    return true;
                };
                if std::mem::replace(&mut live.closed_send, true) {
                    self.end_call(call, Status::invalid_argument("closeSend after closeSend"));
                    return true;
                }
                match &mut live.route {
                    Route::Task(task) => task.requests = None,
                    Route::Builtin(builtin) => {
                        builtin.close_send();
                        self.serve(call);
                    }
                }
            }
            Incoming::Cancel => self.end_call(call, Status::cancelled("cancelled by the client")),
            Incoming::Window(window) => {
                let Some(live) = self.calls.get_mut(&call) else {
                    return true;
                };
                match &mut live.route {
                    Route::Task(task) => {
                        // Unused credit saturates at 2^32-1.
                        let room = (u32::MAX as usize).saturating_sub(task.response_credit.available_permits());
                        task.response_credit.add_permits((window as usize).min(room));
                    }
                    Route::Builtin(builtin) => {
                        builtin.add_credit(window);
                        self.serve(call);
                    }
                }
            }
        }
        true
    }

    fn open(&mut self, call: u32, open: v2::Open) -> bool {
        if call <= self.last_open {
            self.socket_error(
                Code::InvalidArgument,
                format!(
                    "open for call {call}: call ids must increase (the last open was {})",
                    self.last_open
                ),
                CloseCode::Invalid,
            );
            return false;
        }
        self.last_open = call;
        let settings = &self.context.settings;
        let refusal = if self.draining {
            Some(Status::unavailable("server shutting down: open the call elsewhere"))
        } else if self.calls.len() >= settings.max_calls {
            Some(Status::resource_exhausted(format!(
                "this socket already has {} live calls (--ws-max-calls)",
                self.calls.len()
            )))
        } else {
            None
        };
        let response_window = if open.window == 0 {
            v2::DEFAULT_WINDOW
        } else {
            open.window
        };
        let builtin = match &self.context.data_service {
            Some(calls) if open.method == builtin::METHOD => Some(calls),
            _ => None,
        };
        let refusal = refusal.or_else(|| builtin.and_then(|_| call::check_metadata(&open).err()));
        if let Some(status) = refusal {
            self.batch.record(call, Kind::Status(call::to_record_status(&status)));
            return true;
        }
        let live = |route| LiveCall {
            request_credit: v2::DEFAULT_WINDOW,
            closed_send: false,
            route,
        };
        if let Some(calls) = builtin {
            let deadline = (open.timeout_ms > 0).then(|| {
                let at = Instant::now() + Duration::from_millis(open.timeout_ms.into());
                self.deadlines.insert((at, call));
                (at, open.timeout_ms)
            });
            let guard = calls.enter(Transport::WebSocket);
            let builtin = BuiltinCall::new(response_window, deadline, guard);
            self.calls.insert(call, live(Route::Builtin(builtin)));
            return true;
        }
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let response_credit = Arc::new(Semaphore::new(response_window as usize));
        let abort = Abort::default();
        let gauge = Arc::new(CallGauge::default());
        self.calls.insert(
            call,
            live(Route::Task(Box::new(TaskCall {
                requests: Some(requests_tx),
                response_credit: response_credit.clone(),
                abort: abort.clone(),
                gauge: gauge.clone(),
            }))),
        );
        let lines = self.lines.get_or_insert_with(Lines::new);
        let spec = CallSpec {
            call,
            open,
            encoding: self.batch.encoding,
            requests,
            response_credit,
            abort,
            out: lines.out_tx.clone(),
            control: lines.control_tx.clone(),
            budget: self.budget.clone(),
            gauge,
            backend: self.context.backend.clone(),
            catalog: self.context.catalog.clone(),
            max_message_size: settings.max_message_size,
        };
        self.tasks.spawn(call::run(spec));
        true
    }

    fn message(&mut self, call: u32, request: Request<'_>) {
        let max = self.context.settings.max_message_size;
        let Some(live) = self.calls.get_mut(&call) else { return };
        let refusal = if live.closed_send {
            Some(Status::invalid_argument("message after closeSend"))
        } else if request.len() > max {
            Some(Status::resource_exhausted(format!(
                "a request message of {} bytes is larger than --max-message-size ({max})",
                request.len()
            )))
        } else if live.request_credit == 0 {
            Some(Status::resource_exhausted(
                "a request message beyond the call's request credit (256 plus the window records sent): \
                 wait for window records",
            ))
        } else if self.over_budget {
            // Read only so that `window` records could get through: a message
            // now would grow the buffer past its bound.
            Some(Status::resource_exhausted(
                "a request message arrived while the socket's request buffer (--ws-socket-buffer) was full \
                 and every call holding it waited for response credit: grant credit (window) first",
            ))
        } else {
            live.request_credit -= 1;
            None
        };
        if let Some(status) = refusal {
            return self.end_call(call, status);
        }
        match &mut live.route {
            Route::Task(task) => {
                let Some(requests) = &task.requests else { return };
                let len = request.len();
                self.budget.take(len);
                task.gauge.held.fetch_add(len, Ordering::AcqRel);
                // It waits in the channel until the call's task takes it.
                if requests.send(request.detached()).is_err() {
                    // The call stopped reading (it is ending): the message is dropped with it.
                    self.budget.give_back(len);
                    task.gauge.consumed(len);
                }
            }
            Route::Builtin(builtin) => {
                let mut side = socket_side(&self.budget, &mut self.batch, &mut self.messages, &self.context);
                let served = builtin
                    .receive(call, request, &mut side)
                    .map(|()| builtin.needs_settling());
                self.after_serving(call, served);
            }
        }
    }

    /// A broken rule of the socket: every live call ends with `code`, then
    /// the socket closes with `close`.
    fn socket_error(&mut self, code: Code, message: String, close: CloseCode) {
        tracing::debug!(%message, ?close, "v2 socket error");
        for call in self.calls.keys().copied().collect::<Vec<_>>() {
            self.end_call(call, Status::new(code, message.clone()));
        }
        let mut reason = message;
        // A close reason is at most 123 bytes.
        if reason.len() > 120 {
            let mut cut = 120;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        if self.closing.is_none() {
            self.closing = Some(Closing { code: close, reason });
        }
    }

    /// The peer is gone: every call is cancelled, nothing more is written.
    fn cancel_all(self) {
        for live in self.calls.values() {
            // Built-in calls end as they are dropped (their guard records CANCELLED).
            if let Route::Task(task) = &live.route {
                task.abort.abort(Status::cancelled("the client went away"));
            }
        }
    }
}

/// The channels from the calls to the socket's writer: records, and
/// request grants (unbounded: each is made by a request the backend
/// consumed, so they are bounded by the requests).
struct Lines {
    out_tx: mpsc::Sender<Out>,
    out_rx: mpsc::Receiver<Out>,
    control_tx: mpsc::UnboundedSender<Out>,
    control_rx: mpsc::UnboundedReceiver<Out>,
}

impl Lines {
    fn new() -> Lines {
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        Lines {
            out_tx,
            out_rx,
            control_tx,
            control_rx,
        }
    }

    /// A grant first (they are small and let the client send on), else a record.
    fn try_recv(&mut self) -> Option<Out> {
        self.control_rx.try_recv().ok().or_else(|| self.out_rx.try_recv().ok())
    }
}

/// The next item from the calls; pending while there are none.
async fn recv(lines: &mut Option<Lines>) -> Out {
    let Some(lines) = lines else {
        return std::future::pending().await;
    };
    tokio::select! {
        biased;
        Some(out) = lines.control_rx.recv() => out,
        Some(out) = lines.out_rx.recv() => out,
    }
}

enum Incoming<'a> {
    Open(v2::Open),
    Message(Request<'a>),
    CloseSend,
    Cancel,
    Window(u32),
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// Appends a `message` record of `size` bytes for `call`.
    fn message(batch: &mut Batch, call: u32, size: usize) {
        let kind = match batch.encoding {
            Encoding::Proto => Kind::Message(Bytes::from(vec![b'x'; size])),
            Encoding::Json => Kind::JsonMessage(format!("\"{}\"", "x".repeat(size))),
        };
        batch.record(call, kind);
    }

    /// The WebSocket messages a batch makes: for each, its size and the
    /// calls of its records, in order (each message decoded on its own).
    fn written(batch: &mut Batch) -> Vec<(usize, Vec<u32>)> {
        let encoding = batch.encoding;
        batch
            .take()
            .map(|bytes| {
                let calls = match encoding {
                    Encoding::Proto => v2::ServerBatch::decode(&bytes[..])
                        .expect("a ServerBatch")
                        .records
                        .iter()
                        .map(|r| r.call)
                        .collect(),
                    Encoding::Json => serde_json::from_slice::<Vec<serde_json::Value>>(&bytes)
                        .expect("a JSON array")
                        .iter()
                        .map(|r| r["call"].as_u64().unwrap() as u32)
                        .collect(),
                };
                (bytes.len(), calls)
            })
            .collect()
    }

    /// The socket looks a call up for every record, usually with the table
    /// cold in the cache, so each cache line an entry spans can be a miss per
    /// message (docs/benchmarks.md, "Cache lines and syscalls at the same
    /// rate": entries of 120 bytes were the socket's largest cost). Grow an
    /// entry on purpose, not by accident.
    #[test]
    fn a_call_table_entry_stays_small() {
        assert!(std::mem::size_of::<(u32, LiveCall)>() <= 40);
    }

    #[test]
    fn a_batch_becomes_messages_of_at_most_64_kib_in_record_order() {
        for encoding in [Encoding::Proto, Encoding::Json] {
            let mut batch = Batch::new(encoding);
            assert!(batch.is_empty() && !batch.is_full());
            for call in 1..=5 {
                message(&mut batch, call, 20_000);
            }
            assert!(batch.is_full(), "{encoding:?}: 100 KB is more than a message");
            let messages = written(&mut batch);
            assert!(batch.is_empty());
            let calls: Vec<_> = messages.iter().map(|(_, calls)| calls.clone()).collect();
            assert_eq!(calls, [vec![1, 2, 3], vec![4, 5]], "{encoding:?}");
            assert!(messages.iter().all(|(size, _)| *size <= BATCH_BYTES), "{encoding:?}");

            // A record larger than a message goes alone, between its neighbours.
            message(&mut batch, 6, 10);
            message(&mut batch, 7, 100_000);
            message(&mut batch, 8, 10);
            batch.record(9, Kind::Window(5));
            let calls: Vec<_> = written(&mut batch).into_iter().map(|(_, calls)| calls).collect();
            assert_eq!(calls, [vec![6], vec![7], vec![8, 9]], "{encoding:?}");
            assert_eq!(batch.take().count(), 0, "{encoding:?}: nothing left");

            // Two records that fill a message to the byte, brackets included, share
            // it; one byte more and the second starts the next.
            let mut alone = |size| {
                message(&mut batch, 1, size);
                written(&mut batch)[0].0
            };
            let json = usize::from(encoding == Encoding::Json);
            // Two records in one message: their sizes alone, less one bracket pair, plus a comma.
            let together = |a: usize, b: usize| a + b - json;
            let first = alone(30_000);
            let second = (BATCH_BYTES - first - 64..BATCH_BYTES)
                .find(|&size| together(first, alone(size)) == BATCH_BYTES)
                .expect("a size that fills the message");
            for (extra, expected) in [(0, vec![vec![1, 2]]), (1, vec![vec![1], vec![2]])] {
                message(&mut batch, 1, 30_000);
                message(&mut batch, 2, second + extra);
                let messages = written(&mut batch);
                let calls: Vec<_> = messages.iter().map(|(_, calls)| calls.clone()).collect();
                assert_eq!(calls, expected, "{encoding:?}, {extra} byte(s) over");
                assert!(messages.iter().all(|(size, _)| *size <= BATCH_BYTES), "{encoding:?}");
            }
        }
    }
}
