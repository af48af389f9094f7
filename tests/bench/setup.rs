//! The benchmark's lab: one node per interception setup, each with a client pod,
//! a meshed server pod (full mesh) and an unmeshed one (outbound-only).

use std::collections::BTreeMap;
use std::time::Duration;

use podsteer_lab::agent::{Agent, bin};
use podsteer_lab::process::LabProcess;
use podsteer_lab::proxy::Proxy;
use podsteer_lab::{Node, NodeOptions, Pod, PodSpec, wait};

pub const SERVER_PORT: u16 = 9000;

/// Both proxies get one worker thread: the headline runs pin everything to one
/// CPU, where a second worker only adds handoffs (haproxy: nbthread 1).
const PROXY_ARGS: &[&str] = &["--workers", "1"];

/// One node and what runs on it.
pub struct Setup {
    // Drop order: processes before proxies, agents, pods and the node.
    pub processes: Vec<LabProcess>,
    pub proxies: Vec<Proxy>,
    pub pods: BTreeMap<&'static str, Pod>,
    pub agent: Option<Agent>,
    /// A two-node cluster's agents and nodes (its proxies are in `proxies`).
    pub mesh: Option<podsteer_lab::mesh::Mesh>,
    /// Node 0 of a cluster.
    pub node: Node,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub setup: &'static str,
    pub variant: &'static str,
    pub node: usize,
    pub client: &'static str,
    pub server: &'static str,
}

pub struct Lab {
    pub setups: Vec<Setup>,
    pub scenarios: Vec<Scenario>,
}

/// Every bench pod reuses TIME_WAIT ports for new connections (per netns).
/// The connection-rate runs close from the client, so each leaves a TIME_WAIT
/// on the client's side for a minute; past ~10,000 of them to one destination,
/// connect()'s search for a free port dominates (seen here: direct fell from
/// 8,900 to 650 conn/s over three one-second runs, and read as slower than the
/// proxied path). A client at such rates sets this, and it is every path's
/// own client side (the app's, the proxy's upstream, haproxy's) that it frees.
fn reuse_time_wait(pod: &Pod) -> anyhow::Result<()> {
    podsteer_lab::netns::run_in(pod.netns().fd(), "tcp_tw_reuse", || std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1"))??;
    Ok(())
}

fn loadgen_server(pod: &Pod) -> anyhow::Result<LabProcess> {
    podsteer_lab::workload::start_server_with(pod, None, bin("podsteer-loadgen"), &["serve", &format!("[::]:{SERVER_PORT}")])
}

/// A transparent haproxy sidecar: the istio-init + Envoy shape, with haproxy.
fn haproxy(node: &Node, pod: &Pod, bind: &str) -> anyhow::Result<LabProcess> {
    let cfg = node.state_dir().join(format!("haproxy-{}.cfg", pod.name()));
    std::fs::write(
        &cfg,
        format!(
            "global\n  uid 1337\n  gid 1337\n  nbthread 1\n  maxconn {maxconn}\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\n\
             frontend sidecar\n  bind {bind}\n  default_backend original_dst\n\nbackend original_dst\n  server orig 0.0.0.0:0\n",
            // haproxy wants 2 fds per connection and refuses to start beyond the limit.
            maxconn = (nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?.1.saturating_sub(100) / 2).min(40_000),
        ),
    )?;
    let mut cmd = pod.command("haproxy")?;
    let log = node.state_dir().join(format!("haproxy-{}.log", pod.name()));
    cmd.args(["-db", "-f", &cfg.display().to_string()]).stdout(std::process::Stdio::null()).stderr(std::fs::File::create(&log)?);
    let p = pod.spawn("haproxy", cmd)?;
    // Watch for the listening socket rather than connecting: a connection that was
    // not redirected has no original destination, and haproxy would forward it to
    // itself, over and over, until maxconn.
    let port: u16 = bind.rsplit(':').next().unwrap_or("0").parse()?;
    wait::until("haproxy to listen", Duration::from_secs(10), || pod.run(|| listening(port)).ok()?.then_some(()))
        .map_err(|e| e.context(std::fs::read_to_string(&log).unwrap_or_default()))?;
    Ok(p)
}

/// Whether something listens on `port` (IPv4) in the calling thread's netns.
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X} ");
    std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default().lines().any(|l| {
        l.split_whitespace().nth(1).is_some_and(|local| format!("{local} ").ends_with(&want)) && l.split_whitespace().nth(3) == Some("0A")
    })
}

impl Setup {
    /// `shared_proxy`: start one, with these flags besides [`PROXY_ARGS`].
    fn new(agent_mode: Option<(&str, &[&str])>, shared_proxy: Option<&[&str]>) -> anyhow::Result<Setup> {
        let node = Node::new(NodeOptions::default())?;
        let agent = match agent_mode {
            None => None,
            Some((mode, extra)) if shared_proxy.is_some() => Some(Agent::start_with_proxy(&node, mode, extra)?),
            Some((mode, extra)) => Some(Agent::start(&node, mode, extra)?),
        };
        let mut proxies = Vec::new();
        if let Some(extra) = shared_proxy {
            let sock = agent.as_ref().and_then(|a| a.proxy_socket.clone()).expect("proxy socket");
            let args: Vec<&str> = PROXY_ARGS.iter().chain(extra).copied().collect();
            proxies.push(Proxy::start_shared(&node, &sock, 15020, &args)?);
        }
        Ok(Setup { processes: Vec::new(), proxies, pods: BTreeMap::new(), agent, mesh: None, node })
    }

    /// Two nodes joined by the lab's underlay, each with an agent and a shared
    /// proxy; with `ca`, HBONE (mTLS) between meshed pods; with `policies`,
    /// that YAML in the agents' policy directory. Pods: `client` and
    /// `server-local` on node 0, `server` on node 1 (all meshed), and
    /// `plain-client`/`plain-server` unmeshed on nodes 0 and 1.
    fn cluster(ca: bool, policies: Option<&str>) -> anyhow::Result<Setup> {
        let mut mesh = podsteer_lab::mesh::Mesh::new(2)?;
        let ca_dir = if ca { Some(mesh.ca("ca")?) } else { None };
        let wl = mesh.scratch("workloads")?;
        let policy_dir = mesh.scratch("policies")?;
        if let Some(text) = policies {
            std::fs::write(policy_dir.join("policies.yaml"), text)?;
        }
        let p = policy_dir.display().to_string();
        let extra: Vec<&str> = if policies.is_some() { vec!["--policy-dir", &p] } else { vec![] };
        mesh.start_opts("ebpf", &[ca_dir.as_deref(), ca_dir.as_deref()], &[&wl, &wl], &extra, PROXY_ARGS)?;
        let mut pods = BTreeMap::new();
        let mut processes = Vec::new();
        for (name, node, meshed) in
            [("client", 0, true), ("server-local", 0, true), ("server", 1, true), ("plain-client", 0, false), ("plain-server", 1, false)]
        {
            let pod = mesh.pod_in(node, "bench", name, name, &[("app", name)], meshed)?;
            reuse_time_wait(&pod)?;
            if name.contains("server") {
                processes.push(loadgen_server(&pod)?);
            }
            pods.insert(name, pod);
        }
        if ca {
            mesh.wait_peers(6)?;
        }
        let proxies = std::mem::take(&mut mesh.proxies);
        let node = mesh.cluster.nodes[0].clone();
        Ok(Setup { processes, proxies, pods, agent: None, mesh: Some(mesh), node })
    }

    fn pod(&mut self, name: &'static str, meshed: bool, annotations: &[(&str, &str)]) -> anyhow::Result<()> {
        let pod = self.node.add_pod(PodSpec::new("bench", name))?;
        reuse_time_wait(&pod)?;
        if meshed {
            let agent = self.agent.as_ref().expect("meshed pods need an agent");
            agent.add_pod(&pod, annotations)?.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if name.starts_with('s') {
            self.processes.push(loadgen_server(&pod)?);
        }
        self.pods.insert(name, pod);
        Ok(())
    }

    /// PIDs of every proxy process on the node (for pinning and CPU accounting).
    pub fn proxy_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self.proxies.iter().map(Proxy::pid).collect();
        pids.extend(self.processes.iter().filter(|p| p.name() == "haproxy" || p.name() == "podsteer-proxy").map(LabProcess::pid));
        pids
    }

    pub fn server_pids(&self) -> Vec<i32> {
        self.processes.iter().filter(|p| p.name() == "serve").map(LabProcess::pid).collect()
    }
}

impl Lab {
    pub fn new() -> anyhow::Result<Lab> {
        let mut setups = Vec::new();
        let mut scenarios = Vec::new();
        let mut add = |name, setup, variant, node, client, server| scenarios.push(Scenario { name, setup, variant, node, client, server });

        // 0: no interception at all.
        let mut direct = Setup::new(None, None)?;
        direct.pod("client", false, &[])?;
        direct.pod("server", false, &[])?;
        setups.push(direct);
        add("direct", "direct", "direct", 0, "client", "server");

        // 1: iptables REDIRECT with haproxy sidecars.
        let sidecar = [("podsteer.io/proxy-mode", "sidecar")];
        let mut hap = Setup::new(Some(("iptables", &[])), None)?;
        hap.pod("client", true, &sidecar)?;
        hap.pod("server-meshed", true, &sidecar)?;
        hap.pod("server-plain", false, &[])?;
        let h1 = haproxy(&hap.node, &hap.pods["client"], "127.0.0.1:15001")?;
        let h2 = haproxy(&hap.node, &hap.pods["server-meshed"], "0.0.0.0:15006")?;
        hap.processes.extend([h1, h2]);
        setups.push(hap);
        add("haproxy+iptables out", "iptables + haproxy", "outbound-only", 1, "client", "server-plain");
        add("haproxy+iptables mesh", "iptables + haproxy", "full mesh", 1, "client", "server-meshed");

        // 2: iptables REDIRECT with the shared podsteer-proxy; bulk goes by splice(2).
        let mut ipt = Setup::new(Some(("iptables", &[])), Some(&[]))?;
        ipt.pod("client", true, &[])?;
        ipt.pod("server-meshed", true, &[])?;
        ipt.pod("server-plain", false, &[])?;
        setups.push(ipt);
        add("podsteer+iptables out", "iptables + podsteer", "outbound-only", 2, "client", "server-plain");
        add("podsteer+iptables mesh", "iptables + podsteer", "full mesh", 2, "client", "server-meshed");

        // 3: eBPF with the shared podsteer-proxy: sk_msg off (the default) and on
        // (opt-in). The node runs the default for unmeshed destinations (direct);
        // the "out" clients opt into the proxy for every connection, and
        // `client-direct` (nothing asked) reaches the unmeshed server direct.
        let on = [("podsteer.io/sk-msg", "true"), ("podsteer.io/unmeshed-outbound", "proxy")];
        let forced = [("podsteer.io/unmeshed-outbound", "proxy")];
        let mut ebpf = Setup::new(Some(("ebpf", &["--unmeshed-outbound", "direct"])), Some(&[]))?;
        ebpf.pod("client-nosk", true, &forced)?;
        ebpf.pod("server-meshed-nosk", true, &[])?;
        ebpf.pod("client", true, &on)?;
        ebpf.pod("server-meshed", true, &on[..1])?;
        ebpf.pod("server-plain", false, &[])?;
        ebpf.pod("client-direct", true, &[])?;
        // Unmeshed, as any client of a meshed pod may be: the silent-connection flood's source.
        ebpf.pod("attacker", false, &[])?;
        setups.push(ebpf);
        add(
            "podsteer+ebpf direct out",
            "eBPF, meshed pod to an unmeshed server (default: direct)",
            "outbound-only",
            3,
            "client-direct",
            "server-plain",
        );
        add(
            "podsteer+ebpf out",
            "eBPF + podsteer, proxy forced for unmeshed (sk_msg off)",
            "outbound-only",
            3,
            "client-nosk",
            "server-plain",
        );
        add("podsteer+ebpf mesh", "eBPF + podsteer (default: sk_msg off)", "full mesh", 3, "client-nosk", "server-meshed-nosk");
        add("podsteer+ebpf+skmsg out", "eBPF + podsteer, sk_msg opted in", "outbound-only", 3, "client", "server-plain");
        add("podsteer+ebpf+skmsg mesh", "eBPF + podsteer, sk_msg opted in", "full mesh", 3, "client", "server-meshed");

        // 4: eBPF with per-pod podsteer-proxy sidecars (the default: sk_msg off).
        let mut side = Setup::new(Some(("ebpf", &["--proxy-mode", "sidecar"])), None)?;
        side.pod("client", true, &[])?;
        side.pod("server-meshed", true, &[])?;
        side.pod("server-plain", false, &[])?;
        let sock = side.agent.as_ref().map(|a| a.socket.display().to_string()).unwrap_or_default();
        for (i, name) in ["client", "server-meshed"].into_iter().enumerate() {
            let pod = &side.pods[name];
            let uid = pod.uid().to_owned();
            let mut args = vec!["--agent-socket", sock.as_str(), "--pod-uid", uid.as_str()];
            args.extend_from_slice(PROXY_ARGS);
            let p = Proxy::start_sidecar(&side.node, pod, 15030 + i as u16, &args)?;
            side.proxies.push(p);
        }
        setups.push(side);
        add("podsteer sidecar+ebpf out", "eBPF + podsteer sidecars", "outbound-only", 4, "client", "server-plain");
        add("podsteer sidecar+ebpf mesh", "eBPF + podsteer sidecars", "full mesh", 4, "client", "server-meshed");

        // 5: as 2, but the proxy always copies: what splice(2) is worth.
        let mut copy = Setup::new(Some(("iptables", &[])), Some(&["--splice", "never"]))?;
        copy.pod("client", true, &[])?;
        copy.pod("server-meshed", true, &[])?;
        setups.push(copy);
        add("podsteer+iptables mesh copy", "iptables + podsteer, splice off", "full mesh", 5, "client", "server-meshed");

        // 6: two nodes, plaintext: direct between unmeshed pods, and podsteer
        // without mTLS (the shared proxy on both ends).
        setups.push(Setup::cluster(false, None)?);
        add("direct across nodes", "two nodes, no mesh", "direct-across", 6, "plain-client", "plain-server");
        add("podsteer plaintext across", "two nodes, podsteer without mTLS", "across", 6, "client", "server");

        // 7: two nodes with HBONE: across, and on one node.
        setups.push(Setup::cluster(true, None)?);
        add("podsteer mTLS across", "two nodes, podsteer HBONE (mTLS)", "across", 7, "client", "server");
        add("podsteer mTLS same node", "two nodes, podsteer HBONE (mTLS)", "same node", 7, "client", "server-local");

        // 8: as 7, with 1,000 AuthorizationPolicies on the node (one selects the server).
        setups.push(Setup::cluster(true, Some(&thousand_policies()))?);
        add("podsteer mTLS across +1000 policies", "two nodes, HBONE, 1,000 policies", "across", 8, "client", "server");

        Ok(Lab { setups, scenarios })
    }

    pub fn client(&self, s: &Scenario) -> &Pod {
        &self.setups[s.node].pods[s.client]
    }

    pub fn server_addr(&self, s: &Scenario) -> String {
        let pod = &self.setups[s.node].pods[s.server];
        format!("{}:{SERVER_PORT}", pod.ipv4().expect("server has IPv4"))
    }
}

/// 999 policies for other namespaces and one for the server, which lets the
/// client in: every connection is judged, against its pod's few policies.
pub fn thousand_policies() -> String {
    let mut text = String::new();
    for i in 0..999 {
        text += &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p{i}\n  namespace: ns-{i}\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/ns-{i}/sa/app]\n---\n"
        );
    }
    text + "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: server\n  namespace: bench\nspec:\n  selector:\n    matchLabels:\n      app: server\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/bench/sa/client]\n"
}
