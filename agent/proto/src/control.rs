//! The agent⇄proxy control protocol. One JSON message per SOCK_SEQPACKET record,
//! so message boundaries and the fds that travel with them (SCM_RIGHTS) never
//! blur. The agent imports this module; the proxy keeps no state the agent
//! cannot send again.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// Largest control message; a pod description is a few hundred bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Agent → proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToProxy {
    /// Open this pod's listeners inside the netns sent with the message (the
    /// first fd), or adopt the ones that follow it (`PodSpec::listeners`).
    AddPod(PodSpec),
    /// Close the pod's listeners and drain its connections.
    DelPod { uid: String },
    /// A newer proxy has taken over: stop accepting, finish open connections, exit.
    Drain,
    /// The mesh as this node sees it: the trust bundle, and which identity
    /// each meshed pod address in the cluster must present. Replaces the last.
    Mesh(MeshView),
    /// [`ToProxy::Mesh`] for a view too large for one message (a mesh of
    /// more than about 800 pod addresses): the view as JSON in a sealed memfd
    /// sent with the message.
    MeshInMemfd,
    /// A meshed pod's renewed certificate; connections made before keep the old one.
    Renew { uid: String, cert: WorkloadCert },
    /// The node's security policy (`AuthorizationPolicy`, `PeerAuthentication`)
    /// as YAML, in a sealed memfd sent with the message (no size limit), already
    /// validated by the agent. `closed`: the agent has no valid policy to
    /// give (the files were invalid from the start), so inbound is refused
    /// rather than left open. Replaces the last; applies to live connections too.
    Policies { root_namespace: String, closed: bool },
}

/// See [`ToProxy::Mesh`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshView {
    pub trust_domain: String,
    /// The roots, base64 DER: during a rotation, the old and the new.
    pub bundle: Vec<String>,
    pub peers: Vec<MeshPeer>,
}

/// A meshed pod address and the SPIFFE ID it must present on HBONE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPeer {
    pub ip: std::net::IpAddr,
    pub identity: String,
}

/// A pod's own certificate: the chain (leaf first) and its PKCS#8 key, base64
/// DER. Only ever sent over the agent's root-only control socket, and to a
/// sidecar for its own pod over the sidecar socket (see [`SidecarMesh`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadCert {
    pub identity: String,
    pub chain: Vec<String>,
    pub key: String,
    /// Seconds since the epoch.
    pub not_after: u64,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert").field("identity", &self.identity).field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

/// What the agent tells a sidecar of the mesh, over the sidecar socket (the
/// shared proxy hears the same over its control socket, in several messages).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SidecarMesh {
    /// No HBONE for this pod: the sidecar relays plaintext, as without a CA.
    Plaintext {
        why: String,
    },
    /// Nothing changed since the generation the sidecar asked with.
    Unchanged {
        generation: u64,
    },
    Meshed {
        generation: u64,
        material: Box<SidecarMaterial>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SidecarMaterial {
    /// The pod's own certificate and key.
    pub cert: WorkloadCert,
    pub view: MeshView,
    /// Who the pod is to the policies and the metrics: its names and labels, from the workload source.
    pub namespace: String,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The node's policies; none when the agent has no policy source.
    pub policies: Option<SidecarPolicies>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarPolicies {
    pub root_namespace: String,
    /// No good set since the agent started: refuse inbound (see `ToProxy::Policies`).
    pub closed: bool,
    pub text: String,
}

/// The port each meshed pod's proxy takes HBONE on, as in ztunnel.
pub const HBONE_PORT: u16 = 15008;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Listening sockets the agent kept open for this pod, sent after the
    /// netns in this order: the proxy accepts on them instead of binding anew,
    /// so connections that queued while no proxy ran are served, not refused.
    #[serde(default)]
    pub listeners: Vec<ListenerId>,
    /// sk_msg may feed the pod's sockets (eBPF mode), so the proxy reads them
    /// with recvmsg and never splice(2). Absent means yes: the safe answer.
    #[serde(default = "yes")]
    pub sk_msg: bool,
    /// The agent installed the pod's return path (see [`CLIENT_ADDRESS_MARK`]),
    /// so the proxy connects to the app from the client's own address. Absent
    /// means no: without the return path such a connection would hang.
    #[serde(default)]
    pub keep_client_address: bool,
    /// Meshed with an identity: the proxy takes HBONE on [`HBONE_PORT`] in
    /// the pod's netns with this certificate, and tunnels to meshed peers.
    #[serde(default)]
    pub cert: Option<WorkloadCert>,
    /// The pod's labels as the workload source has them: what policies select on.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The mark on the proxy's connections to an app that carry the client's
/// address (IP_TRANSPARENT). With `tcp_fwmark_accept` the app's accepted
/// socket takes the mark over, and a rule in the pod's netns sends packets
/// with it to the `lo` route table [`CLIENT_ADDRESS_TABLE`]: the app's answers
/// come back to the proxy instead of leaving for a client that never saw
/// this connection. Any mark but the proxy's own (0x539), which exempts the
/// proxy's outbound connections and must keep routing normally.
pub const CLIENT_ADDRESS_MARK: u32 = 0x53a;
/// The route table, in each meshed pod's netns, that delivers everything to `lo`.
pub const CLIENT_ADDRESS_TABLE: u32 = 1338;
/// The priority of the rule that selects it (before `main`, at 32766).
pub const CLIENT_ADDRESS_RULE_PRIORITY: u32 = 1338;

fn yes() -> bool {
    true
}

/// Which of a pod's listeners (four, six when meshed) an fd is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListenerId {
    pub inbound: bool,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// A meshed pod's HBONE listener (port 15008), inbound too but never an
    /// sk_lookup target: tunnels are addressed to it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hbone: bool,
}

/// Proxy → agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromProxy {
    Hello {
        pid: u32,
        version: String,
    },
    /// Listeners are open; duplicates of them follow in `listeners` order, for
    /// the agent to keep (and, inbound, to steer to with sk_lookup).
    Ack {
        uid: String,
        listeners: Vec<ListenerId>,
    },
    Nack {
        uid: String,
        error: String,
    },
    /// The message could not be understood; nothing was changed.
    Error {
        error: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("control socket")]
    Io(#[from] std::io::Error),
    #[error("control socket closed")]
    Closed,
    #[error("malformed control message: {0}")]
    Decode(String),
}

impl From<nix::Error> for WireError {
    fn from(e: nix::Error) -> Self {
        WireError::Io(e.into())
    }
}

/// A memfd holding `bytes`, sealed so the receiver reads exactly what was sent.
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let mut f = std::fs::File::from(fd);
    std::io::Write::write_all(&mut f, bytes)?;
    let fd = OwnedFd::from(f);
    fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL))?;
    Ok(fd)
}

/// What a memfd from [`sealed_memfd`] holds.
pub fn read_memfd(fd: OwnedFd) -> std::io::Result<Vec<u8>> {
    use std::io::{Read as _, Seek as _};
    let mut f = std::fs::File::from(fd);
    f.rewind()?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Sends one record with optional fds.
pub fn send<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| WireError::Decode(e.to_string()))?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(&raw)] };
    sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&bytes)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one record: its bytes and fds. Decoding is the caller's, so a
/// malformed message can be answered instead of dropping the connection.
pub fn recv_raw(sock: BorrowedFd<'_>) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    // An AddPod carries the netns and up to four listeners.
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let n = msg.bytes;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these fds for us.
            fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    if n == 0 {
        return Err(WireError::Closed);
    }
    buf.truncate(n);
    Ok((buf, fds))
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    serde_json::from_slice(bytes).map_err(|e| WireError::Decode(e.to_string()))
}

/// A connected SOCK_SEQPACKET Unix socket to `path`.
pub fn connect(path: &std::path::Path) -> Result<OwnedFd, WireError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, socket};
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    nix::sys::socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}
