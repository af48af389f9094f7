//! The agent's decisions: validate, program the kernel, then record. Nothing is
//! changed until the whole request has been validated.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use podsteer_proto::control::{ListenerId, PodSpec};

use serde::Serialize;
use tracing::{info, info_span, warn};

use crate::api::{ErrorKind, PodInfo, Response};
use crate::config::AgentConfig;
use crate::ebpf::EbpfDataPath;
use crate::iptables::Backend;
use crate::mode::{self, Mode, ModeChoice};
use crate::policy::{Policy, ProxyMode, inject_disabled};
use crate::proxy_link::{LinkError, ProxyConn, ProxyLink};
use crate::redirect::{PodNet, Redirector};
use crate::registry::{PodRecord, Registry};
use crate::sys;

/// The mode decision, saved in the state dir at start.
pub const STATUS_FILE: &str = "status.json";

pub struct Controller {
    proxy: Option<Arc<ProxyLink>>,
    config: AgentConfig,
    choice: ModeChoice,
    redirector: Redirector,
    registry: Registry,
    origin: Option<crate::ebpf::loader::Origin>,
    /// The node's netns (the agent's own), which no pod may claim.
    node_netns: Option<crate::peer::NetnsId>,
    /// `--node-netns`: node-level too.
    more_node_netns: Vec<crate::peer::NetnsId>,
    /// The pods' listeners, kept open across proxy restarts.
    kept: crate::kept::KeptListeners,
    beat: Arc<crate::state::Beat>,
    /// `--workload-dir`: who each pod is. Without it pods have no identity.
    workloads: Option<Arc<dyn crate::workloads::WorkloadSource>>,
    /// `--ca-dir`: pods' certificates and the mesh view (see [`crate::mesh`]).
    mesh: Option<crate::mesh::Mesh>,
    /// `--policy-dir`: authorization and peer authentication.
    policies: Option<crate::policies::PolicyFiles>,
    /// `--kubernetes`: the API's watches (the workload source and, maybe, the policies').
    api: Option<crate::apiserver::ApiSource>,
    /// Moves when the policies change; with the mesh's own, what a sidecar polls by.
    policy_generation: u64,
}

#[derive(Serialize)]
pub struct Status<'a> {
    pub mode: Mode,
    pub reason: &'a str,
    pub features: &'a [mode::Feature],
    /// Known kernel bugs on this kernel that podsteer works around.
    pub kernel_notes: &'a [String],
    pub pins: Option<String>,
    pub pins_origin: Option<crate::ebpf::loader::Origin>,
    pub cgroup: String,
    pub pods: usize,
    /// PID of the connected shared proxy, if any.
    pub proxy_pid: Option<u32>,
    /// With `--ca-dir`: the trust bundle and every pod certificate held (never a key).
    pub mesh: Option<serde_json::Value>,
    /// With `--kubernetes`: whether the watches have listed everything, what they hold, their last error.
    pub kubernetes: Option<serde_json::Value>,
    /// Why the newest security policies are refused, while they are (the last good set is in force).
    pub policies_refused: Option<&'a str>,
    pub config: &'a AgentConfig,
}

impl Controller {
    /// Chooses the mode and readies the data path. A forced eBPF mode on a
    /// kernel that lacks a feature fails here, naming it.
    pub fn start(config: AgentConfig) -> anyhow::Result<Controller> {
        // First: a Kubernetes API configuration that cannot be used fails the
        // start before the data path changes anything.
        let api = match config.kubernetes {
            false => None,
            true => Some(crate::apiserver::ApiSource::start(config.kubeconfig.as_deref(), &config.state_dir, config.policy_dir.is_none())?),
        };
        let cgroup_ok = config.cgroup.join("cgroup.procs").exists();
        let (features, kernel_notes) = mode::probe(cgroup_ok.then_some(config.cgroup.as_path()), &config.mask_features);
        let choice = mode::ModeChoice { kernel_notes, ..mode::choose(config.mode, features)? };
        info!(mode = ?choice.mode, reason = %choice.reason, "interception mode chosen");
        for note in &choice.kernel_notes {
            info!(note = %note, "known kernel bug");
        }
        let (redirector, origin) = match choice.mode {
            Mode::Ebpf => {
                let dp = EbpfDataPath::start(&config.bpffs, &config.cgroup)?;
                let origin = dp.origin();
                (Redirector::Ebpf(Box::new(dp)), Some(origin))
            }
            Mode::Iptables => {
                let backend = config.iptables_backend.unwrap_or_else(Backend::detect);
                info!(?backend, "iptables backend");
                (Redirector::Iptables(backend), None)
            }
        };
        std::fs::create_dir_all(&config.state_dir)?;
        sys::set_procfs_dir(config.state_dir.join("procfs"));
        // For `podsteer status` while the agent is down.
        let saved = serde_json::json!({
            "mode": choice.mode,
            "reason": choice.reason,
            "features": choice.features,
            "pins_origin": origin,
            "cgroup": config.cgroup,
            "mesh": crate::mesh::Saved::of(&config),
        });
        std::fs::write(config.state_dir.join(STATUS_FILE), serde_json::to_vec_pretty(&saved)?)?;
        let registry = Registry::open(config.registry_path())?;
        if choice.mode == Mode::Ebpf {
            crate::telemetry::start(&config.bpffs, registry.names())?;
        }
        let proxy = config.proxy_socket.as_ref().map(|_| Arc::new(ProxyLink::default()));
        let node_netns = crate::peer::NetnsId::own().ok();
        let more_node_netns = config
            .node_netns
            .iter()
            .map(|p| anyhow::Context::with_context(crate::peer::NetnsId::of(p), || format!("--node-netns {}", p.display())))
            .collect::<anyhow::Result<_>>()?;
        let kept = crate::kept::KeptListeners::default();
        let beat = Arc::default();
        let workloads = match (&api, &config.workload_dir) {
            (Some(api), _) => Some(Arc::new(api.clone()) as Arc<dyn crate::workloads::WorkloadSource>),
            (None, Some(d)) => Some(Arc::new(crate::workloads::DirSource::new(d)) as Arc<dyn crate::workloads::WorkloadSource>),
            (None, None) => None,
        };
        let mesh = match &config.ca_dir {
            None => None,
            Some(dir) => {
                anyhow::ensure!(
                    workloads.is_some(),
                    "--ca-dir needs --workload-dir or --kubernetes: a certificate names the identity the source gives"
                );
                let lifetime = Duration::from_millis(config.cert_lifetime_ms);
                anyhow::ensure!(lifetime >= Duration::from_secs(2), "--cert-lifetime-ms {}: at least 2000", config.cert_lifetime_ms);
                let m = crate::mesh::Mesh::open(dir, &config.trust_domain, lifetime)?;
                info!(ca_dir = %dir.display(), trust_domain = %config.trust_domain, ?lifetime, "mesh: HBONE between meshed pods");
                Some(m)
            }
        };
        let policies = match (&config.policy_dir, &api) {
            (Some(d), _) => Some(crate::policies::PolicyFiles::open(d, &config.root_namespace)),
            (None, Some(api)) => Some(crate::policies::PolicyFiles::from_api(
                api.clone(),
                &crate::apiserver::policies_dir(&config.state_dir),
                &config.root_namespace,
            )),
            (None, None) => None,
        };
        let mut c = Controller {
            proxy,
            config,
            choice,
            redirector,
            registry,
            origin,
            node_netns,
            more_node_netns,
            kept,
            beat,
            workloads,
            mesh,
            policies,
            policy_generation: 0,
            api,
        };
        c.remove_stale_state();
        Ok(c)
    }

    /// At start, what a previous agent left that matches no live pod is removed,
    /// logged and counted, and never stops the agent: records of pods whose
    /// netns is gone or whose pinned link was stale (the pod died while no agent
    /// ran), and, in eBPF mode, map entries and links no record explains (a
    /// crash between programming a pod and recording it).
    fn remove_stale_state(&mut self) {
        let stale_links: Vec<u64> = match &self.redirector {
            Redirector::Ebpf(dp) => dp.stale_pods().to_vec(),
            Redirector::Iptables(_) => Vec::new(),
        };
        // Counted once each, whether or not the last agent had saved the pod's
        // record before it died (the registry is written behind).
        for _ in &stale_links {
            stale_removed("stale_link");
        }
        let gone: Vec<PodRecord> =
            self.registry.all().filter(|r| stale_links.contains(&r.netns_cookie) || sys::open_netns(&r.netns).is_err()).cloned().collect();
        for rec in gone {
            let _g = pod_span("start", &rec.namespace, &rec.name, &rec.netns, rec.mode).entered();
            if let Err(e) = self.redirector.unenroll(None, rec.netns_cookie, &rec.policy) {
                warn!(error = %error_chain(&e), "removing a gone pod's map entries");
            }
            self.registry.remove(&rec.uid);
            self.kept.forget(&rec.uid);
            if !stale_links.contains(&rec.netns_cookie) {
                stale_removed("netns_gone");
            }
            warn!(cookie = rec.netns_cookie, "pod went away while no agent ran; its state is removed");
        }
        if let Redirector::Ebpf(dp) = &mut self.redirector {
            let known: std::collections::HashSet<u64> = self.registry.all().map(|r| r.netns_cookie).collect();
            let mut orphans: Vec<u64> =
                dp.maps.pod_cookies().into_iter().chain(dp.pins().pod_links()).filter(|c| !known.contains(c)).collect();
            orphans.sort_unstable();
            orphans.dedup();
            for cookie in orphans {
                let removed = dp.maps.forget(cookie).and_then(|()| dp.detach_pod(cookie));
                match removed {
                    Ok(()) => warn!(cookie, "map entries and link that no pod record explains are removed"),
                    Err(e) => warn!(cookie, error = %error_chain(&e), "removing orphaned map entries"),
                }
                if !stale_links.contains(&cookie) {
                    stale_removed("orphan");
                }
            }
        }
        self.registry.save();
    }

    /// Ready: a mode is chosen, the kernel side is in place (in eBPF mode the
    /// four cgroup links and one sk_lookup link per registered pod are pinned),
    /// and the shared proxy, when there is one, is connected and alive. Ok says
    /// what is in place, Err what is missing.
    pub fn ready(&self) -> Result<String, String> {
        let mut what = format!("mode={}", self.choice.mode.as_str());
        if let Redirector::Ebpf(dp) = &self.redirector {
            for p in ["podsteer_connect4", "podsteer_connect6", "podsteer_getsockopt", "podsteer_sockops"] {
                if !dp.pins().link(p).exists() {
                    return Err(format!("{what}: link {p} is not pinned"));
                }
            }
            let pinned: std::collections::HashSet<u64> = dp.pins().pod_links().into_iter().collect();
            if let Some(r) = self.registry.all().find(|r| r.mode == Mode::Ebpf && !pinned.contains(&r.netns_cookie)) {
                return Err(format!("{what}: pod {}/{}'s sk_lookup link is not pinned", r.namespace, r.name));
            }
            what.push_str(&format!(" cgroup_links=4 pod_links={}", pinned.len()));
        }
        if let Some(link) = &self.proxy {
            match link.live() {
                Some(pid) => what.push_str(&format!(" proxy_pid={pid}")),
                None => return Err(format!("{what}: no proxy connected")),
            }
        }
        what.push_str(&format!(" pods={}", self.registry.all().count()));
        Ok(what)
    }

    /// The eBPF per-CPU counters, summed; None in iptables mode.
    pub fn ebpf_counters(&self) -> Option<Vec<(podsteer_common::Counter, u64)>> {
        match &self.redirector {
            Redirector::Ebpf(dp) => dp.maps.counters().ok(),
            Redirector::Iptables(_) => None,
        }
    }

    pub fn status(&self) -> Status<'_> {
        Status {
            mode: self.choice.mode,
            reason: &self.choice.reason,
            features: &self.choice.features,
            kernel_notes: &self.choice.kernel_notes,
            pins: matches!(self.redirector, Redirector::Ebpf(_))
                .then(|| crate::ebpf::pins::PinDir::new(&self.config.bpffs).root().display().to_string()),
            pins_origin: self.origin,
            cgroup: self.config.cgroup.display().to_string(),
            pods: self.registry.all().count(),
            proxy_pid: self.proxy.as_ref().and_then(|p| p.connected()),
            mesh: self.mesh.as_ref().map(|m| m.summary()),
            kubernetes: self.api.as_ref().map(|a| a.status()),
            policies_refused: self.policies.as_ref().and_then(|p| p.refused.as_deref()),
            config: &self.config,
        }
    }

    /// The netns whose root processes are the node's: the agent's own and `--node-netns`.
    pub fn node_netns_ids(&self) -> Vec<crate::peer::NetnsId> {
        self.node_netns.iter().chain(&self.more_node_netns).copied().collect()
    }

    /// The state manager's heartbeat, which long changes touch as they go.
    pub fn beat(&self) -> Arc<crate::state::Beat> {
        self.beat.clone()
    }

    pub fn pods(&self) -> Vec<PodRecord> {
        self.registry.all().cloned().collect()
    }

    pub fn add(&mut self, pod: PodInfo) -> Response {
        let started = std::time::Instant::now();
        let r = self.add_inner(pod);
        record("add", &r, started);
        r
    }

    fn add_inner(&mut self, pod: PodInfo) -> Response {
        let _g = pod_span("add", &pod.namespace, &pod.name, &pod.netns, self.choice.mode).entered();
        if inject_disabled(&pod.annotations) {
            return Response::ok(serde_json::json!({"meshed": false, "reason": "podsteer.io/inject is false"}));
        }
        if let Some(existing) = self.registry.get(&pod.uid) {
            if existing.netns == pod.netns {
                return Response::ok(existing);
            }
            // The sandbox was recreated with the same pod UID (the kubelet does
            // that when a sandbox dies): once the old netns is gone, the old
            // record is stale and the new sandbox takes its place.
            if sys::open_netns(&existing.netns).is_err() {
                let uid = pod.uid.clone();
                info!(old = %existing.netns.display(), "pod's sandbox was recreated; replacing its old record");
                if let Err(e) = self.del(&uid).into_result() {
                    return Response::err(ErrorKind::Internal, format!("removing the old sandbox's state: {}", e.message));
                }
                return self.add_inner(pod);
            }
            return Response::err(
                ErrorKind::BadRequest,
                format!("pod {} is already registered with netns {}", pod.uid, existing.netns.display()),
            );
        }
        // Who the pod is comes from the workload source, by UID (never from
        // its annotations); the ADD's own names must agree with it.
        let (identity, labels) = match self.identity(&pod) {
            Ok(Some(w)) => (Some(w.spiffe_id(&self.config.trust_domain)), w.labels),
            Ok(None) => (None, Default::default()),
            Err(r) => return r,
        };
        // Validate everything before touching the kernel.
        let policy = match Policy::from_annotations(&self.config.node_defaults(), &pod.annotations, &pod.ips) {
            Ok(p) => p,
            Err(e) => return Response::err(ErrorKind::InvalidPolicy, e.to_string()),
        };
        let netns = match sys::open_netns(&pod.netns) {
            Ok(f) => f,
            Err(e) => return Response::err(ErrorKind::BadNetns, error_chain(&e)),
        };
        if self.node_netns.is_some() && crate::peer::NetnsId::of(&pod.netns).ok() == self.node_netns {
            return Response::err(ErrorKind::BadNetns, format!("{} is the node's own network namespace, not a pod's", pod.netns.display()));
        }
        let (cookie, addresses) = match sys::enter_pod(netns.as_fd()) {
            Ok(i) => (i.cookie, i.addresses),
            Err(e) => return Response::err(ErrorKind::BadNetns, error_chain(&e)),
        };
        // The IPs steer inbound traffic to this pod (POD_BY_IP): only its own.
        if let Some(ip) = pod.ips.iter().find(|ip| !addresses.contains(ip)) {
            return Response::err(ErrorKind::BadRequest, format!("{ip} is not an address of netns {}", pod.netns.display()));
        }
        if let Some(other) = self.registry.all().find(|p| p.netns_cookie == cookie) {
            return Response::err(
                ErrorKind::BadRequest,
                format!("netns {} already belongs to pod {}/{}", pod.netns.display(), other.namespace, other.name),
            );
        }
        let net = PodNet { netns, cookie };
        if let Err(e) = self.redirector.enroll(&net, &policy) {
            warn!(error = %error_chain(&e), "enrolment failed; rolling back");
            let _ = self.redirector.unenroll(Some(&net), cookie, &policy);
            return Response::err(ErrorKind::Internal, error_chain(&e));
        }
        // Both modes: the way back for connections that keep the client's address.
        let keeps_client_address = match crate::return_path::install(net.netns.as_fd()) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %error_chain(&e), "no return path: the app will see the proxy's address, not its clients'");
                false
            }
        };
        let proxy_ready = match self.hand_to_proxy(
            &ProxyPod {
                uid: &pod.uid,
                name: &pod.name,
                namespace: &pod.namespace,
                policy: &policy,
                keep_client_address: keeps_client_address,
                identity: identity.as_deref(),
                labels: &labels,
            },
            &net,
        ) {
            Ok(ready) => ready,
            Err(e) => {
                warn!(error = %error_chain(&e), "proxy did not take the pod; rolling back");
                let _ = self.redirector.unenroll(Some(&net), cookie, &policy);
                let _ = crate::return_path::remove(net.netns.as_fd());
                return Response::err(ErrorKind::NotReady, error_chain(&e));
            }
        };
        let rec = PodRecord {
            uid: pod.uid,
            name: pod.name,
            namespace: pod.namespace,
            netns: pod.netns,
            netns_cookie: cookie,
            ips: pod.ips,
            container_id: pod.container_id,
            mode: self.redirector.mode(),
            policy,
            proxy_ready,
            keeps_client_address,
            identity,
            labels,
            last_error: None,
        };
        self.registry.insert(rec.clone());
        // Answered only once the record is on disk: an agent killed right after
        // would otherwise find the pod's map entries unexplained at start and
        // remove them, unmeshing a running pod until repair found it again.
        self.registry.flush();
        info!(cookie, "pod enrolled");
        Response::ok(rec)
    }

    /// Idempotent: an unknown pod is already removed.
    pub fn del(&mut self, uid: &str) -> Response {
        let started = std::time::Instant::now();
        let r = self.del_inner(uid);
        record("del", &r, started);
        r
    }

    fn del_inner(&mut self, uid: &str) -> Response {
        let Some(rec) = self.registry.get(uid).cloned() else {
            return Response::ok(serde_json::json!({"removed": false}));
        };
        let _g = pod_span("del", &rec.namespace, &rec.name, &rec.netns, rec.mode).entered();
        if let Some(link) = &self.proxy {
            // Best effort: a missing proxy has no listeners to close.
            if let Err(e) = link.with_proxy(Duration::ZERO, |p| p.del_pod(uid)) {
                warn!(error = %error_chain(&e), "proxy did not confirm the removal");
            }
        }
        let net = reopen(&rec);
        if let Err(e) = self.redirector.unenroll(net.as_ref(), rec.netns_cookie, &rec.policy) {
            return Response::err(ErrorKind::Internal, error_chain(&e));
        }
        if let Some(net) = &net
            && let Err(e) = crate::return_path::remove(net.netns.as_fd())
        {
            warn!(error = %error_chain(&e), "removing the return path");
        }
        self.registry.remove(uid);
        self.kept.forget(uid);
        if let Some(m) = &mut self.mesh {
            m.forget(uid);
        }
        info!("pod removed");
        Response::ok(serde_json::json!({"removed": true}))
    }

    /// Before exit: the registry's newest state is on disk for the next agent.
    pub fn persist(&self) {
        self.registry.flush();
    }

    /// Uninstall: every pod's interception is removed, then the pins.
    pub fn remove_all(&mut self) -> anyhow::Result<()> {
        let uids: Vec<String> = self.registry.all().map(|p| p.uid.clone()).collect();
        for uid in uids {
            self.beat.touch();
            if let Err(e) = self.del(&uid).into_result() {
                warn!(uid, error = %e, "removing pod during uninstall");
            }
        }
        if self.redirector.mode() == Mode::Ebpf {
            EbpfDataPath::remove_pins(&self.config.bpffs)?;
        }
        Ok(())
    }

    /// The meshing decision for a pod found by repair (the plugin makes the same one).
    pub fn skip_reason(&self, pod: &PodInfo) -> Option<String> {
        crate::policy::skip_reason(&self.config.exclude_namespaces, self.config.injection, &pod.namespace, &pod.annotations)
    }

    /// CNI GC: removes every pod whose sandbox the runtime no longer lists.
    pub fn gc(&mut self, keep: &[String]) -> Response {
        let stale: Vec<String> =
            self.registry.all().filter(|p| p.container_id.as_ref().is_some_and(|c| !keep.contains(c))).map(|p| p.uid.clone()).collect();
        for uid in &stale {
            let r = self.del(uid);
            if !r.ok {
                return r;
            }
        }
        Response::ok(serde_json::json!({"removed": stale}))
    }

    pub fn check(&self, uid: &str) -> Response {
        let Some(rec) = self.registry.get(uid) else {
            return Response::err(ErrorKind::NotFound, format!("pod {uid} is not registered"));
        };
        let net = reopen(rec);
        match self.redirector.verify(net.as_ref(), rec.netns_cookie, &rec.policy) {
            Ok(true) => Response::ok(rec),
            Ok(false) => Response::err(ErrorKind::NotReady, format!("interception for pod {uid} is not in place")),
            Err(e) => Response::err(ErrorKind::Internal, error_chain(&e)),
        }
    }

    /// What an ADD waits on before it is queued (see [`crate::state::Handle::proxy_to_wait_for`]).
    /// The pod's SPIFFE ID from the workload source; None without a source.
    /// One look, as the manager must not wait: the socket thread waited
    /// (`state::Handle::wait_for_workload`) before queueing a plugin's ADD,
    /// and repair simply tries again on its next pass.
    fn identity(&self, pod: &PodInfo) -> Result<Option<crate::workloads::Workload>, Response> {
        let Some(src) = &self.workloads else { return Ok(None) };
        match src.lookup(&pod.uid) {
            Ok(Some(w)) if (w.namespace.as_str(), w.name.as_str()) != (pod.namespace.as_str(), pod.name.as_str()) => Err(Response::err(
                ErrorKind::BadRequest,
                format!(
                    "pod {} is {}/{} to the workload source but {}/{} to the runtime",
                    pod.uid, w.namespace, w.name, pod.namespace, pod.name
                ),
            )),
            Ok(Some(w)) if self.config.node_name.as_ref().is_some_and(|mine| w.node_name.as_ref().is_some_and(|theirs| theirs != mine)) => {
                Err(Response::err(
                    ErrorKind::BadRequest,
                    format!(
                        "pod {} ({}/{}) is on node {} to the workload source, and this is node {}: its identity is not this node's to give",
                        pod.uid,
                        w.namespace,
                        w.name,
                        w.node_name.as_deref().unwrap_or_default(),
                        self.config.node_name.as_deref().unwrap_or_default()
                    ),
                ))
            }
            Ok(Some(w)) => Ok(Some(w)),
            Ok(None) => Err(Response::err(
                ErrorKind::NotReady,
                format!("the workload source does not know pod {} yet: no identity to give it", pod.uid),
            )),
            Err(e) => Err(Response::err(ErrorKind::NotReady, error_chain(&e))),
        }
    }

    /// The workload source and how long a plugin's ADD may wait for it.
    pub fn workload_wait(&self) -> Option<(Arc<dyn crate::workloads::WorkloadSource>, Duration)> {
        self.workloads.clone().map(|w| (w, Duration::from_millis(self.config.workload_wait_ms)))
    }

    pub fn proxy_wait(&self) -> crate::state::ProxyWait {
        crate::state::ProxyWait {
            link: self.proxy.clone(),
            defaults: self.config.node_defaults(),
            wait: Duration::from_millis(self.config.proxy_wait_ms),
        }
    }

    /// Hands a pod to the shared proxy and, in eBPF mode, points sk_lookup at
    /// the inbound listeners it opened. Ok(false): no shared proxy for this pod.
    fn hand_to_proxy(&mut self, pod: &ProxyPod<'_>, net: &PodNet) -> Result<bool, LinkError> {
        let Some(link) = self.proxy.clone() else { return Ok(false) };
        if pod.policy.proxy_mode != ProxyMode::Shared {
            return Ok(false);
        }
        let uid = pod.uid;
        let spec = self.proxy_spec(pod).map_err(|e| LinkError::Nack { uid: uid.into(), error: error_chain(&e) })?;
        // No waiting here, under the controller's lock: the caller waited for a
        // live proxy before taking it (`proxy_to_wait_for`). One that died since
        // makes this ADD fail with "try again", and the runtime retries.
        let kept = self.kept.of(uid);
        let listeners = link.with_proxy(Duration::ZERO, |p| p.add_pod(&spec, net.netns.as_fd(), &kept))?;
        drop(kept);
        self.install_listeners(net.cookie, &listeners);
        self.kept.keep(uid, listeners);
        Ok(true)
    }

    /// What the proxy is sent for a pod; a meshed one's certificate is the
    /// one held for it, or issued now.
    fn proxy_spec(&mut self, pod: &ProxyPod<'_>) -> Result<PodSpec, crate::mesh::MeshError> {
        let cert = match (&mut self.mesh, pod.identity) {
            (Some(m), Some(id)) => Some(m.cert_for(pod.uid, id)?),
            _ => None,
        };
        Ok(PodSpec {
            uid: pod.uid.into(),
            name: pod.name.into(),
            namespace: pod.namespace.into(),
            outbound_port: pod.policy.outbound_port,
            inbound_port: pod.policy.inbound_port,
            listeners: Vec::new(),
            sk_msg: self.sk_msg_feeds(pod.policy),
            keep_client_address: pod.keep_client_address,
            cert,
            labels: pod.labels.clone(),
        })
    }

    /// Once per tick of the manager: CA files that changed, certificates due
    /// for renewal, each sent to the proxy. Failures keep what is valid.
    pub fn mesh_tick(&mut self) {
        if self.policies.as_mut().is_some_and(|p| p.poll()) {
            self.policy_generation += 1;
            if let Some(link) = self.proxy.clone()
                && let Err(e) = link.with_proxy(Duration::ZERO, |p| self.send_policies(p))
            {
                warn!(error = %error_chain(&e), "the proxy did not take the new policies");
            }
        }
        let Some(mesh) = &mut self.mesh else { return };
        let reloaded = match mesh.reload() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %error_chain(&e), "the CA files changed but cannot be used; the last good ones stay");
                false
            }
        };
        let renewed = mesh.renew_due(std::time::SystemTime::now());
        let view = reloaded.then(|| mesh.view());
        let Some(link) = self.proxy.clone() else { return };
        if let Some(view) = view {
            self.send_view(&link, &view);
        }
        for (uid, cert) in renewed {
            match link.with_proxy(Duration::ZERO, |p| p.renew(&uid, &cert)) {
                Ok(()) => info!(%uid, identity = %cert.identity, not_after = cert.not_after, "certificate renewed"),
                Err(e) => warn!(%uid, error = %error_chain(&e), "the proxy did not take the renewed certificate"),
            }
        }
    }

    /// The mesh's peers as the workload source lists them now.
    pub fn set_mesh_peers(&mut self, peers: Vec<podsteer_proto::control::MeshPeer>) {
        // Connects to these are proxied (with --ca-dir, over mTLS); to other
        // addresses, direct. Without a CA the source still says who is meshed.
        if let Redirector::Ebpf(dp) = &mut self.redirector {
            let ips: Vec<std::net::IpAddr> = peers.iter().map(|p| p.ip).collect();
            match dp.maps.set_mesh_peers(&ips) {
                Ok(()) => info!(peers = ips.len(), "meshed destinations updated"),
                Err(e) => warn!(error = %error_chain(&e), "MESH_PEERS not updated: connects to the changed peers take the old path"),
            }
        }
        let Some(mesh) = &mut self.mesh else { return };
        if !mesh.set_peers(peers) {
            return;
        }
        let view = mesh.view();
        info!(peers = view.peers.len(), "mesh peers changed");
        if let Some(link) = self.proxy.clone() {
            self.send_view(&link, &view);
        }
    }

    /// The current policies to `p` (nothing without `--policy-dir`).
    fn send_policies(&self, p: &ProxyConn) -> Result<(), LinkError> {
        let Some(files) = &self.policies else { return Ok(()) };
        let (closed, fd) = files.message().map_err(|e| LinkError::Wire(e.into()))?;
        p.set_policies(&files.root_namespace, closed, fd.as_ref().map(|f| f.as_fd()))
    }

    fn send_view(&self, link: &ProxyLink, view: &podsteer_proto::control::MeshView) {
        // No proxy now: the next one gets the view before its replay.
        if let Err(e) = link.with_proxy(Duration::ZERO, |p| p.set_mesh(view)) {
            warn!(error = %error_chain(&e), "the proxy did not take the mesh view");
        }
    }

    /// For the peer watcher: the source, and the config its filter reads.
    pub fn mesh_source(&self) -> Option<(Arc<dyn crate::workloads::WorkloadSource>, AgentConfig)> {
        // Every source lists meshed destinations; only a CA makes them HBONE peers.
        Some((self.workloads.clone()?, self.config.clone()))
    }

    /// Whether sk_msg delivers to the pod's sockets, which the proxy must then
    /// read with recvmsg and never splice(2).
    fn sk_msg_feeds(&self, policy: &Policy) -> bool {
        self.redirector.mode() == Mode::Ebpf && policy.sk_msg
    }

    /// eBPF mode: sk_lookup steers the pod's inbound connections to these.
    fn install_listeners(&mut self, cookie: u64, listeners: &[(ListenerId, std::os::fd::OwnedFd)]) {
        if self.redirector.mode() != Mode::Ebpf {
            return;
        }
        for (id, fd) in listeners.iter().filter(|(id, _)| id.inbound && !id.hbone) {
            if let Err(e) = self.redirector.set_inbound_listener(cookie, id.family, fd.as_fd()) {
                warn!(error = %error_chain(&e), family = id.family, "inbound listener");
            }
        }
    }

    /// A proxy connected: replay every shared-mode pod to it, make it current,
    /// then tell the one it replaces to drain. New listeners exist before old
    /// ones close, so no connection is refused during the handover.
    pub fn on_proxy(&mut self, conn: ProxyConn) {
        let Some(link) = self.proxy.clone() else { return };
        let pods: Vec<PodRecord> = self.registry.all().filter(|p| p.policy.proxy_mode == ProxyMode::Shared).cloned().collect();
        // The mesh and the policies first, so the replayed pods' first
        // connections can tunnel and are judged.
        if let Some(m) = &self.mesh
            && let Err(e) = conn.set_mesh(&m.view())
        {
            warn!(error = %error_chain(&e), "the new proxy did not take the mesh view");
        }
        if let Err(e) = self.send_policies(&conn) {
            warn!(error = %error_chain(&e), "the new proxy did not take the policies");
        }
        for rec in pods {
            // A replay of many pods is progress, not a stall.
            self.beat.touch();
            let _g = pod_span("replay", &rec.namespace, &rec.name, &rec.netns, rec.mode).entered();
            let Ok(netns) = sys::open_netns(&rec.netns) else {
                warn!("netns gone; the pod will be removed by repair");
                continue;
            };
            let spec = self.proxy_spec(&ProxyPod::of(&rec));
            let spec = match spec {
                Ok(s) => s,
                Err(e) => {
                    // Never replayed without its certificate: it would go out in plaintext.
                    warn!(error = %error_chain(&e), "no certificate; replay");
                    if let Some(r) = self.registry.get_mut(&rec.uid) {
                        r.last_error = Some(error_chain(&e));
                    }
                    continue;
                }
            };
            let kept = self.kept.of(&rec.uid);
            let added = conn.add_pod(&spec, netns.as_fd(), &kept);
            drop(kept);
            match added {
                Ok(listeners) => {
                    self.install_listeners(rec.netns_cookie, &listeners);
                    self.kept.keep(&rec.uid, listeners);
                    if let Some(r) = self.registry.get_mut(&rec.uid) {
                        r.proxy_ready = true;
                        r.last_error = None;
                    }
                }
                Err(e) => {
                    warn!(error = %error_chain(&e), "replay");
                    if let Some(r) = self.registry.get_mut(&rec.uid) {
                        r.last_error = Some(error_chain(&e));
                    }
                }
            }
        }
        self.registry.save();
        info!(pid = conn.pid, "proxy connected and replayed");
        if let Some(old) = link.promote(conn) {
            info!(pid = old.pid, "draining the previous proxy");
            if let Err(e) = old.drain() {
                warn!(error = %error_chain(&e), "drain");
            }
        }
    }

    /// A sidecar's part of the mesh: what the shared proxy is told for its
    /// pods (the certificate, the view, the policies), asked for by the
    /// sidecar itself, which polls with the generation it holds. Only for a
    /// pod the sidecar serves: a shared-mode pod's key stays with the proxy.
    pub fn sidecar_mesh(&mut self, uid: &str, seen: Option<u64>) -> Response {
        use podsteer_proto::control::{SidecarMaterial, SidecarMesh, SidecarPolicies};
        let plaintext = |why: &str| Response::ok(SidecarMesh::Plaintext { why: why.into() });
        let Some(rec) = self.registry.get(uid) else {
            return Response::err(ErrorKind::NotFound, format!("pod {uid} is not registered"));
        };
        let Some(mesh) = &mut self.mesh else { return plaintext("the node has no CA (--ca-dir): no HBONE") };
        if rec.policy.proxy_mode != ProxyMode::Sidecar {
            return Response::err(ErrorKind::Forbidden, format!("pod {uid} is served by the shared proxy, which holds its certificate"));
        }
        let (Some(identity), namespace, name, labels) = (rec.identity.clone(), rec.namespace.clone(), rec.name.clone(), rec.labels.clone())
        else {
            return plaintext("the workload source gave the pod no identity");
        };
        let cert = match mesh.cert_for(uid, &identity) {
            Ok(c) => c,
            Err(e) => return Response::err(ErrorKind::Internal, error_chain(&e)),
        };
        let generation = mesh.generation() + self.policy_generation;
        if seen == Some(generation) {
            return Response::ok(SidecarMesh::Unchanged { generation });
        }
        let policies = self.policies.as_ref().map(|p| SidecarPolicies {
            root_namespace: p.root_namespace.clone(),
            closed: p.text().is_none(),
            text: p.text().unwrap_or_default().into(),
        });
        let material = SidecarMaterial { cert, view: mesh.view(), namespace, name, labels, policies };
        Response::ok(SidecarMesh::Meshed { generation, material: Box::new(material) })
    }

    pub fn register_listener(&mut self, uid: &str, family: u16, fd: Option<BorrowedFd<'_>>) -> Response {
        let Some(rec) = self.registry.get(uid) else {
            return Response::err(ErrorKind::NotFound, format!("pod {uid} is not registered"));
        };
        let Some(fd) = fd else { return Response::err(ErrorKind::BadRequest, "register_listener needs a socket fd (SCM_RIGHTS)") };
        if family != podsteer_common::AF_INET && family != podsteer_common::AF_INET6 {
            return Response::err(ErrorKind::BadRequest, format!("family {family} is neither 2 nor 10"));
        }
        if let Err(why) = sys::check_listener(fd, family, rec.netns_cookie) {
            return Response::err(ErrorKind::BadRequest, format!("not the pod's inbound listener: {why}"));
        }
        match self.redirector.set_inbound_listener(rec.netns_cookie, family, fd) {
            Ok(()) => Response::ok(serde_json::json!({"registered": true, "sk_msg": self.sk_msg_feeds(&rec.policy)})),
            // A sidecar does not know the node's mode, and in iptables mode it
            // needs nothing from the agent: a refusal would stop it starting.
            Err(crate::redirect::RedirectError::NotEbpf) => Response::ok(serde_json::json!({
                "registered": false,
                "sk_msg": false,
                "why": "iptables mode: REDIRECT in the pod's netns brings inbound connections to the listener",
            })),
            Err(e) => Response::err(ErrorKind::BadRequest, error_chain(&e)),
        }
    }
}

/// What the shared proxy is told of one pod.
struct ProxyPod<'a> {
    uid: &'a str,
    name: &'a str,
    namespace: &'a str,
    policy: &'a Policy,
    keep_client_address: bool,
    identity: Option<&'a str>,
    labels: &'a std::collections::BTreeMap<String, String>,
}

impl ProxyPod<'_> {
    fn of(rec: &PodRecord) -> ProxyPod<'_> {
        ProxyPod {
            uid: &rec.uid,
            name: &rec.name,
            namespace: &rec.namespace,
            policy: &rec.policy,
            keep_client_address: rec.keeps_client_address,
            identity: rec.identity.as_deref(),
            labels: &rec.labels,
        }
    }
}

/// Every log line about one pod carries its name, netns and mode.
fn pod_span(op: &'static str, namespace: &str, name: &str, netns: &std::path::Path, mode: Mode) -> tracing::Span {
    info_span!("pod", op, pod = %format!("{namespace}/{name}"), netns = %netns.display(), ?mode)
}

/// A registered pod's netns, if it still exists (it is gone on a runtime's late DEL).
fn reopen(rec: &PodRecord) -> Option<PodNet> {
    sys::open_netns(&rec.netns).ok().map(|netns| PodNet { netns, cookie: rec.netns_cookie })
}

fn stale_removed(kind: &str) {
    crate::metrics::metrics().stale_removed.get_or_create(&crate::metrics::ActionLabel { action: kind.into() }).inc();
}

fn record(op: &str, r: &Response, started: std::time::Instant) {
    use crate::metrics::{OpLabel, OpResult, metrics};
    let result = if r.ok { "ok" } else { "error" };
    metrics().registrations.get_or_create(&OpResult { op: op.into(), result: result.into() }).inc();
    metrics().registration_seconds.get_or_create(&OpLabel { op: op.into() }).observe(started.elapsed().as_secs_f64());
}

pub use podsteer_proto::error_chain;
