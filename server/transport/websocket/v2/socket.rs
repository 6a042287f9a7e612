//! One socket's task: it reads WebSocket messages and applies their
//! records to the call machine, polls the calls whose backends have news,
//! and writes the records they produce, as many as are ready in one
//! WebSocket message (never waiting for more, at most 64 KiB unless a
//! single record is larger). A protocol v1 socket runs here too, as one
//! implicit call in v1's envelope ([`v1`]).
//!
//! The protocol's rules live here once, for every call whatever answers it
//! ([`super::table::Route`]): request credit and the socket's byte budget
//! on the way in, response credit on the way out (kept by the plug-in, which
//! stops reading its backend without it), deadlines (one timer for the
//! socket), cancel, drain, and the one `status` record every call ends with.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use streambridge_protocol::client_frame;
use streambridge_protocol::v2::{self, Encoding};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tonic::{Code, Status};

use super::batch::{Batch, Framing};
use super::budget::Budget;
use super::builtin::{self, BuiltinCall, SocketSide};
use super::grpc_call::{self, GrpcCall, Opening};
use super::records::{self, Incoming, Kind, Request};
use super::table::{CallTable, CallWaker, LiveCall, Route, Wakeups};
use super::wire::{Closing, Wire};
use super::{SocketContext, SocketSettings};
use crate::error::Error;
use crate::ops::metrics::Refused;
use crate::ops::metrics::StreamMetrics;
use crate::ops::shutdown::{Drain, DrainCheck};
use crate::ops::traces::{HeaderExtractor, MetadataExtractor};
use crate::policy::auth::{Authenticated, Caller, Refusal};
use crate::transport::websocket::{Protocol, v1};

/// Runs a socket of either protocol until it closes.
///
/// Not an `async fn`: one moves its arguments into locals of its future and
/// keeps their first slots as well (rust-lang/rust#62958), which for the
/// socket is 328 bytes of every idle socket's task.
#[expect(clippy::manual_async_fn, reason = "an async fn would hold the socket twice")]
pub fn run<W: Wire>(
    mut socket: W,
    protocol: Protocol,
    context: Arc<SocketContext>,
    drain: &Drain,
    who: Authenticated,
) -> impl Future<Output = ()> {
    async move {
        let settings = context.settings.clone();
        let (encoding, framing) = match protocol {
            Protocol::V1(subprotocol) => (v1::encoding(subprotocol), Framing::V1),
            Protocol::V2(encoding) => (encoding, Framing::Records),
        };
        let mut state = Socket {
            context,
            who,
            calls: CallTable::default(),
            last_open: 0,
            budget: Budget::new(settings.socket_buffer),
            wakeups: None,
            ready: VecDeque::new(),
            batch: Batch::new(encoding, framing),
            deadlines: BTreeSet::new(),
            paced: BTreeSet::new(),
            unsettled: Vec::new(),
            messages: None,
            closing: None,
            draining: false,
            over_budget: false,
        };
        if framing == Framing::V1 {
            state.open_v1_call();
        }
        let mut ping = tokio::time::interval_at(Instant::now() + settings.ping_interval, settings.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heard_since_ping = true;
        let mut drain_deadline: Option<Instant> = None;
        let mut drain_check = DrainCheck::new(drain);

        loop {
            state.poll_calls();
            if !state.batch.is_empty() {
                if !state.flush(&mut socket, &settings).await {
                    return;
                }
                heard_since_ping = true;
                if !state.ready.is_empty() {
                    continue;
                }
            }
            let call_done = settings.single_call && state.last_open > 0;
            if (state.closing.is_some() || state.draining || call_done) && state.calls.is_empty() {
                let closing = state.closing.take().unwrap_or_else(|| {
                    if call_done {
                        Closing::new(CloseCode::Normal, "", true)
                    } else {
                        Closing::new(CloseCode::Away, "server shutting down", true)
                    }
                });
                socket.close(closing, settings.close_timeout).await;
                return;
            }
            let reading = state.closing.is_none();
            let may_read = reading && state.may_read();
            // A socket that always has a message to read would seldom reach
            // the drain's branch below: it looks at the flag every few turns.
            if !state.draining && reading && drain_check.busy_check() {
                drain_deadline = Some(state.start_drain(&settings));
                continue;
            }
            // One timer for every kind of deadline: each timer in the
            // `select!` below would add its size to every socket, idle or not.
            let next_deadline = [
                drain_deadline.filter(|_| !state.calls.is_empty()),
                state.deadlines.first().map(|&(at, _)| at),
                state.paced.first().map(|&(at, _)| at),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                biased;
                _ = ping.tick() => {
                    if !heard_since_ping {
                        tracing::debug!("peer did not answer the last ping; cancelling its calls");
                        return;
                    }
                    heard_since_ping = false;
                    if !matches!(tokio::time::timeout(settings.ping_interval * 2, socket.send(Message::Ping(Bytes::new()))).await, Ok(Ok(()))) {
                        return;
                    }
                }
                () = woken(state.wakeups.as_deref(), &mut state.ready) => {}
                frame = socket.next(), if may_read => {
                    heard_since_ping = true;
                    let mut frame = frame;
                    let mut read = 1;
                    loop {
                        state.over_budget = !state.budget.has_room();
                        if let Gone::Yes = state.on_frame(frame, &mut socket, &settings).await {
                            return;
                        }
                        // Read ahead what has already arrived (up to
                        // --ws-request-queue messages) before writing the
                        // replies: one write for them all, and a record
                        // behind a `closeSend` still meets its call.
                        if read >= settings.read_ahead || state.closing.is_some() || state.batch.is_full() || !state.may_read() {
                            break;
                        }
                        match socket.next().now_or_never() {
                            Some(next) => frame = next,
                            None => break,
                        }
                        read += 1;
                    }
                    state.settle();
                }
                () = state.budget.changed(), if reading && !may_read => {}
                // Not `CancellationToken::cancelled`: polling that locks the one
                // token every socket shares, on every turn of every socket's loop.
                () = std::future::poll_fn(|cx| drain_check.poll_idle(cx)), if !state.draining => {
                    drain_deadline = Some(state.start_drain(&settings));
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
                        let timeout_ms = state.calls.get(&call).and_then(LiveCall::deadline).map_or(0, |(_, ms)| ms);
                        state.end_call(call, deadline_passed(timeout_ms));
                    }
                    while let Some(&(at, call)) = state.paced.first() && at <= now {
                        state.paced.pop_first();
                        state.serve(call);
                    }
                    state.settle();
                }
            }
        }
    }
}

fn deadline_passed(timeout_ms: u32) -> Status {
    Status::deadline_exceeded(format!("the call's deadline (timeoutMs {timeout_ms}) passed"))
}

/// Resolves once a call has news, its id moved to `ready`; never without
/// calls on the backend.
async fn woken(wakeups: Option<&Wakeups>, ready: &mut VecDeque<u32>) {
    match wakeups {
        Some(wakeups) => std::future::poll_fn(|cx| wakeups.poll_woken(cx, ready)).await,
        None => std::future::pending().await,
    }
}

/// What a built-in call is served with: the socket's budget, batch and
/// message tally (made at its first built-in message). Fields, not
/// `&mut Socket`: the call itself is borrowed from the socket's table.
fn socket_side<'a>(
    budget: &'a Budget,
    batch: &'a mut Batch,
    messages: &'a mut Option<Box<StreamMetrics>>,
    paced: &'a mut BTreeSet<(Instant, u32)>,
    context: &SocketContext,
) -> SocketSide<'a> {
    SocketSide {
        budget,
        batch,
        messages: messages.get_or_insert_with(|| builtin_messages(context)),
        paced,
        request_credit: context.settings.request_credit,
    }
}

/// Message counters for a socket's built-in calls.
fn builtin_messages(context: &SocketContext) -> Box<StreamMetrics> {
    let calls = context
        .data_service
        .as_ref()
        .expect("built-in calls only where the service runs");
    Box::new(calls.metrics().message_counters(context.transport))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A request message, as the socket's protocol brought it.
enum Arrived<'a> {
    /// A v2 `message` record.
    Record(Request<'a>),
    /// A v1 `request` frame's `data`, decoded by v1's envelope (which
    /// checked it whole, with v1's own error texts).
    V1Data(&'a str),
}

enum Gone {
    Yes,
    No,
}

/// A socket's state. Dropping it (the peer gone) cancels every call: a
/// backend call ends its request and response bodies as it is dropped, a
/// built-in one records CANCELLED through its guard.
struct Socket {
    context: Arc<SocketContext>,
    /// Who the upgrade's token said the client is, and its address.
    who: Authenticated,
    calls: CallTable,
    last_open: u32,
    budget: Budget,
    /// Where backend calls report news; made at the first, so an idle
    /// socket holds none.
    wakeups: Option<Arc<Wakeups>>,
    /// Calls to poll: woken, opened, granted credit, or cut short by a full batch.
    ready: VecDeque<u32>,
    /// Records of the next batch.
    batch: Batch,
    /// When the calls' deadlines pass.
    deadlines: BTreeSet<(Instant, u32)>,
    /// When built-in calls held back by their caller's message bucket may
    /// go on (`--limit-messages-per-second`).
    paced: BTreeSet<(Instant, u32)>,
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
}

impl Socket {
    /// Whether the socket may read: the budget has room, or every call
    /// holding it waits for response credit (only a `window` record, which
    /// is still unread, can move them: not reading would wait forever).
    fn may_read(&self) -> bool {
        self.budget.has_room() || self.calls.values().all(LiveCall::lets_socket_read)
    }

    /// Polls the calls that are ready, until none is or the batch is full.
    fn poll_calls(&mut self) {
        while !self.batch.is_full()
            && let Some(call) = self.ready.pop_front()
        {
            let Some(LiveCall {
                route: Route::Grpc(grpc),
                request_credit,
                ..
            }) = self.calls.get_mut(&call)
            else {
                continue;
            };
            match grpc.poll(call, &mut self.batch) {
                Ok(progress) => {
                    *request_credit = request_credit.saturating_add(progress.granted);
                    if progress.again {
                        self.ready.push_back(call);
                    }
                }
                Err(status) => self.end_call(call, status),
            }
        }
    }

    /// Ends `call` with `status` (OK included): its plug-in lets go of what
    /// it holds, and its `status` record goes into the batch, after every
    /// record it wrote before.
    fn end_call(&mut self, call: u32, status: Status) {
        let Some(live) = self.calls.remove(&call) else { return };
        let mut status = status;
        if let Some((at, timeout_ms)) = live.deadline() {
            self.deadlines.remove(&(at, call));
            // A service that ends the call on the same deadline may say
            // CANCELLED (tonic's server does) a moment before our timer fires.
            if status.code() == Code::Cancelled && Instant::now() >= at {
                status = deadline_passed(timeout_ms);
            }
        }
        live.finish(&status, &self.budget);
        if self.batch.framing == Framing::V1 && self.closing.is_none() {
            // The call's end is the socket's.
            let close_code = crate::error::close_code_of(status.code());
            self.closing = Some(Closing::new(close_code, status.message(), true));
        }
        self.batch.record(call, records::status_record(&status));
    }

    /// A v1 socket's one call, open from the start: v1 has no flow control,
    /// so its response credit is without limit (2^32-1, which never runs out).
    fn open_v1_call(&mut self) {
        let calls = self
            .context
            .data_service
            .as_ref()
            .expect("v1 sockets only where the built-in service runs");
        let meter = self
            .context
            .auth
            .message_meter(builtin::METHOD, &self.who.caller, self.who.client);
        // v1 carries no metadata: its span has no parent from the client.
        let guard = calls.enter_traced(
            self.context.transport,
            builtin::METHOD,
            &HeaderExtractor(&http::HeaderMap::new()),
        );
        let call = BuiltinCall::new(u32::MAX, None, guard, meter);
        self.calls.insert(v1::CALL, LiveCall::new(Route::Builtin(call)));
        self.last_open = v1::CALL;
    }

    /// Starts the drain: `goaway`, the built-in service's calls end; returns
    /// when the others are cut.
    fn start_drain(&mut self, settings: &SocketSettings) -> Instant {
        self.draining = true;
        let message = "server shutting down: finish your calls, open new ones elsewhere".into();
        self.batch.record(0, Kind::GoAway(v2::GoAway { message }));
        // Live calls run on (docs/protocol-v2.md §7). The
        // built-in service ends its own at the drain, as it does on
        // every transport (status 14: safe to retry elsewhere).
        for call in self.builtin_calls() {
            self.end_call(call, Error::ShuttingDown.into());
        }
        // Cut calls a little before the server's own deadline, so their status gets out.
        let margin = (settings.drain_timeout / 10).min(Duration::from_secs(1));
        Instant::now() + settings.drain_timeout.saturating_sub(margin)
    }

    /// Lets a built-in call answer what it may; a request that does not
    /// decode ends it. What else follows is settled once the whole incoming
    /// batch is applied ([`Socket::settle`]).
    fn serve(&mut self, call: u32) {
        let Some(live) = self.calls.get_mut(&call) else { return };
        let Route::Builtin(builtin) = &mut live.route else {
            return;
        };
        let mut side = socket_side(
            &self.budget,
            &mut self.batch,
            &mut self.messages,
            &mut self.paced,
            &self.context,
        );
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
    async fn flush(&mut self, socket: &mut impl Wire, settings: &SocketSettings) -> bool {
        let deadline = settings.ping_interval * 2;
        let mut messages = self.batch.take().peekable();
        while let Some(message) = messages.next() {
            let last = messages.peek().is_none();
            let mut write = std::pin::pin!(async {
                socket.feed(message).await?;
                if last { socket.flush().await } else { Ok(()) }
            });
            // The usual write completes at once: the timer (reading the
            // clock, arming and disarming it) only for one that has to wait.
            let written = match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
                Poll::Ready(written) => written.is_ok(),
                // Boxed: its state (a timer, the select) would otherwise be
                // part of every idle socket's task.
                Poll::Pending => Box::pin(self.write_blocked(write, deadline)).await,
            };
            if !written {
                return false;
            }
        }
        true
    }

    /// Waits for a write its client is slow to take. Meanwhile calls with
    /// news do not read it: each parks where its backend bounds that
    /// ([`GrpcCall::park_while_blocked`]), and is polled once the write is done.
    async fn write_blocked(
        &mut self,
        mut write: std::pin::Pin<&mut impl Future<Output = Result<(), WsError>>>,
        deadline: Duration,
    ) -> bool {
        let timeout = tokio::time::sleep(deadline);
        tokio::pin!(timeout);
        loop {
            self.park_ready_calls();
            tokio::select! {
                biased;
                written = write.as_mut() => return written.is_ok(),
                () = &mut timeout => return false,
                () = woken(self.wakeups.as_deref(), &mut self.ready) => {}
            }
        }
    }

    fn park_ready_calls(&mut self) {
        for index in 0..self.ready.len() {
            let call = self.ready[index];
            if let Some(LiveCall {
                route: Route::Grpc(grpc),
                ..
            }) = self.calls.get_mut(&call)
                && let Err(status) = grpc.park_while_blocked()
            {
                self.end_call(call, status);
            }
        }
    }

    /// Applies what one read of the socket gave.
    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, WsError>>,
        socket: &mut impl Wire,
        settings: &SocketSettings,
    ) -> Gone {
        let message = match frame {
            Some(Ok(message)) => message,
            Some(Err(error)) if self.batch.framing == Framing::V1 => {
                match v1::read_error(error, settings.max_message_size) {
                    Some((error, framing_intact)) => {
                        self.fail(error.code(), error.to_string(), error.close_code(), framing_intact)
                    }
                    None => return Gone::Yes,
                }
                return Gone::No;
            }
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                self.fail(
                    Code::ResourceExhausted,
                    format!(
                        "a WebSocket message of {size} bytes is larger than {max_size} (--max-message-size plus 64 KiB)"
                    ),
                    CloseCode::Size,
                    false,
                );
                return Gone::No;
            }
            Some(Err(WsError::Utf8(_))) => {
                // tungstenite ends the stream after this error: no Close can be read.
                self.fail(
                    Code::InvalidArgument,
                    "a text message is not valid UTF-8".into(),
                    CloseCode::Invalid,
                    false,
                );
                return Gone::No;
            }
            Some(Err(_)) | None => return Gone::Yes,
        };
        match (message, self.batch.encoding) {
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
            (message, encoding) if self.batch.framing == Framing::V1 => match v1::frame(message, encoding) {
                Ok(client_frame::Frame::Request(request)) => self.message(v1::CALL, Arrived::V1Data(&request.data)),
                Ok(client_frame::Frame::CloseSend(_)) => {
                    self.on_record(v1::CALL, Incoming::CloseSend);
                }
                Err(error) => self.fail(error.code(), error.to_string(), error.close_code(), true),
            },
            (Message::Binary(bytes), Encoding::Proto) => match v2::decode_client_batch(bytes) {
                Ok(batch) => {
                    for record in batch.records {
                        let Some(kind) = Incoming::from_proto(record.kind) else {
                            self.socket_error(
                                Code::InvalidArgument,
                                format!("a record for call {} has no kind", record.call),
                                CloseCode::Invalid,
                            );
                            break;
                        };
                        if !self.on_record(record.call, kind) {
                            break;
                        }
                    }
                }
                Err(error) => self.socket_error(Code::InvalidArgument, error.0, CloseCode::Invalid),
            },
            (Message::Text(text), Encoding::Json) => match v2::json::decode_client_batch(&text) {
                Ok(batch) => {
                    for record in batch {
                        if !self.on_record(record.call, Incoming::from_json(record.kind)) {
                            break;
                        }
                    }
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
        }
        Gone::No
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
            Incoming::Message(payload) => self.message(call, Arrived::Record(payload)),
            Incoming::CloseSend => {
                let Some(live) = self.calls.get_mut(&call) else {
                    return true;
                };
                if std::mem::replace(&mut live.closed_send, true) {
                    self.end_call(call, Error::AfterCloseSend("closeSend").into());
                    return true;
                }
                match &mut live.route {
                    Route::Grpc(grpc) => grpc.close_send(),
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
                    Route::Grpc(grpc) => {
                        grpc.add_credit(window);
                        self.ready.push_back(call);
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
        let refusal = refusal.or_else(|| builtin.and_then(|_| grpc_call::check_metadata(&open).err()));
        let caller = match refusal {
            Some(status) => Err(status),
            // The built-in plug-in makes no request on the backend, whose
            // layer would ask the policy: it is asked here.
            None => self.caller(&open).and_then(|caller| match builtin {
                Some(_) => self
                    .context
                    .auth
                    .admit(&open.method, &caller, self.who.client)
                    .map(|()| caller),
                None => Ok(caller),
            }),
        };
        let caller = match caller {
            Ok(caller) => caller,
            Err(status) => {
                self.batch.record(call, records::status_record(&status));
                return true;
            }
        };
        let deadline = (open.timeout_ms > 0).then(|| {
            let at = Instant::now() + Duration::from_millis(open.timeout_ms.into());
            self.deadlines.insert((at, call));
            (at, open.timeout_ms)
        });
        let route = match builtin {
            Some(calls) => {
                let guard =
                    calls.enter_traced(self.context.transport, &open.method, &MetadataExtractor(&open.metadata));
                let meter = self.context.auth.message_meter(&open.method, &caller, self.who.client);
                Route::Builtin(BuiltinCall::new(response_window, deadline, guard, meter))
            }
            None => {
                let wakeups = self.wakeups.get_or_insert_with(Arc::default);
                let opening = Opening {
                    open,
                    encoding: self.batch.encoding,
                    backend: self.context.backend.clone(),
                    catalog: self.context.catalog.clone(),
                    budget: self.budget.clone(),
                    max_message_size: settings.max_message_size,
                    waker: CallWaker::new(call, wakeups),
                    deadline,
                    who: Authenticated {
                        caller,
                        client: self.who.client,
                    },
                    transport: self.context.transport,
                    request_credit: settings.request_credit,
                };
                // Polled once to start: its waker takes over from there.
                self.ready.push_back(call);
                Route::Grpc(Box::new(GrpcCall::new(opening, response_window)))
            }
        };
        self.calls.insert(call, LiveCall::new(route));
        true
    }

    /// Who a call is from: with JWTs on, its own token if its metadata has
    /// one (`authorization`), else the socket's identity, which must not
    /// have expired (the socket's live calls run on; new ones need a token
    /// that holds).
    fn caller(&self, open: &v2::Open) -> Result<Caller, Status> {
        let auth = &self.context.auth;
        let refuse = |why: String| {
            auth.refused(Refused::Unauthenticated);
            Status::unauthenticated(why)
        };
        if auth.has_jwt()
            && let Some(value) = open
                .metadata
                .iter()
                .find_map(|(name, value)| name.eq_ignore_ascii_case("authorization").then_some(value))
        {
            let mut headers = http::HeaderMap::new();
            let value = http::HeaderValue::try_from(value.as_str())
                .map_err(|_| refuse("the call's authorization metadata is not a header value".into()))?;
            headers.insert(http::header::AUTHORIZATION, value);
            return auth
                .authenticate(&headers)
                .map_err(|Refusal { why, .. }| refuse(format!("{why} (the call's authorization metadata)")));
        }
        match &self.who.caller {
            Caller::Identity(identity) if identity.has_expired(auth.leeway()) => Err(refuse(
                "the socket's token has expired: send a fresh one as the call's authorization metadata, \
                 or open a new socket"
                    .into(),
            )),
            caller => Ok(caller.clone()),
        }
    }

    fn message(&mut self, call: u32, request: Arrived<'_>) {
        let max = self.context.settings.max_message_size;
        let Some(live) = self.calls.get_mut(&call) else { return };
        let len = match &request {
            Arrived::Record(request) => request.len(),
            Arrived::V1Data(data) => data.len(),
        };
        let refusal = if live.closed_send {
            // v1 calls its message records requests.
            let record = match self.batch.framing {
                Framing::Records => "message",
                Framing::V1 => "request",
            };
            Some(Error::AfterCloseSend(record).into())
        } else if len > max {
            Some(Status::resource_exhausted(format!(
                "a request message of {len} bytes is larger than --max-message-size ({max})"
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
        match (&mut live.route, request) {
            (Route::Grpc(grpc), Arrived::Record(request)) => grpc.receive(request),
            // v1's one call is the built-in service's.
            (Route::Grpc(_), Arrived::V1Data(_)) => {}
            (Route::Builtin(builtin), request) => {
                let mut side = socket_side(
                    &self.budget,
                    &mut self.batch,
                    &mut self.messages,
                    &mut self.paced,
                    &self.context,
                );
                let received = match request {
                    Arrived::Record(request) => builtin.receive(call, request, &mut side),
                    Arrived::V1Data(data) => builtin.receive_data(call, data, &mut side),
                };
                let served = received.map(|()| builtin.needs_settling());
                self.after_serving(call, served);
            }
        }
    }

    /// A broken rule of the socket: every live call ends with `code`, then
    /// the socket closes with `close`.
    fn socket_error(&mut self, code: Code, message: String, close: CloseCode) {
        self.fail(code, message, close, true);
    }

    /// [`Socket::socket_error`], saying whether the peer's messages can
    /// still be parsed.
    fn fail(&mut self, code: Code, message: String, close: impl Into<CloseCode>, framing_intact: bool) {
        let close = close.into();
        tracing::debug!(%message, ?close, "socket error");
        // Before the calls end: a v1 socket would otherwise close with its
        // call's status code's close code, not this finer one.
        if self.closing.is_none() {
            self.closing = Some(Closing::new(close, &message, framing_intact));
        }
        for call in self.calls.keys().copied().collect::<Vec<_>>() {
            self.end_call(call, Status::new(code, message.clone()));
        }
    }
}
