//! A typed JavaScript client for streambridge's `DataService.BidirectionalStream`,
//! over the WebSocket bridge (protocol v1, subprotocol `streambridge.v1.proto`).
//!
//! ```js
//! import init, { DataClient } from '/pkg/streambridge_client.js';
//! await init();
//! const client = await DataClient.connect('ws://127.0.0.1:8080/ws');
//! const stream = client.bidirectionalStream();
//! stream.send('hello');
//! stream.closeSend();
//! for await (const message of stream) console.log(message.result); // processed: hello
//! console.log(await stream.finished()); // { code: 0, message: '' }
//! client.close();
//! ```
//!
//! JavaScript sees Promises, plain objects (`{ result }`, `{ code, message }`)
//! and `Error`s named `StreamError` with a gRPC status `code`; never raw
//! plumbing.
//!
//! # Layout
//!
//! - this file: the `#[wasm_bindgen]` API, [`DataClient`] and [`BidiStream`];
//! - `call`: one call's state machine between socket events and promises;
//! - `socket`: the web-sys WebSocket behind one callback of events;
//! - `error`: status codes, `StreamError`, the plain objects.
//!
//! The envelope codec is `streambridge-protocol`'s, the same the server uses.

mod call;
mod error;
mod socket;

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use js_sys::{Object, Promise};
use wasm_bindgen::prelude::*;

use crate::call::{Call, CallRef};

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** One reply of a call. */
export interface StreamMessage {
  /** `processed: <data>` for the request it answers. */
  result: string;
}

/** How a call ended: a gRPC status code (0 = OK) and a message. */
export interface CallStatus {
  code: number;
  message: string;
}

/** The Error a failed call, connection or misuse rejects or throws with. */
export interface StreamError extends Error {
  name: 'StreamError';
  /** gRPC status code: 3 invalid argument, 8 resource exhausted, 14 unavailable, ... */
  code: number;
}

export interface BidiStream extends AsyncIterable<StreamMessage> {}

/** Options of `DataClient.connect`. */
export interface ConnectOptions {
  /**
   * Bearer token for a server started with `--auth-token`. Sent as the
   * WebSocket subprotocol entry `streambridge.bearer.<token>`, so it must use
   * only token characters (letters, digits, `-._~+` ...).
   */
  token?: string;
}
"#;

#[wasm_bindgen(inline_js = r#"
export function installAsyncIterator(prototype) {
  if (Object.prototype.hasOwnProperty.call(prototype, Symbol.asyncIterator)) return;
  Object.defineProperty(prototype, Symbol.asyncIterator, {
    configurable: true,
    value: function () {
      const stream = this;
      return {
        async next() {
          const value = await stream.next();
          return value === null ? { value: undefined, done: true } : { value, done: false };
        },
        async return() {
          stream.cancel();
          return { value: undefined, done: true };
        },
        [Symbol.asyncIterator]() { return this; },
      };
    },
  });
}
"#)]
extern "C" {
    #[wasm_bindgen(js_name = installAsyncIterator)]
    fn install_async_iterator(prototype: &JsValue);
}

/// A client of one streambridge server. Each bidirectional stream runs on its
/// own WebSocket (protocol v1 carries one call per socket).
#[wasm_bindgen]
pub struct DataClient {
    url: String,
    token: Option<String>,
    /// The socket `connect` opened, kept for the first stream.
    ready: RefCell<Option<CallRef>>,
    calls: RefCell<Vec<Weak<RefCell<Call>>>>,
}

#[wasm_bindgen]
impl DataClient {
    /// Connects to `url` (`ws://host:port/ws` or `wss://…`). Resolves once a
    /// socket is open; rejects with a `StreamError` (code 14) if it cannot be
    /// (browsers do not tell why: a refused token looks like no server).
    #[wasm_bindgen(unchecked_return_type = "Promise<DataClient>")]
    pub fn connect(
        url: String,
        #[wasm_bindgen(unchecked_optional_param_type = "ConnectOptions")] options: Option<JsValue>,
    ) -> Promise {
        let token = options.and_then(|options| option_string(&options, "token"));
        let call = match Call::start(&url, token.as_deref()) {
            Ok(call) => call,
            Err(error) => return Promise::reject(&error),
        };
        let client = DataClient {
            url,
            token,
            ready: RefCell::new(Some(call.clone())),
            calls: RefCell::new(vec![Rc::downgrade(&call)]),
        };
        let client = JsValue::from(client);
        Promise::new(&mut |resolve, reject| {
            let opened = js_sys::Function::from(Closure::once_into_js({
                let client = client.clone();
                move || drop(resolve.call1(&JsValue::NULL, &client))
            }));
            Call::notify_open(&call, opened, reject);
        })
    }

    /// The URL this client connects to.
    #[wasm_bindgen(getter)]
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Starts a bidirectional stream. Sends made before its socket is open
    /// are queued and sent in order.
    #[wasm_bindgen(js_name = bidirectionalStream, unchecked_return_type = "BidiStream")]
    pub fn bidirectional_stream(&self) -> Result<JsValue, JsValue> {
        let ready = self.ready.borrow_mut().take().filter(|call| call.borrow().is_fresh());
        let call = match ready {
            Some(call) => call,
            None => Call::start(&self.url, self.token.as_deref())?,
        };
        let mut calls = self.calls.borrow_mut();
        calls.retain(|call| call.strong_count() > 0);
        calls.push(Rc::downgrade(&call));
        let stream = JsValue::from(BidiStream { call });
        install_async_iterator(&Object::get_prototype_of(&stream));
        Ok(stream)
    }

    /// Cancels every stream of this client and closes its sockets.
    pub fn close(&self) {
        self.ready.borrow_mut().take();
        for call in self.calls.borrow_mut().drain(..) {
            if let Some(call) = call.upgrade() {
                Call::cancel(&call);
            }
        }
    }
}

/// `options[name]` if it is a string.
fn option_string(options: &JsValue, name: &str) -> Option<String> {
    if !options.is_object() {
        return None;
    }
    js_sys::Reflect::get(options, &JsValue::from_str(name))
        .ok()?
        .as_string()
}

/// One bidirectional call: `send` and `closeSend` one way, `next` (or
/// `for await`) and `finished` the other.
#[wasm_bindgen]
pub struct BidiStream {
    call: CallRef,
}

#[wasm_bindgen]
impl BidiStream {
    /// Queues one request, in order. Throws a `StreamError` after
    /// `closeSend` or once the stream has ended.
    pub fn send(&self, data: String) -> Result<(), JsValue> {
        self.call.borrow_mut().send(data)
    }

    /// Half-closes: no more requests. The server answers the ones it has,
    /// then ends the stream with status 0.
    #[wasm_bindgen(js_name = closeSend)]
    pub fn close_send(&self) -> Result<(), JsValue> {
        self.call.borrow_mut().close_send()
    }

    /// The next reply, `null` once the stream ended successfully; rejects
    /// with a `StreamError` if it ended with an error.
    #[wasm_bindgen(unchecked_return_type = "Promise<StreamMessage | null>")]
    pub fn next(&self) -> Promise {
        Call::next(&self.call)
    }

    /// Resolves with the final status (`{ code: 0, message: '' }` on
    /// success) once the stream has ended; never rejects.
    #[wasm_bindgen(unchecked_return_type = "Promise<CallStatus>")]
    pub fn finished(&self) -> Promise {
        Call::finished(&self.call)
    }

    /// Abandons the stream: closes its socket; status 1 (CANCELLED).
    pub fn cancel(&self) {
        Call::cancel(&self.call);
    }
}
