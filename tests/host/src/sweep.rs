//! Removes every lab leftover by name prefix: what a killed test run left behind.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cgroup::{cgroup2_root, remove_tree, v1_roots};
use crate::names::{PREFIX, STATE_ROOT};
use crate::netns::{NETNS_DIR, remove_named};
use crate::process::kill_recorded;

/// Where podsteer pins live on a real node; lab pins also carry the prefix.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Removes all lab resources and says what it removed (empty when the machine was clean).
pub fn sweep() -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    for dir in prefixed(Path::new(STATE_ROOT), "")? {
        let n = kill_recorded(&dir);
        if n > 0 {
            removed.push(format!("{n} process(es) recorded in {}", dir.display()));
        }
    }
    for dir in prefixed(Path::new(STATE_ROOT), "")? {
        unmount_below(&dir);
        fs::remove_dir_all(&dir)?;
        removed.push(format!("state {}", dir.display()));
    }
    for ns in prefixed(Path::new(NETNS_DIR), PREFIX)? {
        remove_named(&ns)?;
        removed.push(format!("netns {}", ns.display()));
    }
    let mut roots = vec![cgroup2_root()?];
    roots.extend(v1_roots());
    for root in roots {
        for cg in prefixed(&root, PREFIX)? {
            remove_tree(&cg)?;
            removed.push(format!("cgroup {}", cg.display()));
        }
    }
    for pin in prefixed(Path::new(BPFFS_ROOT), PREFIX)? {
        unmount_below(&pin);
        if pin.is_dir() {
            fs::remove_dir_all(&pin)?
        } else {
            fs::remove_file(&pin)?
        }
        removed.push(format!("bpffs {}", pin.display()));
    }
    Ok(removed)
}

/// Lists the entries of `dir` whose names start with `prefix`; a missing dir has none.
fn prefixed(dir: &Path, prefix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    Ok(entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).map(|e| e.path()).collect())
}

/// Lazily unmounts everything mounted at or below `dir` (bpffs, runtime state), deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else { return };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}
