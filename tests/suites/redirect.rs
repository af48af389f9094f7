//! Interception, in both modes, against the real kernel: where connections land,
//! what is left alone, restart, clean removal and bad input.

use std::net::IpAddr;

use podsteer_agent::api::ErrorKind;
use podsteer_agent::ebpf::maps::Maps;
use podsteer_lab::agent::Agent;
use podsteer_lab::process::LabProcess;
use podsteer_lab::workload::{addr, run_client, start_server};
use podsteer_lab::{Node, NodeOptions, Pod, PodSpec, both_modes, wait};

/// A node with an agent, a meshed client pod `a` with its proxy's outbound
/// listener, and an unmeshed server pod `b` that names itself.
struct Scene {
    _procs: Vec<LabProcess>,
    a: Pod,
    b: Pod,
    agent: Agent,
    node: Node,
}

impl Scene {
    fn new(mode: &str, annotations: &[(&str, &str)]) -> anyhow::Result<Scene> {
        let owned: Vec<(String, String)> = annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Scene::with(mode, |_| owned)
    }

    /// Like `new`, with annotations for `a` computed from pod `b` (its address, say).
    fn with(mode: &str, annotations: impl FnOnce(&Pod) -> Vec<(String, String)>) -> anyhow::Result<Scene> {
        let node = Node::new(NodeOptions::default())?;
        let agent = Agent::start(&node, mode, &[])?;
        let a = node.add_pod(PodSpec::new("default", "a"))?;
        let b = node.add_pod(PodSpec::new("default", "b"))?;
        let ann = annotations(&b);
        let ann: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        agent.add_pod(&a, &ann)?.map_err(|e| anyhow::anyhow!("{e}"))?;
        let procs = vec![
            start_server(&b, None, &["whoami", "[::]:8080", "b"])?,
            start_server(&a, Some(node.proxy_cgroup()), &["whoami", "127.0.0.1:15001", "proxy"])?,
            start_server(&a, Some(node.proxy_cgroup()), &["whoami", "[::1]:15001", "proxy"])?,
        ];
        Ok(Scene { _procs: procs, a, b, agent, node })
    }

    fn b4(&self) -> IpAddr {
        self.b.ipv4().expect("b has IPv4")
    }

    fn b6(&self) -> IpAddr {
        self.b.ipv6().expect("b has IPv6")
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or("")
}

fn outbound_lands_on_the_proxy_with_the_original_destination(mode: &str) -> anyhow::Result<()> {
    let s = Scene::new(mode, &[])?;
    for dst in [addr(s.b4(), 8080), addr(s.b6(), 8080)] {
        let line = run_client(&s.a, &["hello", &dst])?;
        assert_eq!(field(&line, "server="), "proxy", "{mode} {dst}: {line}");
        assert_eq!(field(&line, "orig="), dst, "{mode}: {line}");
    }
    if mode == "ebpf" {
        let save = podsteer_agent::iptables::Backend::Nft.save(s.a.netns().fd(), podsteer_agent::iptables::Family::V4)?;
        assert!(!save.contains("PODSTEER"), "eBPF mode must not add iptables rules: {save}");
    }
    Ok(())
}
both_modes!(outbound_lands_on_the_proxy_with_the_original_destination);

/// A client in an unmeshed pod reaches meshed pod a's address; the connection
/// must land on a's inbound listener with the original destination intact.
fn inbound_case(mode: &str, v6: bool) -> anyhow::Result<()> {
    let s = Scene::new(mode, &[])?;
    let c = s.node.add_pod(PodSpec::new("default", "c"))?;
    let uid = s.a.uid().to_string();
    let sock = s.agent.socket.display().to_string();
    let bind = if v6 { "[::]:15006" } else { "0.0.0.0:15006" };
    let mut args = vec!["whoami", bind, "inbound"];
    if mode == "ebpf" {
        args.extend(["--register", &sock, &uid]);
    }
    let _inbound = start_server(&s.a, Some(s.node.proxy_cgroup()), &args)?;
    let _app = start_server(&s.a, None, &["whoami", if v6 { "[::]:8080" } else { "0.0.0.0:8080" }, "app"])?;
    let ip = if v6 { s.a.ipv6() } else { s.a.ipv4() };
    let dst = addr(ip.expect("pod address"), 8080);
    let line = run_client(&c, &["hello", &dst])?;
    assert_eq!(field(&line, "server="), "inbound", "{mode}: {line}");
    assert!(field(&line, "orig=").ends_with(&dst), "{mode}: {line}");
    // The pod reaching its own address is not inbound traffic.
    let own = run_client(&s.a, &["hello", &dst])?;
    assert_eq!(field(&own, "server="), "app", "{mode}: {own}");
    Ok(())
}

fn inbound_lands_on_the_inbound_listener(mode: &str) -> anyhow::Result<()> {
    inbound_case(mode, false)
}
both_modes!(inbound_lands_on_the_inbound_listener);

fn ipv6_inbound_lands_on_the_inbound_listener(mode: &str) -> anyhow::Result<()> {
    inbound_case(mode, true)
}
both_modes!(ipv6_inbound_lands_on_the_inbound_listener);

/// Each case: annotations for pod a, extra client flags, and where to connect.
fn not_intercepted(mode: &str) -> anyhow::Result<()> {
    type Annotate = fn(&Pod) -> Vec<(String, String)>;
    struct Case {
        name: &'static str,
        annotations: Annotate,
        flags: Vec<&'static str>,
    }
    let cases = [
        Case { name: "excluded port", annotations: |_| vec![("podsteer.io/exclude-outbound-ports".into(), "8080".into())], flags: vec![] },
        Case {
            name: "excluded CIDR",
            annotations: |b| {
                let cidrs = format!("{}/32,{}/128", b.ipv4().expect("v4"), b.ipv6().expect("v6"));
                vec![("podsteer.io/exclude-outbound-cidrs".into(), cidrs)]
            },
            flags: vec![],
        },
        Case { name: "proxy mark", annotations: |_| vec![], flags: vec!["--mark", "0x539"] },
        Case {
            name: "proxy UID (sidecar)",
            annotations: |_| vec![("podsteer.io/proxy-mode".into(), "sidecar".into())],
            flags: vec!["--uid", "1337"],
        },
    ];
    for case in cases {
        let s = Scene::with(mode, case.annotations)?;
        // Every case over IPv4 and IPv6. The control goes to the node's gateway
        // address, which no case exempts: the same pod is intercepted there.
        let gw = s.node.gateway_ips();
        for (ip, family, control) in [(s.b4(), "IPv4", gw[0]), (s.b6(), "IPv6", gw[1])] {
            let dst = addr(ip, 8080);
            let mut args = vec!["hello", dst.as_str()];
            args.extend(&case.flags);
            let line = run_client(&s.a, &args)?;
            assert_eq!(field(&line, "server="), "b", "{mode} / {} / {family}: {line}", case.name);
            let line = run_client(&s.a, &["hello", &addr(control, 9999)])?;
            assert_eq!(field(&line, "server="), "proxy", "{mode} / {} / {family} control: {line}", case.name);
        }
    }

    let s = Scene::new(mode, &[])?;
    let unmeshed = s.node.add_pod(PodSpec::new("default", "unmeshed"))?;
    let _local = start_server(&s.a, None, &["whoami", "127.0.0.1:7777", "local"])?;
    let _local6 = start_server(&s.a, None, &["whoami", "[::1]:7777", "local"])?;
    for (ip, lo) in [(s.b4(), "127.0.0.1:7777"), (s.b6(), "[::1]:7777")] {
        let line = run_client(&unmeshed, &["hello", &addr(ip, 8080)])?;
        assert_eq!(field(&line, "server="), "b", "{mode} / unmeshed pod: {line}");
        let line = run_client(&s.a, &["hello", lo])?;
        assert_eq!(field(&line, "server="), "local", "{mode} / loopback {lo}: {line}");
    }
    Ok(())
}
both_modes!(not_intercepted);

fn two_pods_with_the_same_local_tuple_are_kept_apart(mode: &str) -> anyhow::Result<()> {
    let s = Scene::new(mode, &[])?;
    let a2 = s.node.add_pod(PodSpec::new("default", "a2"))?;
    s.agent.add_pod(&a2, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let _p2 = start_server(&a2, Some(s.node.proxy_cgroup()), &["whoami", "127.0.0.1:15001", "proxy2"])?;
    let (d1, d2) = (addr(s.b4(), 8080), addr(s.b4(), 9090));
    let (r1, r2) = std::thread::scope(|sc| {
        let h1 = sc.spawn(|| run_client(&s.a, &["hello", &d1, "--bind-port", "40000"]));
        let h2 = sc.spawn(|| run_client(&a2, &["hello", &d2, "--bind-port", "40000"]));
        (h1.join(), h2.join())
    });
    let (l1, l2) = (r1.expect("thread")?, r2.expect("thread")?);
    assert_eq!((field(&l1, "server="), field(&l1, "orig=")), ("proxy", d1.as_str()), "{mode}: {l1}");
    assert_eq!((field(&l2, "server="), field(&l2, "orig=")), ("proxy2", d2.as_str()), "{mode}: {l2}");
    assert!(field(&l1, "peer=").ends_with(":40000") && field(&l2, "peer=").ends_with(":40000"), "{l1} {l2}");
    if mode == "ebpf" {
        // After connect4's rewrite both apps are 127.0.0.1:40000 -> 127.0.0.1:15001 in their own netns.
        assert_eq!(field(&l1, "peer="), "127.0.0.1:40000");
        assert_eq!(field(&l2, "peer="), "127.0.0.1:40000");
    }
    Ok(())
}
both_modes!(two_pods_with_the_same_local_tuple_are_kept_apart);

fn removal_leaves_nothing(mode: &str) -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let mut agent = Agent::start(&node, mode, &[])?;
    let a = node.add_pod(PodSpec::new("default", "a"))?;
    let backend = podsteer_agent::iptables::Backend::Nft;
    let fam = [podsteer_agent::iptables::Family::V4, podsteer_agent::iptables::Family::V6];
    let before: Vec<String> = fam.iter().map(|f| backend.save(a.netns().fd(), *f)).collect::<Result<_, _>>()?;
    let rec = agent.add_pod(&a, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let cookie = rec["netns_cookie"].as_u64().expect("cookie");
    agent.call(&podsteer_agent::api::Request::Del { uid: a.uid().into() })?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let after: Vec<String> = fam.iter().map(|f| backend.save(a.netns().fd(), *f)).collect::<Result<_, _>>()?;
    let strip =
        |v: &[String]| v.iter().map(|s| s.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")).collect::<Vec<_>>();
    assert_eq!(strip(&before), strip(&after), "{mode}: iptables-save differs after removal");
    if mode == "ebpf" {
        let maps = Maps::open_pinned(&agent.bpffs)?;
        assert!(maps.pods.get(&cookie, 0).is_err(), "PODS still has the pod");
        assert_eq!(maps.pod_by_ip.keys().count(), 0);
        let pins = podsteer_agent::ebpf::pins::PinDir::new(&agent.bpffs);
        assert!(!pins.pod_link(cookie).exists());
        drop(maps);
        agent.kill();
        let out = node
            .command(podsteer_lab::agent::bin("podsteer-agent"))?
            .args(["--bpffs", &agent.bpffs.display().to_string(), "remove-pins"])
            .output()?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!pins.root().exists(), "pins survived remove-pins");
        // With the links gone, the pod's traffic is no longer touched even if re-registered nowhere.
    }
    Ok(())
}
both_modes!(removal_leaves_nothing);

/// A named bad ADD: its annotations, a netns path to use instead of the pod's, and the error it must get.
type BadAdd<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<std::path::PathBuf>, ErrorKind);

fn bad_input_is_refused_and_changes_nothing(mode: &str) -> anyhow::Result<()> {
    let s = Scene::new(mode, &[])?;
    let victim = s.node.add_pod(PodSpec::new("default", "victim"))?;
    let pods_before = s.agent.pods()?;
    let save_before = podsteer_agent::iptables::Backend::Nft.save(victim.netns().fd(), podsteer_agent::iptables::Family::V4)?;
    let cases: Vec<BadAdd> = vec![
        ("port 0", vec![("podsteer.io/exclude-outbound-ports", "0")], None, ErrorKind::InvalidPolicy),
        ("overlapping CIDRs", vec![("podsteer.io/exclude-outbound-cidrs", "10.0.0.0/8,10.2.0.0/16")], None, ErrorKind::InvalidPolicy),
        ("unknown netns", vec![], Some("/run/netns/podsteer-no-such-netns".into()), ErrorKind::BadNetns),
        ("not a netns", vec![], Some("/proc/self/status".into()), ErrorKind::BadNetns),
    ];
    for (name, ann, netns, want) in cases {
        let mut info = podsteer_lab::agent::pod_info(&victim, &ann);
        if let Some(n) = netns {
            info.netns = n;
        }
        let got = s.agent.call(&podsteer_agent::api::Request::Add { pod: info })?;
        let err = got.err().unwrap_or_else(|| panic!("{mode} / {name}: accepted"));
        assert_eq!(err.kind, want, "{mode} / {name}: {}", err.message);
        assert!(!err.message.is_empty());
    }
    assert_eq!(s.agent.pods()?, pods_before, "{mode}: registry changed");
    let save_after = podsteer_agent::iptables::Backend::Nft.save(victim.netns().fd(), podsteer_agent::iptables::Family::V4)?;
    assert_eq!(save_before.lines().filter(|l| l.starts_with('-')).count(), save_after.lines().filter(|l| l.starts_with('-')).count());
    // The victim is still unmeshed, and the meshed pod still works.
    let line = run_client(&victim, &["hello", &addr(s.b4(), 8080)])?;
    assert_eq!(field(&line, "server="), "b", "{mode}: {line}");
    let line = run_client(&s.a, &["hello", &addr(s.b4(), 8080)])?;
    assert_eq!(field(&line, "server="), "proxy", "{mode}: {line}");
    Ok(())
}
both_modes!(bad_input_is_refused_and_changes_nothing);

#[test]
fn agent_restart_keeps_interception_and_adopts_pins() -> anyhow::Result<()> {
    let mut s = Scene::new("ebpf", &[])?;
    assert_eq!(s.agent.status()?["pins_origin"], "attached");
    assert!(!s.agent.log_text().contains("not forwarded"), "the programs' log ring must be forwarded: {}", s.agent.log_text());
    let dst = addr(s.b4(), 8080);
    s.agent.kill();
    let line = run_client(&s.a, &["hello", &dst])?;
    assert_eq!(field(&line, "server="), "proxy", "while the agent is down: {line}");
    s.agent.restart()?;
    assert_eq!(s.agent.status()?["pins_origin"], "adopted");
    assert_eq!(s.agent.pods()?.as_array().map(Vec::len), Some(1), "the restarted agent knows the pod");
    let line = run_client(&s.a, &["hello", &dst])?;
    assert_eq!(field(&line, "server="), "proxy", "after restart: {line}");
    assert_eq!(field(&line, "orig="), dst);
    Ok(())
}

/// An ADD is answered only once its pod is in the saved registry: a registry
/// written behind the answer let an agent killed just after it find the pod's
/// map entries unexplained at start and remove them, unmeshing a running pod.
#[test]
fn an_answered_add_is_already_saved_for_the_next_agent() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let agent = Agent::start(&node, "ebpf", &[])?;
    let saved = agent.state_dir.join("pods.json");
    for i in 0..10 {
        let pod = node.add_pod(PodSpec::new("default", &format!("p{i}")))?;
        agent.add_pod(&pod, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
        let on_disk: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved)?)?;
        assert!(on_disk.get(pod.uid()).is_some(), "pod {i} was answered before it was saved");
    }
    Ok(())
}

#[test]
fn forced_ebpf_on_a_kernel_without_a_feature_fails_naming_it() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let err = Agent::start_expect_failure(&node, "ebpf", &["--mask-feature", "prog:sk_lookup"])?;
    assert!(err.contains("kernel lacks: prog:sk_lookup"), "{err}");
    Ok(())
}

#[test]
fn auto_mode_falls_back_to_iptables_and_says_why() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let agent = Agent::start(&node, "auto", &["--mask-feature", "helper:sk_assign(sk_lookup)"])?;
    let st = agent.status()?;
    assert_eq!(st["mode"], "iptables");
    assert!(st["reason"].as_str().unwrap_or("").contains("helper:sk_assign(sk_lookup)"), "{st}");
    let full = Agent::start(&Node::new(NodeOptions::default())?, "auto", &[])?;
    assert_eq!(full.status()?["mode"], "ebpf", "this kernel has every feature");
    Ok(())
}

/// Sends `bytes` through pod a's echo "proxy" and returns how many packets a's
/// loopback carried meanwhile.
fn loopback_packets_for_transfer(sk_msg: &str, bytes: &str, connections: usize) -> anyhow::Result<(u64, Maps)> {
    let node = Node::new(NodeOptions::default())?;
    let agent = Agent::start(&node, "ebpf", &[])?;
    let a = node.add_pod(PodSpec::new("default", "a"))?;
    agent.add_pod(&a, &[("podsteer.io/sk-msg", sk_msg)])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let _echo = start_server(&a, Some(node.proxy_cgroup()), &["echo", "127.0.0.1:15001"])?;
    let before = a.netns().if_counters("lo")?;
    for _ in 0..connections {
        // Any destination: the connect is redirected to the echo proxy, which checks every byte.
        let out = run_client(&a, &["request", "10.99.0.1:80", bytes])?;
        assert!(out.starts_with(&format!("ok {bytes}")), "{out}");
    }
    let after = a.netns().if_counters("lo")?;
    Ok((after.tx_packets - before.tx_packets, Maps::open_pinned(&agent.bpffs)?))
}

#[test]
fn sk_msg_splices_app_and_proxy_past_the_tcp_stack() -> anyhow::Result<()> {
    let (on, maps_on) = loopback_packets_for_transfer("true", "4000000", 1)?;
    let (off, maps_off) = loopback_packets_for_transfer("false", "4000000", 1)?;
    let redirects = |m: &Maps| -> anyhow::Result<u64> {
        Ok(m.counters()?.into_iter().find(|(c, _)| *c == podsteer_common::Counter::SkMsgRedirects).map_or(0, |(_, v)| v))
    };
    assert!(redirects(&maps_on)? > 0, "sk_msg on: no redirect counted");
    assert_eq!(redirects(&maps_off)?, 0, "sk_msg off: redirects counted");
    // Handshake and teardown still cross loopback; 8 MB of data must not.
    eprintln!("loopback packets for 8 MB: sk_msg on {on}, off {off}");
    assert!(on * 10 < off, "loopback packets with sk_msg {on}, without {off}");
    Ok(())
}

#[test]
fn sk_msg_never_reorders_a_first_message_sent_before_the_peer_was_enrolled() -> anyhow::Result<()> {
    // Each connection writes the moment connect() returns, racing the peer's
    // enrolment; `request` checks every byte comes back in order.
    let (_, maps) = loopback_packets_for_transfer("true", "70000", 100)?;
    let counters: std::collections::BTreeMap<&str, u64> = maps.counters()?.into_iter().map(|(c, v)| (c.name(), v)).collect();
    eprintln!("counters after 100 racing connections: {counters:?}");
    assert!(counters["sk_msg_redirects"] + counters["sk_msg_fallbacks"] > 0, "{counters:?}");
    Ok(())
}

/// What SO_ORIGINAL_DST answers is keyed by the whole connection (app socket
/// and the proxy listener it reached, in its netns), lives exactly as long as
/// the app's socket, and the state from connect() to establishment is socket
/// storage: held connections each have their entry, and closing them leaves
/// none behind (no LRU that could evict a live one, nothing to leak).
#[test]
fn the_original_destination_lives_exactly_as_long_as_the_connection() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    let agent = Agent::start(&node, "ebpf", &[])?;
    let a = node.add_pod(PodSpec::new("default", "a"))?;
    let rec = agent.add_pod(&a, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let cookie = rec["netns_cookie"].as_u64().ok_or_else(|| anyhow::anyhow!("no cookie in {rec}"))?;
    let _echo = start_server(&a, Some(node.proxy_cgroup()), &["echo", "127.0.0.1:15001"])?;
    let entries = || -> anyhow::Result<Vec<(podsteer_common::SockPairKey, podsteer_common::Addr)>> {
        Ok(Maps::open_pinned(&agent.bpffs)?.orig_by_pair.iter().filter_map(Result::ok).filter(|(k, _)| k.netns == cookie).collect())
    };
    let mut held = start_server(&a, None, &["hold", "10.99.0.1:80", "5"])?;
    let live = entries()?;
    assert_eq!(live.len(), 5, "one entry per held connection: {live:?}");
    let proxy = podsteer_common::Addr::v4(u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(), 15001u16.to_be());
    let dst = podsteer_common::Addr::v4(u32::from(std::net::Ipv4Addr::new(10, 99, 0, 1)).to_be(), 80u16.to_be());
    for (k, orig) in &live {
        assert_eq!(k.remote, proxy, "keyed by the proxy listener the app reached too: {k:?}");
        assert!(k.local.is_loopback() && k.local.port != 0, "and by the app's socket: {k:?}");
        assert_eq!(*orig, dst, "{k:?}");
    }
    held.kill();
    wait::until("the closed connections' entries to go", std::time::Duration::from_secs(5), || entries().ok().filter(Vec::is_empty))?;
    Ok(())
}

/// The sum of one of the programs' counters, read from the pins.
fn counter(agent: &Agent, which: podsteer_common::Counter) -> anyhow::Result<u64> {
    Ok(Maps::open_pinned(&agent.bpffs)?.counters()?.into_iter().find(|(c, _)| *c == which).map_or(0, |(_, v)| v))
}

/// A pod that goes away while no agent runs leaves a pinned sk_lookup link whose
/// netns is gone: such a link does not keep its netns alive, so updating it
/// fails with ENOLINK. The agent used to exit on that at every start (a crash
/// loop that failed every new pod's ADD); it must serve, forget the pod, count
/// it, and keep intercepting the pods that live.
#[test]
fn agent_restart_after_a_pod_died_while_it_was_down_serves_and_forgets_it() -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    let mut s = Scene::new("ebpf", &[])?;
    let c = s.node.add_pod(PodSpec::new("default", "c"))?;
    let rec = s.agent.add_pod(&c, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let cookie = rec["netns_cookie"].as_u64().ok_or_else(|| anyhow::anyhow!("no cookie in {rec}"))?;
    let pin = s.agent.bpffs.join("podsteer/links").join(format!("sk_lookup-{cookie}"));
    assert!(pin.exists(), "c's sk_lookup link is pinned");
    s.agent.kill();
    drop(c);
    // The kernel frees a netns asynchronously: wait until the link has lost it.
    podsteer_lab::wait::until("c's netns to be freed", std::time::Duration::from_secs(10), || {
        let link = podsteer_agent::sys::obj_get(&pin).ok()?;
        (podsteer_agent::sys::link_netns_ino(link.as_fd()).ok()? == 0).then_some(())
    })?;
    s.agent.restart()?;
    let pods = s.agent.pods()?;
    let names: Vec<&str> = pods.as_array().into_iter().flatten().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["a"], "the gone pod is forgotten, the live one kept");
    assert!(!pin.exists(), "the stale link is unpinned");
    assert!(!Maps::open_pinned(&s.agent.bpffs)?.pod_cookies().contains(&cookie), "the gone pod is out of PODS");
    assert_eq!(s.agent.metric("podsteer_agent_stale_state_removed_total{action=\"stale_link\"}")?, 1.0);
    assert!(s.agent.log_text().contains("stale pod link removed"), "{}", s.agent.log_text());
    let line = run_client(&s.a, &["hello", &addr(s.b4(), 8080)])?;
    assert_eq!(field(&line, "server="), "proxy", "the live pod is still intercepted: {line}");
    let d = s.node.add_pod(PodSpec::new("default", "d"))?;
    s.agent.add_pod(&d, &[])?.map_err(|e| anyhow::anyhow!("a new pod's ADD after the restart: {e}"))?;
    Ok(())
}

/// With no proxy listener in a meshed pod (the proxy down or restarting), an
/// inbound connection is refused, never handed to the app unproxied; once the
/// listener is back it lands there, and when the listener dies, refused again.
fn inbound_fails_closed_while_the_proxy_has_no_listener(mode: &str) -> anyhow::Result<()> {
    let s = Scene::new(mode, &[])?;
    let c = s.node.add_pod(PodSpec::new("default", "c"))?;
    let _app = start_server(&s.a, None, &["whoami", "[::]:8080", "app"])?;
    let refused = |dst: &str, when: &str| match run_client(&c, &["hello", dst]) {
        Ok(line) => panic!("{mode} / {when}: {dst} was answered by {line}"),
        Err(e) => assert!(format!("{e:#}").contains("ECONNREFUSED"), "{mode} / {when}: {dst}: {e:#}"),
    };
    let families = [(s.a.ipv4(), "0.0.0.0:15006"), (s.a.ipv6(), "[::]:15006")];
    for (ip, _) in families {
        refused(&addr(ip.expect("pod address"), 8080), "no listener yet");
    }
    if mode == "ebpf" {
        assert_eq!(counter(&s.agent, podsteer_common::Counter::InboundRefused)?, 2, "each refusal is counted");
    }
    let sock = s.agent.socket.display().to_string();
    let uid = s.a.uid().to_string();
    // One family at a time: the proxy listens per family, and a [::] listener
    // would take 0.0.0.0's port.
    for (ip, bind) in families {
        let dst = addr(ip.expect("pod address"), 8080);
        let mut args = vec!["whoami", bind, "inbound"];
        if mode == "ebpf" {
            args.extend(["--register", &sock, &uid]);
        }
        let inbound = start_server(&s.a, Some(s.node.proxy_cgroup()), &args)?;
        let line = run_client(&c, &["hello", &dst])?;
        assert_eq!(field(&line, "server="), "inbound", "{mode} / listener back: {line}");
        drop(inbound);
        refused(&dst, "listener died");
    }
    Ok(())
}
both_modes!(inbound_fails_closed_while_the_proxy_has_no_listener);

/// After IP reuse, the old pod's late DEL must leave the address to the new pod
/// that holds it now, or the new pod's inbound traffic stops being steered.
#[test]
fn a_late_del_of_an_old_pod_keeps_the_new_owner_of_its_ip() -> anyhow::Result<()> {
    let s = Scene::new("ebpf", &[])?;
    let old = s.node.add_pod(PodSpec::new("default", "old"))?;
    s.agent.add_pod(&old, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let new = s.node.add_pod(PodSpec::new("default", "new"))?;
    // The runtime handed the old pod's addresses to the new one (the agent
    // checks that a pod's IPs are its netns's own, so they go there too).
    for ip in old.ips() {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let st = std::process::Command::new("ip")
            .args(["-n", new.netns().name(), "addr", "add", &format!("{ip}/{prefix}"), "dev", "eth0", "nodad"])
            .status()?;
        anyhow::ensure!(st.success(), "adding {ip} to the new pod: {st}");
    }
    let mut info = podsteer_lab::agent::pod_info(&new, &[]);
    info.ips = old.ips().to_vec();
    let rec = s.agent.call(&podsteer_agent::api::Request::Add { pod: info })?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let new_cookie = rec["netns_cookie"].as_u64().ok_or_else(|| anyhow::anyhow!("no cookie in {rec}"))?;
    s.agent.call(&podsteer_agent::api::Request::Del { uid: old.uid().into() })?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let maps = Maps::open_pinned(&s.agent.bpffs)?;
    for ip in old.ips() {
        let owner = maps.pod_by_ip.get(&podsteer_agent::ebpf::maps::ip_key(*ip), 0).ok();
        assert_eq!(owner, Some(new_cookie), "POD_BY_IP[{ip}] after the old pod's DEL");
    }
    Ok(())
}

/// `podsteer explain` against the Scene's agent, as JSON.
fn explain(s: &Scene, dest: &str) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(podsteer_lab::agent::bin("podsteer"))
        .args(["--bpffs", &s.agent.bpffs.display().to_string()])
        .args(["--state-dir", &s.agent.state_dir.display().to_string()])
        .args(["--socket", &s.agent.socket.display().to_string()])
        .args(["explain", "default/a", dest, "--output", "json"])
        .output()?;
    anyhow::ensure!(out.status.success(), "explain {dest}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A dual-stack socket (the JVM's default) connecting to `::ffff:a.b.c.d` is an
/// IPv4 connection and must be decided as one, in both modes and in explain: an
/// excluded IPv4 CIDR and IPv4 loopback stay untouched, and a redirected one
/// lands on the IPv4 listener with the IPv4 original destination.
fn ipv4_mapped_destinations_are_decided_as_ipv4(mode: &str) -> anyhow::Result<()> {
    let s = Scene::with(mode, |b| vec![("podsteer.io/exclude-outbound-cidrs".into(), format!("{}/32", b.ipv4().expect("v4")))])?;
    let _local = start_server(&s.a, None, &["whoami", "127.0.0.1:7777", "local"])?;
    let mapped = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    };
    let excluded = addr(mapped(s.b4()), 8080);
    let line = run_client(&s.a, &["hello", &excluded])?;
    assert_eq!(field(&line, "server="), "b", "{mode} / excluded CIDR via {excluded}: {line}");
    let e = explain(&s, &excluded)?;
    assert_eq!((e["intercepted"].as_bool(), e["reason"].as_str()), (Some(false), Some("destination is in an excluded CIDR")), "{e}");

    let lo = addr(mapped("127.0.0.1".parse()?), 7777);
    let line = run_client(&s.a, &["hello", &lo])?;
    assert_eq!(field(&line, "server="), "local", "{mode} / loopback via {lo}: {line}");
    assert_eq!(explain(&s, &lo)?["intercepted"], false);

    let gw = s.node.gateway_ips()[0];
    let control = addr(mapped(gw), 9999);
    let line = run_client(&s.a, &["hello", &control])?;
    assert_eq!(field(&line, "server="), "proxy", "{mode} / control {control}: {line}");
    assert_eq!(field(&line, "orig="), addr(gw, 9999), "{mode}: the original destination is the IPv4 address: {line}");
    let e = explain(&s, &control)?;
    assert_eq!(e["intercepted"], true, "{e}");
    assert!(e["lands_on"].as_str().is_some_and(|l| l.starts_with("[::ffff:127.0.0.1]:15001")), "{e}");
    Ok(())
}
both_modes!(ipv4_mapped_destinations_are_decided_as_ipv4);

/// Another host's port 15001 is an ordinary destination: exempting proxy ports
/// there would be a free egress path past the proxy.
fn a_proxy_port_on_another_host_is_intercepted(mode: &str) -> anyhow::Result<()> {
    let s = Scene::new(mode, &[])?;
    let _other = start_server(&s.b, None, &["whoami", "[::]:15001", "b"])?;
    for ip in [s.b4(), s.b6()] {
        let dst = addr(ip, 15001);
        let line = run_client(&s.a, &["hello", &dst])?;
        assert_eq!(field(&line, "server="), "proxy", "{mode} / {dst}: {line}");
        assert_eq!(explain(&s, &dst)?["intercepted"], true);
    }
    Ok(())
}
both_modes!(a_proxy_port_on_another_host_is_intercepted);

/// The proxy UID is exempt only where a proxy runs as it (a sidecar pod): in a
/// shared-proxy pod, an app running as 1337 is intercepted like any other.
fn the_proxy_uid_gains_nothing_in_a_shared_proxy_pod(mode: &str) -> anyhow::Result<()> {
    let s = Scene::new(mode, &[])?;
    for ip in [s.b4(), s.b6()] {
        let line = run_client(&s.a, &["hello", &addr(ip, 8080), "--uid", "1337"])?;
        assert_eq!(field(&line, "server="), "proxy", "{mode} / uid 1337 to {ip}: {line}");
    }
    Ok(())
}
both_modes!(the_proxy_uid_gains_nothing_in_a_shared_proxy_pod);

/// The kubelet recreates a dead sandbox with the same pod UID. Once the old
/// netns is gone, the new sandbox's ADD replaces the old record instead of being
/// refused (which left the recreated pod un-intercepted).
#[test]
fn a_sandbox_recreated_with_the_same_uid_replaces_the_old_one() -> anyhow::Result<()> {
    let s = Scene::new("ebpf", &[])?;
    let old = s.node.add_pod(PodSpec::new("default", "x"))?;
    let uid = old.uid().to_string();
    s.agent.add_pod(&old, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(old);
    let new = s.node.add_pod(PodSpec::new("default", "x-again"))?;
    let mut info = podsteer_lab::agent::pod_info(&new, &[]);
    info.uid = uid.clone();
    let rec = s.agent.call(&podsteer_agent::api::Request::Add { pod: info })?.map_err(|e| anyhow::anyhow!("the recreated sandbox: {e}"))?;
    assert_eq!(rec["netns"].as_str(), new.netns().path().to_str(), "{rec}");
    let pods = s.agent.pods()?;
    let with_uid: Vec<&serde_json::Value> = pods.as_array().into_iter().flatten().filter(|p| p["uid"] == uid.as_str()).collect();
    assert_eq!(with_uid.len(), 1, "one record for the UID: {pods}");
    assert_eq!(with_uid[0]["netns"].as_str(), new.netns().path().to_str());
    Ok(())
}

/// The getsockopt program passes through what it does not answer, also when
/// the answer is longer than the page it is shown (kernels 5.12 to 6.4 fail
/// such calls with EFAULT unless it resets optlen): the same answer as unmeshed.
fn a_getsockopt_longer_than_a_page_is_answered_as_unmeshed(mode: &str) -> anyhow::Result<()> {
    let s = Scene::new(mode, &[])?;
    let unmeshed = run_client(&s.b, &["big-getsockopt"])?;
    let meshed = run_client(&s.a, &["big-getsockopt"])?;
    assert!(unmeshed.starts_with("ok len=4400"), "{unmeshed}");
    assert_eq!(meshed, unmeshed, "{mode}");
    Ok(())
}
both_modes!(a_getsockopt_longer_than_a_page_is_answered_as_unmeshed);
