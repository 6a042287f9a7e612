//! One call: the state between the application's promises and the socket's
//! records.
//!
//! A call starts *waiting* (in the session's queue, until a socket is open),
//! becomes *live* on one connection (with the id it was opened under), and
//! *ends* exactly once, with a status. Its two directions:
//!
//! - requests: `send` queues a message; messages go on the wire only against
//!   request credit (256 at the start plus the server's `window` grants), so
//!   `send` never blocks and never throws for lack of credit;
//! - responses: replies wait in `inbox` until `next()` takes them; `next()`
//!   calls made before a reply arrives wait in `waiting`. Each reply settles
//!   exactly one of them, in order. Response credit is granted back as the
//!   application *takes* replies, so an unread call holds at most its window.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use js_sys::{Function, Promise, Uint8Array};
use prost::Message;
use streambridge_protocol::StreamResponse;
use streambridge_protocol::v2::Encoding;
use wasm_bindgen::prelude::*;

use crate::codec::{Payload, Received};
use crate::connection::{ConnRef, Connection};
use crate::error::{CallStatus, code, message_object, stream_error};
use crate::timer::Timer;

/// Shared handle to a call's state.
pub type CallRef = Rc<RefCell<CallState>>;

/// Request messages a client may send on a new call before any grant (the
/// protocol's fixed first credit; it happens to equal the default response window).
const INITIAL_REQUEST_CREDIT: u64 = 256;

/// How a call's messages look to JavaScript.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `DataService.BidirectionalStream`: strings in, `{ result }` out.
    Data,
    /// Any method, JSON objects in and out (`streambridge.v2.json`).
    Json,
    /// Any method, `Uint8Array` protobuf in and out (`streambridge.v2.proto`).
    Bytes,
}

/// What a call asks the server for when it opens.
pub struct CallSpec {
    pub shape: Shape,
    /// The socket's encoding, which the call's payloads are in.
    pub encoding: Encoding,
    pub method: String,
    pub metadata: Vec<(String, String)>,
    /// 0: no deadline.
    pub timeout_ms: u32,
    /// Response credit to open with.
    pub window: u32,
}

enum Wire {
    /// Not yet on a socket.
    Waiting,
    Live {
        connection: Weak<RefCell<Connection>>,
        id: u32,
    },
    Ended,
}

#[derive(PartialEq, Eq)]
enum HalfClose {
    No,
    /// Asked for; sent once every queued message is.
    Requested,
    Sent,
}

/// A waiting `next()`: its promise's functions, and whether it resolves to
/// an iterator result (`{ value, done }`, for `for await`) or the bare value.
struct Pending {
    resolve: Function,
    reject: Function,
    iteration: bool,
}

#[wasm_bindgen(module = "/js/runtime.js")]
extern "C" {
    #[wasm_bindgen(js_name = iterationResult)]
    fn iteration_result(value: &JsValue) -> JsValue;
    /// proto3 JSON leaves out an empty `result`; JavaScript gets `''`.
    #[wasm_bindgen(js_name = withResult)]
    fn with_result(reply: JsValue) -> JsValue;
}

/// What a `next()` resolves with: the message or `null` at the end, or for
/// the async iterator `{ value, done }`, made here so `for await` costs one
/// promise per message rather than three.
fn next_value(value: JsValue, iteration: bool) -> JsValue {
    if iteration { iteration_result(&value) } else { value }
}

/// The state of one call.
pub struct CallState {
    spec: CallSpec,
    /// `Date.now()` at which the deadline passes.
    deadline: Option<f64>,
    wire: Wire,
    /// Messages not yet on the wire (no socket yet, or no request credit).
    queued: VecDeque<Payload>,
    /// Request messages the server will still take.
    credit: u64,
    half_close: HalfClose,
    /// Replies nobody has asked for yet.
    inbox: VecDeque<JsValue>,
    /// `next()` promises waiting for a reply.
    waiting: VecDeque<Pending>,
    /// `finished()` promises.
    finished: Vec<Function>,
    /// `drained()` promises: settled once `queued` is empty (or the call ended).
    drained: Vec<Function>,
    /// Replies taken by the application since the last `window` sent.
    taken: u32,
    headers: JsValue,
    status: Option<CallStatus>,
    /// Ends a waiting call at its deadline.
    deadline_timer: Option<Timer>,
    /// `response_started()` promises (the tonic channel's): settled by the
    /// call's first headers, reply or end.
    #[cfg(feature = "tonic")]
    started: Vec<Function>,
}

impl CallState {
    /// A call waiting for a socket; with a timeout, it ends with
    /// DEADLINE_EXCEEDED if none opens in time.
    pub fn new(spec: CallSpec) -> CallRef {
        let deadline = (spec.timeout_ms > 0).then(|| js_sys::Date::now() + f64::from(spec.timeout_ms));
        let timeout_ms = spec.timeout_ms;
        let call = Rc::new(RefCell::new(CallState {
            spec,
            deadline,
            wire: Wire::Waiting,
            queued: VecDeque::new(),
            credit: INITIAL_REQUEST_CREDIT,
            half_close: HalfClose::No,
            inbox: VecDeque::new(),
            waiting: VecDeque::new(),
            finished: Vec::new(),
            drained: Vec::new(),
            taken: 0,
            headers: JsValue::NULL,
            status: None,
            deadline_timer: None,
            #[cfg(feature = "tonic")]
            started: Vec::new(),
        }));
        if timeout_ms > 0 {
            let weak = Rc::downgrade(&call);
            let timer = Timer::after(f64::from(timeout_ms), move || {
                let Some(call) = weak.upgrade() else { return };
                if matches!(call.borrow().wire, Wire::Waiting) {
                    end(&call, waited_too_long(timeout_ms));
                }
            });
            call.borrow_mut().deadline_timer = Some(timer);
        }
        call
    }

    pub fn shape(&self) -> Shape {
        self.spec.shape
    }

    pub fn encoding(&self) -> Encoding {
        self.spec.encoding
    }

    pub fn is_waiting(&self) -> bool {
        matches!(self.wire, Wire::Waiting)
    }

    pub fn is_ended(&self) -> bool {
        self.status.is_some()
    }

    /// Response metadata, `null` until the server sends any.
    pub fn headers(&self) -> JsValue {
        self.headers.clone()
    }

    pub fn set_headers(&mut self, headers: JsValue) {
        self.headers = headers;
        #[cfg(feature = "tonic")]
        self.settle_started();
    }

    /// Settles the `response_started()` promises (resolving runs nothing
    /// now: their continuations are microtasks).
    #[cfg(feature = "tonic")]
    fn settle_started(&mut self) {
        for resolve in std::mem::take(&mut self.started) {
            let _ = resolve.call0(&JsValue::NULL);
        }
    }
}

/// Resolves once the call has response headers, a reply or its end: when a
/// gRPC client may be handed its response. (A service that sends no
/// metadata shows no headers: then its first reply or its end starts it.)
#[cfg(feature = "tonic")]
pub fn response_started(call: &CallRef) -> Promise {
    let mut state = call.borrow_mut();
    if !state.headers.is_null() || !state.inbox.is_empty() || state.status.is_some() {
        return Promise::resolve(&JsValue::UNDEFINED);
    }
    let mut waiter = None;
    let promise = Promise::new(&mut |resolve, _reject| waiter = Some(resolve));
    state.started.extend(waiter);
    promise
}

/// The call's status if it ended before any headers or reply: what gRPC
/// sends as a "trailers-only" response.
#[cfg(feature = "tonic")]
pub fn ended_before_response(call: &CallRef) -> Option<CallStatus> {
    let state = call.borrow();
    if state.headers.is_null() && state.inbox.is_empty() {
        state.status.clone()
    } else {
        None
    }
}

/// The final status, once the call has ended.
#[cfg(feature = "tonic")]
pub fn status(call: &CallRef) -> Option<CallStatus> {
    call.borrow().status.clone()
}

/// The status of a call whose deadline passed before a socket was open.
fn waited_too_long(timeout_ms: u32) -> CallStatus {
    CallStatus::new(
        code::DEADLINE_EXCEEDED,
        format!("the call's deadline (timeoutMs {timeout_ms}) passed while waiting for a connection"),
    )
}

/// Puts a waiting call on `connection` under a new id: its `open`, then what
/// it queued. Ends it instead if its deadline passed while it waited.
/// Gives a call its own token (`authorization` metadata), unless the page
/// set that metadata itself.
pub fn use_token(call: &CallRef, token: &str) {
    let metadata = &mut call.borrow_mut().spec.metadata;
    if !metadata
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("authorization"))
    {
        metadata.push(("authorization".into(), format!("Bearer {token}")));
    }
}

pub fn attach(call: &CallRef, connection: &ConnRef) {
    let remaining = {
        let state = call.borrow();
        if !state.is_waiting() || state.is_ended() {
            return;
        }
        state.deadline.map(|deadline| (deadline - js_sys::Date::now()).ceil())
    };
    if remaining.is_some_and(|ms| ms <= 0.0) {
        let timeout_ms = call.borrow().spec.timeout_ms;
        end(call, waited_too_long(timeout_ms));
        return;
    }
    let id = connection.borrow_mut().register(call.clone());
    {
        let mut state = call.borrow_mut();
        state.deadline_timer = None;
        state.wire = Wire::Live {
            connection: Rc::downgrade(connection),
            id,
        };
        let spec = &state.spec;
        let timeout_ms = remaining.map_or(0, |ms| ms.min(f64::from(u32::MAX)) as u32);
        connection.borrow_mut().write(
            id,
            |batch| batch.open(id, &spec.method, &spec.metadata, timeout_ms, spec.window),
            64,
        );
    }
    pump(call);
}

/// Queues one request message.
pub fn send(call: &CallRef, payload: Payload) -> Result<(), JsValue> {
    {
        let mut state = call.borrow_mut();
        if let Some(status) = &state.status {
            let message = format!(
                "send on a call that has ended (status {}: {})",
                status.code, status.message
            );
            return Err(stream_error(code::FAILED_PRECONDITION, &message));
        }
        if state.half_close != HalfClose::No {
            return Err(stream_error(code::FAILED_PRECONDITION, "send after closeSend"));
        }
        state.queued.push_back(payload);
    }
    pump(call);
    Ok(())
}

/// Half-closes once every queued message is sent.
pub fn close_send(call: &CallRef) {
    {
        let mut state = call.borrow_mut();
        if state.half_close != HalfClose::No || state.is_ended() {
            return;
        }
        state.half_close = HalfClose::Requested;
    }
    pump(call);
}

/// The server can take `credit` more requests.
pub fn grant(call: &CallRef, credit: u32) {
    {
        let mut state = call.borrow_mut();
        state.credit = state.credit.saturating_add(u64::from(credit));
    }
    pump(call);
}

/// The live connection and the call's id on it.
fn live(call: &CallRef) -> Option<(ConnRef, u32)> {
    match &call.borrow().wire {
        Wire::Live { connection, id } => Some((connection.upgrade()?, *id)),
        _ => None,
    }
}

/// Moves queued messages (and a requested half-close) onto the wire, as far
/// as request credit allows.
fn pump(call: &CallRef) {
    let Some((connection, id)) = live(call) else { return };
    let drained = {
        let mut connection = connection.borrow_mut();
        let mut state = call.borrow_mut();
        while state.credit > 0 {
            let Some(payload) = state.queued.pop_front() else { break };
            state.credit -= 1;
            let size = payload.len();
            connection.write(id, |batch| batch.message(id, payload), size);
        }
        if state.queued.is_empty() && state.half_close == HalfClose::Requested {
            state.half_close = HalfClose::Sent;
            connection.write(id, |batch| batch.close_send(id), 32);
        }
        if state.queued.is_empty() {
            std::mem::take(&mut state.drained)
        } else {
            Vec::new()
        }
    };
    // Settled with no borrow held: a producer may send again at once.
    for resolve in drained {
        let _ = resolve.call0(&JsValue::NULL);
    }
}

/// Requests queued in the client, not yet on the socket (waiting for
/// request credit, or for a socket).
pub fn queued(call: &CallRef) -> usize {
    call.borrow().queued.len()
}

/// Resolves once no request of the call waits in the client (they all went
/// to the socket), or the call ended: what a producer awaits so that it
/// runs no further ahead of the server than the call's credit.
pub fn drained(call: &CallRef) -> Promise {
    let mut state = call.borrow_mut();
    if state.queued.is_empty() || state.status.is_some() {
        return Promise::resolve(&JsValue::UNDEFINED);
    }
    let mut waiter = None;
    let promise = Promise::new(&mut |resolve, _reject| waiter = Some(resolve));
    state.drained.extend(waiter);
    promise
}

/// A reply from the server.
pub fn deliver(call: &CallRef, received: Received) {
    let shape = call.borrow().spec.shape;
    let value = match to_js(shape, received) {
        Ok(value) => value,
        Err(message) => {
            cancel_with(call, CallStatus::new(code::INTERNAL, message));
            return;
        }
    };
    #[cfg(feature = "tonic")]
    call.borrow_mut().settle_started();
    let waiter = call.borrow_mut().waiting.pop_front();
    match waiter {
        Some(pending) => {
            let _ = pending
                .resolve
                .call1(&JsValue::NULL, &next_value(value, pending.iteration));
            taken(call);
        }
        None => call.borrow_mut().inbox.push_back(value),
    }
}

fn to_js(shape: Shape, received: Received) -> Result<JsValue, String> {
    match (shape, received) {
        (Shape::Data, Received::Json(value)) => {
            if !value.is_object() {
                return Err("the server sent a reply that is not a JSON object".into());
            }
            Ok(with_result(value))
        }
        (Shape::Data, Received::Proto(bytes)) => StreamResponse::decode(bytes)
            .map(|reply| message_object(&reply.result))
            .map_err(|e| format!("the server sent an undecodable StreamResponse: {e}")),
        (Shape::Json, Received::Json(value)) => Ok(value),
        (Shape::Bytes, Received::Proto(bytes)) => Ok(Uint8Array::from(bytes.as_ref()).into()),
        _ => Err("a reply in the other encoding".into()),
    }
}

/// The application took a reply: grant response credit back once half the
/// window is used, so the server never waits while the application keeps up.
fn taken(call: &CallRef) {
    let grant = {
        let mut state = call.borrow_mut();
        state.taken += 1;
        let threshold = (state.spec.window / 2).max(1);
        if state.taken < threshold || state.is_ended() {
            return;
        }
        std::mem::take(&mut state.taken)
    };
    if let Some((connection, id)) = live(call) {
        connection.borrow_mut().write(id, |batch| batch.window(id, grant), 32);
    }
}

/// The next reply, `null` after a successful end, or a rejection with the
/// call's error; with `iteration`, wrapped as an iterator result.
pub fn next(call: &CallRef, iteration: bool) -> Promise {
    let promise = {
        let mut state = call.borrow_mut();
        if let Some(value) = state.inbox.pop_front() {
            Promise::resolve(&next_value(value, iteration))
        } else {
            return match &state.status {
                Some(status) if status.code == code::OK => Promise::resolve(&next_value(JsValue::NULL, iteration)),
                Some(status) => Promise::reject(&status.to_error()),
                None => {
                    let mut pending = None;
                    let promise = Promise::new(&mut |resolve, reject| {
                        pending = Some(Pending {
                            resolve,
                            reject,
                            iteration,
                        })
                    });
                    state.waiting.extend(pending);
                    promise
                }
            };
        }
    };
    taken(call);
    promise
}

/// The call's final status, once it has one.
pub fn finished(call: &CallRef) -> Promise {
    let mut state = call.borrow_mut();
    if let Some(status) = &state.status {
        return Promise::resolve(&status.to_js());
    }
    let mut waiter = None;
    let promise = Promise::new(&mut |resolve, _reject| waiter = Some(resolve));
    state.finished.extend(waiter);
    promise
}

/// Ends the call from this side: a `cancel` record if it is live, then
/// `status` here at once (the server's own status for it is ignored).
pub fn cancel_with(call: &CallRef, status: CallStatus) {
    let freed = live(call).map(|(connection, id)| {
        let mut connection = connection.borrow_mut();
        connection.forget(id);
        connection.write(id, |batch| batch.cancel(id), 32);
        connection.session()
    });
    end(call, status);
    if let Some(session) = freed.and_then(|session| session.upgrade()) {
        // A slot for a call waiting for one.
        crate::session::start_waiting(&session);
    }
}

/// Records the final status (the first one wins) and settles every waiter.
pub fn end(call: &CallRef, status: CallStatus) {
    let (waiting, finished, drained) = {
        let mut state = call.borrow_mut();
        if state.status.is_some() {
            return;
        }
        state.status = Some(status.clone());
        state.wire = Wire::Ended;
        state.queued.clear();
        state.deadline_timer = None;
        #[cfg(feature = "tonic")]
        state.settle_started();
        (
            std::mem::take(&mut state.waiting),
            std::mem::take(&mut state.finished),
            std::mem::take(&mut state.drained),
        )
    };
    for resolve in drained {
        let _ = resolve.call0(&JsValue::NULL);
    }
    // `waiting` is only non-empty when the inbox is empty: each gets the end.
    for pending in waiting {
        let _ = if status.code == code::OK {
            pending
                .resolve
                .call1(&JsValue::NULL, &next_value(JsValue::NULL, pending.iteration))
        } else {
            pending.reject.call1(&JsValue::NULL, &status.to_error())
        };
    }
    for resolve in finished {
        let _ = resolve.call1(&JsValue::NULL, &status.to_js());
    }
}
