//! The agent's end of the proxy control socket. Proxies connect here; the
//! newest one gets every pod replayed, then any older one is told to drain.
//! A pod is reported ready only after the proxy acknowledged its listeners.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use podsteer_proto::control::{self as wire, FromProxy, ListenerId, PodSpec, ToProxy, WireError};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no proxy connected within {0:?}")]
    NoProxy(Duration),
    #[error("proxy refused pod {uid}: {error}")]
    Nack { uid: String, error: String },
    #[error("proxy answered out of turn: {0}")]
    Unexpected(String),
    #[error("not the configured proxy: {0}")]
    NotTheProxy(String),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// One connected proxy.
pub struct ProxyConn {
    fd: OwnedFd,
    pub pid: u32,
}

impl ProxyConn {
    /// Waits for the proxy's hello, bounded so a stuck client cannot block
    /// accepting, and accepts it only from `identity`: whoever is taken here
    /// receives every pod's netns and makes the current proxy drain.
    pub fn handshake(fd: OwnedFd, deadline: Duration, identity: &crate::peer::ProxyIdentity) -> Result<ProxyConn, LinkError> {
        let peer = crate::peer::Peer::of(&fd).map_err(|e| LinkError::NotTheProxy(crate::controller::error_chain(&e)))?;
        set_timeout(fd.as_fd(), deadline)?;
        let (bytes, _) = wire::recv_raw(fd.as_fd())?;
        match wire::decode::<FromProxy>(&bytes)? {
            FromProxy::Hello { .. } => {
                identity.check(&peer).map_err(LinkError::NotTheProxy)?;
                Ok(ProxyConn { fd, pid: peer.pid as u32 })
            }
            other => Err(LinkError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends one pod (its netns fd, and the listeners kept for it, to adopt)
    /// and returns duplicates of the four listeners it accepts on.
    pub fn add_pod(
        &self,
        spec: &PodSpec,
        netns: BorrowedFd<'_>,
        kept: &[(ListenerId, BorrowedFd<'_>)],
    ) -> Result<Vec<(ListenerId, OwnedFd)>, LinkError> {
        let spec = PodSpec { listeners: kept.iter().map(|(id, _)| *id).collect(), ..spec.clone() };
        let fds: Vec<BorrowedFd<'_>> = std::iter::once(netns).chain(kept.iter().map(|(_, fd)| *fd)).collect();
        wire::send(self.fd.as_fd(), &ToProxy::AddPod(spec.clone()), &fds)?;
        let (bytes, fds) = wire::recv_raw(self.fd.as_fd())?;
        match wire::decode::<FromProxy>(&bytes)? {
            FromProxy::Ack { uid, listeners } if uid == spec.uid && listeners.len() == fds.len() => {
                Ok(listeners.into_iter().zip(fds).collect())
            }
            FromProxy::Nack { uid, error } => Err(LinkError::Nack { uid, error }),
            other => Err(LinkError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The node's mesh view (see [`ToProxy::Mesh`]).
    /// In the message itself while it fits (what every proxy understands),
    /// in a sealed memfd beyond that.
    pub fn set_mesh(&self, view: &wire::MeshView) -> Result<(), LinkError> {
        let json = serde_json::to_vec(view).map_err(|e| LinkError::Wire(wire::WireError::Decode(e.to_string())))?;
        // Room for the envelope around the view.
        if json.len() + 64 <= wire::MAX_MESSAGE {
            return self.ask(&ToProxy::Mesh(view.clone()), "");
        }
        let fd = wire::sealed_memfd("podsteer-mesh", &json).map_err(|e| LinkError::Wire(e.into()))?;
        wire::send(self.fd.as_fd(), &ToProxy::MeshInMemfd, &[fd.as_fd()])?;
        self.answer("")
    }

    /// The node's policies, in the memfd `text` (none when `closed`).
    pub fn set_policies(&self, root_namespace: &str, closed: bool, text: Option<BorrowedFd<'_>>) -> Result<(), LinkError> {
        let msg = ToProxy::Policies { root_namespace: root_namespace.into(), closed };
        wire::send(self.fd.as_fd(), &msg, text.as_slice())?;
        self.answer("")
    }

    pub fn renew(&self, uid: &str, cert: &wire::WorkloadCert) -> Result<(), LinkError> {
        self.ask(&ToProxy::Renew { uid: uid.into(), cert: cert.clone() }, uid)
    }

    /// A message answered with an Ack or a Nack for `uid`.
    fn ask(&self, msg: &ToProxy, uid: &str) -> Result<(), LinkError> {
        wire::send(self.fd.as_fd(), msg, &[])?;
        self.answer(uid)
    }

    fn answer(&self, uid: &str) -> Result<(), LinkError> {
        let (bytes, _) = wire::recv_raw(self.fd.as_fd())?;
        match wire::decode::<FromProxy>(&bytes)? {
            FromProxy::Ack { uid: u, .. } if u == uid => Ok(()),
            FromProxy::Nack { uid, error } => Err(LinkError::Nack { uid, error }),
            other => Err(LinkError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn del_pod(&self, uid: &str) -> Result<(), LinkError> {
        wire::send(self.fd.as_fd(), &ToProxy::DelPod { uid: uid.into() }, &[])?;
        let (bytes, _) = wire::recv_raw(self.fd.as_fd())?;
        match wire::decode::<FromProxy>(&bytes)? {
            FromProxy::Ack { .. } => Ok(()),
            other => Err(LinkError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Whether the proxy's end is gone (it crashed or closed): a dead
    /// SEQPACKET peer polls as hung up. Looks, never waits.
    fn hung_up(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::empty())];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => true,
        }
    }

    pub fn drain(&self) -> Result<(), LinkError> {
        Ok(wire::send(self.fd.as_fd(), &ToProxy::Drain, &[])?)
    }
}

/// The proxy currently serving the node, if any.
#[derive(Default)]
pub struct ProxyLink {
    current: Mutex<Option<ProxyConn>>,
    arrived: Condvar,
}

/// How long a control reply may take before the proxy is considered gone.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

impl ProxyLink {
    /// Makes `conn` the node's proxy; returns the one it replaces, to be drained.
    pub fn promote(&self, conn: ProxyConn) -> Option<ProxyConn> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let old = cur.replace(conn);
        self.arrived.notify_all();
        old
    }

    /// The current proxy's pid, if its end is still open. Looks, never waits.
    pub fn live(&self) -> Option<u32> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref().filter(|c| !c.hung_up()).map(|c| c.pid)
    }

    pub fn connected(&self) -> Option<u32> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|c| c.pid)
    }

    /// Waits up to `deadline` until a live proxy is current, dropping one whose
    /// end is gone. Callers wait here *before* taking the controller's lock,
    /// which a connecting proxy needs to be replayed and promoted: waiting
    /// under that lock would hold the new proxy off until the wait timed out.
    pub fn wait_live(&self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match cur.as_ref() {
                Some(c) if !c.hung_up() => return true,
                Some(c) => {
                    warn!(pid = c.pid, "proxy connection lost");
                    *cur = None;
                }
                None => {}
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            cur = self.arrived.wait_timeout(cur, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Runs `f` on the current proxy, waiting up to `deadline` for one to connect.
    /// A proxy whose socket fails is dropped, and the next one is waited for.
    pub fn with_proxy<T>(&self, deadline: Duration, mut f: impl FnMut(&ProxyConn) -> Result<T, LinkError>) -> Result<T, LinkError> {
        let end = Instant::now() + deadline;
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(conn) = cur.as_ref() {
                match f(conn) {
                    Err(LinkError::Wire(e)) => {
                        warn!(error = %e, pid = conn.pid, "proxy connection lost");
                        *cur = None;
                    }
                    other => return other,
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::NoProxy(deadline));
            }
            cur = self.arrived.wait_timeout(cur, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Binds the SOCK_SEQPACKET control socket, owner-only.
pub fn bind(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = crate::sys::bind_owner_only(path, nix::sys::socket::SockType::SeqPacket)?;
    info!(socket = %path.display(), "proxy control socket");
    Ok(fd)
}

pub fn accept(listener: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let fd = nix::sys::socket::accept4(listener.as_raw_fd(), nix::sys::socket::SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_timeout(fd: BorrowedFd<'_>, t: Duration) -> Result<(), WireError> {
    use nix::sys::socket::{setsockopt, sockopt};
    let tv = nix::sys::time::TimeVal::new(t.as_secs() as i64, t.subsec_micros() as i64);
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    Ok(())
}
