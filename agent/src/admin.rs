//! The agent's admin endpoint: /healthz (alive), /readyz (mode chosen, kernel
//! programmed, proxy connected) and /metrics, served by the proxy crate's small HTTP server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use podsteer_proxy::admin::{NOT_FOUND, OK, UNAVAILABLE};

use crate::controller::Controller;
use crate::metrics::{CounterLabel, ModeLabel, metrics};

pub fn spawn(addr: SocketAddr, ctl: Arc<Mutex<Controller>>) -> std::io::Result<SocketAddr> {
    podsteer_proxy::admin::serve(addr, move |path| match path {
        "/healthz" => (OK, "ok\n".to_owned()),
        "/readyz" => match ctl.lock().map_err(|_| "agent state poisoned".to_owned()).and_then(|c| c.ready()) {
            Ok(()) => (OK, "ready\n".to_owned()),
            Err(why) => (UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            refresh(&ctl);
            (OK, metrics().encode())
        }
        _ => (NOT_FOUND, "not found\n".to_owned()),
    })
}

/// Gauges that are read at scrape time: pods by mode and the eBPF counters.
fn refresh(ctl: &Mutex<Controller>) {
    let Ok(c) = ctl.lock() else { return };
    let m = metrics();
    let pods = c.pods();
    for mode in ["ebpf", "iptables"] {
        let n =
            pods.iter().filter(|p| serde_json::to_value(p.mode).ok().and_then(|v| v.as_str().map(|s| s == mode)).unwrap_or(false)).count();
        m.pods.get_or_create(&ModeLabel { mode: mode.into() }).set(n as i64);
    }
    if let Some(counters) = c.ebpf_counters() {
        for (counter, v) in counters {
            m.ebpf.get_or_create(&CounterLabel { counter: counter.name().into() }).set(v as i64);
        }
    }
}
