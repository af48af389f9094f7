//! CNI errors: the JSON the spec wants on stdout, with well-known codes.

use serde::Serialize;

/// Codes 1-11 and 50 are the spec's; 100 and up are podsteer's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    /// The agent refused the pod's policy (a bad annotation, say).
    PolicyRefused = 100,
    /// The agent failed to program interception.
    AgentFailed = 101,
    /// CHECK: interception is not in place.
    NotIntercepted = 102,
}

#[derive(Debug, Serialize, thiserror::Error)]
#[error("CNI error {code}: {msg} ({details})")]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError { cni_version: super::SPEC_VERSION.into(), code: code as u32, msg: msg.into(), details: details.into() }
    }

    pub fn in_version(mut self, v: &str) -> CniError {
        if super::SUPPORTED_VERSIONS.contains(&v) {
            self.cni_version = v.into();
        }
        self
    }
}
