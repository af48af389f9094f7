//! A lab pod: its own netns wired to the node bridge by the node's conflist, a
//! cgroup under the node's pods subtree, and Kubernetes metadata in CNI_ARGS.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Map, Value, json};

use crate::cgroup::CgroupDir;
use crate::cni::{Attachment, result_ips};
use crate::netns::NetNs;
use crate::node::NodeInner;
use crate::process::{LabProcess, command_in};

#[derive(Clone, Debug, Default)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub annotations: BTreeMap<String, String>,
    /// Whether the loopback plugin brings `lo` up before the pod's chain runs.
    /// containerd attaches a pod's networks concurrently, so the chain may
    /// run with `lo` still down: [`PodSpec::without_loopback`] is that case.
    pub loopback: bool,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str) -> Self {
        PodSpec { name: name.into(), namespace: namespace.into(), annotations: BTreeMap::new(), loopback: true }
    }

    /// `lo` left down, as the chain can find it under containerd.
    pub fn without_loopback(mut self) -> Self {
        self.loopback = false;
        self
    }

    pub fn annotate(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }
}

/// A running pod sandbox. Dropping it runs CNI DEL, then removes its cgroup and netns.
pub struct Pod {
    // Field order is drop order after `Drop::drop` has run DEL.
    cgroup: CgroupDir,
    netns: NetNs,
    spec: PodSpec,
    uid: String,
    attachment: Attachment,
    result: Value,
    ips: Vec<IpAddr>,
    node: Arc<NodeInner>,
}

impl Pod {
    pub(crate) fn create(node: Arc<NodeInner>, spec: PodSpec) -> anyhow::Result<Pod> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n);
        let container_id = format!("{:016x}{:048x}", std::process::id(), n);
        let name = node.id.netns_name(&spec.name);
        let netns = if spec.loopback { NetNs::create(&name)? } else { NetNs::create_with_loopback_down(&name)? };
        let cgroup = CgroupDir::create(node.pods_cgroup.path().join(format!("pod{uid}")))?;

        let mut runtime_config = Map::new();
        runtime_config.insert("portMappings".into(), json!([]));
        runtime_config.insert("io.kubernetes.cri.pod-annotations".into(), json!(spec.annotations));
        let attachment = Attachment {
            container_id,
            netns: netns.path().display().to_string(),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), spec.namespace.clone()),
                ("K8S_POD_NAME".into(), spec.name.clone()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), String::new()),
                ("K8S_POD_UID".into(), uid.clone()),
            ],
            runtime_config,
        };
        let lo = Attachment { ifname: "lo".into(), ..attachment.clone() };
        if spec.loopback {
            node.loopback.add(&lo)?;
        }
        let result = match node.runtime.add(&attachment) {
            Ok(r) => r,
            Err(e) => {
                // As a runtime does: a failed ADD is followed by DEL so no half-made pod remains.
                let _ = node.runtime.del(&attachment);
                let _ = node.loopback.del(&lo);
                return Err(e.into());
            }
        };
        let ips = result_ips(&result);
        Ok(Pod { cgroup, netns, spec, uid, attachment, result, ips, node })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn namespace(&self) -> &str {
        &self.spec.namespace
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }

    pub fn attachment(&self) -> &Attachment {
        &self.attachment
    }

    /// The final CNI result of ADD, as the runtime cached it.
    pub fn cni_result(&self) -> &Value {
        &self.result
    }

    pub fn ips(&self) -> &[IpAddr] {
        &self.ips
    }

    pub fn ipv4(&self) -> Option<IpAddr> {
        self.ips.iter().copied().find(IpAddr::is_ipv4)
    }

    pub fn ipv6(&self) -> Option<IpAddr> {
        self.ips.iter().copied().find(IpAddr::is_ipv6)
    }

    /// Runs `f` on a thread inside the pod's netns (not its cgroup).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        self.netns.run(f)
    }

    /// A command that runs as a pod process: in the pod's netns and cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        self.command_in_cgroup(program, self.cgroup.path())
    }

    /// A command in the pod's netns but another cgroup: the shared proxy's
    /// listeners live in each pod's netns while the proxy itself is a node process.
    pub fn command_in_cgroup(&self, program: impl AsRef<std::ffi::OsStr>, cgroup: &Path) -> anyhow::Result<Command> {
        command_in(program, self.netns.path(), cgroup)
    }

    /// Starts a pod process, recorded with the node so a sweep can find it.
    pub fn spawn(&self, name: &str, cmd: Command) -> anyhow::Result<LabProcess> {
        LabProcess::spawn(name, cmd, self.node.state.path())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Err(e) = self.node.runtime.del(&self.attachment) {
            eprintln!("lab: CNI DEL of pod {}: {e}", self.spec.name);
        }
        let lo = Attachment { ifname: "lo".into(), ..self.attachment.clone() };
        if let Err(e) = self.node.loopback.del(&lo) {
            eprintln!("lab: CNI DEL (loopback) of pod {}: {e}", self.spec.name);
        }
    }
}
