//! Where the bearer token comes from: a fixed string, or a function of the
//! page's that returns one (or a promise of one), asked before every socket
//! and every call, so a page can hand over a fresh token (a short-lived JWT)
//! without a new socket: the server takes a call's own `authorization`
//! metadata over the socket's token.

use js_sys::{Array, Function, Promise, Reflect};
use wasm_bindgen::JsCast;
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
    // One callback for both outcomes: `Promise.allSettled` never rejects,
    // so no second closure is left uncalled (and leaked).
    let settled = match provider.call0(&JsValue::NULL) {
        Ok(value) => Promise::all_settled(&Array::of1(&value)),
        Err(thrown) => Promise::all_settled(&Array::of1(&Promise::reject(&thrown))),
    };
    let callback = Closure::once_into_js(move |results: JsValue| {
        let result = Array::from(&results).get(0);
        let field = |name: &str| Reflect::get(&result, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED);
        let outcome = if field("status").as_string().as_deref() == Some("fulfilled") {
            match field("value").as_string() {
                Some(token) if !token.is_empty() => Ok(token),
                _ => Err("the token function gave no string".to_string()),
            }
        } else {
            Err(format!(
                "the token function failed: {}",
                crate::describe(&field("reason"))
            ))
        };
        done(outcome);
    });
    if let Ok(then) = Reflect::get(&settled, &JsValue::from_str("then")).and_then(|then| then.dyn_into::<Function>()) {
        let _ = then.call1(&settled, &callback);
    }
}
