//! A pod's interception policy: parsed from annotations and node defaults,
//! validated once, then turned into map entries or iptables rules.

use std::collections::BTreeMap;
use std::net::IpAddr;

use podsteer_common::policy::{MAX_CIDRS, MAX_PORTS, flags};
use podsteer_common::{Cidr, PodPolicy};
use serde::{Deserialize, Serialize};

pub use podsteer_proto::annotations;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("{annotation}: {value:?} is not a port in 1-65535")]
    BadPort { annotation: &'static str, value: String },
    #[error("{annotation}: more than {max} entries")]
    TooMany { annotation: &'static str, max: usize },
    #[error("{annotation}: {value:?} is not a CIDR")]
    BadCidr { annotation: &'static str, value: String },
    #[error("{annotation}: {a} overlaps {b}")]
    OverlappingCidrs { annotation: &'static str, a: String, b: String },
    #[error("{annotation}: {value:?} is not one of {allowed}")]
    BadValue { annotation: &'static str, value: String, allowed: &'static str },
    #[error("proxy ports must differ and be non-zero (outbound {outbound}, inbound {inbound})")]
    BadProxyPorts { outbound: u16, inbound: u16 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// One proxy per node, listening inside each pod's netns.
    Shared,
    /// A proxy inside the pod, running as the proxy UID.
    Sidecar,
}

/// Where a pod's connections to unmeshed destinations go (eBPF mode; iptables
/// mode proxies them all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Unmeshed {
    /// Straight to the destination, accounted by the kernel.
    #[default]
    Direct,
    /// Through the proxy, like a meshed destination.
    Proxy,
}

/// Node-wide settings every pod policy starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDefaults {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_mark: u32,
    pub proxy_uid: u32,
    pub sk_msg: bool,
    pub proxy_mode: ProxyMode,
    /// The node takes HBONE (`--ca-dir`): inbound interception passes port
    /// 15008 by, so tunnels reach the proxy's HBONE listener in the pod.
    #[serde(default)]
    pub hbone: bool,
    #[serde(default)]
    pub unmeshed: Unmeshed,
}

impl Default for NodeDefaults {
    fn default() -> Self {
        NodeDefaults {
            outbound_port: podsteer_common::OUTBOUND_PORT,
            inbound_port: podsteer_common::INBOUND_PORT,
            proxy_mark: podsteer_common::PROXY_MARK,
            proxy_uid: podsteer_common::PROXY_UID,
            // Opt-in: an app's own sockets keep TCP semantics unless the pod asks.
            sk_msg: false,
            proxy_mode: ProxyMode::Shared,
            hbone: false,
            unmeshed: Unmeshed::Direct,
        }
    }
}

/// One prefix, kept in the form the user wrote for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<IpNet> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() { max } else { p.trim().parse().ok()? };
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    fn bits(&self) -> u128 {
        match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let other = IpNet { addr: ip, prefix: if ip.is_ipv4() { 32 } else { 128 } };
        // IPv4 sits in the top 32 bits, so the prefix counts from the top either way.
        let n = self.prefix as u32;
        let mask = if n == 0 { 0 } else { u128::MAX << (128 - n) };
        (self.bits() & mask) == (other.bits() & mask)
    }

    pub fn overlaps(&self, other: &IpNet) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4() && (self.contains(other.addr) || other.contains(self.addr))
    }

    fn to_kernel(self) -> Cidr {
        match self.addr {
            IpAddr::V4(a) => Cidr { ip: [u32::from(a).to_be(), 0, 0, 0], family: podsteer_common::AF_INET, prefix_len: self.prefix as u16 },
            IpAddr::V6(a) => Cidr { ip: ip6_words(a), family: podsteer_common::AF_INET6, prefix_len: self.prefix as u16 },
        }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// IPv6 address as four network-order words, as BPF contexts hold it.
pub fn ip6_words(a: std::net::Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// A validated policy for one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_mark: u32,
    pub proxy_uid: u32,
    pub proxy_mode: ProxyMode,
    pub sk_msg: bool,
    /// Policies saved before this field existed proxied everything.
    #[serde(default = "proxied_before")]
    pub unmeshed: Unmeshed,
    pub excluded_outbound_ports: Vec<u16>,
    pub excluded_inbound_ports: Vec<u16>,
    pub excluded_outbound_cidrs: Vec<IpNet>,
    pub ips: Vec<IpAddr>,
}

pub use podsteer_proto::inject::{Injection, inject_disabled, skip_reason};

impl Policy {
    pub fn from_annotations(defaults: &NodeDefaults, ann: &BTreeMap<String, String>, ips: &[IpAddr]) -> Result<Policy, PolicyError> {
        if defaults.outbound_port == 0 || defaults.inbound_port == 0 || defaults.outbound_port == defaults.inbound_port {
            return Err(PolicyError::BadProxyPorts { outbound: defaults.outbound_port, inbound: defaults.inbound_port });
        }
        let get = |k: &str| ann.get(k).map(String::as_str).unwrap_or("");
        let proxy_mode = match get(annotations::PROXY_MODE) {
            "" => defaults.proxy_mode,
            "shared" => ProxyMode::Shared,
            "sidecar" => ProxyMode::Sidecar,
            v => return Err(PolicyError::BadValue { annotation: annotations::PROXY_MODE, value: v.into(), allowed: "shared, sidecar" }),
        };
        let sk_msg = match get(annotations::SK_MSG) {
            "" => defaults.sk_msg,
            "true" => true,
            "false" => false,
            v => return Err(PolicyError::BadValue { annotation: annotations::SK_MSG, value: v.into(), allowed: "true, false" }),
        };
        let unmeshed = match get(annotations::UNMESHED_OUTBOUND) {
            "" => defaults.unmeshed,
            "direct" => Unmeshed::Direct,
            "proxy" => Unmeshed::Proxy,
            v => {
                return Err(PolicyError::BadValue {
                    annotation: annotations::UNMESHED_OUTBOUND,
                    value: v.into(),
                    allowed: "direct, proxy",
                });
            }
        };
        let mut excluded_inbound_ports = parse_ports(annotations::EXCLUDE_INBOUND_PORTS, get(annotations::EXCLUDE_INBOUND_PORTS))?;
        if defaults.hbone && !excluded_inbound_ports.contains(&podsteer_proto::control::HBONE_PORT) {
            if excluded_inbound_ports.len() == MAX_PORTS {
                // One slot is the mesh's: say so rather than leave HBONE intercepted.
                return Err(PolicyError::TooMany { annotation: annotations::EXCLUDE_INBOUND_PORTS, max: MAX_PORTS - 1 });
            }
            excluded_inbound_ports.push(podsteer_proto::control::HBONE_PORT);
        }
        Ok(Policy {
            outbound_port: defaults.outbound_port,
            inbound_port: defaults.inbound_port,
            proxy_mark: defaults.proxy_mark,
            proxy_uid: defaults.proxy_uid,
            proxy_mode,
            sk_msg,
            unmeshed,
            excluded_outbound_ports: parse_ports(annotations::EXCLUDE_OUTBOUND_PORTS, get(annotations::EXCLUDE_OUTBOUND_PORTS))?,
            excluded_inbound_ports,
            excluded_outbound_cidrs: parse_cidrs(annotations::EXCLUDE_OUTBOUND_CIDRS, get(annotations::EXCLUDE_OUTBOUND_CIDRS))?,
            ips: ips.to_vec(),
        })
    }

    /// The map value the eBPF programs read.
    pub fn to_kernel(&self) -> PodPolicy {
        let mut p = PodPolicy {
            flags: flags::OUTBOUND | flags::INBOUND,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_mark: self.proxy_mark,
            proxy_uid: self.proxy_uid,
            ..PodPolicy::default()
        };
        if self.sk_msg {
            p.flags |= flags::SK_MSG;
        }
        if self.proxy_mode == ProxyMode::Sidecar {
            p.flags |= flags::SIDECAR;
        }
        if self.unmeshed == Unmeshed::Proxy {
            p.flags |= flags::PROXY_UNMESHED;
        }
        for ip in &self.ips {
            match ip {
                IpAddr::V4(a) => p.ipv4 = u32::from(*a).to_be(),
                IpAddr::V6(a) => p.ipv6 = ip6_words(*a),
            }
        }
        p.excluded_outbound_ports[..self.excluded_outbound_ports.len()].copy_from_slice(&self.excluded_outbound_ports);
        p.excluded_inbound_ports[..self.excluded_inbound_ports.len()].copy_from_slice(&self.excluded_inbound_ports);
        for (slot, c) in p.excluded_cidrs.iter_mut().zip(&self.excluded_outbound_cidrs) {
            *slot = c.to_kernel();
        }
        p
    }
}

/// A pod a previous agent version enrolled: it proxied every connection,
/// and keeps doing so until it is enrolled again.
fn proxied_before() -> Unmeshed {
    Unmeshed::Proxy
}

fn parse_ports(annotation: &'static str, value: &str) -> Result<Vec<u16>, PolicyError> {
    let mut ports = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(p) if p != 0 => {
                if !ports.contains(&p) {
                    ports.push(p)
                }
            }
            _ => return Err(PolicyError::BadPort { annotation, value: item.into() }),
        }
    }
    if ports.len() > MAX_PORTS {
        return Err(PolicyError::TooMany { annotation, max: MAX_PORTS });
    }
    Ok(ports)
}

fn parse_cidrs(annotation: &'static str, value: &str) -> Result<Vec<IpNet>, PolicyError> {
    let mut nets: Vec<IpNet> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let net = IpNet::parse(item).ok_or_else(|| PolicyError::BadCidr { annotation, value: item.into() })?;
        if let Some(prev) = nets.iter().find(|n| n.overlaps(&net)) {
            return Err(PolicyError::OverlappingCidrs { annotation, a: prev.to_string(), b: net.to_string() });
        }
        nets.push(net);
    }
    if nets.len() > MAX_CIDRS {
        return Err(PolicyError::TooMany { annotation, max: MAX_CIDRS });
    }
    Ok(nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A named case: its annotations, and the error they must be refused with.
    type Refusal<'a> = (&'a str, &'a [(&'a str, &'a str)], PolicyError);

    #[test]
    fn refuses_bad_annotations_with_the_reason() {
        use annotations::*;
        let d = NodeDefaults::default();
        let cases: &[Refusal] = &[
            ("port zero", &[(EXCLUDE_OUTBOUND_PORTS, "0")], PolicyError::BadPort { annotation: EXCLUDE_OUTBOUND_PORTS, value: "0".into() }),
            (
                "port too big",
                &[(EXCLUDE_INBOUND_PORTS, "70000")],
                PolicyError::BadPort { annotation: EXCLUDE_INBOUND_PORTS, value: "70000".into() },
            ),
            (
                "port not a number",
                &[(EXCLUDE_OUTBOUND_PORTS, "80,http")],
                PolicyError::BadPort { annotation: EXCLUDE_OUTBOUND_PORTS, value: "http".into() },
            ),
            (
                "too many ports",
                &[(EXCLUDE_OUTBOUND_PORTS, "1,2,3,4,5,6,7,8,9")],
                PolicyError::TooMany { annotation: EXCLUDE_OUTBOUND_PORTS, max: MAX_PORTS },
            ),
            (
                "bad cidr",
                &[(EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33")],
                PolicyError::BadCidr { annotation: EXCLUDE_OUTBOUND_CIDRS, value: "10.0.0.0/33".into() },
            ),
            (
                "overlapping cidrs",
                &[(EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8,10.1.0.0/16")],
                PolicyError::OverlappingCidrs { annotation: EXCLUDE_OUTBOUND_CIDRS, a: "10.0.0.0/8".into(), b: "10.1.0.0/16".into() },
            ),
            (
                "bad unmeshed outbound",
                &[(UNMESHED_OUTBOUND, "sometimes")],
                PolicyError::BadValue { annotation: UNMESHED_OUTBOUND, value: "sometimes".into(), allowed: "direct, proxy" },
            ),
            (
                "bad proxy mode",
                &[(PROXY_MODE, "ambient")],
                PolicyError::BadValue { annotation: PROXY_MODE, value: "ambient".into(), allowed: "shared, sidecar" },
            ),
        ];
        for (name, a, want) in cases {
            assert_eq!(Policy::from_annotations(&d, &ann(a), &[]).as_ref().err(), Some(want), "case {name}");
        }
    }

    #[test]
    fn bad_proxy_ports_are_refused() {
        let d = NodeDefaults { inbound_port: 15001, ..Default::default() };
        assert!(matches!(Policy::from_annotations(&d, &BTreeMap::new(), &[]), Err(PolicyError::BadProxyPorts { .. })));
    }

    #[test]
    fn kernel_policy_carries_exclusions_and_addresses() {
        use annotations::*;
        let ips: Vec<IpAddr> = vec!["10.244.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let a = ann(&[(EXCLUDE_OUTBOUND_PORTS, "5432, 6379"), (EXCLUDE_OUTBOUND_CIDRS, "192.168.0.0/16,fd00:ab::/32")]);
        let k = Policy::from_annotations(&NodeDefaults::default(), &a, &ips).unwrap().to_kernel();
        assert!(k.excludes_outbound_port(5432) && k.excludes_outbound_port(6379) && !k.excludes_outbound_port(80));
        assert!(k.excludes_destination(&podsteer_common::Addr::v4(u32::from(std::net::Ipv4Addr::new(192, 168, 3, 4)).to_be(), 0)));
        assert!(!k.excludes_destination(&podsteer_common::Addr::v4(u32::from(std::net::Ipv4Addr::new(10, 0, 0, 1)).to_be(), 0)));
        assert!(k.excludes_destination(&podsteer_common::Addr::v6(ip6_words("fd00:ab::1".parse().unwrap()), 0)));
        assert_eq!(k.ipv4, u32::from(std::net::Ipv4Addr::new(10, 244, 0, 5)).to_be());
        assert!(!k.has(flags::SK_MSG) && !k.has(flags::SIDECAR), "sk_msg is opt-in");
        let opted = Policy::from_annotations(&NodeDefaults::default(), &ann(&[(SK_MSG, "true")]), &ips).unwrap().to_kernel();
        assert!(opted.has(flags::SK_MSG));
        assert!(!k.has(flags::PROXY_UNMESHED), "unmeshed destinations go direct by default");
        let all = Policy::from_annotations(&NodeDefaults::default(), &ann(&[(UNMESHED_OUTBOUND, "proxy")]), &ips).unwrap().to_kernel();
        assert!(all.has(flags::PROXY_UNMESHED));
        let node = NodeDefaults { unmeshed: Unmeshed::Proxy, ..NodeDefaults::default() };
        let direct = Policy::from_annotations(&node, &ann(&[(UNMESHED_OUTBOUND, "direct")]), &ips).unwrap().to_kernel();
        assert!(!direct.has(flags::PROXY_UNMESHED), "the pod's annotation wins over the node's default");
        assert!(Policy::from_annotations(&node, &BTreeMap::new(), &ips).unwrap().to_kernel().has(flags::PROXY_UNMESHED));
    }

    #[test]
    fn a_policy_saved_before_the_unmeshed_choice_keeps_proxying() {
        let mut v = serde_json::to_value(Policy::from_annotations(&NodeDefaults::default(), &BTreeMap::new(), &[]).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("unmeshed");
        let p: Policy = serde_json::from_value(v).unwrap();
        assert_eq!(p.unmeshed, Unmeshed::Proxy);
    }

    #[test]
    fn inject_false_opts_out() {
        assert!(inject_disabled(&ann(&[(annotations::INJECT, "false")])));
        assert!(!inject_disabled(&ann(&[(annotations::INJECT, "true")])));
        assert!(!inject_disabled(&BTreeMap::new()));
    }
}
