//! `security.istio.io/v1` `PeerAuthentication`: whether a meshed workload
//! takes plaintext inbound besides mTLS (HBONE). As Istio resolves it: a
//! policy selecting the workload, else its namespace's (no selector), else
//! the root namespace's, else PERMISSIVE; UNSET inherits from the next level
//! up; `portLevelMtls` (only with a selector) overrides per port.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::eval::Workload;
use crate::policy::PolicyError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    /// Plaintext inbound too, with no source identity.
    Permissive,
    /// HBONE only: plaintext inbound is refused.
    Strict,
    /// Istio's "no mTLS": podsteer still takes HBONE (the node's transport)
    /// and takes plaintext, so at the proxy it is PERMISSIVE.
    Disable,
}

impl Mode {
    pub fn takes_plaintext(self) -> bool {
        self != Mode::Strict
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthn {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    /// None: UNSET, inherited.
    pub mode: Option<Mode>,
    pub ports: BTreeMap<u16, Option<Mode>>,
}

impl PeerAuthn {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    api_version: String,
    kind: String,
    metadata: crate::spec::Metadata,
    #[serde(default)]
    spec: Spec,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    selector: Option<crate::spec::WorkloadSelector>,
    mtls: Option<Mtls>,
    #[serde(default)]
    port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Mtls {
    mode: Option<String>,
}

fn mode(m: Option<&Mtls>, what: &str) -> Result<Option<Mode>, String> {
    match m.and_then(|m| m.mode.as_deref()).unwrap_or("UNSET") {
        "UNSET" => Ok(None),
        "PERMISSIVE" => Ok(Some(Mode::Permissive)),
        "STRICT" => Ok(Some(Mode::Strict)),
        "DISABLE" => Ok(Some(Mode::Disable)),
        other => Err(format!("{what}: {other:?} is not UNSET, DISABLE, PERMISSIVE or STRICT")),
    }
}

/// One `PeerAuthentication` document, already known to be of that kind.
pub fn validate(value: serde_yaml::Value, doc: usize) -> Result<PeerAuthn, PolicyError> {
    let d: Doc = serde_yaml::from_value(value).map_err(|e| PolicyError::Parse { doc, why: e.to_string() })?;
    let namespace = d.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let id = format!("{namespace}/{}", d.metadata.name);
    let bad = |why: String| PolicyError::Invalid { policy: id.clone(), why };
    if d.api_version != "security.istio.io/v1" && d.api_version != "security.istio.io/v1beta1" {
        return Err(bad(format!("apiVersion {:?} is not security.istio.io/v1 (or v1beta1)", d.api_version)));
    }
    debug_assert_eq!(d.kind, "PeerAuthentication");
    let selector = d.spec.selector.map(|s| s.match_labels);
    if selector.is_none() && !d.spec.port_level_mtls.is_empty() {
        return Err(bad("portLevelMtls needs a selector (as in Istio)".into()));
    }
    let mut ports = BTreeMap::new();
    for (p, m) in &d.spec.port_level_mtls {
        let port = p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad(format!("portLevelMtls: {p:?} is not a port in 1-65535")))?;
        ports.insert(port, mode(Some(m), &format!("portLevelMtls[{p}].mode")).map_err(bad)?);
    }
    Ok(PeerAuthn { namespace, name: d.metadata.name, selector, mode: mode(d.spec.mtls.as_ref(), "mtls.mode").map_err(bad)?, ports })
}

/// What applies to one workload, and which policy said so.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Resolved {
    pub mode: Mode,
    pub ports: BTreeMap<u16, Mode>,
    /// None: the default (PERMISSIVE).
    pub decided_by: Option<String>,
}

impl Resolved {
    pub fn for_port(&self, port: u16) -> Mode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

/// Resolves the mode for `w`. Several policies at one level: the first by
/// name wins (Istio takes the oldest; the files carry no creation time).
pub fn resolve(all: &[PeerAuthn], root_namespace: &str, w: &Workload<'_>) -> Resolved {
    fn by_name<'a>(v: impl Iterator<Item = &'a PeerAuthn>) -> Option<&'a PeerAuthn> {
        v.min_by(|a, b| a.name.cmp(&b.name))
    }
    let selected =
        by_name(all.iter().filter(|p| {
            p.namespace == w.namespace && p.selector.as_ref().is_some_and(|s| s.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        }));
    let namespace = by_name(all.iter().filter(|p| p.namespace == w.namespace && p.selector.is_none()));
    let root = by_name(all.iter().filter(|p| p.namespace == root_namespace && p.selector.is_none()));
    let mut mode = Mode::Permissive;
    let mut decided_by = None;
    // From the widest level to the narrowest, each set mode overriding.
    for p in [root, namespace, selected].into_iter().flatten() {
        if let Some(m) = p.mode {
            mode = m;
            decided_by = Some(p.id());
        }
    }
    let ports = selected.map(|p| p.ports.iter().map(|(port, m)| (*port, m.unwrap_or(mode))).collect()).unwrap_or_default();
    Resolved { mode, ports, decided_by }
}
