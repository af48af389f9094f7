//! Where a pod's identity comes from: its service account, as the cluster
//! knows it, never as the pod's annotations claim. One trait, two sources:
//! the Kubernetes API (`crate::apiserver`, a watch of every pod) and a
//! directory of Pod manifests (the lab's, and a node handed its pods as
//! files). Both read the same object, Kubernetes' own `Pod`, through
//! [`Workload::from_pod`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
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
    /// `spec.nodeName`: where the scheduler put it (None in a manifest without it).
    pub node_name: Option<String>,
}

impl Workload {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.namespace, self.service_account)
    }

    /// The workload a Pod object describes; None without a UID, or once the
    /// pod has finished (`Succeeded`, `Failed`): its addresses may already
    /// belong to another pod, which must not be taken for it.
    pub fn from_pod(pod: &Pod) -> Option<Workload> {
        let meta = &pod.metadata;
        let status = pod.status.as_ref();
        if status.and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed") {
            return None;
        }
        let mut ips: Vec<IpAddr> =
            status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().filter_map(|p| p.ip.parse().ok()).collect();
        if ips.is_empty() {
            ips.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse::<IpAddr>().ok()));
        }
        let spec = pod.spec.as_ref();
        Some(Workload {
            uid: meta.uid.clone().filter(|u| !u.is_empty())?,
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
            // As the API server defaults it.
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            node_name: spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading the workload directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// The Kubernetes API has not answered the first full list yet (or lost
    /// it and has not listed again): what it would say is not known.
    #[error("the Kubernetes API has not listed the pods yet{}", .0.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    NotSynced(Option<String>),
}

pub trait WorkloadSource: Send + Sync {
    /// Every pod the source knows, on every node: the mesh's peers are among them.
    fn list(&self) -> Result<Vec<Workload>, SourceError>;

    /// The pod with this UID, if the source knows it yet.
    fn lookup(&self, uid: &str) -> Result<Option<Workload>, SourceError> {
        Ok(self.list()?.into_iter().find(|w| w.uid == uid))
    }

    /// A number that changes whenever [`WorkloadSource::list`] may: a caller
    /// that saw it before may skip listing. None: always list (files).
    fn generation(&self) -> Option<u64> {
        None
    }
}

/// `*.yaml`, `*.yml` and `*.json` files, each one Pod or a `List` of them
/// (as `kubectl get pods -o yaml` prints). A file that is neither is logged
/// and skipped, so one bad file hides no other pod.
pub struct DirSource {
    dir: PathBuf,
}

impl DirSource {
    pub fn new(dir: &Path) -> DirSource {
        DirSource { dir: dir.into() }
    }
}

/// The pods of one manifest: a Pod, or a `List`/`PodList` of them.
fn pods_of(text: &str) -> Result<Vec<Pod>, String> {
    let value: serde_json::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let one = |v: serde_json::Value| serde_json::from_value::<Pod>(v).map_err(|e| e.to_string());
    match value.get("kind").and_then(|k| k.as_str()) {
        Some("List" | "PodList") => match value.get("items") {
            Some(serde_json::Value::Array(items)) => items.iter().cloned().map(one).collect(),
            _ => Ok(Vec::new()),
        },
        _ => Ok(vec![one(value)?]),
    }
}

impl WorkloadSource for DirSource {
    fn list(&self) -> Result<Vec<Workload>, SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| SourceError::Dir(self.dir.clone(), e))?;
        let mut out = Vec::new();
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if !path.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json") {
                continue;
            }
            match std::fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|t| pods_of(&t)) {
                Ok(pods) => out.extend(pods.iter().filter_map(Workload::from_pod)),
                Err(e) => warn!(file = %path.display(), error = e, "not a Pod manifest; skipped"),
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: order\n  namespace: production\n  uid: u1\nspec:\n  nodeName: n1\n  containers: []\nstatus:\n  podIP: 10.0.0.5\n";

    #[test]
    fn a_pod_is_its_namespace_its_account_and_its_addresses() {
        let pods = pods_of(POD).expect("a Pod");
        let w = Workload::from_pod(&pods[0]).expect("a workload");
        assert_eq!(w.spiffe_id("cluster.local"), "spiffe://cluster.local/ns/production/sa/default", "the API's default account");
        assert_eq!(w.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()], "podIP when podIPs is absent");
        assert_eq!(w.node_name.as_deref(), Some("n1"));
    }

    #[test]
    fn a_finished_pod_is_no_one_and_a_list_holds_many() {
        let done = POD.replace("status:\n", "status:\n  phase: Succeeded\n");
        assert!(Workload::from_pod(&pods_of(&done).unwrap()[0]).is_none(), "its address may be another pod's now");
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}",
            serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(POD).unwrap()).unwrap(),
            serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(&POD.replace("uid: u1", "uid: u2")).unwrap()).unwrap()
        );
        let uids: Vec<String> = pods_of(&list).unwrap().iter().filter_map(Workload::from_pod).map(|w| w.uid).collect();
        assert_eq!(uids, ["u1", "u2"]);
        assert!(pods_of("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n").is_err(), "not a Pod");
    }
}
