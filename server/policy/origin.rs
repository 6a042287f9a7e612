//! Which web origins may use the server from a browser: the WebSocket upgrade
//! check and the CORS policies of gRPC-Web and of the HTTP sessions at `/ws`
//! share this one policy.
//!
//! The server's own origin (the page it serves) is always allowed: an `Origin`
//! whose host and port equal the request's `Host`. Others must be listed
//! (`--allowed-origin`). Requests without `Origin` come from non-browser
//! clients, which the same-origin policy does not concern; they are allowed.

use std::time::Duration;

use http::HeaderValue;
use http::request::Parts;
use tower_http::cors::AllowOrigin;

/// How long a browser may cache a CORS preflight's answer.
pub const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(2 * 60 * 60);

/// The allow-list of origins besides the server's own.
#[derive(Clone, Debug, Default)]
pub struct OriginPolicy {
    allowed: Vec<String>,
    allow_any: bool,
}

impl OriginPolicy {
    /// A policy allowing the server's own origin plus `allowed` (`*` = any).
    pub fn new(allowed: &[String]) -> Self {
        OriginPolicy {
            allow_any: allowed.iter().any(|o| o == "*"),
            allowed: allowed
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether a browser request carrying `origin` may proceed.
    pub fn allows(&self, origin: &HeaderValue, request: &Parts) -> bool {
        let Ok(origin) = origin.to_str() else { return false };
        self.allow_any
            || is_same_origin(origin, request_host(request))
            || self.allowed.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin))
    }

    /// This policy as CORS's: the origins whose pages may read the answers.
    pub fn cors_origins(&self) -> AllowOrigin {
        let policy = self.clone();
        AllowOrigin::predicate(move |origin, request| policy.allows(origin, request))
    }
}

/// The host (and port) the client addressed: `Host` in HTTP/1, `:authority` in HTTP/2.
fn request_host(request: &Parts) -> Option<&str> {
    request
        .headers
        .get(http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .or_else(|| request.uri.authority().map(|a| a.as_str()))
}

fn is_same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    origin_address(origin).is_some_and(|origin_host| origin_host.eq_ignore_ascii_case(host))
}

/// An `http(s)` origin's host and port as a `Host` header names them
/// (`https://example.com:8443` → `example.com:8443`).
pub fn origin_address(origin: &str) -> Option<&str> {
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(host: &str) -> Parts {
        http::Request::get("/ws")
            .header("host", host)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn origin(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).unwrap()
    }

    #[test]
    fn the_servers_own_origin_is_allowed_and_a_foreign_one_is_not() {
        let policy = OriginPolicy::new(&[]);
        assert!(policy.allows(&origin("http://127.0.0.1:8080"), &parts("127.0.0.1:8080")));
        assert!(policy.allows(&origin("https://Example.com"), &parts("example.com")));
        assert!(!policy.allows(&origin("http://evil.example"), &parts("127.0.0.1:8080")));
        assert!(!policy.allows(&origin("http://127.0.0.1:9999"), &parts("127.0.0.1:8080")));
        assert!(!policy.allows(&origin("null"), &parts("127.0.0.1:8080")));
    }

    #[test]
    fn listed_origins_and_the_wildcard_are_allowed() {
        let listed = OriginPolicy::new(&["https://app.example.com/".to_string()]);
        assert!(listed.allows(&origin("https://app.example.com"), &parts("api.example.com")));
        assert!(!listed.allows(&origin("https://other.example.com"), &parts("api.example.com")));
        let any = OriginPolicy::new(&["*".to_string()]);
        assert!(any.allows(&origin("https://anything.example"), &parts("api.example.com")));
    }
}
