//! The chained plugin driven as a runtime drives it, the agent's install of it,
//! and every kind of bad input the runtime or a user can hand it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use podsteer_lab::agent::{Agent, bin};
use podsteer_lab::cni::Attachment;
use podsteer_lab::node::CONFLIST_FILE;
use podsteer_lab::process::LabProcess;
use podsteer_lab::proxy::Proxy;
use podsteer_lab::wait;
use podsteer_lab::workload::{run_client, start_server};
use podsteer_lab::{Node, NodeOptions, Pod, PodSpec};
use serde_json::{Value, json};

/// A node whose conflist gets podsteer-cni from the agent's installer.
struct Installed {
    _apps: Vec<LabProcess>,
    server: Pod,
    proxy: Proxy,
    agent: Agent,
    node: Node,
}

impl Installed {
    fn new(mode: &str) -> anyhow::Result<Installed> {
        let node = Node::new(NodeOptions::default())?;
        // The server pod starts before podsteer is installed, so it is not meshed.
        let server = node.add_pod(PodSpec::new("default", "server"))?;
        let apps = vec![start_server(&server, None, &["echo", "[::]:8080"])?];
        let agent = Agent::start_installed(&node, mode, &[])?;
        let proxy = Proxy::start_shared(&node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?;
        wait::until("the conflist to carry podsteer-cni", Duration::from_secs(5), || {
            plugin_types(&node).ends_with(&["podsteer-cni".to_owned()]).then_some(())
        })?;
        Ok(Installed { _apps: apps, server, proxy, agent, node })
    }

    fn server_addr(&self) -> String {
        format!("{}:8080", self.server.ipv4().expect("v4"))
    }
}

fn conflist_path(node: &Node) -> PathBuf {
    node.cni_conf_dir().join(CONFLIST_FILE)
}

fn plugin_types(node: &Node) -> Vec<String> {
    node.runtime().conflist()["plugins"].as_array().into_iter().flatten().filter_map(|p| p["type"].as_str().map(str::to_owned)).collect()
}

fn opened(proxy: &Proxy, pod: &str) -> f64 {
    proxy.metric(&format!("podsteer_proxy_connections_opened_total{{pod=\"default/{pod}\",direction=\"outbound\"}}")).unwrap_or(-1.0)
}

#[test]
fn the_chain_runs_bridge_host_local_then_podsteer_and_the_first_connection_is_intercepted() -> anyhow::Result<()> {
    for mode in ["ebpf", "iptables"] {
        let lab = Installed::new(mode)?;
        assert_eq!(plugin_types(&lab.node), ["bridge", "portmap", "podsteer-cni"], "{mode}");
        let app = lab.node.add_pod(PodSpec::new("default", "app"))?;
        // ADD returned: interception and the proxy's listeners are already there.
        let out = run_client(&app, &["request", &lab.server_addr(), "100"])?;
        assert!(out.starts_with("ok 100"), "{mode}: {out}");
        assert_eq!(opened(&lab.proxy, "app"), 1.0, "{mode}: the very first connection went through the proxy");
        assert_eq!(lab.agent.pods()?.as_array().map(Vec::len), Some(1));
    }
    Ok(())
}

#[test]
fn an_annotated_pod_and_an_excluded_namespace_are_left_alone() -> anyhow::Result<()> {
    let lab = Installed::new("ebpf")?;
    let opted_out = lab.node.add_pod(PodSpec::new("default", "plain").annotate("podsteer.io/inject", "false"))?;
    let system = lab.node.add_pod(PodSpec::new("kube-system", "dns"))?;
    for pod in [&opted_out, &system] {
        let out = run_client(pod, &["request", &lab.server_addr(), "100"])?;
        assert!(out.starts_with("ok 100"), "{out}");
    }
    assert_eq!(lab.agent.pods()?.as_array().map(Vec::len), Some(0));
    assert_eq!(opened(&lab.proxy, "plain"), 0.0);
    Ok(())
}

#[test]
fn add_with_the_agent_down_fails_with_a_cni_error_and_leaves_nothing() -> anyhow::Result<()> {
    let mut lab = Installed::new("ebpf")?;
    lab.agent.kill();
    let err = lab.node.add_pod(PodSpec::new("default", "early")).err().expect("ADD must fail");
    let cni = err.downcast_ref::<podsteer_lab::cni::CniError>().expect("a CNI error");
    assert_eq!(cni.code(), Some(11), "{cni}");
    assert!(cni.to_string().contains("unreachable"), "{cni}");
    assert!(!Path::new("/run/netns").join(lab.node.id().netns_name("early")).exists());
    Ok(())
}

#[test]
fn fail_open_is_explicit_and_logged() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let mut agent = Agent::start_installed(&node, "ebpf", &["--cni-fail-open"])?;
    agent.kill();
    let pod = node.add_pod(PodSpec::new("default", "risky"))?;
    assert!(pod.ipv4().is_some());
    let log = std::fs::read_to_string(node.state_dir().join("cni.log"))?;
    assert!(log.contains("FAIL-OPEN: default/risky starts WITHOUT interception"), "{log}");
    Ok(())
}

#[test]
fn del_twice_and_late_del_without_netns_succeed_even_with_the_agent_down() -> anyhow::Result<()> {
    let mut lab = Installed::new("iptables")?;
    let app = lab.node.add_pod(PodSpec::new("default", "app"))?;
    let att = app.attachment().clone();
    lab.node.runtime().del(&att)?;
    assert_eq!(lab.agent.pods()?.as_array().map(Vec::len), Some(0), "DEL removed the pod");
    lab.node.runtime().del(&Attachment { netns: String::new(), ..att.clone() })?;
    lab.agent.kill();
    lab.node.runtime().del(&Attachment { netns: String::new(), ..att })?;
    Ok(())
}

#[test]
fn a_rewritten_conflist_gets_the_entry_back_within_a_second() -> anyhow::Result<()> {
    let lab = Installed::new("ebpf")?;
    let path = conflist_path(&lab.node);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    v["plugins"].as_array_mut().expect("plugins").retain(|p| p["type"] != "podsteer-cni");
    // As a primary CNI does: a fresh file renamed over the old one.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&v)?)?;
    std::fs::rename(&tmp, &path)?;
    wait::until("the entry to come back", Duration::from_secs(1), || {
        plugin_types(&lab.node).last().is_some_and(|t| t == "podsteer-cni").then_some(())
    })?;
    Ok(())
}

#[test]
fn uninstall_restores_the_conflist_byte_for_byte_and_sigterm_leaves_it() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let path = conflist_path(&node);
    let before = std::fs::read(&path)?;
    let mut agent = Agent::start_installed(&node, "ebpf", &[])?;
    wait::until("install", Duration::from_secs(5), || plugin_types(&node).ends_with(&["podsteer-cni".to_owned()]).then_some(()))?;
    // Upgrade: SIGTERM leaves the entry and the binary for the next agent.
    agent.signal(nix::sys::signal::Signal::SIGTERM)?;
    assert!(agent.wait_exit(Duration::from_secs(5))?.success());
    assert!(plugin_types(&node).ends_with(&["podsteer-cni".to_owned()]));
    assert!(node.cni_bin_dir().join("podsteer-cni").exists());
    // Uninstall: the explicit signal.
    agent.restart()?;
    agent.signal(nix::sys::signal::Signal::SIGUSR1)?;
    assert!(agent.wait_exit(Duration::from_secs(5))?.success());
    assert_eq!(std::fs::read(&path)?, before, "conflist not restored byte for byte");
    assert!(!node.cni_bin_dir().join("podsteer-cni").exists());
    assert!(!agent.bpffs.join("podsteer").exists(), "pins left after uninstall");
    Ok(())
}

#[test]
fn a_single_conf_is_converted_and_restored() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let dir = node.cni_conf_dir();
    let lab_list: Value = serde_json::from_slice(&std::fs::read(conflist_path(&node))?)?;
    std::fs::remove_file(conflist_path(&node))?;
    let mut conf = lab_list["plugins"][0].clone();
    conf["cniVersion"] = lab_list["cniVersion"].clone();
    conf["name"] = lab_list["name"].clone();
    let original = serde_json::to_vec_pretty(&conf)?;
    std::fs::write(dir.join("10-bridge.conf"), &original)?;
    let agent = Agent::start_installed(&node, "ebpf", &[])?;
    let _proxy = Proxy::start_shared(&node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?;
    wait::until("conversion", Duration::from_secs(5), || dir.join("10-bridge.conflist").exists().then_some(()))?;
    assert!(!dir.join("10-bridge.conf").exists());
    let pod = node.add_pod(PodSpec::new("default", "on-converted"))?;
    assert!(pod.ipv4().is_some());
    assert_eq!(agent.pods()?.as_array().map(Vec::len), Some(1), "podsteer-cni ran from the converted conflist");
    drop(pod);
    let out = node.command(bin("podsteer-agent"))?.args(uninstall_args(&agent, &node)).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(dir.join("10-bridge.conf"))?, original);
    assert!(!dir.join("10-bridge.conflist").exists());
    Ok(())
}

fn uninstall_args(agent: &Agent, node: &Node) -> Vec<String> {
    [
        "--bpffs",
        &agent.bpffs.display().to_string(),
        "--state-dir",
        &agent.state_dir.display().to_string(),
        "--cgroup",
        &node.pods_cgroup().display().to_string(),
        "--socket",
        &agent.state_dir.join("uninstall.sock").display().to_string(),
        "--cni-bin-dir",
        &node.cni_bin_dir().display().to_string(),
        "--cni-conf-dir",
        &node.cni_conf_dir().display().to_string(),
        "uninstall",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs the plugin once with exactly `env` and `stdin`; returns exit status and parsed stdout.
fn invoke(env: &[(&str, &str)], stdin: &str) -> anyhow::Result<(i32, Value)> {
    let mut cmd = Command::new(bin("podsteer-cni"));
    cmd.env_clear().envs(env.iter().copied()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    child.stdin.take().expect("piped").write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok((out.status.code().unwrap_or(-1), v))
}

#[test]
fn check_status_version_and_gc() -> anyhow::Result<()> {
    let lab = Installed::new("ebpf")?;
    let app = lab.node.add_pod(PodSpec::new("default", "app"))?;
    lab.node.runtime().check(app.attachment())?;
    let sock = lab.agent.socket.display().to_string();
    let conf = json!({"cniVersion": "1.1.0", "name": "podsteer-lab", "type": "podsteer-cni", "agentSocket": sock});
    let (code, out) = invoke(&[("CNI_COMMAND", "STATUS")], &conf.to_string())?;
    assert_eq!((code, &out), (0, &Value::Null), "STATUS with the agent up");
    let (code, out) = invoke(&[("CNI_COMMAND", "VERSION")], "")?;
    assert_eq!(code, 0);
    assert_eq!(out["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let (code, _) = invoke(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")], &gc.to_string())?;
    assert_eq!(code, 0);
    assert_eq!(lab.agent.pods()?.as_array().map(Vec::len), Some(0), "GC removed the pod the runtime no longer lists");
    Ok(())
}

#[test]
fn bad_input_gets_its_own_cni_error_and_changes_nothing() -> anyhow::Result<()> {
    let lab = Installed::new("ebpf")?;
    let meshed = lab.node.add_pod(PodSpec::new("default", "meshed"))?;
    let victim = lab.node.add_pod(PodSpec::new("default", "victim").annotate("podsteer.io/inject", "false"))?;
    let sock = lab.agent.socket.display().to_string();
    let netns = victim.netns().path().display().to_string();
    let garbage = lab.node.state_dir().join("not-a-netns");
    std::fs::write(&garbage, "x")?;
    let garbage = garbage.display().to_string();
    let ip = victim.ipv4().expect("v4").to_string();
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": format!("{ip}/24"), "interface": 0}]});
    let conf = |extra: Value| -> String {
        let mut c = json!({"cniVersion": "1.0.0", "name": "podsteer-lab", "type": "podsteer-cni", "agentSocket": sock, "prevResult": prev});
        for (k, v) in extra.as_object().into_iter().flatten() {
            if v.is_null() {
                c.as_object_mut().expect("object").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c.to_string()
    };
    let with_ann = |k: &str, v: &str| conf(json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {k: v}}}));
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=victim;K8S_POD_UID={}", "bad-input-uid");
    let env = |cmd: &'static str, drop: &[&str], ns: &str| -> Vec<(String, String)> {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", ns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
            ("CNI_ARGS", args.as_str()),
        ]
        .into_iter()
        .filter(|(k, v)| !drop.contains(k) && !v.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    };
    let add = |drop: &[&str]| env("ADD", drop, &netns);
    struct Case {
        name: &'static str,
        env: Vec<(String, String)>,
        stdin: String,
        code: u32,
    }
    let cases = vec![
        Case { name: "no CNI_COMMAND", env: add(&["CNI_COMMAND"]), stdin: conf(json!({})), code: 4 },
        Case { name: "unknown command", env: env("FROB", &[], &netns), stdin: conf(json!({})), code: 4 },
        Case { name: "lower-case command", env: env("add", &[], &netns), stdin: conf(json!({})), code: 4 },
        Case { name: "malformed JSON", env: add(&[]), stdin: "{\"cniVersion\": ".into(), code: 6 },
        Case { name: "empty stdin", env: add(&[]), stdin: String::new(), code: 6 },
        Case { name: "JSON array", env: add(&[]), stdin: "[]".into(), code: 6 },
        Case { name: "missing cniVersion", env: add(&[]), stdin: conf(json!({"cniVersion": null})), code: 6 },
        Case { name: "cniVersion 0.2.0", env: add(&[]), stdin: conf(json!({"cniVersion": "0.2.0"})), code: 1 },
        Case { name: "cniVersion 2.0.0", env: add(&[]), stdin: conf(json!({"cniVersion": "2.0.0"})), code: 1 },
        Case { name: "wrong type", env: add(&[]), stdin: conf(json!({"type": "bridge"})), code: 7 },
        Case { name: "timeoutMs 0", env: add(&[]), stdin: conf(json!({"timeoutMs": 0})), code: 7 },
        Case { name: "timeoutMs negative", env: add(&[]), stdin: conf(json!({"timeoutMs": -5})), code: 6 },
        Case { name: "agentSocket a number", env: add(&[]), stdin: conf(json!({"agentSocket": 7})), code: 6 },
        Case { name: "excludeNamespaces not a list", env: add(&[]), stdin: conf(json!({"excludeNamespaces": "kube-system"})), code: 6 },
        Case { name: "unknown injection mode", env: add(&[]), stdin: conf(json!({"injection": "always"})), code: 6 },
        Case { name: "ADD without prevResult", env: add(&[]), stdin: conf(json!({"prevResult": null})), code: 7 },
        Case { name: "ADD without CNI_NETNS", env: add(&["CNI_NETNS"]), stdin: conf(json!({})), code: 4 },
        Case { name: "ADD without CNI_CONTAINERID", env: add(&["CNI_CONTAINERID"]), stdin: conf(json!({})), code: 4 },
        Case { name: "ADD without CNI_IFNAME", env: add(&["CNI_IFNAME"]), stdin: conf(json!({})), code: 4 },
        Case { name: "ADD without CNI_PATH", env: add(&["CNI_PATH"]), stdin: conf(json!({})), code: 4 },
        Case { name: "netns does not exist", env: env("ADD", &[], "/run/netns/podsteer-nope"), stdin: conf(json!({})), code: 4 },
        Case { name: "netns is not a netns", env: env("ADD", &[], &garbage), stdin: conf(json!({})), code: 4 },
        Case {
            name: "prevResult with a bad IP",
            env: add(&[]),
            stdin: conf(json!({"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.999/24"}]}})),
            code: 7,
        },
        Case {
            name: "annotations not an object",
            env: add(&[]),
            stdin: conf(json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": "x"}})),
            code: 7,
        },
        Case { name: "excluded port 0", env: add(&[]), stdin: with_ann("podsteer.io/exclude-outbound-ports", "0"), code: 100 },
        Case {
            name: "overlapping CIDRs",
            env: add(&[]),
            stdin: with_ann("podsteer.io/exclude-outbound-cidrs", "10.0.0.0/8,10.1.0.0/16"),
            code: 100,
        },
        Case { name: "unknown proxy mode", env: add(&[]), stdin: with_ann("podsteer.io/proxy-mode", "ambient"), code: 100 },
        Case { name: "sk-msg not a bool", env: add(&[]), stdin: with_ann("podsteer.io/sk-msg", "maybe"), code: 100 },
        Case {
            name: "agent socket absent",
            env: add(&[]),
            stdin: conf(json!({"agentSocket": "/run/podsteer-lab/no-agent.sock"})),
            code: 11,
        },
        Case { name: "CHECK without prevResult", env: env("CHECK", &[], &netns), stdin: conf(json!({"prevResult": null})), code: 7 },
        Case { name: "CHECK of a pod never added", env: env("CHECK", &[], &netns), stdin: conf(json!({})), code: 102 },
        Case {
            name: "STATUS with the agent absent",
            env: env("STATUS", &[], &netns),
            stdin: conf(json!({"agentSocket": "/run/podsteer-lab/no-agent.sock"})),
            code: 50,
        },
    ];
    assert!(cases.len() >= 25);
    let registry = std::fs::read(lab.agent.state_dir.join("pods.json"))?;
    let pods_before = lab.agent.pods()?;
    for case in &cases {
        let env: Vec<(&str, &str)> = case.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (exit, out) = invoke(&env, &case.stdin)?;
        assert_ne!(exit, 0, "{}: exit 0", case.name);
        assert_eq!(out["code"], case.code, "{}: {out}", case.name);
        assert!(out["msg"].as_str().is_some_and(|m| !m.is_empty()), "{}: {out}", case.name);
        assert!(out["cniVersion"].is_string(), "{}: {out}", case.name);
        assert_eq!(lab.agent.pods()?, pods_before, "{}: agent state changed", case.name);
        assert_eq!(std::fs::read(lab.agent.state_dir.join("pods.json"))?, registry, "{}: registry file changed", case.name);
    }
    // The meshed pod is still intercepted after all that.
    let out = run_client(&meshed, &["request", &lab.server_addr(), "10"])?;
    assert!(out.starts_with("ok 10"), "{out}");
    assert_eq!(opened(&lab.proxy, "meshed"), 1.0);
    Ok(())
}
