//! One bidirectional call over one WebSocket (protocol v1, proto
//! subprotocol): the state machine between the socket's events and the
//! promises JavaScript awaits.
//!
//! Replies that arrive before anyone asks wait in `inbox`; `next()` calls
//! made before a reply arrives wait in `waiting`. Each reply resolves exactly
//! one of them, in order, so nothing is lost or reordered.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use js_sys::{Function, Promise};
use streambridge_protocol::{CloseSend, StreamRequest, Subprotocol, client_frame, proto, server_frame};
use wasm_bindgen::prelude::*;

use crate::error::{CallStatus, code, message_object, stream_error};
use crate::socket::{Socket, SocketEvent};

/// Shared handle to a call's state.
pub type CallRef = Rc<RefCell<Call>>;

/// A promise's resolve and reject functions.
struct Pending {
    resolve: Function,
    reject: Function,
}

/// The state of one call.
pub struct Call {
    url: String,
    socket: Option<Socket>,
    open: bool,
    half_closed: bool,
    /// Frames sent before the socket opened, in order.
    outbox: Vec<Vec<u8>>,
    /// Replies nobody has asked for yet.
    inbox: VecDeque<String>,
    /// `next()` promises waiting for a reply.
    waiting: VecDeque<Pending>,
    /// `finished()` promises.
    finished: Vec<Function>,
    /// Whoever waits for the socket to open (`DataClient.connect`).
    on_open: Option<Pending>,
    status: Option<CallStatus>,
}

impl Call {
    /// Opens a socket to `url` and returns the call that runs on it. A
    /// `token` travels as the subprotocol entry `streambridge.bearer.<token>`
    /// (browsers cannot set an `Authorization` header on a WebSocket).
    pub fn start(url: &str, token: Option<&str>) -> Result<CallRef, JsValue> {
        let call = Rc::new(RefCell::new(Call {
            url: url.to_string(),
            socket: None,
            open: false,
            half_closed: false,
            outbox: Vec::new(),
            inbox: VecDeque::new(),
            waiting: VecDeque::new(),
            finished: Vec::new(),
            on_open: None,
            status: None,
        }));
        let weak = Rc::downgrade(&call);
        let mut offers = vec![Subprotocol::Proto.name().to_string()];
        offers.extend(token.map(|token| format!("streambridge.bearer.{token}")));
        let socket = Socket::open(url, &offers, move |event| on_event(&weak, event))
            .map_err(|error| stream_error(code::UNAVAILABLE, &format!("cannot open {url}: {error:?}")))?;
        call.borrow_mut().socket = Some(socket);
        Ok(call)
    }

    /// Resolves `resolve` with `value` when the socket opens; rejects if it never does.
    pub fn notify_open(call: &CallRef, resolve: Function, reject: Function) {
        let mut state = call.borrow_mut();
        match (&state.status, state.open) {
            (Some(status), _) => drop(reject.call1(&JsValue::NULL, &status.to_error())),
            (None, true) => drop(resolve.call0(&JsValue::NULL)),
            (None, false) => state.on_open = Some(Pending { resolve, reject }),
        }
    }

    /// Whether a new stream may use this call (not yet used, not ended).
    pub fn is_fresh(&self) -> bool {
        self.status.is_none() && !self.half_closed && self.outbox.is_empty()
    }

    pub fn send(&mut self, data: String) -> Result<(), JsValue> {
        if let Some(status) = &self.status {
            let message = format!(
                "send on a stream that has ended (status {}: {})",
                status.code, status.message
            );
            return Err(stream_error(code::FAILED_PRECONDITION, &message));
        }
        if self.half_closed {
            return Err(stream_error(code::FAILED_PRECONDITION, "send after closeSend"));
        }
        self.write(proto::encode_client_frame(client_frame::Frame::Request(
            StreamRequest { data },
        )))
    }

    pub fn close_send(&mut self) -> Result<(), JsValue> {
        if self.half_closed || self.status.is_some() {
            return Ok(());
        }
        self.half_closed = true;
        self.write(proto::encode_client_frame(client_frame::Frame::CloseSend(CloseSend {})))
    }

    fn write(&mut self, frame: Vec<u8>) -> Result<(), JsValue> {
        match (&self.socket, self.open) {
            (Some(socket), true) => socket.send(&frame),
            _ => {
                self.outbox.push(frame);
                Ok(())
            }
        }
    }

    /// The next reply, `null` after a successful end, or a rejection with
    /// the call's error.
    pub fn next(call: &CallRef) -> Promise {
        let mut state = call.borrow_mut();
        if let Some(result) = state.inbox.pop_front() {
            return Promise::resolve(&message_object(&result));
        }
        match &state.status {
            Some(status) if status.code == code::OK => Promise::resolve(&JsValue::NULL),
            Some(status) => Promise::reject(&status.to_error()),
            None => {
                let mut pending = None;
                let promise = Promise::new(&mut |resolve, reject| pending = Some(Pending { resolve, reject }));
                state.waiting.extend(pending);
                promise
            }
        }
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

    /// Ends the call from this side: closes the socket, status CANCELLED.
    pub fn cancel(call: &CallRef) {
        abort(call, CallStatus::new(code::CANCELLED, "cancelled by the client"));
    }
}

fn on_event(call: &Weak<RefCell<Call>>, event: SocketEvent) {
    let Some(call) = call.upgrade() else { return };
    match event {
        SocketEvent::Open => on_open(&call),
        SocketEvent::Binary(frame) => on_frame(&call, &frame),
        SocketEvent::Text => {
            abort(
                &call,
                CallStatus::new(code::INTERNAL, "server sent a text frame on streambridge.v1.proto"),
            );
        }
        SocketEvent::Closed {
            code: close_code,
            reason,
        } => {
            let url = call.borrow().url.clone();
            let was_open = call.borrow().open;
            call.borrow_mut().socket = None;
            let message = if was_open {
                format!(
                    "connection to {url} closed before the call finished (close code {close_code}{}{reason})",
                    if reason.is_empty() { "" } else { ": " }
                )
            } else {
                format!("cannot connect to {url} (close code {close_code})")
            };
            end(&call, CallStatus::new(code::UNAVAILABLE, message));
        }
    }
}

fn on_open(call: &CallRef) {
    let on_open = {
        let mut state = call.borrow_mut();
        state.open = true;
        let outbox = std::mem::take(&mut state.outbox);
        if let Some(socket) = &state.socket {
            for frame in &outbox {
                let _ = socket.send(frame);
            }
        }
        state.on_open.take()
    };
    if let Some(pending) = on_open {
        let _ = pending.resolve.call0(&JsValue::NULL);
    }
}

fn on_frame(call: &CallRef, frame: &[u8]) {
    match proto::decode_server_frame(frame) {
        Ok(server_frame::Frame::Response(response)) => {
            let waiter = call.borrow_mut().waiting.pop_front();
            match waiter {
                Some(pending) => drop(pending.resolve.call1(&JsValue::NULL, &message_object(&response.result))),
                None => call.borrow_mut().inbox.push_back(response.result),
            }
        }
        Ok(server_frame::Frame::Status(status)) => end(call, CallStatus::new(status.code, status.message)),
        Err(error) => abort(
            call,
            CallStatus::new(code::INTERNAL, format!("undecodable frame from the server: {error}")),
        ),
    }
}

/// Closes the socket and ends the call with `status`.
fn abort(call: &CallRef, status: CallStatus) {
    let socket = call.borrow_mut().socket.take();
    if let Some(socket) = &socket {
        socket.close();
    }
    end(call, status);
}

/// Records the final status (the first one wins) and settles every waiter.
fn end(call: &CallRef, status: CallStatus) {
    let (waiting, finished, on_open) = {
        let mut state = call.borrow_mut();
        if state.status.is_some() {
            return;
        }
        state.status = Some(status.clone());
        (
            std::mem::take(&mut state.waiting),
            std::mem::take(&mut state.finished),
            state.on_open.take(),
        )
    };
    // `waiting` is only non-empty when the inbox is empty: each gets the end.
    for pending in waiting {
        let _ = if status.code == code::OK {
            pending.resolve.call1(&JsValue::NULL, &JsValue::NULL)
        } else {
            pending.reject.call1(&JsValue::NULL, &status.to_error())
        };
    }
    for resolve in finished {
        let _ = resolve.call1(&JsValue::NULL, &status.to_js());
    }
    if let Some(pending) = on_open {
        let _ = pending.reject.call1(&JsValue::NULL, &status.to_error());
    }
}
