//! Repair: reconcile the registry with the pods the runtime actually runs.
//! Pods that started before the agent (or while it was down) get meshed;
//! pods that are gone are unregistered. No API server watch is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::controller::Controller;
use crate::cri;
use crate::state::{Event, Handle};

/// Bound on one CRI round trip, so a hung runtime cannot stall the agent.
const CRI_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Default, serde::Serialize)]
pub struct RepairReport {
    pub enrolled: Vec<String>,
    pub removed: Vec<String>,
    pub failed: Vec<String>,
    /// Registered pods the runtime did not list this time, by UID, with how
    /// long they have been unlisted: see [`Unlisted::is_gone`].
    pub missing: BTreeMap<String, Unlisted>,
}

/// The runtime lists a sandbox only once RunPodSandbox is done, and that is
/// after the plugin's ADD; under load it took over a second here. Until then
/// the pod's netns exists and the pod is alive but unlisted. A pod unlisted
/// this long with its netns still there is taken as leaked: the kubelet gives
/// RunPodSandbox two minutes (its runtime request timeout), and a runtime
/// whose RunPodSandbox fails after ADD tears the network down itself.
pub const STARTING_GRACE: Duration = Duration::from_secs(120);

/// How long one registered pod has gone unlisted by the runtime.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Unlisted {
    #[serde(skip)]
    pub since: Instant,
    pub passes: u32,
}

impl Unlisted {
    /// The pod after one more pass that did not list it.
    pub fn again(before: Option<Unlisted>, now: Instant) -> Unlisted {
        match before {
            Some(u) => Unlisted { since: u.since, passes: u.passes + 1 },
            None => Unlisted { since: now, passes: 1 },
        }
    }

    /// Gone: two passes in a row missed it (one pass can race a pod's start)
    /// and either its netns is gone, which the runtime does only after
    /// tearing the pod down, or it has been unlisted past [`STARTING_GRACE`].
    pub fn is_gone(&self, netns_alive: bool, now: Instant) -> bool {
        self.passes >= 2 && (!netns_alive || now.duration_since(self.since) >= STARTING_GRACE)
    }
}

/// One pass: the runtime is asked outside the state manager (a hung runtime
/// stalls only repair), then the manager applies what it said.
pub fn run_once(state: &Handle, socket: &Path, missing_before: BTreeMap<String, Unlisted>) -> anyhow::Result<RepairReport> {
    // Only pods registered before the snapshot may be judged gone by it: one
    // the plugin adds while the runtime answers is missing from the snapshot
    // and alive.
    let known_before: BTreeSet<String> = state.snapshot().pods.iter().map(|p| p.uid.clone()).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let sandboxes = rt.block_on(async {
        let mut client = tokio::time::timeout(CRI_DEADLINE, cri::connect(socket)).await??;
        anyhow::Ok(tokio::time::timeout(CRI_DEADLINE, cri::ready_pods(&mut client)).await??)
    })?;
    let report = state.ask(|reply| Event::Reconcile { known_before, missing_before, sandboxes, reply })?;
    crate::metrics::metrics().repair_passes.inc();
    Ok(report)
}

/// The state manager's half of a pass: gone pods (see [`Unlisted::is_gone`])
/// are removed, new ones enrolled.
pub fn reconcile(
    c: &mut Controller,
    known_before: &BTreeSet<String>,
    missing_before: &BTreeMap<String, Unlisted>,
    sandboxes: cri::Sandboxes,
) -> RepairReport {
    let mut report = RepairReport::default();
    let now = Instant::now();
    // A sandbox whose status could not be read is still running: never gone.
    let unlisted: Vec<_> = c.pods().into_iter().filter(|p| known_before.contains(&p.uid) && !sandboxes.running.contains(&p.uid)).collect();
    let mut gone = Vec::new();
    for pod in unlisted {
        let u = Unlisted::again(missing_before.get(&pod.uid).copied(), now);
        // containerd names each netns uniquely, so the path still being a
        // netns means it is still this pod's.
        if u.is_gone(crate::sys::open_netns(&pod.netns).is_ok(), now) {
            gone.push(pod);
        } else {
            report.missing.insert(pod.uid.clone(), u);
        }
    }
    for stale in gone {
        let label = format!("{}/{}", stale.namespace, stale.name);
        match c.del(&stale.uid).into_result() {
            Ok(_) => report.removed.push(label),
            Err(e) => report.failed.push(format!("{label}: {}", e.message)),
        }
    }
    // A pod known under another netns was recreated with the same UID: the
    // ADD below replaces the record when the old netns is gone.
    let known: BTreeSet<(String, std::path::PathBuf)> = c.pods().into_iter().map(|p| (p.uid, p.netns)).collect();
    for pod in sandboxes.pods.into_iter().filter(|p| !known.contains(&(p.uid.clone(), p.netns.clone()))) {
        if c.skip_reason(&pod).is_some() {
            continue;
        }
        let label = format!("{}/{}", pod.namespace, pod.name);
        match c.add(pod).into_result() {
            Ok(_) => report.enrolled.push(label),
            Err(e) => report.failed.push(format!("{label}: {}", e.message)),
        }
    }
    let m = crate::metrics::metrics();
    for (action, n) in [("enrolled", report.enrolled.len()), ("removed", report.removed.len()), ("failed", report.failed.len())] {
        m.repair.get_or_create(&crate::metrics::ActionLabel { action: action.into() }).inc_by(n as u64);
    }
    if !report.enrolled.is_empty() || !report.removed.is_empty() || !report.failed.is_empty() {
        info!(enrolled = ?report.enrolled, removed = ?report.removed, failed = ?report.failed, "repair");
    }
    report
}

/// First pass now, then every `interval`.
pub fn run_forever(state: &Handle, socket: &Path, interval: Duration) {
    let mut missing = BTreeMap::new();
    loop {
        match run_once(state, socket, std::mem::take(&mut missing)) {
            Ok(report) => missing = report.missing,
            Err(e) => warn!(error = %format!("{e:#}"), "repair pass failed"),
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_gone_after_two_misses_once_its_netns_is_gone() {
        let t0 = Instant::now();
        let once = Unlisted::again(None, t0);
        assert!(!once.is_gone(false, t0), "one pass can race the pod's start");
        let twice = Unlisted::again(Some(once), t0 + Duration::from_secs(1));
        assert_eq!(twice.passes, 2);
        assert!(twice.is_gone(false, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_pod_with_its_netns_is_starting_until_the_grace_ends() {
        let t0 = Instant::now();
        let mut u = Unlisted::again(None, t0);
        for s in 1..120 {
            u = Unlisted::again(Some(u), t0 + Duration::from_secs(s));
            assert!(!u.is_gone(true, t0 + Duration::from_secs(s)), "kept at {s} s");
        }
        assert_eq!(u.since, t0, "counted from the first miss");
        assert!(u.is_gone(true, t0 + STARTING_GRACE), "a netns unlisted past the grace is leaked");
    }
}
