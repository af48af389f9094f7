//! Who is injected. Pure, so the rules are tested as a table.
//!
//! The API server sends a pod here only if the webhook configuration's
//! selectors match (`injector.yaml`); which of its two webhooks sent it says
//! how the pod was selected, because a webhook sees a pod's namespace by name
//! only, not its labels:
//! - [`Scope::Namespace`]: the namespace is labelled `podsteer.io/inject=enabled`,
//!   so every pod in it is injected unless it opts out;
//! - [`Scope::Pod`]: any other namespace, where only a pod that asks is:
//!   annotated `podsteer.io/inject: "true"`, or labelled so (a label lets the
//!   webhook configuration select the pod, so only those pods wait on the
//!   injector; see injector.yaml).

use k8s_openapi::api::core::v1::Pod;
use podsteer_proto::annotations::INJECT;

use crate::SIDECAR_NAME;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Namespace,
    Pod,
}

impl Scope {
    /// Its name in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Scope::Namespace => "namespace",
            Scope::Pod => "pod",
        }
    }

    /// The webhook path each scope is served on.
    pub fn from_path(path: &str) -> Option<Scope> {
        match path {
            "/inject/namespace" => Some(Scope::Namespace),
            "/inject/pod" => Some(Scope::Pod),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Inject,
    /// Left as it is, and why.
    Skip(String),
}

/// The label podsteer's own pods carry (daemonset.yaml, injector.yaml).
const NAME_LABEL: &str = "app.kubernetes.io/name";

pub fn decide(pod: &Pod, scope: Scope) -> Decision {
    let spec = pod.spec.as_ref();
    let asked =
        |m: &Option<std::collections::BTreeMap<String, String>>| m.as_ref().and_then(|a| a.get(INJECT)).map(|v| v.to_ascii_lowercase());
    let (annotation, label) = (asked(&pod.metadata.annotations), asked(&pod.metadata.labels));
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Decision::Skip("hostNetwork: the pod shares the node's network namespace".into());
    }
    if let Some(why) = pod.metadata.annotations.as_ref().and_then(podsteer_proto::inject::opt_out) {
        return Decision::Skip(why);
    }
    if label.as_deref() == Some("false") && annotation.is_none() {
        return Decision::Skip(format!("label {INJECT}=false"));
    }
    if let Some(name) = pod.metadata.labels.as_ref().and_then(|l| l.get(NAME_LABEL))
        && (name == "podsteer" || name.starts_with("podsteer-"))
    {
        return Decision::Skip(format!("podsteer's own pod ({NAME_LABEL}={name})"));
    }
    let containers = spec.into_iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
    if containers.into_iter().any(|c| c.name == SIDECAR_NAME) {
        return Decision::Skip(format!("already injected (it has a {SIDECAR_NAME} container)"));
    }
    match (scope, annotation.or(label).as_deref()) {
        (Scope::Namespace, _) | (Scope::Pod, Some("true")) => Decision::Inject,
        (Scope::Pod, _) => Decision::Skip(format!("its namespace is not enabled and it is not annotated (or labelled) {INJECT}: \"true\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_json::from_value(serde_json::from_str::<serde_json::Value>(yaml).expect("json")).expect("pod")
    }

    #[test]
    fn the_rules_in_order() {
        let plain = r#"{"metadata":{"name":"a"},"spec":{"containers":[{"name":"app"}]}}"#;
        let annotated = |v: &str| {
            format!(r#"{{"metadata":{{"name":"a","annotations":{{"{INJECT}":"{v}"}}}},"spec":{{"containers":[{{"name":"app"}}]}}}}"#)
        };
        let host = format!(
            r#"{{"metadata":{{"name":"a","annotations":{{"{INJECT}":"true"}}}},"spec":{{"hostNetwork":true,"containers":[{{"name":"app"}}]}}}}"#
        );
        let own =
            r#"{"metadata":{"name":"a","labels":{"app.kubernetes.io/name":"podsteer-proxy"}},"spec":{"containers":[{"name":"app"}]}}"#;
        let done = r#"{"metadata":{"name":"a"},"spec":{"initContainers":[{"name":"podsteer-proxy"}],"containers":[{"name":"app"}]}}"#;
        let inject = |p: &str, s| decide(&pod(p), s) == Decision::Inject;
        let labelled =
            |v: &str| format!(r#"{{"metadata":{{"name":"a","labels":{{"{INJECT}":"{v}"}}}},"spec":{{"containers":[{{"name":"app"}}]}}}}"#);
        assert!(inject(&labelled("true"), Scope::Pod), "the label asks as the annotation does");
        assert!(!inject(&labelled("false"), Scope::Namespace), "and opts out as it does");
        assert!(inject(plain, Scope::Namespace));
        assert!(!inject(plain, Scope::Pod), "another namespace needs the annotation");
        assert!(inject(&annotated("true"), Scope::Pod));
        assert!(inject(&annotated("TRUE"), Scope::Namespace));
        assert!(!inject(&annotated("false"), Scope::Namespace), "opt-out wins over the namespace");
        assert!(!inject(&annotated("False"), Scope::Pod));
        assert!(!inject(&host, Scope::Namespace), "hostNetwork wins over the annotation");
        assert!(!inject(own, Scope::Namespace));
        assert!(!inject(done, Scope::Namespace), "re-invocation leaves an injected pod alone");
    }
}
