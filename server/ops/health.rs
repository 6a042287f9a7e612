//! What operators talk to over plain HTTP: the gRPC health of the backend
//! (`crate::backend::health`) at `GET /healthz`, for load balancers and
//! probes that speak no gRPC, and Prometheus metrics at `GET /metrics`.

use axum::extract::State;
use axum::response::IntoResponse;
use http::header::CONTENT_TYPE;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::backend::GrpcService;

use super::calls::ActiveCalls;

/// Asks the backend's own `grpc.health.v1.Health` (in process, no socket),
/// so `/healthz` can never disagree with the gRPC health check.
#[derive(Clone)]
pub struct Probe(GrpcService);

impl Probe {
    pub fn new(backend: GrpcService) -> Probe {
        Probe(backend)
    }
}

/// `GET /healthz`: 200 `SERVING` while the server serves; 503 `NOT_SERVING`
/// once it drains, or (upstream mode) while the upstream is unreachable. A
/// balancer that checks it stops sending new connections to a draining
/// instance before its listener closes.
pub async fn healthz(State(Probe(backend)): State<Probe>) -> impl IntoResponse {
    let request = HealthCheckRequest { service: String::new() };
    let status = HealthClient::new(backend)
        .check(request)
        .await
        .map(|response| response.into_inner().status());
    match status {
        Ok(tonic_health::pb::health_check_response::ServingStatus::Serving) => (http::StatusCode::OK, "SERVING\n"),
        _ => (http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n"),
    }
}

/// `GET /metrics`: the OpenMetrics text exposition.
pub async fn metrics(State(calls): State<ActiveCalls>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        calls.metrics().render(),
    )
}
