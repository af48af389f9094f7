//! The injector's flags, each with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Clone, Debug)]
#[command(name = "podsteer-injector", version, about = "podsteer's sidecar injector: a mutating admission webhook")]
pub struct InjectorConfig {
    /// Where the webhook listens (HTTPS).
    #[arg(long, env = "PODSTEER_INJECTOR_LISTEN", default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,
    /// PEM certificate chain the webhook presents (the Service's DNS name in its SAN).
    #[arg(long, env = "PODSTEER_INJECTOR_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of that certificate.
    #[arg(long, env = "PODSTEER_INJECTOR_TLS_KEY")]
    pub tls_key: PathBuf,
    #[command(flatten)]
    pub sidecar: SidecarConfig,
    /// Log as JSON lines.
    #[arg(long, env = "PODSTEER_LOG_JSON")]
    pub log_json: bool,
}

/// What the added sidecar looks like.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct SidecarConfig {
    /// The podsteer-proxy image.
    #[arg(long, env = "PODSTEER_PROXY_IMAGE", default_value = "ghcr.io/podsteer/podsteer:0.1.0")]
    pub proxy_image: String,
    /// The UID the sidecar runs as: the one the agent's interception skips
    /// (its `--proxy-uid`), or the sidecar's own connections loop back into it.
    #[arg(long, env = "PODSTEER_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: i64,
    /// The sidecar's admin port (readiness and metrics), on every pod address,
    /// so the kubelet can probe it; the injector excludes it from inbound interception.
    #[arg(long, env = "PODSTEER_PROXY_ADMIN_PORT", default_value_t = 15020)]
    pub admin_port: u16,
    /// The node directory holding the agent's sidecar socket, mounted into
    /// the sidecar: in eBPF mode it hands its inbound listeners to the agent
    /// there. Empty: no hostPath volume (for namespaces whose Pod Security
    /// level forbids hostPath), which only iptables-mode nodes can serve.
    #[arg(long, env = "PODSTEER_SIDECAR_SOCKET_DIR", default_value = "/var/run/podsteer/sidecar")]
    pub sidecar_socket_dir: String,
    #[arg(long, env = "PODSTEER_PROXY_CPU_REQUEST", default_value = "50m")]
    pub cpu_request: String,
    #[arg(long, env = "PODSTEER_PROXY_MEMORY_REQUEST", default_value = "32Mi")]
    pub memory_request: String,
    /// Empty: no CPU limit (throttling a proxy adds latency to every request).
    #[arg(long, env = "PODSTEER_PROXY_CPU_LIMIT", default_value = "")]
    pub cpu_limit: String,
    #[arg(long, env = "PODSTEER_PROXY_MEMORY_LIMIT", default_value = "256Mi")]
    pub memory_limit: String,
    /// Add the proxy as a native sidecar (Kubernetes 1.28+, on by default from
    /// 1.29). `false` for older clusters: a regular container, first in the
    /// pod, which the kubelet starts first but does not wait for.
    #[arg(long, env = "PODSTEER_NATIVE_SIDECARS", default_value_t = true, action = clap::ArgAction::Set)]
    pub native_sidecars: bool,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        SidecarConfig::parse_defaults()
    }
}

impl SidecarConfig {
    /// The flags' defaults, from the one place they are written.
    fn parse_defaults() -> SidecarConfig {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            sidecar: SidecarConfig,
        }
        Only::parse_from(["podsteer-injector"]).sidecar
    }
}
