//! A typed JavaScript client for streambridge over WebSocket protocol v2
//! (docs/protocol-v2.md): one socket per client carries every
//! call, everything sent in one turn of the event loop travels as one
//! WebSocket message, and the client reconnects by itself.
//!
//! ```js
//! import init, { DataClient } from '/pkg/streambridge_client.js';
//! await init();
//! const client = await DataClient.connect('ws://127.0.0.1:8080/ws');
//! const stream = client.bidirectionalStream();
//! stream.send('hello');
//! stream.closeSend();
//! for await (const message of stream) console.log(message.result); // processed: hello
//! console.log(await stream.finished()); // { code: 0, message: '', metadata: {} }
//!
//! const call = client.call('/grpc.health.v1.Health/Check', { timeoutMs: 5000 });
//! call.send({});
//! call.closeSend();
//! console.log(await call.next()); // { status: 'SERVING' }
//! client.close();
//! ```
//!
//! JavaScript sees Promises, plain objects and `Error`s named `StreamError`
//! with a gRPC status `code`; never raw plumbing.
//!
//! # Layout
//!
//! - this file: the `#[wasm_bindgen]` API: [`DataClient`], [`BidiStream`], [`Call`];
//! - `session`: the client's sockets over time (reconnect, goaway, waiting calls);
//! - `connection`: one socket, its calls, batching and dispatch;
//! - `call`: one call's state between records and promises, flow control;
//! - `codec`: the v2 records in both encodings;
//! - `socket`, `http_link`, `webtransport_link`: the ways to the server
//!   (a WebSocket, HTTP where WebSockets are blocked, WebTransport);
//! - `timer`: the browser's event loop;
//! - `error`: status codes, `StreamError`, the status object;
//! - `tonic_channel` (feature `tonic`): the same calls for tonic clients in
//!   Rust frontends.

mod call;
mod codec;
mod connection;
mod error;
mod http_link;
mod promise;
mod session;
mod socket;
mod timer;
mod token;
#[cfg(feature = "tonic")]
pub mod tonic_channel;
mod webtransport_link;

use js_sys::{Function, JSON, Object, Promise, Reflect, Uint8Array};
use prost::Message;
use streambridge_protocol::StreamRequest;
use streambridge_protocol::v2::Encoding;
use wasm_bindgen::prelude::*;

use crate::call::{CallRef, CallSpec, Shape};
use crate::codec::{Payload, push_json_string};
use crate::connection::{TransportKind, WebTransportTarget};
use crate::error::{CallStatus, code, stream_error};
use crate::session::{Backoff, Options, Session, SessionRef};
use crate::token::TokenSource;

/// The method of the built-in service.
const DATA_METHOD: &str = "/DataService/BidirectionalStream";
/// Response credit a call opens with unless told otherwise: enough replies in
/// flight to get past a browser's per-message cost.
pub(crate) const DEFAULT_WINDOW: u32 = 1024;
/// Calls live on one socket at most unless told otherwise: the server's
/// default `--ws-max-calls`.
pub(crate) const DEFAULT_MAX_CALLS: usize = 100;

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** One reply of `DataService.BidirectionalStream`. */
export interface StreamMessage {
  /** `processed: <data>` for the request it answers. */
  result: string;
}

/** A JSON value, as `JSON.parse` returns it. */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
/** A message of `call()`: its proto3 JSON object (json codec) or its protobuf bytes (proto codec). */
export type CallMessage = { [key: string]: JsonValue } | Uint8Array;

/** How a call ended: a gRPC status code (0 = OK), a message, the service's details and trailers. */
export interface CallStatus {
  code: number;
  message: string;
  /** `grpc-status-details-bin` (a `google.rpc.Status`), when the service sent one. */
  details?: Uint8Array;
  /** Trailing metadata (`-bin` keys carry base64). */
  metadata: Record<string, string>;
}

/** The Error a failed call, connection or misuse rejects or throws with. */
export interface StreamError extends Error {
  name: 'StreamError';
  /** gRPC status code: 3 invalid argument, 4 deadline exceeded, 8 resource exhausted, 14 unavailable, ... */
  code: number;
}

/** `open`: calls start at once; `reconnecting`: waiting for a new socket; `closed`: for good. */
export type ClientState = 'open' | 'reconnecting' | 'closed';

export interface BidiStream extends AsyncIterable<StreamMessage> {}
export interface Call extends AsyncIterable<CallMessage> {}

/** Options of `DataClient.connect`. */
export interface ConnectOptions {
  /**
   * Bearer token for a server started with `--auth-token` or `--jwt-jwks`.
   * Sent as the WebSocket subprotocol entry `streambridge.bearer.<token>`,
   * so it must use only token characters (letters, digits, `-._~+` ...; a
   * JWT does). A function (returning the token or a promise of it) is asked
   * before each socket and before each call: the call carries its token as
   * its `authorization` metadata, which the server takes over the socket's,
   * so a page refreshes a short-lived token without a new socket. If it
   * throws or rejects, the call ends with UNAUTHENTICATED (16); for a
   * socket, `connect` rejects with 16, or a reconnect is tried again later.
   */
  token?: string | (() => string | Promise<string>);
  /** `json` (default: `streambridge.v2.json`) or `proto` (`streambridge.v2.proto`). */
  codec?: 'json' | 'proto';
  /**
   * Reconnect when the socket drops (default on: 500 ms, at most 20 s):
   * each wait is random in [0, min(maxDelayMs, initialDelayMs * 2^attempt)].
   * `false` turns it off.
   */
  reconnect?: false | { initialDelayMs?: number; maxDelayMs?: number };
  /** Response messages a call may have in flight before it is read (default 1024). */
  window?: number;
  /**
   * Calls live on the socket at once (default 100, the server's default
   * `--ws-max-calls`; set it to the server's value): more calls wait in the
   * client, in order, until one ends, as HTTP/2 clients wait for a stream.
   */
  maxCalls?: number;
  /**
   * The ways to reach the server, in order of preference (default
   * `['webtransport', 'websocket', 'http']` with a `webtransport` URL,
   * `['websocket', 'http']` without). Each attempt tries them in this order:
   * one refused before it opens (a proxy that answers WebSocket upgrades with
   * an error, UDP blocked) hands over to the next at once. `http` is protocol
   * v2 over plain HTTP (a streamed GET down, POSTs up) at the same URL
   * (`ws://` becomes `http://`). `webtransport` is left out where the browser
   * does not have it. `client.transport` says which one is in use.
   */
  transports?: ('webtransport' | 'websocket' | 'http')[];
  /**
   * The server's WebTransport URL, `https://host:port/ws` (the port of its
   * `--webtransport-listen`): each call then runs on a QUIC stream of its
   * own, so a lost packet or a stalled call holds up no other call. A
   * session not admitted within 5 s (UDP blocked) hands over to the next
   * transport.
   */
  webtransport?: string;
  /**
   * Certificates to trust for WebTransport by their SHA-256 digest (for a
   * server whose certificate no public CA signed: ECDSA, valid at most 14
   * days), as the browser's `WebTransport` takes them.
   */
  serverCertificateHashes?: { algorithm: 'sha-256'; value: BufferSource }[];
}

/** Options of `bidirectionalStream()` and `call()`. */
export interface CallOptions {
  /** Request metadata (`-bin` keys: base64 values). */
  metadata?: Record<string, string>;
  /** The call's deadline, from now, including any wait for a socket. */
  timeoutMs?: number;
  /** Response messages in flight before it is read (default: the client's `window`). */
  window?: number;
}
"#;

#[wasm_bindgen(module = "/js/runtime.js")]
extern "C" {
    #[wasm_bindgen(js_name = installAsyncIterator)]
    fn install_async_iterator(prototype: &JsValue);
}

/// A client of one streambridge server: one WebSocket (protocol v2) for all
/// its streams and calls, reopened when it drops.
#[wasm_bindgen]
pub struct DataClient {
    session: SessionRef,
}

/// Freeing the client (`free()`, `using`) closes it: its calls end with
/// CANCELLED instead of waiting forever on sockets nobody holds.
impl Drop for DataClient {
    fn drop(&mut self) {
        session::close(&self.session);
    }
}

#[wasm_bindgen]
impl DataClient {
    /// Connects to `url` (`ws://host:port/ws` or `wss://…`). Resolves once the
    /// socket is open; rejects with a `StreamError` (code 14) if the first
    /// attempt fails (browsers do not tell why: a refused token looks like no
    /// server). Reconnecting applies after that.
    #[wasm_bindgen(unchecked_return_type = "Promise<DataClient>")]
    pub fn connect(
        url: String,
        #[wasm_bindgen(unchecked_optional_param_type = "ConnectOptions")] options: Option<JsValue>,
    ) -> Promise {
        let options = match connect_options(options.as_ref()) {
            Ok(options) => options,
            Err(error) => return Promise::reject(&error),
        };
        let session = match Session::start(url.clone(), options) {
            Ok(session) => session,
            Err(error) => {
                let message = format!("cannot open {url}: {}", describe(&error));
                return Promise::reject(&stream_error(code::UNAVAILABLE, &message));
            }
        };
        let client = JsValue::from(DataClient {
            session: session.clone(),
        });
        Promise::new(&mut |resolve, reject| {
            let opened = Function::from(Closure::once_into_js({
                let client = client.clone();
                move || drop(resolve.call1(&JsValue::NULL, &client))
            }));
            session.borrow_mut().set_connect_waiter(opened, reject);
        })
    }

    /// The URL this client connects to.
    #[wasm_bindgen(getter)]
    pub fn url(&self) -> String {
        self.session.borrow().url().to_string()
    }

    /// How the open connection reaches the server: `webtransport`,
    /// `websocket`, or `http` (the fallback where WebSockets are blocked);
    /// `null` while none is open.
    #[wasm_bindgen(getter, unchecked_return_type = "'webtransport' | 'websocket' | 'http' | null")]
    pub fn transport(&self) -> Option<String> {
        self.session.borrow().transport().map(|kind| kind.name().to_string())
    }

    /// `open`, `reconnecting` or `closed`.
    #[wasm_bindgen(getter, unchecked_return_type = "ClientState")]
    pub fn state(&self) -> String {
        self.session.borrow().state().name().to_string()
    }

    /// Called with the new state on every change.
    #[wasm_bindgen(getter, unchecked_return_type = "((state: ClientState) => void) | null")]
    pub fn onstatechange(&self) -> Option<Function> {
        self.session.borrow().on_state_change()
    }

    #[wasm_bindgen(setter)]
    pub fn set_onstatechange(
        &self,
        #[wasm_bindgen(unchecked_param_type = "((state: ClientState) => void) | null")] callback: Option<Function>,
    ) {
        self.session.borrow_mut().set_on_state_change(callback);
    }

    /// WebSockets this client holds, open or opening: 1 normally, 2 for a
    /// while after a `goaway` (the draining one and the next).
    #[wasm_bindgen(getter, js_name = socketCount)]
    pub fn socket_count(&self) -> usize {
        self.session.borrow().socket_count()
    }

    /// Starts a `DataService.BidirectionalStream` call. Sends made before the
    /// socket is open wait and go in order.
    #[wasm_bindgen(js_name = bidirectionalStream, unchecked_return_type = "BidiStream")]
    pub fn bidirectional_stream(
        &self,
        #[wasm_bindgen(unchecked_optional_param_type = "CallOptions")] options: Option<JsValue>,
    ) -> Result<JsValue, JsValue> {
        let call = self.start(Shape::Data, DATA_METHOD.to_string(), options.as_ref())?;
        let stream = JsValue::from(BidiStream { call });
        install_async_iterator(&Object::get_prototype_of(&stream));
        Ok(stream)
    }

    /// Starts a call of any method (`/package.Service/Method`), of any type:
    /// unary is one `send` then `closeSend`. With the json codec messages are
    /// objects in the method's proto3 JSON form; with proto, `Uint8Array`s.
    #[wasm_bindgen(unchecked_return_type = "Call")]
    pub fn call(
        &self,
        method: String,
        #[wasm_bindgen(unchecked_optional_param_type = "CallOptions")] options: Option<JsValue>,
    ) -> Result<JsValue, JsValue> {
        let shape = match self.session.borrow().encoding() {
            Encoding::Json => Shape::Json,
            Encoding::Proto => Shape::Bytes,
        };
        let call = self.start(shape, method, options.as_ref())?;
        let call = JsValue::from(Call { call });
        install_async_iterator(&Object::get_prototype_of(&call));
        Ok(call)
    }

    /// Cancels every call of this client and closes its sockets (`closed`).
    pub fn close(&self) {
        session::close(&self.session);
    }
}

impl DataClient {
    fn start(&self, shape: Shape, method: String, options: Option<&JsValue>) -> Result<CallRef, JsValue> {
        let (window, encoding) = {
            let session = self.session.borrow();
            (session.window(), session.encoding())
        };
        let spec = CallSpec {
            shape,
            encoding,
            method,
            metadata: string_map(options, "metadata")?,
            timeout_ms: option_number(options, "timeoutMs")?
                .map_or(0, |ms| ms.ceil().clamp(0.0, f64::from(u32::MAX)) as u32),
            window: window_option(options)?.unwrap_or(window),
        };
        Ok(session::start_call(&self.session, spec))
    }
}

/// One `DataService.BidirectionalStream` call: `send` and `closeSend` one
/// way, `next` (or `for await`) and `finished` the other.
#[wasm_bindgen]
pub struct BidiStream {
    call: CallRef,
}

/// Freeing a stream or call object that has not ended cancels it: it would
/// otherwise hold one of the socket's call slots (`--ws-max-calls`) for good.
fn cancel_unless_ended(call: &CallRef) {
    if !call.borrow().is_ended() {
        cancel(call);
    }
}

impl Drop for BidiStream {
    fn drop(&mut self) {
        cancel_unless_ended(&self.call);
    }
}

#[wasm_bindgen]
impl BidiStream {
    /// Queues one request, in order; it goes out at the end of this turn of
    /// the event loop, with everything else sent in it. Throws a
    /// `StreamError` after `closeSend` or once the stream has ended.
    pub fn send(&self, data: String) -> Result<(), JsValue> {
        let encoding = self.call.borrow().encoding();
        let payload = match encoding {
            Encoding::Json => {
                let mut json = String::with_capacity(data.len() + 12);
                json.push_str(r#"{"data":"#);
                push_json_string(&mut json, &data);
                json.push('}');
                Payload::Json(json)
            }
            Encoding::Proto => Payload::Proto(StreamRequest { data }.encode_to_vec()),
        };
        call::send(&self.call, payload)
    }

    /// Half-closes: no more requests. The server answers the ones it has,
    /// then ends the stream with status 0.
    #[wasm_bindgen(js_name = closeSend)]
    pub fn close_send(&self) {
        call::close_send(&self.call);
    }

    /// The next reply, `null` once the stream ended successfully; rejects
    /// with a `StreamError` if it ended with an error.
    #[wasm_bindgen(unchecked_return_type = "Promise<StreamMessage | null>")]
    pub fn next(&self) -> Promise {
        call::next(&self.call, false)
    }

    /// `next()` as an async iterator result, for `for await`.
    #[wasm_bindgen(js_name = nextResult, skip_typescript)]
    pub fn next_result(&self) -> Promise {
        call::next(&self.call, true)
    }

    /// Resolves with the final status once the stream has ended; never rejects.
    #[wasm_bindgen(unchecked_return_type = "Promise<CallStatus>")]
    pub fn finished(&self) -> Promise {
        call::finished(&self.call)
    }

    /// Abandons the stream: status 1 (CANCELLED) here, and the server stops it.
    pub fn cancel(&self) {
        cancel(&self.call);
    }
}

/// A call of any method (see `DataClient.call`).
#[wasm_bindgen]
pub struct Call {
    call: CallRef,
}

impl Drop for Call {
    fn drop(&mut self) {
        cancel_unless_ended(&self.call);
    }
}

#[wasm_bindgen]
impl Call {
    /// Queues one request message: an object in the method's proto3 JSON
    /// form (json codec) or its protobuf bytes (proto codec). Throws a
    /// `StreamError` after `closeSend`, once the call has ended, or for a
    /// message of the wrong kind (code 3).
    pub fn send(&self, #[wasm_bindgen(unchecked_param_type = "CallMessage")] message: JsValue) -> Result<(), JsValue> {
        // Not borrowed across `JSON.stringify`: a `toJSON` may use the call.
        let shape = self.call.borrow().shape();
        let payload = match shape {
            Shape::Bytes => match message.dyn_ref::<Uint8Array>() {
                Some(bytes) => Payload::Proto(bytes.to_vec()),
                None => return Err(invalid("with the proto codec a message is a Uint8Array")),
            },
            _ => match JSON::stringify(&message).ok().and_then(|text| text.as_string()) {
                Some(text) if message.is_object() && !message.is_instance_of::<Uint8Array>() => Payload::Json(text),
                _ => {
                    return Err(invalid(
                        "with the json codec a message is an object in its proto3 JSON form",
                    ));
                }
            },
        };
        call::send(&self.call, payload)
    }

    /// Half-closes: no more requests.
    #[wasm_bindgen(js_name = closeSend)]
    pub fn close_send(&self) {
        call::close_send(&self.call);
    }

    /// Request messages queued in the client, not yet on the socket (they
    /// wait for the server's request credit, or for a socket).
    #[wasm_bindgen(getter, js_name = queuedRequests)]
    pub fn queued_requests(&self) -> usize {
        call::queued(&self.call)
    }

    /// Resolves once every queued request went to the socket, or the call
    /// ended: a producer that awaits it before its next `send` runs no
    /// further ahead of the service than the call's request credit.
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn drained(&self) -> Promise {
        call::drained(&self.call)
    }

    /// The next response message, `null` once the call ended successfully;
    /// rejects with a `StreamError` if it ended with an error.
    #[wasm_bindgen(unchecked_return_type = "Promise<CallMessage | null>")]
    pub fn next(&self) -> Promise {
        call::next(&self.call, false)
    }

    /// `next()` as an async iterator result, for `for await`.
    #[wasm_bindgen(js_name = nextResult, skip_typescript)]
    pub fn next_result(&self) -> Promise {
        call::next(&self.call, true)
    }

    /// Resolves with the final status once the call has ended; never rejects.
    #[wasm_bindgen(unchecked_return_type = "Promise<CallStatus>")]
    pub fn finished(&self) -> Promise {
        call::finished(&self.call)
    }

    /// The response metadata, once the server sent it (`null` before, and
    /// for a call that sent none).
    #[wasm_bindgen(getter, unchecked_return_type = "Record<string, string> | null")]
    pub fn headers(&self) -> JsValue {
        self.call.borrow().headers()
    }

    /// Abandons the call: status 1 (CANCELLED) here, and the server stops it.
    pub fn cancel(&self) {
        cancel(&self.call);
    }
}

fn cancel(call: &CallRef) {
    call::cancel_with(call, CallStatus::new(code::CANCELLED, "cancelled by the client"));
}

fn invalid(message: &str) -> JsValue {
    stream_error(code::INVALID_ARGUMENT, message)
}

/// `DataClient.connect`'s options, checked.
fn connect_options(options: Option<&JsValue>) -> Result<Options, JsValue> {
    let token = match option(options, "token") {
        None => TokenSource::None,
        Some(token) => match (token.as_string(), token.dyn_into::<Function>()) {
            (Some(token), _) => TokenSource::Fixed(token),
            (None, Ok(provider)) => TokenSource::Function(provider),
            (None, Err(_)) => {
                return Err(invalid(
                    "token must be a string or a function returning one (or a promise of one)",
                ));
            }
        },
    };
    let encoding = match option(options, "codec").map(|codec| codec.as_string()) {
        None => Encoding::Json,
        Some(Some(codec)) if codec == "json" => Encoding::Json,
        Some(Some(codec)) if codec == "proto" => Encoding::Proto,
        Some(_) => return Err(invalid("codec must be 'json' or 'proto'")),
    };
    let reconnect = match option(options, "reconnect") {
        None => Some(Backoff::default()),
        Some(value) if value.is_falsy() => None,
        Some(value) if value.is_object() => {
            let defaults = Backoff::default();
            let initial_ms = option_number(Some(&value), "initialDelayMs")?.unwrap_or(defaults.initial_ms);
            let max_ms = option_number(Some(&value), "maxDelayMs")?.unwrap_or(defaults.max_ms);
            Some(Backoff {
                initial_ms: initial_ms.max(0.0),
                max_ms: max_ms.max(0.0),
            })
        }
        Some(_) => {
            return Err(invalid("reconnect must be false or { initialDelayMs, maxDelayMs }"));
        }
    };
    let window = window_option(options)?.unwrap_or(DEFAULT_WINDOW);
    let max_calls = match option_number(options, "maxCalls")? {
        None => DEFAULT_MAX_CALLS,
        Some(n) if n >= 1.0 && n.fract() == 0.0 => n as usize,
        Some(_) => return Err(invalid("maxCalls must be a whole number of at least 1")),
    };
    let webtransport = match option(options, "webtransport") {
        None => None,
        Some(url) => Some(WebTransportTarget {
            url: url
                .as_string()
                .ok_or_else(|| invalid("webtransport must be the session's URL, https://host:port/ws"))?,
            certificate_hashes: option(options, "serverCertificateHashes").unwrap_or(JsValue::UNDEFINED),
        }),
    };
    let transports = match option(options, "transports") {
        // WebTransport first where the page says where it is.
        None if webtransport.is_some() => vec![
            TransportKind::WebTransport,
            TransportKind::WebSocket,
            TransportKind::Http,
        ],
        None => vec![TransportKind::WebSocket, TransportKind::Http],
        Some(list) => {
            let names: Vec<Option<String>> = js_sys::Array::from(&list).iter().map(|name| name.as_string()).collect();
            let kinds: Option<Vec<TransportKind>> = names
                .iter()
                .map(|name| name.as_deref().and_then(TransportKind::from_name))
                .collect();
            match kinds {
                Some(kinds) if !kinds.is_empty() && js_sys::Array::is_array(&list) => kinds,
                _ => {
                    return Err(invalid(
                        "transports must be a non-empty array of 'webtransport', 'websocket' and 'http'",
                    ));
                }
            }
        }
    };
    Ok(Options {
        token,
        encoding,
        reconnect,
        window,
        max_calls,
        transports,
        webtransport,
    })
}

/// `options[name]`, unless missing, `undefined` or `null`.
fn option(options: Option<&JsValue>, name: &str) -> Option<JsValue> {
    let options = options.filter(|options| options.is_object())?;
    Reflect::get(options, &JsValue::from_str(name))
        .ok()
        .filter(|value| !value.is_undefined() && !value.is_null())
}

/// `options.window`: a response window, at least 1.
fn window_option(options: Option<&JsValue>) -> Result<Option<u32>, JsValue> {
    Ok(option_number(options, "window")?.map(|w| w.clamp(1.0, f64::from(u32::MAX)) as u32))
}

fn option_number(options: Option<&JsValue>, name: &str) -> Result<Option<f64>, JsValue> {
    match option(options, name) {
        None => Ok(None),
        Some(value) => match value.as_f64() {
            Some(n) if n.is_finite() && n >= 0.0 => Ok(Some(n)),
            _ => Err(invalid(&format!("{name} must be a number, 0 or more"))),
        },
    }
}

/// `options[name]` as a list of string pairs (an object of strings).
fn string_map(options: Option<&JsValue>, name: &str) -> Result<Vec<(String, String)>, JsValue> {
    let Some(map) = option(options, name) else {
        return Ok(Vec::new());
    };
    let entries = Object::entries(
        map.dyn_ref::<Object>()
            .ok_or_else(|| invalid(&format!("{name} must be an object")))?,
    );
    entries
        .iter()
        .map(|entry| {
            let entry: js_sys::Array = entry.unchecked_into();
            match (entry.get(0).as_string(), entry.get(1).as_string()) {
                (Some(key), Some(value)) => Ok((key, value)),
                _ => Err(invalid(&format!("{name} values must be strings"))),
            }
        })
        .collect()
}

/// A thrown JavaScript value as text (a `SyntaxError` for a bad URL, ...).
pub(crate) fn describe(error: &JsValue) -> String {
    error
        .dyn_ref::<js_sys::Error>()
        .map(|error| String::from(error.message()))
        .or_else(|| error.as_string())
        .unwrap_or_else(|| format!("{error:?}"))
}
