//! Signs workload certificates. The local issuer holds the issuing key in
//! memory and signs a fresh key pair per certificate: ECDSA P-256, the SPIFFE
//! ID as the only URI SAN, no subject name (SPIFFE X.509-SVID), usable for
//! both TLS client and server authentication.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::ca::{self, CaError};
use crate::spiffe::SpiffeId;

/// A signed workload certificate and its key. The key is never written out
/// by this crate; `Debug` leaves it out.
pub struct Leaf {
    pub id: SpiffeId,
    /// The leaf first, then the issuing certificate when it is not a root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("id", &self.id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("{id} is not in this issuer's trust domain {trust_domain}")]
    ForeignTrustDomain { id: SpiffeId, trust_domain: String },
    #[error("signing the certificate for {0}: {1}")]
    Sign(SpiffeId, #[source] rcgen::Error),
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Where workload certificates come from: the local issuer now; a remote CA
/// (Istio's CA service, SPIRE, cert-manager) would be another implementation.
pub trait Issuer: Send + Sync {
    fn trust_domain(&self) -> &str;
    fn issue(&self, id: &SpiffeId, now: SystemTime) -> Result<Leaf, IssueError>;
}

pub struct LocalIssuer {
    trust_domain: String,
    issuer: rcgen::Issuer<'static, KeyPair>,
    /// Sent after the leaf unless the issuing certificate is itself a root
    /// in the bundle (peers have it already).
    intermediate: Option<CertificateDer<'static>>,
    lifetime: Duration,
}

/// A certificate is valid from a little before it is made, so a peer whose
/// clock is slightly behind does not refuse a fresh one.
const BACKDATE: Duration = Duration::from_secs(60);

impl LocalIssuer {
    /// The issuer in CA directory `dir` (see [`crate::ca`]), signing leaves
    /// that live `lifetime`.
    pub fn from_dir(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<LocalIssuer, IssueError> {
        let (issuer, cert) = ca::load_issuer(dir)?;
        let bundle = ca::read_certs(&dir.join(ca::BUNDLE_FILE))?;
        let intermediate = (!bundle.contains(&cert)).then_some(cert);
        Ok(LocalIssuer { trust_domain: trust_domain.into(), issuer, intermediate, lifetime })
    }
}

impl Issuer for LocalIssuer {
    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn issue(&self, id: &SpiffeId, now: SystemTime) -> Result<Leaf, IssueError> {
        if id.trust_domain() != self.trust_domain {
            return Err(IssueError::ForeignTrustDomain { id: id.clone(), trust_domain: self.trust_domain.clone() });
        }
        let sign = |e| IssueError::Sign(id.clone(), e);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(sign)?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let (not_before, not_after) = (now - BACKDATE, now + self.lifetime);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).map_err(sign)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediate.clone());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(Leaf { id: id.clone(), chain, key, not_before, not_after })
    }
}
