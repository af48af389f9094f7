//! The sidecar injector, end to end: the real webhook over HTTPS, as the API
//! server calls it, with the seed document's pods and the cases around them;
//! every returned patch applied with json-patch and the result read as a
//! Kubernetes `Pod`. Then one injected pod run for real through containerd.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Container, Pod};
use podsteer_lab::injector::{Injector, TestCa, write_pair};
use podsteer_lab::{Node, NodeOptions};
use serde_json::{Value, json};

const SIDECAR: &str = "podsteer-proxy";

fn seed_pods() -> anyhow::Result<BTreeMap<String, Value>> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/injection-pods.yaml"))?;
    let mut pods = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(doc)?)?;
        let name = v["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        pods.insert(name, v);
    }
    Ok(pods)
}

/// An AdmissionReview as the API server sends it for a pod being created.
fn review(uid: &str, pod: &Value, operation: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"],
            "namespace": pod["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    })
}

/// Parses a pod strictly: every field must be part of the Kubernetes type.
fn typed_pod(v: &Value) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(v.clone())?;
    anyhow::ensure!(serde_json::to_value(&pod)? == *v, "a field of the patched pod is not part of the Kubernetes Pod type");
    Ok(pod)
}

/// The injector's answer: allowed, with the request's uid, and the patch if any.
fn answer(inj: &Injector, ca: &TestCa, path: &str, uid: &str, pod: &Value) -> anyhow::Result<Option<json_patch::Patch>> {
    let (status, body) = inj.post(&ca.cert, path, serde_json::to_vec(&review(uid, pod, "CREATE"))?)?;
    anyhow::ensure!(status == 200, "{uid}: HTTP {status}: {}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body)?;
    assert_eq!((v["apiVersion"].as_str(), v["kind"].as_str()), (Some("admission.k8s.io/v1"), Some("AdmissionReview")), "{v}");
    let r = &v["response"];
    assert_eq!(r["uid"], uid, "the response echoes the request's uid");
    assert_eq!(r["allowed"], true, "{uid}: {r}");
    match r["patch"].as_str() {
        None => Ok(None),
        Some(b64) => {
            assert_eq!(r["patchType"], "JSONPatch");
            Ok(Some(serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(b64)?)?))
        }
    }
}

fn apply(pod: &Value, patch: &json_patch::Patch) -> anyhow::Result<Value> {
    let mut out = pod.clone();
    json_patch::patch(&mut out, patch)?;
    Ok(out)
}

fn caps_added(c: &Container) -> Vec<String> {
    c.security_context.as_ref().and_then(|s| s.capabilities.as_ref()).and_then(|c| c.add.clone()).unwrap_or_default()
}

/// Checks an injected pod against the one sent: the sidecar where it belongs
/// and locked down, everything the user wrote unchanged and in order, and no
/// capability or init container added.
fn check_injected(name: &str, before: &Value, after: &Value, native: bool) -> anyhow::Result<()> {
    let (b, a) = (typed_pod(before)?, typed_pod(after)?);
    let (bs, as_) = (b.spec.clone().unwrap_or_default(), a.spec.clone().unwrap_or_default());
    let (b_init, a_init) = (bs.init_containers.clone().unwrap_or_default(), as_.init_containers.clone().unwrap_or_default());
    let ours = if native {
        assert_eq!(a_init.first().map(|c| c.name.as_str()), Some(SIDECAR), "{name}: the sidecar is the first init container");
        assert_eq!(a_init[1..], b_init[..], "{name}: the pod's own init containers follow it, unchanged");
        assert_eq!(as_.containers, bs.containers, "{name}: containers unchanged");
        let ours = a_init[0].clone();
        assert_eq!(ours.restart_policy.as_deref(), Some("Always"), "{name}: a native sidecar");
        assert!(ours.startup_probe.is_some(), "{name}: the app waits for the sidecar's startup probe");
        ours
    } else {
        assert_eq!(as_.containers.first().map(|c| c.name.as_str()), Some(SIDECAR), "{name}: first container");
        assert_eq!(as_.containers[1..], bs.containers[..], "{name}");
        assert_eq!(a_init, b_init, "{name}: init containers unchanged");
        let ours = as_.containers[0].clone();
        assert_eq!(ours.restart_policy, None, "{name}: a regular container");
        ours
    };
    // No init container is added: the only new entry is the restartable sidecar.
    let run_to_completion = |v: &[Container]| v.iter().filter(|c| c.restart_policy.as_deref() != Some("Always")).count();
    assert_eq!(run_to_completion(&a_init), run_to_completion(&b_init), "{name}: no init container added");
    // No capability added anywhere.
    let all = |s: &k8s_openapi::api::core::v1::PodSpec| -> Vec<(String, Vec<String>)> {
        s.containers.iter().chain(s.init_containers.iter().flatten()).map(|c| (c.name.clone(), caps_added(c))).collect()
    };
    let mut before_caps = all(&bs);
    before_caps.push((SIDECAR.into(), Vec::new()));
    let (mut x, mut y) = (before_caps, all(&as_));
    x.sort();
    y.sort();
    assert_eq!(y, x, "{name}: capabilities added");
    let sc = ours.security_context.clone().unwrap_or_default();
    assert_eq!((sc.run_as_user, sc.run_as_non_root, sc.allow_privilege_escalation), (Some(1337), Some(true), Some(false)), "{name}");
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{name}");
    assert_eq!(sc.privileged, Some(false), "{name}");
    assert_eq!(sc.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_string()]), "{name}");
    let probe_port = ours.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).map(|h| h.port.clone());
    assert_eq!(
        probe_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15020)),
        "{name}: readiness on the admin port"
    );
    let res = ours.resources.clone().unwrap_or_default();
    assert!(res.requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")), "{name}: requests");
    assert!(res.limits.is_some_and(|r| r.contains_key("memory")), "{name}: memory limit");
    let socket_arg = ours.args.iter().flatten().any(|a| a.starts_with("--agent-socket="));
    match as_.volumes.iter().flatten().find(|v| v.name == "podsteer-sidecar-socket") {
        Some(vol) => {
            assert_eq!(vol.host_path.as_ref().map(|h| h.path.as_str()), Some("/var/run/podsteer/sidecar"));
            assert_eq!(as_.volumes.iter().flatten().count(), bs.volumes.iter().flatten().count() + 1, "{name}: one volume added");
            assert!(socket_arg, "{name}: the sidecar dials the mounted socket");
        }
        None => {
            assert_eq!(as_.volumes, bs.volumes, "{name}: no volume added");
            assert!(!socket_arg && ours.volume_mounts.is_none(), "{name}: no socket without its mount");
        }
    }
    // Annotations: the user's kept, the proxy mode set, the admin port excluded from inbound.
    let (ba, aa) = (b.metadata.annotations.clone().unwrap_or_default(), a.metadata.annotations.clone().unwrap_or_default());
    for (k, v) in &ba {
        if k != "podsteer.io/exclude-inbound-ports" {
            assert_eq!(aa.get(k), Some(v), "{name}: annotation {k} kept");
        }
    }
    assert_eq!(aa.get("podsteer.io/proxy-mode").map(String::as_str), Some("sidecar"), "{name}");
    let excluded: Vec<&str> = aa.get("podsteer.io/exclude-inbound-ports").map(|v| v.split(',').collect()).unwrap_or_default();
    assert!(excluded.contains(&"15020"), "{name}: {excluded:?}");
    for p in ba.get("podsteer.io/exclude-inbound-ports").map(|v| v.split(',').collect::<Vec<_>>()).unwrap_or_default() {
        assert!(excluded.contains(&p), "{name}: the pod's own exclusion {p} kept");
    }
    assert_eq!((a.metadata.name, a.metadata.labels), (b.metadata.name, b.metadata.labels), "{name}: identity unchanged");
    Ok(())
}

/// A lab node running the injector on `port` with `extra` flags, the CA its
/// certificate is from, and the test pods. Bound in this order, the injector
/// stops before its node goes.
fn webhook(port: u16, extra: &[&str]) -> anyhow::Result<(Node, TestCa, Injector, BTreeMap<String, Value>)> {
    let node = Node::new(NodeOptions::default())?;
    let ca = TestCa::new("podsteer test webhook CA")?;
    let inj = Injector::start(&node, &ca, port, extra)?;
    Ok((node, ca, inj, seed_pods()?))
}

enum Expect {
    Inject,
    /// Left alone; the log's reason contains this.
    Skip(&'static str),
}

#[test]
fn the_webhook_injects_exactly_the_pods_it_should_and_is_idempotent() -> anyhow::Result<()> {
    use Expect::*;
    let (_node, ca, inj, pods) = webhook(9443, &[])?;
    // (pod, webhook path, expected). /inject/namespace is the webhook for
    // namespaces labelled podsteer.io/inject=enabled, /inject/pod the one for all others.
    let cases: &[(&str, &str, Expect)] = &[
        ("my-service", "/inject/namespace", Inject),
        ("app-with-logging", "/inject/namespace", Inject),
        ("app-with-secrets", "/inject/namespace", Inject),
        ("app-with-config", "/inject/namespace", Inject),
        ("no-sidecar-pod", "/inject/namespace", Skip("sidecar.istio.io/inject is \"false\"")),
        ("with-init", "/inject/namespace", Inject),
        ("with-native-sidecar", "/inject/namespace", Inject),
        ("host-network", "/inject/namespace", Skip("hostNetwork")),
        ("opted-out", "/inject/namespace", Skip("podsteer.io/inject is \"false\"")),
        ("with-exclusions", "/inject/namespace", Inject),
        ("podsteer-proxy-x7k2p", "/inject/namespace", Skip("podsteer's own pod")),
        ("asks-for-it", "/inject/pod", Inject),
        ("does-not-ask", "/inject/pod", Skip("not annotated")),
    ];
    assert_eq!(cases.len(), pods.len(), "every test pod has a case");
    let mut injected = Vec::new();
    for (i, (name, path, expect)) in cases.iter().enumerate() {
        let pod = &pods[*name];
        let uid = format!("uid-{i}-{name}");
        let patch = answer(&inj, &ca, path, &uid, pod)?;
        match (expect, patch) {
            (Inject, Some(patch)) => {
                let after = apply(pod, &patch)?;
                check_injected(name, pod, &after, true)?;
                // The API server re-invokes webhooks when another one changed
                // the pod: a second pass over an injected pod changes nothing.
                let again = answer(&inj, &ca, path, &format!("{uid}-again"), &after)?;
                assert!(again.is_none(), "{name}: re-injection patched again: {again:?}");
                injected.push(uid);
            }
            (Skip(_), None) => {}
            (Inject, None) => panic!("{name}: expected a patch, got none"),
            (Skip(why), Some(p)) => panic!("{name}: expected no patch ({why}), got {p:?}"),
        }
    }
    // The log says what was done and why, per request uid.
    let lines = inj.log_lines();
    let by_uid = |uid: &str| lines.iter().find(|l| l["fields"]["uid"] == uid).cloned().unwrap_or_default();
    for (i, (name, _, expect)) in cases.iter().enumerate() {
        let l = by_uid(&format!("uid-{i}-{name}"));
        match expect {
            Inject => assert_eq!(l["fields"]["message"], "injected", "{name}: {l}"),
            Skip(why) => {
                assert_eq!(l["fields"]["message"], "not injected", "{name}: {l}");
                assert!(l["fields"]["why"].as_str().unwrap_or_default().contains(why), "{name}: {l}");
            }
        }
        let again = by_uid(&format!("uid-{i}-{name}-again"));
        if matches!(expect, Inject) {
            assert!(again["fields"]["why"].as_str().unwrap_or_default().contains("already injected"), "{name}: {again}");
        }
    }
    assert_eq!(injected.len(), 8, "the seed's four, with-init, with-native-sidecar, with-exclusions and asks-for-it");

    // Updates are not injected: only pods being created are.
    let (status, body) =
        inj.post(&ca.cert, "/inject/namespace", serde_json::to_vec(&review("uid-update", &pods["with-init"], "UPDATE"))?)?;
    let v: Value = serde_json::from_slice(&body)?;
    assert_eq!((status, v["response"]["allowed"].as_bool(), v["response"]["patch"].as_str()), (200, Some(true), None), "{v}");
    // Nor deletes, which carry no object: allowed, not refused for the lack of one.
    let mut delete = review("uid-delete", &pods["with-init"], "DELETE");
    delete["request"]["oldObject"] = delete["request"]["object"].take();
    let (status, body) = inj.post(&ca.cert, "/inject/namespace", serde_json::to_vec(&delete)?)?;
    let v: Value = serde_json::from_slice(&body)?;
    assert_eq!((status, v["response"]["allowed"].as_bool(), v["response"]["uid"].as_str()), (200, Some(true), Some("uid-delete")), "{v}");
    // /metrics counts each answer: 7 + 1 injected; skipped: the 4 + 1 left
    // alone, the 8 second passes, the update and the delete.
    let reviews = |result: &str, scope: &str| {
        inj.metric(&ca.cert, &format!("podsteer_injector_reviews_total{{result=\"{result}\",scope=\"{scope}\"}}"))
    };
    assert_eq!(reviews("injected", "namespace")?, 7.0);
    assert_eq!(reviews("injected", "pod")?, 1.0);
    assert_eq!(reviews("skipped", "namespace")?, 4.0 + 7.0 + 2.0);
    assert_eq!(reviews("skipped", "pod")?, 2.0);
    assert_eq!(reviews("malformed", "namespace")?, 0.0);
    Ok(())
}

#[test]
fn older_clusters_get_a_regular_first_container() -> anyhow::Result<()> {
    let (node, ca, inj, pods) = webhook(9444, &["--native-sidecars=false", "--proxy-image", "registry.example/podsteer:test"])?;
    for name in ["my-service", "app-with-logging", "with-init"] {
        let patch = answer(&inj, &ca, "/inject/namespace", &format!("uid-{name}"), &pods[name])?.expect("a patch");
        let after = apply(&pods[name], &patch)?;
        check_injected(name, &pods[name], &after, false)?;
        assert_eq!(after["spec"]["containers"][0]["image"], "registry.example/podsteer:test");
    }
    // Without the socket directory (namespaces whose Pod Security level forbids hostPath): no volume at all.
    let no_host_path = Injector::start(&node, &ca, 9448, &["--sidecar-socket-dir="])?;
    let patch = answer(&no_host_path, &ca, "/inject/namespace", "uid-no-host-path", &pods["app-with-logging"])?.expect("a patch");
    let after = apply(&pods["app-with-logging"], &patch)?;
    check_injected("app-with-logging", &pods["app-with-logging"], &after, true)?;
    assert!(!serde_json::to_string(&after)?.contains("hostPath"), "{after}");
    Ok(())
}

#[test]
fn malformed_reviews_get_400_and_nothing_is_injected() -> anyhow::Result<()> {
    let (_node, ca, inj, pods) = webhook(9445, &[])?;
    let good = review("uid-good", &pods["app-with-logging"], "CREATE");
    let text = serde_json::to_vec(&good)?;
    let mut wrong_kind = good.clone();
    wrong_kind["request"]["uid"] = json!("uid-deployment");
    wrong_kind["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let mut no_uid = good.clone();
    no_uid["request"].as_object_mut().expect("request").remove("uid");
    let mut empty_uid = good.clone();
    empty_uid["request"]["uid"] = json!("");
    let mut not_a_review = good.clone();
    not_a_review["kind"] = json!("Pod");
    let mut no_request = good.clone();
    no_request.as_object_mut().expect("review").remove("request");
    let mut no_object = good.clone();
    no_object["request"]["uid"] = json!("uid-no-object");
    no_object["request"]["object"] = Value::Null;
    let mut bad_pod = good.clone();
    bad_pod["request"]["uid"] = json!("uid-bad-pod");
    bad_pod["request"]["object"]["spec"]["containers"] = json!("not a list");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated JSON", text[..text.len() / 2].to_vec(), "not JSON"),
        ("empty body", Vec::new(), "not JSON"),
        ("a Deployment", serde_json::to_vec(&wrong_kind)?, "not a v1 Pod"),
        ("no uid", serde_json::to_vec(&no_uid)?, "uid"),
        ("an empty uid", serde_json::to_vec(&empty_uid)?, "no uid"),
        ("not an AdmissionReview", serde_json::to_vec(&not_a_review)?, "not an admission.k8s.io/v1 AdmissionReview"),
        ("no request", serde_json::to_vec(&no_request)?, "no request"),
        ("no object", serde_json::to_vec(&no_object)?, "no object"),
        ("an invalid pod", serde_json::to_vec(&bad_pod)?, "not a valid Pod"),
    ];
    for (what, body, why) in &cases {
        let (status, resp) = inj.post(&ca.cert, "/inject/namespace", body.clone())?;
        let resp = String::from_utf8_lossy(&resp);
        assert_eq!(status, 400, "{what}: {resp}");
        assert!(resp.contains(why), "{what}: {resp}");
    }
    let (status, _) = inj.request(&ca.cert, "GET", "/inject/namespace", Vec::new())?;
    assert_eq!(status, 405);
    let (status, _) = inj.post(&ca.cert, "/mutate", text.clone())?;
    assert_eq!(status, 404);
    let lines = inj.log_lines();
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["fields"]["message"].as_str()).collect();
    assert_eq!(messages.iter().filter(|m| **m == "malformed AdmissionReview").count(), cases.len(), "one log line each: {messages:?}");
    assert!(!messages.iter().any(|m| *m == "injected" || *m == "not injected"), "nothing was reviewed: {messages:?}");
    // And the injector still serves a good one.
    assert!(answer(&inj, &ca, "/inject/namespace", "uid-good", &pods["app-with-logging"])?.is_some());
    let reviews =
        |result: &str| inj.metric(&ca.cert, &format!("podsteer_injector_reviews_total{{result=\"{result}\",scope=\"namespace\"}}"));
    assert_eq!((reviews("malformed")?, reviews("injected")?), (cases.len() as f64, 1.0), "each malformed review counted");
    Ok(())
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let (old, new) = (TestCa::new("old webhook CA")?, TestCa::new("new webhook CA")?);
    let inj = Injector::start(&node, &old, 9446, &[])?;
    assert!(inj.request(&new.cert, "GET", "/ready", Vec::new()).is_err(), "a client trusting only the new CA is refused before");
    let pid = inj.pid();
    write_pair(&inj.cert, &inj.key, new.leaf(&["localhost"])?)?;
    podsteer_lab::wait::until("the renewed certificate to be served", std::time::Duration::from_secs(10), || {
        inj.request(&new.cert, "GET", "/ready", Vec::new()).ok().filter(|(s, _)| *s == 200)
    })?;
    assert!(inj.request(&old.cert, "GET", "/ready", Vec::new()).is_err(), "the old certificate is no longer served");
    assert_eq!(inj.pid(), pid);
    // A pair that does not load keeps the last good one.
    std::fs::write(&inj.key, "not a key")?;
    let (status, _) = inj.request(&new.cert, "GET", "/ready", Vec::new())?;
    assert_eq!(status, 200);
    assert!(inj.log_lines().iter().any(|l| l["fields"]["message"].as_str().is_some_and(|m| m.contains("keeping the previous one"))));
    Ok(())
}

/// One injected pod, run for real. The pod a user writes (its app is the
/// lab's busybox image) goes through the real injector; the patched pod's
/// containers run through containerd's CRI from the locally built images.
/// The CRI has no notion of native sidecars: as the kubelet does, the sidecar
/// (the first init container, `restartPolicy: Always`) is started first and
/// the app only once the sidecar's startup probe passes. The sidecar runs as
/// the proxy UID with no capabilities, registers its inbound listener with
/// the agent (eBPF mode) over the sidecar socket, and carries the app's
/// first connection.
#[test]
fn an_injected_pod_runs_with_its_sidecar_from_the_first_connection() -> anyhow::Result<()> {
    // In iptables mode the sidecar's registration is answered "not needed"
    // (REDIRECT reaches it); it does not know the node's mode.
    for mode in ["ebpf", "iptables"] {
        run_injected_pod(mode).map_err(|e| e.context(mode))?;
    }
    Ok(())
}

fn run_injected_pod(mode: &str) -> anyhow::Result<()> {
    use podsteer_lab::agent::{Agent, bin};
    use podsteer_lab::containerd::Containerd;
    use podsteer_lab::images::{self, APP_IMAGE, PROXY_BIN, PROXY_IMAGE};
    use podsteer_lab::workload::start_server;
    use podsteer_lab::{PodSpec, kubelet, wait};
    use std::os::fd::AsFd as _;
    use std::time::Duration;

    let node = Node::new(NodeOptions::default())?;
    let srv = node.add_pod(PodSpec::new("default", "server"))?;
    let _srv_app = start_server(&srv, None, &["whoami", "[::]:8082", "server"])?;
    let sidecar_dir = node.state_dir().join("sidecar");
    let socket = sidecar_dir.join("agent.sock").display().to_string();
    let agent = Agent::start_installed(&node, mode, &["--sidecar-socket", &socket])?;
    let mut ctrd = Containerd::start(&node)?;
    ctrd.import_with(PROXY_IMAGE, &[PROXY_BIN], &images::with_libraries(&bin("podsteer-proxy"), PROXY_BIN)?)?;

    let script = format!("nc {} 8082 </dev/null", srv.ipv4().expect("v4"));
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": APP_IMAGE, "args": [script]}]},
    });
    let ca = TestCa::new("podsteer test webhook CA")?;
    let inj = Injector::start(&node, &ca, 9447, &["--proxy-image", PROXY_IMAGE])?;
    let patch = answer(&inj, &ca, "/inject/namespace", "uid-web", &pod)?.expect("the pod is injected");
    let patched = typed_pod(&apply(&pod, &patch)?)?;
    let spec = patched.spec.clone().unwrap_or_default();
    let annotations: Vec<(String, String)> = patched.metadata.annotations.clone().unwrap_or_default().into_iter().collect();
    let annotations: Vec<(&str, &str)> = annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let uid = ctrd.pod_uid("web");
    let host_dir = |p: &str| (p == "/var/run/podsteer/sidecar").then(|| sidecar_dir.clone());

    let sandbox = ctrd.run_pod("default", "web", &annotations)?;
    let pods = agent.pods()?;
    let entry = pods.as_array().and_then(|p| p.iter().find(|p| p["name"] == "web")).cloned().unwrap_or_default();
    assert_eq!(entry["policy"]["proxy_mode"], "sidecar", "the injector's annotation chose the sidecar: {entry}");
    let ip: std::net::IpAddr = entry["ips"][0].as_str().unwrap_or_default().parse()?;

    let sidecar = spec.init_containers.as_ref().and_then(|c| c.first()).expect("the sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let sidecar_id =
        ctrd.start_container(&sandbox, "default", "web", &annotations, kubelet::container_config(&patched, &uid, sidecar, host_dir)?)?;
    // The kubelet's startup probe: GET /ready on the pod's address, from the node.
    let node_ns = std::fs::File::open(node.netns().path())?;
    let admin = std::net::SocketAddr::new(ip, 15020);
    let registered = "podsteer_agent_requests_total{command=\"register_listener\",result=\"ok\"}";
    wait::until("the sidecar's startup probe", Duration::from_secs(20), || {
        podsteer_lab::admin::get(node_ns.as_fd(), admin, "/ready").ok().filter(|r| r.starts_with("HTTP/1.1 200"))
    })
    .map_err(|e| e.context(ctrd.container_log("web", "podsteer-proxy.log")))?;
    assert!(agent.metric(registered)? >= 1.0, "the sidecar registered its inbound listener over the sidecar socket");

    // It runs as the proxy UID with no capability at all.
    let info = ctrd.cri(async |c| {
        Ok(c.container_status(k8s_cri::v1::ContainerStatusRequest { container_id: sidecar_id.clone(), verbose: true })
            .await?
            .into_inner()
            .info)
    })?;
    let pid = serde_json::from_str::<Value>(info.get("info").map(String::as_str).unwrap_or("{}"))?["pid"].as_i64().unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |k: &str| {
        status.lines().find(|l| l.starts_with(k)).map(|l| l[k.len()..].split_whitespace().collect::<Vec<_>>()).unwrap_or_default()
    };
    assert_eq!(field("Uid:"), ["1337"; 4], "{status}");
    for caps in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps} {status}");
    }

    // The app, once the sidecar is up: its first connection goes through it.
    let app = &spec.containers[0];
    let app_id =
        ctrd.start_container(&sandbox, "default", "web", &annotations, kubelet::container_config(&patched, &uid, app, host_dir)?)?;
    ctrd.wait_exited(&app_id, Duration::from_secs(20))?;
    let log = ctrd.container_log("web", "app.log");
    assert!(log.contains("server=server"), "{log}");
    let opened = podsteer_lab::admin::metric(
        node_ns.as_fd(),
        admin,
        "podsteer_proxy_connections_opened_total{pod=\"self\",direction=\"outbound\"}",
    )?;
    assert_eq!(opened, 1.0, "the app's one connection went through its sidecar");
    ctrd.stop_and_remove(&sandbox)?;
    assert_eq!(agent.pods()?.as_array().map(Vec::len), Some(0), "DEL unregistered the pod");
    drop(inj);
    Ok(())
}
