//! Protocol v2 over WebTransport (HTTP/3, `--webtransport-listen`), with
//! every call on a QUIC stream of its own (docs/protocol-v2.md §12): a lost
//! packet or a call that stops reading delays only its own call, never the
//! others, as it would on one TCP connection.
//!
//! - A session is an extended CONNECT to `/ws?protocol=streambridge.v2.proto`
//!   (or `.json`; a `token` parameter where the client cannot send an
//!   `Authorization` header, as browsers cannot). Its origin and token are
//!   checked exactly as for the WebSocket ([`websocket::admit`]); a refused
//!   session is accepted, told the code and reason in a CLOSE frame on its
//!   control stream ([`close_code`]), and closed: browsers show neither an
//!   HTTP status nor a QUIC close's reason, but they read streams.
//! - The server opens one unidirectional stream at once, the session's
//!   control stream: it carries what belongs to no call (`goaway`).
//! - Each call is a bidirectional stream the client opens, carrying v2 with
//!   exactly one call: the stream *is* a v2 connection to the call machine
//!   (the same code as a WebSocket's: credit, deadlines, cancel, errors,
//!   limits), framed as [`wire`] says.
//! - Limits: sessions (`--webtransport-max-sessions`), streams open at once
//!   per session (`--ws-max-calls`: QUIC's own stream limit, a client
//!   cannot open more until one ends), frame size (`--max-message-size`
//!   plus room for the records, as a WebSocket message).
//! - Drain: `goaway` on every control stream (and on each live stream, by
//!   its machine); a session ends once its streams have, within
//!   `--drain-timeout`.

mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::response::Response;
use bytes::Bytes;
use futures_util::SinkExt;
use http::StatusCode;
use http_body_util::BodyExt;
use streambridge_protocol::v2::Encoding;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use wtransport::endpoint::IncomingSession;
use wtransport::endpoint::endpoint_side::Server as ServerSide;
use wtransport::{Connection, Endpoint, Identity, ServerConfig, VarInt};

use self::wire::{StreamCodec, StreamFrame, StreamWire};
use crate::config::Config;
use crate::ops::shutdown::DrainCheck;
use crate::policy::auth::{Authenticated, BEARER_SUBPROTOCOL_PREFIX};
use crate::policy::origin::origin_address;
use crate::transport::websocket::{self, Protocol, SocketContext, WebSocketState};
use crate::transport::{Transport, query_param};

/// Session close codes (WebTransport application error codes), each with a
/// reason: the HTTP status a WebSocket upgrade would have been refused with,
/// plus 4000 (as the WebSocket close codes the server sends for refusals).
pub fn close_code(status: StatusCode) -> u32 {
    4000 + u32::from(status.as_u16())
}

/// The session ended normally (the server drained, or the client left).
const CLOSE_NORMAL: u32 = 0;

/// The bound UDP endpoint, before it serves.
pub struct WebTransportEndpoint(Endpoint<ServerSide>);

impl WebTransportEndpoint {
    /// Binds `--webtransport-listen` with the certificate of `--tls-cert`.
    pub async fn bind(config: &Config, addr: SocketAddr) -> Result<WebTransportEndpoint, String> {
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            return Err("--webtransport-listen needs --tls-cert and --tls-key (WebTransport is always TLS)".into());
        };
        let identity = Identity::load_pemfiles(cert, key)
            .await
            .map_err(|error| format!("--tls-cert/--tls-key for WebTransport: {error}"))?;
        let mut transport = wtransport::quinn::TransportConfig::default();
        // A call is a stream: the session's stream limit is its call limit
        // (plus the stream of the session's CONNECT itself).
        let streams = u32::try_from(config.ws_max_calls).unwrap_or(u32::MAX).saturating_add(1);
        transport.max_concurrent_bidi_streams(wtransport::quinn::VarInt::from_u32(streams));
        transport.max_idle_timeout(Some(
            config
                .ws_ping_interval
                .saturating_mul(2)
                .try_into()
                .map_err(|_| "--ws-ping-interval is too long for a QUIC idle timeout".to_string())?,
        ));
        transport.keep_alive_interval(Some(config.ws_ping_interval));
        let server_config = ServerConfig::builder()
            .with_bind_address(addr)
            .with_custom_transport(identity, transport)
            .build();
        Endpoint::server(server_config)
            .map(WebTransportEndpoint)
            .map_err(|error| format!("--webtransport-listen {addr}: {error}"))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// What sessions share.
#[derive(Clone)]
pub struct WebTransportState {
    sockets: WebSocketState,
    /// The stream machines' context: one call per stream.
    context: Arc<SocketContext>,
    max_sessions: usize,
    live: Arc<AtomicUsize>,
    close_timeout: Duration,
    /// A stream's first frame comes within this (`--request-body-timeout`).
    first_frame_within: Duration,
}

impl WebTransportState {
    pub fn new(config: &Config, sockets: WebSocketState) -> WebTransportState {
        let mut settings = (*sockets.context.settings).clone();
        settings.max_calls = 1;
        settings.single_call = true;
        let context = Arc::new(SocketContext {
            settings: Arc::new(settings),
            transport: Transport::WebTransport,
            ..(*sockets.context).clone()
        });
        WebTransportState {
            close_timeout: config.ws_close_timeout,
            first_frame_within: config.request_body_timeout,
            max_sessions: config.webtransport_max_sessions,
            live: Arc::default(),
            context,
            sockets,
        }
    }
}

/// Accepts sessions until `shutdown`, then refuses new ones until those
/// open have drained. Sessions run on the server's tasks too, so the drain
/// waits for them.
pub async fn serve(endpoint: WebTransportEndpoint, state: WebTransportState, shutdown: CancellationToken) {
    let endpoint = endpoint.0;
    let sessions = tokio_util::task::TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = shutdown.cancelled() => break,
        };
        let span = tracing::debug_span!("webtransport", peer = %incoming.remote_address());
        let session = sessions.track_future(session(incoming, state.clone()).instrument(span));
        state.sockets.tasks.spawn(session);
    }
    // Not `Endpoint::close`: that would end the sessions still draining.
    sessions.close();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => incoming.refuse(),
            () = sessions.wait() => return,
        }
    }
}

/// Counts a live session; uncounts it when dropped.
struct SessionSlot(Arc<AtomicUsize>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn session(incoming: IncomingSession, state: WebTransportState) {
    let request = match incoming.await {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(%error, "WebTransport handshake failed");
            return;
        }
    };
    let slot = SessionSlot(state.live.clone());
    let over_limit = state.live.fetch_add(1, Ordering::Relaxed) >= state.max_sessions;
    let parts = request_parts(request.authority(), request.path(), request.headers());
    let peer = request.remote_address().ip();
    let admitted = admit(&state, &parts, peer, over_limit).await;
    let Ok(connection) = request.accept().await else { return };
    let (encoding, who) = match admitted {
        Ok(admitted) => admitted,
        Err((status, reason)) => {
            refuse(&connection, status, reason.trim_end(), state.close_timeout).await;
            return;
        }
    };
    let _slot = slot;
    run_session(connection, encoding, who, state).await;
}

/// Ends a refused session: a CLOSE frame with the code and reason on its
/// control stream (browsers show neither the code nor the reason of a QUIC
/// close, but they read streams), then the client's own close is awaited
/// (a browser drops what it has not read yet when the connection closes),
/// at most `timeout`, before the QUIC close with the same code and reason.
async fn refuse(connection: &Connection, status: StatusCode, reason: &str, timeout: Duration) {
    let code = close_code(status);
    let _ = tokio::time::timeout(timeout, async {
        let told = async {
            let mut frames = control_stream(connection).await?;
            let close_frame = StreamFrame::Close(u16::try_from(code).unwrap_or(u16::MAX), reason.to_string());
            frames.send(close_frame).await.ok()?;
            frames.into_inner().finish().await.ok()
        };
        if told.await.is_some() {
            connection.closed().await;
        }
    })
    .await;
    connection.close(VarInt::from_u32(code), reason.as_bytes());
}

/// Opens the session's control stream (the server writes only: no frame
/// is read, so no payload limit).
async fn control_stream(connection: &Connection) -> Option<FramedWrite<wtransport::SendStream, StreamCodec>> {
    let stream = connection.open_uni().await.ok()?.await.ok()?;
    Some(FramedWrite::new(stream, StreamCodec::new(0)))
}

/// The session's protocol and caller, or the status a WebSocket upgrade
/// would have been refused with and why.
async fn admit(
    state: &WebTransportState,
    parts: &http::request::Parts,
    peer: std::net::IpAddr,
    over_limit: bool,
) -> Result<(Encoding, Authenticated), (StatusCode, String)> {
    if parts.uri.path() != "/ws" {
        return Err((
            StatusCode::NOT_FOUND,
            format!("no WebTransport endpoint at {}: it is /ws", parts.uri.path()),
        ));
    }
    let query = |name: &str| query_param(parts.uri.query(), name);
    let encoding = match query("protocol").and_then(Encoding::from_name) {
        Some(encoding) => encoding,
        None => {
            return Err((
                StatusCode::BAD_REQUEST,
                "name the protocol: /ws?protocol=streambridge.v2.proto (or streambridge.v2.json)".into(),
            ));
        }
    };
    if over_limit {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this server holds its limit of {} WebTransport sessions (--webtransport-max-sessions)",
                state.max_sessions
            ),
        ));
    }
    // The token as the WebSocket's subprotocol entry carries it: one check for both.
    // Percent-decoded: a page puts it in the URL with `encodeURIComponent`.
    let offered = query("token").map(|token| {
        let token = percent_encoding::percent_decode_str(token).decode_utf8_lossy();
        format!("{BEARER_SUBPROTOCOL_PREFIX}{token}")
    });
    let offered: Vec<&str> = offered.iter().map(String::as_str).collect();
    let how_to_send = "send `Authorization: Bearer <token>`, or the token as the session URL's `token` parameter";
    let caller = match websocket::admit(&state.sockets, parts, &offered, how_to_send).await {
        Ok(caller) => caller,
        Err(refusal) => return Err(refusal_text(refusal).await),
    };
    let client = state.sockets.auth.limits().client_address(Some(peer), &parts.headers);
    Ok((encoding, Authenticated { caller, client }))
}

/// An HTTP refusal's status and body text.
async fn refusal_text(refusal: Response) -> (StatusCode, String) {
    let status = refusal.status();
    let body = refusal
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The host the origin check takes for the server's own. A session's
/// authority names the UDP port, never the TCP port the page came from, so
/// an origin on the session's host (any port) counts as the server's own
/// page; other origins are checked against `--allowed-origin` as for a
/// WebSocket.
fn page_host<'a>(authority: &'a str, origin: Option<&'a String>) -> &'a str {
    let host_of = |address: &'a str| match address.rsplit_once(':') {
        // An IPv6 literal's colons are inside brackets.
        Some((host, port)) if !port.contains(']') => host,
        _ => address,
    };
    match origin.and_then(|origin| origin_address(origin)) {
        Some(address) if host_of(address).eq_ignore_ascii_case(host_of(authority)) => address,
        _ => authority,
    }
}

/// The session request as the HTTP request the WebSocket checks read.
fn request_parts(
    authority: &str,
    path: &str,
    headers: &std::collections::HashMap<String, String>,
) -> http::request::Parts {
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(path)
        .header(http::header::HOST, page_host(authority, headers.get("origin")));
    for (name, value) in headers {
        if !name.starts_with(':')
            && let (Ok(name), Ok(value)) = (
                http::HeaderName::try_from(name.as_str()),
                http::HeaderValue::try_from(value.as_str()),
            )
        {
            request = request.header(name, value);
        }
    }
    request
        .body(())
        .unwrap_or_else(|_| http::Request::new(()))
        .into_parts()
        .0
}

/// An admitted session: its control stream, then a call machine for every
/// stream the client opens, until the client closes it or the drain ends it.
async fn run_session(connection: Connection, encoding: Encoding, who: Authenticated, state: WebTransportState) {
    let Some(mut control) = control_stream(&connection).await else {
        return;
    };
    // Admitted: an empty batch says so. A browser's `ready` resolves for
    // refused sessions too (they are answered 200 and told on this stream),
    // so a client counts the session open only at this first BATCH.
    let accepted = match encoding {
        Encoding::Proto => Bytes::new(),
        Encoding::Json => Bytes::from_static(b"[]"),
    };
    if control.send(StreamFrame::Batch(accepted)).await.is_err() {
        return;
    }
    let streams = tokio_util::task::TaskTracker::new();
    let mut drain = DrainCheck::new(&state.sockets.drain);
    let max_payload = state.context.settings.largest_batch();
    loop {
        tokio::select! {
            accepted = connection.accept_bi() => {
                let Ok((send, recv)) = accepted else { break };
                let stream = wtransport::stream::BiStream::join((send, recv));
                let wire = StreamWire::new(stream, encoding, max_payload, state.first_frame_within);
                let (context, drain, who) = (state.context.clone(), state.sockets.drain.clone(), who.clone());
                streams.spawn(async move {
                    websocket::run_v2(wire, Protocol::V2(encoding), context, &drain, who).await;
                });
            }
            () = std::future::poll_fn(|cx| drain.poll_idle(cx)) => {
                let goaway = websocket::goaway_batch(encoding, "server shutting down");
                let _ = control.send(StreamFrame::Batch(goaway)).await;
                // Calls still live finish on their streams (their machines
                // watch the drain too); new streams find the drain started.
                streams.close();
                tokio::select! {
                    () = streams.wait() => {}
                    _ = connection.closed() => return,
                }
                // What the streams wrote is the client's to read: it closes
                // the session once it has (bounded).
                let _ = tokio::time::timeout(state.close_timeout, connection.closed()).await;
                connection.close(VarInt::from_u32(CLOSE_NORMAL), b"server shutting down");
                return;
            }
        }
    }
    // The client closed the session: its streams end with it.
    streams.close();
    streams.wait().await;
}

#[cfg(test)]
mod tests {
    use super::page_host;

    #[test]
    fn a_page_on_the_sessions_host_is_the_servers_own_at_any_port() {
        let origin = |value: &str| Some(value.to_string());
        assert_eq!(
            page_host("127.0.0.1:4433", origin("https://127.0.0.1:8443").as_ref()),
            "127.0.0.1:8443"
        );
        assert_eq!(
            page_host("example.com:443", origin("https://EXAMPLE.com").as_ref()),
            "EXAMPLE.com"
        );
        assert_eq!(
            page_host("[::1]:4433", origin("http://[::1]:8080").as_ref()),
            "[::1]:8080"
        );
        // Another host, or no origin: the session's authority, which no page has.
        assert_eq!(
            page_host("example.com:443", origin("https://evil.example").as_ref()),
            "example.com:443"
        );
        assert_eq!(
            page_host("example.com:443", origin("https://example.com.evil:443").as_ref()),
            "example.com:443"
        );
        assert_eq!(page_host("example.com:443", None), "example.com:443");
    }
}
