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
    /// The bundle `trust` was built from: an unchanged one keeps the same
    /// `Trust`, and pooled connections with it (see [`super::pool`]).
    bundle: Vec<String>,
    pub peers: HashMap<IpAddr, SpiffeId>,
}

/// The node-wide view; read on every outbound connection, written when the
/// agent sends a new one. `trust_changed` tells the HBONE listeners, whose
/// connections were verified with the old trust.
pub struct Mesh(RwLock<Arc<View>>, tokio::sync::watch::Sender<u64>);

impl Default for Mesh {
    fn default() -> Self {
        Mesh(RwLock::default(), tokio::sync::watch::channel(0).0)
    }
}

impl Mesh {
    /// Changes each time the trust does.
    pub fn trust_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.1.subscribe()
    }

    pub fn get(&self) -> Arc<View> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the view; a bad one is refused whole and the last one stays.
    pub fn set(&self, v: &MeshView) -> Result<usize, String> {
        let current = self.get();
        let trust = match &current.trust {
            Some(t) if current.bundle == v.bundle && t.trust_domain() == v.trust_domain => t.clone(),
            _ => Arc::new(Self::trust(v)?),
        };
        let mut peers = HashMap::with_capacity(v.peers.len());
        for p in &v.peers {
            let id = SpiffeId::parse(&p.identity).map_err(|e| format!("peer {}: {e}", p.ip))?;
            peers.insert(p.ip.to_canonical(), id);
        }
        let n = peers.len();
        let changed = current.trust.as_ref().is_none_or(|t| !Arc::ptr_eq(t, &trust));
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(View { trust: Some(trust), bundle: v.bundle.clone(), peers });
        if changed {
            self.1.send_modify(|g| *g += 1);
        }
        Ok(n)
    }

    fn trust(v: &MeshView) -> Result<Trust, String> {
        let bundle = v
            .bundle
            .iter()
            .map(|b| podsteer_identity::tls::unbase64(b).map(rustls_pki_types::CertificateDer::from))
            .collect::<Result<Vec<_>, TlsError>>()
            .map_err(|e| e.to_string())?;
        Trust::new(&v.trust_domain, &bundle).map_err(|e| e.to_string())
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
