//! The proxy in the lab, behind both interception modes: byte-exact relay,
//! half-close, resets, timeouts, scale, both deployment shapes, haproxy as a
//! drop-in sidecar, handover without refusals, exact metrics, bad control input.

use std::os::fd::AsFd;
use std::time::Duration;

use podsteer_lab::agent::Agent;
use podsteer_lab::process::LabProcess;
use podsteer_lab::proxy::Proxy;
use podsteer_lab::wait;
use podsteer_lab::workload::{addr, run_client, start_server};
use podsteer_lab::{Node, NodeOptions, Pod, PodSpec, both_modes};

/// Full mesh: client `a` and server `b` both meshed, one shared proxy.
struct Mesh {
    _apps: Vec<LabProcess>,
    proxy: Proxy,
    a: Pod,
    b: Pod,
    agent: Agent,
    node: Node,
}

impl Mesh {
    fn new(mode: &str, proxy_args: &[&str]) -> anyhow::Result<Mesh> {
        Mesh::with_agent_args(mode, &[], proxy_args)
    }

    fn with_agent_args(mode: &str, agent_args: &[&str], proxy_args: &[&str]) -> anyhow::Result<Mesh> {
        let node = Node::new(NodeOptions::default())?;
        let agent = Agent::start_with_proxy(&node, mode, agent_args)?;
        let control = agent.proxy_socket.clone().expect("proxy socket");
        let proxy = Proxy::start_shared(&node, &control, 15020, proxy_args)?;
        let a = node.add_pod(PodSpec::new("default", "a"))?;
        let b = node.add_pod(PodSpec::new("default", "b"))?;
        let apps = vec![
            start_server(&b, None, &["echo", "[::]:8080"])?,
            start_server(&b, None, &["halfclose-server", "[::]:8081"])?,
            start_server(&b, None, &["whoami", "[::]:8082", "b"])?,
        ];
        for p in [&a, &b] {
            let rec = agent.add_pod(p, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
            assert_eq!(rec["proxy_ready"], true, "the agent answers only after the proxy's ack: {rec}");
        }
        Ok(Mesh { _apps: apps, proxy, a, b, agent, node })
    }

    fn b(&self, port: u16) -> String {
        addr(self.b.ipv4().expect("v4"), port)
    }

    /// Bytes the proxy moved with splice(2) for a pod, both ways.
    fn spliced(&self, pod: &str, dir: &str) -> anyhow::Result<f64> {
        self.proxy.metric(&format!("podsteer_proxy_bytes_spliced_total{{pod=\"default/{pod}\",direction=\"{dir}\"}}"))
    }
}

/// containerd attaches a pod's networks concurrently, so the chain can run
/// while the pod's `lo` is still down (seen in CI: "socket: Cannot assign
/// requested address" from the agent, and 127.0.0.1, where the proxy's
/// outbound listeners go, not there yet). The ADD sets `lo` up and the pod
/// is proxied from its first connection.
fn a_pod_whose_loopback_is_not_up_yet_is_enrolled_and_proxied(mode: &str) -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let agent = Agent::start_with_proxy(&node, mode, &[])?;
    let proxy = Proxy::start_shared(&node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?;
    let server = node.add_pod(PodSpec::new("default", "server"))?;
    let _app = start_server(&server, None, &["echo", "[::]:8080"])?;
    let early = node.add_pod(PodSpec::new("default", "early").without_loopback())?;
    let lo =
        || -> anyhow::Result<String> { Ok(String::from_utf8(early.command("ip")?.args(["-o", "link", "show", "lo"]).output()?.stdout)?) };
    assert!(!lo()?.contains(",UP"), "the lab left lo down: {}", lo()?);
    let rec = agent.add_pod(&early, &[])?.map_err(|e| anyhow::anyhow!("{mode}: {e}"))?;
    assert_eq!(rec["proxy_ready"], true, "{mode}: {rec}");
    assert!(lo()?.contains(",UP"), "{mode}: the ADD set lo up: {}", lo()?);
    let out = run_client(&early, &["request", &addr(server.ipv4().expect("v4"), 8080), "1000"])?;
    assert!(out.starts_with("ok 1000"), "{mode}: {out}");
    let opened = proxy.metric("podsteer_proxy_connections_opened_total{pod=\"default/early\",direction=\"outbound\"}")?;
    assert_eq!(opened, 1.0, "{mode}: through the proxy");
    Ok(())
}
both_modes!(a_pod_whose_loopback_is_not_up_yet_is_enrolled_and_proxied);

fn relays_every_byte_through_outbound_and_inbound(mode: &str) -> anyhow::Result<()> {
    relays_every_byte(mode, &[])
}
both_modes!(relays_every_byte_through_outbound_and_inbound);

/// With sk_msg turned on for the node (opt-in), sk_msg feeds the pods' sockets:
/// every byte still arrives, and none of it is spliced, which splice cannot read.
#[test]
fn sk_msg_sockets_are_relayed_but_never_spliced() -> anyhow::Result<()> {
    relays_every_byte("ebpf", &["--sk-msg"])
}

fn relays_every_byte(mode: &str, agent_args: &[&str]) -> anyhow::Result<()> {
    let sk_msg = mode == "ebpf" && agent_args.contains(&"--sk-msg");
    let m = Mesh::with_agent_args(mode, agent_args, &[])?;
    let out = run_client(&m.a, &["request", &m.b(8080), "1000"])?;
    assert!(out.starts_with("ok 1000"), "{out}");
    let out = run_client(&m.a, &["bulk", &m.b(8080), &(100 << 20).to_string()])?;
    assert!(out.starts_with(&format!("ok {}", 100 << 20)), "{out}");
    let v6 = addr(m.b.ipv6().expect("v6"), 8080);
    let out = run_client(&m.a, &["bulk", &v6, &(8 << 20).to_string()])?;
    assert!(out.starts_with(&format!("ok {}", 8 << 20)), "{out}");
    // Both proxies saw it: the outbound one in a, the inbound one in b.
    let opened = |pod: &str, dir: &str| {
        m.proxy.metric(&format!("podsteer_proxy_connections_opened_total{{pod=\"default/{pod}\",direction=\"{dir}\"}}"))
    };
    assert_eq!(opened("a", "outbound")?, 3.0);
    assert_eq!(opened("b", "inbound")?, 3.0);
    // Bulk moves to splice(2) by itself, except where sk_msg feeds the sockets
    // (opted in, eBPF mode): splice cannot read those, and the bytes there skip TCP anyway.
    for (pod, dir) in [("a", "outbound"), ("b", "inbound")] {
        let spliced = m.spliced(pod, dir)?;
        if sk_msg {
            assert_eq!(spliced, 0.0, "{pod} {dir}: sk_msg sockets were spliced");
        } else {
            assert!(spliced >= f64::from(100u32 << 20), "{mode} {pod} {dir}: only {spliced} bytes spliced");
        }
    }
    Ok(())
}

/// The splice(2) path from the first byte, in both modes (eBPF mode without
/// sk_msg, the default, which is what lets the proxy splice there): exact bytes, half-close
/// both ways, a refused upstream still resets the client.
fn the_splice_path_relays_exactly(mode: &str) -> anyhow::Result<()> {
    let m = Mesh::new(mode, &["--splice", "always"])?;
    let out = run_client(&m.a, &["request", &m.b(8080), "200"])?;
    assert!(out.starts_with("ok 200"), "{out}");
    let out = run_client(&m.a, &["bulk", &m.b(8080), &(64 << 20).to_string()])?;
    assert!(out.starts_with(&format!("ok {}", 64 << 20)), "{out}");
    for side in ["client", "server"] {
        let out = run_client(&m.a, &["halfclose", &m.b(8081), side])?;
        assert!(out.starts_with("ok"), "{side}: {out}");
    }
    let refused = run_client(&m.a, &["expect-reset", &m.b(9999)])?;
    assert!(refused.starts_with("reset"), "refused upstream: {refused}");
    for (pod, dir) in [("a", "outbound"), ("b", "inbound")] {
        let spliced = m.spliced(pod, dir)?;
        assert!(spliced >= f64::from(2 * (64u32 << 20)), "{pod} {dir}: only {spliced} bytes spliced");
    }
    Ok(())
}
both_modes!(the_splice_path_relays_exactly);

fn half_close_works_in_both_directions(mode: &str) -> anyhow::Result<()> {
    let m = Mesh::new(mode, &[])?;
    for side in ["client", "server"] {
        let out = run_client(&m.a, &["halfclose", &m.b(8081), side])?;
        assert!(out.starts_with("ok"), "{side}: {out}");
    }
    Ok(())
}
both_modes!(half_close_works_in_both_directions);

fn failures_reset_the_client_never_hang_it(mode: &str) -> anyhow::Result<()> {
    let m = Mesh::new(mode, &["--connect-timeout-ms", "300", "--idle-timeout-ms", "400"])?;
    let took = |out: &str| out.split_whitespace().nth(2).and_then(|t| t.trim_end_matches("ms").parse::<u64>().ok()).unwrap_or(u64::MAX);

    let refused = run_client(&m.a, &["expect-reset", &m.b(9999)])?;
    assert!(refused.starts_with("reset"), "refused upstream: {refused}\n{}", std::fs::read_to_string(&m.proxy.log)?);

    // Nothing answers ARP for this address: a black hole until the connect timeout.
    let hole = run_client(&m.a, &["expect-reset", "10.244.0.250:80"])?;
    assert!(hole.starts_with("reset"), "black hole: {hole}");
    assert!((250..2500).contains(&took(&hole)), "connect timeout not applied: {hole}");
    assert!(m.proxy.metric("podsteer_proxy_connect_errors_total{pod=\"default/a\",kind=\"timeout\"}")? >= 1.0);

    let idle = run_client(&m.a, &["expect-reset", &m.b(8080), "--quiet"])?;
    assert!(idle.starts_with("reset"), "idle: {idle}");
    assert!((350..5000).contains(&took(&idle)), "idle timeout not applied: {idle}");
    Ok(())
}
both_modes!(failures_reset_the_client_never_hang_it);

fn a_thousand_concurrent_connections(mode: &str) -> anyhow::Result<()> {
    let m = Mesh::new(mode, &[])?;
    let out = run_client(&m.a, &["concurrent", &m.b(8080), "1000"])?;
    assert!(out.starts_with("ok 1000"), "{out}");
    Ok(())
}
both_modes!(a_thousand_concurrent_connections);

fn metrics_count_the_traffic_exactly(mode: &str) -> anyhow::Result<()> {
    let m = Mesh::new(mode, &[])?;
    for _ in 0..25 {
        run_client(&m.a, &["request", &m.b(8080), "1000"])?;
    }
    let labels = |pod: &str, dir: &str| format!("{{pod=\"default/{pod}\",direction=\"{dir}\"}}");
    let want = [
        (format!("podsteer_proxy_connections_opened_total{}", labels("a", "outbound")), 25.0),
        (format!("podsteer_proxy_connections_opened_total{}", labels("b", "inbound")), 25.0),
        (format!("podsteer_proxy_bytes_from_client_total{}", labels("a", "outbound")), 25_000.0),
        (format!("podsteer_proxy_bytes_to_client_total{}", labels("a", "outbound")), 25_000.0),
        (format!("podsteer_proxy_bytes_from_client_total{}", labels("b", "inbound")), 25_000.0),
        ("podsteer_proxy_connections_closed_total{pod=\"default/a\",direction=\"outbound\",result=\"ok\"}".to_string(), 25.0),
        (format!("podsteer_proxy_connections_active{}", labels("a", "outbound")), 0.0),
    ];
    // Closing is asynchronous to the client's exit: wait for the counts to settle.
    wait::until("metrics to match the traffic", Duration::from_secs(5), || {
        want.iter().all(|(k, v)| m.proxy.metric(k).ok() == Some(*v)).then_some(())
    })
    .map_err(|e| {
        let got: Vec<_> = want.iter().map(|(k, _)| (k.clone(), m.proxy.metric(k).ok())).collect();
        e.context(format!("{got:?}"))
    })?;
    Ok(())
}
both_modes!(metrics_count_the_traffic_exactly);

fn sidecar_mode_serves_its_own_pod(mode: &str) -> anyhow::Result<()> {
    let m = Mesh::new(mode, &[])?;
    let s = m.node.add_pod(PodSpec::new("default", "sidecar"))?;
    // sk_msg on (opt-in): the sidecar's peek net must find the sockmap on its own.
    m.agent.add_pod(&s, &[("podsteer.io/proxy-mode", "sidecar"), ("podsteer.io/sk-msg", "true")])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let refused = run_client(&s, &["hello", &m.b(8082)]);
    assert!(refused.is_err(), "no sidecar yet, the redirect must have nowhere to go: {refused:?}");
    // No agent socket, so the sidecar cannot know whether sk_msg feeds its
    // sockets (it does in eBPF mode): splicing from the first byte must still
    // deliver everything, falling back to copying where a sockmap is found.
    let sidecar = Proxy::start_sidecar(&m.node, &s, 15021, &["--splice", "always"])?;
    let out = run_client(&s, &["request", &m.b(8080), "5000"])?;
    assert!(out.starts_with("ok 5000"), "{out}");
    let out = run_client(&s, &["bulk", &m.b(8080), &(16 << 20).to_string()])?;
    assert!(out.starts_with(&format!("ok {}", 16 << 20)), "{out}");
    assert_eq!(sidecar.metric("podsteer_proxy_connections_opened_total{pod=\"self\",direction=\"outbound\"}")?, 2.0);
    let fallbacks = sidecar.metric("podsteer_proxy_splice_fallbacks_total")?;
    let spliced = sidecar.metric("podsteer_proxy_bytes_spliced_total{pod=\"self\",direction=\"outbound\"}")?;
    match mode {
        "iptables" => assert!(fallbacks == 0.0 && spliced >= f64::from(2 * (16u32 << 20)), "fallbacks {fallbacks}, spliced {spliced}"),
        _ => assert!(fallbacks >= 2.0, "sk_msg feeds both of the sidecar's sockets: fallbacks {fallbacks}, spliced {spliced}"),
    }
    Ok(())
}
both_modes!(sidecar_mode_serves_its_own_pod);

fn unmodified_haproxy_works_as_a_transparent_sidecar(mode: &str) -> anyhow::Result<()> {
    let m = Mesh::new(mode, &[])?;
    let h = m.node.add_pod(PodSpec::new("default", "haproxy"))?;
    m.agent.add_pod(&h, &[("podsteer.io/proxy-mode", "sidecar")])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = m.node.state_dir().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        "global\n  uid 1337\n  gid 1337\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\n\
         frontend outbound\n  bind 127.0.0.1:15001\n  default_backend original_dst\n\n\
         backend original_dst\n  server orig 0.0.0.0:0\n",
    )?;
    let mut cmd = h.command("haproxy")?;
    cmd.args(["-db", "-f", &cfg.display().to_string()]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let _haproxy = h.spawn("haproxy", cmd)?;
    let dst = m.b(8082);
    let line = wait::until("haproxy to accept", Duration::from_secs(10), || run_client(&h, &["hello", &dst]).ok())?;
    assert_eq!(line.split_whitespace().next(), Some("server=b"), "{line}");
    let out = run_client(&h, &["bulk", &m.b(8080), "1000000"])?;
    assert!(out.starts_with("ok 1000000"), "{out}");
    Ok(())
}
both_modes!(unmodified_haproxy_works_as_a_transparent_sidecar);

const A_OUTBOUND_OPENED: &str = "podsteer_proxy_connections_opened_total{pod=\"default/a\",direction=\"outbound\"}";

/// A `loop` client in `a` against b's echo server for `millis`, once it runs
/// through the current proxy.
fn loop_through_the_proxy(m: &Mesh, millis: u64) -> anyhow::Result<podsteer_lab::process::LabProcess> {
    let mut cmd = m.a.command(podsteer_lab::agent::bin("podsteer-lab-tool"))?;
    cmd.args(["loop", &m.b(8080), &millis.to_string()]).stdout(std::process::Stdio::piped());
    let looping = m.a.spawn("loop", cmd)?;
    wait::until("the loop to be running through the old proxy", Duration::from_secs(5), || {
        (m.proxy.metric(A_OUTBOUND_OPENED).ok()? >= 20.0).then_some(())
    })?;
    Ok(looping)
}

/// What a `loop` client printed, once it is done.
fn loop_output(looping: &mut podsteer_lab::process::LabProcess, within: Duration) -> anyhow::Result<String> {
    looping.wait_exit(within)?;
    let mut s = String::new();
    if let Some(mut o) = looping.child_mut().stdout.take() {
        std::io::Read::read_to_string(&mut o, &mut s)?;
    }
    Ok(s)
}

fn handover_to_a_new_proxy_refuses_nothing(mode: &str) -> anyhow::Result<()> {
    let mut m = Mesh::new(mode, &["--drain-timeout-ms", "2000"])?;
    let mut looping = loop_through_the_proxy(&m, 3000)?;
    let control = m.agent.proxy_socket.clone().expect("proxy socket");
    let new = Proxy::start_shared(&m.node, &control, 15022, &[])?;
    let status = m.proxy.process_mut().wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "old proxy: {status}");
    assert_eq!(m.agent.status()?["proxy_pid"], new.pid());
    let out = loop_output(&mut looping, Duration::from_secs(10))?;
    assert!(out.contains("failures=0"), "{out}");
    assert!(new.metric(A_OUTBOUND_OPENED)? > 0.0, "the new proxy took traffic");
    Ok(())
}
both_modes!(handover_to_a_new_proxy_refuses_nothing);

/// The sequence a rolling update of the proxy causes with no surge: the old
/// proxy gets SIGTERM, drains and exits, and only then does the new one start.
/// The agent keeps the pods' listening sockets open meanwhile, so connections
/// made in the gap queue in their backlog and the new proxy, which accepts on
/// the very same sockets, serves them: none is refused, outbound or inbound.
fn a_proxy_stopped_then_started_again_refuses_nothing(mode: &str) -> anyhow::Result<()> {
    let mut m = Mesh::new(mode, &["--drain-timeout-ms", "1000"])?;
    let mut looping = loop_through_the_proxy(&m, 4000)?;
    m.proxy.process_mut().signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = m.proxy.process_mut().wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "old proxy: {status}");
    let gap = std::time::Instant::now();
    // What a new pod takes to be scheduled and start, at the least; the loop's
    // clients wait up to 5 s for their echo.
    std::thread::sleep(Duration::from_millis(1500));
    let control = m.agent.proxy_socket.clone().expect("proxy socket");
    let new = Proxy::start_shared(&m.node, &control, 15024, &[])?;
    m.agent.wait_proxy_current(new.pid())?;
    let gap = gap.elapsed();
    let out = loop_output(&mut looping, Duration::from_secs(15))?;
    assert!(out.contains("failures=0"), "{mode}: with no proxy for {gap:?}: {out}");
    assert!(new.metric(A_OUTBOUND_OPENED)? > 0.0, "the new proxy took traffic");
    assert!(std::fs::read_to_string(&new.log)?.contains("adopted=4"), "{mode}: the new proxy accepts on the kept sockets");
    Ok(())
}
both_modes!(a_proxy_stopped_then_started_again_refuses_nothing);

/// An ADD that arrives while the shared proxy is restarting waits for the new
/// one. The agent used to wait for it while holding its state lock, which the
/// new proxy needs to be replayed and promoted, so the ADD timed out instead.
#[test]
fn an_add_during_a_proxy_restart_is_taken_by_the_new_proxy() -> anyhow::Result<()> {
    let mut m = Mesh::with_agent_args("ebpf", &["--proxy-wait-ms", "8000"], &[])?;
    let c = m.node.add_pod(PodSpec::new("default", "c"))?;
    m.proxy.process_mut().signal(nix::sys::signal::Signal::SIGKILL)?;
    m.proxy.process_mut().wait_exit(Duration::from_secs(5))?;
    let control = m.agent.proxy_socket.clone().expect("proxy socket");
    let started = std::time::Instant::now();
    let (added, _new) = std::thread::scope(|sc| {
        let add = sc.spawn(|| m.agent.add_pod(&c, &[]));
        let new = Proxy::start_shared(&m.node, &control, 15023, &[]);
        (add.join(), new)
    });
    let rec = added.map_err(|_| anyhow::anyhow!("add panicked"))??.map_err(|e| anyhow::anyhow!("the ADD during the restart: {e}"))?;
    let took = started.elapsed();
    assert_eq!(rec["proxy_ready"], true, "{rec}");
    assert!(took < Duration::from_secs(8), "the ADD waited out its whole deadline ({took:?}) instead of taking the new proxy");
    let out = run_client(&c, &["request", &m.b(8080), "1000"])?;
    assert!(out.starts_with("ok 1000"), "{out}");
    Ok(())
}

#[test]
fn a_restarted_proxy_gets_every_pod_replayed() -> anyhow::Result<()> {
    let mut m = Mesh::new("ebpf", &[])?;
    m.proxy.process_mut().signal(nix::sys::signal::Signal::SIGKILL)?;
    m.proxy.process_mut().wait_exit(Duration::from_secs(5))?;
    let control = m.agent.proxy_socket.clone().expect("proxy socket");
    let again = Proxy::start_shared(&m.node, &control, 15023, &[])?;
    m.agent.wait_proxy_current(again.pid())?;
    let out = run_client(&m.a, &["request", &m.b(8080), "1000"])?;
    assert!(out.starts_with("ok 1000"), "{out}");
    Ok(())
}

#[test]
fn a_pod_is_refused_while_no_proxy_takes_it() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let agent = Agent::start_with_proxy(&node, "ebpf", &["--proxy-wait-ms", "200"])?;
    let a = node.add_pod(PodSpec::new("default", "a"))?;
    let err = agent.add_pod(&a, &[])?.expect_err("no proxy: refused");
    assert_eq!(err.kind, podsteer_agent::api::ErrorKind::NotReady, "{}", err.message);
    assert_eq!(agent.pods()?.as_array().map(Vec::len), Some(0), "nothing half-registered");
    Ok(())
}

#[test]
fn malformed_control_messages_get_an_error_and_change_nothing() -> anyhow::Result<()> {
    use podsteer_proxy::control::wire::{self, FromProxy, PodSpec as Spec, ToProxy};
    let node = Node::new(NodeOptions::default())?;
    let pod = node.add_pod(PodSpec::new("default", "p"))?;
    let sock = node.state_dir().join("fake-agent.sock");
    let listener = node.netns().run(|| podsteer_agent::proxy_link::bind(&sock))??;

    std::thread::scope(|s| -> anyhow::Result<()> {
        let h = s.spawn(|| Proxy::start_shared(&node, &sock, 15024, &[]));
        let conn = podsteer_agent::proxy_link::accept(listener.as_fd())?;
        let hello: FromProxy = wire::decode(&wire::recv_raw(conn.as_fd())?.0)?;
        assert!(matches!(hello, FromProxy::Hello { .. }), "{hello:?}");
        let reply = |c: &std::os::fd::OwnedFd| -> anyhow::Result<FromProxy> { Ok(wire::decode(&wire::recv_raw(c.as_fd())?.0)?) };

        nix::sys::socket::send(std::os::fd::AsRawFd::as_raw_fd(&conn), b"{not json", nix::sys::socket::MsgFlags::empty())?;
        assert!(matches!(reply(&conn)?, FromProxy::Error { .. }));
        nix::sys::socket::send(std::os::fd::AsRawFd::as_raw_fd(&conn), br#"{"type":"reboot"}"#, nix::sys::socket::MsgFlags::empty())?;
        assert!(matches!(reply(&conn)?, FromProxy::Error { .. }));
        let spec = Spec {
            uid: "u1".into(),
            name: "p".into(),
            namespace: "default".into(),
            outbound_port: 15001,
            inbound_port: 15006,
            listeners: vec![],
            sk_msg: true,
            keep_client_address: false,
            cert: None,
            labels: Default::default(),
        };
        wire::send(conn.as_fd(), &ToProxy::AddPod(spec.clone()), &[])?;
        assert!(matches!(reply(&conn)?, FromProxy::Nack { .. }), "AddPod without its netns fd");
        // The pod's outbound port is taken (no SO_REUSEPORT): the proxy must refuse, not half-open.
        let port_in_use = pod.run(|| std::net::TcpListener::bind("127.0.0.1:15001"))??;
        let ns = std::fs::File::open(pod.netns().path())?;
        wire::send(conn.as_fd(), &ToProxy::AddPod(spec.clone()), &[ns.as_fd()])?;
        let r = reply(&conn)?;
        assert!(matches!(r, FromProxy::Nack { .. }), "a taken port must be refused: {r:?}");
        drop(port_in_use);
        // A certificate that is not one, and a mesh view whose bundle is not
        // one: refused with the reason, and nothing opened or replaced.
        let bad_cert = wire::WorkloadCert {
            identity: "spiffe://cluster.local/ns/default/sa/p".into(),
            chain: vec!["bm90IGEgY2VydGlmaWNhdGU=".into()],
            key: "%%%".into(),
            not_after: 0,
        };
        wire::send(conn.as_fd(), &ToProxy::AddPod(Spec { cert: Some(bad_cert), ..spec.clone() }), &[ns.as_fd()])?;
        match reply(&conn)? {
            FromProxy::Nack { error, .. } => assert!(error.contains("base64"), "{error}"),
            other => panic!("a bad certificate must be refused: {other:?}"),
        }
        let view = wire::MeshView { trust_domain: "cluster.local".into(), bundle: vec!["bm9wZQ==".into()], peers: vec![] };
        wire::send(conn.as_fd(), &ToProxy::Mesh(view), &[])?;
        match reply(&conn)? {
            FromProxy::Nack { error, .. } => assert!(error.contains("trust bundle"), "{error}"),
            other => panic!("a bad bundle must be refused: {other:?}"),
        }
        // Nothing of the failed or refused messages remains: a valid AddPod opens listeners from scratch.
        wire::send(conn.as_fd(), &ToProxy::DelPod { uid: "u1".into() }, &[])?;
        let _ = reply(&conn)?;
        wire::send(conn.as_fd(), &ToProxy::AddPod(spec), &[ns.as_fd()])?;
        match reply(&conn)? {
            FromProxy::Ack { listeners, .. } => {
                let ids: Vec<(bool, u16)> = listeners.iter().map(|l| (l.inbound, l.family)).collect();
                assert_eq!(ids, vec![(false, 2), (false, 10), (true, 2), (true, 10)], "every listener comes back, for the agent to keep");
            }
            other => panic!("valid AddPod: {other:?}"),
        }
        let p = h.join().map_err(|_| anyhow::anyhow!("proxy thread"))??;
        assert_eq!(p.metric("podsteer_proxy_pods")?, 1.0);
        Ok(())
    })
}

#[test]
fn established_connections_keep_flowing_while_the_agent_restarts() -> anyhow::Result<()> {
    use std::io::{BufRead as _, Write as _};
    let mut m = Mesh::new("ebpf", &[])?;
    let mut cmd = m.a.command(podsteer_lab::agent::bin("podsteer-lab-tool"))?;
    cmd.args(["chat", &m.b(8080)]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut chat = m.a.spawn("chat", cmd)?;
    let mut stdin = chat.child_mut().stdin.take().expect("piped");
    let mut stdout = std::io::BufReader::new(chat.child_mut().stdout.take().expect("piped"));
    let mut hello = String::new();
    stdout.read_line(&mut hello)?;
    assert!(hello.starts_with("connected"), "{hello}");
    let mut say = |word: &str| -> anyhow::Result<String> {
        writeln!(stdin, "{word}")?;
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        Ok(line)
    };
    let mut first = String::new();
    assert_eq!(say("one")?, "one\n");
    m.agent.kill();
    first.push_str(&say("two while the agent is gone")?);
    m.agent.restart()?;
    first.push_str(&say("three after the restart")?);
    assert_eq!(first, "two while the agent is gone\nthree after the restart\n");
    assert_eq!(
        m.proxy.metric("podsteer_proxy_connections_opened_total{pod=\"default/a\",direction=\"outbound\"}")?,
        1.0,
        "one connection all along"
    );
    Ok(())
}

/// Open file descriptors of a process.
fn fds(pid: i32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// A client that connects straight to a proxy port is not redirected, so its
/// original destination is the proxy's own listener. Relaying that would make
/// the proxy connect to itself, two fds a level, until the node's proxy runs
/// out of fds (seen in iptables mode: 8,000 fds from one connect). The proxy
/// must reset such a client, count it, and hold no more fds than before.
fn a_direct_connect_to_a_proxy_port_is_reset_not_looped(mode: &str) -> anyhow::Result<()> {
    let m = Mesh::new(mode, &[])?;
    let c = m.node.add_pod(PodSpec::new("default", "c"))?;
    let before = fds(m.proxy.pid())?;
    let a4 = m.a.ipv4().expect("v4");
    let cases = [
        (&m.a, "127.0.0.1:15001".to_string(), "outbound"),
        (&m.a, "[::1]:15001".to_string(), "outbound"),
        (&c, addr(a4, 15006), "inbound"),
        (&c, addr(m.a.ipv6().expect("v6"), 15006), "inbound"),
    ];
    for (from, dst, dir) in &cases {
        if mode == "iptables" && *dir == "inbound" {
            // iptables mode drops these before the proxy: not redirected, so no DNAT.
            let out = run_client(from, &["expect-dropped", dst, "1000"])?;
            assert_eq!(out.trim(), "dropped", "{mode} / {dst}");
        } else {
            let out = run_client(from, &["expect-reset", dst, "--quiet"])?;
            assert!(out.starts_with("reset"), "{mode} / {dst}: {out}");
        }
    }
    wait::until("the proxy's fds to settle", Duration::from_secs(10), || (fds(m.proxy.pid()).ok()? <= before).then_some(()))
        .map_err(|e| e.context(format!("{mode}: proxy fds {} now, {before} before", fds(m.proxy.pid()).unwrap_or(0))))?;
    // eBPF mode never has an original destination for these (nothing was
    // redirected); iptables mode has the listener itself, which is refused.
    let own =
        m.proxy.metric("podsteer_proxy_connections_closed_total{pod=\"default/a\",direction=\"outbound\",result=\"own_listener\"}")?
            + m.proxy.metric("podsteer_proxy_connections_closed_total{pod=\"default/a\",direction=\"inbound\",result=\"own_listener\"}")?;
    let missing = m
        .proxy
        .metric("podsteer_proxy_connections_closed_total{pod=\"default/a\",direction=\"outbound\",result=\"no_original_dst\"}")?
        + m.proxy.metric("podsteer_proxy_connections_closed_total{pod=\"default/a\",direction=\"inbound\",result=\"no_original_dst\"}")?;
    let reached = if mode == "iptables" { cases.iter().filter(|c| c.2 == "outbound").count() } else { cases.len() };
    assert_eq!(own + missing, reached as f64, "{mode}: own_listener {own}, no_original_dst {missing}");
    if mode == "iptables" {
        assert_eq!(own, reached as f64, "every direct connect that reaches the proxy is refused as its own listener");
    }
    // The pod's real traffic is untouched.
    let out = run_client(&m.a, &["request", &m.b(8080), "1000"])?;
    assert!(out.starts_with("ok 1000"), "{out}");
    Ok(())
}
both_modes!(a_direct_connect_to_a_proxy_port_is_reset_not_looped);

/// Lines of the proxy's /metrics that carry a pod label starting with `prefix`.
fn series_for(m: &Mesh, prefix: &str) -> anyhow::Result<Vec<String>> {
    let text = m.proxy.get("/metrics")?;
    Ok(text.lines().filter(|l| l.contains(&format!("pod=\"default/{prefix}"))).map(str::to_owned).collect())
}

/// With pods churning, the shared proxy must not keep every pod's metric
/// series for ever: once a pod is removed and its connections have ended, its
/// series go, and the scrape returns to its size before the churn.
fn a_removed_pods_metric_series_are_dropped(mode: &str) -> anyhow::Result<()> {
    const PODS: usize = 60;
    let m = Mesh::new(mode, &[])?;
    // Every series the live pods' traffic makes (b's inbound ones, the connect
    // histogram) exists before the count is taken.
    let out = run_client(&m.a, &["request", &m.b(8080), "100"])?;
    assert!(out.starts_with("ok 100"), "{out}");
    let lines_before = m.proxy.get("/metrics")?.lines().count();
    let (mut pods, mut servers) = (Vec::new(), Vec::new());
    for i in 0..PODS {
        let p = m.node.add_pod(PodSpec::new("default", &format!("churn-{i}")))?;
        m.agent.add_pod(&p, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
        let out = run_client(&p, &["request", &m.b(8080), "100"])?;
        assert!(out.starts_with("ok 100"), "{out}");
        // Some take inbound too, which each connection's authorization counts.
        if i % 10 == 0 {
            servers.push(start_server(&p, None, &["echo", "[::]:8080"])?);
            let out = run_client(&m.a, &["request", &addr(p.ipv4().expect("v4"), 8080), "100"])?;
            assert!(out.starts_with("ok 100"), "{out}");
        }
        pods.push(p);
    }
    let series = series_for(&m, "churn-")?;
    assert!(series.len() >= PODS * 3, "every pod has series while it lives");
    assert!(series.iter().any(|l| l.starts_with("podsteer_proxy_authz_decisions_total")), "inbound was judged: {series:?}");
    drop(servers);
    for p in pods {
        m.agent.call(&podsteer_agent::api::Request::Del { uid: p.uid().into() })?.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    wait::until("the removed pods' series to go", Duration::from_secs(10), || series_for(&m, "churn-").ok().filter(|s| s.is_empty()))
        .map_err(|e| e.context(format!("{mode}: left: {:?}", series_for(&m, "churn-").unwrap_or_default().first())))?;
    let text = m.proxy.get("/metrics")?;
    let foreign: Vec<&str> =
        text.lines().filter(|l| l.contains("pod=\"") && !l.contains("pod=\"default/a\"") && !l.contains("pod=\"default/b\"")).collect();
    assert!(foreign.is_empty(), "{mode}: series of pods that are gone: {foreign:?}");
    // What is left is the live pods' own: the scrape is about its size before
    // the churn (b's inbound series may have gained a result label or two).
    let lines_after = text.lines().count();
    assert!(lines_after < lines_before + 10, "{mode}: {lines_after} lines after the churn, {lines_before} before");
    Ok(())
}
both_modes!(a_removed_pods_metric_series_are_dropped);

/// An app cannot tell it is meshed: a blocking reader with a concurrent writer
/// on the same socket (a blocking JVM client, say) sees every byte and never a
/// spurious EAGAIN, exactly as unmeshed. (With sk_msg on app sockets, opt-in,
/// tcp_bpf's recvmsg returns such EAGAINs; that is why it is off by default.)
fn a_blocking_reader_sees_no_spurious_eagain(mode: &str) -> anyhow::Result<()> {
    let m = Mesh::new(mode, &[])?;
    let unmeshed = m.node.add_pod(PodSpec::new("default", "unmeshed"))?;
    for (who, pod) in [("unmeshed", &unmeshed), ("meshed", &m.a)] {
        let out = run_client(pod, &["blocking-probe", &m.b(8080), "1500"])?;
        let field = |k: &str| out.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse::<u64>().ok());
        assert_eq!(field("eagain="), Some(0), "{mode} / {who}: {out}");
        assert!(field("sent=").is_some_and(|s| s > 0) && field("sent=") == field("received="), "{mode} / {who}: {out}");
        // A blocking recv() woken by the peer's FIN returns end of stream, as TCP says.
        let out = run_client(pod, &["shutdown-probe", &m.b(8080)])?;
        assert_eq!(out.trim(), "woke=eof", "{mode} / {who}");
    }
    Ok(())
}
both_modes!(a_blocking_reader_sees_no_spurious_eagain);

/// /healthz tells the truth: while the state manager is stuck (here the shared
/// proxy is stopped, so an ADD waits for its reply) it fails, and once the
/// state moves again it passes, with the ADD done.
#[test]
fn healthz_fails_while_the_agents_state_is_stuck_and_recovers() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    let mut m = Mesh::new("ebpf", &[])?;
    let healthy = |m: &Mesh| m.agent.admin_get("/healthz").map(|r| r.starts_with("HTTP/1.1 200")).unwrap_or(false);
    assert!(healthy(&m), "{:?}", m.agent.admin_get("/healthz"));
    let c = m.node.add_pod(PodSpec::new("default", "c"))?;
    m.proxy.process_mut().signal(Signal::SIGSTOP)?;
    // Every thread of the proxy stopped, before the ADD is sent.
    let pid = m.proxy.pid();
    wait::until("the proxy to stop", Duration::from_secs(5), || {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
            .all(|st| st.rsplit(')').next().and_then(|r| r.split_whitespace().next()) == Some("T"))
            .then_some(())
    })?;
    let added = std::thread::scope(|sc| -> anyhow::Result<_> {
        let add = sc.spawn(|| m.agent.add_pod(&c, &[]));
        let stuck = wait::until("/healthz to fail while the ADD holds the state", Duration::from_secs(6), || {
            m.agent.admin_get("/healthz").ok().filter(|r| r.starts_with("HTTP/1.1 503"))
        });
        m.proxy.process_mut().signal(Signal::SIGCONT)?;
        let stuck = stuck?;
        assert!(stuck.contains("the state manager has made no progress"), "{stuck}");
        add.join().map_err(|_| anyhow::anyhow!("add panicked"))?
    })?;
    let rec = added.map_err(|e| anyhow::anyhow!("the ADD once the proxy went on: {e}"))?;
    assert_eq!(rec["proxy_ready"], true, "{rec}");
    wait::until("/healthz to pass again", Duration::from_secs(5), || healthy(&m).then_some(()))?;
    Ok(())
}

/// /readyz says what is in place (mode, pinned links, proxy) and fails, naming
/// it, when a piece goes missing: the proxy's connection, then a pinned link.
#[test]
fn readyz_reports_mode_pins_and_proxy_and_names_what_is_missing() -> anyhow::Result<()> {
    let mut m = Mesh::new("ebpf", &[])?;
    let ready = m.agent.admin_get("/readyz")?;
    let want = format!("mode=ebpf cgroup_links=4 pod_links=2 proxy_pid={} pods=2", m.proxy.pid());
    assert!(ready.starts_with("HTTP/1.1 200") && ready.contains(&want), "{ready}");
    m.proxy.process_mut().signal(nix::sys::signal::Signal::SIGKILL)?;
    m.proxy.process_mut().wait_exit(Duration::from_secs(5))?;
    let not = wait::until("/readyz to see the proxy gone", Duration::from_secs(3), || {
        m.agent.admin_get("/readyz").ok().filter(|r| r.starts_with("HTTP/1.1 503"))
    })?;
    assert!(not.contains("no proxy connected"), "{not}");
    let control = m.agent.proxy_socket.clone().expect("proxy socket");
    let again = Proxy::start_shared(&m.node, &control, 15023, &[])?;
    wait::until("/readyz to see the new proxy", Duration::from_secs(5), || {
        m.agent.admin_get("/readyz").ok().filter(|r| r.contains(&format!("proxy_pid={}", again.pid())))
    })?;
    std::fs::remove_file(m.agent.bpffs.join("podsteer/links/podsteer_connect4"))?;
    let not = wait::until("/readyz to see the pin gone", Duration::from_secs(3), || {
        m.agent.admin_get("/readyz").ok().filter(|r| r.starts_with("HTTP/1.1 503"))
    })?;
    assert!(not.contains("link podsteer_connect4 is not pinned"), "{not}");
    Ok(())
}
