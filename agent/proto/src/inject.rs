//! Whether a pod is meshed at all. The plugin and the agent's repair decide
//! with this one function, so they never disagree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The annotation that meshes a pod ("true") or leaves it alone ("false").
pub const INJECT: &str = "podsteer.io/inject";

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
    match ann.get(INJECT).map(String::as_str) {
        Some(v) if v.eq_ignore_ascii_case("false") => Some(format!("{} is false", INJECT)),
        Some(v) if v.eq_ignore_ascii_case("true") => None,
        _ if injection == Injection::OptIn => Some(format!("opt-in mode and no {}: \"true\"", INJECT)),
        _ => None,
    }
}

/// Whether annotations ask for the pod to be left alone.
pub fn inject_disabled(annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(INJECT).is_some_and(|v| v.eq_ignore_ascii_case("false"))
}
