//! The watches of Istio's `AuthorizationPolicy` and `PeerAuthentication`,
//! and what they hold: each object as the YAML document the policy files
//! would have, so one parser (`podsteer_authz::source::parse`) validates both
//! sources alike. A cluster without Istio's CRDs has no such objects: the set
//! is empty (no policy), not unknown, and the watch looks again later.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt as _;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::json;
use tracing::{info, warn};

use super::client::Backoff;

/// The kinds watched: (kind, plural).
const KINDS: [(&str, &str); 2] = [("AuthorizationPolicy", "authorizationpolicies"), ("PeerAuthentication", "peerauthentications")];
const GROUP: &str = "security.istio.io";
const VERSION: &str = "v1";

/// Every object of both kinds as one multi-document YAML text; `generation`
/// changes whenever the text may have.
#[derive(Clone, Debug)]
pub struct PolicyText {
    pub generation: u64,
    pub text: String,
}

#[derive(Default)]
struct State {
    /// (kind, namespace, name) → its YAML document.
    objects: BTreeMap<(usize, String, String), String>,
    synced: [bool; 2],
    /// The CRD is not installed (the API answered 404).
    absent: [bool; 2],
    error: [Option<String>; 2],
    generation: u64,
}

#[derive(Default)]
pub struct PolicyStore {
    state: Mutex<State>,
}

impl PolicyStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The text, once both kinds have been listed, unless its generation is
    /// still `seen` (the text is built only when it may have changed).
    pub fn text_since(&self, seen: Option<u64>) -> Option<PolicyText> {
        let s = self.lock();
        if !s.synced.iter().all(|x| *x) || seen == Some(s.generation) {
            return None;
        }
        let text = s.objects.values().map(|doc| format!("---\n{doc}")).collect();
        Some(PolicyText { generation: s.generation, text })
    }

    pub fn status(&self) -> serde_json::Value {
        let s = self.lock();
        let kinds: serde_json::Map<String, serde_json::Value> = KINDS
            .iter()
            .enumerate()
            .map(|(i, (kind, _))| {
                let n = s.objects.keys().filter(|k| k.0 == i).count();
                (kind.to_string(), json!({ "synced": s.synced[i], "crd_installed": !s.absent[i], "objects": n, "error": s.error[i] }))
            })
            .collect();
        serde_json::Value::Object(kinds)
    }

    fn replace(&self, kind: usize, listed: BTreeMap<(usize, String, String), String>, absent: bool) {
        let mut s = self.lock();
        let (before, mut others): (BTreeMap<_, _>, BTreeMap<_, _>) =
            std::mem::take(&mut s.objects).into_iter().partition(|(k, _)| k.0 == kind);
        if before != listed || !s.synced[kind] {
            s.generation += 1;
        }
        others.extend(listed);
        s.objects = others;
        (s.synced[kind], s.absent[kind], s.error[kind]) = (true, absent, None);
    }

    fn put(&self, key: (usize, String, String), doc: String) {
        let mut s = self.lock();
        if s.objects.get(&key) != Some(&doc) {
            s.objects.insert(key, doc);
            s.generation += 1;
        }
    }

    fn remove(&self, key: &(usize, String, String)) {
        let mut s = self.lock();
        if s.objects.remove(key).is_some() {
            s.generation += 1;
        }
    }

    fn failed(&self, kind: usize, error: String) {
        self.lock().error[kind] = Some(error);
    }
}

/// The object as its file would be: apiVersion, kind, name, namespace,
/// labels, annotations (the dry-run one among them) and spec.
fn document(kind: usize, obj: &DynamicObject) -> ((usize, String, String), String) {
    let meta = &obj.metadata;
    let mut annotations = meta.annotations.clone().unwrap_or_default();
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    let (name, namespace) = (meta.name.clone().unwrap_or_default(), meta.namespace.clone().unwrap_or_default());
    let mut doc = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KINDS[kind].0,
        "metadata": { "name": name, "namespace": namespace },
    });
    if !annotations.is_empty() {
        doc["metadata"]["annotations"] = json!(annotations);
    }
    if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
        doc["metadata"]["labels"] = json!(labels);
    }
    if let Some(spec) = obj.data.get("spec") {
        doc["spec"] = spec.clone();
    }
    // YAML of a JSON value cannot fail; an empty document would be refused by the parser.
    let text = serde_yaml::to_string(&doc).unwrap_or_default();
    ((kind, namespace, name), text)
}

fn not_found(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
}

/// Runs both watches for as long as the agent does.
pub async fn run(client: Client, store: Arc<PolicyStore>) {
    futures_util::future::join_all((0..KINDS.len()).map(|kind| watch(client.clone(), store.clone(), kind))).await;
}

async fn watch(client: Client, store: Arc<PolicyStore>, kind: usize) {
    let (name, plural) = KINDS[kind];
    let resource = ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: name.into(),
        plural: plural.into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let mut stream = pin!(watcher::watcher(api, watcher::Config::default()));
    let mut backoff = Backoff::new();
    let mut listing = BTreeMap::new();
    let mut said_absent = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                backoff.reset();
                said_absent = false;
                match event {
                    Event::Init => listing.clear(),
                    Event::InitApply(obj) => {
                        let (k, doc) = document(kind, &obj);
                        listing.insert(k, doc);
                    }
                    Event::InitDone => {
                        info!(kind = name, objects = listing.len(), "the Kubernetes API listed them");
                        store.replace(kind, std::mem::take(&mut listing), false);
                    }
                    Event::Apply(obj) => {
                        let (k, doc) = document(kind, &obj);
                        store.put(k, doc);
                    }
                    Event::Delete(obj) => store.remove(&document(kind, &obj).0),
                }
            }
            Err(e) if not_found(&e) => {
                // Istio's CRDs are not installed: no such object can exist.
                if !said_absent {
                    info!(kind = name, "the CRD is not installed: none of them apply; looking again later");
                    said_absent = true;
                }
                store.replace(kind, BTreeMap::new(), true);
                backoff.wait().await;
            }
            Err(e) => {
                let why = crate::controller::error_chain(&e);
                warn!(kind = name, error = %why, "watching; retrying");
                store.failed(kind, why);
                backoff.wait().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the watch hands the parser is what the file would have said,
    /// the dry-run annotation included and the API's own fields left out.
    #[test]
    fn an_object_from_the_api_parses_as_its_file_would() {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {
                "name": "payment", "namespace": "production", "resourceVersion": "42", "uid": "x",
                "annotations": { "istio.io/dry-run": "true", "kubectl.kubernetes.io/last-applied-configuration": "{}" },
                "managedFields": [{ "manager": "kubectl" }],
            },
            "spec": { "action": "DENY", "rules": [{ "from": [{ "source": { "namespaces": ["test"] } }] }] },
            "status": { "validationMessages": [] },
        }))
        .unwrap();
        let (key, doc) = document(0, &obj);
        assert_eq!(key, (0, "production".to_string(), "payment".to_string()));
        assert!(!doc.contains("managedFields") && !doc.contains("last-applied") && !doc.contains("status"), "{doc}");
        let bundle = podsteer_authz::source::parse(&doc).expect("valid");
        assert_eq!(bundle.authorization.len(), 1);
        assert!(doc.contains("istio.io/dry-run"), "{doc}");
    }
}
