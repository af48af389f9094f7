//! The watch of every pod, and what it holds: each pod as a [`Workload`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::RwLock;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::json;
use tracing::{info, warn};

use super::client::Backoff;
use crate::workloads::{DirSource, SourceError, Workload, WorkloadSource as _};

/// Annotations no decision reads and that can be large.
const DROPPED_ANNOTATIONS: &[&str] = &["kubectl.kubernetes.io/last-applied-configuration"];

const SNAPSHOT_FILE: &str = "pods.json";

#[derive(Default)]
struct State {
    pods: HashMap<String, Workload>,
    /// The API has listed every pod since the start (or the last lost watch).
    synced: bool,
    /// `pods` holds the snapshot of an earlier run, not yet replaced.
    from_snapshot: bool,
    error: Option<String>,
    /// Changed since last saved.
    dirty: bool,
    /// Bumped on every change to what `list` returns.
    generation: u64,
}

impl State {
    fn changed(&mut self) {
        self.dirty = true;
        self.generation += 1;
    }
}

pub struct PodStore {
    state: RwLock<State>,
    dir: PathBuf,
}

impl PodStore {
    /// A store seeded from the last run's snapshot in `dir`, if there is one.
    pub fn open(dir: &Path) -> PodStore {
        let mut state = State::default();
        if dir.join(SNAPSHOT_FILE).exists()
            && let Ok(pods) = DirSource::new(dir).list()
        {
            info!(pods = pods.len(), "pods from the last run's snapshot, until the API lists them");
            state.pods = pods.into_iter().map(|w| (w.uid.clone(), w)).collect();
            state.from_snapshot = true;
        }
        PodStore { state: RwLock::new(state), dir: dir.into() }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn list(&self) -> Result<Vec<Workload>, SourceError> {
        let s = self.read();
        if !s.synced && !s.from_snapshot {
            return Err(SourceError::NotSynced(s.error.clone()));
        }
        Ok(s.pods.values().cloned().collect())
    }

    pub fn lookup(&self, uid: &str) -> Result<Option<Workload>, SourceError> {
        let s = self.read();
        match s.pods.get(uid) {
            Some(w) => Ok(Some(w.clone())),
            None if s.synced => Ok(None),
            None => Err(SourceError::NotSynced(s.error.clone())),
        }
    }

    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    pub fn status(&self) -> serde_json::Value {
        let s = self.read();
        json!({ "synced": s.synced, "from_snapshot": s.from_snapshot, "pods": s.pods.len(), "saved": !s.dirty, "error": s.error })
    }

    fn replace(&self, pods: HashMap<String, Workload>) {
        let mut s = self.write();
        info!(pods = pods.len(), "the Kubernetes API listed every pod");
        s.pods = pods;
        (s.synced, s.from_snapshot, s.error) = (true, false, None);
        s.changed();
    }

    fn apply(&self, pod: &Pod) {
        let mut s = self.write();
        match workload(pod) {
            Some(w) => {
                if s.pods.get(&w.uid) != Some(&w) {
                    s.pods.insert(w.uid.clone(), w);
                    s.changed();
                }
            }
            // Finished: its addresses are no longer its own.
            None => {
                if pod.metadata.uid.as_ref().is_some_and(|u| s.pods.remove(u).is_some()) {
                    s.changed();
                }
            }
        }
    }

    fn delete(&self, pod: &Pod) {
        let mut s = self.write();
        if pod.metadata.uid.as_ref().is_some_and(|u| s.pods.remove(u).is_some()) {
            s.changed();
        }
    }

    fn failed(&self, error: String) {
        self.write().error = Some(error);
    }

    /// Writes the snapshot if anything changed since the last one (at most
    /// once a second: a whole cluster's pods, rewritten on every change, would
    /// cost more than the window it closes). `saved` in the status says when
    /// the file has caught up.
    fn save_if_dirty(&self) {
        let items: Vec<serde_json::Value> = {
            let mut s = self.write();
            if !s.dirty {
                return;
            }
            s.dirty = false;
            s.pods.values().map(pod_json).collect()
        };
        let text = json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string();
        if let Err(e) = super::save_snapshot(&self.dir, SNAPSHOT_FILE, text.as_bytes()) {
            warn!(dir = %self.dir.display(), error = %e, "saving the pods' snapshot");
        }
    }
}

fn workload(pod: &Pod) -> Option<Workload> {
    let mut w = Workload::from_pod(pod)?;
    w.annotations.retain(|k, _| !DROPPED_ANNOTATIONS.contains(&k.as_str()));
    Some(w)
}

/// The fields of a Pod that [`Workload::from_pod`] reads, for the snapshot.
fn pod_json(w: &Workload) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "uid": w.uid, "name": w.name, "namespace": w.namespace, "labels": w.labels, "annotations": w.annotations },
        "spec": { "serviceAccountName": w.service_account, "hostNetwork": w.host_network, "nodeName": w.node_name, "containers": [] },
        "status": { "podIPs": w.ips.iter().map(|ip| json!({ "ip": ip.to_string() })).collect::<Vec<_>>() },
    })
}

/// Runs the watch for as long as the agent does.
pub async fn run(client: Client, store: std::sync::Arc<PodStore>) {
    let api: Api<Pod> = Api::all(client);
    let mut stream = pin!(watcher::watcher(api, watcher::Config::default()));
    let mut backoff = Backoff::new();
    let mut listing: HashMap<String, Workload> = HashMap::new();
    let mut save = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = stream.next() => match event {
                None => return,
                Some(Ok(event)) => {
                    backoff.reset();
                    match event {
                        Event::Init => listing.clear(),
                        Event::InitApply(pod) => listing.extend(workload(&pod).map(|w| (w.uid.clone(), w))),
                        Event::InitDone => store.replace(std::mem::take(&mut listing)),
                        Event::Apply(pod) => store.apply(&pod),
                        Event::Delete(pod) => store.delete(&pod),
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %crate::controller::error_chain(&e), "watching pods; retrying");
                    store.failed(crate::controller::error_chain(&e));
                    backoff.wait().await;
                }
            },
            _ = save.tick() => store.save_if_dirty(),
        }
    }
}
