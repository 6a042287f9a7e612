//! Protocol v2 over WebTransport (docs/protocol-v2.md §12): a session to
//! the server's UDP port, each call on a bidirectional QUIC stream of its own
//! (framed `u32 length | kind | payload`), and the session's control stream
//! (what belongs to no call: the admission, `goaway`, a refusal's code and
//! reason). It speaks [`SocketEvent`]s, so the connection above it sees
//! batches as from a WebSocket, plus the end of each call's stream.
//!
//! The streams are driven by a small JavaScript class: WebTransport is
//! promises and stream readers all the way down, which cost far less as
//! JavaScript than as wasm-bindgen glue in the `.wasm` (whose size is
//! budgeted), and web-sys's bindings would need `web_sys_unstable_apis`.
//! The protocol (records, calls, flow control) stays in Rust.

use js_sys::Uint8Array;
use streambridge_protocol::v2::Encoding;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::socket::SocketEvent;

/// How long a session may take to be admitted before the next transport is
/// tried: where UDP is blocked, a QUIC handshake is not refused, it times out.
const OPEN_TIMEOUT_MS: u32 = 5000;

#[wasm_bindgen(inline_js = r#"
const BATCH = 0, CLOSE = 1;
const encoder = new TextEncoder(), decoder = new TextDecoder();

export function hasWebTransport() {
  return typeof WebTransport === 'function';
}

function frame(kind, payload) {
  const out = new Uint8Array(5 + payload.length);
  new DataView(out.buffer).setUint32(0, 1 + payload.length);
  out[4] = kind;
  out.set(payload, 5);
  return out;
}

function closeFrame(payload) {
  if (payload.length < 2) throw new Error('a CLOSE frame without a code');
  return [new DataView(payload.buffer, payload.byteOffset).getUint16(0), decoder.decode(payload.subarray(2))];
}

// Calls `onFrame(kind, payload)` for each frame of `readable` until it ends;
// rejects if the stream is reset or breaks the framing.
async function readFrames(readable, onFrame) {
  const reader = readable.getReader();
  let buffered = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    if (buffered.length === 0) {
      buffered = value;
    } else {
      const joined = new Uint8Array(buffered.length + value.length);
      joined.set(buffered);
      joined.set(value, buffered.length);
      buffered = joined;
    }
    let at = 0;
    while (buffered.length - at >= 5) {
      const length = new DataView(buffered.buffer, buffered.byteOffset + at).getUint32(0);
      if (length === 0) throw new Error('a frame of length 0');
      if (buffered.length - at < 4 + length) break;
      onFrame(buffered[at + 4], buffered.subarray(at + 5, at + 4 + length));
      at += 4 + length;
    }
    buffered = buffered.subarray(at);
  }
}

// Events for `on(kind, stream, data, code)`: 0 admitted; 1 a batch (`data`:
// its text or bytes); 2 a call's stream ended (`stream`: the call, `data`:
// a reason, `code`: its CLOSE code, 1006 without one); 3 the session ended
// (`data`: a reason). Nothing is reported after `close()` or event 3.
export class WtLink {
  constructor(url, protocol, token, hashes, timeoutMs, on) {
    this.on = on;
    this.json = protocol.endsWith('json');
    url += `${url.includes('?') ? '&' : '?'}protocol=${protocol}`;
    if (token !== undefined) url += `&token=${encodeURIComponent(token)}`;
    this.streams = new Map();
    this.admitted = false;
    this.ended = false;
    this.told = null;
    try {
      this.session = new WebTransport(url, hashes ? { serverCertificateHashes: hashes } : {});
    } catch (error) {
      // A URL or hash the browser refuses: not this way in, try the next.
      queueMicrotask(() => this.end(1006, error.message));
      return;
    }
    this.timer = setTimeout(() => {
      this.end(1006, `no WebTransport session within ${timeoutMs} ms`);
      this.session.close();
    }, timeoutMs);
    this.session.closed.then(
      (info) => this.end(info.closeCode, info.reason),
      (error) => this.end(1006, error.message),
    );
    this.session.ready.then(() => this.control(), () => {});
  }

  async control() {
    try {
      const { value: stream } = await this.session.incomingUnidirectionalStreams.getReader().read();
      if (!stream) return;
      await readFrames(stream, (kind, payload) => {
        if (kind === CLOSE) {
          // Refused: told why here, as browsers show no HTTP status. The
          // server waits for the client to close.
          this.told = closeFrame(payload);
          this.session.close({ closeCode: this.told[0], reason: this.told[1] });
        } else if (!this.admitted) {
          this.admitted = true;
          clearTimeout(this.timer);
          if (!this.ended) this.on(0, 0, null, 0);
        } else if (kind === BATCH && !this.ended) {
          this.deliver(payload);
        }
      });
    } catch {
      // The session's own end says what happened.
    }
  }

  deliver(payload) {
    this.on(1, 0, this.json ? decoder.decode(payload) : payload, 0);
  }

  send(call, batch) {
    const bytes = frame(BATCH, typeof batch === 'string' ? encoder.encode(batch) : batch);
    let writer = this.streams.get(call);
    if (!writer) {
      // A call's first batch (its `open`) opens its stream.
      writer = this.session.createBidirectionalStream().then((stream) => {
        this.read(call, stream.readable);
        return stream.writable.getWriter();
      });
      writer.catch((error) => this.streamEnded(call, 1006, `cannot open a stream: ${error.message}`));
      this.streams.set(call, writer);
    }
    writer.then((open) => open.write(bytes)).catch(() => {});
  }

  async read(call, readable) {
    let code = 1006, reason = 'the stream ended without a CLOSE frame';
    try {
      await readFrames(readable, (kind, payload) => {
        if (kind === BATCH) {
          if (!this.ended) this.deliver(payload);
        } else if (kind === CLOSE) {
          [code, reason] = closeFrame(payload);
        } else {
          throw new Error(`a frame of unknown kind ${kind}`);
        }
      });
    } catch (error) {
      reason = `the stream broke: ${error.message}`;
    }
    // The server is done with the call: finish our side too, so the
    // stream no longer counts against the session's limit.
    this.streams.get(call)?.then((writer) => writer.close()).catch(() => {});
    this.streamEnded(call, code, reason);
  }

  streamEnded(call, code, reason) {
    this.streams.delete(call);
    if (!this.ended) this.on(2, call, reason, code);
  }

  end(code, reason) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.timer);
    const [toldCode, toldReason] = this.told ?? [code, reason];
    this.on(3, 0, toldReason, toldCode);
  }

  close(reason) {
    this.ended = true;
    clearTimeout(this.timer);
    try {
      this.session?.close({ closeCode: 0, reason });
    } catch {
      // Already closed.
    }
  }
}
"#)]
extern "C" {
    #[wasm_bindgen(js_name = hasWebTransport)]
    fn has_web_transport() -> bool;

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

/// Whether this browser has WebTransport (every major one since 2026; not
/// older Safari, nor some embedded views).
pub fn available() -> bool {
    has_web_transport()
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
