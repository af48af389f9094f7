//! Who is on the other end of the agent socket, and what they may ask.
//!
//! The socket is owner-only (root), but root also runs inside pods: a sidecar
//! proxy in eBPF mode must reach the agent to register its inbound listener,
//! so a pod's processes can reach it too. Every connection is therefore
//! classified by the peer's credentials (SO_PEERCRED) and network namespace,
//! and each request is authorized for that caller:
//!
//! | caller | may send |
//! | --- | --- |
//! | node: root in the agent's netns (or one named by `--node-netns`): the CNI plugin, the CLI | everything |
//! | a registered pod's netns (a sidecar, or anything else in that pod) | `RegisterListener` and `SidecarMesh` for its own pod only |
//! | root in any other netns (an unmeshed pod that mounts the socket, a pod mid-ADD) | nothing |
//! | anyone else (not root) | nothing |

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use crate::api::Request;

/// A network namespace, by the identity of its nsfs inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetnsId {
    dev: u64,
    ino: u64,
}

impl NetnsId {
    pub fn of(path: &Path) -> std::io::Result<NetnsId> {
        let m = std::fs::metadata(path)?;
        Ok(NetnsId { dev: m.dev(), ino: m.ino() })
    }

    #[cfg(test)]
    pub(crate) fn for_test(dev: u64, ino: u64) -> NetnsId {
        NetnsId { dev, ino }
    }

    /// The netns the agent itself runs in: the node's.
    pub fn own() -> std::io::Result<NetnsId> {
        NetnsId::of(Path::new("/proc/self/ns/net"))
    }
}

/// The peer process of one connection, read when it connected.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub netns: NetnsId,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("reading the peer's credentials (SO_PEERCRED)")]
    Credentials(#[source] nix::Error),
    #[error("the peer's pid is not in the agent's pid namespace: run the agent with hostPID")]
    OtherPidNamespace,
    #[error("reading the network namespace of peer pid {pid}")]
    Netns {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

impl Peer {
    pub fn of(sock: &impl AsFd) -> Result<Peer, PeerError> {
        let cred =
            nix::sys::socket::getsockopt(&sock.as_fd(), nix::sys::socket::sockopt::PeerCredentials).map_err(PeerError::Credentials)?;
        let pid = cred.pid();
        if pid == 0 {
            return Err(PeerError::OtherPidNamespace);
        }
        let netns = NetnsId::of(Path::new(&format!("/proc/{pid}/ns/net"))).map_err(|source| PeerError::Netns { pid, source })?;
        Ok(Peer { pid, uid: cred.uid(), netns })
    }
}

/// Who may say Hello on the proxy control socket and so receive every pod's
/// netns: a process with the configured uid, in the node's own netns (the
/// shared proxy is a node process). Its pid is the one SO_PEERCRED gives, never
/// the one its Hello claims (and containers see other pid namespaces anyway).
#[derive(Clone, Copy, Debug)]
pub struct ProxyIdentity {
    pub uid: u32,
    pub netns: NetnsId,
}

impl ProxyIdentity {
    pub fn check(&self, peer: &Peer) -> Result<(), String> {
        if peer.uid != self.uid {
            return Err(format!("peer uid {} is not the proxy's {}", peer.uid, self.uid));
        }
        if peer.netns != self.netns {
            return Err(format!("peer pid {} is not in the node's network namespace", peer.pid));
        }
        Ok(())
    }
}

/// What the agent knows the caller to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A root process in the node's netns: the plugin, the CLI, the node.
    Node,
    /// A process inside this registered pod's netns (uid of the pod).
    Pod(String),
    /// Root, but in a netns that is neither the node's nor a registered pod's.
    Elsewhere { pid: i32 },
    /// Not root.
    Unprivileged { uid: u32 },
}

/// Whether `caller` may send `req`; the reason when not.
pub fn authorize(caller: &Caller, req: &Request) -> Result<(), String> {
    match (caller, req) {
        (Caller::Node, _) => Ok(()),
        (Caller::Pod(own), Request::RegisterListener { uid, .. }) if uid == own => Ok(()),
        (Caller::Pod(own), Request::RegisterListener { uid, .. }) => {
            Err(format!("a process in pod {own} may register listeners only for its own pod, not {uid}"))
        }
        // Its own pod's certificate and the mesh: what its sidecar needs for
        // HBONE (the controller gives it only to a sidecar-mode pod).
        (Caller::Pod(own), Request::SidecarMesh { uid, .. }) if uid == own => Ok(()),
        (Caller::Pod(own), Request::SidecarMesh { uid, .. }) => {
            Err(format!("a process in pod {own} may ask only for its own pod's mesh material, not {uid}'s"))
        }
        (Caller::Pod(own), other) => Err(format!(
            "a process in pod {own} may only register its own listeners and read its own mesh material, not send {}",
            other.name()
        )),
        (Caller::Unprivileged { uid }, _) => Err(format!("uid {uid} is not root")),
        (Caller::Elsewhere { pid }, _) => Err(format!("pid {pid} is in neither the node's network namespace nor a registered pod's")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_may_only_register_its_own_listeners() {
        let pod = Caller::Pod("uid-a".into());
        let reg = |uid: &str| Request::RegisterListener { uid: uid.into(), family: 2 };
        let mesh = |uid: &str| Request::SidecarMesh { uid: uid.into(), seen: None };
        assert!(authorize(&pod, &reg("uid-a")).is_ok());
        assert!(authorize(&pod, &mesh("uid-a")).is_ok());
        let cases = [
            ("another pod's listener", reg("uid-b")),
            ("another pod's certificate", mesh("uid-b")),
            ("gc", Request::Gc { keep: vec![] }),
            ("del", Request::Del { uid: "uid-b".into() }),
            ("del of itself", Request::Del { uid: "uid-a".into() }),
            ("pods", Request::Pods),
            ("status", Request::Status),
        ];
        for (name, req) in cases {
            assert!(authorize(&pod, &req).is_err(), "{name} was allowed");
        }
        assert!(authorize(&Caller::Node, &Request::Gc { keep: vec![] }).is_ok());
        assert!(authorize(&Caller::Unprivileged { uid: 1000 }, &Request::Status).is_err());
        assert!(authorize(&Caller::Elsewhere { pid: 42 }, &Request::Status).is_err());
    }
}
