//! Layout of podsteer's pins on a bpffs. Interception keeps working from these
//! while the agent is down, and the debug CLI reads them.

use std::path::{Path, PathBuf};

/// `<bpffs>/podsteer/{maps,links}`.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

/// The sub-directory podsteer owns on the bpffs.
pub const PIN_SUBDIR: &str = "podsteer";

impl PinDir {
    pub fn new(bpffs: &Path) -> Self {
        PinDir { root: bpffs.join(PIN_SUBDIR) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// A cgroup program's link, named after the program.
    pub fn link(&self, program: &str) -> PathBuf {
        self.links().join(program)
    }

    /// A pod's sk_lookup link, named by its netns cookie.
    pub fn pod_link(&self, netns_cookie: u64) -> PathBuf {
        self.links().join(format!("sk_lookup-{netns_cookie}"))
    }

    /// Netns cookies of every pod with a pinned sk_lookup link.
    pub fn pod_links(&self) -> Vec<u64> {
        std::fs::read_dir(self.links())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("sk_lookup-")?.parse().ok())
            .collect()
    }

    pub fn exists(&self) -> bool {
        self.maps().is_dir()
    }
}
