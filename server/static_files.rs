//! The web page and the WASM package, served from `--static-dir` at `/`.
//!
//! Unknown paths get a plain-text 404 that names the path, not an empty body.

use std::path::Path;

use axum::handler::HandlerWithoutStateExt;
use http::{StatusCode, Uri};
use tower_http::services::ServeDir;

use crate::HttpService;

/// The files under `dir`; `index.html` for a directory.
pub fn service(dir: &Path) -> HttpService {
    let files = ServeDir::new(dir).not_found_service(not_found.into_service());
    HttpService::new(tower::ServiceExt::<http::Request<axum::body::Body>>::map_response(
        files,
        |response| response.map(axum::body::Body::new),
    ))
}

async fn not_found(uri: Uri) -> (StatusCode, String) {
    (StatusCode::NOT_FOUND, format!("404 not found: {}\n", uri.path()))
}
