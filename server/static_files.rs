//! The web page and the WASM package, served from `--static-dir` at `/`.
//!
//! Every file is sent with `Cache-Control: no-cache`: neither the page nor the
//! WASM package has content-hashed names, so a browser must revalidate each
//! load (a cheap 304 via `Last-Modified` when nothing changed) or it could run
//! a stale `app.js` against a new `.wasm`.
//!
//! Unknown paths get a plain-text 404 that names the path, other methods than
//! GET and HEAD a 405 that says which ones work: never an empty error body.

use std::path::Path;

use axum::handler::HandlerWithoutStateExt;
use axum::routing::{MethodRouter, get_service};
use http::HeaderValue;
use http::header::{ALLOW, CACHE_CONTROL, HeaderName};
use http::{Method, StatusCode, Uri};
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::AppState;

/// The files under `dir` for GET and HEAD; `index.html` for a directory.
pub fn service(dir: &Path) -> MethodRouter<AppState> {
    let files = ServeDir::new(dir).not_found_service(not_found.into_service());
    let revalidate = SetResponseHeaderLayer::overriding(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    get_service(files).fallback(method_not_allowed).layer(revalidate)
}

async fn not_found(uri: Uri) -> (StatusCode, String) {
    (StatusCode::NOT_FOUND, format!("404 not found: {}\n", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> (StatusCode, [(HeaderName, &'static str); 1], String) {
    let body = format!(
        "405 method not allowed: {method} {}; pages take GET or HEAD\n",
        uri.path()
    );
    (StatusCode::METHOD_NOT_ALLOWED, [(ALLOW, "GET, HEAD")], body)
}
