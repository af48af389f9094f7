//! A netns is an fd. `run` enters it on the current thread for one synchronous
//! step (creating a socket) and always switches back: sockets keep the netns
//! they were made in, so the thread can go on serving every pod.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("setns into the pod's netns")]
    Enter(#[source] nix::Error),
    #[error("opening the proxy's own netns")]
    Own(#[source] std::io::Error),
}

/// Where the proxy's sockets for one pod are made.
#[derive(Clone, Debug)]
pub enum PodNetns {
    /// Per-pod (sidecar) mode: the proxy already lives in the pod's netns.
    Current,
    /// Shared mode: the pod's netns, and the node's to return to.
    Enter { pod: Arc<OwnedFd>, home: Arc<File> },
}

impl PodNetns {
    pub fn enter(pod: OwnedFd) -> Result<PodNetns, NetnsError> {
        let home = File::open("/proc/thread-self/ns/net").map_err(NetnsError::Own)?;
        Ok(PodNetns::Enter { pod: Arc::new(pod), home: Arc::new(home) })
    }

    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        match self {
            PodNetns::Current => Ok(f()),
            PodNetns::Enter { pod, home } => {
                setns(pod.as_fd(), CloneFlags::CLONE_NEWNET).map_err(NetnsError::Enter)?;
                let out = f();
                if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
                    // A worker left in a pod's netns would make the next pod's sockets
                    // in the wrong place; there is no safe way to go on.
                    tracing::error!(error = %e, "cannot return to the proxy's netns; aborting");
                    std::process::abort();
                }
                Ok(out)
            }
        }
    }
}
