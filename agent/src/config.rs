//! The agent's configuration: flags, each with an environment variable, parsed
//! once into a frozen struct that `podsteer status` can show.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::iptables::Backend;
use crate::mode::ModeRequest;
use crate::policy::{NodeDefaults, ProxyMode};

/// Default paths on a real node; the lab passes its own.
pub mod defaults {
    pub const SOCKET: &str = podsteer_proto::api::DEFAULT_SOCKET;
    pub const STATE_DIR: &str = "/var/run/podsteer";
    pub const BPFFS: &str = "/sys/fs/bpf";
    pub const CGROUP: &str = "/sys/fs/cgroup/kubepods.slice";
    pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
    pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
}

#[derive(Args, Clone, Debug, Serialize)]
pub struct AgentConfig {
    /// Interception mode; auto probes the kernel and falls back to iptables.
    #[arg(global = true, long, env = "PODSTEER_MODE", value_enum, default_value = "auto")]
    pub mode: ModeRequest,
    /// The pods' parent cgroup, where the cgroup programs attach once.
    #[arg(global = true, long, env = "PODSTEER_CGROUP", default_value = defaults::CGROUP)]
    pub cgroup: PathBuf,
    /// bpffs mount; pins go in its `podsteer/` directory (mounted if absent).
    #[arg(global = true, long, env = "PODSTEER_BPFFS", default_value = defaults::BPFFS)]
    pub bpffs: PathBuf,
    /// The socket the CNI plugin, the proxy and the CLI talk to (mode 0600).
    #[arg(global = true, long, env = "PODSTEER_SOCKET", default_value = defaults::SOCKET)]
    pub socket: PathBuf,
    /// A socket for sidecars that run as the proxy UID from their start (the
    /// injector's): anyone may connect (mode 0666, in a directory of its own
    /// that pods mount), and it answers only `RegisterListener`, from a
    /// process with the proxy UID or root inside a registered pod's netns,
    /// for that pod. See SECURITY.md.
    #[arg(global = true, long, env = "PODSTEER_SIDECAR_SOCKET")]
    pub sidecar_socket: Option<PathBuf>,
    /// A directory of Pod manifests (YAML or JSON), one per pod, keyed by
    /// `metadata.uid`: who each pod is (namespace and service account). With
    /// it, a pod the directory does not name is not enrolled: its ADD waits
    /// `--workload-wait-ms`, then fails and the runtime retries.
    #[arg(global = true, long, env = "PODSTEER_WORKLOAD_DIR", conflicts_with = "kubernetes")]
    pub workload_dir: Option<PathBuf>,
    /// The Kubernetes API as the workload source (a watch of every pod: this
    /// node's for their identities, all for the mesh's peers) and, unless
    /// `--policy-dir` is given, as the source of `AuthorizationPolicy` and
    /// `PeerAuthentication` (a cluster without Istio's CRDs has none). The
    /// client is configured in-cluster (the pod's service account), or from
    /// `--kubeconfig`. Needs get/list/watch on them (see daemonset.yaml).
    #[arg(global = true, long, env = "PODSTEER_KUBERNETES")]
    pub kubernetes: bool,
    #[arg(global = true, long, env = "PODSTEER_KUBECONFIG", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (the downward API's `spec.nodeName`): with it, a pod
    /// the workload source places on another node is not enrolled here, so
    /// this node's issuer signs only its own pods' identities.
    #[arg(global = true, long, env = "PODSTEER_NODE_NAME")]
    pub node_name: Option<String>,
    #[arg(global = true, long, env = "PODSTEER_WORKLOAD_WAIT_MS", default_value_t = 10_000)]
    pub workload_wait_ms: u64,
    /// The mesh's CA: `ca.crt` (the trust bundle, every root peers may chain
    /// to), `issuer.crt` and `issuer.key` (see `podsteer ca create`; a
    /// Kubernetes Secret on a cluster). With it and `--workload-dir`, every
    /// shared-mode pod gets a certificate for its SPIFFE ID, and traffic
    /// between meshed pods goes over HBONE (mTLS). A changed `ca.crt` is
    /// re-read: put the new root beside the old for a rotation.
    #[arg(global = true, long, env = "PODSTEER_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// How long a workload certificate lives; it is renewed at half-life.
    #[arg(global = true, long, env = "PODSTEER_CERT_LIFETIME_MS", default_value_t = 24 * 3600 * 1000)]
    pub cert_lifetime_ms: u64,
    /// Istio `AuthorizationPolicy` and `PeerAuthentication` objects, as YAML
    /// files (multi-document allowed): enforced by the receiving proxy for
    /// every pod it serves, re-read when a file changes. One invalid document
    /// refuses the set, and the last good one stays in force.
    #[arg(global = true, long, env = "PODSTEER_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,
    /// The namespace whose policies apply mesh-wide (Istio's root namespace).
    #[arg(global = true, long, env = "PODSTEER_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// The SPIFFE trust domain of the pods' identities.
    #[arg(global = true, long, env = "PODSTEER_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The shared proxy's control socket (SOCK_SEQPACKET). With it, a pod is
    /// ready only once the proxy has opened its listeners.
    #[arg(global = true, long, env = "PODSTEER_PROXY_SOCKET")]
    pub proxy_socket: Option<PathBuf>,
    /// The uid the shared proxy runs as: only a process with it, in the node's
    /// netns, is taken as the proxy on the control socket.
    #[arg(global = true, long, env = "PODSTEER_PROXY_PEER_UID", default_value_t = 0)]
    pub proxy_peer_uid: u32,
    /// More network namespaces whose root processes are node-level on the
    /// agent socket, besides the agent's own (which, with hostNetwork, is the
    /// node's). For a lab whose agent runs in a netns of its own.
    #[arg(global = true, long, env = "PODSTEER_NODE_NETNS", value_delimiter = ',')]
    pub node_netns: Vec<PathBuf>,
    /// How long a pod add waits for a proxy to be connected.
    #[arg(global = true, long, env = "PODSTEER_PROXY_WAIT_MS", default_value_t = 10_000)]
    pub proxy_wait_ms: u64,
    /// Where the pod registry is saved across restarts.
    #[arg(global = true, long, env = "PODSTEER_STATE_DIR", default_value = defaults::STATE_DIR)]
    pub state_dir: PathBuf,
    #[arg(global = true, long, env = "PODSTEER_OUTBOUND_PORT", default_value_t = podsteer_common::OUTBOUND_PORT)]
    pub outbound_port: u16,
    #[arg(global = true, long, env = "PODSTEER_INBOUND_PORT", default_value_t = podsteer_common::INBOUND_PORT)]
    pub inbound_port: u16,
    /// SO_MARK on the proxy's own sockets; they are never redirected.
    #[arg(global = true, long, env = "PODSTEER_PROXY_MARK", default_value_t = podsteer_common::PROXY_MARK)]
    pub proxy_mark: u32,
    /// UID of per-pod sidecar proxies; their sockets are never redirected.
    #[arg(global = true, long, env = "PODSTEER_PROXY_UID", default_value_t = podsteer_common::PROXY_UID)]
    pub proxy_uid: u32,
    /// Default proxy shape for pods without the proxy-mode annotation.
    #[arg(global = true, long, env = "PODSTEER_PROXY_MODE", value_enum, default_value = "shared")]
    pub proxy_mode: ProxyModeArg,
    /// Turns the sk_msg shortcut of local socket pairs on for every pod without
    /// the `podsteer.io/sk-msg` annotation. Off by default: it changes what an
    /// app's sockets do (blocking readers get spurious EAGAIN, and redirected
    /// bytes are not bounded by the receiver's buffer; see the README).
    #[arg(global = true, long, env = "PODSTEER_SK_MSG")]
    pub sk_msg: bool,
    /// Where meshed pods' connections to unmeshed destinations go, for pods
    /// without the `podsteer.io/unmeshed-outbound` annotation: `direct` (the
    /// proxy would add nothing; the kernel accounts them and the agent writes
    /// their access lines and metrics) or `proxy`. eBPF mode only.
    #[arg(global = true, long, env = "PODSTEER_UNMESHED_OUTBOUND", value_enum, default_value = "direct")]
    pub unmeshed_outbound: crate::policy::Unmeshed,
    /// iptables backend; detected from the node's rules when unset.
    #[arg(global = true, long, env = "PODSTEER_IPTABLES_BACKEND", value_enum)]
    pub iptables_backend: Option<Backend>,
    /// Report these probed features as absent (rehearses the iptables fallback).
    #[arg(global = true, long = "mask-feature", env = "PODSTEER_MASK_FEATURES", value_delimiter = ',')]
    pub mask_features: Vec<String>,
    /// Install podsteer-cni into the node's CNI dirs and keep its conflist entry in place.
    #[arg(global = true, long, env = "PODSTEER_INSTALL_CNI")]
    pub install_cni: bool,
    #[arg(global = true, long, env = "PODSTEER_CNI_BIN_DIR", default_value = defaults::CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    #[arg(global = true, long, env = "PODSTEER_CNI_CONF_DIR", default_value = defaults::CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// The podsteer-cni binary to install; by default the one next to this agent.
    #[arg(global = true, long, env = "PODSTEER_CNI_PLUGIN")]
    pub cni_plugin: Option<PathBuf>,
    /// Written into the plugin entry: how long ADD waits for the agent.
    #[arg(global = true, long, env = "PODSTEER_CNI_TIMEOUT_MS", default_value_t = 10_000)]
    pub cni_timeout_ms: u64,
    /// Written into the plugin entry: start pods un-intercepted when the agent is down.
    #[arg(global = true, long, env = "PODSTEER_CNI_FAIL_OPEN")]
    pub cni_fail_open: bool,
    /// Written into the plugin entry: namespaces never meshed.
    #[arg(global = true, long, env = "PODSTEER_EXCLUDE_NAMESPACES", value_delimiter = ',', default_value = "kube-system")]
    pub exclude_namespaces: Vec<String>,
    /// Written into the plugin entry: opt-out meshes every pod unless annotated otherwise.
    #[arg(global = true, long, env = "PODSTEER_INJECTION", value_enum, default_value = "opt-out")]
    pub injection: crate::policy::Injection,
    /// Written into the plugin entry: where the plugin appends its log lines.
    #[arg(global = true, long, env = "PODSTEER_CNI_LOG_FILE")]
    pub cni_log_file: Option<PathBuf>,
    /// On SIGTERM, uninstall (pods' interception, pins, CNI entry) instead of
    /// leaving everything for the next agent. Set it before deleting the DaemonSet.
    #[arg(global = true, long, env = "PODSTEER_UNINSTALL_ON_EXIT")]
    pub uninstall_on_exit: bool,
    /// The container runtime's CRI socket. With it, the agent enrols pods that
    /// started before it and forgets pods that are gone.
    #[arg(global = true, long, env = "PODSTEER_CRI_SOCKET")]
    pub cri_socket: Option<PathBuf>,
    /// How often repair runs after the first pass at start.
    #[arg(global = true, long, env = "PODSTEER_REPAIR_INTERVAL_SECS", default_value_t = 60)]
    pub repair_interval_secs: u64,
    /// /healthz, /readyz and /metrics.
    #[arg(global = true, long, env = "PODSTEER_ADMIN_ADDR", default_value = "127.0.0.1:15021")]
    pub admin_addr: std::net::SocketAddr,
    /// Log as JSON lines instead of text.
    #[arg(global = true, long, env = "PODSTEER_LOG_JSON")]
    pub log_json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyModeArg {
    Shared,
    Sidecar,
}

impl AgentConfig {
    pub fn node_defaults(&self) -> NodeDefaults {
        NodeDefaults {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_mark: self.proxy_mark,
            proxy_uid: self.proxy_uid,
            sk_msg: self.sk_msg,
            proxy_mode: match self.proxy_mode {
                ProxyModeArg::Shared => ProxyMode::Shared,
                ProxyModeArg::Sidecar => ProxyMode::Sidecar,
            },
            hbone: self.ca_dir.is_some(),
            unmeshed: self.unmeshed_outbound,
        }
    }

    pub fn registry_path(&self) -> PathBuf {
        self.state_dir.join("pods.json")
    }

    /// The plugin's conflist entry, carrying the node's CNI settings.
    pub fn cni_entry(&self) -> serde_json::Value {
        let mut e = serde_json::json!({
            "type": podsteer_proto::cni::PLUGIN_TYPE,
            "agentSocket": self.socket,
            "timeoutMs": self.cni_timeout_ms,
            "failOpen": self.cni_fail_open,
            "excludeNamespaces": self.exclude_namespaces,
            "injection": self.injection,
            "capabilities": {podsteer_proto::cni::ANNOTATIONS_CAPABILITY: true},
        });
        if let Some(log) = &self.cni_log_file {
            e["logFile"] = serde_json::json!(log);
        }
        e
    }

    pub fn installer(&self) -> crate::install::Installer {
        let source = self.cni_plugin.clone().unwrap_or_else(|| {
            std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join(podsteer_proto::cni::PLUGIN_TYPE))).unwrap_or_default()
        });
        crate::install::Installer {
            bin_dir: self.cni_bin_dir.clone(),
            conf_dir: self.cni_conf_dir.clone(),
            plugin_source: source,
            undo_file: self.state_dir.join("cni-undo.json"),
            entry: self.cni_entry(),
        }
    }
}

/// Splices a node config file into the command line. `--config FILE` (or
/// PODSTEER_CONFIG) names a file of `flag = value` lines (`# comments`; a bare
/// `flag` sets a switch). Its flags go before the real ones, so the command line
/// wins over the file, and the file over the environment.
pub fn args_with_file(args: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let mut out = Vec::with_capacity(args.len());
    let mut file: Option<PathBuf> = std::env::var_os("PODSTEER_CONFIG").map(PathBuf::from);
    let mut it = args.into_iter();
    out.extend(it.next());
    let mut rest = Vec::new();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--config") => file = it.next().map(PathBuf::from),
            Some(s) if s.starts_with("--config=") => file = Some(PathBuf::from(&s["--config=".len()..])),
            _ => rest.push(a),
        }
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading config file {}: {e}", path.display()))?;
        out.extend(
            parse_config_file(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?.into_iter().map(Into::into),
        );
    }
    out.extend(rest);
    Ok(out)
}

/// `flag = value` lines into `--flag=value` arguments.
pub fn parse_config_file(text: &str) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (k, v) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
            None => (line, None),
        };
        if k.is_empty() || k.starts_with('-') || k.contains(char::is_whitespace) {
            return Err(format!("line {}: {line:?} is not `flag = value`", n + 1));
        }
        args.push(match v {
            Some(v) => format!("--{k}={v}"),
            None => format!("--{k}"),
        });
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn config_file_flags_parse_and_the_command_line_wins() {
        let file =
            "# node settings\nmode = iptables\noutbound-port = 15011\ninstall-cni\nexclude-namespaces = \"kube-system,monitoring\"\n";
        let mut argv = vec!["podsteer-agent".to_owned()];
        argv.extend(parse_config_file(file).unwrap());
        argv.push("--outbound-port=15021".into());
        let cli = crate::cli::Cli::try_parse_from(argv).unwrap();
        assert_eq!(cli.config.mode, ModeRequest::Iptables);
        assert!(cli.config.install_cni);
        assert_eq!(cli.config.outbound_port, 15021, "the command line wins");
        assert_eq!(cli.config.exclude_namespaces, vec!["kube-system", "monitoring"]);
    }

    #[test]
    fn a_bad_config_line_is_refused_with_its_number() {
        assert_eq!(parse_config_file("mode = ebpf\n--oops\n").unwrap_err(), "line 2: \"--oops\" is not `flag = value`");
    }
}
