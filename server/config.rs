//! Every setting of the server: one clap struct, each flag also an environment
//! variable (`STREAMBRIDGE_*`), each default chosen to be safe on the internet.
//!
//! Limits live here and nowhere else; the README's configuration table lists
//! them with their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::builder::RangedU64ValueParser;

/// 4 MiB: gRPC's customary default for the largest message a peer may send.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// A count or size that must be at least 1: zero would make the server
/// useless (no connection, no stream) or panic (a zero-sized buffer).
fn at_least_one() -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::new().range(1..)
}

/// Settings of a streambridge server.
#[derive(Clone, Debug, Parser)]
#[command(name = "streambridge", version, about)]
#[command(group(clap::ArgGroup::new("jwt_keys").multiple(true)))]
pub struct Config {
    /// Address to listen on. One port serves native gRPC, gRPC-Web, the
    /// WebSocket bridge and the web page.
    #[arg(long, env = "STREAMBRIDGE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory served at `/`: the web page and the WASM package (`pkg/`).
    #[arg(long, env = "STREAMBRIDGE_STATIC_DIR", default_value = "static")]
    pub static_dir: PathBuf,

    /// Largest message accepted on any transport, in bytes: a gRPC message, a
    /// gRPC-Web message or a WebSocket frame.
    #[arg(long, env = "STREAMBRIDGE_MAX_MESSAGE_SIZE", default_value_t = DEFAULT_MAX_MESSAGE_SIZE, value_parser = at_least_one())]
    pub max_message_size: usize,

    /// An origin (`https://app.example.com`) allowed to open WebSockets and make
    /// cross-origin gRPC-Web calls, besides the server's own origin, which is
    /// always allowed. Repeatable; comma-separated in the environment; `*`
    /// allows every origin.
    #[arg(long = "allowed-origin", env = "STREAMBRIDGE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Bytes each WebSocket reads from the kernel at a time. Allocated for every
    /// open socket, so it sets most of an idle socket's memory; larger frames
    /// are still accepted (up to --max-message-size).
    #[arg(long, env = "STREAMBRIDGE_WS_READ_BUFFER_SIZE", default_value_t = 1024, value_parser = at_least_one())]
    pub ws_read_buffer_size: usize,

    /// Bytes of outgoing WebSocket frames gathered before a write to the kernel.
    /// Replies are also written whenever no further reply is ready.
    #[arg(long, env = "STREAMBRIDGE_WS_WRITE_BUFFER_SIZE", default_value_t = 16 * 1024, value_parser = at_least_one())]
    pub ws_write_buffer_size: usize,

    /// WebSocket messages (v1 frames, v2 batches) that have already arrived and
    /// that a socket reads ahead of writing the replies to them, to write those
    /// in one go. While its writes wait for the client to read replies, the
    /// server stops reading from that socket (backpressure).
    #[arg(long, env = "STREAMBRIDGE_WS_REQUEST_QUEUE", default_value_t = 32, value_parser = at_least_one())]
    pub ws_request_queue: usize,

    /// How long to wait for the peer's Close frame after the server sent its
    /// own, before dropping the connection.
    #[arg(long, env = "STREAMBRIDGE_WS_CLOSE_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub ws_close_timeout: Duration,

    /// Concurrent HTTP/2 streams (gRPC calls) allowed per connection.
    #[arg(long, env = "STREAMBRIDGE_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub http2_max_concurrent_streams: u32,

    /// Time a client has, from the moment its connection is accepted, to
    /// finish the TLS handshake (if any) and send a complete request head or
    /// the HTTP/2 preface and SETTINGS; also the longest an HTTP/1 keep-alive
    /// connection waits for its next request. A slower client (slowloris, or
    /// one that sends nothing) is disconnected.
    #[arg(long, env = "STREAMBRIDGE_HTTP1_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub http1_header_read_timeout: Duration,

    /// An HTTP/2 connection with no call in progress for this long is sent
    /// GOAWAY and closed (clients reconnect when they next need it). Long
    /// calls are never cut: only a connection without any request counts as
    /// idle.
    #[arg(long, env = "STREAMBRIDGE_CONNECTION_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_positive_duration)]
    pub connection_idle_timeout: Duration,

    /// Bytes of unfinished gRPC messages (a message whose length prefix has
    /// arrived but not all of its bytes) one connection may hold across all
    /// its calls. Past it, the call whose data would exceed it fails with
    /// RESOURCE_EXHAUSTED instead of the server's memory growing. At least
    /// --max-message-size + 5 (a message and its prefix).
    #[arg(long, env = "STREAMBRIDGE_CONNECTION_MESSAGE_BUFFER", default_value_t = 16 * 1024 * 1024, value_parser = at_least_one())]
    pub connection_message_buffer: usize,

    /// Longest pause in a request body: anywhere in a gRPC-Web body (a
    /// browser sends it whole), inside a message of a native gRPC stream
    /// (between messages a stream may be quiet for as long as it likes). A
    /// stalled request fails with DEADLINE_EXCEEDED and frees its connection.
    /// Also how long a WebTransport stream may wait for its first frame.
    #[arg(long, env = "STREAMBRIDGE_REQUEST_BODY_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub request_body_timeout: Duration,

    /// Open connections at most; past this, new connections are closed right
    /// after accept while existing ones keep working.
    #[arg(long, env = "STREAMBRIDGE_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = at_least_one())]
    pub max_connections: usize,

    /// Interval of HTTP/2 keepalive PINGs; a connection that does not answer
    /// within --http2-keepalive-timeout is closed.
    #[arg(long, env = "STREAMBRIDGE_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_positive_duration)]
    pub http2_keepalive_interval: Duration,

    /// How long an HTTP/2 keepalive PING may go unanswered.
    #[arg(long, env = "STREAMBRIDGE_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_positive_duration)]
    pub http2_keepalive_timeout: Duration,

    /// Largest HTTP/2 header list accepted, in bytes.
    #[arg(long, env = "STREAMBRIDGE_HTTP2_MAX_HEADER_LIST_SIZE", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub http2_max_header_list_size: u32,

    /// Interval of WebSocket pings. A peer that has sent nothing (not even
    /// the pong) and accepted none of its replies by the next ping is gone,
    /// and its call cancelled; so is a peer that takes longer than two
    /// intervals to accept a batch of replies.
    #[arg(long, env = "STREAMBRIDGE_WS_PING_INTERVAL", default_value = "30s", value_parser = parse_positive_duration)]
    pub ws_ping_interval: Duration,

    /// Require `Authorization: Bearer <token>` (gRPC metadata, gRPC-Web
    /// header) or, for browsers' WebSockets, the subprotocol
    /// `streambridge.bearer.<token>`. Unset: no authentication.
    #[arg(
        long,
        env = "STREAMBRIDGE_AUTH_TOKEN",
        hide_env_values = true,
        conflicts_with = "auth_token_file",
        value_parser = parse_token
    )]
    pub auth_token: Option<String>,

    /// Read the bearer token from this file (trailing whitespace ignored).
    #[arg(long, env = "STREAMBRIDGE_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// A JWKS file (JSON Web Key Set): callers may also authenticate with a
    /// JWT signed by one of its keys (RS256, ES256 or EdDSA; `exp` required).
    /// Read again when it changes. With --auth-token as well, either passes.
    #[arg(long, env = "STREAMBRIDGE_JWT_JWKS", group = "jwt_keys")]
    pub jwt_jwks: Option<PathBuf>,

    /// A JWKS URL (https) of the identity provider: fetched at start (the
    /// server does not start without it), again when a token names a key
    /// it does not hold (at most every 30 s), and every 5 minutes. With
    /// --jwt-jwks as well, a key from either verifies.
    #[arg(long, env = "STREAMBRIDGE_JWT_JWKS_URL", group = "jwt_keys")]
    pub jwt_jwks_url: Option<String>,

    /// PEM CA certificates to trust for --jwt-jwks-url instead of the
    /// system's.
    #[arg(long, env = "STREAMBRIDGE_JWT_JWKS_CA", requires = "jwt_jwks_url")]
    pub jwt_jwks_ca: Option<PathBuf>,

    /// The `iss` a JWT must carry.
    #[arg(long, env = "STREAMBRIDGE_JWT_ISSUER", requires = "jwt_keys")]
    pub jwt_issuer: Option<String>,

    /// An `aud` a JWT must carry (repeatable: any one of them passes).
    #[arg(
        long = "jwt-audience",
        env = "STREAMBRIDGE_JWT_AUDIENCES",
        value_delimiter = ',',
        requires = "jwt_keys"
    )]
    pub jwt_audiences: Vec<String>,

    /// Clock skew allowed on a JWT's `exp` and `nbf`.
    #[arg(long, env = "STREAMBRIDGE_JWT_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// `CLAIM=HEADER`: every call of a caller with a JWT carries the claim
    /// as the request metadata HEADER (a string as it is, anything else as
    /// JSON); a client's own HEADER is removed first, on every call.
    /// Repeatable.
    #[arg(
        long = "jwt-claim-header",
        env = "STREAMBRIDGE_JWT_CLAIM_HEADERS",
        value_delimiter = ',',
        value_parser = parse_claim_header,
        requires = "jwt_keys"
    )]
    pub jwt_claim_headers: Vec<(String, http::HeaderName)>,

    /// Pass the JWT on to the services (by default it is removed, as the
    /// shared token always is).
    #[arg(long, env = "STREAMBRIDGE_JWT_FORWARD_TOKEN", requires = "jwt_keys")]
    pub jwt_forward_token: bool,

    /// A cookie whose value a WebSocket upgrade may carry its JWT in.
    #[arg(long, env = "STREAMBRIDGE_JWT_COOKIE", requires = "jwt_keys")]
    pub jwt_cookie: Option<String>,

    /// A TOML file of per-method rules: the first whose `methods` match a
    /// call decides who may make it (`allow = "anyone"` or
    /// `"authenticated"`, and `claims` a JWT must hold). Read again on
    /// SIGHUP. See docs/operations.md, "Security".
    #[arg(long, env = "STREAMBRIDGE_POLICY")]
    pub policy: Option<PathBuf>,

    /// New calls a caller may start per second (its JWT's `sub`, the shared
    /// token's holders, or else its client address); past it a new call gets
    /// RESOURCE_EXHAUSTED at once. Unset: no limit.
    #[arg(long, env = "STREAMBRIDGE_LIMIT_CALLS_PER_SECOND")]
    pub limit_calls_per_second: Option<std::num::NonZeroU32>,

    /// Calls a quiet caller may start at once (default: one second's worth).
    #[arg(long, env = "STREAMBRIDGE_LIMIT_CALLS_BURST", requires = "limit_calls_per_second")]
    pub limit_calls_burst: Option<std::num::NonZeroU32>,

    /// Request messages a caller may send per second, over all its calls
    /// (bucketed as the call limit is). Past it the bridge stops taking
    /// that caller's requests until the bucket refills (v2 grants no
    /// credit, HTTP/2 flow control holds the stream): nothing is dropped,
    /// no call fails. Unset: no limit.
    #[arg(long, env = "STREAMBRIDGE_LIMIT_MESSAGES_PER_SECOND")]
    pub limit_messages_per_second: Option<std::num::NonZeroU32>,

    /// Messages a quiet caller may send at once (default: one second's worth).
    #[arg(
        long,
        env = "STREAMBRIDGE_LIMIT_MESSAGES_BURST",
        requires = "limit_messages_per_second"
    )]
    pub limit_messages_burst: Option<std::num::NonZeroU32>,

    /// A proxy (address or CIDR) whose `X-Forwarded-For` / `Forwarded`
    /// names the client whose calls are counted. Repeatable.
    #[arg(long = "trusted-proxy", env = "STREAMBRIDGE_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// An OpenTelemetry collector (OTLP over gRPC, e.g.
    /// `http://collector:4317`): every call gets a span, its parent the
    /// client's `traceparent`, passed on to the service. Unset: no traces.
    #[arg(long, env = "STREAMBRIDGE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The `service.name` of the spans (`--otlp-endpoint`).
    #[arg(long, env = "STREAMBRIDGE_SERVICE_NAME", default_value = "streambridge")]
    pub service_name: String,

    /// How log lines are written (to standard output): `text` for people,
    /// `json` (one object per line) for log collectors.
    #[arg(long, env = "STREAMBRIDGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// PEM certificate chain; with --tls-key, serves TLS (ALPN h2 and
    /// http/1.1) on the one port instead of cleartext.
    #[arg(long, env = "STREAMBRIDGE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "STREAMBRIDGE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// On SIGTERM/SIGINT, how long live calls get to finish before the server
    /// exits anyway.
    #[arg(long, env = "STREAMBRIDGE_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub drain_timeout: Duration,

    /// Forward every gRPC call to this server (`http://HOST:PORT` for h2c,
    /// `https://HOST:PORT` for TLS) instead of serving the built-in
    /// `DataService`. The bridge still answers health itself.
    #[arg(long, env = "STREAMBRIDGE_UPSTREAM", value_parser = parse_upstream)]
    pub upstream: Option<http::Uri>,

    /// PEM CA certificates that sign an `https://` upstream's certificate
    /// (default: the system's roots).
    #[arg(long, env = "STREAMBRIDGE_UPSTREAM_CA", requires = "upstream")]
    pub upstream_ca: Option<PathBuf>,

    /// PEM client certificate for mutual TLS with the upstream; with
    /// --upstream-client-key.
    #[arg(long, env = "STREAMBRIDGE_UPSTREAM_CLIENT_CERT", requires_all = ["upstream", "upstream_client_key"])]
    pub upstream_client_cert: Option<PathBuf>,

    /// PEM private key for --upstream-client-cert.
    #[arg(long, env = "STREAMBRIDGE_UPSTREAM_CLIENT_KEY", requires_all = ["upstream", "upstream_client_cert"])]
    pub upstream_client_key: Option<PathBuf>,

    /// How long connecting to the upstream may take before the calls
    /// waiting for it fail with UNAVAILABLE.
    #[arg(long, env = "STREAMBRIDGE_UPSTREAM_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_positive_duration)]
    pub upstream_connect_timeout: Duration,

    /// Upstream mode: WebSocket v2 calls that may wait at once for their
    /// client's credit while the upstream has replies for them (each holds up
    /// to 64 KiB unread on the shared upstream connection); a call that would
    /// wait past it ends with RESOURCE_EXHAUSTED. The default keeps h2's
    /// budget for unread small frames (which closes the connection for
    /// every call when passed) out of reach.
    #[arg(long, env = "STREAMBRIDGE_UPSTREAM_MAX_PARKED_CALLS", default_value_t = 256, value_parser = at_least_one())]
    pub upstream_max_parked_calls: usize,

    /// WebSocket protocol v2: live calls one socket may carry; an `open`
    /// past it fails with RESOURCE_EXHAUSTED.
    #[arg(long, env = "STREAMBRIDGE_WS_MAX_CALLS", default_value_t = 100, value_parser = at_least_one())]
    pub ws_max_calls: usize,

    /// WebSocket protocol v2: bytes of request messages one socket may hold
    /// before its calls consume them; past it the socket is not read.
    #[arg(long, env = "STREAMBRIDGE_WS_SOCKET_BUFFER", default_value_t = 4 * 1024 * 1024, value_parser = at_least_one())]
    pub ws_socket_buffer: usize,

    /// Protocol v2 over HTTP (the fallback where WebSockets are blocked): a
    /// session whose client has sent nothing for this long (its client
    /// answers the server's pings, sent every half of it) or has read none
    /// of its replies for this long is gone, and its calls cancelled.
    #[arg(long, env = "STREAMBRIDGE_HTTP_SESSION_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub http_session_idle_timeout: Duration,

    /// Protocol v2 over HTTP: live sessions this server holds; one past it
    /// is refused with 503. Each also holds its down-stream's connection,
    /// within --max-connections.
    #[arg(long, env = "STREAMBRIDGE_HTTP_MAX_SESSIONS", default_value_t = 10_000, value_parser = at_least_one())]
    pub http_max_sessions: usize,

    /// Protocol v2 over HTTP: a name for this instance, put at the start of
    /// its session ids (`NAME.` then random) so that a load balancer can send
    /// a session's POSTs to the instance that holds it (docs/deploy.md).
    /// Letters, digits, `-` and `_`.
    #[arg(long, env = "STREAMBRIDGE_HTTP_SESSION_ROUTE", value_parser = parse_route)]
    pub http_session_route: Option<String>,

    /// Also serve protocol v2 over WebTransport (HTTP/3) on this UDP
    /// address, each call on a QUIC stream of its own (docs/protocol-v2.md
    /// §12). Needs --tls-cert and --tls-key. HTTP responses on the TCP port
    /// then advertise it (`Alt-Svc`).
    #[arg(long, env = "STREAMBRIDGE_WEBTRANSPORT_LISTEN")]
    pub webtransport_listen: Option<SocketAddr>,

    /// WebTransport: live sessions this server holds; one past it is
    /// closed at once with code 4503.
    #[arg(long, env = "STREAMBRIDGE_WEBTRANSPORT_MAX_SESSIONS", default_value_t = 10_000, value_parser = at_least_one())]
    pub webtransport_max_sessions: usize,

    /// An encoded `FileDescriptorSet` (`protoc --descriptor_set_out
    /// --include_imports`) describing upstream methods for the JSON encoding
    /// of WebSocket v2; without it the upstream's reflection is asked.
    /// Repeatable.
    #[arg(long = "descriptor-set", env = "STREAMBRIDGE_DESCRIPTOR_SETS", value_delimiter = ',')]
    pub descriptor_sets: Vec<PathBuf>,

    /// Upstream mode: reflection requests the bridge may send the upstream
    /// per second (in bursts of as many) to describe methods for the JSON
    /// encoding; a look-up past it fails with UNAVAILABLE. Answers are
    /// cached, so this bounds only names not seen before.
    #[arg(long, env = "STREAMBRIDGE_REFLECTION_LOOKUPS_PER_SECOND", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub reflection_lookups_per_second: u32,
}

impl Config {
    /// The bearer token clients must present, if authentication is on.
    /// An empty token is refused: it would turn authentication on while
    /// letting in anyone who sends `Bearer ` with nothing after it.
    pub fn bearer_token(&self) -> Result<Option<String>, ConfigError> {
        match (&self.auth_token, &self.auth_token_file) {
            (Some(token), _) => parse_token(token)
                .map(Some)
                .map_err(|why| ConfigError::Invalid(format!("--auth-token: {why}"))),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File {
                    flag: "--auth-token-file",
                    path: path.clone(),
                    source,
                })?;
                parse_token(text.trim_end())
                    .map(Some)
                    .map_err(|why| ConfigError::Invalid(format!("--auth-token-file {}: {why}", path.display())))
            }
            (None, None) => Ok(None),
        }
    }

    /// Checks what clap cannot check flag by flag (embedders who build a
    /// `Config` by hand get the same checks from `Server::bind`, which also
    /// reads and checks the token file).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("--max-message-size", self.max_message_size),
            ("--ws-read-buffer-size", self.ws_read_buffer_size),
            ("--ws-write-buffer-size", self.ws_write_buffer_size),
            ("--ws-request-queue", self.ws_request_queue),
            ("--max-connections", self.max_connections),
            ("--ws-max-calls", self.ws_max_calls),
            ("--upstream-max-parked-calls", self.upstream_max_parked_calls),
            ("--ws-socket-buffer", self.ws_socket_buffer),
            ("--http-max-sessions", self.http_max_sessions),
            ("--webtransport-max-sessions", self.webtransport_max_sessions),
            ("--connection-message-buffer", self.connection_message_buffer),
            (
                "--http2-max-concurrent-streams",
                self.http2_max_concurrent_streams as usize,
            ),
            ("--http2-max-header-list-size", self.http2_max_header_list_size as usize),
            (
                "--reflection-lookups-per-second",
                self.reflection_lookups_per_second as usize,
            ),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::Invalid(format!("{flag} must be at least 1")));
        }
        let durations = [
            ("--ws-close-timeout", self.ws_close_timeout),
            ("--ws-ping-interval", self.ws_ping_interval),
            ("--http-session-idle-timeout", self.http_session_idle_timeout),
            ("--http1-header-read-timeout", self.http1_header_read_timeout),
            ("--connection-idle-timeout", self.connection_idle_timeout),
            ("--request-body-timeout", self.request_body_timeout),
            ("--http2-keepalive-interval", self.http2_keepalive_interval),
            ("--http2-keepalive-timeout", self.http2_keepalive_timeout),
            ("--drain-timeout", self.drain_timeout),
            ("--upstream-connect-timeout", self.upstream_connect_timeout),
        ];
        if let Some((flag, _)) = durations.iter().find(|(_, value)| value.is_zero()) {
            return Err(ConfigError::Invalid(format!("{flag} must be longer than 0")));
        }
        if let Some((flag, _)) = durations.iter().find(|(_, value)| *value > MAX_DURATION) {
            return Err(ConfigError::Invalid(format!("{flag} must be at most a year")));
        }
        // What clap enforces between flags, for configurations built by hand.
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "--tls-cert and --tls-key go together: give both for TLS, or neither".into(),
            ));
        }
        if self.webtransport_listen.is_some() && self.tls_cert.is_none() {
            return Err(ConfigError::Invalid(
                "--webtransport-listen needs --tls-cert and --tls-key: WebTransport is always TLS".into(),
            ));
        }
        if let Some(upstream) = &self.upstream {
            parse_upstream(&upstream.to_string()).map_err(|why| ConfigError::Invalid(format!("--upstream: {why}")))?;
        }
        let upstream_tls = [
            ("--upstream-ca", self.upstream_ca.is_some()),
            ("--upstream-client-cert", self.upstream_client_cert.is_some()),
        ];
        if let Some((flag, _)) = upstream_tls.iter().find(|(_, set)| *set)
            && self.upstream.as_ref().and_then(http::Uri::scheme_str) != Some("https")
        {
            return Err(ConfigError::Invalid(format!("{flag} needs an https:// --upstream")));
        }
        if self.upstream_client_cert.is_some() != self.upstream_client_key.is_some() {
            return Err(ConfigError::Invalid(
                "--upstream-client-cert and --upstream-client-key go together".into(),
            ));
        }
        if self.auth_token.is_some() && self.auth_token_file.is_some() {
            return Err(ConfigError::Invalid(
                "--auth-token and --auth-token-file exclude each other: give one".into(),
            ));
        }
        // A message is its bytes plus the 5-byte gRPC length prefix.
        if self.connection_message_buffer < self.max_message_size.saturating_add(5) {
            return Err(ConfigError::Invalid(format!(
                "--connection-message-buffer ({}) must be at least --max-message-size ({}) + 5, \
                 or a message of the largest size could never arrive",
                self.connection_message_buffer, self.max_message_size
            )));
        }
        // An inline token is checked here; a token file is read and checked
        // once, when the server's state is built (`Server::bind`).
        match self.auth_token {
            Some(_) => self.bearer_token().map(drop),
            None => Ok(()),
        }
    }

    /// The JWT verifier `--jwt-*` configure, if any; its key set read.
    pub fn jwt_verifier(&self) -> Result<Option<crate::policy::jwt::JwtVerifier>, ConfigError> {
        if self.jwt_jwks.is_none() && self.jwt_jwks_url.is_none() {
            return Ok(None);
        }
        let settings = crate::policy::jwt::JwtSettings {
            jwks: self.jwt_jwks.clone(),
            jwks_url: self.jwt_jwks_url.clone(),
            jwks_ca: self.jwt_jwks_ca.clone(),
            issuer: self.jwt_issuer.clone(),
            audiences: self.jwt_audiences.clone(),
            leeway: self.jwt_leeway,
            claim_headers: self.jwt_claim_headers.clone(),
            forward_token: self.jwt_forward_token,
            cookie: self.jwt_cookie.clone(),
        };
        crate::policy::jwt::JwtVerifier::new(settings)
            .map(Some)
            .map_err(ConfigError::Invalid)
    }

    /// The defaults, listening on `listen`: what tests and embedders start from.
    pub fn with_listen(listen: SocketAddr) -> Self {
        let mut config = Config::parse_from(["streambridge"]);
        config.listen = listen;
        config
    }
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object per line.
    Json,
}

/// Why a configuration cannot start a server, naming the flag or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that is out of range or inconsistent with another one.
    #[error("{0}")]
    Invalid(String),
    /// A file named by a flag could not be read.
    #[error("{flag} {}: {source}", path.display())]
    File {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
}

/// An upstream address: `http://` or `https://`, a host, a port or the
/// scheme's default, and nothing after the authority (gRPC paths are the
/// method's own).
fn parse_upstream(text: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = text.parse().map_err(|error| {
        format!("{text:?} is not a URL ({error}); write it as http://HOST:PORT or https://HOST:PORT")
    })?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(format!(
                "{text:?}: unknown scheme {other:?}; use http:// (h2c) or https:// (TLS)"
            ));
        }
        None => return Err(format!("{text:?} has no scheme; write http://{text} or https://{text}")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(format!("{text:?}: give only scheme, host and port, no path"));
    }
    Ok(uri)
}

/// A bearer token: not empty, and made of the characters that fit both an
/// `Authorization` header and a WebSocket subprotocol name (an RFC 9110
/// token: a browser refuses to offer a subprotocol with `/`, `=` or `,`).
fn parse_token(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("the token is empty; give a non-empty token or leave authentication off".into());
    }
    let token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if let Some(bad) = text.chars().find(|c| !token_char(*c)) {
        return Err(format!(
            "the token contains {bad:?}; use letters, digits and !#$%&'*+-.^_`|~ only, so that \
             browsers can send it as a WebSocket subprotocol (base64: use the URL-safe alphabet without padding)"
        ));
    }
    Ok(text.to_string())
}

/// An instance's session route: it goes into URLs unescaped and is matched
/// by load balancers' rules, so only characters that need no quoting there.
fn parse_route(text: &str) -> Result<String, String> {
    let fits = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if text.is_empty() || text.len() > 32 || !text.chars().all(fits) {
        return Err("use 1 to 32 letters, digits, `-` and `_`".into());
    }
    Ok(text.to_string())
}

/// The longest duration any setting takes: deadlines are computed by adding
/// durations to the clock, which must not overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// A duration longer than zero (a zero interval would spin or panic) and at
/// most a year.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("`{text}` is zero; give a duration longer than 0"));
    }
    if duration > MAX_DURATION {
        return Err(format!("`{text}` is longer than a year"));
    }
    Ok(duration)
}

/// An address or a CIDR network of `--trusted-proxy`.
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{text}` is not an address or a CIDR network (e.g. 10.0.0.0/8)"))
}

/// `CLAIM=HEADER` of `--jwt-claim-header`.
fn parse_claim_header(text: &str) -> Result<(String, http::HeaderName), String> {
    let (claim, header) = text
        .split_once('=')
        .filter(|(claim, header)| !claim.is_empty() && !header.is_empty())
        .ok_or_else(|| format!("`{text}` is not CLAIM=HEADER (e.g. sub=x-user-id)"))?;
    let header = http::HeaderName::try_from(header.to_ascii_lowercase())
        .map_err(|_| format!("`{header}` is not a valid header name"))?;
    let name = header.as_str();
    if name.starts_with("grpc-")
        || name.starts_with(':')
        || matches!(name, "authorization" | "content-type" | "te" | "host")
    {
        return Err(format!(
            "`{name}` is a header the bridge or gRPC sets; pick another (e.g. x-user-id)"
        ));
    }
    Ok((claim.to_string(), header))
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 500ms, 10s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit `{unit}` in `{text}`: use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_the_documented_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::parse_from(["streambridge"]);
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.max_message_size, 4 * 1024 * 1024);
        assert_eq!(config.http2_max_concurrent_streams, 1000);
        assert!(config.allowed_origins.is_empty());
        assert_eq!(config.connection_idle_timeout, Duration::from_secs(300));
        assert_eq!(config.connection_message_buffer, 16 * 1024 * 1024);
        assert_eq!(config.request_body_timeout, Duration::from_secs(30));
        config.validate().expect("the defaults are valid");
    }

    #[test]
    fn zero_limits_are_refused_by_the_parser_naming_the_flag() {
        for flag in [
            "--max-connections",
            "--http2-max-concurrent-streams",
            "--ws-request-queue",
            "--ws-ping-interval",
            "--drain-timeout",
            "--connection-idle-timeout",
        ] {
            let error = Config::try_parse_from(["streambridge", flag, "0"]).unwrap_err();
            assert!(error.to_string().contains(flag), "{flag}: {error}");
        }
    }

    #[test]
    fn an_embedder_config_with_an_empty_token_or_a_zero_limit_is_refused() {
        let mut config = Config::parse_from(["streambridge"]);
        config.auth_token = Some(String::new());
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("--auth-token") && error.contains("empty"), "{error}");
        let mut config = Config::parse_from(["streambridge"]);
        config.ws_ping_interval = Duration::ZERO;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--ws-ping-interval")
        );
        let mut config = Config::parse_from(["streambridge"]);
        config.connection_message_buffer = config.max_message_size;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--connection-message-buffer")
        );
        let refused = |adjust: fn(&mut Config)| {
            let mut config = Config::parse_from(["streambridge"]);
            adjust(&mut config);
            config.validate().unwrap_err().to_string()
        };
        assert!(refused(|c| c.tls_cert = Some("cert.pem".into())).contains("--tls-key"));
        assert!(refused(|c| c.webtransport_listen = Some("127.0.0.1:4433".parse().unwrap())).contains("--tls-cert"));
        assert!(refused(|c| c.drain_timeout = Duration::from_secs(u64::MAX)).contains("--drain-timeout"));
    }

    #[test]
    fn tokens_are_http_tokens_that_fit_a_subprotocol_name() {
        assert!(parse_token("s3cret-Token_1.x~").is_ok());
        for bad in ["", "  ", "two words", "base64/with=", "a,b"] {
            assert!(parse_token(bad).is_err(), "{bad:?}");
        }
    }
}
