//! `podsteer status` and `podsteer pods`.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::output::table;
use super::{CtlError, Paths, exit};
use podsteer_agent::api::{self, Request};

const AGENT_DEADLINE: Duration = Duration::from_secs(3);

#[derive(Debug, Serialize)]
pub struct Status {
    pub agent: Health,
    pub mode: Option<String>,
    pub reason: Option<String>,
    pub features: Vec<Value>,
    pub cgroup: Option<String>,
    pub pins: Option<String>,
    pub links: Vec<String>,
    pub proxy: Health,
    pub pods: usize,
    pub cni: CniEntry,
    /// Where identities and peers come from: `kubernetes`, `files DIR`, or none.
    pub workloads: Option<String>,
    /// With `--kubernetes`, what the API's watches say (live agent only).
    pub kubernetes: Option<Value>,
    /// Why the newest security policies are refused, while they are.
    pub policies_refused: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Health {
    pub up: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct CniEntry {
    pub conflist: Option<String>,
    pub installed: bool,
    pub last: bool,
}

fn agent_status(paths: &Paths) -> Result<Value, String> {
    match api::call(&paths.socket, &Request::Status, AGENT_DEADLINE, None) {
        Ok(r) => r.into_result().map_err(|e| e.message),
        Err(e) => Err(podsteer_agent::controller::error_chain(&e)),
    }
}

pub fn status(paths: &Paths) -> Result<Status, CtlError> {
    let live = agent_status(paths);
    // With the agent down, what it decided at start is in its state dir.
    let saved: Value = std::fs::read(paths.state_dir.join(podsteer_agent::controller::STATUS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let src = live.as_ref().unwrap_or(&saved);
    if live.is_err() && saved.is_null() {
        return Err(CtlError::new(
            exit::UNAVAILABLE,
            format!(
                "no podsteer agent answers on {} and none has run with state dir {}",
                paths.socket.display(),
                paths.state_dir.display()
            ),
        ));
    }
    let pins = podsteer_agent::ebpf::pins::PinDir::new(&paths.bpffs);
    let mut links: Vec<String> =
        std::fs::read_dir(pins.links()).into_iter().flatten().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    links.sort();
    let proxy = match &live {
        Ok(v) => match v["proxy_pid"].as_u64() {
            Some(pid) => Health { up: true, detail: format!("shared proxy pid {pid} connected") },
            None if v["config"]["proxy_socket"].is_null() => {
                Health { up: true, detail: "no shared proxy configured (sidecar or external proxies)".into() }
            }
            None => Health { up: false, detail: "no shared proxy connected".into() },
        },
        Err(_) => Health { up: false, detail: "unknown while the agent is down".into() },
    };
    let primary = podsteer_agent::install::primary(&paths.cni_conf_dir);
    let conf: Value = primary.as_ref().and_then(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok()).unwrap_or(Value::Null);
    let types: Vec<&str> = conf["plugins"].as_array().into_iter().flatten().filter_map(|p| p["type"].as_str()).collect();
    Ok(Status {
        agent: match &live {
            Ok(_) => Health { up: true, detail: format!("answering on {}", paths.socket.display()) },
            Err(e) => Health { up: false, detail: e.clone() },
        },
        mode: src["mode"].as_str().map(str::to_owned),
        reason: src["reason"].as_str().map(str::to_owned),
        features: src["features"].as_array().cloned().unwrap_or_default(),
        cgroup: src["cgroup"].as_str().map(str::to_owned),
        pins: pins.exists().then(|| pins.root().display().to_string()),
        links,
        proxy,
        pods: paths.registry().len(),
        cni: CniEntry {
            conflist: primary.map(|p| p.display().to_string()),
            installed: types.contains(&podsteer_proto::cni::PLUGIN_TYPE),
            last: types.last() == Some(&podsteer_proto::cni::PLUGIN_TYPE),
        },
        workloads: match (saved["mesh"]["kubernetes"].as_bool(), saved["mesh"]["workload_dir"].as_str()) {
            (Some(true), _) => Some("kubernetes".into()),
            (_, Some(dir)) => Some(format!("files {dir}")),
            _ => None,
        },
        kubernetes: live.as_ref().ok().map(|v| v["kubernetes"].clone()).filter(|k| !k.is_null()),
        policies_refused: live.as_ref().ok().and_then(|v| v["policies_refused"].as_str().map(str::to_owned)),
    })
}

pub fn render_status(s: &Status) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    let missing: Vec<String> =
        s.features.iter().filter(|f| f["present"] == false).filter_map(|f| f["name"].as_str().map(str::to_owned)).collect();
    let mut rows = vec![
        vec!["agent".into(), format!("{} ({})", if s.agent.up { "up" } else { "DOWN" }, s.agent.detail)],
        vec!["mode".into(), s.mode.clone().unwrap_or_default()],
        vec!["why".into(), s.reason.clone().unwrap_or_default()],
        vec![
            "kernel features".into(),
            format!(
                "{} probed, {} missing{}",
                s.features.len(),
                missing.len(),
                if missing.is_empty() { String::new() } else { format!(": {}", missing.join(", ")) }
            ),
        ],
        vec!["attach cgroup".into(), s.cgroup.clone().unwrap_or_default()],
        vec!["pins".into(), s.pins.clone().unwrap_or_else(|| "none".into())],
        vec!["links".into(), s.links.join(", ")],
        vec!["proxy".into(), format!("{} ({})", if s.proxy.up { "ok" } else { "NOT OK" }, s.proxy.detail)],
        vec!["pods".into(), s.pods.to_string()],
    ];
    rows.push(vec!["workloads".into(), workloads_row(s)]);
    if let Some(why) = &s.policies_refused {
        rows.push(vec!["policies".into(), format!("REFUSED, the last good set is in force: {why}")]);
    }
    rows.push(vec![
        "cni entry".into(),
        format!(
            "{} in {} (last in chain: {})",
            yes(s.cni.installed),
            s.cni.conflist.clone().unwrap_or_else(|| "no conflist".into()),
            yes(s.cni.last)
        ),
    ]);
    table(&["", ""], &rows).lines().skip(1).collect::<Vec<_>>().join("\n") + "\n"
}

/// `kubernetes: 3 pods listed; AuthorizationPolicy 1, PeerAuthentication (no CRD)`.
fn workloads_row(s: &Status) -> String {
    let Some(source) = &s.workloads else { return "none (pods get no identity)".into() };
    let Some(k) = &s.kubernetes else { return source.clone() };
    let pods = match (k["synced"].as_bool(), k["from_snapshot"].as_bool()) {
        (Some(true), _) => format!("{} pods listed", k["pods"]),
        (_, Some(true)) => format!("{} pods from the last run's snapshot, not listed yet", k["pods"]),
        _ => "not listed yet".into(),
    };
    let mut out = format!("{source}: {pods}");
    if let Some(kinds) = k["policies"].as_object() {
        let each: Vec<String> = kinds
            .iter()
            .map(|(kind, v)| match (v["crd_installed"].as_bool(), v["synced"].as_bool()) {
                (Some(false), _) => format!("{kind} (no CRD)"),
                (_, Some(true)) => format!("{kind} {}", v["objects"]),
                _ => format!("{kind} not listed yet"),
            })
            .collect();
        out.push_str(&format!("; {}", each.join(", ")));
    }
    if let Some(e) = k["error"].as_str() {
        out.push_str(&format!("; last error: {e}"));
    }
    out
}

#[derive(Debug, Serialize)]
pub struct PodRow {
    pub pod: String,
    pub uid: String,
    pub mode: String,
    pub netns_cookie: u64,
    pub ips: Vec<String>,
    /// The kernel side is in place right now (PODS entry and link, or the iptables chains).
    pub programmed: bool,
    pub proxy_listening: bool,
    pub last_error: Option<String>,
}

pub fn pods(paths: &Paths) -> Result<Vec<PodRow>, CtlError> {
    let registry = paths.registry();
    let pins = podsteer_agent::ebpf::maps::Maps::open_pinned(&paths.bpffs).ok();
    let agent_up = agent_status(paths).is_ok();
    Ok(registry
        .into_iter()
        .map(|p| {
            let mode = serde_json::to_value(p.mode).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            let programmed = if agent_up {
                api::call(&paths.socket, &Request::Check { uid: p.uid.clone() }, AGENT_DEADLINE, None).map(|r| r.ok).unwrap_or(false)
            } else {
                // Without the agent, the pinned map is the truth in eBPF mode.
                mode == "ebpf" && pins.as_ref().is_some_and(|m| m.pods.get(&p.netns_cookie, 0).is_ok())
            };
            PodRow {
                pod: format!("{}/{}", p.namespace, p.name),
                uid: p.uid,
                mode,
                netns_cookie: p.netns_cookie,
                ips: p.ips.iter().map(|i| i.to_string()).collect(),
                programmed,
                proxy_listening: p.proxy_ready,
                last_error: p.last_error,
            }
        })
        .collect())
}

pub fn render_pods(rows: &[PodRow]) -> String {
    let yes = |b: bool| if b { "yes" } else { "NO" }.to_owned();
    table(
        &["POD", "MODE", "COOKIE", "IPS", "PROGRAMMED", "PROXY", "LAST ERROR"],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.pod.clone(),
                    r.mode.clone(),
                    r.netns_cookie.to_string(),
                    r.ips.join(","),
                    yes(r.programmed),
                    yes(r.proxy_listening),
                    r.last_error.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect::<Vec<_>>(),
    )
}
