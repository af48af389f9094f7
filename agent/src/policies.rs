//! The node's security policies: every `AuthorizationPolicy` and
//! `PeerAuthentication`, from files (`--policy-dir`) or from the Kubernetes
//! API (`--kubernetes`), validated as one bundle whenever they change. A
//! bundle with one invalid document is refused, logged and counted, and the
//! last good one stays in force; with none good since the start, the proxy is
//! told to refuse inbound, never to let everything in.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use podsteer_authz::source::{self, Bundle};
use tracing::{info, warn};

use crate::apiserver::ApiSource;

/// Where the policies come from.
enum Feed {
    Files {
        dir: PathBuf,
        /// What the directory held when last read: names, sizes and times.
        stamp: Vec<(PathBuf, u64, Option<SystemTime>)>,
    },
    Api {
        source: ApiSource,
        /// The watches' generation last read.
        seen: Option<u64>,
        /// Where the last good set is saved, for the next run and for `podsteer explain`.
        snapshot: PathBuf,
    },
}

pub struct PolicyFiles {
    feed: Feed,
    pub root_namespace: String,
    /// The last good text and its bundle.
    good: Option<(String, Bundle)>,
    /// Why the newest policies were refused, while they are.
    pub refused: Option<String>,
}

impl PolicyFiles {
    pub fn open(dir: &Path, root_namespace: &str) -> PolicyFiles {
        let feed = Feed::Files { dir: dir.into(), stamp: Vec::new() };
        let mut p = PolicyFiles { feed, root_namespace: root_namespace.into(), good: None, refused: None };
        p.poll();
        p
    }

    /// From the API's watches, starting from the last run's good set (in
    /// `snapshot`), so a restarted agent does not close inbound while the
    /// API lists everything again.
    pub fn from_api(source: ApiSource, snapshot: &Path, root_namespace: &str) -> PolicyFiles {
        let good = source::read_dir(snapshot).ok().filter(|(text, _)| !text.is_empty());
        if let Some((_, b)) = &good {
            info!(authorization = b.authorization.len(), "security policies from the last run's snapshot, until the API lists them");
        }
        let feed = Feed::Api { source, seen: None, snapshot: snapshot.into() };
        let mut p = PolicyFiles { feed, root_namespace: root_namespace.into(), good, refused: None };
        p.poll();
        p
    }

    /// Re-reads the policies if they changed; whether what the proxy must hold changed.
    pub fn poll(&mut self) -> bool {
        let read = match &mut self.feed {
            Feed::Files { dir, stamp } => {
                let now = stamps(dir);
                if !stamp.is_empty() && now == *stamp {
                    return false;
                }
                *stamp = now;
                source::read_dir(dir).map_err(|e| podsteer_proto::error_chain(&e))
            }
            Feed::Api { source, seen, .. } => {
                let Some(t) = source.policy_text_since(*seen) else { return false };
                *seen = Some(t.generation);
                source::parse(&t.text)
                    .map(|b| (t.text, b))
                    .map_err(|e| format!("from the Kubernetes API: {}", podsteer_proto::error_chain(&e)))
            }
        };
        match read {
            Ok((text, bundle)) => {
                info!(
                    authorization = bundle.authorization.len(),
                    peer_authentication = bundle.peer_authentication.len(),
                    "security policies"
                );
                let changed = self.good.as_ref().is_none_or(|(t, _)| *t != text);
                if changed
                    && let Feed::Api { snapshot, .. } = &self.feed
                    && let Err(e) = crate::apiserver::save_snapshot(snapshot, "policies.yaml", text.as_bytes())
                {
                    warn!(error = %e, "saving the policies' snapshot");
                }
                self.good = Some((text, bundle));
                self.refused = None;
                changed
            }
            Err(why) => {
                warn!(error = %why, kept = self.good.is_some(), "security policies refused; the last good ones stay in force");
                crate::metrics::metrics().policies_refused.inc();
                self.refused = Some(why);
                false
            }
        }
    }

    pub fn bundle(&self) -> Option<&Bundle> {
        self.good.as_ref().map(|(_, b)| b)
    }

    /// The message for the proxy: the text in a sealed memfd, or "closed"
    /// when there has never been a good bundle.
    pub fn message(&self) -> std::io::Result<(bool, Option<OwnedFd>)> {
        match self.text() {
            None => Ok((true, None)),
            Some(text) => Ok((false, Some(podsteer_proto::control::sealed_memfd("podsteer-policies", text.as_bytes())?))),
        }
    }

    /// The last good text; none when there has never been one (closed).
    pub fn text(&self) -> Option<&str> {
        self.good.as_ref().map(|(t, _)| t.as_str())
    }
}

fn stamps(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok().map(|m| (e.path(), m.len(), m.modified().ok())))
        .collect();
    v.sort();
    v
}
