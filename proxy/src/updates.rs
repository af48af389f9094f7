//! Taking what the agent says of the mesh, however it arrives: over the
//! shared proxy's control socket, or in a sidecar's polls of the sidecar
//! socket. A refused update changes nothing: the last good one stays.

use podsteer_proto::control::{MeshView, WorkloadCert};
use tracing::{info, warn};

use crate::state::State;

/// A new mesh view (trust bundle and peers); how many peer addresses it holds.
pub fn take_view(state: &State, view: &MeshView) -> Result<usize, String> {
    match state.with_pods(|p| p.hbone().mesh.set(view)) {
        Ok(peers) => {
            state.metrics.mesh_peers.set(peers as i64);
            state.metrics.trust_roots.set(view.bundle.len() as i64);
            info!(peers, trust_domain = %view.trust_domain, roots = view.bundle.len(), "mesh view");
            Ok(peers)
        }
        Err(error) => {
            warn!(%error, "mesh view refused; the last one stays");
            Err(error)
        }
    }
}

/// A new policy set, which live inbound connections are judged by at once.
pub fn take_policies(state: &State, root_namespace: &str, closed: bool, text: &str) -> Result<(), String> {
    match state.with_pods(|p| p.hbone().policies.set(root_namespace, closed, text)) {
        Ok((authz, peer)) => {
            let live_closed = state.with_pods(|p| p.recheck());
            state.metrics.policy_updates.inc();
            info!(authorization = authz, peer_authentication = peer, closed, live_closed, "policies");
            Ok(())
        }
        Err(error) => {
            warn!(%error, "policies refused; the last ones stay");
            Err(error)
        }
    }
}

/// A meshed pod's renewed certificate.
pub fn take_cert(state: &State, uid: &str, cert: &WorkloadCert) -> Result<(), String> {
    state.with_pods(|p| p.renew(uid, cert))?;
    info!(%uid, identity = %cert.identity, not_after = cert.not_after, "certificate renewed");
    Ok(())
}
