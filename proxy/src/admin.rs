//! The proxy's admin endpoints, served by [`podsteer_proto::admin`].

use std::net::SocketAddr;
use std::sync::Arc;

use podsteer_proto::admin::{NOT_FOUND, OK, UNAVAILABLE, serve};

use crate::state::State;

/// The proxy's endpoints: /metrics, /ready (every registered pod's listeners
/// are open, the agent session is up, no drain), /healthz.
pub fn spawn(addr: SocketAddr, state: Arc<State>) -> std::io::Result<SocketAddr> {
    serve(addr, move |path| match path {
        "/metrics" => (OK, state.metrics.encode()),
        "/ready" if state.ready() => (OK, "ready\n".to_owned()),
        "/ready" => (UNAVAILABLE, "not ready\n".to_owned()),
        "/healthz" => (OK, "ok\n".to_owned()),
        _ => (NOT_FOUND, "not found\n".to_owned()),
    })
}
