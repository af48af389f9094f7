//! A node's security policy as files: every `AuthorizationPolicy` and
//! `PeerAuthentication` in a directory of (multi-document) YAML files, read
//! as one bundle. One invalid document refuses the whole bundle, so the last
//! good one stays in force and a typo never turns into allow-all.

use std::path::{Path, PathBuf};

use crate::peer_auth::{self, PeerAuthn};
use crate::policy::{self, Policy, PolicyError};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bundle {
    pub authorization: Vec<Policy>,
    pub peer_authentication: Vec<PeerAuthn>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {0}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Invalid(PathBuf, #[source] PolicyError),
}

/// Every document of `text`, by its kind.
pub fn parse(text: &str) -> Result<Bundle, PolicyError> {
    let mut b = Bundle::default();
    for (doc, d) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(d).map_err(|e| PolicyError::Parse { doc, why: e.to_string() })?;
        if value.is_null() {
            continue;
        }
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("AuthorizationPolicy") => {
                let ap = serde_yaml::from_value(value).map_err(|e| PolicyError::Parse { doc, why: e.to_string() })?;
                b.authorization.push(policy::validate(&ap)?);
            }
            Some("PeerAuthentication") => b.peer_authentication.push(peer_auth::validate(value, doc)?),
            other => {
                return Err(PolicyError::Parse { doc, why: format!("kind {other:?} is not AuthorizationPolicy or PeerAuthentication") });
            }
        }
    }
    Ok(b)
}

/// The `*.yaml`/`*.yml` files of `dir`, in name order, as one text (what the
/// agent hands the proxy), and the bundle they make.
pub fn read_dir(dir: &Path) -> Result<(String, Bundle), SourceError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| SourceError::Io(dir.into(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut text = String::new();
    let mut bundle = Bundle::default();
    for f in files {
        let t = std::fs::read_to_string(&f).map_err(|e| SourceError::Io(f.clone(), e))?;
        let b = parse(&t).map_err(|e| SourceError::Invalid(f.clone(), e))?;
        bundle.authorization.extend(b.authorization);
        bundle.peer_authentication.extend(b.peer_authentication);
        text.push_str("---\n");
        text.push_str(&t);
        text.push('\n');
    }
    Ok((text, bundle))
}
