//! The webhook's certificate, from PEM files, re-read when they change: a
//! Secret mounted by the kubelet (or cert-manager renewing it) replaces the
//! files in place, and the webhook must not need a restart for it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the certificate chain {0}")]
    Cert(PathBuf, #[source] rustls::pki_types::pem::Error),
    #[error("{0} holds no certificate")]
    NoCert(PathBuf),
    #[error("reading the private key {0}")]
    Key(PathBuf, #[source] rustls::pki_types::pem::Error),
    #[error("the private key {0} is of no supported type")]
    KeyType(PathBuf, #[source] rustls::Error),
    #[error("building the TLS configuration")]
    Config(#[source] rustls::Error),
}

fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Cert(cert.into(), e))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert(cert.into(), e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCert(cert.into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key(key.into(), e))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| TlsError::KeyType(key.into(), e))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

fn modified(paths: [&Path; 2]) -> Option<[SystemTime; 2]> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some([m(paths[0])?, m(paths[1])?])
}

/// The current certificate; a handshake after the files changed loads the new
/// pair, and a pair that does not load is logged and the old one kept.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Option<[SystemTime; 2]>, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path) -> Result<ReloadingCert, TlsError> {
        let stamp = modified([cert, key]);
        let ck = load(cert, key)?;
        Ok(ReloadingCert { cert: cert.into(), key: key.into(), current: Mutex::new((stamp, ck)) })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = modified([&self.cert, &self.key]);
        if stamp.is_some() && stamp != cur.0 {
            match load(&self.cert, &self.key) {
                Ok(ck) => {
                    info!(cert = %self.cert.display(), "webhook certificate reloaded");
                    *cur = (stamp, ck);
                }
                Err(e) => warn!(error = %e, "webhook certificate changed but does not load; keeping the previous one"),
            }
        }
        Some(cur.1.clone())
    }
}

pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let resolver = Arc::new(ReloadingCert::new(cert, key)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // The API server speaks HTTP/1.1 to webhooks unless told otherwise.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
