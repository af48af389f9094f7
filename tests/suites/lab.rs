//! The lab itself: pods get addresses from the real plugins, reach each other
//! and the node, and nothing of a lab survives its drop.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use podsteer_lab::cni::Attachment;
use podsteer_lab::{Node, NodeOptions, PodSpec};
use serde_json::json;

const TOOL: &str = env!("CARGO_BIN_EXE_podsteer-lab-tool");
const DEADLINE: Duration = Duration::from_secs(5);

/// Sends `msg` to `addr` from inside `ns` and returns what came back.
fn echo_round_trip(ns: &podsteer_lab::netns::NetNs, addr: SocketAddr, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut conn = ns.run(|| TcpStream::connect_timeout(&addr, DEADLINE))??;
    conn.set_read_timeout(Some(DEADLINE))?;
    conn.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back)?;
    Ok(back)
}

/// Serves one echo connection on a listener made inside `ns`.
fn echo_once(ns: &podsteer_lab::netns::NetNs, bind: SocketAddr) -> anyhow::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let listener = ns.run(|| TcpListener::bind(bind))??;
    let addr = listener.local_addr()?;
    let h = std::thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    Ok((addr, h))
}

fn in_subnet(ip: IpAddr, prefix: &str) -> bool {
    ip.to_string().starts_with(prefix)
}

#[test]
fn pods_get_addresses_from_host_local_and_talk_over_tcp() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let a = node.add_pod(PodSpec::new("default", "client"))?;
    let b = node.add_pod(PodSpec::new("default", "server"))?;
    let (a4, b4) = (a.ipv4().expect("a has IPv4"), b.ipv4().expect("b has IPv4"));
    assert!(in_subnet(a4, "10.244.0.") && in_subnet(b4, "10.244.0."), "{a4} {b4}");
    assert_ne!(a4, b4);
    assert!(a.ipv6().is_some_and(|ip| in_subnet(ip, "fd00:10:244:")));

    // The server is a real pod process: in b's netns and b's cgroup.
    let mut cmd = b.command(TOOL)?;
    cmd.args(["echo", "0.0.0.0:8080"]).stdout(Stdio::piped());
    let mut server = b.spawn("echo", cmd)?;
    let mut line = String::new();
    BufReader::new(server.child_mut().stdout.take().expect("piped")).read_line(&mut line)?;
    assert!(line.starts_with("listening"), "{line}");
    assert_eq!(podsteer_lab::cgroup::read_procs(b.cgroup()), vec![server.pid()]);

    let mut cmd = a.command(TOOL)?;
    cmd.args(["request", &format!("{b4}:8080"), "100000"]);
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with(&format!("ok 100000 local={a4}:")), "{stdout}");
    Ok(())
}

#[test]
fn pods_talk_over_ipv6() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let a = node.add_pod(PodSpec::new("default", "v6-client"))?;
    let b = node.add_pod(PodSpec::new("default", "v6-server"))?;
    let b6 = b.ipv6().expect("b has IPv6");
    let (addr, h) = echo_once(b.netns(), SocketAddr::new(b6, 0))?;
    assert_eq!(echo_round_trip(a.netns(), addr, b"over v6")?, b"over v6");
    h.join().expect("echo thread");
    Ok(())
}

#[test]
fn pod_reaches_the_node_through_its_gateway() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let pod = node.add_pod(PodSpec::new("default", "to-node"))?;
    let gw = node.gateway_ips()[0];
    let (addr, h) = echo_once(node.netns(), SocketAddr::new(gw, 0))?;
    assert_eq!(echo_round_trip(pod.netns(), addr, b"hello node")?, b"hello node");
    h.join().expect("echo thread");
    // The route the bridge plugin installed points at that same gateway.
    let routes = &pod.cni_result()["routes"];
    assert!(routes.as_array().is_some_and(|r| r.iter().any(|r| r["dst"] == "0.0.0.0/0")), "{routes}");
    Ok(())
}

#[test]
fn dropping_the_lab_leaves_nothing() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let pod = node.add_pod(PodSpec::new("default", "ephemeral"))?;
    let mut cmd = pod.command(TOOL)?;
    cmd.args(["echo", "127.0.0.1:9"]).stdout(Stdio::null());
    let child = pod.spawn("echo", cmd)?;
    let pid = child.pid();
    let leftovers: Vec<PathBuf> = vec![
        pod.netns().path().to_owned(),
        node.netns().path().to_owned(),
        pod.cgroup().to_owned(),
        node.lab_cgroup().to_owned(),
        node.state_dir().to_owned(),
    ];
    assert!(leftovers.iter().all(|p| p.exists()));
    let id = node.id().clone();
    drop(child);
    drop(pod);
    drop(node);
    for p in &leftovers {
        assert!(!p.exists(), "{} survived the lab", p.display());
    }
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pod process {pid} survived");
    let netns: Vec<String> = std::fs::read_dir("/run/netns")?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with(id.as_str()))
        .collect();
    assert!(netns.is_empty(), "{netns:?}");
    Ok(())
}

#[test]
fn failed_add_is_rolled_back_like_a_runtime_does() -> anyhow::Result<()> {
    let opts = NodeOptions { chained_plugins: vec![json!({"type": "no-such-plugin"})], ..Default::default() };
    let node = Node::new(opts)?;
    let err = node.add_pod(PodSpec::new("default", "doomed")).err().expect("ADD must fail");
    assert!(format!("{err:#}").contains("no-such-plugin"), "{err:#}");
    let netns = node.id().netns_name("doomed");
    assert!(!Path::new("/run/netns").join(&netns).exists());
    let pods: Vec<_> = std::fs::read_dir(node.pods_cgroup())?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir() && e.path() != node.proxy_cgroup())
        .collect();
    assert!(pods.is_empty(), "{pods:?}");
    // DEL after the failed ADD released the addresses host-local had handed out.
    let ipam = node.state_dir().join("ipam").join("podsteer-lab");
    let held: Vec<String> = std::fs::read_dir(&ipam)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    assert!(held.is_empty(), "addresses still allocated: {held:?}");
    Ok(())
}

#[test]
fn plugin_config_carries_name_version_prev_result_and_declared_capabilities() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let rt = node.runtime();
    let mut att = Attachment { container_id: "c1".into(), netns: "/run/netns/x".into(), ifname: "eth0".into(), ..Default::default() };
    att.runtime_config.insert("portMappings".into(), json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]));
    att.runtime_config.insert("bandwidth".into(), json!({"ingressRate": 1}));
    let plugins = rt.conflist()["plugins"].as_array().expect("plugins").clone();
    let prev = json!({"cniVersion": "1.0.0", "ips": []});

    let bridge = rt.plugin_config(&plugins[0], &att, None);
    assert_eq!(bridge["name"], "podsteer-lab");
    assert_eq!(bridge["cniVersion"], "1.0.0");
    assert!(bridge.get("prevResult").is_none() && bridge.get("runtimeConfig").is_none(), "{bridge}");

    let portmap = rt.plugin_config(&plugins[1], &att, Some(&prev));
    assert_eq!(portmap["prevResult"], prev);
    assert_eq!(portmap["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
    assert!(portmap["runtimeConfig"].get("bandwidth").is_none(), "undeclared capability leaked: {portmap}");
    Ok(())
}

#[test]
fn del_uses_the_cached_result_and_a_second_del_without_netns_succeeds() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let pod = node.add_pod(PodSpec::new("default", "twice"))?;
    let att = pod.attachment().clone();
    assert_eq!(node.runtime().cached_result(&att).as_ref(), Some(pod.cni_result()));
    node.runtime().del(&att)?;
    assert!(node.runtime().cached_result(&att).is_none());
    // containerd's second DEL: no netns, no cache.
    node.runtime().del(&Attachment { netns: String::new(), ..att })?;
    Ok(())
}

/// Two nodes, each with its own bridge and pod CIDR, joined by an underlay:
/// pods reach each other across it by their own addresses (no NAT), both
/// families, and the bytes cross the switch.
#[test]
fn pods_on_two_nodes_talk_across_the_underlay_by_their_own_addresses() -> anyhow::Result<()> {
    use podsteer_lab::cluster::Cluster;
    let cluster = Cluster::new(2, NodeOptions::default())?;
    let a = cluster.nodes[0].add_pod(PodSpec::new("default", "a"))?;
    let b = cluster.nodes[1].add_pod(PodSpec::new("default", "b"))?;
    let (a4, b4) = (a.ipv4().expect("v4"), b.ipv4().expect("v4"));
    assert!(in_subnet(a4, "10.244.0.") && in_subnet(b4, "10.244.1."), "each node has its own pod CIDR: {a4} {b4}");
    assert!(b.ipv6().is_some_and(|ip| in_subnet(ip, "fd00:10:244:1:")), "{:?}", b.ipv6());
    let port = Cluster::switch_port(0);
    let before = cluster.switch().if_counters(&port)?;
    for ip in [b4, b.ipv6().expect("v6")] {
        // The server sees the client pod's own address: host-gw routing, no masquerade.
        let listener = b.run(|| TcpListener::bind(SocketAddr::new(ip, 0)))??;
        let addr = listener.local_addr()?;
        let server = std::thread::spawn(move || -> std::io::Result<(SocketAddr, Vec<u8>)> {
            let (mut c, peer) = listener.accept()?;
            let mut buf = vec![0u8; 6];
            c.read_exact(&mut buf)?;
            c.write_all(&buf)?;
            Ok((peer, buf))
        });
        let back = echo_round_trip(a.netns(), addr, b"across")?;
        assert_eq!(back, b"across");
        let (peer, _) = server.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
        let own = if ip.is_ipv4() { a4 } else { a.ipv6().expect("v6") };
        assert_eq!(peer.ip(), own, "the server sees the client pod's address");
    }
    let after = cluster.switch().if_counters(&port)?;
    assert!(after.rx_packets >= before.rx_packets + 6, "the connections crossed node 0's underlay port: {before:?} {after:?}");
    Ok(())
}
