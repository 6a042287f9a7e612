//! One connection of protocol v2 (a WebTransport session, a WebSocket, or an
//! HTTP session where WebSockets are blocked): the calls live on it, the
//! batches being written, and the dispatch of what arrives.
//!
//! Writes go into a [`Batch`] that is sent at the end of the current turn
//! of the event loop (a task posted after it), so everything a page sends in
//! one turn, across all its calls, is one WebSocket message; a batch that
//! reaches [`BATCH_LIMIT`] is sent at once. Over WebTransport each call has
//! a stream of its own, so each call has its own batch (one frame per call
//! and turn).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};

use js_sys::Function;
use streambridge_protocol::v2::Encoding;
use wasm_bindgen::prelude::*;

use crate::call::{self, CallRef};
use crate::codec::{BATCH_LIMIT, Batch, Frame, Incoming, decode_binary, decode_text};
use crate::error::{CallStatus, code};
use crate::http_link::HttpLink;
use crate::session::{self, SessionRef};
use crate::socket::{Socket, SocketEvent};
use crate::timer::queue_task;
use crate::webtransport_link::WebTransportLink;

/// Shared handle to a connection.
pub type ConnRef = Rc<RefCell<Connection>>;

/// The ways a connection reaches the server, in `transports`' names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    WebTransport,
    WebSocket,
    Http,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::WebTransport => "webtransport",
            TransportKind::WebSocket => "websocket",
            TransportKind::Http => "http",
        }
    }

    pub fn from_name(name: &str) -> Option<TransportKind> {
        [
            TransportKind::WebTransport,
            TransportKind::WebSocket,
            TransportKind::Http,
        ]
        .into_iter()
        .find(|kind| kind.name() == name)
    }

    /// Whether each call has a stream (and so a batch) of its own.
    fn stream_per_call(self) -> bool {
        self == TransportKind::WebTransport
    }
}

/// Where a connection goes: the page's URL (`ws(s)://…/ws`), and the
/// WebTransport session's, when the page gave one.
pub struct Endpoint<'a> {
    pub url: &'a str,
    pub webtransport: Option<&'a WebTransportTarget>,
}

/// `connect`'s `webtransport` and `serverCertificateHashes` options.
#[derive(Clone)]
pub struct WebTransportTarget {
    /// `https://host:port/ws`.
    pub url: String,
    /// Passed to the browser as is (undefined: the certificate must chain
    /// to a trusted root).
    pub certificate_hashes: JsValue,
}

/// What carries a connection's records.
enum Link {
    WebTransport(WebTransportLink),
    WebSocket(Socket),
    Http(HttpLink),
}

impl Link {
    /// Sends a batch of `call`'s records (of every call's, unless each call
    /// has a stream of its own).
    fn send(&self, call: u32, frame: Frame) {
        // A failed send means the socket is closing: its close event ends the calls.
        let _ = match (self, frame) {
            (Link::WebTransport(link), Frame::Text(text)) => {
                link.send(call, &JsValue::from_str(&text));
                Ok(())
            }
            (Link::WebTransport(link), Frame::Binary(bytes)) => {
                link.send(call, &js_sys::Uint8Array::from(&bytes[..]));
                Ok(())
            }
            (Link::WebSocket(socket), Frame::Text(text)) => socket.send_text(&text),
            (Link::WebSocket(socket), Frame::Binary(bytes)) => socket.send_binary(&bytes),
            (Link::Http(link), frame) => {
                link.send(frame);
                Ok(())
            }
        };
    }

    fn close(&self, reason: &str) {
        match self {
            Link::WebTransport(link) => link.close(reason),
            Link::WebSocket(socket) => socket.close(reason),
            Link::Http(link) => link.close(),
        }
    }
}

/// One socket and the calls on it.
pub struct Connection {
    url: String,
    transport: TransportKind,
    link: Option<Link>,
    open: bool,
    /// The id of the next call opened here (ids start at 1 and only grow).
    next_id: u32,
    calls: HashMap<u32, CallRef>,
    encoding: Encoding,
    /// Batches being written, by call id; one (under 0) for every call,
    /// unless each call has a stream of its own.
    batches: Vec<(u32, Batch)>,
    flush_scheduled: bool,
    /// Sends the batch; queued as a task after the current turn.
    flush: Option<Function>,
    /// The client it belongs to (told when a call's slot frees).
    session: Weak<RefCell<session::Session>>,
}

impl Connection {
    /// Starts connecting. `session` hears the socket open, drain and close.
    pub fn open(
        endpoint: Endpoint,
        transport: TransportKind,
        encoding: Encoding,
        token: Option<&str>,
        session: &SessionRef,
    ) -> Result<ConnRef, JsValue> {
        let url = match (transport, endpoint.webtransport) {
            (TransportKind::WebTransport, Some(target)) => &target.url,
            _ => endpoint.url,
        };
        let connection = Rc::new(RefCell::new(Connection {
            url: url.to_string(),
            transport,
            link: None,
            open: false,
            next_id: 1,
            calls: HashMap::new(),
            encoding,
            batches: Vec::new(),
            flush_scheduled: false,
            flush: None,
            session: Rc::downgrade(session),
        }));
        let weak = Rc::downgrade(&connection);
        let flush = Closure::<dyn FnMut()>::new(move || {
            if let Some(connection) = weak.upgrade() {
                let mut connection = connection.borrow_mut();
                connection.flush_scheduled = false;
                connection.send_batches();
            }
        });
        connection.borrow_mut().flush = Some(flush.into_js_value().unchecked_into());

        let (weak, session) = (Rc::downgrade(&connection), Rc::downgrade(session));
        // Boxed: each transport takes the handler as a generic, and a plain
        // closure would put a copy of the whole dispatch into each.
        let on_link_event: Box<dyn FnMut(SocketEvent)> = Box::new(move |event| on_event(&weak, &session, event));
        let link = match (transport, endpoint.webtransport) {
            (TransportKind::WebTransport, Some(target)) => Link::WebTransport(WebTransportLink::open(
                url,
                encoding,
                token,
                &target.certificate_hashes,
                on_link_event,
            )),
            (TransportKind::WebTransport, None) => return Err(JsValue::from_str("no `webtransport` URL given")),
            (TransportKind::WebSocket, _) => {
                let mut offers = vec![encoding.name().to_string()];
                offers.extend(token.map(|token| format!("streambridge.bearer.{token}")));
                Link::WebSocket(Socket::open(url, &offers, on_link_event)?)
            }
            (TransportKind::Http, _) => Link::Http(HttpLink::open(url, encoding, token, on_link_event)?),
        };
        connection.borrow_mut().link = Some(link);
        Ok(connection)
    }

    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Takes a new call id and registers `call` under it.
    pub fn register(&mut self, call: CallRef) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.calls.insert(id, call);
        id
    }

    /// Drops a call the client ended itself; later records for it are ignored.
    pub fn forget(&mut self, id: u32) {
        self.calls.remove(&id);
    }

    pub fn session(&self) -> Weak<RefCell<session::Session>> {
        self.session.clone()
    }

    /// Calls live on this socket, as the server counts them (until their
    /// status, or the client's `cancel`, has passed).
    pub fn live_calls(&self) -> usize {
        self.calls.len()
    }

    /// Adds a record of about `size` bytes of call `call` to its batch: the
    /// batch goes out first if the record would take it past the limit, and
    /// at the end of this turn otherwise.
    pub fn write(&mut self, call: u32, record: impl FnOnce(&mut Batch), size: usize) {
        let lane = if self.transport.stream_per_call() { call } else { 0 };
        // The call written last is the likeliest.
        let index = match self.batches.iter().rposition(|(of, _)| *of == lane) {
            Some(index) => index,
            None => {
                self.batches.push((lane, Batch::new(self.encoding)));
                self.batches.len() - 1
            }
        };
        let batch = &self.batches[index].1;
        if !batch.is_empty() && batch.len() + size > BATCH_LIMIT {
            self.send_batch(index);
        }
        record(&mut self.batches[index].1);
        if self.batches[index].1.len() >= BATCH_LIMIT {
            self.send_batch(index);
        } else if !self.flush_scheduled {
            self.flush_scheduled = true;
            if let Some(flush) = &self.flush {
                queue_task(flush);
            }
        }
    }

    fn send_batch(&mut self, index: usize) {
        let (call, batch) = &mut self.batches[index];
        if batch.is_empty() {
            return;
        }
        let frame = batch.take();
        if let Some(link) = &self.link {
            link.send(*call, frame);
        }
    }

    /// Sends what this turn wrote.
    fn send_batches(&mut self) {
        for index in 0..self.batches.len() {
            self.send_batch(index);
        }
        if self.transport.stream_per_call() {
            // Calls end; the shared batch (and its buffer) is kept.
            self.batches.clear();
        }
    }

    /// Closes the socket; its calls end with `status` and the session is
    /// not told (the caller is the session, or the socket is broken).
    pub fn close(connection: &ConnRef, reason: &str, status: CallStatus) {
        let (link, calls) = {
            let mut state = connection.borrow_mut();
            state.open = false;
            (state.link.take(), std::mem::take(&mut state.calls))
        };
        if let Some(link) = link {
            link.close(reason);
        }
        for call in calls.values() {
            call::end(call, status.clone());
        }
    }
}

fn on_event(connection: &Weak<RefCell<Connection>>, session: &Weak<RefCell<session::Session>>, event: SocketEvent) {
    let (Some(connection), Some(session)) = (connection.upgrade(), session.upgrade()) else {
        return;
    };
    let records = match event {
        SocketEvent::Open => {
            connection.borrow_mut().open = true;
            session::on_open(&session, &connection);
            return;
        }
        SocketEvent::Closed {
            code: close_code,
            reason,
        } => {
            let (url, was_open) = {
                let state = connection.borrow();
                (state.url.clone(), state.open)
            };
            let message = if was_open {
                let reason = if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                };
                format!("connection to {url} closed before the call finished (close code {close_code}{reason})")
            } else if reason.is_empty() {
                format!("{} (close code {close_code})", session::cannot_connect(&url))
            } else {
                format!("{}: {reason}", session::cannot_connect(&url))
            };
            Connection::close(&connection, "", CallStatus::new(code::UNAVAILABLE, message));
            session::on_close(&session, &connection, was_open, &reason);
            return;
        }
        SocketEvent::StreamEnded {
            call: id,
            code: close_code,
            reason,
        } => {
            let call = {
                let mut state = connection.borrow_mut();
                // What the call still had queued (a `window` granted as its
                // status arrived) has no stream to go on, and would open one
                // with no call on it.
                state.batches.retain(|(lane, _)| *lane != id);
                // Its status came first, unless the stream broke.
                state.calls.remove(&id)
            };
            let Some(call) = call else { return };
            let message = format!("the call's stream closed before its status (close code {close_code}: {reason})");
            call::end(&call, CallStatus::new(code::UNAVAILABLE, message));
            session::start_waiting(&session);
            return;
        }
        SocketEvent::Text(text) => decode_text(&text),
        SocketEvent::Binary(bytes) => decode_binary(&bytes),
    };
    let records = match records {
        Ok(records) => records,
        Err(error) => {
            // A server that breaks the protocol: nothing on this socket can be trusted.
            Connection::close(&connection, "protocol error", CallStatus::new(code::INTERNAL, error));
            session::on_close(&session, &connection, true, "");
            return;
        }
    };
    for (id, incoming) in records {
        if id == 0 {
            if let Incoming::GoAway = incoming {
                session::on_goaway(&session, &connection);
            }
            continue;
        }
        // Records of calls that are not live are ignored.
        let Some(call) = connection.borrow().calls.get(&id).cloned() else {
            continue;
        };
        match incoming {
            Incoming::Message(received) => call::deliver(&call, received),
            Incoming::Window(credit) => call::grant(&call, credit),
            Incoming::Headers(headers) => call.borrow_mut().set_headers(headers),
            Incoming::Status(status) => {
                connection.borrow_mut().forget(id);
                call::end(&call, status);
                // A slot for a call waiting for one.
                session::start_waiting(&session);
            }
            Incoming::GoAway => {}
        }
    }
}
