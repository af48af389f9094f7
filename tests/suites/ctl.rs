//! The debug CLI against a live lab node, with the agent running and stopped.

use std::os::unix::process::CommandExt as _;
use std::process::Output;

use podsteer_lab::agent::{Agent, bin};
use podsteer_lab::process::LabProcess;
use podsteer_lab::proxy::Proxy;
use podsteer_lab::workload::{run_client, start_server};
use podsteer_lab::{Node, NodeOptions, Pod, PodSpec};
use serde_json::Value;

struct Lab {
    _apps: Vec<LabProcess>,
    _proxy: Proxy,
    b: Pod,
    a: Pod,
    agent: Agent,
    node: Node,
}

impl Lab {
    fn new(mode: &str) -> anyhow::Result<Lab> {
        let node = Node::new(NodeOptions::default())?;
        let b = node.add_pod(PodSpec::new("default", "b"))?;
        let apps = vec![start_server(&b, None, &["echo", "[::]:8080"])?];
        let agent = Agent::start_installed(&node, mode, &[])?;
        let proxy = Proxy::start_shared(&node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?;
        let a = node.add_pod(PodSpec::new("default", "a").annotate("podsteer.io/exclude-outbound-ports", "5432"))?;
        let out = run_client(&a, &["request", &format!("{}:8080", b.ipv4().expect("v4")), "1000"])?;
        assert!(out.starts_with("ok"), "{out}");
        Ok(Lab { _apps: apps, _proxy: proxy, b, a, agent, node })
    }

    fn ctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(self.ctl_command(args)?.output()?)
    }

    fn ctl_command(&self, args: &[&str]) -> anyhow::Result<std::process::Command> {
        let mut cmd = std::process::Command::new(bin("podsteer"));
        cmd.args(["--bpffs", &self.agent.bpffs.display().to_string()])
            .args(["--state-dir", &self.agent.state_dir.display().to_string()])
            .args(["--socket", &self.agent.socket.display().to_string()])
            .args(["--cni-conf-dir", &self.node.cni_conf_dir().display().to_string()])
            .args(args);
        Ok(cmd)
    }

    fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.ctl(&a)?;
        anyhow::ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn table(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.ctl(args)?;
        anyhow::ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    }
}

fn check_maps_and_pods(lab: &Lab, agent_running: bool) -> anyhow::Result<()> {
    let m = lab.json(&["maps"])?;
    let pods = m["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 1, "{m}");
    assert_eq!(pods[0]["pod"], "default/a");
    assert_eq!(pods[0]["ipv4"], lab.a.ipv4().expect("v4").to_string());
    assert_eq!(pods[0]["excluded_outbound_ports"], serde_json::json!([5432]));
    assert!(m["counters"]["outbound_redirects"].as_u64() >= Some(1), "{m}");
    assert_eq!(m["inbound_listeners"].as_array().map(Vec::len), Some(2), "v4 and v6 listeners: {m}");
    assert_eq!(m["pod_ips"].as_array().map(Vec::len), Some(2));
    let only = lab.json(&["maps", "--map", "counters"])?;
    assert_eq!(only.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()), Some(vec!["pins".to_owned(), "counters".to_owned()]));
    let filtered = lab.json(&["maps", "--pod", "default/a"])?;
    assert_eq!(filtered["pods"].as_array().map(Vec::len), Some(1));
    let t = lab.table(&["maps"])?;
    assert!(t.contains("PODS (netns cookie -> policy)") && t.contains("default/a") && t.contains("outbound_redirects"), "{t}");

    let p = lab.json(&["pods"])?;
    assert_eq!(p[0]["pod"], "default/a");
    assert_eq!(p[0]["programmed"], true, "agent running: {agent_running}: {p}");
    assert_eq!(p[0]["proxy_listening"], true);
    let t = lab.table(&["pods"])?;
    assert!(t.starts_with("POD ") && t.contains("default/a"), "{t}");
    Ok(())
}

#[test]
fn every_command_in_json_and_table_with_the_agent_up_and_down() -> anyhow::Result<()> {
    let mut lab = Lab::new("ebpf")?;
    check_maps_and_pods(&lab, true)?;

    let s = lab.json(&["status"])?;
    assert_eq!(s["agent"]["up"], true);
    assert_eq!(s["mode"], "ebpf");
    assert!(s["reason"].as_str().is_some_and(|r| r.contains("eBPF")), "{s}");
    assert!(s["links"].as_array().is_some_and(|l| l.iter().any(|x| x == "podsteer_connect4")), "{s}");
    assert_eq!(s["proxy"]["up"], true);
    assert_eq!((s["cni"]["installed"].clone(), s["cni"]["last"].clone()), (Value::Bool(true), Value::Bool(true)));
    let t = lab.table(&["status"])?;
    assert!(t.contains("mode") && t.contains("ebpf") && t.contains("cni entry"), "{t}");

    let b4 = lab.b.ipv4().expect("v4");
    let e = lab.json(&["explain", "default/a", &format!("{b4}:8080")])?;
    assert_eq!(e["intercepted"], true, "{e}");
    assert!(e["decided_by"].as_str().is_some_and(|d| d.starts_with("PODS[")), "{e}");
    assert!(e["lands_on"].as_str().is_some_and(|d| d.starts_with("127.0.0.1:15001")), "{e}");
    let e = lab.json(&["explain", "default/a", &format!("{b4}:5432")])?;
    assert_eq!((e["intercepted"].clone(), e["reason"].as_str().unwrap_or("")), (Value::Bool(false), "destination port is excluded"), "{e}");
    let e = lab.json(&["explain", "default/a", "127.0.0.1:80"])?;
    assert_eq!(e["intercepted"], false);
    let t = lab.table(&["explain", "default/a", &format!("{b4}:8080")])?;
    assert!(t.contains("INTERCEPTED"), "{t}");

    // The agent goes away; everything but its live answers still works.
    lab.agent.kill();
    check_maps_and_pods(&lab, false)?;
    let s = lab.json(&["status"])?;
    assert_eq!((s["agent"]["up"].clone(), s["mode"].clone()), (Value::Bool(false), Value::from("ebpf")), "{s}");
    Ok(())
}

#[test]
fn explain_in_iptables_mode_names_the_rule() -> anyhow::Result<()> {
    let lab = Lab::new("iptables")?;
    let b4 = lab.b.ipv4().expect("v4");
    let e = lab.json(&["explain", "default/a", &format!("{b4}:5432")])?;
    assert_eq!(e["decided_by"], "rule podsteer/excluded-outbound-port in PODSTEER_OUTPUT", "{e}");
    Ok(())
}

#[test]
fn errors_are_one_line_with_conventional_exit_codes() -> anyhow::Result<()> {
    let lab = Lab::new("ebpf")?;
    let one_line = |o: &Output| {
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        assert!(e.starts_with("podsteer: ") && !e.contains("panicked"), "{e}");
    };
    let cases: Vec<(&str, Vec<&str>, i32)> = vec![
        ("unknown map", vec!["maps", "--map", "nope"], 64),
        ("unknown pod", vec!["maps", "--pod", "default/ghost"], 66),
        ("explain an unregistered pod", vec!["explain", "default/ghost", "10.0.0.1:80"], 66),
        ("explain a bad destination", vec!["explain", "default/a", "10.0.0.1"], 64),
    ];
    for (name, args, code) in cases {
        let o = lab.ctl(&args)?;
        assert_eq!(o.status.code(), Some(code), "{name}");
        one_line(&o);
    }
    let o = std::process::Command::new(bin("podsteer")).args(["--bpffs", "/run/podsteer-lab/no-bpffs", "maps"]).output()?;
    assert_eq!(o.status.code(), Some(69), "no pinned state");
    one_line(&o);
    let o = lab.ctl_command(&["maps"])?.uid(65534).gid(65534).output()?;
    assert_eq!(o.status.code(), Some(77), "non-root");
    one_line(&o);
    Ok(())
}

/// `podsteer ca create` makes the mesh's CA files without root, never
/// overwrites a CA, and refuses a bad trust domain without writing a file.
#[test]
fn ca_create_makes_a_ca_once_and_needs_no_root() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let node = Node::new(NodeOptions::default())?;
    let dir = node.state_dir().join("mesh-ca");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(node.state_dir(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    let as_user = |args: &[&str]| -> anyhow::Result<Output> {
        Ok(std::process::Command::new("setpriv")
            .args(["--reuid", "1000", "--regid", "1000", "--clear-groups"])
            .arg(bin("podsteer"))
            .args(args)
            .output()?)
    };
    let out_dir = dir.join("ca").display().to_string();
    let o = as_user(&["ca", "create", "--trust-domain", "cluster.local", "--out", &out_dir, "-o", "json"])?;
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["files"], serde_json::json!(["ca.crt", "issuer.crt", "issuer.key"]));
    let key = std::fs::read(dir.join("ca/issuer.key"))?;
    assert_eq!(std::fs::metadata(dir.join("ca/issuer.key"))?.permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(dir.join("ca/ca.crt"))?.starts_with("-----BEGIN CERTIFICATE-----"));
    let again = as_user(&["ca", "create", "--out", &out_dir])?;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists: refusing to overwrite a CA"), "{again:?}");
    assert_eq!(std::fs::read(dir.join("ca/issuer.key"))?, key, "the CA is untouched");
    let bad_dir = dir.join("bad").display().to_string();
    let bad = as_user(&["ca", "create", "--trust-domain", "Cluster Local", "--out", &bad_dir])?;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("trust domain \"Cluster Local\""), "{bad:?}");
    assert!(!dir.join("bad").exists(), "nothing written for a bad trust domain");
    Ok(())
}
