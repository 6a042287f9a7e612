//! gRPC-Web for browsers: tonic-web's translation (binary and text, HTTP/1.1
//! and HTTP/2) plus the CORS policy, wrapped around the same tonic routes that
//! native gRPC uses.
//!
//! Only requests the [router](crate::router) classifies as gRPC-Web (their
//! content type, or a CORS preflight) come through here, so native gRPC pays
//! for neither layer, and plain HTTP never meets tonic-web (which would answer
//! it with 400).
//!
//! A browser cannot stream a request body, so a gRPC-Web call to the bidi
//! method is half-duplex: every request message in one body, replies streamed
//! back, trailers last.

use std::time::Duration;

use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName};
use http::{Method, Request};
use tonic::service::Routes;
use tonic_web::GrpcWebLayer;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::HttpService;
use crate::calls::Transport;
use crate::origin::OriginPolicy;

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(2 * 60 * 60);

/// `routes` (the gRPC services) as gRPC-Web, outermost first: CORS, the
/// gRPC-Web translation, and a marker telling the service which transport a
/// call came by.
pub fn service(routes: Routes, origins: OriginPolicy) -> HttpService {
    let service = ServiceBuilder::new()
        .map_response(|response: http::Response<tonic::body::Body>| response.map(axum::body::Body::new))
        .layer(cors(origins))
        .layer(GrpcWebLayer::new())
        .map_request(|mut request: Request<tonic::body::Body>| {
            request.extensions_mut().insert(Transport::GrpcWeb);
            request
        })
        .service(routes);
    HttpService::new(service)
}

/// CORS for gRPC-Web: preflights from allowed origins succeed, and the gRPC
/// status, which gRPC-Web may send as headers, is readable by the page.
fn cors(origins: OriginPolicy) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, request| {
            origins.allows(origin, request)
        }))
        .allow_methods([Method::POST])
        .allow_headers([
            CONTENT_TYPE,
            AUTHORIZATION,
            HeaderName::from_static("x-grpc-web"),
            HeaderName::from_static("x-user-agent"),
            HeaderName::from_static("grpc-timeout"),
        ])
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(PREFLIGHT_MAX_AGE)
}
