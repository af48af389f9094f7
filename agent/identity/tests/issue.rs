//! The local issuer end to end: a CA made on disk, leaves signed from it and
//! checked by webpki (the verifier rustls uses) as a peer would check them.

use std::time::{Duration, SystemTime};

use podsteer_identity::ca;
use podsteer_identity::issuer::{IssueError, Issuer as _, Leaf, LocalIssuer};
use podsteer_identity::spiffe::SpiffeId;
use rustls_pki_types::{CertificateDer, UnixTime};

/// A CA directory under the lab's state root, removed on drop.
struct CaDir(std::path::PathBuf);

impl CaDir {
    fn new(trust_domain: &str) -> CaDir {
        let dir = podsteer_lab_host::names::LabId::fresh().state_dir().join("ca");
        ca::create(&dir, trust_domain, 365).expect("CA created");
        CaDir(dir)
    }
}

impl Drop for CaDir {
    fn drop(&mut self) {
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

fn verify(leaf: &Leaf, bundle: &[CertificateDer<'static>], at: SystemTime) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = bundle.iter().map(|c| webpki::anchor_from_trusted_cert(c).expect("anchor").to_owned()).collect();
    let ee = webpki::EndEntityCert::try_from(&leaf.chain[0])?;
    let time = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).expect("after 1970"));
    for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
        ee.verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &anchors, &leaf.chain[1..], time, usage, None, None)?;
    }
    Ok(())
}

#[test]
fn a_leaf_carries_its_spiffe_id_and_verifies_against_the_bundle_for_its_life_only() -> anyhow::Result<()> {
    let dir = CaDir::new("cluster.local");
    let issuer = LocalIssuer::from_dir(&dir.0, "cluster.local", Duration::from_secs(24 * 3600))?;
    let id = SpiffeId::parse("spiffe://cluster.local/ns/production/sa/order-service")?;
    let now = SystemTime::now();
    let leaf = issuer.issue(&id, now)?;
    let bundle = ca::read_certs(&dir.0.join(ca::BUNDLE_FILE))?;
    verify(&leaf, &bundle, now)?;
    assert_eq!(leaf.chain.len(), 1, "the issuer is the bundle's root: nothing to send after the leaf");

    let (_, cert) = x509_parser::parse_x509_certificate(&leaf.chain[0])?;
    let uris: Vec<String> = cert
        .subject_alternative_name()?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(uris, [id.to_string()], "the SPIFFE ID is the one URI SAN");
    assert_eq!(cert.subject().iter().count(), 0, "an X.509-SVID needs no subject");
    assert!(!cert.is_ca());
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(life, 24 * 3600 + 60, "24 h, backdated a minute for clock skew");

    // Expired: refused.
    let after = leaf.not_after + Duration::from_secs(1);
    assert!(matches!(verify(&leaf, &bundle, after), Err(webpki::Error::CertExpired { .. })), "{:?}", verify(&leaf, &bundle, after));
    // Another mesh's root does not vouch for it.
    let other = CaDir::new("cluster.local");
    let other_bundle = ca::read_certs(&other.0.join(ca::BUNDLE_FILE))?;
    // It has the same name (same trust domain), so webpki finds it as the
    // issuer and the signature is what fails.
    let refused = verify(&leaf, &other_bundle, now);
    assert!(matches!(refused, Err(webpki::Error::InvalidSignatureForPublicKey)), "{refused:?}");
    // A bundle with both roots (a rotation's overlap) trusts leaves of either.
    let both: Vec<_> = bundle.iter().chain(&other_bundle).cloned().collect();
    verify(&leaf, &both, now)?;
    let other_leaf = LocalIssuer::from_dir(&other.0, "cluster.local", Duration::from_secs(60))?.issue(&id, now)?;
    verify(&other_leaf, &both, now)?;
    Ok(())
}

#[test]
fn the_issuer_signs_only_its_trust_domain_and_never_shows_a_key() -> anyhow::Result<()> {
    let dir = CaDir::new("cluster.local");
    let issuer = LocalIssuer::from_dir(&dir.0, "cluster.local", Duration::from_secs(3600))?;
    let foreign = SpiffeId::parse("spiffe://example.org/ns/a/sa/b")?;
    assert!(matches!(issuer.issue(&foreign, SystemTime::now()), Err(IssueError::ForeignTrustDomain { .. })));
    let leaf = issuer.issue(&SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b")?, SystemTime::now())?;
    let shown = format!("{leaf:?}");
    assert!(shown.contains("cluster.local") && !shown.contains("key"), "{shown}");
    Ok(())
}

#[test]
fn a_ca_is_never_overwritten_and_its_key_is_owner_only() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = CaDir::new("cluster.local");
    let before = std::fs::read(dir.0.join(ca::ISSUER_KEY_FILE))?;
    assert!(matches!(ca::create(&dir.0, "cluster.local", 365), Err(ca::CaError::Exists(_))));
    assert_eq!(std::fs::read(dir.0.join(ca::ISSUER_KEY_FILE))?, before, "the key is unchanged");
    assert_eq!(std::fs::metadata(dir.0.join(ca::ISSUER_KEY_FILE))?.permissions().mode() & 0o777, 0o600);
    // A directory without a CA is a clear error, not a panic.
    let empty = podsteer_lab_host::names::LabId::fresh().state_dir();
    let err = LocalIssuer::from_dir(&empty, "cluster.local", Duration::from_secs(60)).err().expect("no CA there");
    assert!(err.to_string().contains("issuer.crt"), "{err}");
    Ok(())
}

#[test]
fn an_issuing_key_that_is_not_the_certificates_is_refused() {
    let a = CaDir::new("cluster.local");
    let b = CaDir::new("cluster.local");
    // Half a rotation: B's key beside A's certificate.
    std::fs::copy(b.0.join(ca::ISSUER_KEY_FILE), a.0.join(ca::ISSUER_KEY_FILE)).expect("copy");
    let err = LocalIssuer::from_dir(&a.0, "cluster.local", Duration::from_secs(60)).err().expect("a mismatched key is refused");
    assert!(err.to_string().contains("is not the key of"), "{err}");
}
