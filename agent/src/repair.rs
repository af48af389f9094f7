//! Repair: reconcile the registry with the pods the runtime actually runs.
//! Pods that started before the agent (or while it was down) get meshed;
//! pods that are gone are unregistered. No API server watch is needed.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

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
    /// Registered pods the runtime did not list this time (by UID): gone if
    /// the next pass does not list them either.
    pub missing: BTreeSet<String>,
}

/// One pass: the runtime is asked outside the state manager (a hung runtime
/// stalls only repair), then the manager applies what it said.
pub fn run_once(state: &Handle, socket: &Path, missing_before: BTreeSet<String>) -> anyhow::Result<RepairReport> {
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

/// The state manager's half of a pass: gone pods are removed, new ones enrolled.
///
/// A pod is gone only when two passes in a row did not list it. The runtime
/// lists a sandbox only once RunPodSandbox is done, which is after the plugin's
/// ADD, so one pass can miss a pod that is still starting; the next one sees it.
pub fn reconcile(
    c: &mut Controller,
    known_before: &BTreeSet<String>,
    missing_before: &BTreeSet<String>,
    sandboxes: cri::Sandboxes,
) -> RepairReport {
    let mut report = RepairReport::default();
    // A sandbox whose status could not be read is still running: never gone.
    let unlisted: Vec<_> = c.pods().into_iter().filter(|p| known_before.contains(&p.uid) && !sandboxes.running.contains(&p.uid)).collect();
    let (gone, once): (Vec<_>, Vec<_>) = unlisted.into_iter().partition(|p| missing_before.contains(&p.uid));
    report.missing = once.into_iter().map(|p| p.uid).collect();
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
    let mut missing = BTreeSet::new();
    loop {
        match run_once(state, socket, std::mem::take(&mut missing)) {
            Ok(report) => missing = report.missing,
            Err(e) => warn!(error = %format!("{e:#}"), "repair pass failed"),
        }
        std::thread::sleep(interval);
    }
}
