//! Running the figures: pinned (headline) and unpinned, scenario by scenario,
//! alternating the order each round.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::Stdio;
use std::time::Instant;

use podsteer_lab::Pod;
use podsteer_lab::agent::bin;
use podsteer_lab::netns::NetNs;
use serde::Serialize;
use serde_json::{Value, json};

use crate::Plan;
use crate::setup::{Lab, Scenario};

/// The one CPU the headline figures run on: client, server and proxies share it,
/// so no wakeup crosses vCPUs (about 25 µs here, more than what is measured).
const PINNED_CPU: usize = 0;

#[derive(Debug, Default, Serialize, Clone)]
pub struct Round {
    pub rr1: Value,
    pub rr1k: Value,
    pub rr32: Value,
    pub bulk1: Value,
    pub bulk4: Value,
    pub connrate: Value,
    pub rr1_unpinned: Value,
    pub bulk1_unpinned: Value,
    /// Proxy CPU seconds and requests during the pinned 1-byte run.
    pub proxy_cpu_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub scenarios: Vec<(String, String, String)>,
    pub rounds: BTreeMap<String, Vec<Round>>,
    pub memory: Value,
    pub cni_add_ms: Value,
    pub flood: Value,
    pub validation: Value,
    pub mtls: Value,
    pub machine: Value,
}

/// Sets the CPU affinity of every thread of `pid`.
fn pin(pid: i32, cpus: &[usize]) {
    let mut set = nix::sched::CpuSet::new();
    for c in cpus {
        let _ = set.set(*c);
    }
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().filter_map(|e| e.ok()) {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
        }
    }
}

fn all_cpus() -> Vec<usize> {
    (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat: 11 and 12 counting from the
    // state field after the command name. Ticks are 1/100 s.
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Runs the load generator in `pod` and parses its JSON line. A run that
/// stalls (no reply for 10 s) is retried twice and the stall is counted: it is
/// a finding about that setup, not noise to hide.
pub fn loadgen(pod: &Pod, args: &[String]) -> anyhow::Result<Value> {
    let mut stalls = Vec::new();
    for _ in 0..3 {
        let out = pod.command(bin("podsteer-loadgen"))?.args(args).output()?;
        if out.status.success() {
            let mut v: Value = serde_json::from_slice(&out.stdout)?;
            v["stalls"] = json!(stalls.len());
            if !stalls.is_empty() {
                eprintln!("bench: {args:?} stalled {} time(s) before succeeding: {}", stalls.len(), stalls.join("; "));
            }
            return Ok(v);
        }
        stalls.push(String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").to_owned());
    }
    if let Some(secs) = std::env::var("PODSTEER_BENCH_HOLD_SECS").ok().and_then(|s| s.parse().ok()) {
        // For a person investigating: the lab stays up this long before teardown.
        eprintln!("bench: holding the lab for {secs} s (pid {})", std::process::id());
        std::thread::sleep(std::time::Duration::from_secs(secs));
    }
    anyhow::bail!("loadgen {args:?} failed three times: {}", stalls.join("; "))
}

fn place(lab: &Lab, s: &Scenario, cpus: &[usize]) {
    let setup = &lab.setups[s.node];
    for pid in setup.proxy_pids().into_iter().chain(setup.server_pids()) {
        pin(pid, cpus);
    }
}

/// Why the sk_msg opt-in rows have no bulk figures.
pub const SK_MSG_BULK: &str = "not measured: with sk_msg on app sockets (the opt-in), an ingress redirect is not bounded by \
     the receiver's buffer, and bulk pushes the node's TCP memory to ENOMEM (README, Known limits)";

/// Bulk runs everywhere but on the sk_msg opt-in, where the kernel's unbounded
/// ingress redirect fails them with ENOMEM; that is a documented limit of the
/// opt-in, and a full run must not die of it.
pub fn bulk_measured(s: &Scenario) -> bool {
    !s.name.contains("+skmsg")
}

fn round_for(lab: &Lab, s: &Scenario, plan: &Plan) -> anyhow::Result<Round> {
    let client = lab.client(s);
    let addr = lab.server_addr(s);
    let (w, r) = (plan.warm_ms.to_string(), plan.run_ms.to_string());
    let cpu = PINNED_CPU.to_string();
    let args = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    place(lab, s, &[PINNED_CPU]);
    let pids = lab.setups[s.node].proxy_pids();
    let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let rr1 = loadgen(client, &args(&["rr", &addr, "1", "1", &w, &r, &cpu]))?;
    let proxy_cpu_s = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
    let bulk = |v: &[&str]| if bulk_measured(s) { loadgen(client, &args(v)) } else { Ok(json!({ "skipped": SK_MSG_BULK })) };
    let round = Round {
        rr1,
        rr1k: loadgen(client, &args(&["rr", &addr, "1024", "1", &w, &r, &cpu]))?,
        rr32: loadgen(client, &args(&["rr", &addr, "1", "32", &w, &r, &cpu]))?,
        bulk1: bulk(&["bulk", &addr, "1", &r, &cpu])?,
        bulk4: bulk(&["bulk", &addr, "4", &r, &cpu])?,
        connrate: loadgen(client, &args(&["connrate", &addr, &r, &cpu]))?,
        proxy_cpu_s,
        ..Round::default()
    };
    place(lab, s, &all_cpus());
    Ok(Round {
        rr1_unpinned: loadgen(client, &args(&["rr", &addr, "1", "1", &w, &r]))?,
        bulk1_unpinned: bulk(&["bulk", &addr, "1", &r])?,
        ..round
    })
}

pub fn run(lab: &Lab, plan: &Plan) -> anyhow::Result<Results> {
    let mut rounds: BTreeMap<String, Vec<Round>> = BTreeMap::new();
    for r in 0..plan.rounds {
        let mut order: Vec<&Scenario> = lab.scenarios.iter().collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for s in order {
            eprintln!("bench: round {}/{} {}", r + 1, plan.rounds, s.name);
            rounds.entry(s.name.to_owned()).or_default().push(round_for(lab, s, plan)?);
        }
    }
    for s in &lab.scenarios {
        place(lab, s, &all_cpus());
    }
    Ok(Results {
        scenarios: lab.scenarios.iter().map(|s| (s.name.to_owned(), s.setup.to_owned(), s.variant.to_owned())).collect(),
        rounds,
        memory: memory(lab, plan)?,
        flood: crate::flood::run(lab, plan)?,
        cni_add_ms: cni_adds(lab, plan)?,
        validation: sockperf(lab, plan)?,
        mtls: crate::mtls::run(lab, plan.quick)?,
        machine: machine(),
    })
}

/// Proxy RSS idle and holding idle proxied connections (outbound-only, so one hop).
fn memory(lab: &Lab, plan: &Plan) -> anyhow::Result<Value> {
    let mut out = serde_json::Map::new();
    for (label, name) in
        [("podsteer", "podsteer+ebpf+skmsg out"), ("haproxy", "haproxy+iptables out"), ("podsteer mTLS", "podsteer mTLS across")]
    {
        let Some(s) = lab.scenarios.iter().find(|s| s.name == name) else { continue };
        // Over HBONE both ends hold each connection: both proxies count.
        let pids = if label == "podsteer mTLS" { lab.setups[s.node].proxy_pids() } else { vec![lab.setups[s.node].proxy_pids()[0]] };
        let rss = || pids.iter().map(|p| rss_kib(*p)).sum::<u64>();
        let pid = pids[0];
        let idle = rss();
        let mut cmd = lab.client(s).command(bin("podsteer-loadgen"))?;
        cmd.args(["idle", &lab.server_addr(s), &plan.idle_conns.to_string()]).stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        anyhow::ensure!(line.starts_with("ready"), "idle connections: {line}");
        // The client is done once connected; the proxy may still be accepting and
        // reading the first byte of each: wait for it to hold them all.
        let setup = &lab.setups[s.node];
        let key = format!("podsteer_proxy_connections_active{{pod=\"bench/{}\",direction=\"outbound\"}}", s.client);
        podsteer_lab::wait::until("the proxy to hold every idle connection", std::time::Duration::from_secs(60), || {
            match setup.proxies.first() {
                Some(p) => (p.metric(&key).ok()? as usize >= plan.idle_conns).then_some(()),
                None => {
                    let a = rss_kib(pid);
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    (rss_kib(pid) == a).then_some(())
                }
            }
        })?;
        if label == "podsteer mTLS" {
            // And the server's proxy has every stream relayed to the app.
            let key = "podsteer_proxy_connections_active{pod=\"bench/server\",direction=\"inbound\"}";
            podsteer_lab::wait::until("the server's proxy to hold every idle stream", std::time::Duration::from_secs(60), || {
                (setup.proxies.get(1)?.metric(key).ok()? as usize >= plan.idle_conns).then_some(())
            })?;
        }
        let busy = rss();
        drop(child.stdin.take());
        child.wait()?;
        let per_conn = (busy.saturating_sub(idle) * 1024) as f64 / plan.idle_conns as f64;
        out.insert(
            label.into(),
            json!({"idle_rss_kib": idle, "rss_kib_with_idle_conns": busy, "idle_conns": plan.idle_conns, "bytes_per_conn": per_conn}),
        );
        eprintln!("bench: {label} RSS idle {idle} KiB, {busy} KiB with {} idle connections ({per_conn:.0} B each)", plan.idle_conns);
    }
    Ok(Value::Object(out))
}

/// podsteer-cni ADD, timed from plugin start to exit, with the agent and proxy warm.
fn cni_adds(lab: &Lab, plan: &Plan) -> anyhow::Result<Value> {
    let setup = &lab.setups[3];
    let agent = setup.agent.as_ref().expect("agent");
    let conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "podsteer-cni", "agentSocket": agent.socket,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.250.0.2/24"}]}});
    let mut times = Vec::new();
    let run = |cmd: &str, ns: &NetNs, i: usize| -> anyhow::Result<std::time::Duration> {
        let started = Instant::now();
        let mut child = std::process::Command::new(bin("podsteer-cni"))
            // As a runtime starts it: `cargo run` points the loader at the
            // toolchain's directories, which costs every exec a few dozen failed opens.
            .env_remove("LD_LIBRARY_PATH")
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", format!("bench{i}"))
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env("CNI_ARGS", format!("K8S_POD_NAMESPACE=bench;K8S_POD_NAME=cni{i};K8S_POD_UID=bench-cni-{i}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("piped").write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let took = started.elapsed();
        anyhow::ensure!(out.status.success(), "cni {cmd}: {}", String::from_utf8_lossy(&out.stdout));
        Ok(took)
    };
    // ADD latency on a settled node: the memory figure just closed thousands of
    // connections through this node's proxy, and on two vCPUs their teardown
    // would be what the ADDs measure.
    if let Some(proxy) = setup.proxies.first() {
        let active = || -> Option<f64> {
            let text = proxy.get("/metrics").ok()?;
            Some(
                text.lines()
                    .filter(|l| l.starts_with("podsteer_proxy_connections_active{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum(),
            )
        };
        podsteer_lab::wait::until("the proxy to finish closing connections", std::time::Duration::from_secs(60), || {
            (active()? == 0.0).then_some(())
        })?;
    }
    // "With the agent warm": the first few ADDs fault in code and maps, and are not counted.
    const WARMUP: usize = 10;
    for i in 0..plan.cni_adds + WARMUP {
        let ns = NetNs::create(&setup.node.id().netns_name(&format!("cni{i}")))?;
        // The agent accepts only IPs the netns really has: give it the one
        // prevResult names (outside the timed ADD).
        let st = std::process::Command::new("ip").args(["-n", ns.name(), "addr", "add", "10.250.0.2/24", "dev", "lo"]).status()?;
        anyhow::ensure!(st.success(), "adding the pod address to {}: {st}", ns.name());
        let took = run("ADD", &ns, i)?;
        if i >= WARMUP {
            times.push(took.as_secs_f64() * 1000.0);
        }
        run("DEL", &ns, i)?;
    }
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    Ok(json!({"adds": times.len(), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": q(1.0)}))
}

/// The load generator against sockperf (from apt) on the direct path, both pinned.
fn sockperf(lab: &Lab, plan: &Plan) -> anyhow::Result<Value> {
    let s = &lab.scenarios[0];
    let setup = &lab.setups[s.node];
    let server = &setup.pods[s.server];
    let ip = server.ipv4().expect("v4").to_string();
    let mut cmd = server.command("taskset")?;
    cmd.args(["-c", &PINNED_CPU.to_string(), "sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", "11111"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _srv = server.spawn("sockperf", cmd)?;
    let client = lab.client(s);
    podsteer_lab::wait::until("sockperf server", std::time::Duration::from_secs(5), || {
        client.run(|| std::net::TcpStream::connect((ip.as_str(), 11111)).is_ok()).ok()?.then_some(())
    })?;
    let secs = ((plan.run_ms * 2) / 1000).max(1).to_string();
    let out = client
        .command("taskset")?
        .args([
            "-c",
            &PINNED_CPU.to_string(),
            "sockperf",
            "ping-pong",
            "--tcp",
            "-i",
            &ip,
            "-p",
            "11111",
            "-m",
            "14",
            "-t",
            &secs,
            "--full-rtt",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let sockperf_p50 = text.lines().find_map(|l| l.split("percentile 50.000 =").nth(1)?.trim().parse::<f64>().ok());
    place(lab, s, &[PINNED_CPU]);
    let ours = loadgen(
        client,
        &["rr", &lab.server_addr(s), "14", "1", &plan.warm_ms.to_string(), &(plan.run_ms * 2).to_string(), &PINNED_CPU.to_string()]
            .map(str::to_owned),
    )?;
    place(lab, s, &all_cpus());
    let ours_p50 = ours["p50_us"].as_f64();
    let agree = match (sockperf_p50, ours_p50) {
        (Some(a), Some(b)) => ((a - b).abs() / a) <= 0.20,
        _ => false,
    };
    eprintln!(
        "bench: direct RR p50, 14-byte messages: sockperf {sockperf_p50:?} us, podsteer-loadgen {ours_p50:?} us (agree within 20%: {agree})"
    );
    Ok(
        json!({"tool": "sockperf ping-pong --tcp -m 14 --full-rtt", "sockperf_p50_us": sockperf_p50, "loadgen_p50_us": ours_p50, "within_20_percent": agree}),
    )
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(|s| s.trim().to_owned()))
        .unwrap_or_default();
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let mem = read("/proc/meminfo").lines().next().unwrap_or_default().split_whitespace().nth(1).unwrap_or("").to_owned();
    json!({"cpu": model, "cpus": all_cpus().len(), "kernel": kernel, "mem_kib": mem, "os": read("/etc/debian_version").trim()})
}
