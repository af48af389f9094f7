//! The proxy's connection series for direct connections, from the per-pod
//! totals the kernel keeps: the same names (`podsteer_proxy_*`) and labels,
//! plus `path="direct"`.

use std::collections::HashMap;

use aya::maps::{MapData, PerCpuHashMap};
use podsteer_common::{ConnResult, PodTraffic};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::PodNames;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectLabels {
    pub pod: String,
    pub direction: String,
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectClosedLabels {
    pub pod: String,
    pub direction: String,
    pub result: String,
    pub path: String,
}

#[derive(Clone, Default)]
pub struct DirectSeries {
    pub opened: Family<DirectLabels, Counter>,
    pub closed: Family<DirectClosedLabels, Counter>,
    pub bytes_from_client: Family<DirectLabels, Counter>,
    pub bytes_to_client: Family<DirectLabels, Counter>,
    pub duration_ms: Family<DirectLabels, Counter>,
}

impl DirectSeries {
    /// Registered under the proxy's prefix, so a dashboard's query over
    /// `podsteer_proxy_connections_opened_total` sees both paths.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("podsteer_proxy");
        r.register(
            "connections_opened",
            "Connections opened (path=direct: by the app, straight to an unmeshed destination)",
            self.opened.clone(),
        );
        r.register("connections_closed", "Connections ended, by result", self.closed.clone());
        r.register("bytes_from_client", "Bytes client to upstream", self.bytes_from_client.clone());
        r.register("bytes_to_client", "Bytes upstream to client", self.bytes_to_client.clone());
        r.register("connection_duration_milliseconds", "Time from connect to close, summed (path=direct only)", self.duration_ms.clone());
        r
    }

    fn labels(pod: &str) -> DirectLabels {
        DirectLabels { pod: pod.into(), direction: "outbound".into(), path: "direct".into() }
    }

    fn closed_labels(pod: &str, r: ConnResult) -> DirectClosedLabels {
        DirectClosedLabels { pod: pod.into(), direction: "outbound".into(), result: r.as_str().into(), path: "direct".into() }
    }

    fn forget(&self, pod: &str) {
        let l = Self::labels(pod);
        self.opened.remove(&l);
        self.bytes_from_client.remove(&l);
        self.bytes_to_client.remove(&l);
        self.duration_ms.remove(&l);
        for r in ConnResult::ALL {
            self.closed.remove(&Self::closed_labels(pod, r));
        }
    }
}

/// What the series were last set from, per pod: counters only ever go up by
/// the difference.
#[derive(Default)]
pub struct TotalsReader {
    seen: HashMap<u64, (String, PodTraffic)>,
}

/// One pod's totals over every CPU.
pub fn sum(values: &[PodTraffic]) -> PodTraffic {
    let mut t = PodTraffic::default();
    for v in values {
        t.opened += v.opened;
        for (a, b) in t.closed.iter_mut().zip(v.closed) {
            *a += b;
        }
        t.bytes_from_client += v.bytes_from_client;
        t.bytes_to_client += v.bytes_to_client;
        t.duration_ns += v.duration_ns;
    }
    t
}

impl TotalsReader {
    /// One pass over the totals: each named pod's series go up by what was
    /// added since; a pod whose totals are gone (removed with it) loses its series.
    pub fn update(&mut self, totals: &PerCpuHashMap<MapData, u64, PodTraffic>, names: &PodNames, s: &DirectSeries) {
        let mut now = HashMap::new();
        for (cookie, values) in totals.iter().filter_map(Result::ok) {
            let Some(name) = names.get(cookie) else { continue };
            let t = sum(&values);
            let before = self.seen.get(&cookie).filter(|(label, _)| *label == name.label).map(|(_, t)| *t).unwrap_or_default();
            let l = DirectSeries::labels(&name.label);
            let up = |c: &Counter, now: u64, was: u64| {
                if now > was {
                    c.inc_by(now - was);
                }
            };
            up(&s.opened.get_or_create(&l), t.opened, before.opened);
            up(&s.bytes_from_client.get_or_create(&l), t.bytes_from_client, before.bytes_from_client);
            up(&s.bytes_to_client.get_or_create(&l), t.bytes_to_client, before.bytes_to_client);
            up(&s.duration_ms.get_or_create(&l), t.duration_ns / 1_000_000, before.duration_ns / 1_000_000);
            for r in ConnResult::ALL {
                let i = r as usize;
                if t.closed[i] > 0 {
                    up(&s.closed.get_or_create(&DirectSeries::closed_labels(&name.label, r)), t.closed[i], before.closed[i]);
                }
            }
            now.insert(cookie, (name.label, t));
        }
        for (cookie, (label, _)) in &self.seen {
            if !now.contains_key(cookie) {
                s.forget(label);
            }
        }
        self.seen = now;
    }
}
