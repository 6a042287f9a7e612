//! Native gRPC (HTTP/2): requests go to the backend as they are, their
//! bodies followed by [`super::grpc_framing`]; no translation, no CORS.

use axum::body::Body;
use http::{Request, Response};

use super::HttpService;
use super::grpc_framing::FollowFraming;
use crate::backend::GrpcService;

/// The backend as the router's native gRPC service.
pub fn service(backend: FollowFraming<GrpcService>) -> HttpService {
    HttpService::new(tower::ServiceExt::<Request<Body>>::map_response(
        backend,
        |response: Response<tonic::body::Body>| response.map(Body::new),
    ))
}
