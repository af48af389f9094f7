//! Where a pod's identity comes from: its service account, as the cluster
//! knows it, never as the pod's annotations claim. One trait; the source
//! built now reads a directory of Pod manifests (the lab's, and a node that
//! is handed its pods as files); a Kubernetes API watch of this node's pods
//! (kube-rs) is the production one still to come.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::warn;

/// What the source says of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `status.podIPs` (or `status.podIP`): empty until the pod has its addresses.
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
}

impl Workload {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.namespace, self.service_account)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading the workload directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
}

pub trait WorkloadSource: Send + Sync {
    /// Every pod the source knows, on every node: the mesh's peers are among them.
    fn list(&self) -> Result<Vec<Workload>, SourceError>;

    /// The pod with this UID, if the source knows it yet.
    fn lookup(&self, uid: &str) -> Result<Option<Workload>, SourceError> {
        Ok(self.list()?.into_iter().find(|w| w.uid == uid))
    }
}

/// `*.yaml`, `*.yml` and `*.json` files, each one Pod. A file that is not a
/// Pod is logged and skipped, so one bad file hides no other pod.
pub struct DirSource {
    dir: PathBuf,
}

impl DirSource {
    pub fn new(dir: &Path) -> DirSource {
        DirSource { dir: dir.into() }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodDoc {
    kind: String,
    metadata: Meta,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    status: Status,
}

#[derive(Deserialize)]
struct Meta {
    uid: Option<String>,
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    service_account_name: Option<String>,
    #[serde(default)]
    host_network: bool,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    pod_ip: Option<IpAddr>,
    #[serde(default)]
    pod_i_ps: Vec<PodIp>,
}

#[derive(Deserialize)]
struct PodIp {
    ip: IpAddr,
}

impl WorkloadSource for DirSource {
    fn list(&self) -> Result<Vec<Workload>, SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| SourceError::Dir(self.dir.clone(), e))?;
        let mut out = Vec::new();
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if !path.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json") {
                continue;
            }
            let doc = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_yaml::from_str::<PodDoc>(&t).map_err(|e| e.to_string()));
            let doc = match doc {
                Ok(d) if d.kind == "Pod" => d,
                Ok(d) => {
                    warn!(file = %path.display(), kind = d.kind, "not a Pod; skipped");
                    continue;
                }
                Err(e) => {
                    warn!(file = %path.display(), error = e, "not a Pod manifest; skipped");
                    continue;
                }
            };
            let Some(uid) = doc.metadata.uid else { continue };
            let mut ips: Vec<IpAddr> = doc.status.pod_i_ps.iter().map(|p| p.ip).collect();
            if ips.is_empty() {
                ips.extend(doc.status.pod_ip);
            }
            out.push(Workload {
                uid,
                namespace: doc.metadata.namespace.unwrap_or_else(|| "default".into()),
                name: doc.metadata.name,
                // As the API server defaults it.
                service_account: doc.spec.service_account_name.filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into()),
                labels: doc.metadata.labels,
                annotations: doc.metadata.annotations,
                ips,
                host_network: doc.spec.host_network,
            });
        }
        Ok(out)
    }
}

/// Asks `source` for `uid` until it answers or `wait` is over: a CNI ADD can
/// come before the source has heard of its pod, and a pod must not start
/// without its identity. Never called by the state manager (it would stall
/// every other pod).
pub fn wait_for(source: &dyn WorkloadSource, uid: &str, wait: Duration) -> Result<Workload, String> {
    let end = Instant::now() + wait;
    loop {
        match source.lookup(uid) {
            Ok(Some(w)) => return Ok(w),
            Ok(None) if Instant::now() >= end => {
                return Err(format!(
                    "the workload source does not know pod {uid} (waited {} ms): no identity to give it",
                    wait.as_millis()
                ));
            }
            Ok(None) => {}
            Err(e) => {
                if Instant::now() >= end {
                    return Err(crate::controller::error_chain(&e));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
