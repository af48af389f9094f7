//! cgroup v2 directories under the lab's own subtree.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

/// Finds the cgroup v2 mount in /proc/mounts; its place differs between hosts.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup2 filesystem is mounted")
}

/// Every cgroup v1 hierarchy's mount point. On a hybrid host runc also makes
/// v1 directories for containers, named after their cgroup parent.
pub fn v1_roots() -> Vec<PathBuf> {
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup").then(|| PathBuf::from(dir))
        })
        .collect()
}

/// Removes `<v1 root>/<name>` in every v1 hierarchy on drop: what runc made
/// for containers whose cgroup parent starts with a lab's name.
#[derive(Debug)]
pub struct V1Dirs {
    pub name: String,
}

impl Drop for V1Dirs {
    fn drop(&mut self) {
        for root in v1_roots() {
            if let Err(e) = remove_tree(&root.join(&self.name)) {
                eprintln!("lab: removing v1 cgroup {}/{}: {e:#}", root.display(), self.name);
            }
        }
    }
}

/// A cgroup directory the lab made; removed on drop once its processes are gone.
#[derive(Debug)]
pub struct CgroupDir {
    path: PathBuf,
}

impl CgroupDir {
    pub fn create(path: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(CgroupDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn procs(&self) -> Vec<i32> {
        read_procs(&self.path)
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            eprintln!("lab: removing cgroup {}: {e:#}", self.path.display());
        }
    }
}

pub fn read_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Removes a cgroup directory and its children, deepest first. A process that
/// was just killed leaves its cgroup a moment later, so emptiness is awaited.
pub fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    // Every process in a lab cgroup was started by the lab, so cgroup.kill ends only ours.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    crate::wait::until(&format!("cgroup {} to empty", dir.display()), Duration::from_secs(5), || match fs::remove_dir(dir) {
        Ok(()) => Some(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(()),
        Err(_) => None,
    })
}
