//! A hostile client against the shared proxy: an unmeshed pod opens 5,000
//! silent connections to one meshed server while a neighbour pod on the same
//! node and proxy does 1-byte request/response with another server. Reported:
//! the neighbour's latency without and with the flood, how much of the flood
//! the victim's per-pod limit let in, and how soon the first-byte deadline shed it.

use std::time::{Duration, Instant};

use podsteer_lab::agent::bin;
use podsteer_lab::wait;
use serde_json::{Value, json};

use crate::Plan;
use crate::measure::loadgen;
use crate::setup::{Lab, SERVER_PORT};

/// The figure: more than the default per-pod limit (4096).
pub const SILENT: usize = 5000;

pub fn run(lab: &Lab, plan: &Plan) -> anyhow::Result<Value> {
    let Some(neighbour) = lab.scenarios.iter().find(|s| s.name == "podsteer+ebpf mesh") else { return Ok(Value::Null) };
    let setup = &lab.setups[neighbour.node];
    let (Some(proxy), Some(attacker)) = (setup.proxies.first(), setup.pods.get("attacker")) else { return Ok(Value::Null) };
    let victim = "server-meshed";
    let victim_addr = format!("{}:{SERVER_PORT}", setup.pods[victim].ipv4().expect("v4"));
    let metric = |what: &str, extra: &str| {
        proxy.metric(&format!("podsteer_proxy_{what}{{pod=\"bench/{victim}\",direction=\"inbound\"{extra}}}")).unwrap_or(0.0)
    };
    let (w, r) = (plan.warm_ms.to_string(), plan.run_ms.to_string());
    let client = lab.client(neighbour);
    let addr = lab.server_addr(neighbour);
    let rr = || -> anyhow::Result<Vec<Value>> {
        (0..plan.rounds).map(|_| loadgen(client, &["rr", &addr, "1", "1", &w, &r].map(str::to_owned))).collect()
    };
    let unloaded = rr()?;
    let shed_before = metric("connections_closed_total", ",result=\"first_byte_timeout\"");
    let refused_before = metric("connections_closed_total", ",result=\"pod_limit\"");
    let mut cmd = attacker.command(bin("podsteer-lab-tool"))?;
    cmd.args(["silent", &victim_addr, &SILENT.to_string()]).stdout(std::process::Stdio::piped());
    let flood = attacker.spawn("silent", cmd)?;
    let started = Instant::now();
    let limit = proxy.metric("podsteer_proxy_pod_limit{limit=\"connections\"}")?;
    wait::until("the victim to be at its connection limit", Duration::from_secs(60), || {
        (metric("connections_active", "") >= limit).then_some(())
    })?;
    let loaded = rr()?;
    wait::until("the flood to be shed", Duration::from_secs(60), || {
        (metric("connections_closed_total", ",result=\"first_byte_timeout\"") - shed_before >= limit).then_some(())
    })?;
    let shed_after = started.elapsed();
    // Its limit freed, the victim serves again.
    let victim_after = loadgen(client, &["rr", &victim_addr, "1", "1", &w, &r].map(str::to_owned))?;
    drop(flood);
    let median = |v: &[Value], k: &str| {
        let mut xs: Vec<f64> = v.iter().filter_map(|x| x[k].as_f64()).collect();
        xs.sort_by(f64::total_cmp);
        xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let out = json!({
        "silent_connections": SILENT,
        "victim_limit": limit,
        "refused_by_limit": metric("connections_closed_total", ",result=\"pod_limit\"") - refused_before,
        "shed_after_s": shed_after.as_secs_f64(),
        "neighbour_p50_us": {"unloaded": median(&unloaded, "p50_us"), "flooded": median(&loaded, "p50_us")},
        "neighbour_p99_us": {"unloaded": median(&unloaded, "p99_us"), "flooded": median(&loaded, "p99_us")},
        "neighbour_requests_failed": loaded.iter().map(|v| v["mismatches"].as_u64().unwrap_or(0)).sum::<u64>(),
        "victim_served_after_shedding": victim_after["requests"].as_u64().unwrap_or(0) > 0,
    });
    eprintln!("bench: silent-connection flood: {out}");
    Ok(out)
}
