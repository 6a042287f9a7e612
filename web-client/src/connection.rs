//! One connection of protocol v2 (a WebSocket, or an HTTP session where
//! WebSockets are blocked): the calls live on it, the batch being written,
//! and the dispatch of what arrives.
//!
//! Writes go into one [`Batch`] that is sent at the end of the current turn
//! of the event loop (a task posted after it), so everything a page sends in one turn,
//! across all its calls, is one WebSocket message; a batch that reaches
//! [`BATCH_LIMIT`] is sent at once.

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

/// Shared handle to a connection.
pub type ConnRef = Rc<RefCell<Connection>>;

/// The ways a connection reaches the server, in `transports`' names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    WebSocket,
    Http,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::WebSocket => "websocket",
            TransportKind::Http => "http",
        }
    }

    pub fn from_name(name: &str) -> Option<TransportKind> {
        [TransportKind::WebSocket, TransportKind::Http]
            .into_iter()
            .find(|kind| kind.name() == name)
    }
}

/// What carries a connection's records.
enum Link {
    WebSocket(Socket),
    Http(HttpLink),
}

impl Link {
    fn send(&self, frame: Frame) {
        // A failed send means the socket is closing: its close event ends the calls.
        let _ = match (self, frame) {
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
    batch: Batch,
    flush_scheduled: bool,
    /// Sends the batch; queued as a task after the current turn.
    flush: Option<Function>,
    /// The client it belongs to (told when a call's slot frees).
    session: Weak<RefCell<session::Session>>,
}

impl Connection {
    /// Starts connecting. `session` hears the socket open, drain and close.
    pub fn open(
        url: &str,
        transport: TransportKind,
        encoding: Encoding,
        token: Option<&str>,
        session: &SessionRef,
    ) -> Result<ConnRef, JsValue> {
        let connection = Rc::new(RefCell::new(Connection {
            url: url.to_string(),
            transport,
            link: None,
            open: false,
            next_id: 1,
            calls: HashMap::new(),
            batch: Batch::new(encoding),
            flush_scheduled: false,
            flush: None,
            session: Rc::downgrade(session),
        }));
        let weak = Rc::downgrade(&connection);
        let flush = Closure::<dyn FnMut()>::new(move || {
            if let Some(connection) = weak.upgrade() {
                let mut connection = connection.borrow_mut();
                connection.flush_scheduled = false;
                connection.send_batch();
            }
        });
        connection.borrow_mut().flush = Some(flush.into_js_value().unchecked_into());

        let (weak, session) = (Rc::downgrade(&connection), Rc::downgrade(session));
        // Boxed: each transport takes the handler as a generic, and a plain
        // closure would put a copy of the whole dispatch into each.
        let on_link_event: Box<dyn FnMut(SocketEvent)> = Box::new(move |event| on_event(&weak, &session, event));
        let link = match transport {
            TransportKind::WebSocket => {
                let mut offers = vec![encoding.name().to_string()];
                offers.extend(token.map(|token| format!("streambridge.bearer.{token}")));
                Link::WebSocket(Socket::open(url, &offers, on_link_event)?)
            }
            TransportKind::Http => Link::Http(HttpLink::open(url, encoding, token, on_link_event)?),
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

    /// Adds a record of about `size` bytes to the batch: the batch goes out
    /// first if the record would take it past the limit, and at the end of
    /// this turn otherwise.
    pub fn write(&mut self, record: impl FnOnce(&mut Batch), size: usize) {
        if !self.batch.is_empty() && self.batch.len() + size > BATCH_LIMIT {
            self.send_batch();
        }
        record(&mut self.batch);
        if self.batch.len() >= BATCH_LIMIT {
            self.send_batch();
        } else if !self.flush_scheduled {
            self.flush_scheduled = true;
            if let Some(flush) = &self.flush {
                queue_task(flush);
            }
        }
    }

    fn send_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let frame = self.batch.take();
        if let Some(link) = &self.link {
            link.send(frame);
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
