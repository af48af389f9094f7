//! The agent's admin endpoint: /healthz (the agent's state can be taken: not
//! poisoned by a panic, not held for long), /readyz (mode chosen, kernel
//! programmed, proxy connected) and /metrics, served by the proxy crate's
//! small HTTP server. No endpoint waits on the state for more than a bound, so
//! a scrape never queues a probe behind a writer.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use podsteer_proto::admin::{NOT_FOUND, OK, UNAVAILABLE};

use crate::controller::Controller;
use crate::metrics::{CounterLabel, ModeLabel, metrics};

/// How long a probe may wait for the agent's state. Every change holds it for
/// milliseconds (waits happen outside it); held longer, the agent is stuck.
const STATE_WAIT: Duration = Duration::from_secs(2);
/// A scrape waits less and serves the last gauges instead.
const SCRAPE_WAIT: Duration = Duration::from_millis(200);

/// The controller, if it can be had within `wait`; why not, otherwise.
fn lock_within(ctl: &Mutex<Controller>, wait: Duration) -> Result<MutexGuard<'_, Controller>, String> {
    let end = Instant::now() + wait;
    loop {
        match ctl.try_lock() {
            Ok(c) => return Ok(c),
            Err(TryLockError::Poisoned(_)) => return Err("agent state poisoned by an earlier panic".into()),
            Err(TryLockError::WouldBlock) if Instant::now() >= end => return Err(format!("agent state held for over {wait:?}")),
            Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

pub fn spawn(addr: SocketAddr, ctl: Arc<Mutex<Controller>>) -> std::io::Result<SocketAddr> {
    podsteer_proto::admin::serve(addr, move |path| match path {
        "/healthz" => match lock_within(&ctl, STATE_WAIT) {
            Ok(_) => (OK, "ok\n".to_owned()),
            Err(why) => (UNAVAILABLE, format!("unhealthy: {why}\n")),
        },
        "/readyz" => match lock_within(&ctl, STATE_WAIT).and_then(|c| c.ready()) {
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
    let Ok(c) = lock_within(ctl, SCRAPE_WAIT) else { return };
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
