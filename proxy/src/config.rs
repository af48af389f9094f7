//! The proxy's flags, each with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::splice::SpliceMode;

/// The shared proxy's default mark; the agent's `--proxy-mark` default matches it.
pub const SHARED_PROXY_MARK: u32 = 0x539;

#[derive(Parser, Clone, Debug)]
#[command(name = "podsteer-proxy", version, about = "podsteer's transparent L4 proxy")]
pub struct ProxyConfig {
    /// Shared mode: the agent's proxy control socket. Pods arrive over it.
    #[arg(long, env = "PODSTEER_PROXY_CONTROL", conflicts_with = "sidecar")]
    pub control: Option<PathBuf>,
    /// Per-pod mode: serve the netns the proxy runs in.
    #[arg(long, env = "PODSTEER_PROXY_SIDECAR")]
    pub sidecar: bool,
    /// Per-pod mode: drop to this UID after binding (the interception skips it).
    #[arg(long, env = "PODSTEER_PROXY_UID")]
    pub run_as_uid: Option<u32>,
    /// Per-pod mode in eBPF mode: hand the inbound listeners to the agent (its
    /// socket), so sk_lookup steers the pod's inbound connections to them.
    #[arg(long, env = "PODSTEER_AGENT_SOCKET", requires = "pod_uid")]
    pub agent_socket: Option<PathBuf>,
    /// Per-pod mode: this pod's UID, as the agent registered it.
    #[arg(long, env = "PODSTEER_POD_UID")]
    pub pod_uid: Option<String>,
    /// Metrics and readiness, in the proxy's own netns.
    #[arg(long, env = "PODSTEER_PROXY_ADMIN", default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
    #[arg(long, env = "PODSTEER_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    #[arg(long, env = "PODSTEER_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// SO_MARK for upstream sockets; 0 turns marking off. Default: 0x539 for the
    /// shared proxy; none for a sidecar, which the interception skips by its
    /// UID, and which after dropping to that UID lacks the CAP_NET_ADMIN that
    /// SO_MARK needs (its connects would fail with EPERM).
    #[arg(long, env = "PODSTEER_PROXY_MARK")]
    pub mark: Option<u32>,
    #[arg(long, env = "PODSTEER_CONNECT_TIMEOUT_MS", default_value_t = 5000)]
    pub connect_timeout_ms: u64,
    /// A connection with no bytes either way this long is closed. 15 minutes:
    /// longer than the idle timeouts of common cloud NATs and load balancers
    /// (AWS NAT 350 s, Azure 4 min), which apps already keep alive against,
    /// short enough that leaked connections do not hold a pod's limit for hours.
    #[arg(long, env = "PODSTEER_IDLE_TIMEOUT_MS", default_value_t = 900_000)]
    pub idle_timeout_ms: u64,
    /// Inbound connections silent both ways this long are closed while their
    /// pod holds over half its connection limit (a silent-connection flood);
    /// 0 turns it off. Below that, silence is left alone: server-speaks-first
    /// protocols and pre-opened pool connections are silent by design.
    #[arg(long, env = "PODSTEER_FIRST_BYTE_TIMEOUT_MS", default_value_t = 10_000)]
    pub first_byte_timeout_ms: u64,
    #[arg(long, env = "PODSTEER_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Zero-copy relay with splice(2): `auto` moves a direction to it once it
    /// carries bulk data. Pods whose sockets sk_msg feeds always copy.
    #[arg(long, env = "PODSTEER_PROXY_SPLICE", value_enum, default_value_t = SpliceMode::Auto)]
    pub splice: SpliceMode,
    /// Connections one pod may have open through the proxy at once (both
    /// directions); past it, new ones are reset and counted
    /// (`connections_closed{result="pod_limit"}`), and other pods do not notice.
    #[arg(long, env = "PODSTEER_MAX_CONNECTIONS_PER_POD", default_value_t = 4096)]
    pub max_connections_per_pod: usize,
    /// Bytes one pod's connections may hold in the proxy's memory at once (what
    /// a receiver cannot take yet). Past it, that pod's reads are held back to
    /// what its peers take, and TCP slows its senders; other pods do not notice.
    #[arg(long, env = "PODSTEER_MAX_BUFFERED_BYTES_PER_POD", default_value_t = 8 << 20)]
    pub max_buffered_bytes_per_pod: usize,
    /// The same for all pods together. Keep it well below the container's
    /// memory limit (daemonset.yaml: 512 MiB): past it every pod is held back,
    /// which is slower, not an OOM kill.
    #[arg(long, env = "PODSTEER_MAX_BUFFERED_BYTES", default_value_t = 256 << 20)]
    pub max_buffered_bytes: usize,
    /// Data-plane worker threads; 0 means one per CPU.
    #[arg(long, env = "PODSTEER_PROXY_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// Log (and access-log) as JSON lines.
    #[arg(long, env = "PODSTEER_LOG_JSON")]
    pub log_json: bool,
}

impl ProxyConfig {
    pub fn settings(&self) -> crate::relay::Settings {
        crate::relay::Settings {
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            mark: match self.mark {
                Some(0) => None,
                Some(m) => Some(m),
                None if self.sidecar => None,
                None => Some(SHARED_PROXY_MARK),
            },
            splice: self.splice,
            max_conns_per_pod: self.max_connections_per_pod,
            max_buffered_per_pod: self.max_buffered_bytes_per_pod,
            max_buffered: self.max_buffered_bytes,
            first_byte_timeout: (self.first_byte_timeout_ms > 0).then(|| Duration::from_millis(self.first_byte_timeout_ms)),
        }
    }
}
