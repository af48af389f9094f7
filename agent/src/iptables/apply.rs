//! Runs the plan inside a pod's netns with the node's iptables backend.

use std::io::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::plan::Family;

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed { program: String, stderr: String },
}

/// Which iptables the node uses. Rules in the other backend would be invisible
/// to the node's own tooling, so podsteer follows the node, as Istio and Linkerd do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    fn program(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let kind = match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        };
        format!("{base}-{kind}-{tool}")
    }

    /// Picks the backend holding more rules in the caller's netns; nft on a tie,
    /// since that is what current distributions default to.
    pub fn detect() -> Backend {
        let count = |b: Backend| {
            Command::new(b.program(Family::V4, "save"))
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("-A ")).count())
                .unwrap_or(0)
        };
        if count(Backend::Legacy) > count(Backend::Nft) { Backend::Legacy } else { Backend::Nft }
    }

    /// `iptables-save` of the tables podsteer touches, inside `netns`.
    pub fn save(self, netns: BorrowedFd<'_>, family: Family) -> Result<String, IptablesError> {
        let r = self.save_inner(netns, family);
        count("save", &r);
        r
    }

    /// Applies a plan atomically with `iptables-restore --noflush` inside `netns`.
    pub fn restore(self, netns: BorrowedFd<'_>, family: Family, plan: &str) -> Result<(), IptablesError> {
        let r = self.restore_inner(netns, family, plan);
        count("restore", &r);
        r
    }

    fn save_inner(self, netns: BorrowedFd<'_>, family: Family) -> Result<String, IptablesError> {
        let program = self.program(family, "save");
        let mut save = String::new();
        for table in super::plan::TABLE_NAMES {
            let out = in_netns(Command::new(&program).args(["-t", table]), netns)
                .output()
                .map_err(|source| IptablesError::Spawn { program: program.clone(), source })?;
            if !out.status.success() {
                return Err(IptablesError::Failed { program, stderr: String::from_utf8_lossy(&out.stderr).into() });
            }
            save += &String::from_utf8_lossy(&out.stdout);
        }
        Ok(save)
    }

    fn restore_inner(self, netns: BorrowedFd<'_>, family: Family, plan: &str) -> Result<(), IptablesError> {
        let program = self.program(family, "restore");
        let spawn_err = |source| IptablesError::Spawn { program: program.clone(), source };
        let mut child = in_netns(Command::new(&program).arg("--noflush"), netns)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(plan.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(IptablesError::Failed { program, stderr: String::from_utf8_lossy(&out.stderr).trim().into() });
        }
        Ok(())
    }
}

fn count<T>(op: &str, r: &Result<T, IptablesError>) {
    let labels = crate::metrics::OpResult { op: op.into(), result: crate::metrics::result(r) };
    crate::metrics::metrics().iptables.get_or_create(&labels).inc();
}

fn in_netns<'c>(cmd: &'c mut Command, netns: BorrowedFd<'_>) -> &'c mut Command {
    let fd = netns.as_raw_fd();
    // SAFETY: setns is async-signal-safe; the fd stays open until exec (no CLOEXEC race:
    // the parent holds it for the whole spawn).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}
