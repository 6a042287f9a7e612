//! The client's connection to one server over time: the socket new calls
//! go to, sockets draining after a `goaway`, calls waiting for a socket, and
//! reconnecting with backoff when the socket drops.
//!
//! States (what `DataClient.state` shows):
//!
//! - `open`: a socket is open; new calls start on it at once;
//! - `reconnecting`: the socket dropped; its calls ended with UNAVAILABLE
//!   (14); the next attempt waits a random time in
//!   `[0, min(maxDelayMs, initialDelayMs × 2^attempt)]` (full jitter, so a
//!   restarted server is not met by every client at the same instant); new
//!   calls wait for the socket, bounded by their `timeoutMs`;
//! - `closed`: `close()` was called, the first connection failed, or the
//!   socket dropped with reconnecting turned off.
//!
//! A `goaway` (the server is draining) does not change the state: the client
//! opens its next socket at once, the draining socket keeps its live calls
//! until they end, and new calls wait for the new socket. So a rolling
//! restart ends no call that finishes within the server's drain timeout.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use js_sys::Function;
use streambridge_protocol::v2::Encoding;
use wasm_bindgen::prelude::*;

use crate::call::{self, CallRef, CallSpec, CallState};
use crate::connection::{ConnRef, Connection, Endpoint, TransportKind, WebTransportTarget};
use crate::error::{CallStatus, code, stream_error};
use crate::timer::Timer;
use crate::token::{self, TokenSource};

pub type SessionRef = Rc<RefCell<Session>>;

/// See the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientState {
    /// The first socket is opening (`connect` has not resolved yet).
    Connecting,
    Open,
    Reconnecting,
    Closed,
}

impl ClientState {
    pub fn name(self) -> &'static str {
        match self {
            // Not observable: `connect` resolves only once the socket is open.
            ClientState::Connecting => "reconnecting",
            ClientState::Open => "open",
            ClientState::Reconnecting => "reconnecting",
            ClientState::Closed => "closed",
        }
    }
}

/// Reconnect delays.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial_ms: f64,
    pub max_ms: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_ms: 500.0,
            max_ms: 20_000.0,
        }
    }
}

/// `DataClient.connect`'s options.
pub struct Options {
    pub token: TokenSource,
    pub encoding: Encoding,
    /// `None`: `reconnect: false`.
    pub reconnect: Option<Backoff>,
    /// Response credit calls open with.
    pub window: u32,
    /// Calls live on one socket at most (the server's `--ws-max-calls`):
    /// more wait in the client for a slot, as HTTP/2 clients wait for a stream.
    pub max_calls: usize,
    /// The ways to try, in order of preference (never empty).
    pub transports: Vec<TransportKind>,
    /// Where WebTransport sessions go (`webtransport` in `transports` needs it).
    pub webtransport: Option<WebTransportTarget>,
}

/// See the module documentation.
pub struct Session {
    url: String,
    options: Options,
    state: ClientState,
    /// Where new calls go; `None` while waiting to reconnect.
    current: Option<ConnRef>,
    /// Sockets after `goaway`, until their calls end and the server closes them.
    draining: Vec<ConnRef>,
    /// Calls waiting for a socket.
    pending: VecDeque<CallRef>,
    /// Failed attempts since the socket was last open.
    attempt: u32,
    /// Which of `transports` this attempt is on: one that fails before it
    /// opens hands over to the next at once; the next attempt starts again
    /// from the first.
    fallback: usize,
    retry: Option<Timer>,
    on_state_change: Option<Function>,
    /// `connect`'s promise: resolved at the first open, rejected if it fails.
    connect_waiter: Option<(Function, Function)>,
    /// Every call not yet ended, for `close()`.
    calls: Vec<Weak<RefCell<CallState>>>,
}

impl Session {
    /// Starts the first connection. WebTransport is left out of
    /// `transports` where the browser does not have it.
    pub fn start(url: String, mut options: Options) -> Result<SessionRef, JsValue> {
        if options.transports.contains(&TransportKind::WebTransport) && options.webtransport.is_none() {
            return Err(JsValue::from_str(
                "transports names 'webtransport' but no webtransport URL is given",
            ));
        }
        if !crate::webtransport_link::available() {
            options.transports.retain(|kind| *kind != TransportKind::WebTransport);
            if options.transports.is_empty() {
                return Err(JsValue::from_str("this browser has no WebTransport"));
            }
        }
        let session = Rc::new(RefCell::new(Session {
            url,
            options,
            state: ClientState::Connecting,
            current: None,
            draining: Vec::new(),
            pending: VecDeque::new(),
            attempt: 0,
            fallback: 0,
            retry: None,
            on_state_change: None,
            connect_waiter: None,
            calls: Vec::new(),
        }));
        open_socket(&session)?;
        Ok(session)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn encoding(&self) -> Encoding {
        self.options.encoding
    }

    pub fn window(&self) -> u32 {
        self.options.window
    }

    pub fn state(&self) -> ClientState {
        self.state
    }

    /// The way the current connection goes, once it is open.
    pub fn transport(&self) -> Option<TransportKind> {
        let current = self.current.as_ref()?.borrow();
        current.is_open().then(|| current.transport())
    }

    pub fn on_state_change(&self) -> Option<Function> {
        self.on_state_change.clone()
    }

    pub fn set_on_state_change(&mut self, callback: Option<Function>) {
        self.on_state_change = callback;
    }

    /// Settles `connect`'s promise when the first socket opens or fails.
    pub fn set_connect_waiter(&mut self, resolve: Function, reject: Function) {
        self.connect_waiter = Some((resolve, reject));
    }

    /// Sockets this client holds open or opening (the current one and draining ones).
    pub fn socket_count(&self) -> usize {
        self.current.iter().count() + self.draining.len()
    }

    /// The current socket, if it is open and has room for another call
    /// (`maxCalls`).
    fn socket_with_room(&self) -> Option<ConnRef> {
        let connection = self.current.as_ref()?;
        let open = connection.borrow();
        (open.is_open() && open.live_calls() < self.options.max_calls).then(|| connection.clone())
    }

    fn is_current(&self, connection: &ConnRef) -> bool {
        self.current
            .as_ref()
            .is_some_and(|current| Rc::ptr_eq(current, connection))
    }
}

/// Opens the next socket: at once with a fixed token (or none), or once
/// the page's token function has given one.
fn open_socket(session: &SessionRef) -> Result<(), JsValue> {
    let source = session.borrow().options.token.clone();
    let provider = match source {
        TokenSource::None => return open_connection(session, None),
        TokenSource::Fixed(token) => return open_connection(session, Some(&token)),
        TokenSource::Function(provider) => provider,
    };
    let weak = Rc::downgrade(session);
    token::ask(&provider, move |token| {
        let Some(session) = weak.upgrade() else { return };
        if session.borrow().state == ClientState::Closed {
            return;
        }
        match token {
            Ok(token) => {
                if let Err(error) = open_connection(&session, Some(&token)) {
                    shut(&session, refused_url(&error));
                }
            }
            Err(why) => no_socket(&session, CallStatus::new(code::UNAUTHENTICATED, why)),
        }
    });
    Ok(())
}

/// Opens the client's new current socket with `token`.
fn open_connection(session: &SessionRef, token: Option<&str>) -> Result<(), JsValue> {
    let (url, webtransport, encoding, transport) = {
        let state = session.borrow();
        let transports = &state.options.transports;
        (
            state.url.clone(),
            state.options.webtransport.clone(),
            state.options.encoding,
            transports[state.fallback.min(transports.len() - 1)],
        )
    };
    let endpoint = Endpoint {
        url: &url,
        webtransport: webtransport.as_ref(),
    };
    let connection = Connection::open(endpoint, transport, encoding, token, session)?;
    session.borrow_mut().current = Some(connection);
    Ok(())
}

fn refused_url(error: &JsValue) -> CallStatus {
    CallStatus::new(code::UNAVAILABLE, format!("cannot open a WebSocket: {error:?}"))
}

/// No socket now, for `status` (it closed, never opened, or the token
/// function failed): the first `connect` fails with it; later the client
/// retries with the backoff, or, with reconnect off, new calls fail with it
/// (sockets draining after a `goaway` keep their calls until those end).
fn no_socket(session: &SessionRef, status: CallStatus) {
    let (state, reconnecting) = {
        let state = session.borrow();
        (state.state, state.options.reconnect.is_some())
    };
    match state {
        ClientState::Closed => {}
        ClientState::Connecting => {
            if let Some((_, reject)) = session.borrow_mut().connect_waiter.take() {
                let _ = reject.call1(&JsValue::NULL, &status.to_error());
            }
            shut(session, status);
        }
        ClientState::Open | ClientState::Reconnecting if reconnecting => {
            set_state(session, ClientState::Reconnecting);
            schedule_retry(session);
        }
        ClientState::Open | ClientState::Reconnecting => stop_new_calls(session, status),
    }
}

/// Starts a call: on the open socket at once, or waiting for one; with a
/// token function, once it has given the call its own token.
pub fn start_call(session: &SessionRef, spec: CallSpec) -> CallRef {
    let call = CallState::new(spec);
    let provider = {
        let mut state = session.borrow_mut();
        state
            .calls
            .retain(|call| call.upgrade().is_some_and(|call| !call.borrow().is_ended()));
        state.calls.push(Rc::downgrade(&call));
        match &state.options.token {
            TokenSource::Function(provider) => Some(provider.clone()),
            _ => None,
        }
    };
    match provider {
        None => route_call(session, &call),
        Some(provider) => {
            let (session, waiting) = (Rc::downgrade(session), Rc::downgrade(&call));
            token::ask(&provider, move |token| {
                let (Some(session), Some(call)) = (session.upgrade(), waiting.upgrade()) else {
                    return;
                };
                if call.borrow().is_ended() {
                    return;
                }
                match token {
                    Ok(token) => {
                        call::use_token(&call, &token);
                        route_call(&session, &call);
                    }
                    Err(why) => call::end(&call, CallStatus::new(code::UNAUTHENTICATED, why)),
                }
            });
        }
    }
    call
}

/// Puts a call on the open socket, or in the queue for the next.
fn route_call(session: &SessionRef, call: &CallRef) {
    let ready = {
        let mut state = session.borrow_mut();
        if state.state == ClientState::Closed {
            None
        } else {
            // Calls already waiting go first.
            match state.socket_with_room().filter(|_| state.pending.is_empty()) {
                Some(connection) => Some(connection),
                None => {
                    state.pending.retain(|call| !call.borrow().is_ended());
                    state.pending.push_back(call.clone());
                    return;
                }
            }
        }
    };
    match ready {
        Some(connection) => call::attach(call, &connection),
        None => call::end(call, CallStatus::new(code::UNAVAILABLE, "the client is closed")),
    }
}

/// A socket opened.
pub fn on_open(session: &SessionRef, connection: &ConnRef) {
    let waiter = {
        let mut state = session.borrow_mut();
        if !state.is_current(connection) {
            return;
        }
        state.attempt = 0;
        state.fallback = 0;
        state.connect_waiter.take()
    };
    set_state(session, ClientState::Open);
    // `onstatechange` may have closed the client.
    if session.borrow().state == ClientState::Closed {
        if let Some((_, reject)) = waiter {
            let _ = reject.call1(&JsValue::NULL, &stream_error(code::CANCELLED, "the client was closed"));
        }
        return;
    }
    start_waiting(session);
    if let Some((resolve, _)) = waiter {
        let _ = resolve.call0(&JsValue::NULL);
    }
}

/// Starts the calls waiting for a socket, as far as the open socket has
/// room for them (`maxCalls`); called when a socket opens and when a call
/// on it ends.
pub fn start_waiting(session: &SessionRef) {
    loop {
        let next = {
            let mut state = session.borrow_mut();
            let Some(connection) = state.socket_with_room() else {
                return;
            };
            state.pending.retain(|call| !call.borrow().is_ended());
            match state.pending.pop_front() {
                Some(call) => (call, connection),
                None => return,
            }
        };
        call::attach(&next.0, &next.1);
    }
}

/// The server is draining `connection`: open the next socket now.
pub fn on_goaway(session: &SessionRef, connection: &ConnRef) {
    {
        let mut state = session.borrow_mut();
        if !state.is_current(connection) || state.state == ClientState::Closed {
            return;
        }
        state.current = None;
        state.draining.push(connection.clone());
    }
    reconnect(session);
}

/// A socket closed (or never opened: then `reason` may say why). Its calls
/// have ended already.
pub fn on_close(session: &SessionRef, connection: &ConnRef, was_open: bool, reason: &str) {
    let state = {
        let mut state = session.borrow_mut();
        state.draining.retain(|draining| !Rc::ptr_eq(draining, connection));
        if !state.is_current(connection) {
            return;
        }
        state.current = None;
        state.state
    };
    // Refused before it opened (a proxy that answers WebSocket upgrades with
    // an error, say): the next way in, at once.
    if !was_open && state != ClientState::Closed {
        let next = {
            let mut state = session.borrow_mut();
            state.fallback += 1;
            state.fallback < state.options.transports.len()
        };
        if next {
            if let Err(error) = open_socket(session) {
                shut(session, refused_url(&error));
            }
            return;
        }
    }
    session.borrow_mut().fallback = 0;
    let url = session.borrow().url.clone();
    let message = if was_open && state != ClientState::Connecting {
        format!("the connection to {url} closed and reconnect is off")
    } else if reason.is_empty() {
        cannot_connect(&url)
    } else {
        format!("{}: {reason}", cannot_connect(&url))
    };
    no_socket(session, CallStatus::new(code::UNAVAILABLE, message));
}

pub fn cannot_connect(url: &str) -> String {
    format!("cannot connect to {url}")
}

/// Waits, then opens the next socket.
fn schedule_retry(session: &SessionRef) {
    let mut state = session.borrow_mut();
    // `onstatechange` may have closed the client.
    if state.state == ClientState::Closed {
        return;
    }
    let backoff = state.options.reconnect.unwrap_or_default();
    let ceiling = (backoff.initial_ms * 2f64.powi(state.attempt.min(30) as i32)).min(backoff.max_ms);
    let delay = js_sys::Math::random() * ceiling;
    state.attempt += 1;
    let weak = Rc::downgrade(session);
    state.retry = Some(Timer::after(delay, move || {
        if let Some(session) = weak.upgrade() {
            reconnect(&session);
        }
    }));
}

/// Opens a new current socket (after a drop, or early after a `goaway`).
fn reconnect(session: &SessionRef) {
    if session.borrow().state == ClientState::Closed {
        return;
    }
    // A URL the browser refuses outright will not get better: stop.
    if let Err(error) = open_socket(session) {
        shut(session, refused_url(&error));
    }
}

/// Closes every socket and ends every call with CANCELLED.
pub fn close(session: &SessionRef) {
    shut(
        session,
        CallStatus::new(code::CANCELLED, "cancelled: the client was closed"),
    );
}

/// `closed` for new calls: waiting ones end with `status`, no retry; sockets
/// draining after a `goaway` keep their calls until those end.
fn stop_new_calls(session: &SessionRef, status: CallStatus) {
    let pending: Vec<CallRef> = {
        let mut state = session.borrow_mut();
        state.retry = None;
        state.pending.drain(..).collect()
    };
    set_state(session, ClientState::Closed);
    for call in pending {
        call::end(&call, status.clone());
    }
}

/// `closed`: every socket closed, every call (live or waiting) ends with `status`.
fn shut(session: &SessionRef, status: CallStatus) {
    stop_new_calls(session, status.clone());
    let (connections, calls) = {
        let mut state = session.borrow_mut();
        let mut connections: Vec<ConnRef> = state.draining.drain(..).collect();
        connections.extend(state.current.take());
        (connections, std::mem::take(&mut state.calls))
    };
    for connection in connections {
        Connection::close(&connection, "client closed", status.clone());
    }
    for call in calls.iter().filter_map(Weak::upgrade) {
        call::cancel_with(&call, status.clone());
    }
}

/// Changes the state and tells `onstatechange` (with no borrow held, so the
/// callback may use the client).
fn set_state(session: &SessionRef, next: ClientState) {
    let callback = {
        let mut state = session.borrow_mut();
        if state.state == next {
            return;
        }
        state.state = next;
        state.on_state_change.clone()
    };
    if let Some(callback) = callback {
        let _ = callback.call1(&JsValue::NULL, &JsValue::from_str(next.name()));
    }
}
