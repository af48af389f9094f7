//! Validated policies. Parsing is where a policy is refused: every value is
//! checked once, and each rule keeps its L4 part (what podsteer enforces) and
//! the names of the L7 fields it has (what it cannot), for `explain`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::spec;

/// The annotation that makes a policy dry-run: evaluated and reported, never enforced.
pub const DRY_RUN: &str = "istio.io/dry-run";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("document {doc}: not YAML or not an AuthorizationPolicy: {why}")]
    Parse { doc: usize, why: String },
    #[error("{policy}: {why}")]
    Invalid { policy: String, why: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    /// `matchLabels`; None selects every workload in its scope.
    pub selector: Option<BTreeMap<String, String>>,
    pub dry_run: bool,
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<SourceMatch>,
    pub to: Vec<PortMatch>,
    pub when: Vec<Condition>,
    /// The L7 fields this rule has (`to.operation.methods`, ...), which L4 cannot check.
    pub l7: Vec<String>,
}

/// One `from` entry: every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceMatch {
    pub principals: Option<Vec<StrMatch>>,
    pub not_principals: Vec<StrMatch>,
    pub namespaces: Option<Vec<StrMatch>>,
    pub not_namespaces: Vec<StrMatch>,
    /// `ipBlocks` and `remoteIpBlocks` alike: at L4 the peer is the client.
    pub ip_blocks: Option<Vec<Cidr>>,
    pub not_ip_blocks: Vec<Cidr>,
}

/// One `to` entry, its L4 part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortMatch {
    pub ports: Option<Vec<u16>>,
    pub not_ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    SourceIp { values: Vec<Cidr>, not: Vec<Cidr> },
    SourceNamespace { values: Vec<StrMatch>, not: Vec<StrMatch> },
    SourcePrincipal { values: Vec<StrMatch>, not: Vec<StrMatch> },
    DestinationIp { values: Vec<Cidr>, not: Vec<Cidr> },
    DestinationPort { values: Vec<u16>, not: Vec<u16> },
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (any non-empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StrMatch {
    fn parse(s: &str) -> StrMatch {
        if s == "*" {
            StrMatch::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StrMatch::Prefix(p.into())
        } else if let Some(p) = s.strip_prefix('*') {
            StrMatch::Suffix(p.into())
        } else {
            StrMatch::Exact(s.into())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(s) => v == s,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(p) => v.ends_with(p.as_str()),
            StrMatch::Any => !v.is_empty(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client seen on a dual-stack socket is v4-mapped.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => mask(u128::from(u32::from(n)), u128::from(u32::from(a)), 32, self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => mask(u128::from(n), u128::from(a), 128, self.prefix),
            _ => false,
        }
    }
}

fn mask(net: u128, addr: u128, bits: u8, prefix: u8) -> bool {
    let shift = u32::from(bits - prefix);
    shift >= 128 || (net >> shift) == (addr >> shift)
}

/// Parses every `AuthorizationPolicy` in a (multi-document) YAML text; the
/// first invalid one fails the whole text, so a bad file never applies in part.
pub fn parse_yaml(text: &str) -> Result<Vec<Policy>, PolicyError> {
    let mut out = Vec::new();
    for (doc, d) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(d).map_err(|e| PolicyError::Parse { doc, why: e.to_string() })?;
        if value.is_null() {
            continue;
        }
        let ap: spec::AuthorizationPolicy = serde_yaml::from_value(value).map_err(|e| PolicyError::Parse { doc, why: e.to_string() })?;
        out.push(validate(&ap)?);
    }
    Ok(out)
}

pub fn validate(ap: &spec::AuthorizationPolicy) -> Result<Policy, PolicyError> {
    let namespace = ap.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let id = format!("{namespace}/{}", ap.metadata.name);
    let bad = |why: String| PolicyError::Invalid { policy: id.clone(), why };
    if ap.api_version != "security.istio.io/v1" && ap.api_version != "security.istio.io/v1beta1" {
        return Err(bad(format!("apiVersion {:?} is not security.istio.io/v1 (or v1beta1)", ap.api_version)));
    }
    if ap.kind != "AuthorizationPolicy" {
        return Err(bad(format!("kind {:?} is not AuthorizationPolicy", ap.kind)));
    }
    let s = &ap.spec;
    if s.target_ref.is_some() || s.target_refs.is_some() {
        return Err(bad("targetRef(s) select gateways and services, which podsteer has none of: use selector".into()));
    }
    let action = match s.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => return Err(bad("action CUSTOM (an external authorizer) is not supported".into())),
        other => return Err(bad(format!("action {other:?} is not ALLOW, DENY, AUDIT or CUSTOM"))),
    };
    if s.provider.is_some() {
        return Err(bad("provider is only for action CUSTOM".into()));
    }
    let dry_run = match ap.metadata.annotations.get(DRY_RUN).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return Err(bad(format!("annotation {DRY_RUN}: {v:?} is not \"true\" or \"false\""))),
    };
    let rules = s
        .rules
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| rule(r).map_err(|why| bad(format!("rules[{i}]: {why}"))))
        .collect::<Result<_, _>>()?;
    Ok(Policy {
        namespace,
        name: ap.metadata.name.clone(),
        action,
        selector: s.selector.as_ref().map(|s| s.match_labels.clone()),
        dry_run,
        rules,
    })
}

fn rule(r: &spec::Rule) -> Result<Rule, String> {
    let mut l7 = Vec::new();
    let mut from = Vec::new();
    for (i, f) in r.from.iter().flatten().enumerate() {
        let src = f.source.clone().ok_or(format!("from[{i}] has no source"))?;
        if src.request_principals.is_some() {
            l7.push("from.source.requestPrincipals".into());
        }
        if src.not_request_principals.is_some() {
            l7.push("from.source.notRequestPrincipals".into());
        }
        let cidrs = |v: &Option<Vec<String>>, what: &str| -> Result<Option<Vec<Cidr>>, String> {
            v.as_ref()
                .map(|v| v.iter().map(|c| Cidr::parse(c).ok_or(format!("from[{i}].source.{what}: {c:?} is not an IP or CIDR"))).collect())
                .transpose()
        };
        let ip_blocks = match (cidrs(&src.ip_blocks, "ipBlocks")?, cidrs(&src.remote_ip_blocks, "remoteIpBlocks")?) {
            (None, None) => None,
            (a, b) => Some(a.into_iter().chain(b).flatten().collect()),
        };
        let not_ip_blocks = [cidrs(&src.not_ip_blocks, "notIpBlocks")?, cidrs(&src.not_remote_ip_blocks, "notRemoteIpBlocks")?]
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        let strs = |v: &Option<Vec<String>>| v.as_ref().map(|v| v.iter().map(|s| StrMatch::parse(s)).collect::<Vec<_>>());
        from.push(SourceMatch {
            principals: strs(&src.principals),
            not_principals: strs(&src.not_principals).unwrap_or_default(),
            namespaces: strs(&src.namespaces),
            not_namespaces: strs(&src.not_namespaces).unwrap_or_default(),
            ip_blocks,
            not_ip_blocks,
        });
    }
    let mut to = Vec::new();
    for (i, t) in r.to.iter().flatten().enumerate() {
        let op = t.operation.clone().ok_or(format!("to[{i}] has no operation"))?;
        for (set, name) in [
            (op.hosts.is_some(), "hosts"),
            (op.not_hosts.is_some(), "notHosts"),
            (op.methods.is_some(), "methods"),
            (op.not_methods.is_some(), "notMethods"),
            (op.paths.is_some(), "paths"),
            (op.not_paths.is_some(), "notPaths"),
        ] {
            if set {
                l7.push(format!("to.operation.{name}"));
            }
        }
        to.push(PortMatch {
            ports: op.ports.as_ref().map(|p| ports(p, &format!("to[{i}].operation.ports"))).transpose()?,
            not_ports: op.not_ports.as_ref().map(|p| ports(p, &format!("to[{i}].operation.notPorts"))).transpose()?.unwrap_or_default(),
        });
    }
    let mut when = Vec::new();
    for (i, c) in r.when.iter().flatten().enumerate() {
        let what = format!("when[{i}] ({})", c.key);
        if c.values.is_none() && c.not_values.is_none() {
            return Err(format!("{what}: neither values nor notValues"));
        }
        let (values, not) = (c.values.clone().unwrap_or_default(), c.not_values.clone().unwrap_or_default());
        let cidrs = |v: &[String]| {
            v.iter().map(|s| Cidr::parse(s).ok_or(format!("{what}: {s:?} is not an IP or CIDR"))).collect::<Result<Vec<_>, _>>()
        };
        let strs = |v: &[String]| v.iter().map(|s| StrMatch::parse(s)).collect::<Vec<_>>();
        when.push(match c.key.as_str() {
            "source.ip" | "remote.ip" => Condition::SourceIp { values: cidrs(&values)?, not: cidrs(&not)? },
            "source.namespace" => Condition::SourceNamespace { values: strs(&values), not: strs(&not) },
            "source.principal" => Condition::SourcePrincipal { values: strs(&values), not: strs(&not) },
            "destination.ip" => Condition::DestinationIp { values: cidrs(&values)?, not: cidrs(&not)? },
            "destination.port" => Condition::DestinationPort { values: ports(&values, &what)?, not: ports(&not, &what)? },
            k if k.starts_with("request.") || k == "connection.sni" || k.starts_with("experimental.") => {
                l7.push(format!("when.{k}"));
                continue;
            }
            k => return Err(format!("{what}: unknown condition key {k:?}")),
        });
    }
    Ok(Rule { from, to, when, l7 })
}

fn ports(v: &[String], what: &str) -> Result<Vec<u16>, String> {
    v.iter().map(|p| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or(format!("{what}: {p:?} is not a port in 1-65535"))).collect()
}
