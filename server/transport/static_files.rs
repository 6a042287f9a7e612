//! The web page and the WASM package, served from `--static-dir` at `/`.
//!
//! Every file is sent with `Cache-Control: no-cache`: neither the page nor the
//! WASM package has content-hashed names, so a browser must revalidate each
//! load (a cheap 304 via `Last-Modified` when nothing changed) or it could run
//! a stale `app.js` against a new `.wasm`.
//!
//! Unknown paths get a plain-text 404 that names the path, other methods than
//! GET and HEAD a 405 that says which ones work: never an empty error body.
//! Paths no file can have (a component over 255 bytes, a path over 1 KiB, an
//! empty component as in `//pkg`) are 404 before the file system is asked:
//! the file system would answer them with an error (a 500), and `//pkg`
//! would be redirected to `//pkg/`, which a browser reads as the host `pkg`.
//!
//! Symbolic links inside `--static-dir` are followed, as nginx and most file
//! servers do by default: the directory is the operator's, and a link in it
//! is a decision to publish its target. Do not link out of it what you do
//! not want served.

use std::convert::Infallible;
use std::path::Path;

use axum::extract::Request;
use axum::handler::HandlerWithoutStateExt;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get_service};
use http::HeaderValue;
use http::header::{ALLOW, CACHE_CONTROL, HeaderName};
use http::{Method, StatusCode, Uri};
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

/// The files under `dir` for GET and HEAD; `index.html` for a directory.
pub fn service<S: Clone + Send + Sync + 'static>(dir: &Path) -> MethodRouter<S> {
    let files = ServeDir::new(dir).not_found_service(not_found.into_service());
    let revalidate = SetResponseHeaderLayer::overriding(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    get_service(files)
        .fallback(method_not_allowed)
        .layer::<_, Infallible>(middleware::from_fn(refuse_impossible_paths))
        .layer(revalidate)
}

/// Longest path component most file systems allow (`NAME_MAX`).
const MAX_COMPONENT: usize = 255;
/// Longest request path looked up at all; the page's own paths are short.
const MAX_PATH: usize = 1024;

/// 404 for a path that names no file (see the module docs).
async fn refuse_impossible_paths(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let impossible = path.len() > MAX_PATH
        || path.contains("//")
        || path.split('/').any(|component| component.len() > MAX_COMPONENT);
    if impossible {
        return not_found(request.uri().clone()).await.into_response();
    }
    next.run(request).await
}

/// 404 with a body that names the path.
pub async fn not_found(uri: Uri) -> (StatusCode, String) {
    (StatusCode::NOT_FOUND, format!("404 not found: {}\n", uri.path()))
}

/// 405 with a body that says which methods a page takes.
pub async fn method_not_allowed(method: Method, uri: Uri) -> (StatusCode, [(HeaderName, &'static str); 1], String) {
    let body = format!(
        "405 method not allowed: {method} {}; pages take GET or HEAD\n",
        uri.path()
    );
    (StatusCode::METHOD_NOT_ALLOWED, [(ALLOW, "GET, HEAD")], body)
}
