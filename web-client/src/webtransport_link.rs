//! Protocol v2 over WebTransport (docs/protocol-v2.md §12): a session to
//! the server's UDP port, each call on a bidirectional QUIC stream of its own
//! (framed `u32 length | kind | payload`), and the session's control stream
//! (what belongs to no call: the admission, `goaway`, a refusal's code and
//! reason). It speaks [`SocketEvent`]s, so the connection above it sees
//! batches as from a WebSocket, plus the end of each call's stream.
//!
//! The streams are driven by a small JavaScript class (`WtLink` in
//! `js/runtime.js`): WebTransport is promises and stream readers all the way
//! down, which cost far less as JavaScript than as wasm-bindgen glue in the
//! `.wasm` (whose size is budgeted), and web-sys's bindings would need
//! `web_sys_unstable_apis`. The protocol (records, calls, flow control)
//! stays in Rust.

use js_sys::Uint8Array;
use streambridge_protocol::v2::Encoding;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::socket::SocketEvent;

/// How long a session may take to be admitted before the next transport is
/// tried: where UDP is blocked, a QUIC handshake is not refused, it times out.
const OPEN_TIMEOUT_MS: u32 = 5000;

#[wasm_bindgen(module = "/js/runtime.js")]
extern "C" {
    /// Whether this browser has WebTransport (every major one since 2026;
    /// not older Safari, nor some embedded views).
    #[wasm_bindgen(js_name = hasWebTransport)]
    pub fn available() -> bool;

    type WtLink;

    #[wasm_bindgen(constructor)]
    fn new(
        url: &str,
        protocol: &str,
        token: Option<&str>,
        certificate_hashes: &JsValue,
        timeout_ms: u32,
        on: &Closure<dyn FnMut(u32, u32, JsValue, u32)>,
    ) -> WtLink;

    #[wasm_bindgen(method)]
    fn send(this: &WtLink, call: u32, batch: &JsValue);

    #[wasm_bindgen(method)]
    fn close(this: &WtLink, reason: &str);
}

/// An open or opening session; dropping it closes the session.
pub struct WebTransportLink {
    link: WtLink,
    _on_event: Closure<dyn FnMut(u32, u32, JsValue, u32)>,
}

impl WebTransportLink {
    /// Opens a session at `url` (`https://host:port/ws`) speaking `encoding`,
    /// trusting `certificate_hashes` (`serverCertificateHashes`, or
    /// undefined); `on_event` hears everything after.
    pub fn open(
        url: &str,
        encoding: Encoding,
        token: Option<&str>,
        certificate_hashes: &JsValue,
        mut on_event: impl FnMut(SocketEvent) + 'static,
    ) -> WebTransportLink {
        let on_event =
            Closure::<dyn FnMut(u32, u32, JsValue, u32)>::new(move |kind: u32, call: u32, data: JsValue, code: u32| {
                let reason = || data.as_string().unwrap_or_default();
                let code = u16::try_from(code).unwrap_or(u16::MAX);
                on_event(match kind {
                    0 => SocketEvent::Open,
                    1 if data.is_string() => SocketEvent::Text(data),
                    1 => SocketEvent::Binary(data.unchecked_into::<Uint8Array>().to_vec()),
                    2 => SocketEvent::StreamEnded {
                        call,
                        code,
                        reason: reason(),
                    },
                    _ => SocketEvent::Closed { code, reason: reason() },
                });
            });
        let link = WtLink::new(
            url,
            encoding.name(),
            token,
            certificate_hashes,
            OPEN_TIMEOUT_MS,
            &on_event,
        );
        WebTransportLink {
            link,
            _on_event: on_event,
        }
    }

    /// Sends a batch of `call`'s records on its stream (the first opens it).
    pub fn send(&self, call: u32, batch: &JsValue) {
        self.link.send(call, batch);
    }

    /// Closes the session; nothing is reported after.
    pub fn close(&self, reason: &str) {
        self.link.close(reason);
    }
}

impl Drop for WebTransportLink {
    fn drop(&mut self) {
        self.link.close("");
    }
}
