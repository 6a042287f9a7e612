//! Authentication, checked the same way on every transport before any
//! stream starts: a shared bearer token (`--auth-token`,
//! `--auth-token-file`), JSON Web Tokens (`--jwt-jwks`, [`super::jwt`]), or
//! both (either passes):
//!
//! - native gRPC and gRPC-Web: the `authorization: Bearer <token>` header
//!   (gRPC metadata is a header); refused with UNAUTHENTICATED;
//! - WebSocket: browsers cannot set headers on the handshake, so the token
//!   may also travel as one entry of the subprotocol list,
//!   `streambridge.bearer.<token>`, beside the real subprotocol, or in the
//!   cookie `--jwt-cookie` names (non-browser clients may use the header);
//!   refused with HTTP 401 before the upgrade. A v2 call may bring its own
//!   token in its `open` metadata (`authorization`), which then stands for
//!   that call instead of the socket's.
//!
//! Which methods need a caller at all, and which claims, is the policy's
//! (`--policy`, [`super::rules`]); without one, every method but health and
//! reflection needs a caller when authentication is on.
//!
//! Shared tokens are compared in constant time. No token appears in logs
//! or in an error.

use std::sync::Arc;
use std::time::Duration;

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderValue, Request, Response};

use crate::net::listener::PeerAddr;
use crate::ops::metrics::{Metrics, Refused};

use super::jwt::{Claims, Identity, JwtVerifier, TokenError};
use super::limits::{MessageMeter, RateLimits};
use super::pace::PacedBody;
use super::rules::{Policy, Verdict};

/// Prefix of the subprotocol entry that carries a token.
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "streambridge.bearer.";

/// How clients prove who they are, and what each method needs; nothing
/// when authentication is off and there is no policy.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    token: Option<Arc<str>>,
    jwt: Option<Arc<JwtVerifier>>,
    policy: Policy,
    limits: RateLimits,
    /// Where refusals are counted (`streambridge_calls_refused_total`).
    metrics: Option<Arc<Metrics>>,
}

/// Who a call is from.
#[derive(Clone, Debug, Default)]
pub enum Caller {
    /// Nobody proven: authentication is off, or no token came.
    #[default]
    Anonymous,
    /// Whoever knows the shared token.
    Token,
    /// The holder of a verified JWT.
    Identity(Arc<Identity>),
}

impl Caller {
    pub fn identity(&self) -> Option<&Arc<Identity>> {
        match self {
            Caller::Identity(identity) => Some(identity),
            _ => None,
        }
    }
}

/// Why a caller was refused: the text the client is told, and whether
/// no token came at all (then the caller may still be anonymous).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub why: String,
    pub missing: bool,
    /// The token names a key the JWKS URL's set may hold once the fetch
    /// under way is done: a caller that can wait tries again then.
    pub keys_fetching: bool,
}

impl Auth {
    pub fn new(token: Option<String>, jwt: Option<JwtVerifier>, policy: Policy) -> Self {
        Auth {
            token: token.map(Arc::from),
            jwt: jwt.map(Arc::new),
            policy,
            limits: RateLimits::default(),
            metrics: None,
        }
    }

    /// The same, counting its refusals in `metrics`.
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Auth {
            metrics: Some(metrics),
            ..self
        }
    }

    /// Counts a refused call.
    pub fn refused(&self, why: Refused) {
        if let Some(metrics) = &self.metrics {
            metrics.call_refused(why);
        }
    }

    /// The same, with rate limits.
    pub fn with_limits(self, limits: RateLimits) -> Self {
        Auth { limits, ..self }
    }

    /// The rate limits (to forget idle buckets, and to find a client's address).
    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// The policy in force (for SIGHUP).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The JWT verifier, when JWTs are accepted.
    pub fn jwt(&self) -> Option<&Arc<JwtVerifier>> {
        self.jwt.as_ref()
    }

    /// Whether JWTs are accepted (`--jwt-jwks`).
    pub fn has_jwt(&self) -> bool {
        self.jwt.is_some()
    }

    /// Whether anything is checked at all.
    pub fn is_on(&self) -> bool {
        self.token.is_some() || self.jwt.is_some()
    }

    /// Who a request with these headers is (anonymous when authentication
    /// is off), or why its token is refused.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        self.authenticate_any(bearers(headers))
    }

    /// [`Auth::authenticate`] for a WebSocket upgrade: the header, a
    /// `streambridge.bearer.<token>` subprotocol entry, or the cookie.
    pub fn authenticate_upgrade<'a>(
        &self,
        headers: &'a HeaderMap,
        offered: impl IntoIterator<Item = &'a str>,
    ) -> Result<Caller, Refusal> {
        let cookie = self
            .jwt
            .as_ref()
            .and_then(|jwt| jwt.settings().cookie.as_deref())
            .and_then(|name| cookie(headers, name));
        let entries = offered
            .into_iter()
            .filter_map(|name| name.strip_prefix(BEARER_SUBPROTOCOL_PREFIX));
        self.authenticate_any(bearers(headers).chain(entries).chain(cookie))
    }

    /// The clock skew allowed on a token's `exp`.
    pub fn leeway(&self) -> Duration {
        self.jwt.as_ref().map_or(Duration::ZERO, |jwt| jwt.settings().leeway)
    }

    /// The first of `presented` that passes; else why the last one was
    /// refused (or that none came).
    fn authenticate_any<'a>(&self, presented: impl Iterator<Item = &'a str>) -> Result<Caller, Refusal> {
        if !self.is_on() {
            return Ok(Caller::Anonymous);
        }
        let mut why = TokenError::Missing;
        for token in presented {
            if let Some(expected) = &self.token
                && same_token(token, expected)
            {
                return Ok(Caller::Token);
            }
            why = match &self.jwt {
                Some(jwt) => match jwt.verify(token) {
                    Ok(identity) => return Ok(Caller::Identity(identity)),
                    Err(error) => error,
                },
                None => TokenError::Signature,
            };
        }
        let missing = why == TokenError::Missing;
        let keys_fetching =
            matches!(why, TokenError::UnknownKey(_)) && self.jwt.as_ref().is_some_and(|jwt| jwt.is_fetching_keys());
        let why = match (&self.jwt, why) {
            // A shared token that does not match has no reason to tell.
            (None, _) => "missing or invalid bearer token".into(),
            (Some(_), why) => why.to_string(),
        };
        Err(Refusal {
            why,
            missing,
            keys_fetching,
        })
    }

    /// Whether `caller` (at `client`) may start a call of `method`:
    /// UNAUTHENTICATED if the method needs a caller and none was proven,
    /// PERMISSION_DENIED if the policy's rule asks for claims the caller
    /// does not hold, RESOURCE_EXHAUSTED past the caller's call rate (not
    /// for health and reflection, which load balancers poll).
    pub fn admit(&self, method: &str, caller: &Caller, client: Option<std::net::IpAddr>) -> Result<(), tonic::Status> {
        let anonymous = matches!(caller, Caller::Anonymous);
        let identity = caller.identity().map(|identity| &**identity);
        self.policy
            .check(method, self.is_on(), anonymous, identity)
            .inspect_err(|status| {
                self.refused(match status.code() {
                    tonic::Code::Unauthenticated => Refused::Unauthenticated,
                    _ => Refused::PermissionDenied,
                })
            })?;
        if super::rules::is_public_method(method) {
            return Ok(());
        }
        self.limits
            .take_call(caller, client)
            .inspect_err(|_| self.refused(Refused::RateLimited))
    }

    /// What paces the request messages of an admitted call of `method`
    /// (none when messages are not limited; health and reflection never are).
    pub fn message_meter(
        &self,
        method: &str,
        caller: &Caller,
        client: Option<std::net::IpAddr>,
    ) -> Option<MessageMeter> {
        if super::rules::is_public_method(method) {
            return None;
        }
        self.limits.message_meter(caller, client)
    }

    /// Whether `method` may be called without a token.
    pub fn is_open(&self, method: &str) -> bool {
        self.policy.verdict(method, self.is_on()) == Verdict::Open
    }

    /// Whether a WebSocket may open without a token: authentication is off,
    /// or some method may be called by anyone (then each call is checked).
    pub fn opens_sockets_to_anyone(&self) -> bool {
        !self.is_on() || self.policy.opens_anything()
    }

    /// `inner` (the gRPC services) behind authentication: a call of a method
    /// not open to anyone (health, reflection, what `--policy` opens) must
    /// pass it, else it is refused with UNAUTHENTICATED, and every call must
    /// pass [`Auth::admit`]. Then the request is made fit for the services:
    /// the shared token (and the JWT, unless `--jwt-forward-token`) taken
    /// out, so no service behind the bridge (in process or upstream) sees
    /// it; the client's own copies of the claim headers
    /// (`--jwt-claim-header`) removed, the verified claims put in their
    /// place and, for in-process services, in the request's extensions
    /// ([`Claims`]).
    pub fn require_token<S>(&self, inner: S) -> RequireToken<S> {
        RequireToken {
            auth: self.clone(),
            inner,
        }
    }

    /// Takes the credentials out of `headers` and puts `identity`'s claims in.
    fn prepare(&self, headers: &mut HeaderMap, identity: Option<&Arc<Identity>>) {
        self.strip_tokens(headers, identity);
        let Some(jwt) = &self.jwt else { return };
        if let Some(name) = &jwt.settings().cookie {
            strip_cookie(headers, name);
        }
        for (claim, header) in &jwt.settings().claim_headers {
            headers.remove(header);
            let value = identity
                .and_then(|identity| identity.claim_text(claim))
                .and_then(|text| HeaderValue::try_from(text).ok());
            if let Some(value) = value {
                headers.insert(header.clone(), value);
            }
        }
    }

    /// Removes the `authorization` values that carry a token this server
    /// checks: the shared token; with JWTs on, every bearer token, and with
    /// `--jwt-forward-token` puts back the one that was verified (never one
    /// the bridge did not check). Other values pass.
    fn strip_tokens(&self, headers: &mut HeaderMap, identity: Option<&Arc<Identity>>) {
        if !self.is_on() || !headers.contains_key(AUTHORIZATION) {
            return;
        }
        let jwt_on = self.jwt.is_some();
        let mut kept: Vec<HeaderValue> = headers
            .get_all(AUTHORIZATION)
            .iter()
            .filter(|value| match value.to_str().ok().and_then(bearer) {
                Some(_) if jwt_on => false,
                Some(token) => !self
                    .token
                    .as_deref()
                    .is_some_and(|expected| same_token(token, expected)),
                None => true,
            })
            .cloned()
            .collect();
        let forward = self.jwt.as_ref().is_some_and(|jwt| jwt.settings().forward_token);
        if forward
            && let Some(identity) = identity
            && let Ok(value) = HeaderValue::try_from(format!("Bearer {}", identity.token()))
        {
            kept.push(value);
        }
        headers.remove(AUTHORIZATION);
        for value in kept {
            headers.append(AUTHORIZATION, value);
        }
    }
}

/// The credentials of every `authorization: Bearer <token>` header.
fn bearers(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(bearer)
}

/// The credentials of an `authorization: Bearer <token>` value.
fn bearer(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

/// The value of the cookie `name` in the request's `Cookie` headers
/// (RFC 6265 §4.2.1: `name=value` pairs separated by `;`; a few lines
/// rather than a cookie-jar crate, for one look-up).
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

/// Removes the cookie `name` from the request's `Cookie` headers (the
/// services behind the bridge never see the token it carried).
fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    if cookie(headers, name).is_none() {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .filter(|pair| pair.trim().split_once('=').is_none_or(|(key, _)| key != name))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|value| !value.is_empty())
        .collect();
    headers.remove(COOKIE);
    for value in kept {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.append(COOKIE, value);
        }
    }
}

fn same_token(presented: &str, expected: &str) -> bool {
    constant_time_eq::constant_time_eq(presented.as_bytes(), expected.as_bytes())
}

/// Marks a request made by the server itself for a client it has already
/// authenticated (a WebSocket v2 call: the socket's upgrade, or the call's
/// own token, was checked): who it is, and from which address. Only server
/// code can put it in a request's extensions.
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub caller: Caller,
    pub client: Option<std::net::IpAddr>,
}

/// See [`Auth::require_token`].
#[derive(Clone, Debug)]
pub struct RequireToken<S> {
    auth: Auth,
    inner: S,
}

impl<S> tower::Service<Request<tonic::body::Body>> for RequireToken<S>
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        S::Future,
        futures_util::future::BoxFuture<'static, Result<S::Response, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<tonic::body::Body>) -> Self::Future {
        use futures_util::future::Either;
        let refuse = |status: tonic::Status| -> Self::Future {
            Either::Right(Box::pin(std::future::ready(Ok(status.into_http()))))
        };
        let method = request.uri().path();
        let (caller, client) = match request.extensions().get::<Authenticated>() {
            Some(Authenticated { caller, client }) => (caller.clone(), *client),
            None => {
                let peer = request.extensions().get::<PeerAddr>().map(|peer| peer.0.ip());
                let client = self.auth.limits.client_address(peer, request.headers());
                let caller = match self.auth.authenticate(request.headers()) {
                    Ok(caller) => caller,
                    // A method open to anyone takes the call as anonymous.
                    Err(_) if self.auth.is_open(method) => Caller::Anonymous,
                    // A key rotated in at the JWKS URL: once the set is
                    // fetched again, the call is checked again (once).
                    Err(Refusal {
                        keys_fetching: true, ..
                    }) if request.extensions().get::<KeysFetched>().is_none() => {
                        let (auth, mut again) = (self.auth.clone(), self.clone());
                        return Either::Right(Box::pin(async move {
                            if let Some(jwt) = auth.jwt() {
                                jwt.keys_fetched().await;
                            }
                            request.extensions_mut().insert(KeysFetched);
                            std::future::poll_fn(|cx| again.inner.poll_ready(cx)).await?;
                            match again.call(request) {
                                Either::Left(call) => call.await,
                                Either::Right(refused) => refused.await,
                            }
                        }));
                    }
                    Err(Refusal { why, .. }) => {
                        self.auth.refused(Refused::Unauthenticated);
                        return refuse(tonic::Status::unauthenticated(format!(
                            "{why}: send the metadata `authorization: Bearer <token>`"
                        )));
                    }
                };
                (caller, client)
            }
        };
        if let Err(status) = self.auth.admit(method, &caller, client) {
            return refuse(status);
        }
        if let Some(meter) = self.auth.message_meter(request.uri().path(), &caller, client) {
            request = request.map(|body| tonic::body::Body::new(PacedBody::new(body, meter)));
        }
        request.extensions_mut().remove::<Authenticated>();
        self.auth.prepare(request.headers_mut(), caller.identity());
        if let Caller::Identity(identity) = caller {
            request.extensions_mut().insert(Claims(identity));
        }
        Either::Left(self.inner.call(request))
    }
}

/// Marks a request checked again after a key set fetch.
#[derive(Clone, Copy, Debug)]
struct KeysFetched;

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
        assert_eq!(
            Auth::new(None, None, Policy::default())
                .authenticate(&HeaderMap::new())
                .map(|_| ()),
            Ok(())
        );
    }

    #[test]
    fn the_bearer_header_must_carry_the_exact_token() {
        let auth = Auth::new(Some("s3cret".into()), None, Policy::default());
        let allows = |headers: &HeaderMap| auth.authenticate(headers).is_ok();
        assert!(allows(&headers("Bearer s3cret")));
        assert!(!allows(&headers("Bearer s3cre")));
        assert!(!allows(&headers("Basic s3cret")));
        assert!(!allows(&HeaderMap::new()));
    }

    #[test]
    fn a_websocket_may_carry_the_token_as_a_subprotocol_entry() {
        let auth = Auth::new(Some("s3cret".into()), None, Policy::default());
        let upgrade = |offered: &[&str]| {
            auth.authenticate_upgrade(&HeaderMap::new(), offered.iter().copied())
                .is_ok()
        };
        assert!(upgrade(&["streambridge.v1.proto", "streambridge.bearer.s3cret"]));
        assert!(!upgrade(&["streambridge.v1.proto", "streambridge.bearer.nope"]));
        assert!(!upgrade(&["streambridge.v1.proto"]));
    }

    #[test]
    fn a_cookie_is_found_by_its_name_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, "a=1; session=abc.def; b=2".parse().unwrap());
        headers.append(COOKIE, "late=\"q\"".parse().unwrap());
        assert_eq!(cookie(&headers, "session"), Some("abc.def"));
        assert_eq!(cookie(&headers, "late"), Some("q"));
        assert_eq!(cookie(&headers, "sess"), None);
    }

    #[test]
    fn the_token_cookie_is_taken_out_and_the_others_kept() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, "a=1; sb=abc.def; b=2".parse().unwrap());
        headers.append(COOKIE, "sb=again".parse().unwrap());
        strip_cookie(&mut headers, "sb");
        let kept: Vec<_> = headers.get_all(COOKIE).iter().collect();
        assert_eq!(kept, ["a=1; b=2"]);
    }

    #[test]
    fn the_shared_token_is_stripped_and_other_authorization_values_kept() {
        let auth = Auth::new(Some("s3cret".into()), None, Policy::default());
        let mut headers = headers("Bearer s3cret");
        headers.append(AUTHORIZATION, "Basic xyz".parse().unwrap());
        headers.append(AUTHORIZATION, "Bearer someone-elses".parse().unwrap());
        auth.prepare(&mut headers, None);
        let kept: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(kept, ["Basic xyz", "Bearer someone-elses"]);
    }
}
