//! A container runtime's side of CNI: runs a conflist's plugins in order for
//! ADD and in reverse for DEL, chains `prevResult`, injects `runtimeConfig` for
//! declared capabilities and caches the ADD result for DEL, as libcni does.

use std::fs;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Map, Value, json};

use crate::process::enter_before_exec;

/// What a plugin said when it failed, or why it could not be run.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("plugin {plugin} {command} failed with CNI code {code}: {msg} ({details})")]
    Plugin { plugin: String, command: String, code: u32, msg: String, details: String },
    #[error("plugin {plugin} {command}: {reason}")]
    Exec { plugin: String, command: String, reason: String },
    #[error("result cache {path}: {source}")]
    Cache { path: PathBuf, source: std::io::Error },
}

impl CniError {
    /// The CNI error code, for tests that assert on it.
    pub fn code(&self) -> Option<u32> {
        match self {
            CniError::Plugin { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One attachment of a container to the network: what the runtime knows of it.
#[derive(Clone, Debug, Default)]
pub struct Attachment {
    pub container_id: String,
    /// Empty on the runtime's second DEL, once the netns is gone.
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` pairs, such as `K8S_POD_NAME`.
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `io.kubernetes.cri.pod-annotations`, ...).
    pub runtime_config: Map<String, Value>,
}

/// A conflist and the runtime settings to run it.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// Used when there is no conf dir.
    conflist: Value,
    /// Read before every operation, as containerd re-reads its CNI conf dir.
    conf_dir: Option<PathBuf>,
    plugin_dirs: Vec<PathBuf>,
    cache_dir: PathBuf,
    /// The netns the plugins themselves run in: the node's, not the machine's.
    exec_netns: Option<PathBuf>,
}

impl Runtime {
    pub fn new(conflist: Value, plugin_dirs: Vec<PathBuf>, cache_dir: PathBuf, exec_netns: Option<PathBuf>) -> Self {
        Runtime { conflist, conf_dir: None, plugin_dirs, cache_dir, exec_netns }
    }

    /// A runtime that reads its conflist from the first file of `dir` each time.
    pub fn from_conf_dir(dir: PathBuf, plugin_dirs: Vec<PathBuf>, cache_dir: PathBuf, exec_netns: Option<PathBuf>) -> Self {
        Runtime { conflist: Value::Null, conf_dir: Some(dir), plugin_dirs, cache_dir, exec_netns }
    }

    /// The conflist as the next operation will see it.
    pub fn conflist(&self) -> Value {
        let Some(dir) = &self.conf_dir else { return self.conflist.clone() };
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conf" | "conflist" | "json")))
            .collect();
        files.sort();
        files.first().and_then(|f| serde_json::from_slice(&fs::read(f).ok()?).ok()).unwrap_or(Value::Null)
    }

    pub fn conf_dir(&self) -> Option<&Path> {
        self.conf_dir.as_deref()
    }

    pub fn plugin_dirs(&self) -> &[PathBuf] {
        &self.plugin_dirs
    }

    pub fn network_name(&self) -> String {
        self.conflist()["name"].as_str().unwrap_or("unnamed").to_owned()
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist()["plugins"].as_array().cloned().unwrap_or_default()
    }

    pub fn add(&self, att: &Attachment) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let out = self.exec(&plugin, "ADD", att, prev.as_ref())?;
            prev = Some(out.ok_or_else(|| CniError::Exec {
                plugin: plugin_type(&plugin),
                command: "ADD".into(),
                reason: "printed no result".into(),
            })?);
        }
        let result = prev.unwrap_or_else(|| json!({"cniVersion": self.conflist()["cniVersion"]}));
        let path = self.cache_path(att);
        let cached = json!({"kind": "cniCacheV1", "containerId": att.container_id, "ifName": att.ifname,
                            "networkName": self.network_name(), "result": result});
        write_file(&path, &cached).map_err(|source| CniError::Cache { path, source })?;
        Ok(result)
    }

    pub fn check(&self, att: &Attachment) -> Result<(), CniError> {
        let prev = self.cached_result(att);
        for plugin in self.plugins() {
            self.exec(&plugin, "CHECK", att, prev.as_ref())?;
        }
        Ok(())
    }

    /// DEL in reverse order with the cached ADD result; the cache goes only when all succeeded.
    /// Unlike libcni, a failing plugin does not stop the others: the lab's guards
    /// must release addresses and links even when one plugin of the chain is broken.
    pub fn del(&self, att: &Attachment) -> Result<(), CniError> {
        let prev = self.cached_result(att);
        let mut first_err = None;
        for plugin in self.plugins().iter().rev() {
            if let Err(e) = self.exec(plugin, "DEL", att, prev.as_ref()) {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let path = self.cache_path(att);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CniError::Cache { path, source: e }),
            _ => Ok(()),
        }
    }

    pub fn cached_result(&self, att: &Attachment) -> Option<Value> {
        let text = fs::read_to_string(self.cache_path(att)).ok()?;
        serde_json::from_str::<Value>(&text).ok()?.get("result").cloned()
    }

    fn cache_path(&self, att: &Attachment) -> PathBuf {
        self.cache_dir.join("results").join(format!("{}-{}-{}", self.network_name(), att.container_id, att.ifname))
    }

    /// The exact stdin a plugin gets: its own entry plus name, version, prevResult and runtimeConfig.
    pub fn plugin_config(&self, plugin: &Value, att: &Attachment, prev: Option<&Value>) -> Value {
        let list = self.conflist();
        let mut conf = plugin.as_object().cloned().unwrap_or_default();
        conf.insert("name".into(), list["name"].clone());
        conf.insert("cniVersion".into(), list["cniVersion"].clone());
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let declared: Vec<String> = plugin["capabilities"]
            .as_object()
            .map(|caps| caps.iter().filter(|(_, on)| on.as_bool() == Some(true)).map(|(k, _)| k.clone()).collect())
            .unwrap_or_default();
        let rc: Map<String, Value> =
            declared.iter().filter_map(|cap| att.runtime_config.get(cap).map(|v| (cap.clone(), v.clone()))).collect();
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Value::Object(conf)
    }

    fn find_plugin(&self, kind: &str) -> Option<PathBuf> {
        self.plugin_dirs.iter().map(|d| d.join(kind)).find(|p| p.is_file())
    }

    fn exec(&self, plugin: &Value, command: &str, att: &Attachment, prev: Option<&Value>) -> Result<Option<Value>, CniError> {
        let kind = plugin_type(plugin);
        let fail = |reason: String| CniError::Exec { plugin: kind.clone(), command: command.into(), reason };
        let bin = self.find_plugin(&kind).ok_or_else(|| fail(format!("not found in {:?}", self.plugin_dirs)))?;
        let conf = self.plugin_config(plugin, att, prev);
        let args = att.args.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";");
        let cni_path = std::env::join_paths(&self.plugin_dirs).map_err(|e| fail(e.to_string()))?;

        let mut cmd = Command::new(&bin);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", args)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = &self.exec_netns {
            let fd: OwnedFd = fs::File::open(ns).map_err(|e| fail(format!("opening {}: {e}", ns.display())))?.into();
            enter_before_exec(&mut cmd, Some(fd), None);
        }
        let mut child = cmd.spawn().map_err(|e| fail(format!("spawn {}: {e}", bin.display())))?;
        let stdin = serde_json::to_vec(&conf).map_err(|e| fail(e.to_string()))?;
        child.stdin.take().map(|mut s| s.write_all(&stdin)).transpose().map_err(|e| fail(e.to_string()))?;
        let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if !out.status.success() {
            let e = parsed.unwrap_or(Value::Null);
            return Err(CniError::Plugin {
                plugin: kind,
                command: command.into(),
                code: e["code"].as_u64().unwrap_or(999) as u32,
                msg: e["msg"].as_str().unwrap_or("").to_owned(),
                details: format!("{} {}", e["details"].as_str().unwrap_or(""), String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        Ok(parsed)
    }

    /// The netns fd the plugins run in, for callers that need to enter it too.
    pub fn exec_netns(&self) -> Option<&Path> {
        self.exec_netns.as_deref()
    }
}

fn plugin_type(plugin: &Value) -> String {
    plugin["type"].as_str().unwrap_or("").to_owned()
}

fn write_file(path: &Path, v: &Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, serde_json::to_vec_pretty(v)?)
}

/// Reads the IPs (without prefix length) from a CNI result.
pub fn result_ips(result: &Value) -> Vec<std::net::IpAddr> {
    result["ips"].as_array().into_iter().flatten().filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok()).collect()
}
