//! A pod's listeners: outbound on loopback, inbound on every address, each in
//! the pod's netns, with SO_REUSEPORT so a new proxy can bind beside an old one
//! during a handover.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tracing::{Instrument as _, warn};

use crate::inpod::netns::PodNetns;
use crate::metrics::{Direction, Metrics};
use crate::relay::{self, PodCtx, Settings};
use crate::socket;

/// Connection ids, unique for the life of the proxy.
static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// How long a listener rests after a failed accept.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Pending connections per listener before the kernel refuses more.
const BACKLOG: u32 = 4096;

#[derive(Debug, thiserror::Error)]
#[error("opening {direction:?} listener {addr}")]
pub struct ListenError {
    pub direction: Direction,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Where a pod's four listeners bind.
pub fn addresses(outbound_port: u16, inbound_port: u16) -> [(Direction, SocketAddr); 4] {
    [
        (Direction::Outbound, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), outbound_port)),
        (Direction::Outbound, SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), outbound_port)),
        (Direction::Inbound, SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), inbound_port)),
        (Direction::Inbound, SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), inbound_port)),
    ]
}

/// Binds inside the pod's netns (sockets keep the netns they are made in); the
/// caller then listens from its own thread, in the runtime's context.
pub fn bind(netns: &PodNetns, dir: Direction, addr: SocketAddr) -> Result<TcpSocket, ListenError> {
    let err = |source| ListenError { direction: dir, addr, source };
    let sock = netns
        .run(|| -> std::io::Result<TcpSocket> {
            let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            if addr.is_ipv6() {
                socket::set_v6only(sock.as_fd())?;
            }
            sock.set_reuseaddr(true)?;
            sock.set_reuseport(true)?;
            sock.bind(addr)?;
            Ok(sock)
        })
        .map_err(|e| err(std::io::Error::other(e)))?;
    sock.map_err(err)
}

pub fn listen(sock: TcpSocket, dir: Direction, addr: SocketAddr) -> Result<TcpListener, ListenError> {
    sock.listen(BACKLOG).map_err(|source| ListenError { direction: dir, addr, source })
}

/// Accepts on a listening socket the agent kept open, after checking it is
/// one: the port it is bound to must be the one this listener has.
pub fn adopt(fd: OwnedFd, dir: Direction, addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let err = |source| ListenError { direction: dir, addr, source };
    let l = std::net::TcpListener::from(fd);
    let local = l.local_addr().map_err(err)?;
    if local.port() != addr.port() || local.is_ipv4() != addr.is_ipv4() {
        return Err(err(std::io::Error::other(format!("the kept listener is bound to {local}"))));
    }
    l.set_nonblocking(true).map_err(err)?;
    TcpListener::from_std(l).map_err(err)
}

/// Duplicates a listener's fd for the agent (sk_lookup steers to it).
pub fn dup(l: &TcpListener) -> std::io::Result<OwnedFd> {
    l.as_fd().try_clone_to_owned()
}

/// Accepts until the pod stops; each connection runs on its own task.
pub async fn accept_loop(l: TcpListener, dir: Direction, pod: Arc<PodCtx>, s: Arc<Settings>, m: Arc<Metrics>) {
    let mut stop: watch::Receiver<bool> = pod.stopping.clone();
    let mut outbound_stop = pod.outbound_stopping.clone();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                if *stop.borrow() { break; }
            }
            _ = outbound_stop.changed(), if dir == Direction::Outbound => {
                if *outbound_stop.borrow() { break; }
            }
            r = l.accept() => match r {
                Ok((conn, _)) => {
                    m.conn_accepted(dir);
                    // Every log line of a connection, the access line included, carries these.
                    let span = tracing::info_span!("conn", pod = %pod.label, id = CONN_IDS.fetch_add(1, Ordering::Relaxed), dir = dir.as_str());
                    tokio::spawn(relay::serve(conn, dir, pod.clone(), s.clone(), m.clone()).instrument(span));
                }
                Err(e) => {
                    warn!(pod = %pod.label, error = %e, "accept");
                    // Out of fds or memory the next accept fails the same way at
                    // once: pause rather than spin the worker and flood the log.
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }
}
