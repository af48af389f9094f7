//! `podsteer certs`: the mesh's trust bundle and the identity, issuer and
//! validity of every pod certificate the agent holds. Never a key. The
//! certificates live only in the running agent's memory, so this one asks it.

use serde_json::Value;

use super::{CtlError, Paths, exit};

pub fn certs(paths: &Paths) -> Result<Value, CtlError> {
    let req = podsteer_proto::api::Request::Status;
    let status = podsteer_proto::api::call(&paths.socket, &req, std::time::Duration::from_secs(5), None)
        .map_err(|e| {
            CtlError::new(
                exit::UNAVAILABLE,
                format!(
                    "no agent answers on {} ({}): pod certificates live only in the running agent's memory",
                    paths.socket.display(),
                    podsteer_proto::error_chain(&e)
                ),
            )
        })?
        .into_result()
        .map_err(|e| CtlError::new(exit::FAILURE, e.message))?;
    match status.get("mesh") {
        Some(m) if !m.is_null() => Ok(m.clone()),
        _ => Err(CtlError::new(exit::UNAVAILABLE, "the agent runs without --ca-dir: no pod has a certificate")),
    }
}

fn when(secs: &Value) -> String {
    let s = secs.as_u64().unwrap_or(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if s >= now { format!("in {}", span(s - now)) } else { format!("{} ago", span(now - s)) }
}

fn span(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

pub fn render(m: &Value) -> String {
    let mut out = format!("trust domain {}\n", m["trust_domain"].as_str().unwrap_or("?"));
    for r in m["roots"].as_array().into_iter().flatten() {
        out += &format!("  root  {}  expires {}\n", r["subject"].as_str().unwrap_or("?"), when(&r["not_after"]));
    }
    out += &format!("{:<60} {:<12} {:<12} ISSUER\n", "IDENTITY", "EXPIRES", "RENEWS");
    for c in m["certificates"].as_array().into_iter().flatten() {
        out += &format!(
            "{:<60} {:<12} {:<12} {}\n",
            c["identity"].as_str().unwrap_or("?"),
            when(&c["not_after"]),
            when(&c["renew_at"]),
            c["issuer"].as_str().unwrap_or("?")
        );
    }
    out
}
