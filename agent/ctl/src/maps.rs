//! `podsteer maps`: every redirect map, decoded.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use podsteer_common::policy::flags;
use podsteer_common::{AF_INET, Addr, Cidr, PodPolicy};
use serde::Serialize;

use super::output::table;
use super::{CtlError, Paths, exit};
use podsteer_agent::ebpf::maps::Maps;

/// Names accepted by `--map`.
pub const MAP_NAMES: &[&str] = &[
    "pods",
    "pod_ips",
    "mesh_peers",
    "original_destinations",
    "sock_pairs",
    "passthrough",
    "inbound_listeners",
    "direct_traffic",
    "counters",
];

#[derive(Debug, Default, Serialize)]
pub struct Dump {
    pub pins: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<PodEntry>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<PodIp>>,
    /// Meshed pods on other nodes: connects to them are proxied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_peers: Option<Vec<IpAddr>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_destinations: Option<Vec<OrigEntry>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sock_pairs: Option<Vec<Pair>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<Vec<Pair>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_listeners: Option<Vec<Listener>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_traffic: Option<Vec<Traffic>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<BTreeMap<String, u64>>,
}

/// A pod's direct connections (no proxy), summed over CPUs.
#[derive(Debug, Serialize)]
pub struct Traffic {
    pub netns_cookie: u64,
    pub pod: Option<String>,
    pub opened: u64,
    /// By result, as the proxy names them.
    pub closed: BTreeMap<&'static str, u64>,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

#[derive(Debug, Serialize)]
pub struct PodEntry {
    pub netns_cookie: u64,
    pub pod: Option<String>,
    pub ipv4: Option<IpAddr>,
    pub ipv6: Option<IpAddr>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub flags: Vec<&'static str>,
    pub proxy_mark: u32,
    pub proxy_uid: u32,
    pub excluded_outbound_ports: Vec<u16>,
    pub excluded_inbound_ports: Vec<u16>,
    pub excluded_cidrs: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PodIp {
    pub ip: IpAddr,
    pub netns_cookie: u64,
    pub pod: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct OrigEntry {
    pub netns_cookie: u64,
    pub pod: Option<String>,
    /// The app's socket, as the proxy sees its peer.
    pub app: SocketAddr,
    /// The proxy listener the app's connect was sent to.
    pub proxy: SocketAddr,
    pub original_dst: SocketAddr,
}

#[derive(Debug, Serialize)]
pub struct Pair {
    pub netns_cookie: u64,
    pub pod: Option<String>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

#[derive(Debug, Serialize)]
pub struct Listener {
    pub netns_cookie: u64,
    pub pod: Option<String>,
    pub family: &'static str,
}

pub use podsteer_agent::ebpf::maps::{ip_of as ip, socket_addr_of as sock};

fn cidr(c: &Cidr) -> String {
    let a = Addr { ip: c.ip, port: 0, family: c.family };
    format!("{}/{}", ip(&a), c.prefix_len)
}

fn pod_entry(cookie: u64, p: &PodPolicy, name: Option<String>) -> PodEntry {
    let named = [
        (flags::OUTBOUND, "outbound"),
        (flags::INBOUND, "inbound"),
        (flags::SK_MSG, "sk_msg"),
        (flags::SIDECAR, "sidecar"),
        (flags::PROXY_UNMESHED, "proxy_unmeshed"),
    ];
    PodEntry {
        netns_cookie: cookie,
        pod: name,
        ipv4: (p.ipv4 != 0).then(|| ip(&Addr::v4(p.ipv4, 0))),
        ipv6: (p.ipv6 != [0; 4]).then(|| ip(&Addr::v6(p.ipv6, 0))),
        outbound_port: p.outbound_port,
        inbound_port: p.inbound_port,
        flags: named.iter().filter(|(f, _)| p.has(*f)).map(|(_, n)| *n).collect(),
        proxy_mark: p.proxy_mark,
        proxy_uid: p.proxy_uid,
        excluded_outbound_ports: p.excluded_outbound_ports.iter().copied().take_while(|p| *p != 0).collect(),
        excluded_inbound_ports: p.excluded_inbound_ports.iter().copied().take_while(|p| *p != 0).collect(),
        excluded_cidrs: p.excluded_cidrs.iter().take_while(|c| c.family != 0).map(cidr).collect(),
    }
}

/// Reads every map (or the one asked for), keeping only `pod`'s entries when given.
pub fn dump(paths: &Paths, only: Option<&str>, pod: Option<&str>) -> Result<Dump, CtlError> {
    if let Some(m) = only
        && !MAP_NAMES.contains(&m)
    {
        return Err(CtlError::new(exit::USAGE, format!("no map {m:?}; the maps are {}", MAP_NAMES.join(", "))));
    }
    super::require_pins(&paths.bpffs)?;
    let maps = Maps::open_pinned(&paths.bpffs).map_err(|e| CtlError::new(exit::FAILURE, podsteer_agent::controller::error_chain(&e)))?;
    let names: BTreeMap<u64, String> =
        paths.registry().into_iter().map(|p| (p.netns_cookie, format!("{}/{}", p.namespace, p.name))).collect();
    let want_cookie = match pod {
        None => None,
        Some(p) => Some(
            *names
                .iter()
                .find(|(_, n)| n.as_str() == p)
                .map(|(c, _)| c)
                .ok_or_else(|| CtlError::new(exit::NO_SUCH_POD, format!("pod {p} is not registered on this node")))?,
        ),
    };
    let keep = |c: u64| want_cookie.is_none_or(|w| w == c);
    let name = |c: u64| names.get(&c).cloned();
    let wants = |m: &str| only.is_none_or(|o| o == m);
    let mut d = Dump { pins: podsteer_agent::ebpf::pins::PinDir::new(&paths.bpffs).root().display().to_string(), ..Dump::default() };
    if wants("pods") {
        d.pods = Some(maps.pods.iter().filter_map(Result::ok).filter(|(c, _)| keep(*c)).map(|(c, p)| pod_entry(c, &p, name(c))).collect());
    }
    if wants("pod_ips") {
        d.pod_ips = Some(
            maps.pod_by_ip
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, c)| keep(*c))
                .map(|(a, c)| PodIp { ip: ip(&a), netns_cookie: c, pod: name(c) })
                .collect(),
        );
    }
    if wants("mesh_peers") {
        d.mesh_peers = Some(maps.mesh_peers.keys().filter_map(Result::ok).map(|a| ip(&a)).collect());
    }
    if wants("direct_traffic") {
        d.direct_traffic = Some(
            maps.direct_traffic
                .iter()
                .filter_map(Result::ok)
                .filter(|(c, _)| keep(*c))
                .map(|(c, per_cpu)| {
                    let t = podsteer_agent::telemetry::sum(&per_cpu);
                    Traffic {
                        netns_cookie: c,
                        pod: name(c),
                        opened: t.opened,
                        closed: podsteer_common::ConnResult::ALL.iter().map(|r| (r.as_str(), t.closed[*r as usize])).collect(),
                        bytes_from_client: t.bytes_from_client,
                        bytes_to_client: t.bytes_to_client,
                    }
                })
                .collect(),
        );
    }
    if wants("original_destinations") {
        d.original_destinations = Some(
            maps.orig_by_pair
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| keep(k.netns))
                .map(|(k, v)| OrigEntry {
                    netns_cookie: k.netns,
                    pod: name(k.netns),
                    app: sock(&k.local),
                    proxy: sock(&k.remote),
                    original_dst: sock(&v),
                })
                .collect(),
        );
    }
    let pairs = |it: Vec<podsteer_common::SockPairKey>| -> Vec<Pair> {
        it.into_iter()
            .filter(|k| keep(k.netns))
            .map(|k| Pair { netns_cookie: k.netns, pod: name(k.netns), local: sock(&k.local), remote: sock(&k.remote) })
            .collect()
    };
    if wants("sock_pairs") {
        d.sock_pairs = Some(pairs(maps.sock_pairs.keys().filter_map(Result::ok).collect()));
    }
    if wants("passthrough") {
        d.passthrough = Some(pairs(maps.passthrough.keys().filter_map(Result::ok).collect()));
    }
    if wants("inbound_listeners") {
        d.inbound_listeners = Some(
            maps.inbound_listeners
                .keys()
                .filter_map(Result::ok)
                .filter(|k| keep(k.netns))
                .map(|k| Listener {
                    netns_cookie: k.netns,
                    pod: name(k.netns),
                    family: if k.addr.family == AF_INET { "ipv4" } else { "ipv6" },
                })
                .collect(),
        );
    }
    if wants("counters") {
        let c = maps.counters().map_err(|e| CtlError::new(exit::FAILURE, podsteer_agent::controller::error_chain(&e)))?;
        d.counters = Some(c.into_iter().map(|(k, v)| (k.name().to_owned(), v)).collect());
    }
    Ok(d)
}

fn or_dash(o: &Option<String>) -> String {
    o.clone().unwrap_or_else(|| "-".into())
}

pub fn render(d: &Dump) -> String {
    let mut out = format!("pins: {}\n", d.pins);
    if let Some(pods) = &d.pods {
        out += "\nPODS (netns cookie -> policy)\n";
        let rows: Vec<Vec<String>> = pods
            .iter()
            .map(|p| {
                vec![
                    p.netns_cookie.to_string(),
                    or_dash(&p.pod),
                    p.ipv4.map(|i| i.to_string()).unwrap_or_default(),
                    p.ipv6.map(|i| i.to_string()).unwrap_or_default(),
                    format!("{}/{}", p.outbound_port, p.inbound_port),
                    p.flags.join(","),
                    format!("ports {:?} in {:?} cidrs {:?}", p.excluded_outbound_ports, p.excluded_inbound_ports, p.excluded_cidrs),
                ]
            })
            .collect();
        out += &table(&["COOKIE", "POD", "IPV4", "IPV6", "OUT/IN", "FLAGS", "EXCLUDED"], &rows);
    }
    if let Some(ips) = &d.pod_ips {
        out += "\nPOD_BY_IP (inbound lookups)\n";
        out += &table(
            &["IP", "COOKIE", "POD"],
            &ips.iter().map(|i| vec![i.ip.to_string(), i.netns_cookie.to_string(), or_dash(&i.pod)]).collect::<Vec<_>>(),
        );
    }
    if let Some(o) = &d.original_destinations {
        out += "\nORIG_BY_PAIR (what SO_ORIGINAL_DST answers)\n";
        out += &table(
            &["COOKIE", "POD", "APP SOCKET", "PROXY", "ORIGINAL DST"],
            &o.iter()
                .map(|e| {
                    vec![e.netns_cookie.to_string(), or_dash(&e.pod), e.app.to_string(), e.proxy.to_string(), e.original_dst.to_string()]
                })
                .collect::<Vec<_>>(),
        );
    }
    for (title, pairs) in [
        ("SOCK_PAIRS (spliced by sk_msg)", &d.sock_pairs),
        ("PASSTHROUGH (the proxy's legs to an app from a client's address)", &d.passthrough),
    ] {
        if let Some(p) = pairs {
            out += &format!("\n{title}\n");
            out += &table(
                &["COOKIE", "POD", "LOCAL", "REMOTE"],
                &p.iter()
                    .map(|e| vec![e.netns_cookie.to_string(), or_dash(&e.pod), e.local.to_string(), e.remote.to_string()])
                    .collect::<Vec<_>>(),
            );
        }
    }
    if let Some(l) = &d.inbound_listeners {
        out += "\nINBOUND_LISTENERS (sk_lookup targets)\n";
        out += &table(
            &["COOKIE", "POD", "FAMILY"],
            &l.iter().map(|e| vec![e.netns_cookie.to_string(), or_dash(&e.pod), e.family.to_owned()]).collect::<Vec<_>>(),
        );
    }
    if let Some(m) = &d.mesh_peers {
        out += "\nMESH_PEERS (meshed pods on other nodes: proxied)\n";
        out += &table(&["IP"], &m.iter().map(|i| vec![i.to_string()]).collect::<Vec<_>>());
    }
    if let Some(t) = &d.direct_traffic {
        out += "\nDIRECT_TRAFFIC (connections to unmeshed destinations, no proxy)\n";
        out += &table(
            &["COOKIE", "POD", "OPENED", "CLOSED", "BYTES OUT", "BYTES IN"],
            &t.iter()
                .map(|e| {
                    let closed: Vec<String> = e.closed.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k}={n}")).collect();
                    vec![
                        e.netns_cookie.to_string(),
                        or_dash(&e.pod),
                        e.opened.to_string(),
                        closed.join(","),
                        e.bytes_from_client.to_string(),
                        e.bytes_to_client.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        );
    }
    if let Some(c) = &d.counters {
        out += "\nCOUNTERS (summed over CPUs)\n";
        out += &table(&["COUNTER", "VALUE"], &c.iter().map(|(k, v)| vec![k.clone(), v.to_string()]).collect::<Vec<_>>());
    }
    out
}
