//! The WebSocket bridge at `/ws`: the HTTP upgrade, the subprotocol choice
//! and the origin check. Every accepted socket runs on one call machine
//! ([`v2`]): protocol v2's many calls (`docs/protocol-v2.md`), or
//! protocol v1's one ([`v1`], `docs/websocket-protocol.md`).
//!
//! The upgrade is done here with hyper and tokio-tungstenite rather than
//! axum's `WebSocketUpgrade` because the call needs the raw connection at its
//! very end: after a frame over the size limit, tungstenite can no longer
//! parse the stream, and the rest of the peer's bytes must be discarded (not
//! buffered, not left unread: unread data turns our close into a TCP reset
//! that destroys the status frame the client has not read yet).

mod v1;
mod v2;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::header::{
    CONNECTION, ORIGIN, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION,
    UPGRADE, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use hyper_util::rt::TokioIo;
use streambridge_protocol::Subprotocol;
use streambridge_protocol::v2::Encoding;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::net::listener::{ConnectionLease, PeerAddr};
use crate::ops::metrics::Refused;
use crate::ops::shutdown::Drain;
use crate::policy::auth::{Auth, Authenticated, BEARER_SUBPROTOCOL_PREFIX, Caller, Refusal};
use crate::policy::origin::OriginPolicy;
use crate::transport::http_session::{self, HttpSessions};

pub use v2::SocketContext;
pub(crate) use v2::{Closing, Wire, goaway_batch, run as run_v2};

/// The subprotocols of both protocol versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    V1(Subprotocol),
    V2(Encoding),
}

impl Protocol {
    const ALL: [Protocol; 4] = [
        Protocol::V2(Encoding::Json),
        Protocol::V2(Encoding::Proto),
        Protocol::V1(Subprotocol::Json),
        Protocol::V1(Subprotocol::Proto),
    ];

    fn name(self) -> &'static str {
        match self {
            Protocol::V1(subprotocol) => subprotocol.name(),
            Protocol::V2(encoding) => encoding.name(),
        }
    }

    fn from_name(name: &str) -> Option<Protocol> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// What the WebSocket transport needs from the server; cheap to clone.
#[derive(Clone)]
pub struct WebSocketState {
    /// Which pages may open sockets.
    pub origins: OriginPolicy,
    /// The bearer token, if any.
    pub auth: Auth,
    /// The server's drain, as every socket watches it.
    pub drain: Drain,
    /// Where sockets run, so the drain can wait for them.
    pub tasks: TaskTracker,
    /// The backend calls are made on, and the sockets' limits.
    pub context: Arc<SocketContext>,
    /// Whether the built-in `DataService` runs in this process: protocol v1
    /// carries only that service, so without it a v1 upgrade is refused
    /// rather than answered by a service the server does not offer.
    pub v1_available: bool,
    /// Protocol v2's sessions over plain HTTP, also at `/ws`.
    pub http_sessions: HttpSessions,
}

/// Answers `GET /ws`: refuses what cannot become a call with a plain HTTP
/// error that says why, and otherwise switches protocols and starts the call.
pub async fn upgrade(State(state): State<WebSocketState>, mut request: Request) -> Response {
    if http_session::is_for_http_session(&request) {
        return if request.method() == Method::POST {
            http_session::post(state, request).await
        } else {
            http_session::open(state, request).await
        };
    }
    let key = match check_handshake(request.version(), request.method(), request.headers()) {
        Ok(key) => key,
        Err(refusal) => return refusal,
    };
    let (parts, body) = request.into_parts();
    let offered = offered_subprotocols(&parts.headers);
    let caller = match admit(
        &state,
        &parts,
        &offered,
        "send `Authorization: Bearer <token>` or offer the subprotocol `streambridge.bearer.<token>` beside the real one",
    )
    .await
    {
        Ok(caller) => caller,
        Err(refusal) => return refusal,
    };
    let (protocol, echoed) = match choose_subprotocol(&offered) {
        Ok(choice) => choice,
        Err(refusal) => return refusal,
    };
    if let Protocol::V1(subprotocol) = protocol
        && !state.v1_available
    {
        let message = format!(
            "WebSocket protocol v1 ({}) carries only the built-in DataService, which this server does not run \
             (it serves an upstream or its own services)\n",
            subprotocol.name()
        );
        return (StatusCode::NOT_IMPLEMENTED, message).into_response();
    }
    let peer = parts.extensions.get::<PeerAddr>().copied();
    let client = state
        .auth
        .limits()
        .client_address(peer.map(|peer| peer.0.ip()), &parts.headers);
    // v1 has one method, one call: the policy and the call rate are asked at the upgrade.
    if let Protocol::V1(_) = protocol
        && let Err(status) = state.auth.admit(v2::BUILTIN_METHOD, &caller, client)
    {
        let message = format!("{}\n", status.message());
        return match status.code() {
            tonic::Code::Unauthenticated => {
                (StatusCode::UNAUTHORIZED, [(WWW_AUTHENTICATE, "Bearer")], message).into_response()
            }
            tonic::Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, message).into_response(),
            _ => (StatusCode::FORBIDDEN, message).into_response(),
        };
    }
    let who = Authenticated { caller, client };
    let lease = parts.extensions.get::<ConnectionLease>().cloned();
    request = Request::from_parts(parts, body);
    let on_upgrade = hyper::upgrade::on(&mut request);

    // Debug level: a span enabled at info would cost every open socket memory.
    let span = tracing::debug_span!("websocket", peer = ?peer.map(|p| p.0), subprotocol = protocol.name());
    let context = state.context.clone();
    let drain = state.drain.clone();
    let settings = &context.settings;
    let largest = match protocol {
        Protocol::V1(_) => settings.max_message_size,
        Protocol::V2(_) => settings.largest_batch(),
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(settings.read_buffer_size)
        .write_buffer_size(settings.write_buffer_size)
        .max_message_size(Some(largest))
        .max_frame_size(Some(largest));
    let socket_task = async move {
        let Some(socket) = accept(on_upgrade, config).await else {
            return;
        };
        // The upgraded socket outlives hyper's connection: it keeps the lease.
        let _lease = lease;
        v2::run(socket, protocol, context, &drain, who).await;
    }
    .instrument(span);
    state.tasks.spawn(socket_task);

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(SEC_WEBSOCKET_ACCEPT, key);
    if let Some(protocol) = echoed {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol.name()));
    }
    response
}

/// Whether the page's origin may use `/ws` (a request without `Origin` is
/// no browser page's); the refusal is the HTTP answer.
#[allow(clippy::result_large_err)] // the refusal is the response itself
pub(crate) fn check_origin(state: &WebSocketState, parts: &http::request::Parts) -> Result<(), Response> {
    match parts.headers.get(ORIGIN) {
        Some(origin) if !state.origins.allows(origin, parts) => {
            let origin = String::from_utf8_lossy(origin.as_bytes());
            let message = format!("origin {origin} may not open connections here; see --allowed-origin\n");
            Err((StatusCode::FORBIDDEN, message).into_response())
        }
        _ => Ok(()),
    }
}

/// What every connection at `/ws` must pass, whichever transport carries
/// it: its page's origin and its token (`how_to_send` tells a refused
/// client how to send one). The refusal is the HTTP answer.
#[allow(clippy::result_large_err)] // the refusal is the response itself
pub(crate) async fn admit(
    state: &WebSocketState,
    parts: &http::request::Parts,
    offered: &[&str],
    how_to_send: &str,
) -> Result<Caller, Response> {
    check_origin(state, parts)?;
    let mut authenticated = state.auth.authenticate_upgrade(&parts.headers, offered.iter().copied());
    // A key rotated in at the JWKS URL: checked again once the set is fetched.
    if let (
        Err(Refusal {
            keys_fetching: true, ..
        }),
        Some(jwt),
    ) = (&authenticated, state.auth.jwt())
    {
        jwt.keys_fetched().await;
        authenticated = state.auth.authenticate_upgrade(&parts.headers, offered.iter().copied());
    }
    match authenticated {
        Ok(caller) => Ok(caller),
        // No token at all: a connection may still call the methods open to anyone.
        Err(Refusal { missing: true, .. }) if state.auth.opens_sockets_to_anyone() => Ok(Caller::Anonymous),
        Err(Refusal { why, .. }) => {
            state.auth.refused(Refused::Unauthenticated);
            let message = format!("{why}: {how_to_send}\n");
            Err((StatusCode::UNAUTHORIZED, [(WWW_AUTHENTICATE, "Bearer")], message).into_response())
        }
    }
}

/// The WebSocket on the upgraded connection, once hyper hands it over.
async fn accept(
    on_upgrade: hyper::upgrade::OnUpgrade,
    config: WebSocketConfig,
) -> Option<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>> {
    match on_upgrade.await {
        Ok(upgraded) => {
            Some(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await)
        }
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            None
        }
    }
}

/// Checks that a request is a WebSocket (version 13) upgrade; returns the
/// `Sec-WebSocket-Accept` value for it.
#[allow(clippy::result_large_err)] // the refusal is the response itself
fn check_handshake(version: Version, method: &Method, headers: &HeaderMap) -> Result<HeaderValue, Response> {
    let refuse = |status: StatusCode, why: &str| (status, format!("{why}\n")).into_response();
    if version < Version::HTTP_11 {
        // RFC 6455 4.1: the opening handshake is an HTTP/1.1 request.
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade needs HTTP/1.1; this request is HTTP/1.0",
        ));
    }
    if method != Method::GET {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "/ws accepts only GET with a WebSocket upgrade",
        ));
    }
    let has_token = |name, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(CONNECTION, "upgrade") || !has_token(UPGRADE, "websocket") {
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "/ws is a WebSocket endpoint: send `Connection: upgrade` and `Upgrade: websocket`",
        ));
    }
    if headers.get(SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        let mut response = refuse(StatusCode::UPGRADE_REQUIRED, "only WebSocket version 13 is supported");
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return Err(response);
    }
    let Some(key) = headers.get(SEC_WEBSOCKET_KEY) else {
        return Err(refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"));
    };
    // RFC 6455 4.1: the key is 16 random bytes, base64-encoded.
    let decoded = base64::engine::general_purpose::STANDARD.decode(key.as_bytes());
    if !matches!(decoded, Ok(bytes) if bytes.len() == 16) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be 16 bytes, base64-encoded (RFC 6455, section 4.1)",
        ));
    }
    let accept = derive_accept_key(key.as_bytes());
    Ok(HeaderValue::from_str(&accept).expect("base64 is a valid header value"))
}

/// Every name in the `Sec-WebSocket-Protocol` headers, in the client's order.
fn offered_subprotocols(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect()
}

/// Picks the first subprotocol the client offers that the server speaks. A
/// client that offers none gets json (and no `Sec-WebSocket-Protocol` in the
/// answer, as RFC 6455 requires); one that offers only unknown ones gets 400.
/// Token entries (`streambridge.bearer.…`) are credentials, not choices: they
/// are skipped, and never repeated in an error.
#[allow(clippy::result_large_err)] // the refusal is the response itself
fn choose_subprotocol(offered: &[&str]) -> Result<(Protocol, Option<Protocol>), Response> {
    let names: Vec<&str> = offered
        .iter()
        .copied()
        .filter(|name| !name.starts_with(BEARER_SUBPROTOCOL_PREFIX))
        .collect();
    if offered.is_empty() {
        return Ok((Protocol::V1(Subprotocol::Json), None));
    }
    if let Some(chosen) = names.iter().find_map(|name| Protocol::from_name(name)) {
        return Ok((chosen, Some(chosen)));
    }
    let supported: Vec<_> = Protocol::ALL.iter().map(|p| p.name()).collect();
    let message = format!(
        "none of the offered WebSocket subprotocols ({}) is supported; supported: {}\n",
        if names.is_empty() {
            "only a token".to_string()
        } else {
            names.join(", ")
        },
        supported.join(", ")
    );
    Err((StatusCode::BAD_REQUEST, message).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn the_first_supported_offer_of_the_client_wins() {
        let offers = offer(&["chat, streambridge.v1.proto", "streambridge.v1.json"]);
        let (chosen, echoed) = choose_subprotocol(&offered_subprotocols(&offers)).unwrap();
        assert_eq!(chosen, Protocol::V1(Subprotocol::Proto));
        assert_eq!(echoed, Some(Protocol::V1(Subprotocol::Proto)));
    }

    #[test]
    fn no_offer_means_json_without_echo() {
        let (chosen, echoed) = choose_subprotocol(&[]).unwrap();
        assert_eq!((chosen, echoed), (Protocol::V1(Subprotocol::Json), None));
    }

    #[test]
    fn token_entries_are_skipped_and_never_echoed_in_errors() {
        let offers = offer(&["streambridge.bearer.secret, streambridge.v1.proto"]);
        let (chosen, _) = choose_subprotocol(&offered_subprotocols(&offers)).unwrap();
        assert_eq!(chosen, Protocol::V1(Subprotocol::Proto));
        let v2 = offer(&["streambridge.v2.proto, streambridge.v1.json"]);
        let (chosen, _) = choose_subprotocol(&offered_subprotocols(&v2)).unwrap();
        assert_eq!(
            chosen,
            Protocol::V2(Encoding::Proto),
            "the first offer the server knows wins"
        );
        let only_token = offer(&["streambridge.bearer.secret"]);
        assert!(choose_subprotocol(&offered_subprotocols(&only_token)).is_err());
    }

    #[test]
    fn only_unknown_offers_are_refused_with_400() {
        let offers = offer(&["chat, mqtt"]);
        let refusal = choose_subprotocol(&offered_subprotocols(&offers)).unwrap_err();
        assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
    }
}
