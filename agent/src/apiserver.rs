//! The Kubernetes API as the node's source of who each pod is and of the
//! mesh's security policies (`--kubernetes`): one watch of every pod (the
//! node's own, for identities, and everyone's, for the mesh peers) and, unless
//! `--policy-dir` names files instead, of Istio's `AuthorizationPolicy` and
//! `PeerAuthentication`. A thread of its own runs the watches on a
//! single-threaded runtime; the agent reads what they hold without waiting.
//!
//! What the watches last held is saved in the state directory, so an agent
//! that restarts answers at once from it (and `podsteer explain` reads it with
//! the agent stopped) until the API has listed everything again.

mod client;
mod pods;
mod policies;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use client::ApiError;
pub use policies::PolicyText;

use crate::workloads::{SourceError, Workload, WorkloadSource};

/// Where the watches' last contents are saved, under the agent's state directory.
pub fn snapshot_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("kubernetes")
}

/// The pods' snapshot directory: one `List` of Pods, readable by `DirSource`.
pub fn pods_dir(state_dir: &Path) -> PathBuf {
    snapshot_dir(state_dir).join("pods")
}

/// The policies' snapshot directory: the last good set, as the files source reads it.
pub fn policies_dir(state_dir: &Path) -> PathBuf {
    snapshot_dir(state_dir).join("policies")
}

/// Writes `dir/name` whole (a reader, or the next run after a crash, sees the
/// old file or the new one).
pub fn save_snapshot(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    crate::sys::replace_file(&dir.join(name), bytes, 0o600)
}

/// A handle on the watches; cheap to clone.
#[derive(Clone)]
pub struct ApiSource {
    pods: Arc<pods::PodStore>,
    policies: Option<Arc<policies::PolicyStore>>,
}

impl ApiSource {
    /// Connects (in-cluster, or with `kubeconfig`) and starts the watches.
    /// A configuration that cannot be used fails here, before anything else
    /// starts; an API server that does not answer yet does not: the watches
    /// retry with backoff and the agent answers from the snapshot meanwhile.
    pub fn start(kubeconfig: Option<&Path>, state_dir: &Path, watch_policies: bool) -> Result<ApiSource, ApiError> {
        let pods = Arc::new(pods::PodStore::open(&pods_dir(state_dir)));
        let policies = watch_policies.then(|| Arc::new(policies::PolicyStore::default()));
        let source = ApiSource { pods, policies };
        client::spawn(kubeconfig, source.clone(), Duration::from_secs(10))?;
        Ok(source)
    }

    /// The policies' text when the API has listed both kinds and it may
    /// have changed since generation `seen` (None before, unchanged, or
    /// without the policy watch).
    pub fn policy_text_since(&self, seen: Option<u64>) -> Option<PolicyText> {
        self.policies.as_ref()?.text_since(seen)
    }

    /// What `podsteer status` shows of the API.
    pub fn status(&self) -> serde_json::Value {
        let mut v = self.pods.status();
        if let Some(p) = &self.policies {
            v["policies"] = p.status();
        }
        v
    }
}

impl WorkloadSource for ApiSource {
    fn list(&self) -> Result<Vec<Workload>, SourceError> {
        self.pods.list()
    }

    fn lookup(&self, uid: &str) -> Result<Option<Workload>, SourceError> {
        self.pods.lookup(uid)
    }

    fn generation(&self) -> Option<u64> {
        Some(self.pods.generation())
    }
}
