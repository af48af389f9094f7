//! What the agent knows about pods, owned by the state manager and saved
//! atomically (by a writer thread) so a restarted agent knows them again.

mod writer;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mode::Mode;
use crate::policy::Policy;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub container_id: Option<String>,
    pub mode: Mode,
    pub policy: Policy,
    /// Set once the proxy confirmed this pod's listeners.
    #[serde(default)]
    pub proxy_ready: bool,
    /// The pod's return path is installed, so the proxy connects to the app
    /// from the client's address (see [`crate::return_path`]).
    #[serde(default)]
    pub keeps_client_address: bool,
    /// Its SPIFFE ID, from the workload source (`--workload-dir`).
    #[serde(default)]
    pub identity: Option<String>,
    /// Its labels, from the workload source: what policies select on.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub last_error: Option<String>,
}

#[derive(Default)]
pub struct Registry {
    pods: BTreeMap<String, PodRecord>,
    /// Only the agent's registry writes; `podsteer` reads a snapshot.
    writer: Option<writer::Writer>,
    /// Cookie -> pod, published after every change for the telemetry thread.
    names: crate::telemetry::PodNames,
}

impl Registry {
    /// Reads the saved registry; a missing or unreadable file is empty (repair fills it).
    pub fn load(path: &Path) -> Registry {
        let pods = std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Registry { pods, writer: None, names: Default::default() }
    }

    /// The agent's registry: loaded, and saved after every change.
    pub fn open(path: PathBuf) -> std::io::Result<Registry> {
        let mut r = Registry::load(&path);
        r.writer = Some(writer::Writer::spawn(path)?);
        r.publish_names();
        Ok(r)
    }

    /// Who each netns cookie is, kept current with every change.
    pub fn names(&self) -> crate::telemetry::PodNames {
        self.names.clone()
    }

    fn publish_names(&self) {
        let all = self.pods.values().map(|p| {
            (
                p.netns_cookie,
                crate::telemetry::PodName {
                    label: format!("{}/{}", p.namespace, p.name),
                    identity: p.identity.clone().unwrap_or_default(),
                },
            )
        });
        self.names.publish(all.collect());
    }

    pub fn get(&self, uid: &str) -> Option<&PodRecord> {
        self.pods.get(uid)
    }

    pub fn get_mut(&mut self, uid: &str) -> Option<&mut PodRecord> {
        self.pods.get_mut(uid)
    }

    pub fn all(&self) -> impl Iterator<Item = &PodRecord> {
        self.pods.values()
    }

    pub fn insert(&mut self, rec: PodRecord) {
        self.pods.insert(rec.uid.clone(), rec);
        self.save();
    }

    pub fn remove(&mut self, uid: &str) -> Option<PodRecord> {
        let r = self.pods.remove(uid);
        self.save();
        r
    }

    /// Hands the writer a snapshot; returns at once.
    pub fn save(&self) {
        let Some(w) = &self.writer else { return };
        self.publish_names();
        match serde_json::to_vec(&self.pods) {
            Ok(body) => w.submit(body),
            // Plain data always serializes; should it not, the last good file stays.
            Err(e) => tracing::warn!(error = %e, "serializing the pod registry"),
        }
    }

    /// Waits (boundedly) until the newest state is on disk: after an ADD, and
    /// before the agent exits.
    pub fn flush(&self) {
        if let Some(w) = &self.writer {
            w.flush(std::time::Duration::from_secs(5));
        }
    }
}
