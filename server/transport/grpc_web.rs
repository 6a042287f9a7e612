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
//! back, trailers last. Since the whole body is on its way at once, a body
//! that stalls for `--request-body-timeout` fails the call (see
//! [`super::grpc_framing`]; otherwise a request that announces a length and
//! sends nothing would hold its connection forever).
//!
//! Content types are parsed as media types (case-insensitive, parameters
//! allowed) and handed to tonic-web in the exact spelling it knows.

use crate::backend::GrpcService;
use axum::body::Body;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName};
use http::{HeaderValue, Method, Request};
use tonic_web::GrpcWebLayer;
use tower::ServiceBuilder;
use tower_http::cors::CorsLayer;

use super::HttpService;
use super::Transport;
use super::grpc_framing::FollowFraming;
use crate::policy::origin::{OriginPolicy, PREFLIGHT_MAX_AGE};

/// The gRPC media types the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcMediaType {
    /// `application/grpc`, `application/grpc+<codec>`.
    Grpc,
    /// A gRPC-Web type, in the canonical spelling tonic-web matches.
    GrpcWeb(&'static str),
}

impl GrpcMediaType {
    const GRPC_WEB: [&'static str; 4] = [
        "application/grpc-web",
        "application/grpc-web+proto",
        "application/grpc-web-text",
        "application/grpc-web-text+proto",
    ];

    /// The media type of a `Content-Type` value (RFC 9110 8.3.1: type and
    /// subtype are case-insensitive, parameters follow `;`), if it is one of
    /// ours. gRPC-Web with another codec than proto is not ours.
    pub fn of(content_type: &[u8]) -> Option<GrpcMediaType> {
        let essence = content_type
            .split(|b| *b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if let Some(canonical) = Self::GRPC_WEB
            .iter()
            .find(|name| essence.eq_ignore_ascii_case(name.as_bytes()))
        {
            return Some(GrpcMediaType::GrpcWeb(canonical));
        }
        let grpc = b"application/grpc";
        let is_grpc = essence.len() >= grpc.len()
            && essence[..grpc.len()].eq_ignore_ascii_case(grpc)
            && matches!(essence.get(grpc.len()), None | Some(b'+'));
        is_grpc.then_some(GrpcMediaType::Grpc)
    }
}

/// Rewrites a gRPC-Web content type to the spelling tonic-web matches
/// exactly.
fn canonical_content_type(mut request: Request<Body>) -> Request<Body> {
    let content_type = request.headers().get(CONTENT_TYPE).map(HeaderValue::as_bytes);
    if let Some(GrpcMediaType::GrpcWeb(canonical)) = content_type.and_then(GrpcMediaType::of)
        && content_type != Some(canonical.as_bytes())
    {
        request
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(canonical));
    }
    request
}

/// `backend` (the gRPC services) as gRPC-Web, outermost first: CORS, the
/// gRPC-Web translation, and a marker telling the service which transport a
/// call came by.
pub fn service(backend: FollowFraming<GrpcService>, origins: OriginPolicy) -> HttpService {
    let service = ServiceBuilder::new()
        .map_response(|response: http::Response<tonic::body::Body>| response.map(Body::new))
        .layer(cors(origins))
        .map_request(canonical_content_type)
        .layer(GrpcWebLayer::new())
        .map_request(|mut request: Request<tonic::body::Body>| {
            // Also tells the framing check that every pause of this body counts.
            request.extensions_mut().insert(Transport::GrpcWeb);
            request
        })
        .service(backend);
    HttpService::new(service)
}

/// CORS for gRPC-Web: preflights from allowed origins succeed, and the gRPC
/// status, which gRPC-Web may send as headers, is readable by the page.
fn cors(origins: OriginPolicy) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(origins.cors_origins())
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
