//! The agent's Prometheus metrics. One process-wide set: every subsystem
//! counts into it, and the admin endpoint encodes it on scrape.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResult {
    pub op: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandResult {
    pub command: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabel {
    pub counter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: String,
}

fn latency() -> Histogram {
    // 100 µs to ~3 s: a map write up to a CNI ADD waiting on the proxy.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

pub struct AgentMetrics {
    pub pods: Family<ModeLabel, Gauge>,
    pub registrations: Family<OpResult, Counter>,
    pub registration_seconds: Family<OpLabel, Histogram, fn() -> Histogram>,
    pub requests: Family<CommandResult, Counter>,
    pub ebpf: Family<CounterLabel, Gauge>,
    pub iptables: Family<OpResult, Counter>,
    pub repair: Family<ActionLabel, Counter>,
    pub repair_passes: Counter,
    pub stale_removed: Family<ActionLabel, Counter>,
    pub conflist_reinsertions: Counter,
    /// Policy bundles refused (an invalid document), the last good one kept.
    pub policies_refused: Counter,
    /// Workload certificates issued, by why: new (a pod's first) or renewal.
    pub certificates: Family<ActionLabel, Counter>,
    /// Direct connections' series, under the proxy's names (see [`crate::telemetry`]).
    pub direct: crate::telemetry::DirectSeries,
    registry: Registry,
    direct_registry: Registry,
}

impl AgentMetrics {
    fn new() -> AgentMetrics {
        let mut registry = Registry::with_prefix("podsteer_agent");
        let m = AgentMetrics {
            pods: Family::default(),
            registrations: Family::default(),
            registration_seconds: Family::new_with_constructor(latency as fn() -> Histogram),
            requests: Family::default(),
            ebpf: Family::default(),
            iptables: Family::default(),
            repair: Family::default(),
            repair_passes: Counter::default(),
            stale_removed: Family::default(),
            conflist_reinsertions: Counter::default(),
            policies_refused: Counter::default(),
            certificates: Family::default(),
            direct: crate::telemetry::DirectSeries::default(),
            registry: Registry::default(),
            direct_registry: Registry::default(),
        };
        registry.register("pods", "Pods registered, by interception mode", m.pods.clone());
        registry.register("registrations", "Pod registrations and removals, by result", m.registrations.clone());
        registry.register("registration_duration_seconds", "Time to register or remove a pod", m.registration_seconds.clone());
        registry.register(
            "requests",
            "Requests on the agent socket (from podsteer-cni and the CLI), by command and result",
            m.requests.clone(),
        );
        registry.register("ebpf_events", "The eBPF programs' per-CPU counters, summed", m.ebpf.clone());
        registry.register("iptables_operations", "iptables-save and iptables-restore runs, by result", m.iptables.clone());
        registry.register("repair_actions", "Pods enrolled or removed by repair", m.repair.clone());
        registry.register(
            "repair_passes",
            "Repair passes completed (the runtime listed and the registry reconciled)",
            m.repair_passes.clone(),
        );
        registry.register(
            "stale_state_removed",
            "State a previous agent left that matches no live pod, removed at start, by kind (stale_link, netns_gone, orphan)",
            m.stale_removed.clone(),
        );
        registry.register(
            "conflist_reinsertions",
            "Times the CNI entry was put back after someone rewrote the conflist",
            m.conflist_reinsertions.clone(),
        );
        registry.register(
            "policies_refused",
            "Policy file sets refused for an invalid document (the last good set stays in force)",
            m.policies_refused.clone(),
        );
        registry.register("certificates_issued", "Workload certificates issued, by action (new, renewal)", m.certificates.clone());
        let direct_registry = m.direct.registry();
        AgentMetrics { registry, direct_registry, ..m }
    }

    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &self.direct_registry))
            .and_then(|()| encode_eof(&mut out));
        out
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static AgentMetrics {
    static M: OnceLock<AgentMetrics> = OnceLock::new();
    M.get_or_init(AgentMetrics::new)
}

pub fn result<T, E>(r: &Result<T, E>) -> String {
    if r.is_ok() { "ok".into() } else { "error".into() }
}
