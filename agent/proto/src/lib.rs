//! podsteer-proto: what the agent, the CNI plugin, the proxy and the CLI share,
//! so none of them depends on another's crate.
//!
//! - [`annotations`]: the pod annotations podsteer reads (the injector writes some);
//! - [`api`]: the agent socket (plugin, CLI, sidecar proxies → agent);
//! - [`control`]: the proxy control socket (agent ⇄ shared proxy);
//! - [`inject`]: whether a pod is meshed at all, decided alike by the plugin and the agent;
//! - [`cni`]: the names that tie the plugin to the conflist the agent writes;
//! - [`logs`], [`admin`]: the log set-up and the admin endpoint both daemons run.

pub mod admin;
pub mod annotations;
pub mod api;
pub mod cni;
pub mod control;
pub mod inject;
pub mod logs;

/// An error with its causes on one line, for replies and logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
