//! How outcomes reach JavaScript: plain objects for messages and statuses,
//! real `Error`s (named `StreamError`, with a numeric `code`) for failures.

use js_sys::{Object, Reflect};
use wasm_bindgen::prelude::*;

/// gRPC status codes, shared with the server.
pub use streambridge_protocol::code;

/// How a call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallStatus {
    pub code: i32,
    pub message: String,
}

impl CallStatus {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CallStatus {
            code,
            message: message.into(),
        }
    }

    /// `{ code, message }`.
    pub fn to_js(&self) -> JsValue {
        object(&[
            ("code", JsValue::from(self.code)),
            ("message", JsValue::from_str(&self.message)),
        ])
    }

    /// An `Error` named `StreamError` carrying `code`.
    pub fn to_error(&self) -> JsValue {
        stream_error(self.code, &self.message)
    }
}

/// An `Error` named `StreamError` with a gRPC status `code`.
pub fn stream_error(code: i32, message: &str) -> JsValue {
    let error = js_sys::Error::new(message);
    error.set_name("StreamError");
    let _ = Reflect::set(&error, &JsValue::from_str("code"), &JsValue::from(code));
    error.into()
}

/// `{ result }`: one reply.
pub fn message_object(result: &str) -> JsValue {
    object(&[("result", JsValue::from_str(result))])
}

fn object(fields: &[(&str, JsValue)]) -> JsValue {
    let object = Object::new();
    for (name, value) in fields {
        let _ = Reflect::set(&object, &JsValue::from_str(name), value);
    }
    object.into()
}
