//! How outcomes reach JavaScript: plain objects for statuses, real `Error`s
//! (named `StreamError`, with a numeric `code`) for failures.

use js_sys::{Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;

/// gRPC status codes, shared with the server.
pub use streambridge_protocol::code;

/// How a call ended.
#[derive(Clone, Debug)]
pub struct CallStatus {
    pub code: i32,
    pub message: String,
    /// `grpc-status-details-bin`, when the service sent one.
    pub details: Option<Vec<u8>>,
    /// Trailing metadata, a plain object of strings.
    pub metadata: JsValue,
}

impl CallStatus {
    /// A status the client decided itself (no details, no metadata).
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CallStatus {
            code,
            message: message.into(),
            details: None,
            metadata: Object::new().into(),
        }
    }

    /// `{ code, message, details?, metadata }`.
    pub fn to_js(&self) -> JsValue {
        let object = Object::new();
        set(&object, "code", &JsValue::from(self.code));
        set(&object, "message", &JsValue::from_str(&self.message));
        if let Some(details) = &self.details {
            set(&object, "details", &Uint8Array::from(details.as_slice()));
        }
        set(&object, "metadata", &self.metadata);
        object.into()
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

/// `{ result }`: one reply of `DataService`.
pub fn message_object(result: &str) -> JsValue {
    let object = Object::new();
    let _ = Reflect::set(&object, &crate::codec::result_key(), &JsValue::from_str(result));
    object.into()
}

pub fn set(object: &Object, name: &str, value: &JsValue) {
    let _ = Reflect::set(object, &JsValue::from_str(name), value);
}
