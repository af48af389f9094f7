//! Authorization and peer authentication where Istio ambient puts them: at
//! the receiving proxy, for every inbound connection of a pod it serves. An
//! HBONE stream carries its source's verified identity; a plaintext one has
//! none, and is refused outright where the pod's `PeerAuthentication` is
//! STRICT. Policies come from the agent, already validated, replacing the
//! last set whole; each pod's applicable part is worked out once per set, so
//! a connection is judged against its own pod's few policies, however many
//! the node has. A new set is applied to live connections too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use podsteer_authz::eval::{Conn, Decision, PolicySet, Verdict, Workload};
use podsteer_authz::peer_auth::{self, Resolved};
use podsteer_authz::source::Bundle;

use crate::metrics::{AuthzSeries, Metrics};
use podsteer_identity::spiffe::SpiffeId;

/// The node's policy, as the agent last sent it.
enum State {
    /// No `--policy-dir`: every connection is allowed, plaintext included.
    Unconfigured,
    /// The agent has no valid policy: inbound is refused, never left open.
    Closed,
    Set {
        root_namespace: String,
        bundle: Bundle,
    },
}

struct Current {
    generation: u64,
    state: State,
}

/// Replaced whole by [`Policies::set`]; read by every inbound connection.
pub struct Policies(RwLock<Arc<Current>>);

impl Default for Policies {
    fn default() -> Self {
        Policies(RwLock::new(Arc::new(Current { generation: 0, state: State::Unconfigured })))
    }
}

impl Policies {
    /// The agent's new policy (YAML it validated). A text that does not parse
    /// here is refused, and the last set stays. The policy counts, for the log.
    pub fn set(&self, root_namespace: &str, closed: bool, text: &str) -> Result<(usize, usize), String> {
        let state = if closed {
            State::Closed
        } else {
            let bundle = podsteer_authz::source::parse(text).map_err(|e| e.to_string())?;
            State::Set { root_namespace: root_namespace.into(), bundle }
        };
        let counts = match &state {
            State::Set { bundle, .. } => (bundle.authorization.len(), bundle.peer_authentication.len()),
            _ => (0, 0),
        };
        let mut cur = self.0.write().unwrap_or_else(|p| p.into_inner());
        *cur = Arc::new(Current { generation: cur.generation + 1, state });
        Ok(counts)
    }

    fn current(&self) -> Arc<Current> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One pod's part of the current policy.
pub struct PodView {
    generation: u64,
    closed: bool,
    /// None: no policy configured (allow).
    set: Option<PolicySet>,
    peer: Resolved,
}

/// Who a pod is, as policies select it, and its view of the current set.
pub struct PodPolicy {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    cached: Mutex<Option<Arc<PodView>>>,
}

/// Why a connection was refused, and by which policy.
#[derive(Debug)]
pub struct Denial {
    pub reason: String,
    pub policy: Option<String>,
}

impl PodPolicy {
    pub fn new(namespace: &str, labels: BTreeMap<String, String>) -> PodPolicy {
        PodPolicy { namespace: namespace.into(), labels, cached: Mutex::new(None) }
    }

    fn view(&self, policies: &Policies) -> Arc<PodView> {
        let cur = policies.current();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = cached.as_ref().filter(|v| v.generation == cur.generation) {
            return v.clone();
        }
        let w = Workload { namespace: &self.namespace, labels: &self.labels };
        let permissive = Resolved { mode: peer_auth::Mode::Permissive, ports: BTreeMap::new(), decided_by: None };
        let view = match &cur.state {
            State::Unconfigured => PodView { generation: cur.generation, closed: false, set: None, peer: permissive },
            State::Closed => PodView { generation: cur.generation, closed: true, set: None, peer: permissive },
            State::Set { root_namespace, bundle } => {
                // Only this pod's policies are kept (cloned): a connection is
                // then judged against a handful, however many the node has.
                let policies =
                    bundle.authorization.iter().filter(|p| podsteer_authz::eval::applies(p, root_namespace, &w)).cloned().collect();
                let mine = PolicySet { root_namespace: root_namespace.clone(), policies };
                PodView {
                    generation: cur.generation,
                    closed: false,
                    set: Some(mine),
                    peer: peer_auth::resolve(&bundle.peer_authentication, root_namespace, &w),
                }
            }
        };
        let view = Arc::new(view);
        *cached = Some(view.clone());
        view
    }

    /// The verdict for an inbound connection to this pod; counted.
    /// `identity`: the pod's own (the destination's), for the denied series.
    pub fn check(
        &self,
        policies: &Policies,
        c: &Conn,
        pod: &str,
        identity: Option<&SpiffeId>,
        m: &Metrics,
    ) -> Result<Option<Verdict>, Denial> {
        let started = std::time::Instant::now();
        let view = self.view(policies);
        let r = self.judge(&view, c);
        m.authz_eval_ns.inc_by(started.elapsed().as_nanos() as u64);
        m.authz_evaluations.inc();
        let (decision, policy) = match &r {
            Ok(v) => ("allow", v.as_ref().and_then(|v| v.decided_by.as_ref().map(|d| d.policy.clone()))),
            Err(d) => ("deny", d.policy.clone()),
        };
        let policy = policy.unwrap_or_default();
        if r.is_err() {
            // Who was refused, by whom: the series a user alerts on.
            let labels = crate::metrics::DeniedLabels {
                pod: pod.into(),
                source_identity: c.source.as_ref().map(|s| s.to_string()).unwrap_or_default(),
                destination_identity: identity.map(|s| s.to_string()).unwrap_or_default(),
                policy: policy.clone(),
            };
            m.count_authz(AuthzSeries::Denied(labels));
        }
        m.count_authz(AuthzSeries::Decision(crate::metrics::AuthzLabels { pod: pod.into(), decision, policy }));
        if let Ok(Some(v)) = &r {
            for a in &v.audited {
                m.count_authz(AuthzSeries::Audit(crate::metrics::AuditLabels { pod: pod.into(), policy: a.policy.clone() }));
            }
            if let Some(dry) = &v.dry_run {
                let policy = dry.decided_by.as_ref().map(|d| d.policy.clone()).unwrap_or_default();
                let decision = if dry.decision == Decision::Allow { "allow" } else { "deny" };
                m.count_authz(AuthzSeries::DryRun(crate::metrics::AuthzLabels { pod: pod.into(), decision, policy }));
            }
        }
        r
    }

    /// Whether a live connection judged before may go on under the current set.
    pub fn still_allowed(&self, policies: &Policies, c: &Conn) -> bool {
        self.judge(&self.view(policies), c).is_ok()
    }

    fn judge(&self, view: &PodView, c: &Conn) -> Result<Option<Verdict>, Denial> {
        if view.closed {
            return Err(Denial { reason: "the agent has no valid policy: inbound refused until it has".into(), policy: None });
        }
        let w = Workload { namespace: &self.namespace, labels: &self.labels };
        let j = podsteer_authz::judge::judge(view.set.as_ref(), &view.peer, &w, c);
        if j.allowed() { Ok(j.verdict) } else { Err(Denial { reason: j.reason, policy: j.policy }) }
    }
}
