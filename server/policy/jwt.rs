//! Identities from JSON Web Tokens (`--jwt-jwks`): who calls, not only
//! whether they know a shared secret.
//!
//! A token is verified once per socket, per call that brings its own, or
//! per gRPC call; never per message. Verification is `jsonwebtoken`'s (on
//! `ring`, which the server already links for TLS); what is ours is the
//! policy around it:
//!
//! - only RS256, ES256 and EdDSA: `alg: none` and HMAC are refused before
//!   a key is looked at (an HMAC "key" made of a public key is the classic
//!   confusion attack), and a JWKS entry of another kind fails the start;
//! - a key is found by the token's `kid`, or, for a token without one, any
//!   key of the token's algorithm;
//! - `exp` is required, `nbf` checked when present, both with
//!   `--jwt-leeway`; `iss` and `aud` when `--jwt-issuer` / `--jwt-audience`
//!   are set;
//! - the key file is looked at again at most once a second and reloaded
//!   when it changed (a broken new file keeps the old keys, with a warning);
//!   the key set at `--jwt-jwks-url` is fetched as [`super::jwks_url`]
//!   says; with both, a key from either verifies;
//! - the reason a token is refused is told to the client (never the token).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::HeaderName;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks_url::{JwksUrl, REFRESH_EVERY};

/// What `--jwt-*` configure.
#[derive(Clone, Debug)]
pub struct JwtSettings {
    /// The JWKS file, if any.
    pub jwks: Option<PathBuf>,
    /// The JWKS URL (https), if any, and the CA file to trust for it.
    pub jwks_url: Option<String>,
    pub jwks_ca: Option<PathBuf>,
    /// The `iss` a token must have, if set.
    pub issuer: Option<String>,
    /// One of these must be in the token's `aud`, if any are set.
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Verified claims added to every call as request metadata.
    pub claim_headers: Vec<(String, HeaderName)>,
    /// Whether the token itself goes on to the services.
    pub forward_token: bool,
    /// A cookie a WebSocket upgrade may carry its token in.
    pub cookie: Option<String>,
}

/// A caller whose token verified: its claims.
pub struct Identity {
    claims: Map<String, Value>,
    /// The token's `exp`, seconds since the epoch.
    expires: u64,
    /// The token itself: the one a `--jwt-forward-token` server passes on
    /// (never logged: `Debug` leaves it out).
    token: Box<str>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("claims", &self.claims)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The token that was verified.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The verified claims.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// Whether the token has expired by now (with `leeway`): a socket
    /// whose identity has expired opens no new calls with it.
    pub fn has_expired(&self, leeway: Duration) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        now.as_secs() > self.expires.saturating_add(leeway.as_secs())
    }

    /// A claim as a header value: a string as it is, anything else as JSON.
    pub fn claim_text(&self, claim: &str) -> Option<String> {
        match self.claims.get(claim)? {
            Value::String(text) => Some(text.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }
}

/// The verified claims of a call's caller, in the request's extensions of
/// an in-process service (`request.extensions().get::<Claims>()`), when the
/// call came with a JWT.
#[derive(Clone, Debug)]
pub struct Claims(pub Arc<Identity>);

/// Why a token was refused; the text is what the client is told.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing bearer token")]
    Missing,
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("the token's algorithm {0:?} is refused: only RS256, ES256 and EdDSA are accepted")]
    Algorithm(String),
    #[error("the token names a key (kid {0:?}) that is not in the key set")]
    UnknownKey(String),
    #[error("no key of the token's algorithm is in the key set")]
    NoKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's issuer is not the one this server accepts (--jwt-issuer)")]
    Issuer,
    #[error("the token's audience is not one this server accepts (--jwt-audience)")]
    Audience,
}

/// One verification key.
struct Key {
    key: DecodingKey,
    algorithm: Algorithm,
}

/// The keys of a JWKS, and what its file looked like when read.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    without_kid: Vec<Arc<Key>>,
    stamp: Option<FileStamp>,
}

/// A file's modification time and length: a new file has another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp(Option<SystemTime>, u64);

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(FileStamp(metadata.modified().ok(), metadata.len()))
    }
}

/// Verifies tokens against the key sets of `--jwt-jwks` and `--jwt-jwks-url`.
pub struct JwtVerifier {
    settings: JwtSettings,
    /// The file's keys (none without a file).
    keys: RwLock<Arc<KeySet>>,
    /// When the file was last looked at.
    looked: Mutex<Instant>,
    /// The URL's keys, when there is one.
    fetched: Option<Arc<FetchedKeys>>,
}

/// The key set at `--jwt-jwks-url` and where it comes from.
struct FetchedKeys {
    url: JwksUrl,
    keys: RwLock<Arc<KeySet>>,
}

impl FetchedKeys {
    /// Fetches the set and, if it loads, puts it in place of the old one.
    async fn refresh(&self) -> Result<(), String> {
        let text = self.url.fetch().await?;
        let fresh = parse(&text, None).map_err(|why| format!("--jwt-jwks-url {}: {why}", self.url.uri()))?;
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        Ok(())
    }

    /// [`FetchedKeys::refresh`] after the start: a set that cannot be
    /// fetched (or used) leaves the keys in force, with a warning.
    async fn refresh_or_keep(&self) {
        if let Err(error) = self.refresh().await {
            tracing::warn!(%error, "the JWT key set could not be fetched again; keeping the keys in force");
        }
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The algorithms accepted, by their JOSE names.
const ACCEPTED: [(&str, Algorithm); 3] = [
    ("RS256", Algorithm::RS256),
    ("ES256", Algorithm::ES256),
    ("EdDSA", Algorithm::EdDSA),
];

/// How often the key file is looked at for changes, at most.
const RELOAD_LOOK: Duration = Duration::from_secs(1);

impl JwtVerifier {
    /// Reads the key set; an error names the file and the key that is wrong.
    /// The URL's keys are not fetched yet: see [`JwtVerifier::fetch_keys`].
    pub fn new(settings: JwtSettings) -> Result<JwtVerifier, String> {
        let keys = match &settings.jwks {
            Some(path) => load(path)?,
            None => KeySet::default(),
        };
        let fetched = match &settings.jwks_url {
            Some(url) => Some(Arc::new(FetchedKeys {
                url: JwksUrl::new(url, settings.jwks_ca.as_deref())?,
                keys: RwLock::default(),
            })),
            None => None,
        };
        Ok(JwtVerifier {
            settings,
            keys: RwLock::new(Arc::new(keys)),
            looked: Mutex::new(Instant::now()),
            fetched,
        })
    }

    /// Fetches the key set at `--jwt-jwks-url` (at start: an error stops it).
    pub async fn fetch_keys(&self) -> Result<(), String> {
        match &self.fetched {
            Some(fetched) => fetched.refresh().await,
            None => Ok(()),
        }
    }

    /// Fetches the URL's key set every [`REFRESH_EVERY`] until `shutdown`
    /// (a failed fetch keeps the keys in force, with a warning).
    pub async fn refresh_keys(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let Some(fetched) = self.fetched.clone() else { return };
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH_EVERY, REFRESH_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => fetched.refresh_or_keep().await,
            }
        }
    }

    /// Whether a fetch of the URL's key set is under way (a token refused
    /// for an unknown `kid` may pass once it is done).
    pub fn is_fetching_keys(&self) -> bool {
        self.fetched.as_ref().is_some_and(|fetched| fetched.url.is_fetching())
    }

    /// Resolves once the fetch under way, if any, is done.
    pub async fn keys_fetched(&self) {
        if let Some(fetched) = &self.fetched {
            fetched.url.fetched().await;
        }
    }

    /// A token named `kid`, which no key set holds: the URL's set is
    /// fetched again, unless that happened within
    /// [`REFETCH_AFTER`](super::jwks_url::REFETCH_AFTER).
    fn unknown_kid(&self, kid: &str) {
        let Some(fetched) = &self.fetched else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !fetched.url.may_refetch() {
            return;
        }
        tracing::info!(kid, "a token names an unknown key: fetching the JWT key set again");
        let fetched = fetched.clone();
        runtime.spawn(async move {
            fetched.refresh_or_keep().await;
            fetched.url.done();
        });
    }

    pub fn settings(&self) -> &JwtSettings {
        &self.settings
    }

    /// The identity `token` proves, or why it proves none.
    pub fn verify(&self, token: &str) -> Result<Arc<Identity>, TokenError> {
        let algorithm = accepted_algorithm(token)?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let file_keys = self.current_keys();
        let url_keys = self.fetched.as_ref().map(|fetched| fetched.current());
        let sets = std::iter::once(&file_keys).chain(url_keys.as_ref());
        let candidates: Vec<&Arc<Key>> = match &header.kid {
            Some(kid) => {
                let found: Vec<&Arc<Key>> = sets.filter_map(|keys| keys.by_kid.get(kid)).collect();
                if found.is_empty() {
                    self.unknown_kid(kid);
                    return Err(TokenError::UnknownKey(kid.clone()));
                }
                found
            }
            None => sets
                .flat_map(|keys| keys.without_kid.iter().chain(keys.by_kid.values()))
                .filter(|key| key.algorithm == algorithm)
                .collect(),
        };
        let mut outcome = Err(TokenError::NoKey);
        for key in candidates {
            if key.algorithm != algorithm {
                // A key for another algorithm never verifies this token.
                outcome = Err(TokenError::Signature);
                continue;
            }
            outcome = self.verify_with(token, key);
            if !matches!(outcome, Err(TokenError::Signature)) {
                break;
            }
        }
        outcome
    }

    fn verify_with(&self, token: &str, key: &Key) -> Result<Arc<Identity>, TokenError> {
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        // jsonwebtoken skips a check whose claim is missing: a claim the
        // server checks must be there.
        let mut required = vec!["exp"];
        if self.settings.issuer.is_some() {
            required.push("iss");
        }
        if !self.settings.audiences.is_empty() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        match &self.settings.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        if self.settings.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.settings.audiences);
        }
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation).map_err(|error| {
                match error.kind() {
                    ErrorKind::InvalidSignature => TokenError::Signature,
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                    ErrorKind::InvalidIssuer => TokenError::Issuer,
                    ErrorKind::InvalidAudience => TokenError::Audience,
                    ErrorKind::MissingRequiredClaim(claim) => TokenError::Malformed(format!("it has no {claim} claim")),
                    _ => TokenError::Malformed(error.to_string()),
                }
            })?;
        // jsonwebtoken rounds a fractional `exp` and ignores an `nbf` it
        // cannot read: both must be whole numbers of seconds here.
        let expires = data
            .claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| TokenError::Malformed("its exp is not a whole number of seconds".into()))?;
        if data.claims.get("nbf").is_some_and(|nbf| nbf.as_u64().is_none()) {
            return Err(TokenError::Malformed("its nbf is not a whole number of seconds".into()));
        }
        Ok(Arc::new(Identity {
            claims: data.claims,
            expires,
            token: token.into(),
        }))
    }

    /// The key set, read again first if the file changed (looked at no
    /// more than once a second).
    fn current_keys(&self) -> Arc<KeySet> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(path) = &self.settings.jwks else { return keys };
        {
            let mut looked = self.looked.lock().unwrap_or_else(PoisonError::into_inner);
            if looked.elapsed() < RELOAD_LOOK {
                return keys;
            }
            *looked = Instant::now();
        }
        if FileStamp::of(path) == keys.stamp {
            return keys;
        }
        match load(path) {
            Ok(fresh) => {
                tracing::info!(path = %path.display(), "reloaded the JWT key set");
                let fresh = Arc::new(fresh);
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = fresh.clone();
                fresh
            }
            Err(error) => {
                tracing::warn!(%error, "the JWT key set changed but does not load; keeping the previous keys");
                keys
            }
        }
    }
}

/// The token's `alg`, if it is one accepted; read before anything else.
fn accepted_algorithm(token: &str) -> Result<Algorithm, TokenError> {
    let header = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed("its header is not base64url".into()))?;
    let header: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed("its header is not a JSON object".into()))?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("none");
    ACCEPTED
        .iter()
        .find(|(name, _)| *name == alg)
        .map(|(_, algorithm)| *algorithm)
        .ok_or_else(|| TokenError::Algorithm(alg.chars().take(32).collect()))
}

/// Reads a JWKS file.
fn load(path: &Path) -> Result<KeySet, String> {
    let named = |why: String| format!("--jwt-jwks {}: {why}", path.display());
    let stamp = FileStamp::of(path);
    let text = std::fs::read_to_string(path).map_err(|e| named(e.to_string()))?;
    parse(&text, stamp).map_err(named)
}

/// Reads a JWKS; an error names the key that is wrong.
fn parse(text: &str, stamp: Option<FileStamp>) -> Result<KeySet, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    if set.keys.is_empty() {
        return Err("the key set has no keys".into());
    }
    let mut keys = KeySet {
        by_kid: HashMap::new(),
        without_kid: Vec::new(),
        stamp,
    };
    for (index, jwk) in set.keys.iter().enumerate() {
        let which = match &jwk.common.key_id {
            Some(kid) => format!("key {index} (kid {kid:?})"),
            None => format!("key {index}"),
        };
        let key = Arc::new(key_of(jwk).map_err(|why| format!("{which}: {why}"))?);
        match &jwk.common.key_id {
            Some(kid) => {
                if keys.by_kid.insert(kid.clone(), key).is_some() {
                    return Err(format!("{which}: the kid is used twice"));
                }
            }
            None => keys.without_kid.push(key),
        }
    }
    Ok(keys)
}

/// A JWK as a verification key of an accepted algorithm.
fn key_of(jwk: &Jwk) -> Result<Key, String> {
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::EllipticCurve(ec) => return Err(format!("curve {:?}: only P-256 (ES256)", ec.curve)),
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
        AlgorithmParameters::OctetKeyPair(okp) => return Err(format!("curve {:?}: only Ed25519 (EdDSA)", okp.curve)),
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric (HMAC) key: only RS256, ES256 and EdDSA keys are accepted".into());
        }
    };
    if let Some(stated) = jwk.common.key_algorithm {
        let stated = format!("{stated:?}");
        let expected = format!("{algorithm:?}");
        if stated != expected {
            return Err(format!("alg {stated} does not fit the key, which is for {expected}"));
        }
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    Ok(Key { key, algorithm })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alg_none_and_hmac_are_refused_before_any_key_is_looked_at() {
        let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        for (alg, expected) in [("none", "none"), ("HS256", "HS256"), ("RS384", "RS384")] {
            let token = format!("{}.{}.", b64(&format!(r#"{{"alg":"{alg}"}}"#)), b64(r#"{"exp":1}"#));
            assert_eq!(accepted_algorithm(&token), Err(TokenError::Algorithm(expected.into())));
        }
        let token = format!("{}.{}.", b64(r#"{"typ":"JWT"}"#), b64("{}"));
        assert_eq!(accepted_algorithm(&token), Err(TokenError::Algorithm("none".into())));
        assert!(matches!(accepted_algorithm("garbage"), Err(TokenError::Malformed(_))));
        let token = format!("{}.x.y", b64(r#"{"alg":"ES256"}"#));
        assert_eq!(accepted_algorithm(&token), Ok(Algorithm::ES256));
    }
}
