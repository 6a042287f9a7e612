//! The web page and the WASM package, served from `--static-dir` at `/`.
//!
//! Unknown paths get a plain-text 404 that names the path, other methods than
//! GET and HEAD a 405 that says which ones work: never an empty error body.

use std::path::Path;

use axum::handler::HandlerWithoutStateExt;
use axum::routing::{MethodRouter, get_service};
use http::header::{ALLOW, HeaderName};
use http::{Method, StatusCode, Uri};
use tower_http::services::ServeDir;

use crate::AppState;

/// The files under `dir` for GET and HEAD; `index.html` for a directory.
pub fn service(dir: &Path) -> MethodRouter<AppState> {
    let files = ServeDir::new(dir).not_found_service(not_found.into_service());
    get_service(files).fallback(method_not_allowed)
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
