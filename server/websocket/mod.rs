//! The WebSocket bridge at `/ws` (protocol v1, `docs/websocket-protocol.md`):
//! the HTTP upgrade, the subprotocol choice and the origin check. Each
//! accepted socket carries one bidirectional call, run by [`call`].
//!
//! The upgrade is done here with hyper and tokio-tungstenite rather than
//! axum's `WebSocketUpgrade` because the call needs the raw connection at its
//! very end: after a frame over the size limit, tungstenite can no longer
//! parse the stream, and the rest of the peer's bytes must be discarded (not
//! buffered, not left unread: unread data turns our close into a TCP reset
//! that destroys the status frame the client has not read yet).

mod call;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{
    CONNECTION, ORIGIN, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use hyper_util::rt::TokioIo;
use streambridge_protocol::Subprotocol;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument;

use crate::AppState;
use crate::listener::PeerAddr;

pub use call::CallSettings;

/// Answers `GET /ws`: refuses what cannot become a call with a plain HTTP
/// error that says why, and otherwise switches protocols and starts the call.
pub async fn upgrade(State(state): State<AppState>, mut request: Request) -> Response {
    let key = match check_handshake(request.method(), request.headers()) {
        Ok(key) => key,
        Err(refusal) => return refusal,
    };
    let (parts, body) = request.into_parts();
    if let Some(origin) = parts.headers.get(ORIGIN)
        && !state.origins.allows(origin, &parts)
    {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        let message = format!("origin {origin} may not open WebSockets here; see --allowed-origin\n");
        return (StatusCode::FORBIDDEN, message).into_response();
    }
    let offered = parts.headers.get_all(SEC_WEBSOCKET_PROTOCOL);
    let (subprotocol, echoed) = match choose_subprotocol(offered.iter()) {
        Ok(choice) => choice,
        Err(refusal) => return refusal,
    };
    let peer = parts.extensions.get::<PeerAddr>().copied();
    request = Request::from_parts(parts, body);
    let on_upgrade = hyper::upgrade::on(&mut request);

    let span = tracing::info_span!("websocket", peer = ?peer.map(|p| p.0), %subprotocol);
    let settings = state.websocket.clone();
    let calls = state.calls.clone();
    let shutdown = state.shutdown.clone();
    state.tasks.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(error) => return tracing::debug!(%error, "upgrade did not complete"),
            };
            let config = WebSocketConfig::default()
                .read_buffer_size(settings.read_buffer_size)
                .write_buffer_size(settings.write_buffer_size)
                .max_message_size(Some(settings.max_message_size))
                .max_frame_size(Some(settings.max_message_size));
            let socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
            let _call = calls.enter(crate::calls::Transport::WebSocket);
            call::run(socket, subprotocol, &settings, shutdown).await;
        }
        .instrument(span),
    );

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

/// Checks that a request is a WebSocket (version 13) upgrade; returns the
/// `Sec-WebSocket-Accept` value for it.
#[allow(clippy::result_large_err)] // the refusal is the response itself
fn check_handshake(method: &Method, headers: &HeaderMap) -> Result<HeaderValue, Response> {
    let refuse = |status: StatusCode, why: &str| (status, format!("{why}\n")).into_response();
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
    let accept = derive_accept_key(key.as_bytes());
    Ok(HeaderValue::from_str(&accept).expect("base64 is a valid header value"))
}

/// Picks the first subprotocol the client offers that the server speaks. A
/// client that offers none gets json (and no `Sec-WebSocket-Protocol` in the
/// answer, as RFC 6455 requires); one that offers only unknown ones gets 400.
#[allow(clippy::result_large_err)] // the refusal is the response itself
fn choose_subprotocol<'a>(
    offered: impl Iterator<Item = &'a HeaderValue>,
) -> Result<(Subprotocol, Option<Subprotocol>), Response> {
    let mut names = offered
        .flat_map(|value| value.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .peekable();
    if names.peek().is_none() {
        return Ok((Subprotocol::Json, None));
    }
    let mut unknown = Vec::new();
    for name in names {
        match Subprotocol::from_name(name) {
            Some(chosen) => return Ok((chosen, Some(chosen))),
            None => unknown.push(name.to_string()),
        }
    }
    let supported: Vec<_> = Subprotocol::ALL.iter().map(|p| p.name()).collect();
    let message = format!(
        "none of the offered WebSocket subprotocols ({}) is supported; supported: {}\n",
        unknown.join(", "),
        supported.join(", ")
    );
    Err((StatusCode::BAD_REQUEST, message).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(values: &[&str]) -> Vec<HeaderValue> {
        values.iter().map(|v| HeaderValue::from_str(v).unwrap()).collect()
    }

    #[test]
    fn the_first_supported_offer_of_the_client_wins() {
        let offers = offer(&["chat, streambridge.v1.proto", "streambridge.v1.json"]);
        let (chosen, echoed) = choose_subprotocol(offers.iter()).unwrap();
        assert_eq!(chosen, Subprotocol::Proto);
        assert_eq!(echoed, Some(Subprotocol::Proto));
    }

    #[test]
    fn no_offer_means_json_without_echo() {
        let (chosen, echoed) = choose_subprotocol(std::iter::empty()).unwrap();
        assert_eq!((chosen, echoed), (Subprotocol::Json, None));
    }

    #[test]
    fn only_unknown_offers_are_refused_with_400() {
        let offers = offer(&["chat, mqtt"]);
        let refusal = choose_subprotocol(offers.iter()).unwrap_err();
        assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
    }
}
