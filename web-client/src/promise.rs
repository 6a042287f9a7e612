//! Waiting on a promise without `wasm-bindgen-futures` (it would grow the
//! package): one callback for both outcomes. `Promise.allSettled` never
//! rejects, so no second closure is left uncalled (and leaked).

use js_sys::{Array, Function, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

/// Hands `done` what `value` (a promise, or a plain value) settles to: its
/// value, or why it rejected. `done` runs later, from the promise's
/// settling, never during this call.
pub fn settle(value: &JsValue, done: impl FnOnce(Result<JsValue, JsValue>) + 'static) {
    settle_boxed(value, Box::new(done));
}

/// One closure type for every caller: each `Closure` type costs the
/// package its own glue.
fn settle_boxed(value: &JsValue, done: Box<dyn FnOnce(Result<JsValue, JsValue>)>) {
    let settled = Promise::all_settled(&Array::of1(value));
    let callback = Closure::once_into_js(move |results: JsValue| {
        let result = Array::from(&results).get(0);
        let field = |name: &str| Reflect::get(&result, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED);
        done(if field("status").as_string().as_deref() == Some("fulfilled") {
            Ok(field("value"))
        } else {
            Err(field("reason"))
        });
    });
    if let Ok(then) = Reflect::get(&settled, &JsValue::from_str("then")).and_then(|then| then.dyn_into::<Function>()) {
        let _ = then.call1(&settled, &callback);
    }
}
