//! Prometheus metrics. Data-plane tasks only bump atomics; encoding happens on
//! the admin thread, so a scrape cannot add latency to traffic.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Outbound, Direction::Inbound];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed cleanly.
    Ok,
    /// The client reset or vanished.
    ClientDisconnected,
    /// The upstream reset or vanished.
    BackendDisconnected,
    /// The upstream could not be reached.
    ConnectFailed,
    IdleTimeout,
    /// The pod went away or the proxy was told to drain.
    Drained,
    /// No original destination could be found.
    NoOriginalDst,
    /// The destination was one of the proxy's own listeners (a direct connect
    /// to a proxy port): refused, since relaying it would loop.
    OwnListener,
    /// The pod already had its limit of connections in the proxy.
    PodLimit,
    /// Inbound, silent both ways past the first-byte deadline while the pod
    /// was flooded with connections.
    FirstByteTimeout,
    /// Outbound to a meshed peer: no HBONE tunnel (dial, mTLS or CONNECT refused).
    TunnelFailed,
    /// Inbound plaintext to a pod whose peer authentication is STRICT.
    PlaintextRefused,
    /// An HBONE stream that was not a CONNECT to this pod (answered 400).
    BadRequest,
    /// Refused by authorization (HBONE: 401; plaintext: reset), or closed
    /// because a policy change denies it now.
    PolicyDenied,
}

impl Outcome {
    pub const ALL: [Outcome; 14] = [
        Outcome::Ok,
        Outcome::ClientDisconnected,
        Outcome::BackendDisconnected,
        Outcome::ConnectFailed,
        Outcome::IdleTimeout,
        Outcome::Drained,
        Outcome::NoOriginalDst,
        Outcome::OwnListener,
        Outcome::PodLimit,
        Outcome::FirstByteTimeout,
        Outcome::TunnelFailed,
        Outcome::PlaintextRefused,
        Outcome::BadRequest,
        Outcome::PolicyDenied,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientDisconnected => "client_disconnected",
            Outcome::BackendDisconnected => "backend_disconnected",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::Drained => "drained",
            Outcome::NoOriginalDst => "no_original_dst",
            Outcome::OwnListener => "own_listener",
            Outcome::PodLimit => "pod_limit",
            Outcome::FirstByteTimeout => "first_byte_timeout",
            Outcome::TunnelFailed => "tunnel_failed",
            Outcome::PlaintextRefused => "plaintext_refused",
            Outcome::BadRequest => "bad_request",
            Outcome::PolicyDenied => "policy_denied",
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ConnectError {
    Refused,
    Timeout,
    Unreachable,
    Other,
}

/// Label values are the snake_case names, as Prometheus users expect.
macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )*};
}
label_value!(Direction, Outcome, ConnectError);

impl ConnectError {
    pub const ALL: [ConnectError; 4] = [ConnectError::Refused, ConnectError::Timeout, ConnectError::Unreachable, ConnectError::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectError::Refused => "refused",
            ConnectError::Timeout => "timeout",
            ConnectError::Unreachable => "unreachable",
            ConnectError::Other => "other",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub pod: String,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub pod: String,
    pub direction: Direction,
    pub result: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectErrorLabels {
    pub pod: String,
    pub kind: ConnectError,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub pod: String,
}

/// An authorization decision: allow or deny, and the policy that decided
/// (empty for the default).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub pod: String,
    pub decision: &'static str,
    pub policy: String,
}

/// A denied inbound connection: the pod, both ends' identities (the source's
/// empty for plaintext) and the deciding policy (empty: the default).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    pub pod: String,
    pub source_identity: String,
    pub destination_identity: String,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    pub pod: String,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: String,
}

fn connect_histogram() -> Histogram {
    // 50 µs to ~1.6 s: loopback connects up to a black-holed peer's timeout.
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

pub struct Metrics {
    pub opened: Family<ConnLabels, Counter>,
    pub active: Family<ConnLabels, Gauge>,
    pub closed: Family<ClosedLabels, Counter>,
    pub bytes_from_client: Family<ConnLabels, Counter>,
    pub bytes_to_client: Family<ConnLabels, Counter>,
    pub bytes_spliced: Family<ConnLabels, Counter>,
    pub splice_fallbacks: Counter,
    pub connect_errors: Family<ConnectErrorLabels, Counter>,
    pub connect_duration: Family<DirectionLabels, Histogram, fn() -> Histogram>,
    pub pods: Gauge,
    /// User-space bytes each pod's connections hold (see [`crate::budget`]).
    pub buffered: Family<PodLabels, Gauge>,
    pub buffered_all: Gauge,
    pub reads_held_back: Family<PodLabels, Counter>,
    /// The per-pod limits in force, so dashboards can show use against them.
    pub limits: Family<LimitLabels, Gauge>,
    /// Connections being relayed, all pods together: what a drain waits for.
    pub live: Gauge,
    /// Of those, the outbound ones: what a stop waits for before inbound accepts end.
    pub live_outbound: Gauge,
    /// HBONE connections whose mutual TLS handshake failed (untrusted, expired, wrong domain).
    pub hbone_refused: Counter,
    /// HBONE connections dialled (TLS handshakes made as a client).
    pub hbone_dials: Counter,
    /// Meshed pod addresses in the agent's last mesh view.
    pub mesh_peers: Gauge,
    /// Roots in the trust bundle: two during a rotation's overlap.
    pub trust_roots: Gauge,
    pub authz: Family<AuthzLabels, Counter>,
    /// What the dry-run policies would have decided, where it differs.
    pub authz_dry_run: Family<AuthzLabels, Counter>,
    pub authz_audit: Family<AuditLabels, Counter>,
    pub authz_denied: Family<DeniedLabels, Counter>,
    /// Live connections closed because a new policy denies them.
    pub authz_closed_live: Counter,
    /// Policy sets taken from the agent.
    pub policy_updates: Counter,
    /// Time spent judging inbound connections, and how many: the cost per connection.
    pub authz_eval_ns: Counter,
    pub authz_evaluations: Counter,
    /// Each pod's authorization series, so [`Metrics::forget_pod`] can drop
    /// them (their labels hold policies and peers no pod record lists).
    authz_series: std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<AuthzSeries>>>,
    pub registry: Registry,
}

/// One authorization series of a pod: a decision, a dry-run outcome, an
/// AUDIT match, a denial.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum AuthzSeries {
    Decision(AuthzLabels),
    DryRun(AuthzLabels),
    Audit(AuditLabels),
    Denied(DeniedLabels),
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("podsteer_proxy");
        let m = Metrics {
            opened: Family::default(),
            active: Family::default(),
            closed: Family::default(),
            bytes_from_client: Family::default(),
            bytes_to_client: Family::default(),
            bytes_spliced: Family::default(),
            splice_fallbacks: Counter::default(),
            connect_errors: Family::default(),
            connect_duration: Family::new_with_constructor(connect_histogram as fn() -> Histogram),
            pods: Gauge::default(),
            buffered: Family::default(),
            buffered_all: Gauge::default(),
            reads_held_back: Family::default(),
            limits: Family::default(),
            live: Gauge::default(),
            live_outbound: Gauge::default(),
            hbone_refused: Counter::default(),
            hbone_dials: Counter::default(),
            mesh_peers: Gauge::default(),
            trust_roots: Gauge::default(),
            authz: Family::default(),
            authz_dry_run: Family::default(),
            authz_audit: Family::default(),
            authz_denied: Family::default(),
            authz_closed_live: Counter::default(),
            policy_updates: Counter::default(),
            authz_eval_ns: Counter::default(),
            authz_evaluations: Counter::default(),
            authz_series: Default::default(),
            registry: Registry::default(),
        };
        registry.register("connections_opened", "Connections accepted", m.opened.clone());
        registry.register("connections_active", "Connections being relayed", m.active.clone());
        registry.register("connections_closed", "Connections ended, by result", m.closed.clone());
        registry.register("bytes_from_client", "Bytes relayed client to upstream", m.bytes_from_client.clone());
        registry.register("bytes_to_client", "Bytes relayed upstream to client", m.bytes_to_client.clone());
        registry.register(
            "bytes_spliced",
            "Bytes of either direction moved by splice(2), never copied to user space",
            m.bytes_spliced.clone(),
        );
        registry.register(
            "splice_fallbacks",
            "Directions that went back to copying because a sockmap feeds their socket",
            m.splice_fallbacks.clone(),
        );
        registry.register("connect_errors", "Upstream connects that failed, by kind", m.connect_errors.clone());
        registry.register("connect_duration_seconds", "Time to connect upstream", m.connect_duration.clone());
        registry.register("pods", "Pods with open listeners", m.pods.clone());
        registry.register("hbone_handshakes_refused", "HBONE connections refused in the mTLS handshake", m.hbone_refused.clone());
        registry.register("hbone_dials", "HBONE connections dialled to peers", m.hbone_dials.clone());
        registry.register("mesh_peers", "Meshed pod addresses in the mesh view", m.mesh_peers.clone());
        registry.register("trust_roots", "Roots in the mesh's trust bundle", m.trust_roots.clone());
        registry.register("authz_decisions", "Inbound connections judged, by decision and deciding policy", m.authz.clone());
        registry.register(
            "authz_denied",
            "Inbound connections denied, by source and destination identity and deciding policy",
            m.authz_denied.clone(),
        );
        registry.register("authz_dry_run", "Where dry-run policies would have decided otherwise", m.authz_dry_run.clone());
        registry.register("authz_audit", "Inbound connections an AUDIT policy matched", m.authz_audit.clone());
        registry.register("policy_updates", "Policy sets taken from the agent", m.policy_updates.clone());
        registry.register("authz_eval_nanoseconds", "Time spent judging inbound connections", m.authz_eval_ns.clone());
        registry.register("authz_evaluations", "Inbound connections judged", m.authz_evaluations.clone());
        registry.register("authz_closed_live", "Live connections closed because a policy change denies them", m.authz_closed_live.clone());
        registry.register("buffered_bytes", "Bytes a pod's connections hold in the proxy's memory", m.buffered.clone());
        registry.register("buffered_bytes_all_pods", "Bytes all pods' connections hold in the proxy's memory", m.buffered_all.clone());
        registry.register("reads_held_back", "Reads done peek-first because a buffer budget was spent", m.reads_held_back.clone());
        registry.register(
            "pod_limit",
            "Limits: per pod, connections at once and buffered bytes; for all pods, buffered bytes",
            m.limits.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Drops every series labelled with `pod`, once the pod is gone and its
    /// last connection has ended: with pods churning, series would otherwise
    /// pile up for ever (memory, and every scrape's size).
    pub fn forget_pod(&self, pod: &str) {
        for direction in Direction::ALL {
            let conn = ConnLabels { pod: pod.into(), direction };
            self.opened.remove(&conn);
            self.active.remove(&conn);
            self.bytes_from_client.remove(&conn);
            self.bytes_to_client.remove(&conn);
            self.bytes_spliced.remove(&conn);
            for result in Outcome::ALL {
                self.closed.remove(&ClosedLabels { pod: pod.into(), direction, result });
            }
        }
        for kind in ConnectError::ALL {
            self.connect_errors.remove(&ConnectErrorLabels { pod: pod.into(), kind });
        }
        let authz = self.authz_series.lock().unwrap_or_else(|e| e.into_inner()).remove(pod);
        for series in authz.into_iter().flatten() {
            match series {
                AuthzSeries::Decision(l) => self.authz.remove(&l),
                AuthzSeries::DryRun(l) => self.authz_dry_run.remove(&l),
                AuthzSeries::Audit(l) => self.authz_audit.remove(&l),
                AuthzSeries::Denied(l) => self.authz_denied.remove(&l),
            };
        }
        self.buffered.remove(&PodLabels { pod: pod.into() });
        self.reads_held_back.remove(&PodLabels { pod: pod.into() });
    }

    /// Counts one authorization outcome (and remembers its series for [`Metrics::forget_pod`]).
    pub fn count_authz(&self, series: AuthzSeries) {
        let (pod, new) = match &series {
            AuthzSeries::Decision(l) => (&l.pod, self.authz.get(l).is_none()),
            AuthzSeries::DryRun(l) => (&l.pod, self.authz_dry_run.get(l).is_none()),
            AuthzSeries::Audit(l) => (&l.pod, self.authz_audit.get(l).is_none()),
            AuthzSeries::Denied(l) => (&l.pod, self.authz_denied.get(l).is_none()),
        };
        // Only a new series takes the lock: the common case is one read of the family.
        if new {
            self.authz_series.lock().unwrap_or_else(|e| e.into_inner()).entry(pod.clone()).or_default().insert(series.clone());
        }
        match &series {
            AuthzSeries::Decision(l) => self.authz.get_or_create(l).inc(),
            AuthzSeries::DryRun(l) => self.authz_dry_run.get_or_create(l).inc(),
            AuthzSeries::Audit(l) => self.authz_audit.get_or_create(l).inc(),
            AuthzSeries::Denied(l) => self.authz_denied.get_or_create(l).inc(),
        };
    }

    /// Counts a connection live from its accept, so a stop cannot exit under
    /// one that is accepted but not yet started.
    pub fn conn_accepted(&self, dir: Direction) {
        self.live.inc();
        if dir == Direction::Outbound {
            self.live_outbound.inc();
        }
    }

    /// The end of what [`Metrics::conn_accepted`] counted.
    pub fn conn_done(&self, dir: Direction) {
        self.live.dec();
        if dir == Direction::Outbound {
            self.live_outbound.dec();
        }
    }

    /// Shows the limits in force (once, at start).
    pub fn set_limits(&self, s: &crate::relay::Settings) {
        let limits =
            [("connections", s.max_conns_per_pod), ("buffered_bytes", s.max_buffered_per_pod), ("buffered_bytes_all_pods", s.max_buffered)];
        for (limit, v) in limits {
            self.limits.get_or_create(&LimitLabels { limit: limit.into() }).set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
