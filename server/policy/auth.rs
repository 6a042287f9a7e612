//! Optional bearer-token authentication (`--auth-token`, `--auth-token-file`),
//! checked the same way on every transport before any stream starts:
//!
//! - native gRPC and gRPC-Web: the `authorization: Bearer <token>` header
//!   (gRPC metadata is a header); refused with UNAUTHENTICATED;
//! - WebSocket: browsers cannot set headers on the handshake, so the token
//!   may also travel as one entry of the subprotocol list,
//!   `streambridge.bearer.<token>`, beside the real subprotocol (non-browser
//!   clients may use the header); refused with HTTP 401 before the upgrade.
//!
//! Tokens are compared in constant time. The token never appears in logs.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, Request, Response};

/// Prefix of the subprotocol entry that carries a token.
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "streambridge.bearer.";

/// The token clients must present, or none if authentication is off.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    token: Option<Arc<str>>,
}

impl Auth {
    pub fn new(token: Option<String>) -> Self {
        Auth {
            token: token.map(Arc::from),
        }
    }

    /// Whether a request with these headers may start a gRPC call.
    pub fn allows_headers(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.token else { return true };
        headers
            .get_all(AUTHORIZATION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .filter_map(bearer)
            .any(|presented| same_token(presented, expected))
    }

    /// Whether a WebSocket upgrade may proceed: the header, or a
    /// `streambridge.bearer.<token>` subprotocol entry.
    pub fn allows_upgrade<'a>(&self, headers: &HeaderMap, offered: impl IntoIterator<Item = &'a str>) -> bool {
        let Some(expected) = &self.token else { return true };
        self.allows_headers(headers)
            || offered
                .into_iter()
                .filter_map(|name| name.strip_prefix(BEARER_SUBPROTOCOL_PREFIX))
                .any(|presented| same_token(presented, expected))
    }
}

/// The credentials of an `authorization: Bearer <token>` value.
fn bearer(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

fn same_token(presented: &str, expected: &str) -> bool {
    constant_time_eq::constant_time_eq(presented.as_bytes(), expected.as_bytes())
}

impl Auth {
    /// `inner` (the gRPC services) behind the token: a call to any method but
    /// health and reflection must present it, else it is refused with
    /// UNAUTHENTICATED. The token is taken out of the request either way, so
    /// no service behind the bridge (in process or upstream) ever sees it.
    pub fn require_token<S>(&self, inner: S) -> RequireToken<S> {
        RequireToken {
            auth: self.clone(),
            inner,
        }
    }

    /// Removes the `authorization` values that carry this token.
    fn strip_token(&self, headers: &mut HeaderMap) {
        let Some(expected) = &self.token else { return };
        if !headers.contains_key(AUTHORIZATION) {
            return;
        }
        let others: Vec<HeaderValue> = headers
            .get_all(AUTHORIZATION)
            .iter()
            .filter(|value| {
                !value
                    .to_str()
                    .ok()
                    .and_then(bearer)
                    .is_some_and(|t| same_token(t, expected))
            })
            .cloned()
            .collect();
        headers.remove(AUTHORIZATION);
        for value in others {
            headers.append(AUTHORIZATION, value);
        }
    }
}

/// Marks a request made by the server itself for a client it has already
/// authenticated (a WebSocket v2 call: the socket's upgrade was checked).
/// Only server code can put it in a request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct Authenticated;

/// gRPC services that reveal no data and that tools call without
/// credentials (load balancers, grpcurl).
fn is_public_method(path: &str) -> bool {
    [
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ]
    .iter()
    .any(|prefix| path.starts_with(prefix))
}

/// See [`Auth::require_token`].
#[derive(Clone, Debug)]
pub struct RequireToken<S> {
    auth: Auth,
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for RequireToken<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::Either<S::Future, std::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        use futures_util::future::Either;
        let authenticated = request.extensions().get::<Authenticated>().is_some();
        if !authenticated && !is_public_method(request.uri().path()) && !self.auth.allows_headers(request.headers()) {
            let status = tonic::Status::unauthenticated(
                "missing or invalid bearer token: send the metadata `authorization: Bearer <token>`",
            );
            return Either::Right(std::future::ready(Ok(status.into_http())));
        }
        self.auth.strip_token(request.headers_mut());
        Either::Left(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, authorization.parse().unwrap());
        headers
    }

    #[test]
    fn without_a_token_everything_is_allowed() {
        assert!(Auth::new(None).allows_headers(&HeaderMap::new()));
    }

    #[test]
    fn the_bearer_header_must_carry_the_exact_token() {
        let auth = Auth::new(Some("s3cret".into()));
        assert!(auth.allows_headers(&headers("Bearer s3cret")));
        assert!(!auth.allows_headers(&headers("Bearer s3cre")));
        assert!(!auth.allows_headers(&headers("Basic s3cret")));
        assert!(!auth.allows_headers(&HeaderMap::new()));
    }

    #[test]
    fn a_websocket_may_carry_the_token_as_a_subprotocol_entry() {
        let auth = Auth::new(Some("s3cret".into()));
        assert!(auth.allows_upgrade(
            &HeaderMap::new(),
            ["streambridge.v1.proto", "streambridge.bearer.s3cret"]
        ));
        assert!(!auth.allows_upgrade(&HeaderMap::new(), ["streambridge.v1.proto", "streambridge.bearer.nope"]));
        assert!(!auth.allows_upgrade(&HeaderMap::new(), ["streambridge.v1.proto"]));
    }
}
