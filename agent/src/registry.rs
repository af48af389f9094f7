//! The single owner of what the agent knows about pods, saved atomically so a
//! restarted agent knows them again.

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
    #[serde(default)]
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("saving pod registry {path}")]
pub struct RegistryError {
    path: String,
    #[source]
    source: std::io::Error,
}

#[derive(Default)]
pub struct Registry {
    pods: BTreeMap<String, PodRecord>,
    path: Option<PathBuf>,
}

impl Registry {
    /// Loads the saved registry; a missing or unreadable file starts empty (repair fills it).
    pub fn load(path: Option<PathBuf>) -> Registry {
        let pods = path
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Registry { pods, path }
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

    pub fn by_netns(&self, netns: &Path) -> Option<&PodRecord> {
        self.pods.values().find(|p| p.netns == netns)
    }

    pub fn insert(&mut self, rec: PodRecord) -> Result<(), RegistryError> {
        self.pods.insert(rec.uid.clone(), rec);
        self.save()
    }

    pub fn remove(&mut self, uid: &str) -> Result<Option<PodRecord>, RegistryError> {
        let r = self.pods.remove(uid);
        self.save()?;
        Ok(r)
    }

    pub fn save(&self) -> Result<(), RegistryError> {
        let Some(path) = &self.path else { return Ok(()) };
        let err = |source| RegistryError { path: path.display().to_string(), source };
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(&self.pods).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}
