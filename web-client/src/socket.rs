//! A browser WebSocket (web-sys) turned into one callback of [`SocketEvent`]s,
//! so the connection logic never touches `web-sys` callbacks.

use js_sys::{ArrayBuffer, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};

/// What happened on the socket.
pub enum SocketEvent {
    /// The handshake succeeded; messages can be sent.
    Open,
    /// A binary message arrived.
    Binary(Vec<u8>),
    /// A text message arrived: the browser's string, not copied into WASM
    /// (the JSON parser reads it where it is).
    Text(JsValue),
    /// The connection ended; `code` is the close code (1006 if it broke).
    Closed { code: u16, reason: String },
    /// Where each call has a stream of its own (WebTransport): `call`'s
    /// stream ended, with its CLOSE frame's code and reason (1006 without one).
    StreamEnded { call: u32, code: u16, reason: String },
}

type Handler<T> = Closure<dyn FnMut(T)>;

/// An open or opening WebSocket and the callbacks it calls.
pub struct Socket {
    socket: WebSocket,
    _on_open: Handler<web_sys::Event>,
    _on_message: Handler<MessageEvent>,
    _on_close: Handler<CloseEvent>,
}

impl Socket {
    /// Starts connecting to `url`, offering `subprotocols` in order;
    /// `on_event` hears everything after.
    pub fn open(
        url: &str,
        subprotocols: &[String],
        on_event: impl FnMut(SocketEvent) + 'static,
    ) -> Result<Socket, JsValue> {
        let offers: js_sys::Array = subprotocols.iter().map(|name| JsValue::from_str(name)).collect();
        let socket = WebSocket::new_with_str_sequence(url, &offers)?;
        socket.set_binary_type(BinaryType::Arraybuffer);
        let on_event = std::rc::Rc::new(std::cell::RefCell::new(on_event));

        let events = on_event.clone();
        let on_open = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| (events.borrow_mut())(SocketEvent::Open));
        let events = on_event.clone();
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |message: MessageEvent| {
            let data = message.data();
            let event = if data.is_string() {
                SocketEvent::Text(data)
            } else {
                match data.dyn_into::<ArrayBuffer>() {
                    Ok(buffer) => SocketEvent::Binary(Uint8Array::new(&buffer).to_vec()),
                    // A Blob: binaryType is set to arraybuffer, so never.
                    Err(_) => return,
                }
            };
            (events.borrow_mut())(event);
        });
        let events = on_event;
        let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |close: CloseEvent| {
            (events.borrow_mut())(SocketEvent::Closed {
                code: close.code(),
                reason: close.reason(),
            });
        });
        socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        Ok(Socket {
            socket,
            _on_open: on_open,
            _on_message: on_message,
            _on_close: on_close,
        })
    }

    /// Sends one binary message.
    pub fn send_binary(&self, message: &[u8]) -> Result<(), JsValue> {
        self.socket.send_with_u8_array(message)
    }

    /// Sends one text message.
    pub fn send_text(&self, message: &str) -> Result<(), JsValue> {
        self.socket.send_with_str(message)
    }

    /// Closes the connection with a normal close (1000) and `reason`.
    pub fn close(&self, reason: &str) {
        let _ = self.socket.close_with_code_and_reason(1000, reason);
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // The closures die with this struct: the socket must not call them after.
        self.socket.set_onopen(None);
        self.socket.set_onmessage(None);
        self.socket.set_onclose(None);
        if self.socket.ready_state() <= WebSocket::OPEN {
            let _ = self.socket.close();
        }
    }
}
