//! The pods' listening sockets, kept open by the agent while proxies come and go.
//!
//! A listening socket lives as long as any process holds it. The proxy opens
//! each pod's four listeners and hands the agent duplicates; the agent gives
//! them to the next proxy, which accepts on the very same sockets. So when a
//! proxy exits (an upgrade, a crash), the pod's listeners stay: connections
//! queue in their backlog until the next proxy accepts them, instead of being
//! refused, and sk_lookup keeps pointing at a live socket. Removing the pod
//! closes them.

use std::collections::HashMap;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};

use podsteer_proto::control::ListenerId;

#[derive(Default)]
pub struct KeptListeners {
    by_pod: HashMap<String, Vec<(ListenerId, OwnedFd)>>,
}

impl KeptListeners {
    /// What to hand a proxy for `uid`: nothing if none is kept.
    pub fn of(&self, uid: &str) -> Vec<(ListenerId, BorrowedFd<'_>)> {
        self.by_pod.get(uid).map(|v| v.iter().map(|(id, fd)| (*id, fd.as_fd())).collect()).unwrap_or_default()
    }

    /// Keeps what a proxy answered with, replacing what was kept before (the
    /// same sockets when the proxy adopted them).
    pub fn keep(&mut self, uid: &str, listeners: Vec<(ListenerId, OwnedFd)>) {
        if !listeners.is_empty() {
            self.by_pod.insert(uid.to_owned(), listeners);
        }
    }

    /// The pod is gone: its listeners close once the proxy lets go of them too.
    pub fn forget(&mut self, uid: &str) {
        self.by_pod.remove(uid);
    }
}
