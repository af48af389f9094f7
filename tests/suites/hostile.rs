//! Hostile pods: what a root process inside a meshed pod can do to the node
//! agent. Each attack must be refused and leave every pod's state as it was.

use std::os::fd::AsFd as _;

use podsteer_agent::api::{ErrorKind, Request, Response};
use podsteer_agent::ebpf::maps::{Maps, ip_key};
use podsteer_lab::agent::{Agent, pod_info};
use podsteer_lab::workload::run_client;
use podsteer_lab::{Node, NodeOptions, Pod, PodSpec};

/// A node with meshed pods `a` (the attacker) and `b` (the victim).
struct Scene {
    a: Pod,
    b: Pod,
    agent: Agent,
    _node: Node,
}

impl Scene {
    fn new() -> anyhow::Result<Scene> {
        let node = Node::new(NodeOptions::default())?;
        let agent = Agent::start(&node, "ebpf", &[])?;
        let a = node.add_pod(PodSpec::new("default", "a"))?;
        let b = node.add_pod(PodSpec::new("default", "b"))?;
        for p in [&a, &b] {
            agent.add_pod(p, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(Scene { a, b, agent, _node: node })
    }

    /// Sends `req` from a root process in pod `a`'s netns and cgroup, with an fd of `fd` kind.
    fn send_from_a(&self, req: &Request, fd: Option<&str>) -> anyhow::Result<Response> {
        let sock = self.agent.socket.display().to_string();
        let json = serde_json::to_string(req)?;
        let mut args = vec!["agent-call", sock.as_str(), json.as_str()];
        args.extend(fd);
        Ok(serde_json::from_str(&run_client(&self.a, &args)?)?)
    }

    /// Everything the agent and the kernel hold about the pods.
    fn state(&self) -> anyhow::Result<String> {
        let maps = Maps::open_pinned(&self.agent.bpffs)?;
        let mut owners: Vec<String> = [&self.a, &self.b]
            .iter()
            .flat_map(|p| p.ips().to_vec())
            .map(|ip| format!("{ip}={:?}", maps.pod_by_ip.get(&ip_key(ip), 0).ok()))
            .collect();
        owners.sort();
        let mut pods = maps.pod_cookies();
        pods.sort_unstable();
        Ok(format!("{} | POD_BY_IP {owners:?} | PODS {pods:?}", self.agent.pods()?))
    }
}

/// What the plugin would send for `pod`, claiming another uid and netns.
fn forged(pod: &Pod, uid: &str, netns: &std::path::Path) -> podsteer_agent::api::PodInfo {
    let mut info = pod_info(pod, &[]);
    info.uid = uid.into();
    info.netns = netns.to_owned();
    info
}

fn refused(r: &Response, kind: ErrorKind, what: &str) -> String {
    assert!(!r.ok, "{what}: accepted: {r:?}");
    let e = r.error.clone().unwrap_or_else(|| panic!("{what}: no error in {r:?}"));
    assert_eq!(e.kind, kind, "{what}: {}", e.message);
    e.message
}

#[test]
fn a_pod_cannot_control_the_agent() -> anyhow::Result<()> {
    let s = Scene::new()?;
    let before = s.state()?;
    let mut hijack = forged(&s.a, "hijacker", "/proc/self/ns/net".as_ref());
    hijack.ips = s.b.ips().to_vec();
    let cases: Vec<(&str, Request, Option<&str>)> = vec![
        ("unmesh the node", Request::Gc { keep: vec![] }, None),
        ("remove another pod", Request::Del { uid: s.b.uid().into() }, None),
        ("remove itself", Request::Del { uid: s.a.uid().into() }, None),
        ("enrol its own netns with the victim's IPs", Request::Add { pod: hijack }, None),
        ("register a listener for another pod", Request::RegisterListener { uid: s.b.uid().into(), family: 2 }, Some("listen4")),
        ("list the node's pods", Request::Pods, None),
    ];
    for (what, req, fd) in cases {
        let msg = refused(&s.send_from_a(&req, fd)?, ErrorKind::Forbidden, what);
        assert!(msg.contains(s.a.uid()), "{what}: the refusal names the caller's pod: {msg}");
    }
    assert_eq!(s.state()?, before, "no pod's state changed");
    assert!(s.agent.log_text().contains("request refused"), "refusals are logged");
    Ok(())
}

/// Root in a pod the agent does not know (unmeshed, say, with the socket's
/// host path mounted) is not the node: it may send nothing at all.
#[test]
fn root_in_an_unknown_pod_cannot_control_the_agent() -> anyhow::Result<()> {
    let s = Scene::new()?;
    let before = s.state()?;
    let stranger = s._node.add_pod(PodSpec::new("default", "stranger"))?;
    let sock = s.agent.socket.display().to_string();
    let cases = [
        ("unmesh the node", Request::Gc { keep: vec![] }),
        ("remove a pod", Request::Del { uid: s.b.uid().into() }),
        ("enrol itself", Request::Add { pod: pod_info(&stranger, &[]) }),
        ("read the agent's status", Request::Status),
    ];
    for (what, req) in cases {
        let out = run_client(&stranger, &["agent-call", &sock, &serde_json::to_string(&req)?])?;
        let msg = refused(&serde_json::from_str(&out)?, ErrorKind::Forbidden, what);
        assert!(msg.contains("neither the node's network namespace nor a registered pod's"), "{what}: {msg}");
    }
    assert_eq!(s.state()?, before, "no pod's state changed");
    Ok(())
}

#[test]
fn a_pod_registers_only_a_real_listener_of_its_own() -> anyhow::Result<()> {
    let s = Scene::new()?;
    let reg = Request::RegisterListener { uid: s.a.uid().into(), family: 2 };
    for (fd, why) in [("udp4", "not a TCP socket"), ("tcp4", "not listening")] {
        let msg = refused(&s.send_from_a(&reg, Some(fd))?, ErrorKind::BadRequest, fd);
        assert!(msg.contains(why), "{fd}: {msg}");
    }
    let msg = refused(
        &s.send_from_a(&Request::RegisterListener { uid: s.a.uid().into(), family: 10 }, Some("listen4"))?,
        ErrorKind::BadRequest,
        "family",
    );
    assert!(msg.contains("socket family 2, registered as 10"), "{msg}");
    // A listener from another netns (here the test's own), even sent by the node.
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0")?;
    let r = podsteer_agent::api::call(&s.agent.socket, &reg, podsteer_lab::agent::CALL_DEADLINE, Some(elsewhere.as_fd()))?;
    let msg = refused(&r, ErrorKind::BadRequest, "listener in another netns");
    assert!(msg.contains("lives in netns"), "{msg}");
    // Its own real listener is accepted.
    let ok = s.send_from_a(&reg, Some("listen4"))?;
    assert!(ok.ok, "{ok:?}");
    Ok(())
}

#[test]
fn no_pod_can_be_enrolled_with_the_nodes_own_netns() -> anyhow::Result<()> {
    let s = Scene::new()?;
    let before = s.state()?;
    let info = forged(&s.b, "node-netns", s._node.netns().path());
    let r = podsteer_agent::api::call(&s.agent.socket, &Request::Add { pod: info }, podsteer_lab::agent::CALL_DEADLINE, None)?;
    let msg = refused(&r, ErrorKind::BadNetns, "the node's netns");
    assert!(msg.contains("the node's own network namespace"), "{msg}");
    assert_eq!(s.state()?, before);
    Ok(())
}

/// Whoever says Hello on the proxy control socket is handed every pod's netns
/// and makes the real proxy drain; only the configured proxy identity (its uid,
/// in the node's netns) may. A root process in a pod is refused.
#[test]
fn a_rogue_hello_on_the_proxy_control_socket_gets_nothing() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let agent = Agent::start_with_proxy(&node, "ebpf", &[])?;
    let control = agent.proxy_socket.clone().expect("proxy socket");
    let proxy = podsteer_lab::proxy::Proxy::start_shared(&node, &control, 15020, &[])?;
    let a = node.add_pod(PodSpec::new("default", "a"))?;
    agent.add_pod(&a, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let pid_before = agent.status()?["proxy_pid"].clone();
    assert_eq!(pid_before, proxy.pid(), "the real proxy is current");
    let out = run_client(&a, &["rogue-hello", &control.display().to_string()])?;
    assert_eq!(out.trim(), "closed", "the rogue was sent: {out}");
    assert_eq!(agent.status()?["proxy_pid"], pid_before, "the real proxy is still current");
    assert!(agent.log_text().contains("proxy handshake refused"), "{}", agent.log_text());
    // And the real proxy still serves the pod.
    let b = node.add_pod(PodSpec::new("default", "b"))?;
    let _echo = podsteer_lab::workload::start_server(&b, None, &["echo", "[::]:8080"])?;
    let out = run_client(&a, &["request", &podsteer_lab::workload::addr(b.ipv4().expect("v4"), 8080), "100"])?;
    assert!(out.starts_with("ok 100"), "{out}");
    assert_eq!(proxy.metric("podsteer_proxy_connections_opened_total{pod=\"default/a\",direction=\"outbound\"}")?, 1.0);
    Ok(())
}

fn threads(pid: i32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

/// Silent connections to the agent socket from outside the node's netns (a pod
/// that mounts it, say) get a few threads at most, are cut off after a read
/// deadline, and never crowd out the CNI plugin, which calls from the node's netns.
#[test]
fn silent_connections_cannot_pile_up_agent_threads_or_starve_the_plugin() -> anyhow::Result<()> {
    let s = Scene::new()?;
    let pid = s.agent.pid().expect("agent runs");
    let before = threads(pid)?;
    // The test runs in the host's netns, which is not the lab node's: "another netns".
    let silent: Vec<std::os::unix::net::UnixStream> =
        (0..40).map(|_| std::os::unix::net::UnixStream::connect(&s.agent.socket)).collect::<Result<_, _>>()?;
    podsteer_lab::wait::until("the agent to have taken every connection", std::time::Duration::from_secs(5), || {
        (s.agent.metric("podsteer_agent_requests_total{command=\"connect\",result=\"busy\"}").ok()? >= 36.0).then_some(())
    })?;
    let now = threads(pid)?;
    assert!(now <= before + 4, "agent threads: {before} before, {now} with 40 silent connections");
    // The plugin's place: a process in the node's netns is answered at once.
    let out = s
        ._node
        .command(podsteer_lab::agent::bin("podsteer-lab-tool"))?
        .args(["agent-call", &s.agent.socket.display().to_string(), &serde_json::to_string(&Request::Status)?])
        .output()?;
    let status: Response =
        serde_json::from_slice(&out.stdout).map_err(|e| anyhow::anyhow!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    assert!(status.ok, "{status:?}");
    // The read deadline frees the silent ones' threads.
    podsteer_lab::wait::until("silent connections to be cut off", std::time::Duration::from_secs(10), || {
        (threads(pid).ok()? <= before).then_some(())
    })?;
    drop(silent);
    Ok(())
}

/// The IPs of an ADD steer inbound traffic to the pod (POD_BY_IP): a pod may
/// claim only addresses its netns really has, never another pod's.
#[test]
fn an_add_claiming_addresses_its_netns_lacks_is_refused() -> anyhow::Result<()> {
    let s = Scene::new()?;
    let before = s.state()?;
    let c = s._node.add_pod(PodSpec::new("default", "c"))?;
    let mut info = pod_info(&c, &[]);
    info.ips = s.b.ips().to_vec();
    let r = podsteer_agent::api::call(&s.agent.socket, &Request::Add { pod: info }, podsteer_lab::agent::CALL_DEADLINE, None)?;
    let msg = refused(&r, ErrorKind::BadRequest, "the victim's IPs");
    assert!(msg.contains("is not an address of netns"), "{msg}");
    assert_eq!(s.state()?, before, "no pod's state changed");
    Ok(())
}

/// The sidecar socket (`--sidecar-socket`) is world-connectable so that
/// injected sidecars, which run as the proxy UID from their start, can reach
/// it. Being able to connect must buy nothing else: it answers only the proxy
/// UID (or root) in a registered pod, only RegisterListener and SidecarMesh,
/// only for that pod; the node itself is refused there (it has the agent
/// socket), and the agent socket stays root's.
#[test]
fn the_sidecar_socket_answers_only_a_pods_own_proxy_uid() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let node = Node::new(NodeOptions::default())?;
    let sidecar_sock = node.state_dir().join("sidecar").join("agent.sock");
    let agent = Agent::start(&node, "ebpf", &["--sidecar-socket", &sidecar_sock.display().to_string()])?;
    let a = node.add_pod(PodSpec::new("default", "a"))?;
    let b = node.add_pod(PodSpec::new("default", "b"))?;
    for p in [&a, &b] {
        agent.add_pod(p, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let stranger = node.add_pod(PodSpec::new("default", "stranger"))?;
    assert_eq!(std::fs::metadata(&sidecar_sock)?.permissions().mode() & 0o777, 0o666);
    assert_eq!(std::fs::metadata(&agent.socket)?.permissions().mode() & 0o777, 0o600);
    // `agent-call` from inside `pod`, as `uid`.
    let send = |pod: &Pod, uid: u32, socket: &std::path::Path, req: &Request, fd: Option<&str>| -> anyhow::Result<Response> {
        let mut cmd = pod.command("setpriv")?;
        let id = uid.to_string();
        cmd.args(["--reuid", &id, "--regid", &id, "--clear-groups"]).arg(podsteer_lab::agent::bin("podsteer-lab-tool"));
        cmd.args(["agent-call", &socket.display().to_string(), &serde_json::to_string(req)?]).args(fd);
        let out = cmd.output()?;
        serde_json::from_slice(&out.stdout)
            .map_err(|e| anyhow::anyhow!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let own = Request::RegisterListener { uid: a.uid().into(), family: 2 };
    let before = agent.pods()?;
    let cases: Vec<(&str, &Pod, u32, Request, Option<&str>)> = vec![
        (
            "the proxy UID registering for another pod",
            &a,
            1337,
            Request::RegisterListener { uid: b.uid().into(), family: 2 },
            Some("listen4"),
        ),
        ("the proxy UID asking for another pod's certificate", &a, 1337, Request::SidecarMesh { uid: b.uid().into(), seen: None }, None),
        ("the proxy UID unmeshing the node", &a, 1337, Request::Gc { keep: vec![] }, None),
        ("the proxy UID removing its own pod", &a, 1337, Request::Del { uid: a.uid().into() }, None),
        ("the proxy UID listing pods", &a, 1337, Request::Pods, None),
        ("another UID in the pod", &a, 1000, own.clone(), Some("listen4")),
        ("the proxy UID in an unknown pod", &stranger, 1337, Request::RegisterListener { uid: a.uid().into(), family: 2 }, Some("listen4")),
        ("root in an unknown pod", &stranger, 0, Request::Status, None),
    ];
    for (what, pod, uid, req, fd) in cases {
        refused(&send(pod, uid, &sidecar_sock, &req, fd)?, ErrorKind::Forbidden, what);
    }
    // The node on the sidecar socket is nobody.
    let r = podsteer_agent::api::call(&sidecar_sock, &Request::Status, podsteer_lab::agent::CALL_DEADLINE, None)?;
    refused(&r, ErrorKind::Forbidden, "the node on the sidecar socket");
    assert_eq!(agent.pods()?, before, "no pod's state changed");
    // The proxy UID cannot even connect to the agent socket.
    let mut cmd = a.command("setpriv")?;
    cmd.args(["--reuid", "1337", "--regid", "1337", "--clear-groups"]).arg(podsteer_lab::agent::bin("podsteer-lab-tool"));
    let out = cmd.args(["agent-call", &agent.socket.display().to_string(), &serde_json::to_string(&Request::Status)?]).output()?;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("ermission denied"), "{out:?}");
    // What it is for: the proxy UID in its own pod registers its own listener.
    let ok = send(&a, 1337, &sidecar_sock, &own, Some("listen4"))?;
    assert!(ok.ok && ok.data.as_ref().is_some_and(|d| d["registered"] == true), "{ok:?}");
    Ok(())
}
