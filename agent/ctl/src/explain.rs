//! `podsteer explain POD DEST`: would a connection from POD to DEST be
//! intercepted, what decides it, and where would it land. It runs the very
//! decision the connect4/6 programs run, on the policy actually in the map.

use std::net::SocketAddr;

use podsteer_common::Verdict;
use serde::Serialize;

use super::{CtlError, Paths, exit};
use podsteer_agent::ebpf::maps::ip_key;
use podsteer_agent::mode::Mode;

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub pod: String,
    pub destination: SocketAddr,
    pub mode: String,
    pub intercepted: bool,
    pub reason: String,
    /// The map entry or iptables rule that decides.
    pub decided_by: String,
    /// Where the connection goes.
    pub lands_on: String,
    /// How the destination's proxy judges it; absent without a workload source.
    pub authorization: Option<crate::authz::AuthzExplanation>,
}

fn rule_comment(v: Verdict) -> String {
    match v.rule_names() {
        [] => "(no jump to PODSTEER_OUTPUT)".into(),
        names => names.iter().map(|n| format!("podsteer/{n}")).collect::<Vec<_>>().join(" or "),
    }
}

pub fn explain(paths: &Paths, pod: &str, dest: &str) -> Result<Explanation, CtlError> {
    let destination: SocketAddr =
        dest.parse().map_err(|_| CtlError::new(exit::USAGE, format!("{dest:?} is not IP:PORT (use [v6]:port for IPv6)")))?;
    if let Ok(ip) = pod.parse::<std::net::IpAddr>() {
        // An address, not a pod here: nothing of it is intercepted on this node.
        return Ok(Explanation {
            pod: pod.into(),
            destination,
            mode: "-".into(),
            intercepted: false,
            reason: "the source is an address, not a pod registered on this node".into(),
            decided_by: "-".into(),
            lands_on: destination.to_string(),
            authorization: crate::authz::explain(paths, crate::authz::Source::Ip(ip), destination)?,
        });
    }
    let registry = paths.registry();
    let Some(rec) = registry.iter().find(|p| format!("{}/{}", p.namespace, p.name) == pod) else {
        return Err(CtlError::new(
            exit::NO_SUCH_POD,
            format!("pod {pod} is not registered on this node, so nothing of its traffic is intercepted"),
        ));
    };
    let mut dst = ip_key(destination.ip());
    dst.port = destination.port().to_be();
    let (policy, decided_by, mode, meshed) = match rec.mode {
        Mode::Ebpf => {
            super::require_pins(&paths.bpffs)?;
            let maps = podsteer_agent::ebpf::maps::Maps::open_pinned(&paths.bpffs)
                .map_err(|e| CtlError::new(exit::FAILURE, podsteer_agent::controller::error_chain(&e)))?;
            match maps.pods.get(&rec.netns_cookie, 0) {
                Ok(p) => (p, format!("PODS[{}]", rec.netns_cookie), "ebpf", Some(maps.is_meshed(destination.ip()))),
                Err(_) => {
                    return Ok(Explanation {
                        pod: pod.into(),
                        destination,
                        mode: "ebpf".into(),
                        intercepted: false,
                        reason: "the pod's netns is not in PODS: interception is NOT in place".into(),
                        decided_by: format!("PODS has no entry {}", rec.netns_cookie),
                        lands_on: destination.to_string(),
                        authorization: None,
                    });
                }
            }
        }
        Mode::Iptables => (rec.policy.to_kernel(), String::new(), "iptables", None),
    };
    let verdict = match meshed {
        Some(meshed) => policy.outbound_decision(&dst, meshed),
        // iptables mode has no per-destination decision: it proxies what the exemptions leave.
        None => policy.outbound_verdict(&dst),
    };
    let decided_by = if mode == "iptables" {
        format!("rule {} in PODSTEER_OUTPUT", rule_comment(verdict))
    } else {
        format!("{decided_by}: {}", field(verdict, meshed == Some(true)))
    };
    let lands_on = if verdict == Verdict::Redirect {
        // An IPv4-mapped destination is IPv4 (ip_key unmapped it), as connect6 treats it.
        let lo = match (destination.is_ipv4(), dst.family == podsteer_common::AF_INET) {
            (true, _) => "127.0.0.1",
            (false, true) => "[::ffff:127.0.0.1]",
            (false, false) => "[::1]",
        };
        format!("{lo}:{} in the pod's netns (the proxy's outbound listener), original destination {destination}", policy.outbound_port)
    } else {
        destination.to_string()
    };
    Ok(Explanation {
        pod: pod.into(),
        destination,
        mode: mode.into(),
        intercepted: verdict == Verdict::Redirect,
        reason: verdict.reason().into(),
        decided_by,
        lands_on,
        authorization: crate::authz::explain(paths, crate::authz::Source::Pod(rec), destination)?,
    })
}

fn field(v: Verdict, meshed: bool) -> &'static str {
    match v {
        Verdict::Redirect if meshed => "outbound_port (the destination is meshed: POD_BY_IP or MESH_PEERS)",
        Verdict::Redirect => "outbound_port (flags: proxy unmeshed destinations too)",
        Verdict::Direct => "neither POD_BY_IP nor MESH_PEERS has the destination, and flags do not ask for the proxy",
        Verdict::OutboundOff => "flags",
        Verdict::Local => "ipv4/ipv6 (own address) or loopback",
        Verdict::LinkLocal => "(fe80::/10, in the program)",
        Verdict::ExcludedPort => "excluded_outbound_ports",
        Verdict::ExcludedCidr => "excluded_cidrs",
    }
}

pub fn render(e: &Explanation) -> String {
    let authz = e.authorization.as_ref().map(crate::authz::render).unwrap_or_default();
    authz_after(
        format!(
            "{} -> {}: {}\n  mode:       {}\n  why:        {}\n  decided by: {}\n  lands on:   {}\n",
            e.pod,
            e.destination,
            if e.intercepted { "INTERCEPTED" } else { "not intercepted" },
            e.mode,
            e.reason,
            e.decided_by,
            e.lands_on
        ),
        authz,
    )
}

fn authz_after(head: String, authz: String) -> String {
    head + &authz
}
