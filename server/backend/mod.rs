//! What answers gRPC calls: one tower service taking a gRPC request and
//! returning a gRPC response, whatever the transport it came by. Every
//! transport ends here (native gRPC directly, gRPC-Web through tonic-web's
//! translation), so a service added once is reachable by all of them.
//!
//! The backend is either
//!
//! - **in process**: tonic services on tonic's `Routes`, the built-in
//!   `DataService` (the default) or the embedder's own
//!   ([`crate::ServerBuilder::add_service`]), with health and reflection; or
//! - **an upstream** ([`upstream`]): every call forwarded to another gRPC
//!   server, except health, which the bridge answers itself.
//!
//! In both, the bearer token (if any) is checked in front of every method
//! but health and reflection, and removed before the call goes on.

pub mod codec;
pub mod data_service;
pub mod descriptors;
pub mod health;
pub mod processor;
pub mod transcode;
pub mod upstream;

use std::convert::Infallible;

use http::{Request, Response};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic::service::Routes;
use tower::util::BoxCloneSyncService;

use crate::ops::calls::{ActiveCalls, CountCalls};
use crate::policy::auth::Auth;

/// A gRPC request, as every transport hands it to the backend.
pub type GrpcRequest = Request<tonic::body::Body>;
/// A gRPC response: headers, messages, trailers.
pub type GrpcResponse = Response<tonic::body::Body>;
/// The backend, type-erased: what every transport calls.
pub type GrpcService = BoxCloneSyncService<GrpcRequest, GrpcResponse, Infallible>;

/// A response extension a backend may attach: cancelled when whatever
/// carries the response (the upstream's connection) is gone. A caller that
/// stops reading the body for a while (a WebSocket call waiting for its
/// client's credit) watches it, so such a call ends at once too, not only
/// when it reads again. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConnectionLost {
    token: CancellationToken,
    /// What was lost, for the status (`upstream http://…`).
    what: std::sync::Arc<str>,
}

impl ConnectionLost {
    /// A token for a connection to `what`.
    pub fn new(what: std::sync::Arc<str>) -> ConnectionLost {
        ConnectionLost {
            token: CancellationToken::new(),
            what,
        }
    }

    /// Marks the connection gone; true the first time.
    pub fn lose(&self) -> bool {
        let first = !self.token.is_cancelled();
        self.token.cancel();
        first
    }

    /// Whether the connection is gone.
    pub fn is_lost(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the connection is gone (owning what it waits on, to be
    /// kept beside the response it watches).
    pub fn watch(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }

    /// The status of a call that was on it: UNAVAILABLE, naming it.
    pub fn status(&self) -> tonic::Status {
        tonic::Status::unavailable(format!("{}: the connection to it was lost during the call", self.what))
    }
}

/// A response extension a backend may attach when what a caller leaves
/// unread costs others: the upstream's replies wait on the one HTTP/2
/// connection every call shares (and count against h2's budget for small
/// frames, past which h2 closes that connection for everyone). A caller that
/// stops reading to wait for its client (for credit, or for room to write)
/// parks here first; past the limit the call ends with RESOURCE_EXHAUSTED.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct ParkingLimit {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl ParkingLimit {
    /// Room for `limit` parked calls.
    pub fn new(limit: usize) -> ParkingLimit {
        ParkingLimit {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
        }
    }

    /// A place for a call to wait without reading, held until dropped; none
    /// is needed (`Ok(None)`) where the backend attached no limit.
    pub fn park_in(limit: Option<&ParkingLimit>) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, tonic::Status> {
        limit.map(ParkingLimit::park).transpose()
    }

    /// A place for one call to wait without reading, held until dropped.
    pub fn park(&self) -> Result<tokio::sync::OwnedSemaphorePermit, tonic::Status> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            tonic::Status::resource_exhausted(format!(
                "{} calls already wait for their clients to take the upstream's replies \
                 (--upstream-max-parked-calls); grant credit sooner",
                self.limit
            ))
        })
    }
}

/// What a backend shares with the rest of the server.
#[derive(Clone)]
pub struct BackendContext {
    /// Its health turns NOT_SERVING when this fires.
    pub shutdown: CancellationToken,
    /// Where its calls are counted.
    pub calls: ActiveCalls,
    /// Where the tasks it starts run (waited for at the drain).
    pub tasks: TaskTracker,
}

/// The backend and what describes its methods (for JSON over WebSocket v2).
#[derive(Clone)]
pub struct Backend {
    /// What every transport calls.
    pub service: GrpcService,
    /// The methods' descriptors.
    pub catalog: descriptors::Catalog,
}

/// Adds one service to the routes, wrapped in what counts its calls.
type AddService = Box<dyn FnOnce(Routes, &ActiveCalls) -> Routes + Send>;

/// In-process tonic services, gathered before the server starts.
#[derive(Default)]
pub struct Services {
    services: Vec<AddService>,
    names: Vec<String>,
    descriptor_sets: Vec<&'static [u8]>,
}

impl Services {
    /// Adds a tonic service (anything tonic's generated `...Server::new`
    /// returns, layers and interceptors included). Its calls are counted
    /// ([`CountCalls`]).
    pub fn add<S>(&mut self, service: S)
    where
        S: tower::Service<GrpcRequest, Response = GrpcResponse, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME.to_string());
        self.services.push(Box::new(move |routes: Routes, calls: &ActiveCalls| {
            routes.add_service(CountCalls::new(service, calls.clone()))
        }));
    }

    /// Registers an encoded `FileDescriptorSet` for reflection.
    pub fn register_file_descriptor_set(&mut self, encoded: &'static [u8]) {
        self.descriptor_sets.push(encoded);
    }

    /// Whether no service was added.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The services with health and reflection beside them, behind `auth`.
    pub fn into_backend(self, auth: &Auth, context: &BackendContext) -> Result<Backend, String> {
        let Services {
            services,
            names,
            descriptor_sets,
        } = self;
        let (reflection_v1, reflection_v1alpha) =
            health::reflection_services(&descriptor_sets).map_err(|e| e.to_string())?;
        let mut described = descriptor_sets.clone();
        described.push(tonic_health::pb::FILE_DESCRIPTOR_SET);
        let catalog = descriptors::Catalog::from_sets(&described)?;
        let routes = services
            .into_iter()
            .fold(Routes::default(), |routes, add| add(routes, &context.calls))
            .add_service(health::health_service(
                names,
                context.shutdown.clone(),
                None,
                &context.tasks,
            ))
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .prepare();
        Ok(Backend {
            service: GrpcService::new(auth.require_token(routes)),
            catalog,
        })
    }
}

/// The upstream behind `auth`, with the bridge's own health service in
/// front of it (reporting whether the upstream is reachable).
/// An axum request as the gRPC services take it.
fn into_grpc_request(request: Request<axum::body::Body>) -> GrpcRequest {
    request.map(tonic::body::Body::new)
}

/// `descriptor_sets` (`--descriptor-set`) describe methods before the
/// upstream's reflection is asked.
pub fn upstream_backend(
    upstream: upstream::Upstream,
    auth: &Auth,
    context: &BackendContext,
    descriptor_sets: &[&[u8]],
    reflection_lookups_per_second: u32,
) -> Result<Backend, String> {
    let catalog = descriptors::Catalog::with_reflection(
        descriptor_sets,
        upstream.channel(),
        reflection_lookups_per_second,
        context.tasks.clone(),
    )?;
    let reachable: watch::Receiver<bool> = upstream.reachable();
    let health = health::health_service(Vec::new(), context.shutdown.clone(), Some(reachable), &context.tasks);
    let router = axum::Router::new()
        .route_service(
            "/grpc.health.v1.Health/{*method}",
            tower::ServiceExt::map_request(health, into_grpc_request),
        )
        .fallback_service(tower::ServiceExt::map_request(
            CountCalls::new(upstream, context.calls.clone()),
            into_grpc_request,
        ));
    let routes = Routes::from(router).prepare();
    Ok(Backend {
        service: GrpcService::new(auth.require_token(routes)),
        catalog,
    })
}
