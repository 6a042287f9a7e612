//! The key set at `--jwt-jwks-url`: fetched over HTTPS at start (a server
//! that cannot fetch it does not start), kept in memory, and fetched again
//! when a token names a `kid` the set does not hold (a key rotated in), at
//! most once per [`REFETCH_AFTER`] (the first such token after the start
//! fetches at once), and every [`REFRESH_EVERY`] (a key removed from the
//! set stops verifying then).
//!
//! Verification is synchronous and never waits on the network: a token
//! with an unknown `kid` starts a fetch and is refused; where the caller
//! can wait (a gRPC request, a WebSocket upgrade) it waits for that fetch
//! ([`JwksUrl::fetched`]) and is verified again.
//!
//! One HTTP/1.1 GET per fetch over rustls (the system's roots, or
//! `--jwt-jwks-ca`), with a timeout and a size limit: nothing an identity
//! provider needs more of.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// A token with an unknown `kid` fetches the set again at most this often.
pub const REFETCH_AFTER: Duration = Duration::from_secs(30);
/// The set is fetched again this often in any case.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// How long a fetch may take, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest key set accepted.
const MAX_BODY: usize = 1 << 20;

/// Where the key set comes from, and when it was last fetched.
pub struct JwksUrl {
    uri: Uri,
    tls: TlsConnector,
    /// When a token with an unknown `kid` last fetched the set again.
    last_refetch: Mutex<Option<Instant>>,
    fetching: AtomicBool,
    /// Counts finished fetches (successful or not): waiters watch it.
    fetched: watch::Sender<u64>,
}

impl std::fmt::Debug for JwksUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksUrl")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl JwksUrl {
    /// For `url` (https only), trusting the system's roots or, when given,
    /// the CA certificates of the PEM file `ca`.
    pub fn new(url: &str, ca: Option<&std::path::Path>) -> Result<JwksUrl, String> {
        let named = |why: String| format!("--jwt-jwks-url {url}: {why}");
        let uri: Uri = url.parse().map_err(|e| named(format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(named(
                "must be an https:// URL (keys fetched in the clear could be anyone's)".into(),
            ));
        }
        let mut roots = RootCertStore::empty();
        match ca {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| format!("--jwt-jwks-ca {}: {e}", path.display()))?;
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| format!("--jwt-jwks-ca {}: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("--jwt-jwks-ca {}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // A system certificate rustls cannot read is not ours to fix.
                    let _ = roots.add(cert);
                }
            }
        }
        let mut config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(JwksUrl {
            uri,
            tls: TlsConnector::from(Arc::new(config)),
            last_refetch: Mutex::new(None),
            fetching: AtomicBool::new(false),
            fetched: watch::Sender::new(0),
        })
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// Fetches the key set's JSON.
    pub async fn fetch(&self) -> Result<String, String> {
        let named = |why: String| format!("--jwt-jwks-url {}: {why}", self.uri);
        tokio::time::timeout(FETCH_TIMEOUT, self.get())
            .await
            .map_err(|_| named(format!("no answer within {FETCH_TIMEOUT:?}")))?
            .map_err(named)
    }

    async fn get(&self) -> Result<String, String> {
        let host = self.uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = self.uri.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let name = rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        let request = http::Request::get(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, self.uri.authority().map_or("", |a| a.as_str()))
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("HTTP {}", response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_string())
        };
        tokio::select! {
            result = exchange => result,
            Err(error) = connection => Err(error.to_string()),
        }
    }

    /// Whether a token naming an unknown `kid` may fetch the set again now
    /// (none is under way, and the last was long enough ago); if so, the
    /// caller must fetch and then call [`JwksUrl::done`].
    pub fn may_refetch(&self) -> bool {
        let mut last = self.last_refetch.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < REFETCH_AFTER) || self.fetching.swap(true, Ordering::AcqRel) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Whether a fetch is under way.
    pub fn is_fetching(&self) -> bool {
        self.fetching.load(Ordering::Acquire)
    }

    /// Marks a fetch started by [`JwksUrl::may_refetch`] as finished.
    pub fn done(&self) {
        self.fetching.store(false, Ordering::Release);
        self.fetched.send_modify(|n| *n += 1);
    }

    /// Resolves once the fetch under way (if any) has finished, or after
    /// the fetch timeout.
    pub async fn fetched(&self) {
        let mut changes = self.fetched.subscribe();
        if !self.is_fetching() {
            return;
        }
        let _ = tokio::time::timeout(FETCH_TIMEOUT, changes.changed()).await;
    }
}
