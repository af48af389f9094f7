//! An app cannot tell it is meshed, and no meshed pod can push the node's TCP
//! memory into pressure: the same app-level probe unmeshed, meshed through the
//! shared proxy in eBPF and iptables mode, and through a sidecar, all at once.

use std::time::{Duration, Instant};

use podsteer_lab::agent::Agent;
use podsteer_lab::process::LabProcess;
use podsteer_lab::proxy::Proxy;
use podsteer_lab::workload::{addr, run_client, start_server};
use podsteer_lab::{Node, NodeOptions, Pod, PodSpec};

/// The figure: a minute of bulk, so buffers grow to their steady state.
const RUN: Duration = Duration::from_secs(60);
const STREAMS: usize = 4;

/// The kernel's TCP memory in pages (global, whatever netns reads it) and the
/// threshold past which every TCP socket on the node is squeezed.
fn tcp_mem_pages() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    let tcp = text.lines().find(|l| l.starts_with("TCP:")).ok_or_else(|| anyhow::anyhow!("no TCP line in sockstat"))?;
    let mut words = tcp.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return Ok(words.next().ok_or_else(|| anyhow::anyhow!("sockstat: {tcp}"))?.parse()?);
        }
    }
    anyhow::bail!("no mem in {tcp}")
}

fn pressure_pages() -> anyhow::Result<u64> {
    let t = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")?;
    Ok(t.split_whitespace().nth(1).ok_or_else(|| anyhow::anyhow!("tcp_mem: {t}"))?.parse()?)
}

/// One setup: a client pod and an echo server it reaches.
struct Probe {
    name: &'static str,
    client: Pod,
    server: String,
}

fn echo_pod(node: &Node, name: &str, apps: &mut Vec<LabProcess>) -> anyhow::Result<Pod> {
    let p = node.add_pod(PodSpec::new("default", name))?;
    apps.push(start_server(&p, None, &["echo", "[::]:8080"])?);
    Ok(p)
}

fn meshed(agent: &Agent, p: &Pod, annotations: &[(&str, &str)]) -> anyhow::Result<()> {
    agent.add_pod(p, annotations)?.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Four blocking bulk streams each way for a minute, in every setup at once:
/// zero send or receive errors, every byte checked, and the node's TCP memory
/// stays below tcp_mem's pressure threshold throughout (sampled every 100 ms).
/// With sk_msg on app sockets (opt-in), an ingress redirect is not bounded by
/// the receiver's buffer, and this is where it used to reach 1.5 GiB.
#[test]
fn a_minute_of_bulk_everywhere_at_once_stays_below_tcp_memory_pressure() -> anyhow::Result<()> {
    let mut apps = Vec::new();
    let ebpf = Node::new(NodeOptions::default())?;
    let agent = Agent::start_with_proxy(&ebpf, "ebpf", &[])?;
    let _proxy = Proxy::start_shared(&ebpf, agent.proxy_socket.as_ref().expect("proxy socket"), 15020, &[])?;
    let server = echo_pod(&ebpf, "server", &mut apps)?;
    meshed(&agent, &server, &[])?;
    let dst = addr(server.ipv4().expect("v4"), 8080);
    let client = ebpf.add_pod(PodSpec::new("default", "client"))?;
    meshed(&agent, &client, &[])?;
    let side = ebpf.add_pod(PodSpec::new("default", "side"))?;
    meshed(&agent, &side, &[("podsteer.io/proxy-mode", "sidecar")])?;
    let sock = agent.socket.display().to_string();
    let _sidecar = Proxy::start_sidecar(&ebpf, &side, 15031, &["--agent-socket", &sock, "--pod-uid", side.uid()])?;
    let plain = ebpf.add_pod(PodSpec::new("default", "plain"))?;
    let plain_server = echo_pod(&ebpf, "plain-server", &mut apps)?;

    let ipt = Node::new(NodeOptions::default())?;
    let ipt_agent = Agent::start_with_proxy(&ipt, "iptables", &[])?;
    let _ipt_proxy = Proxy::start_shared(&ipt, ipt_agent.proxy_socket.as_ref().expect("proxy socket"), 15020, &[])?;
    let ipt_server = echo_pod(&ipt, "server", &mut apps)?;
    let ipt_client = ipt.add_pod(PodSpec::new("default", "client"))?;
    for p in [&ipt_server, &ipt_client] {
        meshed(&ipt_agent, p, &[])?;
    }

    let probes = [
        Probe { name: "unmeshed", client: plain, server: addr(plain_server.ipv4().expect("v4"), 8080) },
        Probe { name: "ebpf, shared proxy, full mesh", client, server: dst.clone() },
        Probe { name: "ebpf, sidecar to a shared-proxy pod", client: side, server: dst },
        Probe { name: "iptables, shared proxy, full mesh", client: ipt_client, server: addr(ipt_server.ipv4().expect("v4"), 8080) },
    ];
    let pressure = pressure_pages()?;
    let (peak, outcomes) = std::thread::scope(|sc| -> anyhow::Result<_> {
        let runs: Vec<_> = probes
            .iter()
            .map(|p| sc.spawn(move || run_client(&p.client, &["bulk-for", &p.server, &STREAMS.to_string(), &RUN.as_millis().to_string()])))
            .collect();
        let mut peak = 0;
        let end = Instant::now() + RUN + Duration::from_secs(30);
        while runs.iter().any(|r| !r.is_finished()) && Instant::now() < end {
            peak = peak.max(tcp_mem_pages()?);
            std::thread::sleep(Duration::from_millis(100));
        }
        let outcomes: Vec<_> = runs.into_iter().map(|r| r.join().map_err(|_| anyhow::anyhow!("probe panicked"))).collect();
        Ok((peak, outcomes))
    })?;
    for (p, out) in probes.iter().zip(outcomes) {
        let out = out?.map_err(|e| e.context(p.name))?;
        assert!(out.starts_with(&format!("ok streams={STREAMS} bytes=")), "{}: {out}", p.name);
        let bytes: u64 = out.rsplit('=').next().unwrap_or("0").trim().parse()?;
        assert!(bytes > 0, "{}: {out}", p.name);
        eprintln!("{}: {out}", p.name);
    }
    eprintln!("TCP memory peaked at {peak} pages; pressure starts at {pressure}");
    assert!(peak < pressure, "TCP memory reached {peak} pages, past tcp_mem's pressure threshold {pressure}");
    Ok(())
}

/// The app sees its client: through the shared proxy, in both modes and both
/// families, an inbound connection reaches the app from the client's own
/// address (the proxy connects from it, and the pod's return path brings the
/// app's answers back), exactly as it does unmeshed.
fn the_app_sees_its_clients_address(mode: &str) -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let agent = Agent::start_with_proxy(&node, mode, &[])?;
    let _proxy = Proxy::start_shared(&node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?;
    let client = node.add_pod(PodSpec::new("default", "client"))?;
    let server = node.add_pod(PodSpec::new("default", "server"))?;
    let _app = start_server(&server, None, &["whoami", "[::]:8082", "server"])?;
    let unmeshed: Vec<String> = [server.ipv4(), server.ipv6()]
        .into_iter()
        .flatten()
        .map(|ip| run_client(&client, &["hello", &addr(ip, 8082)]))
        .collect::<anyhow::Result<_>>()?;
    for p in [&client, &server] {
        let rec = agent.add_pod(p, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(rec["keeps_client_address"], true, "{mode}: {rec}");
    }
    let peer_ip = |line: &str| -> Option<std::net::IpAddr> {
        let peer: std::net::SocketAddr = line.split_whitespace().find_map(|w| w.strip_prefix("peer="))?.parse().ok()?;
        Some(peer.ip().to_canonical())
    };
    for (ip, before) in [client.ipv4(), client.ipv6()].into_iter().flatten().zip(&unmeshed) {
        let dst = if ip.is_ipv4() { server.ipv4() } else { server.ipv6() }.expect("server address");
        let line = run_client(&client, &["hello", &addr(dst, 8082)])
            .map_err(|e| e.context(std::fs::read_to_string(&_proxy.log).unwrap_or_default()))?;
        assert_eq!(peer_ip(before), Some(ip), "{mode}: unmeshed, the server sees the client: {before}");
        assert_eq!(peer_ip(&line), Some(ip), "{mode}: meshed, the server sees the client too: {line}");
    }
    Ok(())
}
podsteer_lab::both_modes!(the_app_sees_its_clients_address);
