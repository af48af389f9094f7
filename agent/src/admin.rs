//! The agent's admin endpoint: /healthz (the state manager is making
//! progress), /readyz (mode chosen, kernel programmed and pinned, proxy
//! connected, as of the last snapshot) and /metrics, served by the proto
//! crate's small HTTP server. Every answer comes from the published snapshot,
//! so no endpoint ever waits on a change in progress.

use std::net::SocketAddr;

use podsteer_proto::admin::{NOT_FOUND, OK, UNAVAILABLE};

use crate::metrics::{CounterLabel, ModeLabel, metrics};
use crate::mode::Mode;
use crate::state::Handle;

pub fn spawn(addr: SocketAddr, state: Handle) -> std::io::Result<SocketAddr> {
    podsteer_proto::admin::serve(addr, move |path| match path {
        "/healthz" => match state.health() {
            Ok(()) => (OK, "ok\n".to_owned()),
            Err(why) => (UNAVAILABLE, format!("unhealthy: {why}\n")),
        },
        // A stuck manager's last snapshot may say ready; it is not.
        "/readyz" => match state.health().and_then(|()| state.snapshot().ready.clone()) {
            Ok(what) => (OK, format!("ready: {what}\n")),
            Err(why) => (UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            refresh(&state);
            (OK, metrics().encode())
        }
        _ => (NOT_FOUND, "not found\n".to_owned()),
    })
}

/// Gauges that are read at scrape time: pods by mode and the eBPF counters.
fn refresh(state: &Handle) {
    let snap = state.snapshot();
    let m = metrics();
    for mode in [Mode::Ebpf, Mode::Iptables] {
        let n = snap.pods.iter().filter(|p| p.mode == mode).count();
        m.pods.get_or_create(&ModeLabel { mode: mode.as_str().into() }).set(n as i64);
    }
    for (counter, v) in snap.counters.iter().flatten() {
        m.ebpf.get_or_create(&CounterLabel { counter: counter.name().into() }).set(*v as i64);
    }
}
