//! The event loop's timers and tasks, from the global scope (a page or a
//! worker alike: no `window` needed).

use js_sys::Function;
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(handler: &Function, ms: f64) -> JsValue;
    #[wasm_bindgen(js_name = clearTimeout)]
    fn clear_timeout(id: &JsValue);
}

#[wasm_bindgen(module = "/js/runtime.js")]
extern "C" {
    /// Runs `f` once the current turn (this task and its microtasks) is over.
    #[wasm_bindgen(js_name = queueTask)]
    pub fn queue_task(f: &Function);
}

/// A pending `setTimeout`; dropping it clears it.
pub struct Timer {
    id: JsValue,
    // Dropping a closure while it runs is safe: wasm-bindgen defers the free.
    _callback: Closure<dyn FnMut()>,
}

impl Timer {
    /// Calls `f` once, after `ms` milliseconds.
    pub fn after(ms: f64, f: impl FnOnce() + 'static) -> Timer {
        let mut f = Some(f);
        let callback = Closure::<dyn FnMut()>::new(move || {
            if let Some(f) = f.take() {
                f();
            }
        });
        let id = set_timeout(callback.as_ref().unchecked_ref(), ms);
        Timer {
            id,
            _callback: callback,
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        clear_timeout(&self.id);
    }
}
