//! Where the bearer token comes from: a fixed string, or a function of the
//! page's that returns one (or a promise of one), asked before every socket
//! and every call, so a page can hand over a fresh token (a short-lived JWT)
//! without a new socket: the server takes a call's own `authorization`
//! metadata over the socket's token.

use js_sys::{Function, Promise};
use wasm_bindgen::prelude::*;

/// `DataClient.connect`'s `token` option.
#[derive(Clone)]
pub enum TokenSource {
    None,
    Fixed(String),
    /// Asked before each socket and each call.
    Function(Function),
}

/// Asks `provider` for a token and hands `done` the token, or why there is
/// none (the function threw, its promise rejected, or it gave no string).
/// `done` runs later, from the promise's settling, never during this call.
pub fn ask(provider: &Function, done: impl FnOnce(Result<String, String>) + 'static) {
    let value = match provider.call0(&JsValue::NULL) {
        Ok(value) => value,
        Err(thrown) => Promise::reject(&thrown).into(),
    };
    crate::promise::settle(&value, move |outcome| {
        done(match outcome {
            Ok(value) => match value.as_string() {
                Some(token) if !token.is_empty() => Ok(token),
                _ => Err("the token function gave no string".to_string()),
            },
            Err(reason) => Err(format!("the token function failed: {}", crate::describe(&reason))),
        });
    });
}
