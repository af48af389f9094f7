//! Names of everything the lab creates, so one sweep can find them all.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// Every netns, cgroup, bpffs pin and state directory of the lab starts with this.
pub const PREFIX: &str = "podsteer-";

/// Where each lab keeps its state (CNI cache, IPAM data, recorded PIDs).
pub const STATE_ROOT: &str = "/run/podsteer-lab";

/// Identifies one lab node; unique within the machine for the life of the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabId(String);

impl LabId {
    pub fn fresh() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        LabId(format!("{PREFIX}{}-{n}", std::process::id()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Name of a network namespace owned by this lab (`<id>-<role>`).
    pub fn netns_name(&self, role: &str) -> String {
        format!("{}-{role}", self.0)
    }

    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(STATE_ROOT).join(&self.0)
    }
}

impl std::fmt::Display for LabId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
