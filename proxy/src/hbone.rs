//! HBONE, as Istio ambient's ztunnel speaks it: between meshed pods the app's
//! bytes travel in an HTTP/2 `CONNECT` stream over mutual TLS 1.3 to the
//! destination pod's port 15008, `:authority` the address the app dialled.
//!
//! - [`mesh`]: the node's view of the mesh (trust bundle, which identity each
//!   meshed address must present) and each meshed pod's own certificate;
//! - [`pool`]: outbound, one pooled TLS connection per (source pod,
//!   destination identity, destination address), many streams on it;
//! - [`inbound`]: the 15008 listener in each meshed pod's netns, which checks
//!   the peer, connects to the app and only then answers the CONNECT;
//! - [`stream`]: the relay between a TCP connection and an HTTP/2 stream.
//! - [`read_ahead`]: batched socket reads under TLS, for bulk tunnels.

pub mod inbound;
pub mod mesh;
pub mod pool;
pub mod read_ahead;
pub mod stream;

pub use podsteer_proto::control::HBONE_PORT;

/// Per-stream and per-connection HTTP/2 flow-control windows. The defaults
/// (64 KiB) cap a stream at one window per round trip; these let a bulk
/// stream fill a fast link while bounding what one stream can queue.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame either side sends.
pub const MAX_FRAME: u32 = 256 * 1024;

use std::net::SocketAddr;
use std::sync::Arc;

use podsteer_identity::spiffe::SpiffeId;
use podsteer_identity::tls::Trust;
use tokio::net::TcpStream;
use tracing::warn;

use crate::metrics::{ConnLabels, Direction, Metrics, Outcome};
use crate::relay::{PodCtx, Settings};

/// HBONE state the whole proxy shares.
#[derive(Default)]
pub struct Node {
    pub mesh: mesh::Mesh,
    pub pool: Arc<pool::Pool>,
    pub policies: crate::authz::Policies,
}

/// How an outbound connection to a meshed peer goes.
pub struct Route {
    /// The identity the destination must prove.
    pub peer: SpiffeId,
    tls: Arc<mesh::PodTls>,
    trust: Arc<Trust>,
}

/// An outbound connection goes over HBONE when its pod has an identity and
/// the destination address is a meshed pod's; otherwise it stays plaintext.
pub fn route(dir: Direction, dst: SocketAddr, pod: &PodCtx) -> Option<Route> {
    if dir != Direction::Outbound {
        return None;
    }
    let tls = pod.tls.clone()?;
    let view = pod.hbone.mesh.get();
    let peer = view.peers.get(&dst.ip().to_canonical())?.clone();
    Some(Route { peer, tls, trust: view.trust.clone()? })
}

/// The app's connection to `dst`, in a CONNECT stream to the destination
/// pod's proxy. No tunnel, no connection: a meshed peer is never reached in
/// plaintext behind the user's back.
pub async fn outbound(
    client: &TcpStream,
    dst: SocketAddr,
    route: Route,
    pod: &PodCtx,
    s: &Settings,
    m: &Metrics,
    labels: &ConnLabels,
) -> (Outcome, u64, u64) {
    let key = pool::Key { pod: pod.uid.clone(), dst_id: route.peer.clone(), dst: SocketAddr::new(dst.ip(), HBONE_PORT) };
    // Boxed: a transient state, and the task is as large as its largest state
    // for the connection's whole life.
    let tunnel = match Box::pin(pod.hbone.pool.open(key, dst, (&route.tls, &route.trust), pod, s, m)).await {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %podsteer_proto::error_chain(&e), %dst, peer = %route.peer, "no HBONE tunnel; connection reset");
            let _ = crate::socket::set_reset_on_close(std::os::fd::AsFd::as_fd(client));
            return (Outcome::TunnelFailed, 0, 0);
        }
    };
    let _ = client.set_nodelay(true);
    let state = pod.conns.open(Direction::Outbound);
    let (outcome, up, down) = stream::relay(client, tunnel.send, tunnel.recv, true, &state).await;
    m.bytes_from_client.get_or_create(labels).inc_by(up);
    m.bytes_to_client.get_or_create(labels).inc_by(down);
    (outcome, up, down)
}
