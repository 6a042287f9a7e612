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

use http::HeaderMap;
use http::header::AUTHORIZATION;

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
            .filter_map(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .any(|presented| same_token(presented.trim(), expected))
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

fn same_token(presented: &str, expected: &str) -> bool {
    constant_time_eq::constant_time_eq(presented.as_bytes(), expected.as_bytes())
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.allows_headers(&request.metadata().clone().into_headers()) {
            Ok(request)
        } else {
            Err(tonic::Status::unauthenticated(
                "missing or invalid bearer token: send the metadata `authorization: Bearer <token>`",
            ))
        }
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
