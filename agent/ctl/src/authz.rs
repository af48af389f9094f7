//! The receiving side of `podsteer explain`: which identities the two ends
//! present, whether the path is HBONE (mTLS) or plaintext, the destination's
//! peer authentication, and the policy and rule that decide, worked out from
//! the same files and by the same function (`podsteer_authz::judge`) as the
//! destination's proxy, so it needs no running agent.

use std::net::{IpAddr, SocketAddr};

use podsteer_agent::mesh::Saved;
use podsteer_agent::workloads::{DirSource, Workload, WorkloadSource as _};
use podsteer_authz::eval::{Conn, Decision, PolicySet, Workload as PolicyWorkload};
use serde::Serialize;

use super::{CtlError, Paths, exit};

#[derive(Debug, Serialize)]
pub struct AuthzExplanation {
    pub source_identity: Option<String>,
    /// `NAMESPACE/NAME` of the pod at the destination address, if the workload source has one.
    pub destination: Option<String>,
    pub destination_identity: Option<String>,
    /// `hbone` (mTLS) or `plaintext`.
    pub path: &'static str,
    /// `STRICT`, `PERMISSIVE` or `DISABLE`, for the destination port.
    pub peer_authentication: String,
    pub peer_authentication_by: Option<String>,
    /// `allow`, `deny`, or `not-judged` (the destination is not meshed).
    pub decision: &'static str,
    /// `NAMESPACE/NAME#RULE`, `NAMESPACE/NAME` (a PeerAuthentication), or `default`.
    pub decided_by: String,
    pub reason: String,
    /// What the dry-run policies would decide, where it differs.
    pub dry_run: Option<String>,
    pub audited: Vec<String>,
    /// Rules that name L7 fields, and what L4 made of them.
    pub l7_notes: Vec<String>,
}

/// Who the source is: a pod of this node (by name) or an address.
pub enum Source<'a> {
    Pod(&'a podsteer_agent::registry::PodRecord),
    Ip(IpAddr),
}

pub fn explain(paths: &Paths, source: Source<'_>, dest: SocketAddr) -> Result<Option<AuthzExplanation>, CtlError> {
    let saved: Option<Saved> = std::fs::read(paths.state_dir.join(podsteer_agent::controller::STATUS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| serde_json::from_value(v["mesh"].clone()).ok());
    let Some(saved) = saved else { return Ok(None) };
    let Some(dir) = &saved.workload_dir else { return Ok(None) };
    let pods = DirSource::new(dir).list().map_err(|e| CtlError::new(exit::FAILURE, podsteer_proto::error_chain(&e)))?;
    let at = |ip: IpAddr| pods.iter().find(|w| w.ips.iter().any(|a| a.to_canonical() == ip.to_canonical()));
    let meshed = |w: &Workload| saved.is_peer(w);
    let (source_ip, src) = match source {
        Source::Pod(rec) => {
            let ip = rec.ips.iter().copied().find(|ip| ip.is_ipv4() == dest.is_ipv4()).or(rec.ips.first().copied());
            (ip.unwrap_or(IpAddr::from([0, 0, 0, 0])), pods.iter().find(|w| w.uid == rec.uid))
        }
        Source::Ip(ip) => (ip, at(ip)),
    };
    let dst = at(dest.ip());
    let id = |w: &Workload| w.spiffe_id(&saved.trust_domain);
    let source_identity = src.filter(|w| meshed(w)).map(id);
    let Some(d) = dst.filter(|w| meshed(w)) else {
        return Ok(Some(AuthzExplanation {
            source_identity,
            destination: dst.map(|w| format!("{}/{}", w.namespace, w.name)),
            destination_identity: None,
            path: "plaintext",
            peer_authentication: "-".into(),
            peer_authentication_by: None,
            decision: "not-judged",
            decided_by: "-".into(),
            reason: "the destination is not a meshed pod: no proxy receives it, no policy applies".into(),
            dry_run: None,
            audited: Vec::new(),
            l7_notes: Vec::new(),
        }));
    };
    let hbone = saved.hbone && source_identity.is_some();
    let bundle = match &saved.policy_dir {
        None => None,
        Some(dir) => Some(podsteer_authz::source::read_dir(dir).map(|(_, b)| b).map_err(|e| {
            CtlError::new(
                exit::FAILURE,
                format!(
                    "the policy files are refused ({}): the proxies keep the last good set, which explain cannot see",
                    podsteer_proto::error_chain(&e)
                ),
            )
        })?),
    };
    let w = PolicyWorkload { namespace: &d.namespace, labels: &d.labels };
    let conn = Conn {
        source: if hbone { source_identity.as_deref().and_then(|s| podsteer_identity::spiffe::SpiffeId::parse(s).ok()) } else { None },
        source_ip: source_ip.to_canonical(),
        dest_ip: dest.ip().to_canonical(),
        dest_port: dest.port(),
    };
    let set = bundle.as_ref().map(|b| PolicySet { root_namespace: saved.root_namespace.clone(), policies: b.authorization.clone() });
    let peer =
        podsteer_authz::peer_auth::resolve(bundle.as_ref().map(|b| &b.peer_authentication[..]).unwrap_or(&[]), &saved.root_namespace, &w);
    let j = podsteer_authz::judge::judge(set.as_ref(), &peer, &w, &conn);
    let mode = peer.for_port(dest.port());
    let verdict = j.verdict.as_ref();
    let word = |d: Decision| if d == Decision::Allow { "allow" } else { "deny" };
    Ok(Some(AuthzExplanation {
        source_identity: if hbone { source_identity } else { None },
        destination: Some(format!("{}/{}", d.namespace, d.name)),
        destination_identity: Some(id(d)),
        path: if hbone { "hbone" } else { "plaintext" },
        peer_authentication: serde_json::to_value(mode).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        peer_authentication_by: peer.decided_by.clone(),
        decision: word(j.decision),
        decided_by: j.decided_by(),
        reason: j.reason.clone(),
        dry_run: verdict.and_then(|v| v.dry_run.as_ref()).map(|dry| {
            let by = dry.decided_by.as_ref().map(|m| format!("{}#{}", m.policy, m.rule)).unwrap_or_else(|| "default".into());
            format!("{} by {by}", word(dry.decision))
        }),
        audited: verdict.map(|v| v.audited.iter().map(|m| format!("{}#{}", m.policy, m.rule)).collect()).unwrap_or_default(),
        l7_notes: verdict.map(|v| v.l7_notes.clone()).unwrap_or_default(),
    }))
}

pub fn render(a: &AuthzExplanation) -> String {
    let or_none = |s: &Option<String>| s.clone().unwrap_or_else(|| "(none)".into());
    let mut out = format!(
        "  receiving side:\n    path:        {}\n    source:      {}\n    destination: {} as {}\n    peer auth:   {}{}\n    verdict:     {} by {}: {}\n",
        if a.path == "hbone" { "HBONE (mTLS)" } else { "plaintext" },
        or_none(&a.source_identity),
        a.destination.clone().unwrap_or_else(|| "(no pod)".into()),
        or_none(&a.destination_identity),
        a.peer_authentication,
        a.peer_authentication_by.as_ref().map(|p| format!(" (by {p})")).unwrap_or_else(|| if a.peer_authentication == "-" {
            String::new()
        } else {
            " (default)".into()
        }),
        a.decision.to_uppercase(),
        a.decided_by,
        a.reason
    );
    if let Some(d) = &a.dry_run {
        out += &format!("    dry run:     would {d}\n");
    }
    for m in &a.audited {
        out += &format!("    audited by:  {m}\n");
    }
    for n in &a.l7_notes {
        out += &format!("    L7:          {n}\n");
    }
    out
}
