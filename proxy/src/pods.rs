//! The proxy's pods: listeners per pod, opened on request and closed on removal.
//! Everything here can be rebuilt from the agent's replay.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::info;

use crate::budget::Share;
use crate::control::wire::ListenerId;
use crate::inpod::netns::PodNetns;
use crate::listeners::{self, ListenError};
use crate::metrics::{Direction, Metrics};
use crate::relay::{PodCtx, Settings};

struct Pod {
    ctx: Arc<PodCtx>,
    stop: watch::Sender<bool>,
    /// Duplicates of the listeners, for the agent to keep.
    listeners: Vec<(ListenerId, OwnedFd)>,
}

/// A listener before it listens: one the agent kept, or one bound here.
enum Prepared {
    Kept(OwnedFd),
    Bound(tokio::net::TcpSocket),
}

pub struct Pods {
    pods: BTreeMap<String, Pod>,
    /// See [`PodCtx::outbound_stopping`].
    outbound_stop: watch::Sender<bool>,
    rt: Handle,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    hbone: Arc<crate::hbone::Node>,
}

pub struct PodRequest {
    pub uid: String,
    pub label: String,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// See [`PodCtx::splice_allowed`].
    pub splice_allowed: bool,
    /// See [`PodCtx::keep_client_address`].
    pub keep_client_address: bool,
    /// Listening sockets the agent kept open for the pod, to accept on.
    pub kept: Vec<(ListenerId, OwnedFd)>,
    /// Meshed with an identity: HBONE listeners open too.
    pub tls: Option<crate::hbone::mesh::PodTls>,
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Pods {
    pub fn new(rt: Handle, settings: Arc<Settings>, metrics: Arc<Metrics>, hbone: Arc<crate::hbone::Node>) -> Pods {
        Pods { pods: BTreeMap::new(), outbound_stop: watch::channel(false).0, rt, settings, metrics, hbone }
    }

    pub fn hbone(&self) -> &Arc<crate::hbone::Node> {
        &self.hbone
    }

    /// Opens the pod's listeners, adopting those the agent kept (or finds them
    /// open: replays are idempotent), and returns duplicates of all four.
    pub fn add(&mut self, mut req: PodRequest, netns: PodNetns) -> Result<Vec<(ListenerId, OwnedFd)>, ListenError> {
        if let Some(p) = self.pods.get(&req.uid) {
            // A replay from a restarted agent brings the certificate it will
            // renew from now on: take it, or the one held here would expire
            // before that agent's schedule replaced it.
            if let (Some(held), Some(new)) = (&p.ctx.tls, &req.tls) {
                held.cert.replace(new.cert.get());
            }
            return Ok(dup_all(&p.listeners));
        }
        // Bind all that are not kept before listening on any: a pod gets every listener or none.
        let hbone: Vec<std::net::SocketAddr> = req.tls.as_ref().map(|_| crate::hbone::inbound::addresses().to_vec()).unwrap_or_default();
        let all = listeners::addresses(req.outbound_port, req.inbound_port)
            .into_iter()
            .map(|(dir, addr)| (dir, addr, false))
            .chain(hbone.into_iter().map(|addr| (Direction::Inbound, addr, true)));
        let mut prepared = Vec::new();
        for (dir, addr, tunnel) in all {
            let id = ListenerId { inbound: dir == Direction::Inbound, family: if addr.is_ipv4() { 2 } else { 10 }, hbone: tunnel };
            let p = match req.kept.iter().position(|(k, _)| *k == id) {
                Some(i) => Prepared::Kept(req.kept.swap_remove(i).1),
                None => Prepared::Bound(listeners::bind(&netns, dir, addr)?),
            };
            prepared.push((id, dir, addr, p));
        }
        let (stop, stopping) = watch::channel(false);
        let conns = Arc::new(crate::conns::Conns::default());
        self.rt.spawn(crate::conns::sweeper(conns.clone(), stopping.clone(), crate::conns::Timeouts::of(&self.settings)));
        let pod_labels = crate::metrics::PodLabels { pod: req.label.clone() };
        let budget = crate::budget::Budget::new(
            Share::new(self.metrics.buffered.get_or_create(&pod_labels).clone(), self.settings.max_buffered_per_pod),
            Share::new(self.metrics.buffered_all.clone(), self.settings.max_buffered),
            self.metrics.reads_held_back.get_or_create(&pod_labels).clone(),
        );
        let ctx = Arc::new(PodCtx {
            label: req.label.clone(),
            netns,
            outbound_port: req.outbound_port,
            inbound_port: req.inbound_port,
            stopping,
            outbound_stopping: self.outbound_stop.subscribe(),
            conns,
            splice_allowed: req.splice_allowed.into(),
            keep_client_address: req.keep_client_address.into(),
            serving: 0.into(),
            budget,
            tls: req.tls.take().map(Arc::new),
            hbone: self.hbone.clone(),
            uid: req.uid.clone(),
            policy: crate::authz::PodPolicy::new(&req.namespace, std::mem::take(&mut req.labels)),
        });
        let _rt = self.rt.enter();
        let mut held = Vec::new();
        let mut ready = Vec::new();
        let mut adopted = 0;
        for (id, dir, addr, p) in prepared {
            let l = match p {
                Prepared::Kept(fd) => {
                    adopted += 1;
                    listeners::adopt(fd, dir, addr)?
                }
                Prepared::Bound(sock) => listeners::listen(sock, dir, addr)?,
            };
            held.push((id, listeners::dup(&l).map_err(|source| ListenError { direction: dir, addr, source })?));
            ready.push((l, dir, id.hbone));
        }
        for (l, dir, tunnel) in ready {
            let (ctx, settings, metrics) = (ctx.clone(), self.settings.clone(), self.metrics.clone());
            if tunnel {
                self.rt.spawn(crate::hbone::inbound::accept_loop(l, ctx, settings, metrics));
            } else {
                self.rt.spawn(listeners::accept_loop(l, dir, ctx, settings, metrics));
            }
        }
        info!(pod = %req.label, uid = %req.uid, adopted, "listeners open");
        let out = dup_all(&held);
        self.pods.insert(req.uid, Pod { ctx, stop, listeners: held });
        self.metrics.pods.set(self.pods.len() as i64);
        Ok(out)
    }

    /// Closes the pod's listeners now; its connections finish or are reset after the drain timeout.
    pub fn remove(&mut self, uid: &str) -> bool {
        let Some(p) = self.pods.remove(uid) else { return false };
        let _ = p.stop.send(true);
        self.hbone.pool.forget_pod(uid);
        p.ctx.forget_if_done(&self.metrics);
        self.metrics.pods.set(self.pods.len() as i64);
        info!(uid, "listeners closed, draining");
        true
    }

    /// A new policy set: every pod's live inbound connections it no longer
    /// allows are closed; how many.
    pub fn recheck(&self) -> usize {
        let mut closed = 0;
        for p in self.pods.values() {
            closed += p.ctx.conns.recheck(|c| p.ctx.policy.still_allowed(&self.hbone.policies, c));
        }
        self.metrics.authz_closed_live.inc_by(closed as u64);
        closed
    }

    /// A meshed pod's renewed certificate, for its handshakes from now on.
    pub fn renew(&self, uid: &str, cert: &podsteer_proto::control::WorkloadCert) -> Result<(), String> {
        let p = self.pods.get(uid).ok_or_else(|| format!("pod {uid} has no listeners here"))?;
        p.ctx.tls.as_ref().ok_or_else(|| format!("pod {uid} was added without a certificate"))?.renew(cert)
    }

    /// Whether the pod's inbound legs connect from their clients' addresses
    /// (a sidecar learns it may only once it has settled its privileges).
    pub fn keep_client_address(&self, uid: &str, keep: bool) {
        if let Some(p) = self.pods.get(uid) {
            p.ctx.keep_client_address.store(keep, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Lets a pod's new bulk connections splice(2), once it is known that sk_msg does not feed its sockets.
    pub fn allow_splice(&self, uid: &str) {
        if let Some(p) = self.pods.get(uid) {
            p.ctx.splice_allowed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The first step of a stop: no new outbound connections (they wait in the
    /// listeners the agent keeps, for the next proxy), while inbound accepts go
    /// on, so outbound connections in flight to a pod on this node can finish.
    pub fn stop_outbound(&mut self) {
        let _ = self.outbound_stop.send(true);
    }

    pub fn remove_all(&mut self) {
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            self.remove(&uid);
        }
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

fn dup_all(fds: &[(ListenerId, OwnedFd)]) -> Vec<(ListenerId, OwnedFd)> {
    fds.iter().filter_map(|(f, fd)| fd.try_clone().ok().map(|d| (*f, d))).collect()
}
