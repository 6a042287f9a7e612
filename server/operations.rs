//! What operators talk to: gRPC health (`grpc.health.v1.Health`, tonic-health),
//! server reflection (tonic-reflection, so `grpcurl` needs no proto files),
//! and Prometheus metrics at `GET /metrics`.
//!
//! Health reports `DataService` (and the server as a whole, the empty service
//! name) SERVING until shutdown starts, then NOT_SERVING, so load balancers
//! stop sending new calls while the live ones drain. Health and reflection
//! are not behind the bearer token: they reveal no data.

use axum::extract::State;
use axum::response::IntoResponse;
use http::header::CONTENT_TYPE;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::grpc::DataServiceServer;
use crate::grpc::GrpcDataService;

/// The encoded descriptors of `proto/` (written by `build.rs`), for reflection.
const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/streambridge_descriptor.bin"));

/// `grpc.health.v1.Health`, flipping to NOT_SERVING when `shutdown` fires.
pub fn health_service(
    shutdown: CancellationToken,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        reporter.set_serving::<DataServiceServer<GrpcDataService>>().await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        shutdown.cancelled().await;
        reporter.set_not_serving::<DataServiceServer<GrpcDataService>>().await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    });
    service
}

/// `grpc.reflection.v1.ServerReflection` over `proto/` and the health service.
pub fn reflection_service()
-> tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptors compiled by build.rs are valid")
}

/// `GET /metrics`: the OpenMetrics text exposition.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.calls.metrics().render(),
    )
}
