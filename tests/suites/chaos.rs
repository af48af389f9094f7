//! Chaos: the node lifecycle under a real containerd. 100 pods are created and
//! removed through CRI, 10 at a time, while a meshed client pod loops
//! connections to a meshed server pod. Meanwhile the agent is SIGKILLed at
//! random moments (6 times, once with a pod removed while it is down) and the
//! proxy 4 times. Then a rolling update of both DaemonSets is replayed as the
//! manifest causes it, under the same load.
//!
//! Invariants, checked after every wave and at the end:
//! - every connection the client got its echo on was taken by a proxy, and
//!   every connection the server saw came from a proxy: the proxies' logs (a
//!   line as each connection is taken, and before each leg to the app
//!   connects) account for each of them (see [`no_bypass`]). In eBPF mode the
//!   client's peer address says so too: the outbound listener;
//! - the server saw its client's address;
//! - each ADD either succeeded with interception live or failed with the
//!   plugin's CNI error;
//! - the agent never exits unless killed, and is ready within 2 s of each start;
//! - at the end, the agent, its maps, pins and the proxy hold exactly the live
//!   pods, and the upgrade refused or reset no connection.
//!
//! The kills' timing comes from a seed, printed; `PODSTEER_CHAOS_SEED` replays one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::Signal;
use podsteer_agent::api::{self, Request};
use podsteer_lab::agent::Agent;
use podsteer_lab::containerd::Containerd;
use podsteer_lab::proxy::Proxy;
use podsteer_lab::workload::{addr, start_in_netns};
use podsteer_lab::{Node, NodeOptions, both_modes, wait};
use serde_json::Value;

const WAVES: usize = 10;
const PER_WAVE: usize = 10;
/// The bound: ready again within this long of each start.
const READY_WITHIN: Duration = Duration::from_secs(2);

/// One chaos run at a time: two at once on two cores measure the machine,
/// not the agent's start.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn chaos(mode: &str) -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let seed = std::env::var("PODSTEER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    eprintln!("chaos {mode}: PODSTEER_CHAOS_SEED={seed}");
    let node = Node::new(NodeOptions::default())?;
    let mut ctrd = Containerd::start(&node)?;
    let cri = ctrd.socket.display().to_string();
    let agent = Agent::start_installed(&node, mode, &["--cri-socket", &cri, "--repair-interval-secs", "1"])?;
    let control = agent.proxy_socket.clone().context("proxy socket")?;
    let proxies = Proxies::start(&node, &control)?;
    let dir = node.state_dir().join("chaos");
    std::fs::create_dir_all(&dir)?;
    let (server_out, client_out) = (dir.join("server.out"), dir.join("client.out"));
    let mut monkey = Monkey {
        rng: Rng(seed | 1),
        agent,
        proxies,
        agent_kills: 0,
        proxy_kills: 0,
        starts: Vec::new(),
        timeline: Timeline(client_out.clone(), Vec::new()),
    };

    // The long-lived pair, meshed through CRI like every other pod, once the
    // runtime runs the chain with podsteer-cni in it.
    ctrd.wait_cni_config_with("podsteer-cni")?;
    for (name, r) in ctrd.run_pods("default", &["server".into(), "client".into()]) {
        r.with_context(|| format!("RunPodSandbox {name}"))?;
    }
    let logs = || format!("{mode}\nCNI log:\n{}\nagent log:\n{}", read(&node.state_dir().join("cni.log")), monkey.agent.log_text());
    let server = record(&monkey.agent, "server").with_context(logs)?;
    let client = record(&monkey.agent, "client").with_context(logs)?;
    let (_server_app, _server_cg) = start_in_netns(&node, &server.netns, "server", &["echo-peers", "[::]:8080"], &server_out)?;
    wait::until("the server to listen", Duration::from_secs(5), || read(&server_out).contains("listening").then_some(()))?;
    let target = addr(server.ip, 8080);
    let (mut client_loop, _client_cg) = start_in_netns(&node, &client.netns, "client", &["loop-ports", &target], &client_out)?;
    wait::until("the client to loop through the proxy", Duration::from_secs(10), || (oks(&read(&client_out)).len() >= 20).then_some(()))?;

    let mut adds = Adds::default();
    let mut live: Vec<(String, String)> = Vec::new();
    for wave in 0..WAVES {
        let names: Vec<String> = (0..PER_WAVE).map(|i| format!("churn-{wave}-{i}")).collect();
        let old: Vec<String> = live.drain(..).map(|(_, id)| id).collect();
        monkey.timeline.note(format!("wave {wave}"));
        // A kill lands at a random moment while the wave's pods are being made
        // and the last wave's removed.
        let (started, removed, struck) = std::thread::scope(|s| {
            let strike = s.spawn(|| monkey.strike(wave));
            let started = ctrd.run_pods("default", &names);
            let removed = ctrd.stop_and_remove_all(&old);
            (started, removed, strike.join())
        });
        struck.map_err(|_| anyhow::anyhow!("the monkey panicked"))??;
        for r in removed {
            r.context("StopPodSandbox/RemovePodSandbox")?;
        }
        for (name, r) in started {
            match r {
                Ok(id) => {
                    adds.intercepted(&monkey.agent, &node, &name)?;
                    live.push((name, id));
                }
                Err(e) => adds.refused(&name, &e)?,
            }
        }
        if wave == WAVES / 2 {
            // A pod goes away while no agent runs: its DEL finds no agent (and
            // succeeds, to be reconciled), and the runtime removes its netns.
            let (name, id) = live.pop().context("a live pod to remove")?;
            monkey.kill_agent()?;
            ctrd.stop_and_remove(&id)?;
            monkey.start_agent()?;
            wait::until("the agent to forget the pod removed while it was down", Duration::from_secs(5), || {
                names_of(&monkey.agent).ok().filter(|n| !n.contains(&name)).map(drop)
            })?;
        }
        no_bypass(mode, &client_out, &server_out, &monkey.proxies.logs, false).with_context(|| format!("{:?}", monkey.timeline.1))?;
    }
    for r in ctrd.stop_and_remove_all(&live.drain(..).map(|(_, id)| id).collect::<Vec<_>>()) {
        r.context("StopPodSandbox/RemovePodSandbox")?;
    }

    // A rolling update of both DaemonSets, in the order the manifest causes:
    // each old pod gets SIGTERM and exits before its new pod starts.
    let before = read(&client_out).lines().count();
    monkey.timeline.note("upgrade: agent SIGTERM");
    monkey.agent.signal(Signal::SIGTERM)?;
    let st = monkey.agent.wait_exit(Duration::from_secs(10))?;
    anyhow::ensure!(st.success(), "the old agent on SIGTERM: {st}");
    std::thread::sleep(Duration::from_secs(1));
    monkey.start_agent()?;
    monkey.timeline.note("upgrade: proxy SIGTERM");
    monkey.proxies.current.process_mut().signal(Signal::SIGTERM)?;
    let st = monkey.proxies.current.process_mut().wait_exit(Duration::from_secs(15))?;
    anyhow::ensure!(st.success(), "the old proxy on SIGTERM: {st}");
    std::thread::sleep(Duration::from_millis(1500));
    monkey.proxies.start_next()?;
    monkey.agent.wait_proxy_current(monkey.proxies.current.pid())?;
    wait::until("50 connections after the upgrade", Duration::from_secs(10), || {
        (read(&client_out).lines().skip(before).filter(|l| l.starts_with("ok ")).count() >= 50).then_some(())
    })?;
    client_loop.kill();
    let during: Vec<String> = read(&client_out).lines().skip(before).filter(|l| !l.starts_with("ok ")).map(String::from).collect();
    assert!(during.is_empty(), "{mode}: the upgrade refused or reset connections: {during:?}");

    // The end state: exactly the live pods, everywhere.
    no_bypass(mode, &client_out, &server_out, &monkey.proxies.logs, true).with_context(|| format!("{:?}", monkey.timeline.1))?;
    let want: BTreeSet<String> = ["client", "server"].map(String::from).into();
    assert_eq!(ctrd.ready_pods()?, want, "{mode}: the runtime's pods");
    assert_eq!(names_of(&monkey.agent)?, want, "{mode}: the agent's pods");
    for name in &want {
        check(&monkey.agent, &node, name).with_context(|| format!("{mode}: {name} at the end"))?;
    }
    let pods = monkey.agent.pods()?;
    let cookies: BTreeSet<u64> = pods.as_array().into_iter().flatten().filter_map(|p| p["netns_cookie"].as_u64()).collect();
    if mode == "ebpf" {
        let maps = podsteer_agent::ebpf::maps::Maps::open_pinned(&monkey.agent.bpffs)?;
        assert_eq!(maps.pod_cookies().into_iter().collect::<BTreeSet<_>>(), cookies, "the maps hold exactly the live pods");
        let pins = podsteer_agent::ebpf::pins::PinDir::new(&monkey.agent.bpffs);
        assert_eq!(pins.pod_links().into_iter().collect::<BTreeSet<_>>(), cookies, "the pins hold exactly the live pods");
    }
    assert_eq!(monkey.proxies.current.metric("podsteer_proxy_pods")?, 2.0, "{mode}: the proxy serves exactly the live pods");
    let ready = monkey.agent.admin_get("/readyz")?;
    assert!(ready.starts_with("HTTP/1.1 200") && ready.contains("pods=2"), "{ready}");
    assert!(monkey.agent_kills >= 5 && monkey.proxy_kills >= 3, "kills: agent {}, proxy {}", monkey.agent_kills, monkey.proxy_kills);
    let slow: Vec<_> = monkey.starts.iter().filter(|d| **d > READY_WITHIN).collect();
    assert!(slow.is_empty(), "{mode}: agent starts took {:?} to be ready (all: {:?})", slow, monkey.starts);
    assert!(!monkey.agent.log_text().contains("panicked"), "{mode}: the agent panicked");
    let total = oks(&read(&client_out)).values().sum::<usize>();
    let peers: BTreeSet<String> =
        read(&server_out).lines().filter_map(|l| l.strip_prefix("peer ")?.rsplit_once(':').map(|(ip, _)| ip.to_owned())).collect();
    assert!(peers.iter().all(|p| p.contains(&client.ip.to_string())), "{mode}: the server sees its client's address: {peers:?}");
    eprintln!(
        "chaos {mode}: {total} connections through the proxy (the server saw them from {peers:?}, the client is {}), {} failed; ADDs: {} intercepted, {} refused with a CNI error; agent killed {} times, proxy {}; ready after {:?}",
        client.ip,
        read(&client_out).lines().filter(|l| l.starts_with("failed")).count(),
        adds.ok,
        adds.refused,
        monkey.agent_kills,
        monkey.proxy_kills,
        monkey.starts
    );
    assert!(total >= 200, "{mode}: the client looped only {total} times");
    // The invariant is per ADD (above); this only says the churn did mesh pods.
    assert!(adds.ok >= WAVES * PER_WAVE / 5, "{mode}: only {} ADDs succeeded", adds.ok);
    Ok(())
}
both_modes!(chaos);

/// xorshift: enough randomness for kill timing, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    fn millis(&mut self, n: u64) -> Duration {
        Duration::from_millis(self.below(n))
    }
}

/// Does the killing, and checks what the issue asks of each restart.
struct Monkey {
    rng: Rng,
    agent: Agent,
    proxies: Proxies,
    agent_kills: usize,
    proxy_kills: usize,
    /// From spawning the agent to its /readyz answering 200, for each start.
    starts: Vec<Duration>,
    timeline: Timeline,
}

/// What the monkey did, each at the client's output line it happened by, so a
/// failure names what came before it.
struct Timeline(PathBuf, Vec<(usize, String)>);

impl Timeline {
    fn note(&mut self, what: impl Into<String>) {
        self.1.push((read(&self.0).lines().count(), what.into()));
    }
}

impl Monkey {
    /// Even waves kill the agent, odd ones (but the last) the proxy, each at a
    /// random moment in the wave's first 800 ms.
    fn strike(&mut self, wave: usize) -> anyhow::Result<()> {
        std::thread::sleep(self.rng.millis(800));
        if wave.is_multiple_of(2) {
            self.kill_agent()?;
            std::thread::sleep(self.rng.millis(300));
            self.start_agent()
        } else if wave < WAVES - 1 {
            let pid = self.proxies.current.pid();
            self.timeline.note(format!("proxy {pid} killed"));
            self.proxies.current.process_mut().signal(Signal::SIGKILL)?;
            self.proxies.current.process_mut().wait_exit(Duration::from_secs(5))?;
            self.proxy_kills += 1;
            std::thread::sleep(self.rng.millis(300));
            self.proxies.start_next()?;
            self.timeline.note(format!("proxy {} started", self.proxies.current.pid()));
            self.agent.wait_proxy_current(self.proxies.current.pid()).with_context(|| format!("after killing proxy {pid}"))
        } else {
            Ok(())
        }
    }

    fn kill_agent(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.agent.exited() {
            anyhow::bail!("the agent exited on its own ({st}):\n{}", self.agent.log_text());
        }
        self.timeline.note("agent killed");
        self.agent.kill();
        self.agent_kills += 1;
        Ok(())
    }

    fn start_agent(&mut self) -> anyhow::Result<()> {
        let spawned = Instant::now();
        self.agent.restart()?;
        wait::until("the agent to be ready", READY_WITHIN * 5, || {
            self.agent.admin_get("/readyz").ok().filter(|r| r.starts_with("HTTP/1.1 200"))
        })?;
        self.starts.push(spawned.elapsed());
        self.timeline.note("agent ready");
        Ok(())
    }
}

/// The shared proxy and every log a proxy of this run wrote.
struct Proxies {
    node: Node,
    control: PathBuf,
    current: Proxy,
    logs: Vec<PathBuf>,
    port: u16,
}

impl Proxies {
    fn start(node: &Node, control: &Path) -> anyhow::Result<Proxies> {
        let current = Proxy::start_shared_logging_opens(node, control, 15030)?;
        let logs = vec![current.log.clone()];
        Ok(Proxies { node: node.clone(), control: control.to_owned(), current, logs, port: 15030 })
    }

    fn start_next(&mut self) -> anyhow::Result<()> {
        self.port += 1;
        self.current = Proxy::start_shared_logging_opens(&self.node, &self.control, self.port)?;
        self.logs.push(self.current.log.clone());
        Ok(())
    }
}

#[derive(Default)]
struct Adds {
    ok: usize,
    refused: usize,
}

impl Adds {
    /// A sandbox the runtime started: interception must be live for it (once
    /// an agent answers, since one may be restarting).
    fn intercepted(&mut self, agent: &Agent, node: &Node, name: &str) -> anyhow::Result<()> {
        wait::until(&format!("{name}'s interception to check out"), Duration::from_secs(10), || check(agent, node, name).ok())
            .with_context(|| format!("RunPodSandbox {name} succeeded: {:?}", check(agent, node, name).err()))?;
        self.ok += 1;
        Ok(())
    }

    /// A sandbox the runtime refused: only podsteer's CNI error may be why.
    fn refused(&mut self, name: &str, e: &anyhow::Error) -> anyhow::Result<()> {
        let msg = format!("{e:#}");
        anyhow::ensure!(msg.contains("podsteer"), "RunPodSandbox {name} failed, and not with podsteer's CNI error: {msg}");
        self.refused += 1;
        Ok(())
    }
}

/// The agent's CHECK for a CRI pod: its interception is in place.
fn check(agent: &Agent, node: &Node, name: &str) -> anyhow::Result<()> {
    let uid = format!("{}-{name}", node.id());
    api::call(&agent.socket, &Request::Check { uid }, Duration::from_secs(2), None)?
        .into_result()
        .map(drop)
        .map_err(|e| anyhow::anyhow!("{}", e.message))
}

struct Record {
    netns: PathBuf,
    ip: IpAddr,
}

fn record(agent: &Agent, name: &str) -> anyhow::Result<Record> {
    let pods = agent.pods()?;
    let p =
        pods.as_array().into_iter().flatten().find(|p| p["name"] == name).with_context(|| format!("{name} is not registered: {pods}"))?;
    let ip =
        p["ips"].as_array().into_iter().flatten().filter_map(Value::as_str).find_map(|s| s.parse::<IpAddr>().ok().filter(IpAddr::is_ipv4));
    Ok(Record {
        netns: PathBuf::from(p["netns"].as_str().unwrap_or_default()),
        ip: ip.with_context(|| format!("{name} has no IPv4: {p}"))?,
    })
}

fn names_of(agent: &Agent) -> anyhow::Result<BTreeSet<String>> {
    Ok(agent.pods()?.as_array().into_iter().flatten().filter_map(|p| p["name"].as_str().map(String::from)).collect())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Local ports of the client's connections that got their echo, with how often.
fn oks(client_text: &str) -> BTreeMap<u16, usize> {
    let mut m = BTreeMap::new();
    for port in client_text.lines().filter_map(|l| l.strip_prefix("ok ")?.split_whitespace().next()?.parse::<u16>().ok()) {
        *m.entry(port).or_default() += 1;
    }
    m
}

/// In eBPF mode, every connection that got its echo reached the outbound
/// listener (by its peer address): none went past the proxy. Then the log
/// accounting: every such connection was taken by a proxy as the client's
/// outbound (by its port). The client's and the server's output are read
/// before the proxies' logs, and a proxy logs a connection before it relays a
/// byte (and a leg to the app before it connects), so this holds at any
/// moment, with the client still looping. At the end (`settled`), also every
/// connection the server saw came from a proxy's connection to it (by address
/// and port): none reached the app past the inbound proxy.
///
/// In iptables mode conntrack may give the client's connection another source
/// port on the way to the outbound proxy (the app's sockets and the proxy's
/// upstream ones share the pod's address and conntrack), so there a connection
/// the logs do not name by port must be matched by a logged one that names a
/// port no echoed connection had (one that failed at a kill has none either).
///
/// Earlier versions read the logs first, and every connection made between the
/// two reads showed as unaccounted: a gap in the checker, not in the mesh.
fn no_bypass(mode: &str, client_out: &Path, server_out: &Path, proxy_logs: &[PathBuf], settled: bool) -> anyhow::Result<()> {
    let (client_text, server_text) = (read(client_out), read(server_out));
    let logs: Vec<String> = proxy_logs.iter().map(|l| read(l)).collect();
    let lines = || logs.iter().flat_map(|l| l.lines());
    let field = |line: &str, key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(|v| v.trim_matches('"').to_owned());
    let canon = |a: &str| a.parse::<std::net::SocketAddr>().ok().map(|a| std::net::SocketAddr::new(a.ip().to_canonical(), a.port()));
    // eBPF mode rewrites the connect itself: the client's socket reaches the
    // outbound listener, so its peer says exactly whether it went past it.
    if mode == "ebpf" {
        let past: Vec<&str> = client_text
            .lines()
            .filter(|l| l.starts_with("ok "))
            .filter(|l| !l.split_whitespace().nth(2).and_then(canon).is_some_and(|p| p.ip().is_loopback() && p.port() == 15001))
            .collect();
        anyhow::ensure!(past.is_empty(), "connections that reached their server past the outbound proxy: {past:?}");
    }
    let done = oks(&client_text);
    let mut taken: BTreeMap<u16, usize> = BTreeMap::new();
    for line in lines().filter(|l| l.contains(" opened") && l.contains("default/client") && l.contains("outbound")) {
        if let Some(a) = field(line, "client=").as_deref().and_then(canon) {
            *taken.entry(a.port()).or_default() += 1;
        }
    }
    let (missing, spare) = unaccounted(&done, &taken);
    let allowed = if mode == "ebpf" { 0 } else { spare };
    anyhow::ensure!(
        missing.len() <= allowed,
        "{mode}: connections that got their echo and that no proxy took, by client port: {missing:?} (logged ports no echoed connection had: {spare})"
    );
    if settled {
        let mut connecting: BTreeMap<std::net::SocketAddr, usize> = BTreeMap::new();
        for line in lines().filter(|l| l.contains(" connecting") && l.contains("default/server") && l.contains("inbound")) {
            if let Some(a) = field(line, "from=").as_deref().and_then(canon) {
                *connecting.entry(a).or_default() += 1;
            }
        }
        let mut seen: BTreeMap<std::net::SocketAddr, usize> = BTreeMap::new();
        for a in server_text.lines().filter_map(|l| canon(l.strip_prefix("peer ")?)) {
            *seen.entry(a).or_default() += 1;
        }
        let (missing, spare) = unaccounted(&seen, &connecting);
        // Exact in both modes: the legs are untracked in iptables mode, so
        // conntrack rewrites none of them.
        anyhow::ensure!(
            missing.is_empty(),
            "the server was reached past the inbound proxy from: {missing:?}; logged addresses it never saw: {spare}"
        );
    }
    Ok(())
}

/// Keys `seen` more often than `logged` names them (once per time), and how
/// many times `logged` names a key more often than it was seen.
fn unaccounted<K: Ord + Copy>(seen: &BTreeMap<K, usize>, logged: &BTreeMap<K, usize>) -> (Vec<K>, usize) {
    let count = |m: &BTreeMap<K, usize>, k: &K| m.get(k).copied().unwrap_or(0);
    let missing = seen.iter().flat_map(|(k, n)| std::iter::repeat_n(*k, n.saturating_sub(count(logged, k)))).collect();
    let spare = logged.iter().map(|(k, n)| n.saturating_sub(count(seen, k))).sum();
    (missing, spare)
}
