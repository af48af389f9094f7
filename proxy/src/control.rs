//! The proxy's side of the control socket: connect to the agent, say hello, then
//! open and close pods' listeners as told. A malformed message gets an error
//! reply and changes nothing. When the agent goes away the pods keep being
//! served, and a reconnect gets the full replay.

pub use podsteer_proto::control as wire;

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use self::wire::{FromProxy, ListenerId, ToProxy, WireError};
use crate::inpod::netns::PodNetns;
use crate::pods::PodRequest;
use crate::state::State;

/// Pause between attempts to reach the agent: a failed connect to a unix
/// socket costs microseconds, and a restarted agent is ready only once this
/// proxy is back, so it is short.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// Runs until the agent tells the proxy to drain.
pub fn run(socket: &Path, state: &State) {
    loop {
        match wire::connect(socket) {
            Ok(conn) => {
                info!(socket = %socket.display(), "connected to the agent");
                match session(&conn, state) {
                    Ok(()) => return,
                    Err(e) => warn!(error = %e, "control session ended; reconnecting"),
                }
                state.serving.store(false, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "agent not reachable yet"),
        }
        std::thread::sleep(RECONNECT_PAUSE);
    }
}

/// One connection to the agent. Returns Ok only after a Drain.
fn session(conn: &OwnedFd, state: &State) -> Result<(), WireError> {
    wire::send(conn.as_fd(), &FromProxy::Hello { pid: std::process::id(), version: env!("CARGO_PKG_VERSION").into() }, &[])?;
    state.serving.store(true, Ordering::Relaxed);
    loop {
        let (bytes, mut fds) = wire::recv_raw(conn.as_fd())?;
        let msg: ToProxy = match wire::decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                wire::send(conn.as_fd(), &FromProxy::Error { error: e.to_string() }, &[])?;
                continue;
            }
        };
        match msg {
            ToProxy::AddPod(spec) => {
                let uid = spec.uid.clone();
                let reply = if fds.len() != 1 + spec.listeners.len() {
                    Err(format!(
                        "AddPod carries {} fds; it needs the pod's netns and the {} listeners it names",
                        fds.len(),
                        spec.listeners.len()
                    ))
                } else {
                    let netns = fds.remove(0);
                    add_pod(state, spec, netns, fds)
                };
                match reply {
                    Ok(listeners) => {
                        let ids = listeners.iter().map(|(id, _)| *id).collect();
                        let borrowed: Vec<_> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
                        wire::send(conn.as_fd(), &FromProxy::Ack { uid, listeners: ids }, &borrowed)?;
                    }
                    Err(error) => wire::send(conn.as_fd(), &FromProxy::Nack { uid, error }, &[])?,
                }
            }
            ToProxy::DelPod { uid } => {
                state.with_pods(|p| p.remove(&uid));
                wire::send(conn.as_fd(), &FromProxy::Ack { uid, listeners: vec![] }, &[])?;
            }
            ToProxy::Mesh(view) => {
                let reply = take_view(state, Ok(view));
                wire::send(conn.as_fd(), &reply, &[])?;
            }
            ToProxy::MeshInMemfd => {
                let view = match fds.pop().map(wire::read_memfd) {
                    Some(Ok(b)) => wire::decode::<wire::MeshView>(&b).map_err(|e| format!("the mesh view in the memfd: {e}")),
                    Some(Err(e)) => Err(format!("reading the mesh memfd: {e}")),
                    None => Err("MeshInMemfd carries no memfd".into()),
                };
                let reply = take_view(state, view);
                wire::send(conn.as_fd(), &reply, &[])?;
            }
            ToProxy::Renew { uid, cert } => {
                let reply = match crate::updates::take_cert(state, &uid, &cert) {
                    Ok(()) => FromProxy::Ack { uid, listeners: vec![] },
                    Err(error) => FromProxy::Nack { uid, error },
                };
                wire::send(conn.as_fd(), &reply, &[])?;
            }
            ToProxy::Policies { root_namespace, closed } => {
                let text = match fds.pop().map(read_memfd) {
                    Some(Ok(t)) => Ok(t),
                    Some(Err(e)) => Err(format!("reading the policy memfd: {e}")),
                    None if closed => Ok(String::new()),
                    None => Err("Policies carries no memfd".into()),
                };
                let reply = match text.and_then(|t| crate::updates::take_policies(state, &root_namespace, closed, &t)) {
                    Ok(()) => FromProxy::Ack { uid: String::new(), listeners: vec![] },
                    Err(error) => FromProxy::Nack { uid: String::new(), error },
                };
                wire::send(conn.as_fd(), &reply, &[])?;
            }
            ToProxy::Drain => {
                info!("drain requested: a newer proxy took over");
                state.draining.store(true, Ordering::Relaxed);
                state.with_pods(|p| p.remove_all());
                state.drained.notify_one();
                return Ok(());
            }
        }
    }
}

fn add_pod(state: &State, spec: wire::PodSpec, netns: OwnedFd, kept: Vec<OwnedFd>) -> Result<Vec<(ListenerId, OwnedFd)>, String> {
    // Checked before anything opens: a bad certificate adds nothing.
    let tls = spec.cert.as_ref().map(crate::hbone::mesh::PodTls::new).transpose()?;
    let netns = PodNetns::enter(netns).map_err(|e| e.to_string())?;
    let req = PodRequest {
        label: format!("{}/{}", spec.namespace, spec.name),
        uid: spec.uid,
        outbound_port: spec.outbound_port,
        inbound_port: spec.inbound_port,
        splice_allowed: !spec.sk_msg,
        keep_client_address: spec.keep_client_address,
        kept: spec.listeners.iter().copied().zip(kept).collect(),
        tls,
        namespace: spec.namespace.clone(),
        labels: spec.labels.clone(),
    };
    state.with_pods(|p| p.add(req, netns)).map_err(|e| format!("{e}: {}", e.source))
}

/// Takes a mesh view (or says why it cannot); answered under the empty uid:
/// the view is the node's, not a pod's. A refused view leaves the last one.
fn take_view(state: &State, view: Result<wire::MeshView, String>) -> FromProxy {
    match view.and_then(|v| crate::updates::take_view(state, &v)) {
        Ok(_) => FromProxy::Ack { uid: String::new(), listeners: vec![] },
        Err(error) => FromProxy::Nack { uid: String::new(), error },
    }
}

/// The whole text of a memfd the agent wrote and sealed.
fn read_memfd(fd: OwnedFd) -> std::io::Result<String> {
    String::from_utf8(wire::read_memfd(fd)?).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
