//! What operators talk to: gRPC health (`grpc.health.v1.Health`, tonic-health),
//! the same health over plain HTTP at `GET /healthz` (for load balancers and
//! probes that speak no gRPC), server reflection (tonic-reflection, so
//! `grpcurl` needs no proto files), and Prometheus metrics at `GET /metrics`.
//!
//! Health is always the bridge's own, never forwarded. The server as a whole
//! (the empty service name) and every in-process service report SERVING
//! until shutdown starts, then NOT_SERVING, so load balancers stop sending
//! new calls while the live ones drain. In upstream mode the server is also
//! NOT_SERVING while the upstream is unreachable. Health and reflection are
//! not behind the bearer token: they reveal no data.

use axum::extract::State;
use axum::response::IntoResponse;
use http::header::CONTENT_TYPE;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::backend::GrpcService;

use super::calls::ActiveCalls;

/// The encoded descriptors of `proto/` (written by `build.rs`), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/streambridge_descriptor.bin"));

/// `grpc.health.v1.Health` for the server (`""`) and `services`: SERVING
/// while `reachable` says so (always, without an upstream), NOT_SERVING for
/// good once `shutdown` fires.
pub fn health_service(
    services: Vec<String>,
    shutdown: CancellationToken,
    mut reachable: Option<watch::Receiver<bool>>,
) -> HealthServer<impl Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let names = || std::iter::once(String::new()).chain(services.iter().cloned());
        loop {
            let serving = reachable.as_mut().is_none_or(|r| *r.borrow_and_update());
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in names() {
                reporter.set_service_status(name, status).await;
            }
            let changed = async {
                match reachable.as_mut() {
                    Some(r) => r.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                still = changed => if !still { reachable = None },
            }
        }
        for name in names() {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
    });
    service
}

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

/// `grpc.reflection.v1` and `v1alpha` (tools still ask for either) over
/// `descriptor_sets` and the health service.
pub fn reflection_services(
    descriptor_sets: &[&'static [u8]],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        descriptor_sets
            .iter()
            .fold(tonic_reflection::server::Builder::configure(), |builder, set| {
                builder.register_encoded_file_descriptor_set(set)
            })
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
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
