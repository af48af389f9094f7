//! A sidecar's part of the mesh. The shared proxy is told its pods'
//! certificates, the mesh view and the policies over the control socket; a
//! sidecar asks the agent for the same, for its own pod only, over the
//! sidecar socket: once before it opens its listeners (so its first
//! connection already tunnels, and is judged), then every
//! [`POLL`] with the generation it holds, which the agent answers with
//! "unchanged" or everything anew. While the agent cannot be reached (a
//! restart) the sidecar keeps what it has.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use podsteer_proto::api::{ErrorKind, Request, call_on, connect};
use podsteer_proto::control::{MeshView, SidecarMaterial, SidecarMesh, SidecarPolicies, WorkloadCert};
use tracing::{info, warn};

use crate::hbone::mesh::PodTls;
use crate::state::State;

/// How often a meshed sidecar asks. Renewals come at half a certificate's
/// life, so a second is plenty for them; it bounds how late a sidecar learns
/// of new peers and policies.
pub const POLL: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(5);

/// What the pod's listeners are opened with when it is meshed.
pub struct Meshed {
    pub tls: PodTls,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// What the next poll starts from.
    pub feed: Feed,
}

/// The sidecar's side of the polling.
pub struct Feed {
    socket: PathBuf,
    uid: String,
    generation: u64,
    /// What was last taken: an answer that moved only one part (another
    /// pod's renewal moves the node's generation too) re-applies nothing else,
    /// so live connections are not re-judged for an unchanged policy set.
    cert: WorkloadCert,
    view: Option<MeshView>,
    policies: Option<SidecarPolicies>,
}

impl Feed {
    /// Takes the parts of `m` that differ from what is held; each is
    /// refused whole if bad (see [`crate::updates`]).
    fn take(&mut self, state: &State, m: &SidecarMaterial) -> Result<(), String> {
        if self.view.as_ref() != Some(&m.view) {
            crate::updates::take_view(state, &m.view)?;
            self.view = Some(m.view.clone());
        }
        if self.policies != m.policies {
            if let Some(p) = &m.policies {
                crate::updates::take_policies(state, &p.root_namespace, p.closed, &p.text)?;
            }
            self.policies = m.policies.clone();
        }
        if self.cert != m.cert {
            crate::updates::take_cert(state, "self", &m.cert).map_err(|e| format!("renewed certificate refused: {e}"))?;
            self.cert = m.cert.clone();
        }
        Ok(())
    }
}

/// The first ask, on a stream connected before the sidecar dropped its
/// privileges: Ok(None) when the agent says this pod has no HBONE (no CA,
/// no identity) or does not know the question (an older agent). The view
/// and the policies are taken here, before any listener opens.
pub fn first(stream: UnixStream, socket: PathBuf, uid: &str, state: &State) -> anyhow::Result<Option<Meshed>> {
    let (generation, m) = match ask(stream, uid, None)? {
        Answer::Plaintext(why) => {
            info!(why, "no HBONE for this pod: relaying plaintext");
            return Ok(None);
        }
        Answer::Unchanged => anyhow::bail!("the agent said unchanged to a first ask"),
        Answer::Meshed(generation, m) => (generation, m),
    };
    let tls = PodTls::new(&m.cert).map_err(|e| anyhow::anyhow!("the pod's certificate: {e}"))?;
    // The certificate is the listeners' from the start (`tls`), not a renewal.
    let mut feed = Feed { socket, uid: uid.into(), generation, cert: m.cert.clone(), view: None, policies: None };
    feed.take(state, &m).map_err(|e| anyhow::anyhow!(e))?;
    info!(identity = %m.cert.identity, not_after = m.cert.not_after, "meshed: HBONE with the pod's own identity");
    Ok(Some(Meshed { tls, namespace: m.namespace, name: m.name, labels: m.labels, feed }))
}

/// Polls until the process ends; the pod's listeners are the proxy's "self".
pub fn poll(mut feed: Feed, state: Arc<State>) {
    let mut unreachable = false;
    loop {
        std::thread::sleep(POLL);
        let answer = connect(&feed.socket).map_err(anyhow::Error::from).and_then(|s| ask(s, &feed.uid, Some(feed.generation)));
        match answer {
            Ok(Answer::Unchanged) => {}
            // Not all taken: the generation stays, so the next poll brings it all again.
            Ok(Answer::Meshed(generation, m)) => match feed.take(&state, &m) {
                Ok(()) => feed.generation = generation,
                Err(error) => warn!(%error, "the agent's update refused; what is held stays"),
            },
            Ok(Answer::Plaintext(why)) => {
                warn!(why, "the agent no longer gives this pod HBONE; the certificate held is used until it expires")
            }
            Err(e) if !unreachable => {
                warn!(error = %podsteer_proto::error_chain(e.as_ref()), "asking the agent for the mesh; keeping what is held");
                unreachable = true;
                continue;
            }
            Err(_) => continue,
        }
        if std::mem::take(&mut unreachable) {
            info!("the agent answers again");
        }
    }
}

enum Answer {
    Plaintext(String),
    Unchanged,
    Meshed(u64, Box<SidecarMaterial>),
}

fn ask(stream: UnixStream, uid: &str, seen: Option<u64>) -> anyhow::Result<Answer> {
    let req = Request::SidecarMesh { uid: uid.into(), seen };
    let data = match call_on(stream, &req, DEADLINE, None)?.into_result() {
        Ok(d) => d,
        // An agent older than this request reads it as malformed.
        Err(e) if e.kind == ErrorKind::BadRequest => {
            return Ok(Answer::Plaintext(format!("the agent does not serve sidecars' mesh: {}", e.message)));
        }
        Err(e) => anyhow::bail!("agent refused: {e}"),
    };
    Ok(match serde_json::from_value::<SidecarMesh>(data)? {
        SidecarMesh::Plaintext { why } => Answer::Plaintext(why),
        SidecarMesh::Unchanged { .. } => Answer::Unchanged,
        SidecarMesh::Meshed { generation, material } => Answer::Meshed(generation, material),
    })
}
