//! The state manager: the one owner of the node's pod state.
//!
//! Every change arrives as an [`Event`] on one queue (a CNI request, a proxy
//! that connected, a runtime snapshot from repair, uninstall) and is applied by
//! one thread that owns the [`Controller`]. After each event, and on a tick,
//! the thread publishes a [`Snapshot`]; readers (the admin endpoint, `status`,
//! `pods`, caller classification) take the newest snapshot and never wait on a
//! change in progress. The thread's heartbeat is what `/healthz` reports: it
//! beats after every event, on every tick and once per pod of a long replay,
//! so a stuck change (a proxy that stopped answering, say) shows as unhealthy
//! and a healthy one never does.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::api::{ErrorKind, PodInfo, Request, Response};
use crate::controller::Controller;
use crate::peer::{Caller, NetnsId, Peer};
use crate::proxy_link::{ProxyConn, ProxyLink};
use crate::registry::PodRecord;
use crate::repair::RepairReport;

/// How often the manager re-reads what can change under it (pins, the proxy's
/// liveness, the eBPF counters) when no event arrives.
const TICK: Duration = Duration::from_millis(250);
/// Events waiting at once; past it a request is answered "busy" at once.
const QUEUE: usize = 256;
/// No heartbeat for this long: the manager is stuck (or gone) and the agent
/// is unhealthy. Every change takes milliseconds; the longest bounded wait
/// inside one is a proxy's reply.
pub const STALL: Duration = Duration::from_secs(2);

/// One thing for the manager to do. Each carries where its answer goes.
pub enum Event {
    /// An authorized request from the agent socket that changes or verifies state.
    Request { req: Request, fd: Option<OwnedFd>, reply: SyncSender<Response> },
    /// A proxy finished its handshake: replay the pods to it, then promote it.
    ProxyConnected(ProxyConn),
    /// Repair's view of the runtime: `known_before` were registered before it
    /// was taken, so only they may be judged gone by it, and `missing_before`
    /// (from the last passes) says for how long each has been unlisted.
    Reconcile {
        known_before: BTreeSet<String>,
        missing_before: std::collections::BTreeMap<String, crate::repair::Unlisted>,
        sandboxes: crate::cri::Sandboxes,
        reply: SyncSender<RepairReport>,
    },
    /// Remove every pod's interception and the pins (the uninstall signal).
    RemoveAll { reply: SyncSender<Result<(), String>> },
    /// Flush the registry to disk (before exit).
    Persist { reply: SyncSender<()> },
    /// The mesh's peers as the workload source lists them now.
    MeshPeers(Vec<podsteer_proto::control::MeshPeer>),
}

/// The state as of the last event or tick.
pub struct Snapshot {
    pub pods: Arc<Vec<PodRecord>>,
    /// The `status` answer.
    pub status: serde_json::Value,
    /// `/readyz`: what is in place, or what is missing.
    pub ready: Result<String, String>,
    /// The eBPF per-CPU counters, summed; None in iptables mode.
    pub counters: Option<Vec<(podsteer_common::Counter, u64)>>,
    /// Registered pods by network namespace, for classifying callers.
    pod_netns: Arc<Vec<(NetnsId, String)>>,
    node_netns: Vec<NetnsId>,
}

impl Snapshot {
    /// Classifies a peer of the agent socket (see [`crate::peer`]): a process in
    /// a registered pod's netns acts for that pod only, whatever its uid.
    pub fn caller(&self, peer: &Peer) -> Caller {
        if peer.uid != 0 {
            return Caller::Unprivileged { uid: peer.uid };
        }
        if self.node_netns.contains(&peer.netns) {
            return Caller::Node;
        }
        self.pod_caller(peer)
    }

    /// Classifies a peer of the sidecar socket: only a process in a registered
    /// pod's netns, with the proxy UID or root, acts (for that pod); the node
    /// has the agent socket and is nobody here.
    pub fn sidecar_caller(&self, peer: &Peer, proxy_uid: u32) -> Caller {
        if peer.uid != 0 && peer.uid != proxy_uid {
            return Caller::Unprivileged { uid: peer.uid };
        }
        self.pod_caller(peer)
    }

    fn pod_caller(&self, peer: &Peer) -> Caller {
        match self.pod_netns.iter().find(|(n, _)| *n == peer.netns) {
            Some((_, uid)) => Caller::Pod(uid.clone()),
            None => Caller::Elsewhere { pid: peer.pid },
        }
    }
}

/// Progress of the manager thread, read by `/healthz`.
pub struct Beat {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Default for Beat {
    fn default() -> Beat {
        Beat { origin: Instant::now(), last_ms: AtomicU64::new(0) }
    }
}

impl Beat {
    pub fn touch(&self) {
        self.last_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        self.origin.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// What an ADD for the shared proxy waits on before it is queued: fixed at start.
#[derive(Clone)]
pub struct ProxyWait {
    pub link: Option<Arc<ProxyLink>>,
    pub defaults: crate::policy::NodeDefaults,
    pub wait: Duration,
}

/// Why the manager did not answer.
#[derive(Debug, thiserror::Error)]
pub enum Unanswered {
    #[error("agent busy: {QUEUE} changes already queued")]
    Busy,
    #[error("the agent's state manager has stopped")]
    Stopped,
}

impl Unanswered {
    pub fn response(&self) -> Response {
        match self {
            Unanswered::Busy => Response::err(ErrorKind::NotReady, self.to_string()),
            Unanswered::Stopped => Response::err(ErrorKind::Internal, self.to_string()),
        }
    }
}

/// The readers' and senders' side of the manager. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    tx: SyncSender<Event>,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    beat: Arc<Beat>,
    proxy_wait: ProxyWait,
    workloads: Option<(Arc<dyn crate::workloads::WorkloadSource>, Duration)>,
}

impl Handle {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Queues an event without waiting for room; the caller then waits for its answer.
    pub fn ask<T>(&self, event: impl FnOnce(SyncSender<T>) -> Event) -> Result<T, Unanswered> {
        let (reply, answer) = mpsc::sync_channel(1);
        match self.tx.try_send(event(reply)) {
            Ok(()) => answer.recv().map_err(|_| Unanswered::Stopped),
            Err(TrySendError::Full(_)) => Err(Unanswered::Busy),
            Err(TrySendError::Disconnected(_)) => Err(Unanswered::Stopped),
        }
    }

    /// Queues an event that needs no answer, waiting for room if need be.
    pub fn tell(&self, event: Event) -> Result<(), Unanswered> {
        self.tx.send(event).map_err(|_| Unanswered::Stopped)
    }

    /// Healthy while the manager makes progress.
    pub fn health(&self) -> Result<(), String> {
        match self.beat.age() {
            age if age > STALL => Err(format!("the state manager has made no progress for {age:.1?} (over {STALL:?})")),
            _ => Ok(()),
        }
    }

    /// For a plugin's ADD with a workload source: waits (outside the manager)
    /// until the source knows the pod, or says why not after the bound.
    pub fn wait_for_workload(&self, pod: &PodInfo) -> Result<(), String> {
        match &self.workloads {
            Some((src, wait)) if !crate::policy::inject_disabled(&pod.annotations) => {
                crate::workloads::wait_for(src.as_ref(), &pod.uid, *wait).map(drop)
            }
            _ => Ok(()),
        }
    }

    /// For an ADD that the shared proxy must take: the link to wait on, and for
    /// how long, before the ADD is queued (never while the manager waits).
    pub fn proxy_to_wait_for(&self, pod: &PodInfo) -> Option<(Arc<ProxyLink>, Duration)> {
        use crate::policy::{Policy, ProxyMode, inject_disabled};
        let link = self.proxy_wait.link.clone()?;
        let shared = Policy::from_annotations(&self.proxy_wait.defaults, &pod.annotations, &pod.ips)
            .is_ok_and(|p| p.proxy_mode == ProxyMode::Shared);
        (shared && !inject_disabled(&pod.annotations)).then_some((link, self.proxy_wait.wait))
    }
}

/// Starts the manager thread, which owns `ctl` from now on.
pub fn spawn(ctl: Controller) -> std::io::Result<Handle> {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let beat = ctl.beat();
    let mut manager = Manager { ctl, pods: Arc::default(), pod_netns: Arc::default(), last_ready: None };
    let snapshot = Arc::new(RwLock::new(Arc::new(manager.snapshot(true))));
    beat.touch();
    let handle = Handle {
        tx,
        snapshot: snapshot.clone(),
        beat: beat.clone(),
        proxy_wait: manager.ctl.proxy_wait(),
        workloads: manager.ctl.workload_wait(),
    };
    let mesh_source = manager.ctl.mesh_source();
    std::thread::Builder::new().name("state".into()).spawn(move || manager.run(rx, &snapshot, &beat))?;
    if let Some((source, config)) = mesh_source {
        let tx = handle.tx.clone();
        std::thread::Builder::new().name("mesh-peers".into()).spawn(move || watch_peers(&*source, &config, &tx))?;
    }
    Ok(handle)
}

/// How often the workload source is listed for mesh peers.
const PEER_POLL: Duration = Duration::from_millis(500);

/// Lists the source's pods and tells the manager when the peers changed,
/// until the manager is gone. A failed listing keeps the last peers.
fn watch_peers(source: &dyn crate::workloads::WorkloadSource, config: &crate::config::AgentConfig, tx: &SyncSender<Event>) {
    let (mut last, mut seen) = (None, None);
    loop {
        // A source that says nothing changed is not listed again (a cluster's
        // pods, cloned every half second, would be most of the agent's work).
        let generation = source.generation();
        if generation.is_some() && generation == seen {
            std::thread::sleep(PEER_POLL);
            continue;
        }
        match source.list() {
            Ok(pods) => {
                seen = generation;
                let peers = crate::mesh::peers(&pods, config);
                if last.as_ref() != Some(&peers) {
                    last = Some(peers.clone());
                    if tx.send(Event::MeshPeers(peers)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %crate::controller::error_chain(&e), "listing mesh peers"),
        }
        std::thread::sleep(PEER_POLL);
    }
}

struct Manager {
    ctl: Controller,
    // The last published pod list, reused by ticks (which change no pod).
    pods: Arc<Vec<PodRecord>>,
    pod_netns: Arc<Vec<(NetnsId, String)>>,
    // Readiness is logged when it changes, not on every tick.
    last_ready: Option<Result<String, String>>,
}

impl Manager {
    fn run(mut self, rx: Receiver<Event>, published: &RwLock<Arc<Snapshot>>, beat: &Beat) {
        loop {
            let changed = match rx.recv_timeout(TICK) {
                Ok(event) => Some(event),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let changed = changed.map(|event| self.apply(event));
            self.ctl.mesh_tick();
            // Published before any answer is sent, so a caller that hears "done"
            // and then reads sees its change.
            let snap = Arc::new(self.snapshot(changed.is_some()));
            *published.write().unwrap_or_else(|p| p.into_inner()) = snap;
            beat.touch();
            if let Some(Some(answer)) = changed {
                answer();
            }
        }
    }

    /// Applies one event; returns how to answer it, once the snapshot is out.
    fn apply(&mut self, event: Event) -> Option<Box<dyn FnOnce()>> {
        match event {
            Event::Request { req, fd, reply } => {
                let r = self.request(req, fd.as_ref().map(|f| f.as_fd()));
                Some(Box::new(move || {
                    let _ = reply.send(r);
                }))
            }
            Event::ProxyConnected(conn) => {
                self.ctl.on_proxy(conn);
                None
            }
            Event::Reconcile { known_before, missing_before, sandboxes, reply } => {
                let report = crate::repair::reconcile(&mut self.ctl, &known_before, &missing_before, sandboxes);
                Some(Box::new(move || {
                    let _ = reply.send(report);
                }))
            }
            Event::RemoveAll { reply } => {
                let r = self.ctl.remove_all().map_err(|e| format!("{e:#}"));
                Some(Box::new(move || {
                    let _ = reply.send(r);
                }))
            }
            Event::Persist { reply } => {
                self.ctl.persist();
                Some(Box::new(move || {
                    let _ = reply.send(());
                }))
            }
            Event::MeshPeers(peers) => {
                self.ctl.set_mesh_peers(peers);
                None
            }
        }
    }

    fn request(&mut self, req: Request, fd: Option<std::os::fd::BorrowedFd<'_>>) -> Response {
        let c = &mut self.ctl;
        match req {
            Request::Add { pod } => c.add(pod),
            Request::Del { uid } => c.del(&uid),
            Request::Check { uid } => c.check(&uid),
            Request::Status => Response::ok(c.status()),
            Request::Pods => Response::ok(c.pods()),
            Request::RegisterListener { uid, family } => c.register_listener(&uid, family, fd),
            Request::Gc { keep } => c.gc(&keep),
            Request::SidecarMesh { uid, seen } => c.sidecar_mesh(&uid, seen),
        }
    }

    fn snapshot(&mut self, pods_changed: bool) -> Snapshot {
        if pods_changed {
            let pods = self.ctl.pods();
            self.pod_netns = Arc::new(pods.iter().filter_map(|p| Some((NetnsId::of(&p.netns).ok()?, p.uid.clone()))).collect());
            self.pods = Arc::new(pods);
        }
        let status = serde_json::to_value(self.ctl.status()).unwrap_or_else(|e| {
            error!(error = %e, "status does not serialize");
            serde_json::Value::Null
        });
        let ready = self.ctl.ready();
        if self.last_ready.as_ref().is_none_or(|last| last.is_ok() != ready.is_ok()) {
            match &ready {
                Ok(what) => info!(what, "ready"),
                Err(why) => warn!(why, "not ready"),
            }
        }
        self.last_ready = Some(ready.clone());
        Snapshot {
            pods: self.pods.clone(),
            status,
            ready,
            counters: self.ctl.ebpf_counters(),
            pod_netns: self.pod_netns.clone(),
            node_netns: self.ctl.node_netns_ids(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netns(ino: u64) -> NetnsId {
        NetnsId::for_test(1, ino)
    }

    fn snapshot(pods: &[(u64, &str)]) -> Snapshot {
        Snapshot {
            pods: Arc::default(),
            status: serde_json::Value::Null,
            ready: Err("test".into()),
            counters: None,
            pod_netns: Arc::new(pods.iter().map(|(ino, uid)| (netns(*ino), uid.to_string())).collect()),
            node_netns: vec![netns(1)],
        }
    }

    fn defaults() -> crate::policy::NodeDefaults {
        use clap::Parser as _;
        crate::cli::Cli::try_parse_from(["podsteer-agent"]).expect("defaults parse").config.node_defaults()
    }

    /// A handle on a queue the test holds, with nothing running behind it.
    fn handle(queue: usize, beat: Beat) -> (Handle, Receiver<Event>) {
        let (tx, rx) = mpsc::sync_channel(queue);
        let proxy_wait = ProxyWait { link: None, defaults: defaults(), wait: Duration::ZERO };
        let h = Handle { tx, snapshot: Arc::new(RwLock::new(Arc::new(snapshot(&[])))), beat: Arc::new(beat), proxy_wait, workloads: None };
        (h, rx)
    }

    #[test]
    fn callers_are_told_apart_by_the_snapshot() {
        let s = snapshot(&[(7, "uid-a")]);
        let peer = |uid, ino| Peer { pid: 42, uid, netns: netns(ino) };
        assert!(matches!(s.caller(&peer(0, 1)), Caller::Node));
        assert!(matches!(s.caller(&peer(0, 7)), Caller::Pod(ref u) if u == "uid-a"));
        assert!(matches!(s.caller(&peer(0, 9)), Caller::Elsewhere { pid: 42 }));
        assert!(matches!(s.caller(&peer(1000, 1)), Caller::Unprivileged { uid: 1000 }));
        assert!(matches!(s.caller(&peer(1337, 7)), Caller::Unprivileged { uid: 1337 }), "the agent socket is root's");
        // The sidecar socket: the proxy UID (or root) in a registered pod, and nobody else, the node included.
        assert!(matches!(s.sidecar_caller(&peer(1337, 7), 1337), Caller::Pod(ref u) if u == "uid-a"));
        assert!(matches!(s.sidecar_caller(&peer(0, 7), 1337), Caller::Pod(ref u) if u == "uid-a"));
        assert!(matches!(s.sidecar_caller(&peer(1000, 7), 1337), Caller::Unprivileged { uid: 1000 }));
        assert!(matches!(s.sidecar_caller(&peer(1337, 9), 1337), Caller::Elsewhere { pid: 42 }));
        assert!(matches!(s.sidecar_caller(&peer(0, 1), 1337), Caller::Elsewhere { pid: 42 }), "the node uses the agent socket");
    }

    #[test]
    fn health_is_the_heartbeat() {
        let (fresh, _rx) = handle(1, Beat::default());
        assert!(fresh.health().is_ok());
        let stale = Beat { origin: Instant::now() - STALL * 2, last_ms: AtomicU64::new(0) };
        let (stuck, _rx) = handle(1, stale);
        let why = stuck.health().expect_err("no beat for twice the stall bound");
        assert!(why.contains("no progress"), "{why}");
    }

    #[test]
    fn a_full_queue_is_busy_and_a_gone_manager_is_stopped_never_a_hang() {
        let (h, rx) = handle(1, Beat::default());
        h.tx.try_send(Event::Persist { reply: mpsc::sync_channel(1).0 }).expect("room for one");
        let busy = h.ask(|reply| Event::Persist { reply });
        assert!(matches!(busy, Err(Unanswered::Busy)), "{busy:?}");
        assert_eq!(busy.map_err(|e| e.response().error.map(|e| e.kind)).err().flatten(), Some(ErrorKind::NotReady));
        drop(rx);
        assert!(matches!(h.ask(|reply| Event::Persist { reply }), Err(Unanswered::Stopped)));
        assert!(matches!(h.tell(Event::Persist { reply: mpsc::sync_channel(1).0 }), Err(Unanswered::Stopped)));
    }
}
