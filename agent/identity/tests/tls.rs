//! The HBONE mTLS configurations, handshaking for real (rustls client and
//! server connections, in memory): each side accepts a peer only with a chain
//! to the bundle, in its validity, in the trust domain; the client only the
//! identity it expects.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use podsteer_identity::ca;
use podsteer_identity::issuer::{Issuer as _, LocalIssuer};
use podsteer_identity::spiffe::SpiffeId;
use podsteer_identity::tls::{CurrentCert, Trust, certified_key, spiffe_id_of};

struct CaDir(std::path::PathBuf);

impl CaDir {
    fn new(name: &str, trust_domain: &str) -> CaDir {
        let dir = podsteer_lab_host::names::LabId::fresh().state_dir().join(name);
        ca::create(&dir, trust_domain, 365).expect("CA created");
        CaDir(dir)
    }

    fn trust(&self, trust_domain: &str) -> Trust {
        Trust::new(trust_domain, &ca::read_certs(&self.0.join(ca::BUNDLE_FILE)).expect("bundle")).expect("trust")
    }

    fn cert(&self, trust_domain: &str, id: &SpiffeId, at: SystemTime) -> Arc<CurrentCert> {
        let issuer = LocalIssuer::from_dir(&self.0, trust_domain, Duration::from_secs(3600)).expect("issuer");
        let leaf = issuer.issue(id, at).expect("leaf");
        Arc::new(CurrentCert::new(certified_key(leaf.chain, &leaf.key).expect("key")))
    }
}

impl Drop for CaDir {
    fn drop(&mut self) {
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// Runs a handshake; the error of whichever side failed, else the identity
/// the server saw.
fn handshake(client: Arc<rustls::ClientConfig>, server: Arc<rustls::ServerConfig>) -> Result<SpiffeId, String> {
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::new(10, 244, 1, 2).into());
    let mut c = rustls::ClientConnection::new(client, name).map_err(|e| e.to_string())?;
    let mut s = rustls::ServerConnection::new(server).map_err(|e| e.to_string())?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).map_err(|e| e.to_string())?;
        s.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
        s.process_new_packets().map_err(|e| format!("server: {e}"))?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).map_err(|e| e.to_string())?;
        c.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
        c.process_new_packets().map_err(|e| format!("client: {e}"))?;
        if !c.is_handshaking() && !s.is_handshaking() {
            assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));
            let peer = s.peer_certificates().and_then(|p| p.first()).ok_or("no client certificate")?;
            return spiffe_id_of(peer).map_err(|e| e.to_string());
        }
    }
    Err("the handshake did not finish".into())
}

#[test]
fn each_side_accepts_only_a_trusted_valid_peer_with_the_expected_identity() {
    let td = "cluster.local";
    let mesh = CaDir::new("ca", td);
    let other = CaDir::new("other", td);
    let trust = mesh.trust(td);
    let now = SystemTime::now();
    let order = SpiffeId::new(td, "production", "order-service").expect("id");
    let payment = SpiffeId::new(td, "production", "payment").expect("id");
    let server = |cert| trust.server_config(cert).expect("server config");
    let client = |cert, expect: &SpiffeId| trust.client_config(cert, expect.clone()).expect("client config");
    let good_client = || mesh.cert(td, &order, now);
    let good_server = || mesh.cert(td, &payment, now);

    assert_eq!(handshake(client(good_client(), &payment), server(good_server())), Ok(order.clone()), "both sides trusted");

    // What failed, on which side, and the words of its error.
    let cases: Vec<(&str, Result<SpiffeId, String>, &str, &str)> = vec![
        (
            "the server is another identity",
            handshake(client(good_client(), &order), server(good_server())),
            "client:",
            "the destination presented spiffe://cluster.local/ns/production/sa/payment, not spiffe://cluster.local/ns/production/sa/order-service",
        ),
        (
            "the server's certificate expired",
            handshake(client(good_client(), &payment), server(mesh.cert(td, &payment, now - Duration::from_secs(7200)))),
            "client:",
            "certificate expired",
        ),
        (
            "the server's CA is not trusted",
            handshake(client(good_client(), &payment), server(other.cert(td, &payment, now))),
            "client:",
            "BadSignature",
        ),
        (
            "the client's certificate expired",
            handshake(client(mesh.cert(td, &order, now - Duration::from_secs(7200)), &payment), server(good_server())),
            "server:",
            "certificate expired",
        ),
        (
            "the client's CA is not trusted",
            handshake(client(other.cert(td, &order, now), &payment), server(good_server())),
            "server:",
            "BadSignature",
        ),
    ];
    for (what, got, side, words) in cases {
        let err = got.expect_err(what);
        assert!(err.starts_with(side) && err.contains(words), "{what}: {err}");
    }
}

#[test]
fn a_client_from_another_trust_domain_is_refused_even_by_the_same_root() {
    // One root trusted for both trust domains: the server still insists on its own.
    let mesh = CaDir::new("ca", "cluster.local");
    let trust = mesh.trust("cluster.local");
    let now = SystemTime::now();
    let payment = SpiffeId::new("cluster.local", "production", "payment").expect("id");
    let foreign = SpiffeId::new("other.example", "production", "order-service").expect("id");
    let client_cert = mesh.cert("other.example", &foreign, now);
    let err = handshake(
        trust.client_config(client_cert, payment.clone()).expect("client"),
        trust.server_config(mesh.cert("cluster.local", &payment, now)).expect("server"),
    )
    .expect_err("a foreign trust domain");
    assert!(err.contains("server:") && err.contains("is not in trust domain cluster.local"), "{err}");
}
