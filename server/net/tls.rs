//! TLS for the one port (`--tls-cert`, `--tls-key`): rustls with ALPN `h2`
//! and `http/1.1`, so native gRPC over TLS, gRPC-Web over https and `wss://`
//! all arrive on the same listener as with cleartext.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;

/// A TLS acceptor for the PEM certificate chain and key in these files.
pub fn acceptor(cert_path: &Path, key_path: &Path) -> io::Result<TlsAcceptor> {
    let pem_error = |path: &Path, error: rustls_pki_types::pem::Error| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {error}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| pem_error(cert_path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_path, e))?;
    if certs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: no certificate", cert_path.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| pem_error(key_path, e))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
