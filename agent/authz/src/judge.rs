//! The whole decision for one inbound connection, as the receiving proxy
//! makes it and `podsteer explain` reports it: peer authentication first (a
//! plaintext connection to a STRICT port is refused whatever the policies
//! say), then authorization. One function, so the two never disagree.

use serde::Serialize;

use crate::eval::{Conn, Decision, PolicySet, Verdict, Workload};
use crate::peer_auth::Resolved;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Judgement {
    pub decision: Decision,
    /// `NAMESPACE/NAME` of the PeerAuthentication or AuthorizationPolicy that
    /// decided; None for the default.
    pub policy: Option<String>,
    /// The deciding rule's index, for an AuthorizationPolicy.
    pub rule: Option<usize>,
    pub reason: String,
    /// The authorization verdict, when authorization was reached.
    pub verdict: Option<Verdict>,
}

impl Judgement {
    pub fn allowed(&self) -> bool {
        self.decision == Decision::Allow
    }

    /// `NAMESPACE/NAME#RULE`, or `NAMESPACE/NAME` for a peer authentication, or `default`.
    pub fn decided_by(&self) -> String {
        match (&self.policy, self.rule) {
            (Some(p), Some(r)) => format!("{p}#{r}"),
            (Some(p), None) => p.clone(),
            (None, _) => "default".into(),
        }
    }
}

/// `set`: the policies (all of them or only `w`'s; evaluation selects);
/// None when no policy is configured. `peer`: `w`'s peer authentication.
pub fn judge(set: Option<&PolicySet>, peer: &Resolved, w: &Workload<'_>, c: &Conn) -> Judgement {
    if c.source.is_none() && !peer.for_port(c.dest_port).takes_plaintext() {
        return Judgement {
            decision: Decision::Deny,
            policy: peer.decided_by.clone(),
            rule: None,
            reason: format!("plaintext to port {} under STRICT peer authentication", c.dest_port),
            verdict: None,
        };
    }
    let Some(set) = set else {
        return Judgement { decision: Decision::Allow, policy: None, rule: None, reason: "no policy is configured".into(), verdict: None };
    };
    let v = set.evaluate(w, c);
    Judgement {
        decision: v.decision,
        policy: v.decided_by.as_ref().map(|m| m.policy.clone()),
        rule: v.decided_by.as_ref().map(|m| m.rule),
        reason: v.reason.clone(),
        verdict: Some(v),
    }
}
