//! mTLS between workloads (HBONE): rustls configurations that present a
//! workload's certificate and accept a peer only with a chain to the trust
//! bundle and a SPIFFE ID in the trust domain; a client further insists on
//! the one identity its destination must present. TLS 1.3 only, ALPN `h2`,
//! as ztunnel speaks it.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;

use crate::spiffe::SpiffeId;

/// The ALPN protocol of HBONE: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the trust bundle holds no certificate")]
    EmptyBundle,
    #[error("the trust bundle: {0}")]
    Bundle(String),
    #[error("a certificate or key in PEM: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error("the workload key: {0}")]
    Key(#[source] rustls::Error),
    #[error("not base64 DER: {0}")]
    Base64(String),
    #[error("the certificate is not X.509: {0}")]
    NotX509(String),
    #[error("the certificate has {0} URI SANs; a SPIFFE certificate has exactly one")]
    UriSans(usize),
    #[error(transparent)]
    Spiffe(#[from] crate::spiffe::SpiffeError),
    #[error("a TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SPIFFE ID in a certificate's one URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, x) = X509Certificate::from_der(cert.as_ref()).map_err(|e| TlsError::NotX509(e.to_string()))?;
    let san = x.subject_alternative_name().map_err(|e| TlsError::NotX509(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None })
        .collect();
    match uris[..] {
        [one] => Ok(SpiffeId::parse(one)?),
        _ => Err(TlsError::UriSans(uris.len())),
    }
}

/// When a certificate stops being valid.
pub fn not_after_of(cert: &CertificateDer<'_>) -> Result<std::time::SystemTime, TlsError> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, x) = X509Certificate::from_der(cert.as_ref()).map_err(|e| TlsError::NotX509(e.to_string()))?;
    let secs = u64::try_from(x.validity().not_after.timestamp()).unwrap_or(0);
    Ok(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// A certificate's subject, as `CN=..., O=...`.
pub fn subject_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, x) = X509Certificate::from_der(cert.as_ref()).map_err(|e| TlsError::NotX509(e.to_string()))?;
    Ok(x.subject().to_string())
}

/// Who signed a certificate, as `CN=..., O=...`.
pub fn issuer_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, x) = X509Certificate::from_der(cert.as_ref()).map_err(|e| TlsError::NotX509(e.to_string()))?;
    Ok(x.issuer().to_string())
}

/// Every certificate in PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    Ok(CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()?)
}

/// A workload's chain and key as rustls signs with them.
pub fn certified_key(chain: Vec<CertificateDer<'static>>, key: &PrivateKeyDer<'_>) -> Result<Arc<CertifiedKey>, TlsError> {
    let signer = provider().key_provider.load_private_key(key.clone_key()).map_err(TlsError::Key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// The same from the control protocol's form: base64 DER, the key PKCS#8.
pub fn certified_key_from_wire(chain: &[String], key: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = chain.iter().map(|c| unbase64(c).map(CertificateDer::from)).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(unbase64(key)?));
    certified_key(chain, &key)
}

pub fn unbase64(s: &str) -> Result<Vec<u8>, TlsError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| TlsError::Base64(e.to_string()))
}

/// DER as the control protocol carries it.
pub fn base64(der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(der)
}

/// A workload's current certificate: renewal swaps it, and every handshake
/// after that presents the new one while connections made before keep theirs.
#[derive(Debug)]
pub struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    pub fn new(key: Arc<CertifiedKey>) -> CurrentCert {
        CurrentCert(RwLock::new(key))
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }

    pub fn get(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The trust bundle of one trust domain, and the configurations built on it.
/// A bundle rotation builds a new `Trust`; during an overlap the bundle holds
/// the old and the new root.
pub struct Trust {
    trust_domain: String,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
}

impl Trust {
    pub fn new(trust_domain: &str, bundle: &[CertificateDer<'static>]) -> Result<Trust, TlsError> {
        crate::spiffe::check_trust_domain(trust_domain)?;
        if bundle.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let mut roots = RootCertStore::empty();
        for c in bundle {
            roots.add(c.clone()).map_err(|e| TlsError::Bundle(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let webpki = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Bundle(e.to_string()))?;
        let client_verifier = Arc::new(InTrustDomain { inner: webpki, trust_domain: trust_domain.into() });
        Ok(Trust { trust_domain: trust_domain.into(), roots, client_verifier, provider })
    }

    pub fn from_pem(trust_domain: &str, bundle_pem: &str) -> Result<Trust, TlsError> {
        Trust::new(trust_domain, &certs_from_pem(bundle_pem)?)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A server presenting `me`'s certificate that demands a client
    /// certificate chained to the bundle, with an ID in the trust domain.
    pub fn server_config(&self, me: Arc<CurrentCert>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut c = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(self.client_verifier.clone())
            .with_cert_resolver(me);
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(c))
    }

    /// A client presenting `me`'s certificate that accepts only a server
    /// proving `expect`.
    pub fn client_config(&self, me: Arc<CurrentCert>, expect: SpiffeId) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier =
            Arc::new(ExpectIdentity { roots: self.roots.clone(), algorithms: self.provider.signature_verification_algorithms, expect });
        let mut c = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(me);
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(c))
    }
}

fn rejected(what: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(Rejected(what)))))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Rejected(String);

/// The server's check of a client: the chain (webpki), then the trust domain.
#[derive(Debug)]
struct InTrustDomain {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for InTrustDomain {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of(end_entity).map_err(|e| rejected(format!("client certificate: {e}")))?;
        if id.trust_domain() != self.trust_domain {
            return Err(rejected(format!("client {id} is not in trust domain {}", self.trust_domain)));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client's check of a server: the chain to the bundle, then the one
/// identity this destination must present. A server certificate names no
/// host, so the TLS server name is not checked; the SPIFFE ID stands for it.
#[derive(Debug)]
struct ExpectIdentity {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expect: SpiffeId,
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&parsed, &self.roots, intermediates, now, self.algorithms.all)?;
        let id = spiffe_id_of(end_entity).map_err(|e| rejected(format!("server certificate: {e}")))?;
        if id != self.expect {
            return Err(rejected(format!("the destination presented {id}, not {}", self.expect)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered, so this is never asked.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
