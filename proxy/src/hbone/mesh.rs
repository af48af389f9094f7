//! What the agent tells the proxy of the mesh: the trust bundle and the
//! identity each meshed pod address must present (one [`View`], replaced
//! whole), and, per meshed pod, its own certificate, renewed in place.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use podsteer_identity::spiffe::SpiffeId;
use podsteer_identity::tls::{CurrentCert, TlsError, Trust};
use podsteer_proto::control::{MeshView, WorkloadCert};

#[derive(Default)]
pub struct View {
    pub trust: Option<Arc<Trust>>,
    pub peers: HashMap<IpAddr, SpiffeId>,
}

/// The node-wide view; read on every outbound connection, written when the
/// agent sends a new one.
#[derive(Default)]
pub struct Mesh(RwLock<Arc<View>>);

impl Mesh {
    pub fn get(&self) -> Arc<View> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the view; a bad one is refused whole and the last one stays.
    pub fn set(&self, v: &MeshView) -> Result<usize, String> {
        let bundle = v
            .bundle
            .iter()
            .map(|b| podsteer_identity::tls::unbase64(b).map(rustls_pki_types::CertificateDer::from))
            .collect::<Result<Vec<_>, TlsError>>()
            .map_err(|e| e.to_string())?;
        let trust = Trust::new(&v.trust_domain, &bundle).map_err(|e| e.to_string())?;
        let mut peers = HashMap::with_capacity(v.peers.len());
        for p in &v.peers {
            let id = SpiffeId::parse(&p.identity).map_err(|e| format!("peer {}: {e}", p.ip))?;
            peers.insert(p.ip.to_canonical(), id);
        }
        let n = peers.len();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(View { trust: Some(Arc::new(trust)), peers });
        Ok(n)
    }
}

/// A meshed pod's side of HBONE.
pub struct PodTls {
    pub id: SpiffeId,
    pub cert: Arc<CurrentCert>,
}

impl PodTls {
    pub fn new(cert: &WorkloadCert) -> Result<PodTls, String> {
        let id = SpiffeId::parse(&cert.identity).map_err(|e| e.to_string())?;
        let key = podsteer_identity::tls::certified_key_from_wire(&cert.chain, &cert.key).map_err(|e| e.to_string())?;
        check_matches(&id, &key)?;
        Ok(PodTls { id, cert: Arc::new(CurrentCert::new(key)) })
    }

    /// A renewal: the same identity, a new certificate.
    pub fn renew(&self, cert: &WorkloadCert) -> Result<(), String> {
        let key = podsteer_identity::tls::certified_key_from_wire(&cert.chain, &cert.key).map_err(|e| e.to_string())?;
        check_matches(&self.id, &key)?;
        self.cert.replace(key);
        Ok(())
    }
}

/// The certificate must name the identity it is sent for.
fn check_matches(id: &SpiffeId, key: &rustls::sign::CertifiedKey) -> Result<(), String> {
    let leaf = key.end_entity_cert().map_err(|e| e.to_string())?;
    let named = podsteer_identity::tls::spiffe_id_of(leaf).map_err(|e| e.to_string())?;
    if &named != id {
        return Err(format!("the certificate names {named}, not {id}"));
    }
    Ok(())
}
