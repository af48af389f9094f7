//! Workload identity at enrolment: the agent takes who a pod is from its
//! workload source (here a directory of Pod manifests, as `--workload-dir`
//! reads them), by UID, never from the pod's annotations. A plugin's ADD for a
//! pod the source does not know yet waits, bounded, rather than start the pod
//! without an identity.

use std::time::Duration;

use podsteer_agent::api::ErrorKind;
use podsteer_lab::agent::Agent;
use podsteer_lab::{Node, NodeOptions, Pod, PodSpec};

fn manifest(pod: &Pod, name: &str, service_account: Option<&str>) -> String {
    let sa = service_account.map(|s| format!("  serviceAccountName: {s}\n")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {}\n  uid: {}\nspec:\n{sa}  containers:\n  - name: app\n    image: my-app:latest\n",
        pod.namespace(),
        pod.uid()
    )
}

#[test]
fn a_pod_gets_the_identity_its_source_gives_and_waits_for_it_bounded() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let dir = node.state_dir().join("workloads");
    std::fs::create_dir_all(&dir)?;
    // A file that is not a Pod hides no other pod.
    std::fs::write(dir.join("garbage.yaml"), "kind: [")?;
    let agent = Agent::start(&node, "ebpf", &["--workload-dir", &dir.display().to_string(), "--workload-wait-ms", "3000"])?;

    // The manifest arrives while the ADD waits; the annotation claiming
    // another identity is ignored.
    let order = node.add_pod(PodSpec::new("production", "order"))?;
    let claimed = [("podsteer.io/identity", "spiffe://cluster.local/ns/kube-system/sa/admin")];
    let rec = std::thread::scope(|s| -> anyhow::Result<serde_json::Value> {
        let add = s.spawn(|| agent.add_pod(&order, &claimed));
        // The manifest is written after the ADD was sent: without the wait
        // the ADD would be refused at once (NotReady), so its success is the
        // proof that it waited.
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(dir.join("order.yaml"), manifest(&order, "order", Some("order-service")))?;
        add.join().map_err(|_| anyhow::anyhow!("ADD panicked"))??.map_err(|e| anyhow::anyhow!("{e}"))
    })?;
    assert_eq!(rec["identity"], "spiffe://cluster.local/ns/production/sa/order-service", "{rec}");

    // No serviceAccountName: the namespace's default account, as the API server sets it.
    let plain = node.add_pod(PodSpec::new("production", "plain"))?;
    std::fs::write(
        dir.join("plain.json"),
        serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(&manifest(&plain, "plain", None))?)?,
    )?;
    let rec = agent.add_pod(&plain, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(rec["identity"], "spiffe://cluster.local/ns/production/sa/default");

    let before = agent.pods()?;
    // A pod the source never learns of: refused after the bound, nothing enrolled.
    let ghost = node.add_pod(PodSpec::new("production", "ghost"))?;
    let started = std::time::Instant::now();
    let e = agent.add_pod(&ghost, &[])?.expect_err("a pod without an identity is not enrolled");
    assert_eq!(e.kind, ErrorKind::NotReady, "{e}");
    assert!(e.message.contains(&format!("does not know pod {}", ghost.uid())), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(3000), "it waited the bound: {:?}", started.elapsed());
    // A source that names the UID another pod: refused, nothing enrolled.
    let liar = node.add_pod(PodSpec::new("production", "liar"))?;
    std::fs::write(dir.join("liar.yaml"), manifest(&liar, "someone-else", Some("payment")))?;
    let e = agent.add_pod(&liar, &[])?.expect_err("names disagree");
    assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
    assert!(e.message.contains("production/someone-else to the workload source but production/liar to the runtime"), "{e}");
    assert_eq!(agent.pods()?, before, "no pod's state changed");
    Ok(())
}

/// `--kubernetes` with a kubeconfig that cannot be read, or beside
/// `--workload-dir`: the agent refuses to start, says why, and leaves the
/// node as it found it (no pins, no state).
#[test]
fn a_kubernetes_source_that_cannot_be_configured_refuses_to_start() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let missing = node.state_dir().join("no-such-kubeconfig");
    let err = Agent::start_expect_failure(&node, "ebpf", &["--kubernetes", "--kubeconfig", &missing.display().to_string()])?;
    assert!(err.contains(&format!("reading the kubeconfig {}", missing.display())), "{err}");
    let garbage = node.state_dir().join("garbage-kubeconfig");
    std::fs::write(&garbage, "clusters: [")?;
    let err = Agent::start_expect_failure(&node, "ebpf", &["--kubernetes", "--kubeconfig", &garbage.display().to_string()])?;
    assert!(err.contains("reading the kubeconfig"), "{err}");
    let err = Agent::start_expect_failure(&node, "ebpf", &["--kubernetes", "--workload-dir", "/tmp"])?;
    assert!(err.contains("--workload-dir") && err.contains("--kubernetes"), "{err}");
    let bpffs = node.state_dir().join("bpffs").join("podsteer");
    assert!(!bpffs.exists() || std::fs::read_dir(&bpffs)?.next().is_none(), "nothing pinned");
    assert!(!node.state_dir().join("agent").join("kubernetes").exists(), "no snapshot");
    Ok(())
}
