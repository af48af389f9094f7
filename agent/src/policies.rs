//! The node's security policy files (`--policy-dir`): every
//! `AuthorizationPolicy` and `PeerAuthentication` there, validated as one
//! bundle whenever a file changes. A bundle with one invalid document is
//! refused, logged and counted, and the last good one stays in force; with
//! none good since the start, the proxy is told to refuse inbound, never to
//! let everything in.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use podsteer_authz::source::{self, Bundle};
use tracing::{info, warn};

pub struct PolicyFiles {
    dir: PathBuf,
    pub root_namespace: String,
    /// What the directory held when last read: names, sizes and times.
    stamp: Vec<(PathBuf, u64, Option<SystemTime>)>,
    /// The last good text and its bundle.
    good: Option<(String, Bundle)>,
    /// Why the newest files were refused, while they are.
    pub refused: Option<String>,
}

impl PolicyFiles {
    pub fn open(dir: &Path, root_namespace: &str) -> PolicyFiles {
        let mut p = PolicyFiles { dir: dir.into(), root_namespace: root_namespace.into(), stamp: Vec::new(), good: None, refused: None };
        p.poll();
        p
    }

    /// Re-reads the files if they changed; whether what the proxy must hold changed.
    pub fn poll(&mut self) -> bool {
        let stamp = stamps(&self.dir);
        if !self.stamp.is_empty() && stamp == self.stamp {
            return false;
        }
        self.stamp = stamp;
        match source::read_dir(&self.dir) {
            Ok((text, bundle)) => {
                info!(
                    dir = %self.dir.display(),
                    authorization = bundle.authorization.len(),
                    peer_authentication = bundle.peer_authentication.len(),
                    "security policies"
                );
                let changed = self.good.as_ref().is_none_or(|(t, _)| *t != text);
                self.good = Some((text, bundle));
                self.refused = None;
                changed
            }
            Err(e) => {
                let why = podsteer_proto::error_chain(&e);
                warn!(error = %why, kept = self.good.is_some(), "security policies refused; the last good ones stay in force");
                crate::metrics::metrics().policies_refused.inc();
                self.refused = Some(why);
                false
            }
        }
    }

    pub fn bundle(&self) -> Option<&Bundle> {
        self.good.as_ref().map(|(_, b)| b)
    }

    /// The message for the proxy: the text in a sealed memfd, or "closed"
    /// when there has never been a good bundle.
    pub fn message(&self) -> std::io::Result<(bool, Option<OwnedFd>)> {
        match &self.good {
            None => Ok((true, None)),
            Some((text, _)) => Ok((false, Some(sealed(text)?))),
        }
    }
}

fn stamps(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok().map(|m| (e.path(), m.len(), m.modified().ok())))
        .collect();
    v.sort();
    v
}

/// A memfd holding `text`, sealed so the proxy reads exactly what was validated.
fn sealed(text: &str) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create("podsteer-policies", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let mut f = std::fs::File::from(fd);
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    let fd = OwnedFd::from(f);
    fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL))?;
    Ok(fd)
}
