//! What the runtime hands the plugin: the environment and the network config.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use super::error::{CniError, Code};

/// The CNI_* variables. CNI_NETNS is empty on a runtime's late DEL.
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub path: String,
    pub args: BTreeMap<String, String>,
}

impl CniEnv {
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> CniEnv {
        let args = get("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        CniEnv {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            path: get("CNI_PATH").unwrap_or_default(),
            args,
        }
    }

    /// Checks the variables the spec requires for `command`.
    pub fn require(&self, netns: bool) -> Result<(), CniError> {
        let missing: Vec<&str> = [
            ("CNI_CONTAINERID", self.container_id.is_empty()),
            ("CNI_IFNAME", self.ifname.is_empty()),
            ("CNI_PATH", self.path.is_empty()),
            ("CNI_NETNS", netns && self.netns.is_empty()),
        ]
        .into_iter()
        .filter_map(|(k, empty)| empty.then_some(k))
        .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(Code::InvalidEnv, "required environment variables missing", missing.join(", ")))
        }
    }

    /// The pod's identity, when the runtime is Kubernetes' (containerd, CRI-O).
    pub fn pod(&self) -> Option<(String, String, String)> {
        Some((self.args.get("K8S_POD_NAMESPACE")?.clone(), self.args.get("K8S_POD_NAME")?.clone(), self.args.get("K8S_POD_UID")?.clone()))
    }
}

pub use podsteer_proto::inject::Injection;

fn default_socket() -> PathBuf {
    podsteer_proto::api::DEFAULT_SOCKET.into()
}
fn default_timeout() -> u64 {
    10_000
}
fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}

/// The plugin's entry in the conflist, after the runtime added name, version,
/// prevResult and runtimeConfig.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: serde_json::Map<String, Value>,
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    /// How long ADD waits for the agent to program the pod and the proxy to open its listeners.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Let pods start un-intercepted when the agent cannot be reached. Off by default.
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    #[serde(default)]
    pub injection: Injection,
    /// Append the plugin's own log lines here (runtimes often drop stderr).
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// CNI GC (1.1.0): the attachments the runtime still has.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Value>>,
}

pub use podsteer_proto::cni::ANNOTATIONS_CAPABILITY;

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf =
            serde_json::from_slice(stdin).map_err(|e| CniError::new(Code::Decode, "cannot decode the network config", e.to_string()))?;
        if !super::SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("cniVersion {} is not supported", conf.cni_version),
                format!("supported: {}", super::SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        if conf.kind != super::PLUGIN_TYPE {
            return Err(CniError::new(Code::InvalidConfig, format!("type is {:?}, not {}", conf.kind, super::PLUGIN_TYPE), "")
                .in_version(&conf.cni_version));
        }
        if conf.timeout_ms == 0 {
            return Err(CniError::new(Code::InvalidConfig, "timeoutMs must be positive", "").in_version(&conf.cni_version));
        }
        Ok(conf)
    }

    /// runtimeConfig lookups ignore case: runtimes disagree (`HostPort`, `hostPort`).
    pub fn runtime(&self, key: &str) -> Option<&Value> {
        self.runtime_config.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v)
    }

    pub fn annotations(&self) -> Result<BTreeMap<String, String>, CniError> {
        match self.runtime(ANNOTATIONS_CAPABILITY) {
            None | Some(Value::Null) => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => {
                Ok(m.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect())
            }
            Some(other) => {
                Err(CniError::new(Code::InvalidConfig, "pod annotations must be an object", other.to_string())
                    .in_version(&self.cni_version))
            }
        }
    }

    /// IPs from prevResult's `ips[].address`, without prefix length.
    pub fn ips(&self) -> Result<Vec<std::net::IpAddr>, CniError> {
        let Some(prev) = &self.prev_result else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for ip in prev.get("ips").and_then(Value::as_array).into_iter().flatten() {
            let addr = ip.get("address").and_then(Value::as_str).unwrap_or("");
            let parsed = addr.split('/').next().and_then(|a| a.parse().ok());
            match parsed {
                Some(a) => out.push(a),
                None => {
                    return Err(
                        CniError::new(Code::InvalidConfig, "prevResult has an invalid IP", addr.to_owned()).in_version(&self.cni_version)
                    );
                }
            }
        }
        Ok(out)
    }
}
