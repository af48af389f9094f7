//! `cargo xtask demo`: a simulated node in each interception mode. The real
//! agent installs podsteer-cni into the node's conflist, pods start through the
//! CNI chain, and their traffic is shown landing on the shared proxy. It ends
//! with `podsteer status` and `podsteer maps`, and removes everything.

use std::process::Command;

use podsteer_lab::agent::{Agent, bin};
use podsteer_lab::proxy::Proxy;
use podsteer_lab::workload::{run_client, start_server};
use podsteer_lab::{Node, NodeOptions, PodSpec};

fn metric(proxy: &Proxy, pod: &str, dir: &str) -> f64 {
    proxy.metric(&format!("podsteer_proxy_connections_opened_total{{pod=\"default/{pod}\",direction=\"{dir}\"}}")).unwrap_or(0.0)
}

fn ctl(agent: &Agent, node: &Node, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin("podsteer"))
        .args(["--bpffs", &agent.bpffs.display().to_string(), "--state-dir", &agent.state_dir.display().to_string()])
        .args(["--socket", &agent.socket.display().to_string(), "--cni-conf-dir", &node.cni_conf_dir().display().to_string()])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn section(title: &str) {
    println!("\n=== {title} {}", "=".repeat(70usize.saturating_sub(title.len())));
}

fn run_mode(mode: &str, last: bool) -> anyhow::Result<()> {
    section(&format!("{mode} mode"));
    let node = Node::new(NodeOptions::default())?;
    // A database that predates the mesh, so it is not meshed.
    let db = node.add_pod(PodSpec::new("default", "db"))?;
    let _db_app = start_server(&db, None, &["whoami", "[::]:5432", "db"])?;
    // The product's default: connections to unmeshed destinations skip the proxy.
    let agent = Agent::start_installed(&node, mode, &["--unmeshed-outbound", "direct"])?;
    let proxy = Proxy::start_shared(&node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?;
    let status = agent.status()?;
    println!("agent: mode {} ({})", status["mode"], status["reason"].as_str().unwrap_or_default());
    let types: Vec<String> = node.runtime().conflist()["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["type"].as_str().map(str::to_owned))
        .collect();
    println!("conflist chain after install: {}", types.join(" -> "));

    // Pods started through the chain: bridge, host-local, portmap, podsteer-cni.
    let backend = node.add_pod(PodSpec::new("default", "backend"))?;
    let frontend = node.add_pod(PodSpec::new("default", "frontend").annotate("podsteer.io/exclude-outbound-ports", "5432"))?;
    let _backend_app = start_server(&backend, None, &["whoami", "[::]:8080", "backend"])?;
    println!("\n{}", ctl(&agent, &node, &["pods"])?.trim_end());

    println!("\n{:<10} {:<22} {:<10} {:<11} SERVER SAW", "FROM", "TO", "ANSWERED", "VIA PROXY?");
    let b = backend.ipv4().expect("v4");
    let d = db.ipv4().expect("v4");
    let direct = |pod: &str| {
        agent
            .metric(&format!("podsteer_proxy_connections_opened_total{{pod=\"default/{pod}\",direction=\"outbound\",path=\"direct\"}}"))
            .unwrap_or(0.0)
    };
    for (from, to, pod_label) in [
        (&frontend, format!("{b}:8080"), "frontend"),
        (&frontend, format!("{d}:5432"), "frontend"),
        (&backend, format!("{d}:5432"), "backend"),
        (&db, format!("{b}:8080"), "db"),
    ] {
        let before_out = metric(&proxy, pod_label, "outbound");
        let before_in = metric(&proxy, "backend", "inbound");
        let before_direct = direct(pod_label);
        let line = run_client(from, &["hello", &to])?;
        let who = line.split_whitespace().next().unwrap_or("").trim_start_matches("server=").to_owned();
        // The agent's series lag its totals by up to a second.
        let accounted = || {
            podsteer_lab::wait::until("the direct series", std::time::Duration::from_secs(3), || {
                (direct(pod_label) > before_direct).then_some(())
            })
            .is_ok()
        };
        let via = match (metric(&proxy, pod_label, "outbound") > before_out, metric(&proxy, "backend", "inbound") > before_in) {
            (true, true) => "out + in",
            (true, false) => "outbound",
            (false, true) => "inbound",
            (false, false) if mode == "ebpf" && pod_label == "backend" && accounted() => "no: direct",
            (false, false) => "no",
        };
        let peer = line.split_whitespace().find_map(|w| w.strip_prefix("peer=")).unwrap_or("").to_owned();
        println!("{:<10} {:<22} {:<10} {:<11} peer {}", from.name(), to, who, via, peer);
    }
    println!("\n{}", ctl(&agent, &node, &["explain", "default/frontend", &format!("{d}:5432")])?.trim_end());
    println!("\n{}", ctl(&agent, &node, &["explain", "default/backend", &format!("{d}:5432")])?.trim_end());
    if mode == "ebpf" {
        // The proxy never saw that one; the agent wrote its access line from the kernel's record.
        let log = agent.log_text();
        if let Some(line) = log.lines().find(|l| l.contains(" access: ") && l.contains("path=\"direct\"")) {
            println!("\nagent: {}", line.split_once(" access: ").map(|(_, l)| l).unwrap_or(line));
        }
    }
    if last {
        section("podsteer status");
        print!("{}", ctl(&agent, &node, &["status"])?);
        section("podsteer maps");
        print!("{}", ctl(&agent, &node, &["maps"])?);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    println!("podsteer demo: a simulated node per mode (netns + real CNI plugins + the real agent and proxy)");
    run_mode("iptables", false)?;
    run_mode("ebpf", true)?;
    println!("\nlab removed: netns, cgroups, pins, processes and state are gone (`cargo xtask lab clean` finds nothing)");
    Ok(())
}
