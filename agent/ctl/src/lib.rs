//! `podsteer`, the debug CLI. It reads the pinned maps and the agent's saved
//! state directly, so it works with the agent stopped, and asks the agent's
//! socket for what only a running agent knows.

pub mod authz;
pub mod certs;
pub mod explain;
pub mod maps;
pub mod output;
pub mod status;

use std::path::{Path, PathBuf};

use podsteer_agent::registry::PodRecord;

/// Exit codes, after sysexits(3).
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILURE: i32 = 1;
    pub const USAGE: i32 = 64;
    pub const NO_SUCH_POD: i32 = 66;
    pub const UNAVAILABLE: i32 = 69;
    pub const NO_PERMISSION: i32 = 77;
}

/// A failure the CLI explains in one line, with its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CtlError {
    pub code: i32,
    pub message: String,
}

impl CtlError {
    pub fn new(code: i32, message: impl Into<String>) -> CtlError {
        CtlError { code, message: message.into() }
    }
}

/// Where the node's podsteer state lives.
#[derive(Clone, Debug)]
pub struct Paths {
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub cni_conf_dir: PathBuf,
}

impl Paths {
    /// Pods the agent registered, from its saved registry (no agent needed).
    pub fn registry(&self) -> Vec<PodRecord> {
        podsteer_agent::registry::Registry::load(&self.state_dir.join("pods.json")).all().cloned().collect()
    }
}

/// Reading pins and netns needs root (or CAP_BPF and CAP_SYS_ADMIN).
pub fn require_root() -> Result<(), CtlError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(CtlError::new(exit::NO_PERMISSION, "podsteer reads BPF pins and the agent's state, which needs root: run it with sudo"))
    }
}

pub fn require_pins(bpffs: &Path) -> Result<(), CtlError> {
    let pins = podsteer_agent::ebpf::pins::PinDir::new(bpffs);
    if pins.exists() {
        Ok(())
    } else {
        Err(CtlError::new(
            exit::UNAVAILABLE,
            format!(
                "no pinned podsteer state under {}: the agent has not run in eBPF mode on this node (or was uninstalled)",
                pins.root().display()
            ),
        ))
    }
}
