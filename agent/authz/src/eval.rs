//! The verdict for one connection at the receiving side.

use std::collections::BTreeMap;
use std::net::IpAddr;

use podsteer_identity::spiffe::SpiffeId;
use serde::Serialize;

use crate::policy::{Action, Condition, Policy, PortMatch, Rule, SourceMatch, StrMatch};

/// The destination workload.
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// One connection as the receiving proxy sees it. `source` is the peer's
/// verified identity: None for plaintext (which PERMISSIVE lets in).
#[derive(Clone, Debug)]
pub struct Conn {
    pub source: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub dest_ip: IpAddr,
    pub dest_port: u16,
}

/// Every policy on the node, and the root namespace whose policies apply to
/// all namespaces (Istio's `istio-system` by default).
pub struct PolicySet {
    pub root_namespace: String,
    pub policies: Vec<Policy>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
}

/// The policy and rule that matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Match {
    pub policy: String,
    pub action: Action,
    pub rule: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub decision: Decision,
    /// None: decided by the default (no ALLOW policy applies, or none matched).
    pub decided_by: Option<Match>,
    pub reason: String,
    /// AUDIT policies that matched: counted, no effect.
    pub audited: Vec<Match>,
    /// Had the dry-run policies been enforced, and the verdict would differ.
    pub dry_run: Option<Box<Verdict>>,
    /// Rules that apply but name L7 fields, and what L4 made of them.
    pub l7_notes: Vec<String>,
}

impl PolicySet {
    /// The policies that apply to `w`: its namespace's and the root
    /// namespace's, each with no selector or a selector `w`'s labels satisfy.
    pub fn applicable<'a>(&'a self, w: &'a Workload<'a>) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies.iter().filter(move |p| applies(p, &self.root_namespace, w))
    }

    pub fn evaluate(&self, w: &Workload<'_>, c: &Conn) -> Verdict {
        let enforced = verdict(self.applicable(w).filter(|p| !p.dry_run), c);
        let shadow = verdict(self.applicable(w), c);
        let differs = shadow.decision != enforced.decision || shadow.decided_by != enforced.decided_by;
        Verdict { dry_run: (self.applicable(w).any(|p| p.dry_run) && differs).then(|| Box::new(shadow)), ..enforced }
    }
}

/// Whether `p` applies to `w`: its namespace's or the root namespace's, with
/// no selector or one `w`'s labels satisfy.
pub fn applies(p: &Policy, root_namespace: &str, w: &Workload<'_>) -> bool {
    (p.namespace == w.namespace || p.namespace == root_namespace)
        && p.selector.as_ref().is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
}

fn verdict<'a>(policies: impl Iterator<Item = &'a Policy>, conn: &Conn) -> Verdict {
    let policies: Vec<&Policy> = policies.collect();
    let c = &Facts::of(conn);
    let mut notes = Vec::new();
    let mut first = |action: Action| -> Option<Match> {
        let mut found = None;
        for p in policies.iter().filter(|p| p.action == action) {
            for (i, r) in p.rules.iter().enumerate() {
                if !r.l7.is_empty() {
                    notes.push(match action {
                        Action::Allow => {
                            format!("{} rules[{i}] names {}: an ALLOW rule needing L7 matches nothing at L4", p.id(), r.l7.join(", "))
                        }
                        _ => format!(
                            "{} rules[{i}] names {}: checked on its L4 part alone, so it applies more widely",
                            p.id(),
                            r.l7.join(", ")
                        ),
                    });
                }
                // An ALLOW rule that needs L7 never matches at L4 (fail closed).
                let matched = (action != Action::Allow || r.l7.is_empty()) && rule_matches(r, c);
                if matched && found.is_none() {
                    found = Some(Match { policy: p.id(), action, rule: i });
                }
            }
        }
        found
    };
    let deny = first(Action::Deny);
    let allow = first(Action::Allow);
    let audited: Vec<Match> = first(Action::Audit).into_iter().collect();
    let has_allow = policies.iter().any(|p| p.action == Action::Allow);
    let (decision, decided_by, reason) = match (deny, allow) {
        (Some(m), _) => (Decision::Deny, Some(m), "a DENY rule matches".to_owned()),
        (None, _) if !has_allow => (Decision::Allow, None, "no ALLOW policy applies to the workload".to_owned()),
        (None, Some(m)) => (Decision::Allow, Some(m), "an ALLOW rule matches".to_owned()),
        (None, None) => {
            let names: Vec<String> = policies.iter().filter(|p| p.action == Action::Allow).map(|p| p.id()).collect();
            (Decision::Deny, None, format!("ALLOW policies apply ({}) and no rule of theirs matches", names.join(", ")))
        }
    };
    Verdict { decision, decided_by, reason, audited, dry_run: None, l7_notes: notes }
}

/// What the rules look at, derived from the connection once per verdict.
struct Facts<'a> {
    conn: &'a Conn,
    /// `td/ns/<ns>/sa/<sa>`, as principals are written.
    principal: Option<String>,
    namespace: Option<&'a str>,
}

impl<'a> Facts<'a> {
    fn of(conn: &'a Conn) -> Facts<'a> {
        Facts { conn, principal: conn.source.as_ref().map(SpiffeId::principal), namespace: conn.source.as_ref().map(SpiffeId::namespace) }
    }
}

/// `from`, `to` and `when` all match; an empty list matches anything. L7
/// fields were left out when the rule was read.
fn rule_matches(r: &Rule, c: &Facts<'_>) -> bool {
    (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, c)))
        && (r.to.is_empty() || r.to.iter().any(|t| port_matches(t, c.conn.dest_port)))
        && r.when.iter().all(|w| condition_matches(w, c))
}

fn any(list: &[StrMatch], v: Option<&str>) -> bool {
    v.is_some_and(|v| list.iter().any(|m| m.matches(v)))
}

fn source_matches(s: &SourceMatch, c: &Facts<'_>) -> bool {
    let (p, n, ip) = (c.principal.as_deref(), c.namespace, c.conn.source_ip);
    s.principals.as_ref().is_none_or(|l| any(l, p))
        && !any(&s.not_principals, p)
        && s.namespaces.as_ref().is_none_or(|l| any(l, n))
        && !any(&s.not_namespaces, n)
        && s.ip_blocks.as_ref().is_none_or(|l| l.iter().any(|b| b.contains(ip)))
        && !s.not_ip_blocks.iter().any(|b| b.contains(ip))
}

fn port_matches(t: &PortMatch, port: u16) -> bool {
    t.ports.as_ref().is_none_or(|l| l.contains(&port)) && !t.not_ports.contains(&port)
}

fn condition_matches(w: &Condition, c: &Facts<'_>) -> bool {
    let strs = |values: &[StrMatch], not: &[StrMatch], v: Option<&str>| (values.is_empty() || any(values, v)) && !any(not, v);
    let ips = |values: &[crate::policy::Cidr], not: &[crate::policy::Cidr], ip: IpAddr| {
        (values.is_empty() || values.iter().any(|b| b.contains(ip))) && !not.iter().any(|b| b.contains(ip))
    };
    match w {
        Condition::SourceIp { values, not } => ips(values, not, c.conn.source_ip),
        Condition::DestinationIp { values, not } => ips(values, not, c.conn.dest_ip),
        Condition::DestinationPort { values, not } => {
            (values.is_empty() || values.contains(&c.conn.dest_port)) && !not.contains(&c.conn.dest_port)
        }
        Condition::SourceNamespace { values, not } => strs(values, not, c.namespace),
        Condition::SourcePrincipal { values, not } => strs(values, not, c.principal.as_deref()),
    }
}
