//! Whether a pod is meshed at all. The plugin and the agent's repair decide
//! with this one function, so they never disagree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::annotations::INJECT;
use crate::annotations::ISTIO_INJECT;

/// Opt-out meshes every pod unless it says no; opt-in only pods that say yes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Injection {
    #[default]
    OptOut,
    OptIn,
}

/// Why a pod is not meshed, or None when it is. The plugin and the agent's
/// repair decide with this one function, so they never disagree.
pub fn skip_reason(exclude_namespaces: &[String], injection: Injection, namespace: &str, ann: &BTreeMap<String, String>) -> Option<String> {
    if exclude_namespaces.iter().any(|n| n == namespace) {
        return Some(format!("namespace {namespace} is excluded"));
    }
    if let Some(why) = opt_out(ann) {
        return Some(why);
    }
    match ann.get(INJECT).map(String::as_str) {
        Some(v) if v.eq_ignore_ascii_case("true") => None,
        _ if injection == Injection::OptIn => Some(format!("opt-in mode and no {}: \"true\"", INJECT)),
        _ => None,
    }
}

/// Whether annotations ask for the pod to be left alone.
pub fn inject_disabled(annotations: &BTreeMap<String, String>) -> bool {
    opt_out(annotations).is_some()
}

/// Why the pod's annotations opt it out, if they do: `podsteer.io/inject:
/// "false"`, or without that annotation Istio's `sidecar.istio.io/inject:
/// "false"`. The plugin, the agent and the injector all ask this.
pub fn opt_out<'a>(annotations: impl IntoIterator<Item = (&'a String, &'a String)>) -> Option<String> {
    let (mut ours, mut istio) = (None, None);
    for (k, v) in annotations {
        match k.as_str() {
            INJECT => ours = Some(v),
            ISTIO_INJECT => istio = Some(v),
            _ => {}
        }
    }
    match (ours, istio) {
        (Some(v), _) if v.eq_ignore_ascii_case("false") => Some(format!("{INJECT} is \"false\"")),
        (None, Some(v)) if v.eq_ignore_ascii_case("false") => Some(format!("{ISTIO_INJECT} is \"false\" (Istio's opt-out, honoured)")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn istio_opt_out_is_honoured_unless_podsteer_is_asked_directly() {
        assert!(inject_disabled(&ann(&[(INJECT, "False")])));
        assert!(inject_disabled(&ann(&[(ISTIO_INJECT, "false")])));
        assert!(!inject_disabled(&ann(&[(ISTIO_INJECT, "false"), (INJECT, "true")])), "podsteer's own annotation wins");
        assert!(!inject_disabled(&ann(&[(ISTIO_INJECT, "true")])));
        assert!(skip_reason(&[], Injection::OptOut, "ns", &ann(&[(ISTIO_INJECT, "false")])).is_some());
        assert!(skip_reason(&[], Injection::OptIn, "ns", &ann(&[(INJECT, "true"), (ISTIO_INJECT, "false")])).is_none());
    }
}
