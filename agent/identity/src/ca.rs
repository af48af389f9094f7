//! The mesh's certificate authority as files: `ca.crt` (the trust bundle, one
//! or more roots, PEM) and the issuing certificate and key the local issuer
//! signs with. On a cluster they come from a Kubernetes Secret; `podsteer ca`
//! makes them.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// File names inside a CA directory.
pub const BUNDLE_FILE: &str = "ca.crt";
pub const ISSUER_CERT_FILE: &str = "issuer.crt";
pub const ISSUER_KEY_FILE: &str = "issuer.key";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0} holds no certificate")]
    Empty(PathBuf),
    #[error("{0}: {1}")]
    Pem(PathBuf, #[source] rustls_pki_types::pem::Error),
    #[error("{0}: {1}")]
    Certificate(PathBuf, #[source] rcgen::Error),
    #[error("making the CA: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("{0} already exists: refusing to overwrite a CA")]
    Exists(PathBuf),
    #[error("{0} is not the key of {1}")]
    KeyMismatch(PathBuf, PathBuf),
    #[error(transparent)]
    TrustDomain(#[from] crate::spiffe::SpiffeError),
}

/// A root made by [`create`], issuing directly (no intermediate).
pub struct Created {
    pub dir: PathBuf,
}

/// Makes a self-signed root for `trust_domain` in `dir`: the bundle holds it,
/// and it is the issuer too. Refuses to overwrite an existing CA. The key is
/// written owner-only.
pub fn create(dir: &Path, trust_domain: &str, validity_days: u32) -> Result<Created, CaError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    crate::spiffe::check_trust_domain(trust_domain)?;
    for f in [BUNDLE_FILE, ISSUER_CERT_FILE, ISSUER_KEY_FILE] {
        if dir.join(f).exists() {
            return Err(CaError::Exists(dir.join(f)));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| CaError::Io(dir.into(), e))?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CaError::Generate)?;
    params.distinguished_name.push(DnType::OrganizationName, trust_domain);
    params.distinguished_name.push(DnType::CommonName, format!("podsteer mesh CA for {trust_domain}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(validity_days));
    let cert = params.self_signed(&key).map_err(CaError::Generate)?;
    let pem = cert.pem();
    let write = |name: &str, bytes: &str, mode: u32| -> Result<(), CaError> {
        let path = dir.join(name);
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&path).map_err(|e| CaError::Io(path.clone(), e))?;
        std::io::Write::write_all(&mut f, bytes.as_bytes()).map_err(|e| CaError::Io(path, e))
    };
    write(BUNDLE_FILE, &pem, 0o644)?;
    write(ISSUER_CERT_FILE, &pem, 0o644)?;
    write(ISSUER_KEY_FILE, &key.serialize_pem(), 0o600)?;
    Ok(Created { dir: dir.into() })
}

/// Every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| CaError::Pem(path.into(), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Pem(path.into(), e))?;
    if certs.is_empty() {
        return Err(CaError::Empty(path.into()));
    }
    Ok(certs)
}

/// The issuing certificate and key in `dir`, ready to sign.
pub fn load_issuer(dir: &Path) -> Result<(rcgen::Issuer<'static, KeyPair>, CertificateDer<'static>), CaError> {
    let cert_path = dir.join(ISSUER_CERT_FILE);
    let key_path = dir.join(ISSUER_KEY_FILE);
    let cert = read_certs(&cert_path)?.swap_remove(0);
    let key_pem = std::fs::read_to_string(&key_path).map_err(|e| CaError::Io(key_path.clone(), e))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Certificate(key_path.clone(), e))?;
    // A rotation writes the two files one after the other: a key that is not
    // the certificate's would sign leaves no peer can verify.
    if spki_of(&cert).is_none_or(|spki| spki != rcgen::PublicKeyData::subject_public_key_info(&key)) {
        return Err(CaError::KeyMismatch(key_path, cert_path));
    }
    let issuer = rcgen::Issuer::from_ca_cert_der(&cert, key).map_err(|e| CaError::Certificate(cert_path, e))?;
    Ok((issuer, cert))
}

/// A certificate's SubjectPublicKeyInfo, DER.
fn spki_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    X509Certificate::from_der(cert.as_ref()).ok().map(|(_, x)| x.public_key().raw.to_vec())
}
