//! A lab node: a network namespace with a bridge made by the real CNI plugins,
//! a cgroup subtree for its pods, a state directory and the processes it runs.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::cgroup::{CgroupDir, cgroup2_root};
use crate::cni::Runtime;
use crate::names::LabId;
use crate::netns::NetNs;
use crate::pod::{Pod, PodSpec};
use crate::process::{LabProcess, command_in};

/// The lab's primary conflist in its conf dir.
pub const CONFLIST_FILE: &str = "10-podsteer-lab.conflist";

/// Where Debian installs containernetworking-plugins, then the upstream default.
pub const SYSTEM_PLUGIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// How to build a node. The defaults are a dual-stack bridge network.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub pod_subnet_v4: String,
    pub pod_subnet_v6: String,
    /// Plugin entries appended to the conflist after bridge and portmap (podsteer-cni, later).
    pub chained_plugins: Vec<Value>,
    /// Searched before the system plugin dirs, so a freshly built plugin wins.
    pub extra_plugin_dirs: Vec<PathBuf>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            pod_subnet_v4: "10.244.0.0/24".into(),
            pod_subnet_v6: "fd00:10:244::/64".into(),
            chained_plugins: Vec::new(),
            extra_plugin_dirs: Vec::new(),
        }
    }
}

pub(crate) struct NodeInner {
    // Field order is drop order: processes end before their cgroups and netns go.
    pub(crate) processes: Mutex<Vec<LabProcess>>,
    pub(crate) proxy_cgroup: CgroupDir,
    pub(crate) pods_cgroup: CgroupDir,
    pub(crate) lab_cgroup: CgroupDir,
    pub(crate) netns: NetNs,
    pub(crate) runtime: Runtime,
    pub(crate) loopback: Runtime,
    pub(crate) state: StateDir,
    pub(crate) id: LabId,
}

/// A simulated Kubernetes node. Cheap to clone; the last clone (and last pod) removes it.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

impl Node {
    pub fn new(opts: NodeOptions) -> anyhow::Result<Node> {
        let id = LabId::fresh();
        let state = StateDir::create(id.state_dir())?;
        let netns = NetNs::create(&id.netns_name("node"))?;
        let lab_cgroup = CgroupDir::create(cgroup2_root()?.join(id.as_str()))?;
        let pods_cgroup = CgroupDir::create(lab_cgroup.path().join("pods"))?;
        let proxy_cgroup = CgroupDir::create(pods_cgroup.path().join("podsteer-proxy"))?;

        // The node's CNI dirs, as a runtime has them: a bin dir for installed
        // plugins (podsteer-cni) searched before the system plugins, and a conf dir.
        let bin_dir = state.path().join("cni").join("bin");
        let conf_dir = state.path().join("cni").join("net.d");
        fs::create_dir_all(&bin_dir)?;
        fs::create_dir_all(&conf_dir)?;
        let mut plugin_dirs = vec![bin_dir];
        plugin_dirs.extend(opts.extra_plugin_dirs.iter().cloned());
        plugin_dirs.extend(SYSTEM_PLUGIN_DIRS.iter().map(PathBuf::from));
        let cache = state.path().join("cni-cache");
        let conflist = default_conflist(&opts, state.path());
        fs::write(conf_dir.join(CONFLIST_FILE), serde_json::to_vec_pretty(&conflist)?)?;
        let runtime = Runtime::from_conf_dir(conf_dir, plugin_dirs.clone(), cache.clone(), Some(netns.path().to_owned()));
        let loopback = Runtime::new(
            json!({"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]}),
            plugin_dirs,
            cache,
            Some(netns.path().to_owned()),
        );
        Ok(Node {
            inner: Arc::new(NodeInner {
                processes: Mutex::new(Vec::new()),
                proxy_cgroup,
                pods_cgroup,
                lab_cgroup,
                netns,
                runtime,
                loopback,
                state,
                id,
            }),
        })
    }

    pub fn id(&self) -> &LabId {
        &self.inner.id
    }

    pub fn netns(&self) -> &NetNs {
        &self.inner.netns
    }

    pub fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    pub fn state_dir(&self) -> &Path {
        self.inner.state.path()
    }

    /// The parent cgroup of every pod: where a node agent attaches cgroup programs.
    pub fn pods_cgroup(&self) -> &Path {
        self.inner.pods_cgroup.path()
    }

    /// Where the shared proxy runs: under the pods' parent, as a DaemonSet pod
    /// sits under kubepods, so the sockops programs see its sockets too.
    pub fn proxy_cgroup(&self) -> &Path {
        self.inner.proxy_cgroup.path()
    }

    /// The lab's own cgroup: node-level processes run here, outside the pods' subtree.
    pub fn lab_cgroup(&self) -> &Path {
        self.inner.lab_cgroup.path()
    }

    /// The node's CNI conf dir (what containerd's `conf_dir` points at).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.state_dir().join("cni").join("net.d")
    }

    /// The node's CNI bin dir, searched first (where the agent installs podsteer-cni).
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.state_dir().join("cni").join("bin")
    }

    /// The bridge's addresses, which pods use as their gateway.
    pub fn gateway_ips(&self) -> Vec<IpAddr> {
        let subnets = self.inner.runtime.conflist()["plugins"][0]["ipam"]["ranges"].clone();
        subnets.as_array().into_iter().flatten().filter_map(|r| first_host(r[0]["subnet"].as_str()?)).collect()
    }

    pub fn add_pod(&self, spec: PodSpec) -> anyhow::Result<Pod> {
        Pod::create(self.inner.clone(), spec)
    }

    /// A command that runs in the node netns and the lab's cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        command_in(program, self.inner.netns.path(), self.lab_cgroup())
    }

    /// A node-netns command in the proxy cgroup: how the shared proxy runs.
    pub fn proxy_command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        command_in(program, self.inner.netns.path(), self.proxy_cgroup())
    }

    /// Starts a node-level process that lives as long as the node.
    pub fn spawn(&self, name: &str, cmd: Command) -> anyhow::Result<i32> {
        let p = LabProcess::spawn(name, cmd, self.state_dir())?;
        let pid = p.pid();
        self.inner.processes.lock().map_err(|_| anyhow::anyhow!("process list poisoned"))?.push(p);
        Ok(pid)
    }

    /// Starts a process the caller owns (and so can kill, restart or wait on).
    pub fn spawn_owned(&self, name: &str, cmd: Command) -> anyhow::Result<LabProcess> {
        LabProcess::spawn(name, cmd, self.state_dir())
    }
}

fn default_conflist(opts: &NodeOptions, state: &Path) -> Value {
    let mut plugins = vec![
        json!({
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": state.join("ipam"),
                "ranges": [[{"subnet": opts.pod_subnet_v4}], [{"subnet": opts.pod_subnet_v6}]],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
            }
        }),
        json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": false}),
    ];
    plugins.extend(opts.chained_plugins.iter().cloned());
    json!({"cniVersion": "1.0.0", "name": "podsteer-lab", "plugins": plugins})
}

/// The first host address of a subnet: what host-local gives the gateway.
fn first_host(subnet: &str) -> Option<IpAddr> {
    let (net, _) = subnet.split_once('/')?;
    match net.parse().ok()? {
        IpAddr::V4(a) => Some(IpAddr::V4((u32::from(a) + 1).into())),
        IpAddr::V6(a) => Some(IpAddr::V6((u128::from(a) + 1).into())),
    }
}

/// The lab's state directory, removed with everything in it on drop.
pub(crate) struct StateDir(PathBuf);

impl StateDir {
    fn create(path: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(StateDir(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        crate::process::kill_recorded(&self.0);
        crate::sweep::unmount_below(&self.0);
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("lab: removing {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_is_first_host() {
        assert_eq!(first_host("10.244.0.0/24"), Some("10.244.0.1".parse().unwrap()));
        assert_eq!(first_host("fd00:10:244::/64"), Some("fd00:10:244::1".parse().unwrap()));
        assert_eq!(first_host("garbage"), None);
    }
}
