//! The node's part of the mesh: the CA files (`--ca-dir`), a certificate for
//! every meshed pod on this node (issued here, held in memory only, renewed
//! at half-life), and the view the proxy tunnels by: the trust bundle and
//! which identity each meshed pod address in the cluster must present.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use podsteer_identity::ca;
use podsteer_identity::issuer::{Issuer as _, Leaf, LocalIssuer};
use podsteer_identity::renewal::{Backoff, renew_at};
use podsteer_identity::spiffe::SpiffeId;
use podsteer_identity::tls::base64;
use podsteer_proto::control::{MeshPeer, MeshView, WorkloadCert};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    // Boxed: an issuer error is large, and this one travels on every path.
    #[error("--ca-dir {0}")]
    Ca(PathBuf, #[source] Box<podsteer_identity::issuer::IssueError>),
    #[error("issuing a certificate")]
    Issue(#[source] Box<podsteer_identity::issuer::IssueError>),
    #[error(transparent)]
    Spiffe(#[from] podsteer_identity::spiffe::SpiffeError),
}

struct Held {
    id: SpiffeId,
    cert: WorkloadCert,
    not_before: SystemTime,
    renew_at: SystemTime,
    backoff: Backoff,
}

pub struct Mesh {
    dir: PathBuf,
    trust_domain: String,
    lifetime: Duration,
    issuer: LocalIssuer,
    bundle: Vec<String>,
    /// When the CA files were last read, to see a rotation.
    stamp: Vec<Option<SystemTime>>,
    certs: HashMap<String, Held>,
    peers: Vec<MeshPeer>,
    /// Moves whenever a certificate, the bundle or the peers change: a
    /// sidecar that asks with the one it has is told only that.
    generation: u64,
}

/// Retries of a failed renewal start here and double to the cap.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);

impl Mesh {
    pub fn open(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<Mesh, MeshError> {
        let (issuer, bundle) = read_ca(dir, trust_domain, lifetime)?;
        Ok(Mesh {
            dir: dir.into(),
            trust_domain: trust_domain.into(),
            lifetime,
            issuer,
            bundle,
            stamp: stamps(dir),
            certs: HashMap::new(),
            peers: Vec::new(),
            generation: 0,
        })
    }

    /// The pod's certificate: the one held, or a new one for `identity`.
    pub fn cert_for(&mut self, uid: &str, identity: &str) -> Result<WorkloadCert, MeshError> {
        if let Some(h) = self.certs.get(uid).filter(|h| h.id.to_string() == identity) {
            return Ok(h.cert.clone());
        }
        let id = SpiffeId::parse(identity)?;
        let leaf = self.issuer.issue(&id, SystemTime::now()).map_err(|e| MeshError::Issue(Box::new(e)))?;
        issued("new");
        self.generation += 1;
        let held = held(id, &leaf);
        let cert = held.cert.clone();
        self.certs.insert(uid.into(), held);
        Ok(cert)
    }

    pub fn forget(&mut self, uid: &str) {
        self.certs.remove(uid);
    }

    /// See the field.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn view(&self) -> MeshView {
        MeshView { trust_domain: self.trust_domain.clone(), bundle: self.bundle.clone(), peers: self.peers.clone() }
    }

    /// Replaces the peers; whether they changed.
    pub fn set_peers(&mut self, peers: Vec<MeshPeer>) -> bool {
        let changed = peers != self.peers;
        self.peers = peers;
        self.generation += u64::from(changed);
        changed
    }

    /// Renews every certificate that is due; a failure keeps the valid one
    /// and tries again with backoff. The renewed ones, for the proxy.
    pub fn renew_due(&mut self, now: SystemTime) -> Vec<(String, WorkloadCert)> {
        let mut out = Vec::new();
        for (uid, h) in self.certs.iter_mut().filter(|(_, h)| h.renew_at <= now) {
            match self.issuer.issue(&h.id, now) {
                Ok(leaf) => {
                    let backoff = h.backoff.clone();
                    *h = held(h.id.clone(), &leaf);
                    h.backoff = backoff;
                    h.backoff.succeeded();
                    issued("renewal");
                    self.generation += 1;
                    out.push((uid.clone(), h.cert.clone()));
                }
                Err(e) => {
                    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(h.cert.not_after);
                    h.renew_at = h.backoff.retry_at(now, not_after);
                    warn!(%uid, identity = %h.id, error = %podsteer_proto::error_chain(&e), "renewal failed; the valid certificate stays");
                }
            }
        }
        out
    }

    /// Re-reads the CA files when they changed: a new bundle (a rotation puts
    /// the new root beside the old) and issuer. Every certificate is then
    /// renewed at once, by the new issuer. Ok(true) when something changed;
    /// a bad set of files is refused and the last good one stays.
    pub fn reload(&mut self) -> Result<bool, MeshError> {
        let now = stamps(&self.dir);
        if now == self.stamp {
            return Ok(false);
        }
        self.stamp = now;
        let (issuer, bundle) = read_ca(&self.dir, &self.trust_domain, self.lifetime)?;
        self.issuer = issuer;
        self.bundle = bundle;
        self.generation += 1;
        for h in self.certs.values_mut() {
            h.renew_at = h.not_before;
        }
        info!(roots = self.bundle.len(), "CA files changed: new trust bundle and issuer");
        Ok(true)
    }

    /// For `status` and `podsteer certs`: the trust bundle's roots and each
    /// pod's certificate (identity, issuer, validity, next renewal), never a key.
    pub fn summary(&self) -> serde_json::Value {
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let roots: Vec<_> = self
            .bundle
            .iter()
            .filter_map(|b| podsteer_identity::tls::unbase64(b).ok())
            .map(|der| {
                let der = rustls_pki_types::CertificateDer::from(der);
                serde_json::json!({
                    "subject": podsteer_identity::tls::subject_of(&der).unwrap_or_default(),
                    "not_after": podsteer_identity::tls::not_after_of(&der).map(secs).unwrap_or_default(),
                })
            })
            .collect();
        let mut certs: Vec<_> = self
            .certs
            .iter()
            .map(|(uid, h)| {
                let issuer = h
                    .cert
                    .chain
                    .first()
                    .and_then(|c| podsteer_identity::tls::unbase64(c).ok())
                    .and_then(|der| podsteer_identity::tls::issuer_of(&rustls_pki_types::CertificateDer::from(der)).ok())
                    .unwrap_or_default();
                serde_json::json!({
                    "uid": uid,
                    "identity": h.id.to_string(),
                    "issuer": issuer,
                    "not_before": secs(h.not_before),
                    "not_after": h.cert.not_after,
                    "renew_at": secs(h.renew_at),
                })
            })
            .collect();
        certs.sort_by_key(|c| c["identity"].as_str().map(String::from));
        serde_json::json!({"trust_domain": self.trust_domain, "roots": roots, "certificates": certs})
    }
}

fn issued(action: &str) {
    crate::metrics::metrics().certificates.get_or_create(&crate::metrics::ActionLabel { action: action.into() }).inc();
}

fn read_ca(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<(LocalIssuer, Vec<String>), MeshError> {
    let err = |e| MeshError::Ca(dir.into(), Box::new(e));
    let issuer = LocalIssuer::from_dir(dir, trust_domain, lifetime).map_err(err)?;
    let bundle = ca::read_certs(&dir.join(ca::BUNDLE_FILE)).map_err(|e| err(e.into()))?;
    Ok((issuer, bundle.iter().map(|c| base64(c)).collect()))
}

fn stamps(dir: &Path) -> Vec<Option<SystemTime>> {
    [ca::BUNDLE_FILE, ca::ISSUER_CERT_FILE, ca::ISSUER_KEY_FILE]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).and_then(|m| m.modified()).ok())
        .collect()
}

fn held(id: SpiffeId, leaf: &Leaf) -> Held {
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    let cert = WorkloadCert {
        identity: id.to_string(),
        chain: leaf.chain.iter().map(|c| base64(c)).collect(),
        key: base64(leaf.key.secret_der()),
        not_after: secs(leaf.not_after),
    };
    // From when it was made (the issuer backdates not_before for clock skew).
    let made = leaf.not_before + Duration::from_secs(60);
    Held {
        id,
        cert,
        not_before: made,
        renew_at: renew_at(made, leaf.not_after, fastrand::f64()),
        backoff: Backoff::new(RETRY_FIRST, RETRY_MAX),
    }
}

/// Which of the source's pods are mesh peers, as the proxy needs them: a
/// pod with addresses, not on the host's network, meshed by the same rule
/// as this node's own pods (shared proxy or sidecar: both take HBONE).
pub fn peers(pods: &[crate::workloads::Workload], cfg: &crate::config::AgentConfig) -> Vec<MeshPeer> {
    let saved = Saved::of(cfg);
    let mut out: Vec<MeshPeer> = pods
        .iter()
        .filter(|w| saved.is_peer(w))
        .flat_map(|w| {
            let id = w.spiffe_id(&cfg.trust_domain);
            w.ips.iter().map(move |ip| MeshPeer { ip: *ip, identity: id.clone() })
        })
        .collect();
    out.sort_by_key(|p| p.ip);
    out
}

/// What `podsteer explain` needs of the agent's mesh settings to decide as
/// the proxies do, saved at start (in `status.json`) so it works with the agent stopped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Saved {
    pub workload_dir: Option<std::path::PathBuf>,
    pub policy_dir: Option<std::path::PathBuf>,
    /// The workload source is the Kubernetes API (the directories above are then its snapshots).
    #[serde(default)]
    pub kubernetes: bool,
    /// HBONE between meshed pods (`--ca-dir` was given).
    pub hbone: bool,
    pub trust_domain: String,
    pub root_namespace: String,
    pub exclude_namespaces: Vec<String>,
    pub injection: crate::policy::Injection,
}

impl Saved {
    pub fn of(c: &crate::config::AgentConfig) -> Saved {
        Saved {
            // From the API: what its watches last held, saved in the state directory.
            workload_dir: c.workload_dir.clone().or_else(|| c.kubernetes.then(|| crate::apiserver::pods_dir(&c.state_dir))),
            policy_dir: c.policy_dir.clone().or_else(|| c.kubernetes.then(|| crate::apiserver::policies_dir(&c.state_dir))),
            kubernetes: c.kubernetes,
            hbone: c.ca_dir.is_some(),
            trust_domain: c.trust_domain.clone(),
            root_namespace: c.root_namespace.clone(),
            exclude_namespaces: c.exclude_namespaces.clone(),
            injection: c.injection,
        }
    }

    /// Whether the source lists `w` as a mesh peer (see [`peers`]).
    pub fn is_peer(&self, w: &crate::workloads::Workload) -> bool {
        !w.host_network && crate::policy::skip_reason(&self.exclude_namespaces, self.injection, &w.namespace, &w.annotations).is_none()
    }
}
