//! Upstream mode (`--upstream`): every gRPC call is forwarded to another
//! gRPC server over one HTTP/2 connection (tonic's `Channel`, h2c or TLS),
//! as a transparent proxy of HTTP/2 streams. Messages are not decoded: the
//! request's metadata, the response's headers, messages and trailers
//! (`grpc-status-details-bin` included) pass as they are, so all four call
//! types work for any method.
//!
//! What the bridge adds on the way:
//!
//! - **metadata**: hop-by-hop headers are dropped (HTTP/2 forbids them) and
//!   the bridge's own bearer token has already been taken out by
//!   [`crate::policy::auth`]; `grpc-timeout` is sent on shortened by the time
//!   the call spent in the bridge, and the bridge itself fails the call with
//!   DEADLINE_EXCEEDED if the upstream has not answered by then;
//! - **cancellation**: a client that cancels, resets or goes away drops the
//!   response body here, which resets the upstream stream (RST_STREAM) at once;
//! - **errors**: an unreachable upstream fails calls with UNAVAILABLE naming
//!   it, within `--upstream-connect-timeout`; a request the bridge refuses
//!   (too large, truncated, stalled: see `transport::grpc_framing`) ends the
//!   call with the bridge's status, not the upstream's reaction to the reset;
//!   an upstream message over `--max-message-size` ends the call with
//!   RESOURCE_EXHAUSTED after the messages before it;
//! - **health**: [`Upstream::monitor`] probes the upstream and publishes
//!   whether it is reachable, which the bridge's health service reports.
//!   A failed call, or the loss of the connection, wakes it at once; while
//!   the upstream is down it retries with exponential backoff (100 ms to 5 s);
//! - **isolation**: every call shares one HTTP/2 connection, so what one call
//!   leaves unread must not stall the others. Each stream may hold at most
//!   [`STREAM_WINDOW`] unread bytes (then HTTP/2 flow control pauses the
//!   upstream on that stream alone), and the connection's window is HTTP/2's
//!   largest, so streams whose readers stopped never exhaust it. Because
//!   h2 also closes a connection whose unread small DATA frames pass
//!   a budget (half the connection window), the number of WebSocket calls
//!   that may wait unread for their clients is capped
//!   (`--upstream-max-parked-calls`, [`ParkingLimit`] on every response);
//! - **connection loss**: every response carries a [`ConnectionLost`] token,
//!   cancelled the moment the connection it came on is gone (the socket
//!   read EOF or failed). A reading call ends with UNAVAILABLE naming the
//!   upstream; a caller that has stopped reading (a WebSocket call waiting
//!   for its client's credit) watches the token and ends the same way.
//!
//! No timeout bounds a call's length: long streams live as long as both ends
//! want them.

use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderName, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tower::ServiceExt;

use streambridge_protocol::grpc::{PREFIX_LEN, PrefixCursor};

use super::{ConnectionLost, ParkingLimit};

/// How long a healthy upstream goes between probes.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// The first retry after a failure, doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The most a stream to the upstream may hold unread in the bridge: past it,
/// HTTP/2 flow control pauses the upstream on that stream (as a native
/// client that stops reading pauses a server). hyper's default, 2 MiB a
/// stream under a 5 MiB connection window, let three unread streams stall
/// every call on the connection. 64 KiB (HTTP/2's own default, grpc-go's
/// too) keeps a stream at full speed up to 64 KiB per round trip: over
/// 1 GB/s on loopback, about 60 MB/s at a 1 ms round trip.
pub const STREAM_WINDOW: u32 = 64 * 1024;

/// The connection's window: HTTP/2's largest (2^31 - 1), so that streams
/// whose readers stopped (each holding at most [`STREAM_WINDOW`]) cannot
/// exhaust it. It also sizes h2's budget for small DATA frames (half of it),
/// past which h2 closes the whole connection with ENHANCE_YOUR_CALM: with
/// hyper's 5 MiB, ~10 000 unread 1-byte messages on one stream were enough.
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// Where the upstream is and how to reach it (from the `--upstream*` flags).
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub uri: http::Uri,
    /// PEM CA certificates for an `https` upstream (else the system's roots).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// Bound on connecting (TCP and TLS).
    pub connect_timeout: Duration,
    /// `--max-message-size`, applied to what the upstream sends.
    pub max_message_size: usize,
    /// `--upstream-max-parked-calls`: calls that may wait, unread, for
    /// their clients at once (see [`ParkingLimit`]).
    pub max_parked_calls: usize,
}

/// Why the upstream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A TLS file could not be read.
    #[error("{flag} {}: {source}", path.display())]
    File {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// tonic refused the endpoint or its TLS settings.
    #[error("--upstream {uri}: {source}")]
    Endpoint {
        /// The upstream.
        uri: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// The upstream: a tower service forwarding each gRPC call. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    channel: Channel,
    shared: Arc<Shared>,
}

struct Shared {
    /// The upstream's address, for messages.
    name: String,
    /// `upstream <address>`: what a lost connection's status names.
    label: Arc<str>,
    max_message_size: usize,
    connect_timeout: Duration,
    reachable: watch::Sender<bool>,
    /// Wakes the monitor when a call fails to reach the upstream.
    call_failed: Notify,
    /// Cancelled when the current connection is gone; replaced by each new one.
    link: Mutex<ConnectionLost>,
    /// Calls waiting, unread, for their clients (credit or room to write).
    parking: ParkingLimit,
}

impl Shared {
    /// The token of the connection calls go out on now.
    fn link(&self) -> ConnectionLost {
        self.link.lock().expect("not poisoned").clone()
    }
}

impl Upstream {
    /// Sets up the connection, lazily: the server starts whether or not the
    /// upstream is up.
    pub fn new(settings: &UpstreamSettings) -> Result<Upstream, UpstreamError> {
        let name = settings.uri.to_string().trim_end_matches('/').to_string();
        let endpoint_error = |source| UpstreamError::Endpoint {
            uri: name.clone(),
            source,
        };
        let mut endpoint = Endpoint::from(settings.uri.clone())
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            // Find a dead upstream connection even when no call is running.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if settings.uri.scheme_str() == Some("https") {
            let read = |flag, path: &PathBuf| {
                std::fs::read(path).map_err(|source| UpstreamError::File {
                    flag,
                    path: path.clone(),
                    source,
                })
            };
            let mut tls = ClientTlsConfig::new();
            tls = match &settings.ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(read("--upstream-ca", ca)?)),
                None => tls.with_native_roots(),
            };
            if let Some((cert, key)) = &settings.client_identity {
                tls = tls.identity(Identity::from_pem(
                    read("--upstream-client-cert", cert)?,
                    read("--upstream-client-key", key)?,
                ));
            }
            endpoint = endpoint.tls_config(tls).map_err(endpoint_error)?;
        }
        let label: Arc<str> = Arc::from(format!("upstream {name}"));
        let shared = Arc::new(Shared {
            max_message_size: settings.max_message_size,
            connect_timeout: settings.connect_timeout,
            reachable: watch::Sender::new(false),
            call_failed: Notify::new(),
            link: Mutex::new(ConnectionLost::new(label.clone())),
            parking: ParkingLimit::new(settings.max_parked_calls),
            label,
            name,
        });
        Ok(Upstream {
            channel: endpoint.connect_with_connector_lazy(tracking_connector(&endpoint, &shared)),
            shared,
        })
    }

    /// The connection to the upstream (for the bridge's own questions, such
    /// as reflection).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Whether the upstream answered the last probe.
    pub fn reachable(&self) -> watch::Receiver<bool> {
        self.shared.reachable.subscribe()
    }

    /// Probes the upstream until `shutdown`: `grpc.health.v1.Health/Check`
    /// for the whole server. Any gRPC answer but UNAVAILABLE means it is
    /// reachable (an upstream without a health service says UNIMPLEMENTED);
    /// an upstream that reports NOT_SERVING counts as down.
    pub async fn monitor(self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let up = self.probe().await;
            self.shared
                .reachable
                .send_if_modified(|was| std::mem::replace(was, up) != up);
            let wait = if up {
                failures = 0;
                PROBE_INTERVAL
            } else {
                failures = failures.saturating_add(1);
                backoff(failures)
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.call_failed.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn probe(&self) -> bool {
        use tonic_health::pb::health_check_response::ServingStatus;
        let mut client = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest::default());
        request.set_timeout(self.shared.connect_timeout + Duration::from_secs(1));
        match client.check(request).await {
            Ok(response) => response.into_inner().status() != ServingStatus::NotServing,
            Err(status) => !matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded),
        }
    }

    /// Forwards one call; never fails as a service: every failure is a gRPC
    /// status for the client.
    async fn forward(self, request: Request<tonic::body::Body>) -> Response<tonic::body::Body> {
        let (mut parts, body) = request.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        let deadline = parts
            .headers
            .get("grpc-timeout")
            .and_then(parse_grpc_timeout)
            .map(|timeout| Instant::now() + timeout);
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            parts.headers.insert("grpc-timeout", encode_grpc_timeout(left));
        }
        let refused = Arc::new(OnceLock::new());
        let body = tonic::body::Body::new(RequestBody {
            body,
            refused: refused.clone(),
        });
        let call = self.channel.clone().oneshot(Request::from_parts(parts, body));
        let answer = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), call).await {
                Ok(answer) => answer,
                Err(_) => return deadline_passed().into_http(),
            },
            None => call.await,
        };
        match answer {
            Ok(response) => {
                // The connection the response came on is the current one (a
                // new one is made only after the last is gone).
                let link = self.shared.link();
                let shared = self.shared.clone();
                let mut response =
                    response.map(|body| tonic::body::Body::new(ResponseBody::new(body, shared, refused, link.clone())));
                response.extensions_mut().insert(link);
                response.extensions_mut().insert(self.shared.parking.clone());
                response
            }
            Err(error) => match refused.get() {
                Some(status) => status.clone().into_http(),
                None => self.failed(error).into_http(),
            },
        }
    }

    /// The status for a call the upstream did not answer. A failure to
    /// connect (UNAVAILABLE) also marks the upstream down and wakes the
    /// monitor; a stream the upstream reset keeps the code its reason maps to.
    fn failed(&self, error: tonic::transport::Error) -> Status {
        // The channel holds the forwarded `grpc-timeout` too, and its timer
        // may fire in the same instant as the bridge's.
        if find_source::<tonic::TimeoutExpired>(&error).is_some() {
            return deadline_passed();
        }
        let chain = error_chain(&error);
        // A stream the upstream reset says why in its reason; anything else
        // (connect, TLS, a connection that died) means the upstream is not there.
        let reset = find_source::<h2::Error>(&error)
            .filter(|e| e.is_reset() && e.is_remote())
            .is_some();
        let code = if reset {
            Status::from_error(Box::new(error)).code()
        } else {
            tonic::Code::Unavailable
        };
        if code == tonic::Code::Unavailable {
            self.shared
                .reachable
                .send_if_modified(|up| std::mem::replace(up, false));
            self.shared.call_failed.notify_one();
            Status::unavailable(format!("upstream {} unreachable: {chain}", self.shared.name))
        } else {
            Status::new(code, format!("upstream {}: {chain}", self.shared.name))
        }
    }
}

impl tower::Service<Request<tonic::body::Body>> for Upstream {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The channel's own readiness is awaited per call, inside the future.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let upstream = self.clone();
        Box::pin(async move { Ok(upstream.forward(request).await) })
    }
}

/// Connects as tonic's own connector does (TCP_NODELAY, the connect
/// timeout; tonic adds TLS on top), and gives each connection a fresh
/// [`ConnectionLost`] token that its socket cancels when it ends.
fn tracking_connector(
    endpoint: &Endpoint,
    shared: &Arc<Shared>,
) -> impl tower::Service<
    http::Uri,
    Response = TokioIo<TrackedStream>,
    Error = std::io::Error,
    Future = BoxFuture<'static, std::io::Result<TokioIo<TrackedStream>>>,
> + Clone
+ Send
+ 'static {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(endpoint.get_tcp_nodelay());
    http.set_connect_timeout(endpoint.get_connect_timeout());
    let shared = Arc::downgrade(shared);
    tower::service_fn(move |uri: http::Uri| {
        let mut http = http.clone();
        let shared = shared.clone();
        let connecting: BoxFuture<'static, std::io::Result<TokioIo<TrackedStream>>> = Box::pin(async move {
            let stream = tower::Service::call(&mut http, uri)
                .await
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e))?
                .into_inner();
            let Some(upstream) = shared.upgrade() else {
                return Err(std::io::Error::other("the bridge is shutting down"));
            };
            let lost = ConnectionLost::new(upstream.label.clone());
            *upstream.link.lock().expect("not poisoned") = lost.clone();
            Ok(TokioIo::new(TrackedStream { stream, lost, shared }))
        });
        connecting
    })
}

/// The TCP connection to the upstream, which says when it is gone: EOF, an
/// I/O error, or hyper dropping it.
pub struct TrackedStream {
    stream: TcpStream,
    lost: ConnectionLost,
    shared: std::sync::Weak<Shared>,
}

impl TrackedStream {
    /// The connection is gone: its calls learn it, and the monitor probes at once.
    fn lose(&self, why: &dyn std::fmt::Display) {
        if self.lost.lose()
            && let Some(shared) = self.shared.upgrade()
        {
            // Once per connection; its live calls end with UNAVAILABLE.
            tracing::info!(upstream = %shared.name, %why, "upstream connection ended");
            shared.call_failed.notify_one();
        }
    }

    fn ended<T>(&self, result: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(error)) = &result {
            self.lose(error);
        }
        result
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.lose(&"the bridge closed it");
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let room = buf.remaining();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && room > 0 && buf.remaining() == room {
            self.lose(&"the upstream closed it");
        }
        self.ended(result)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, data);
        self.ended(result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, data);
        self.ended(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.stream).poll_flush(cx);
        self.ended(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.ended(result)
    }
}

/// The wait before retry number `failures` (from 1).
fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
        .min(MAX_BACKOFF)
}

fn deadline_passed() -> Status {
    Status::deadline_exceeded("deadline exceeded before the upstream answered")
}

/// The first error of type `E` in `error`'s source chain.
fn find_source<'a, E: std::error::Error + 'static>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}

/// `error` and its sources, as one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Headers that describe one HTTP connection, not the call (RFC 9110 7.6.1;
/// HTTP/2 forbids them), and `host` (the upstream's authority replaces it).
/// `te: trailers` is the one `te` gRPC needs, and stays.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(connection) = headers.get(CONNECTION).and_then(|v| v.to_str().ok()).map(str::to_owned) {
        for name in connection.split(',').map(str::trim) {
            if let Ok(name) = HeaderName::try_from(name) {
                headers.remove(name);
            }
        }
    }
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE, HOST, CONTENT_LENGTH] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (gRPC over HTTP/2 spec).
fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The finest unit that fits `left` in 8 digits (never rounding up, so a
/// forwarded deadline is never later than the client's).
fn encode_grpc_timeout(left: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = left.as_nanos();
    let (amount, unit) = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
    ]
    .into_iter()
    .map(|(per, unit)| (nanos / per, unit))
    .find(|(amount, _)| *amount <= MAX)
    .unwrap_or(((nanos / 3_600_000_000_000).min(MAX), 'H'));
    HeaderValue::from_str(&format!("{amount}{unit}")).expect("digits and a letter are a valid header value")
}

/// The client's request body on its way up; remembers the status the
/// bridge refused it with (see `transport::grpc_framing`), so the call ends
/// with that status rather than with the upstream's view of the reset.
struct RequestBody {
    body: tonic::body::Body,
    refused: Arc<OnceLock<Status>>,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(status))) = &frame {
            let _ = self.refused.set(status.clone());
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    // No size hint: hyper would send an exact one as `content-length`, and
    // a body tonic-web decoded (gRPC-Web text) is shorter than it claims.
}

/// The upstream's response body on its way to the client: messages pass
/// untouched, each message's 5-byte prefix read to hold the size limit; a
/// failure of the upstream stream becomes trailers with a status.
struct ResponseBody {
    /// `None` once the call has ended here.
    body: Option<tonic::body::Body>,
    shared: Arc<Shared>,
    refused: Arc<OnceLock<Status>>,
    /// Where the response stands in its messages.
    cursor: PrefixCursor,
    /// A prefix cut by a chunk's end, held back until it is whole (a
    /// message over the limit must not have sent any of its prefix).
    partial_prefix: BytesMut,
    /// The status to end with, once the data before it has gone.
    ending: Option<Status>,
    /// The connection the response came on.
    link: ConnectionLost,
}

impl ResponseBody {
    fn new(body: tonic::body::Body, shared: Arc<Shared>, refused: Arc<OnceLock<Status>>, link: ConnectionLost) -> Self {
        ResponseBody {
            body: Some(body),
            shared,
            refused,
            cursor: PrefixCursor::default(),
            partial_prefix: BytesMut::new(),
            ending: None,
            link,
        }
    }

    /// Follows `data`'s messages. Returns the bytes that may pass now; sets
    /// `ending` if a message is over the limit (none of its bytes pass) and
    /// holds back a prefix cut by the chunk's end.
    fn follow(&mut self, data: Bytes) -> Bytes {
        let limit = self.shared.max_message_size;
        let refused = self
            .cursor
            .advance(&data, |prefix| if prefix.length > limit { Err(prefix) } else { Ok(()) });
        // The bytes held back begin the prefix that `data` continues.
        let held = std::mem::take(&mut self.partial_prefix);
        let held_len = held.len();
        let joined = if held.is_empty() {
            data
        } else {
            let mut joined = held;
            joined.extend_from_slice(&data);
            joined.freeze()
        };
        match refused {
            Err(prefix) => {
                self.ending = Some(Status::resource_exhausted(format!(
                    "the upstream sent a message of {} bytes; the limit (--max-message-size) is {limit}",
                    prefix.length
                )));
                joined.slice(..held_len + prefix.end - PREFIX_LEN)
            }
            Ok(()) => {
                let whole = joined.len() - self.cursor.in_prefix();
                self.partial_prefix.extend_from_slice(&joined[whole..]);
                joined.slice(..whole)
            }
        }
    }

    /// Ends the call with `status` as trailers; the upstream stream is
    /// dropped (reset) at once.
    fn end_with(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.body = None;
        let mut trailers = HeaderMap::new();
        match status.add_header(&mut trailers) {
            Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Err(status) => Poll::Ready(Some(Err(status))),
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(status) = this.ending.take() {
            return this.end_with(status);
        }
        loop {
            let Some(body) = this.body.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match std::task::ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    let status = match this.refused.get() {
                        Some(refused) => refused.clone(),
                        None if this.link.is_lost() => this.link.status(),
                        None => Status::new(
                            error.code(),
                            format!("upstream {}: the call failed: {}", this.shared.name, error.message()),
                        ),
                    };
                    return this.end_with(status);
                }
                None if this.cursor.inside_message() => {
                    return this.end_with(Status::internal(format!(
                        "upstream {}: the response ended inside a message",
                        this.shared.name
                    )));
                }
                None => {
                    this.body = None;
                    return Poll::Ready(None);
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let data = this.follow(data);
                    if !data.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if let Some(status) = this.ending.take() {
                        return this.end_with(status);
                    }
                }
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ending.is_none() && self.body.as_ref().is_none_or(http_body::Body::is_end_stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_round_trip_without_growing() {
        for text in ["1n", "999u", "100m", "30S", "5M", "2H", "99999999m"] {
            let parsed = parse_grpc_timeout(&HeaderValue::from_static(text)).unwrap();
            let again = parse_grpc_timeout(&encode_grpc_timeout(parsed)).unwrap();
            assert_eq!(again, parsed, "{text}");
        }
        let odd = Duration::from_nanos(123_456_789_123);
        assert!(parse_grpc_timeout(&encode_grpc_timeout(odd)).unwrap() <= odd);
        for bad in ["", "5", "m", "123456789m", "5x", "-5m", "5 m"] {
            assert_eq!(parse_grpc_timeout(&HeaderValue::from_static(bad)), None, "{bad:?}");
        }
    }

    fn response_body(max_message_size: usize) -> ResponseBody {
        let label: Arc<str> = Arc::from("upstream test");
        let shared = Arc::new(Shared {
            name: "test".into(),
            label: label.clone(),
            max_message_size,
            connect_timeout: Duration::from_secs(1),
            reachable: watch::channel(true).0,
            call_failed: Notify::new(),
            link: Mutex::new(ConnectionLost::new(label.clone())),
            parking: ParkingLimit::new(1),
        });
        let body = tonic::body::Body::empty();
        ResponseBody::new(body, shared, Arc::default(), ConnectionLost::new(label))
    }

    #[test]
    fn a_response_passes_up_to_the_prefix_of_a_message_over_the_limit_however_it_is_cut() {
        use streambridge_protocol::grpc::put_message;
        let mut wire = BytesMut::new();
        for length in [3, 0, 10] {
            put_message(&mut wire, &vec![1; length]);
        }
        let allowed = wire.len();
        put_message(&mut wire, &[2; 11]);
        put_message(&mut wire, &[3]);
        for chunk in 1..wire.len() {
            let mut body = response_body(10);
            let mut passed = BytesMut::new();
            for piece in wire.chunks(chunk) {
                passed.extend_from_slice(&body.follow(Bytes::copy_from_slice(piece)));
                if body.ending.is_some() {
                    break;
                }
            }
            assert_eq!(
                &passed[..],
                &wire[..allowed],
                "chunks of {chunk}: not a byte of the refused prefix"
            );
            let ending = body.ending.expect("refused");
            assert_eq!(ending.code(), tonic::Code::ResourceExhausted);
            assert!(ending.message().contains("message of 11 bytes"), "{ending:?}");
        }
        // Within the limit, every byte passes, a cut prefix once it is whole.
        let mut body = response_body(100);
        let mut passed = BytesMut::new();
        for piece in wire.chunks(4) {
            let out = body.follow(Bytes::copy_from_slice(piece));
            passed.extend_from_slice(&out);
        }
        assert_eq!(passed, wire);
        assert!(!body.cursor.inside_message() && body.ending.is_none());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(6), Duration::from_millis(3200));
        assert_eq!(backoff(7), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_te_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(HOST, HeaderValue::from_static("bridge"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers.insert("x-user", HeaderValue::from_static("kept"));
        remove_hop_by_hop(&mut headers);
        let mut names: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-user"]);
    }
}
