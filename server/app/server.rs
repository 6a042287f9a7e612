//! [`Server`]: bind, run, drain; and [`ServerBuilder`], which chooses what
//! answers the calls (the built-in `DataService`, your own tonic services,
//! or an upstream).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;

use axum::extract::FromRef;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;

use super::{AppState, Core, router};
use crate::backend::upstream::{Upstream, UpstreamError, UpstreamSettings};
use crate::backend::{GrpcRequest, GrpcResponse, Services, upstream_backend};
use crate::config::{Config, ConfigError};
use crate::net::{listener, tls};
use crate::ops::calls::ActiveCalls;
use crate::ops::shutdown;
use crate::transport::websocket::WebSocketState;
use crate::transport::webtransport::{self, WebTransportEndpoint, WebTransportState};

/// Why a server could not start; each names the flag or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag's value, or a file a flag names (the token file).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS certificate or key.
    #[error("--tls-cert/--tls-key: {0}")]
    Tls(io::Error),
    /// The listening address.
    #[error("--listen {addr}: cannot listen: {source}")]
    Listen {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The upstream's settings (`--upstream*`).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Services added with [`ServerBuilder::add_service`] beside `--upstream`.
    #[error("--upstream forwards every call: it cannot be combined with services added in process")]
    UpstreamWithServices,
    /// A descriptor set (registered, or `--descriptor-set`) does not decode.
    #[error("a file descriptor set is invalid: {0}")]
    Descriptors(String),
}

/// Chooses what answers the server's gRPC calls, then binds.
///
/// With no service added and no `--upstream`, the server runs the built-in
/// `DataService`. Services added here are reachable by native gRPC,
/// gRPC-Web and the WebSocket bridge alike:
///
/// ```ignore
/// let server = streambridge::Server::builder(config)
///     .add_service(ChatServer::new(ChatRoom::default()))
///     .register_file_descriptor_set(CHAT_DESCRIPTORS)
///     .bind()
///     .await?;
/// server.run().await;
/// ```
pub struct ServerBuilder {
    config: Config,
    services: Services,
    with_data_service: bool,
}

impl ServerBuilder {
    /// Adds a tonic service (what a generated `...Server::new(...)` returns).
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<GrpcRequest, Response = GrpcResponse, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.services.add(service);
        self
    }

    /// Keeps the built-in `DataService` beside the added services.
    pub fn add_data_service(mut self) -> Self {
        self.with_data_service = true;
        self
    }

    /// Registers an encoded `FileDescriptorSet` (what `tonic-prost-build`'s
    /// `file_descriptor_set_path` writes) so that reflection lists the added
    /// services' methods.
    pub fn register_file_descriptor_set(mut self, encoded: &'static [u8]) -> Self {
        self.services.register_file_descriptor_set(encoded);
        self
    }

    /// Binds `config.listen` (port 0 for an ephemeral port). Fails if the
    /// configuration is inconsistent, a file it names cannot be read, or the
    /// address cannot be bound.
    pub async fn bind(self) -> Result<Server, StartError> {
        let ServerBuilder {
            config,
            mut services,
            with_data_service,
        } = self;
        config.validate()?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key).map_err(StartError::Tls)?),
            _ => None,
        };
        let core = Core::new(&config)?;
        if let Some(jwt) = core.auth.jwt() {
            jwt.fetch_keys().await.map_err(ConfigError::Invalid)?;
            core.tasks.spawn(jwt.clone().refresh_keys(core.shutdown.clone()));
        }
        core.tasks
            .spawn(core.auth.limits().clone().forget_idle(core.shutdown.clone()));
        if config.policy.is_some() {
            // Listening before `bind` returns: a SIGHUP that came before the
            // task first ran would otherwise end the process (its default).
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(hangups) => {
                    let (policy, auth_on) = (core.auth.policy().clone(), core.auth.is_on());
                    core.tasks
                        .spawn(reload_policy_on_sighup(hangups, policy, auth_on, core.shutdown.clone()));
                }
                Err(error) => tracing::warn!(%error, "cannot listen for SIGHUP: the policy is read only at start"),
            }
        }
        let data_service = config.upstream.is_none() && (services.is_empty() || with_data_service);
        let backend = match &config.upstream {
            Some(_) if with_data_service || !services.is_empty() => return Err(StartError::UpstreamWithServices),
            Some(uri) => {
                let upstream = Upstream::new(&UpstreamSettings {
                    uri: uri.clone(),
                    ca: config.upstream_ca.clone(),
                    client_identity: config
                        .upstream_client_cert
                        .clone()
                        .zip(config.upstream_client_key.clone()),
                    connect_timeout: config.upstream_connect_timeout,
                    max_message_size: config.max_message_size,
                    max_parked_calls: config.upstream_max_parked_calls,
                })?;
                core.tasks.spawn(upstream.clone().monitor(core.shutdown.clone()));
                let sets = read_descriptor_sets(&config)?;
                let sets: Vec<&[u8]> = sets.iter().map(Vec::as_slice).collect();
                upstream_backend(
                    upstream,
                    &core.auth,
                    &core.backend_context(),
                    &sets,
                    config.reflection_lookups_per_second,
                )
                .map_err(StartError::Descriptors)?
            }
            None if services.is_empty() => core.builtin_backend(&config),
            None => {
                if with_data_service {
                    core.add_data_service(&mut services, &config);
                }
                services
                    .into_backend(&core.auth, &core.backend_context())
                    .map_err(StartError::Descriptors)?
            }
        };
        let state = AppState::new(&config, core, backend, data_service);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
        let webtransport = match config.webtransport_listen {
            Some(addr) => Some(
                WebTransportEndpoint::bind(&config, addr)
                    .await
                    .map_err(|why| StartError::Config(ConfigError::Invalid(why)))?,
            ),
            None => None,
        };
        Ok(Server {
            listener,
            webtransport,
            config,
            state,
            tls,
        })
    }
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    /// `--webtransport-listen`'s UDP endpoint, bound.
    webtransport: Option<WebTransportEndpoint>,
    config: Config,
    state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The files of `--descriptor-set`.
fn read_descriptor_sets(config: &Config) -> Result<Vec<Vec<u8>>, StartError> {
    config
        .descriptor_sets
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(|source| {
                StartError::Config(ConfigError::File {
                    flag: "--descriptor-set",
                    path: path.clone(),
                    source,
                })
            })
        })
        .collect()
}

impl Server {
    /// A builder for a server with your own services (or an upstream).
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            services: Services::default(),
            with_data_service: false,
        }
    }

    /// Binds `config.listen` with what `config` says serves the calls: the
    /// upstream if `--upstream` is set, else the built-in `DataService`.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        Server::builder(config).bind().await
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The UDP address WebTransport is served on, if it is.
    pub fn webtransport_addr(&self) -> Option<SocketAddr> {
        self.webtransport
            .as_ref()
            .and_then(|endpoint| endpoint.local_addr().ok())
    }

    /// Live calls per transport, for tests and metrics.
    pub fn active_calls(&self) -> ActiveCalls {
        self.state.core().calls.clone()
    }

    /// Cancelling this token starts the graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.core().shutdown.clone()
    }

    /// Serves until the shutdown token fires, then drains live calls for at
    /// most `--drain-timeout`. Returns whether the drain finished in time.
    pub async fn run(self) -> bool {
        let Server {
            listener,
            webtransport,
            config,
            state,
            tls,
        } = self;
        let core = state.core().clone();
        if let Some(endpoint) = webtransport {
            let sessions = WebTransportState::new(&config, WebSocketState::from_ref(&state));
            core.tasks
                .spawn(webtransport::serve(endpoint, sessions, core.shutdown.clone()));
        }
        let service = router(&config, state.clone());
        let settings = listener::ListenerSettings {
            tls,
            metrics: core.calls.metrics().clone(),
            tasks: core.tasks.clone(),
            shutdown: core.shutdown.clone(),
        };
        listener::accept_loop(listener, service, &config, settings).await;
        let drained = shutdown::drain(&core.tasks, config.drain_timeout).await;
        if !drained {
            tracing::warn!(timeout = ?config.drain_timeout, "drain deadline passed with calls still open");
        }
        if let Some(traces) = core.calls.traces().cloned() {
            // The last spans (the drained calls') go out before the end.
            let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
        }
        let cut = state.drain_cut_calls();
        if cut {
            tracing::warn!(timeout = ?config.drain_timeout, "the drain deadline cut WebSocket calls");
        }
        drained && !cut
    }
}

/// Reads the policy file again on every SIGHUP until the shutdown; a file
/// that does not load keeps the rules in force, and says why in the log.
async fn reload_policy_on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    policy: crate::policy::rules::Policy,
    auth_on: bool,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(()) = hangups.recv() => match policy.reload(auth_on) {
                Ok(()) => tracing::info!("SIGHUP: policy read again"),
                Err(error) => tracing::warn!(%error, "SIGHUP: the policy does not load; the rules in force stay"),
            },
        }
    }
}
