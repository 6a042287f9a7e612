//! The bridge's own gRPC health (`grpc.health.v1.Health`, tonic-health) and
//! server reflection (tonic-reflection, so `grpcurl` needs no proto files),
//! served beside every backend's calls.
//!
//! Health is always the bridge's own, never forwarded. The server as a whole
//! (the empty service name) and every in-process service report SERVING
//! until shutdown starts, then NOT_SERVING, so load balancers stop sending
//! new calls while the live ones drain. In upstream mode the server is also
//! NOT_SERVING while the upstream is unreachable. Health and reflection are
//! not behind the bearer token: they reveal no data.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};

/// The encoded descriptors of `proto/` (written by `build.rs`), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/streambridge_descriptor.bin"));

/// `grpc.health.v1.Health` for the server (`""`) and `services`: SERVING
/// while `reachable` says so (always, without an upstream), NOT_SERVING for
/// good once `shutdown` fires.
/// The task that reports it runs on `tasks`.
pub fn health_service(
    services: Vec<String>,
    shutdown: CancellationToken,
    mut reachable: Option<watch::Receiver<bool>>,
    tasks: &TaskTracker,
) -> HealthServer<impl Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    tasks.spawn(async move {
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
