//! A real containerd drives the node: CRI RunPodSandbox runs the conflist with
//! podsteer-cni in it, and the app container's first connection is intercepted.

use std::time::Duration;

use podsteer_lab::agent::Agent;
use podsteer_lab::containerd::Containerd;
use podsteer_lab::process::LabProcess;
use podsteer_lab::proxy::Proxy;
use podsteer_lab::wait;
use podsteer_lab::workload::start_server;
use podsteer_lab::{Node, NodeOptions, Pod, PodSpec};

/// An unmeshed server pod the containers talk to (a lab pod, made before podsteer).
fn server(node: &Node) -> anyhow::Result<(Pod, LabProcess)> {
    let pod = node.add_pod(PodSpec::new("default", "server"))?;
    let app = start_server(&pod, None, &["whoami", "[::]:8082", "server"])?;
    Ok((pod, app))
}

fn opened(proxy: &Proxy, pod: &str) -> f64 {
    proxy.metric(&format!("podsteer_proxy_connections_opened_total{{pod=\"default/{pod}\",direction=\"outbound\"}}")).unwrap_or(-1.0)
}

fn agent_args(node: &Node, cri: &std::path::Path) -> Vec<String> {
    let _ = node;
    vec!["--cri-socket".into(), cri.display().to_string(), "--repair-interval-secs".into(), "1".into()]
}

#[test]
fn an_app_container_is_intercepted_from_its_first_connection_and_cleanup_is_complete() -> anyhow::Result<()> {
    for mode in ["ebpf", "iptables"] {
        let node = Node::new(NodeOptions::default())?;
        let (srv, _srv_app) = server(&node)?;
        let agent = Agent::start_installed(&node, mode, &[])?;
        let proxy = Proxy::start_shared(&node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?;
        let mut ctrd = Containerd::start(&node)?;
        let sandbox = ctrd.run_pod("default", "web", &[])?;
        let dst = format!("[::ffff:{}]:8082", srv.ipv4().expect("v4"));
        let log = ctrd.run_to_completion(&sandbox, "default", "web", &format!("nc {} {} </dev/null", srv.ipv4().expect("v4"), 8082))?;
        // The server answered (it is not meshed, so it names its own address) ...
        assert!(log.contains("server=server") && log.contains(&format!("{dst} peer=")), "{mode}: {log}");
        // ... and the container's first connection went through the proxy.
        assert_eq!(opened(&proxy, "web"), 1.0, "{mode}");
        let pods = agent.pods()?;
        assert_eq!(pods.as_array().map(Vec::len), Some(1), "{mode}: {pods}");
        let netns = pods[0]["netns"].as_str().unwrap_or_default().to_owned();
        ctrd.stop_and_remove(&sandbox)?;
        assert_eq!(agent.pods()?.as_array().map(Vec::len), Some(0), "{mode}: DEL unregistered the pod");
        assert!(!std::path::Path::new(&netns).exists(), "{mode}: sandbox netns {netns} left behind");
        wait::until("the proxy to close the pod's listeners", Duration::from_secs(5), || {
            (proxy.metric("podsteer_proxy_pods").ok()? == 0.0).then_some(())
        })?;
        drop(ctrd);
    }
    Ok(())
}

#[test]
fn pods_running_before_the_agent_are_repaired_and_gone_ones_forgotten() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let (srv, _srv_app) = server(&node)?;
    let mut ctrd = Containerd::start(&node)?;
    let early = ctrd.run_pod("default", "early", &[])?;
    let _skipped = ctrd.run_pod("default", "optout", &[("podsteer.io/inject", "false")])?;
    let args = agent_args(&node, &ctrd.socket);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start_installed(&node, "ebpf", &args)?;
    let proxy = Proxy::start_shared(&node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?;
    wait::until("repair to enrol the early pod", Duration::from_secs(15), || {
        let pods = agent.pods().ok()?;
        (pods.as_array()?.len() == 1 && pods[0]["name"] == "early" && pods[0]["proxy_ready"] == true).then_some(())
    })?;
    let script = format!("nc {} 8082 </dev/null", srv.ipv4().expect("v4"));
    let log = ctrd.run_to_completion(&early, "default", "early", &script)?;
    assert!(log.contains("server=server"), "{log}");
    assert_eq!(opened(&proxy, "early"), 1.0, "the repaired pod is intercepted");

    // A pod removed while the agent is down is forgotten when it comes back.
    agent.kill();
    ctrd.stop_and_remove(&early)?;
    agent.restart()?;
    wait::until("repair to forget the removed pod", Duration::from_secs(15), || agent.pods().ok()?.as_array()?.is_empty().then_some(()))?;
    Ok(())
}

/// The runtime lists a sandbox only once RunPodSandbox is done, after the
/// plugin's ADD: a pass in between does not list a pod that is alive and
/// starting (in CI one took over a second, two passes at 1 s). Such a pod must
/// survive every pass while its netns is there; once the netns is gone too,
/// two passes in a row that do not list it make it gone. Here a pod the
/// runtime never lists stands in for one still starting.
#[test]
fn repair_forgets_an_unlisted_pod_only_once_its_netns_is_gone() -> anyhow::Result<()> {
    use podsteer_lab::agent::pod_info;
    let node = Node::new(NodeOptions::default())?;
    let ctrd = Containerd::start(&node)?;
    let args = agent_args(&node, &ctrd.socket);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start_installed(&node, "ebpf", &args)?;
    let _proxy = Proxy::start_shared(&node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?;
    let passes = || agent.metric("podsteer_agent_repair_passes_total").unwrap_or(-1.0);
    let after = |n: f64| wait::until("a repair pass", Duration::from_secs(10), || (passes() > n).then_some(passes()));
    let late = node.add_pod(PodSpec::new("default", "late"))?;
    agent.call(&podsteer_agent::api::Request::Add { pod: pod_info(&late, &[]) })?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let names = || -> Vec<String> {
        agent
            .pods()
            .ok()
            .and_then(|p| p.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p["name"].as_str().map(String::from))
            .collect()
    };
    // Three whole passes after the ADD, none listing the pod.
    let mut seen = passes();
    for _ in 0..4 {
        seen = after(seen)?;
    }
    assert_eq!(names(), ["late"], "passes that did not list a pod whose netns is there must not unmesh it");
    drop(late);
    wait::until("two passes to forget it once its netns is gone", Duration::from_secs(5), || names().is_empty().then_some(()))?;
    drop(ctrd);
    Ok(())
}
