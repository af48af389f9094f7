//! The container runtime's CRI API over its Unix socket: how the agent finds
//! pods that started before it (repair), without a Kubernetes API server.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ListPodSandboxRequest, PodSandboxFilter, PodSandboxState, PodSandboxStateValue, PodSandboxStatusRequest};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::api::PodInfo;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("connecting to the CRI socket {path}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {call}")]
    Call {
        call: &'static str,
        #[source]
        source: Box<tonic::Status>,
    },
}

pub type Client = RuntimeServiceClient<Channel>;

pub async fn connect(socket: &Path) -> Result<Client, CriError> {
    let path: PathBuf = socket.to_owned();
    let shown = path.display().to_string();
    // The URI is a placeholder: every connection goes to the Unix socket.
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|source| CriError::Connect { path: shown, source })?;
    Ok(RuntimeServiceClient::new(channel))
}

/// What the runtime runs: every ready sandbox's pod UID, and, for those whose
/// status could be read in full, what enrolment needs.
#[derive(Debug, Default)]
pub struct Sandboxes {
    /// Every ready sandbox's pod UID, readable or not: a pod listed here is alive.
    pub running: std::collections::BTreeSet<String>,
    /// Identity, netns, IPs and annotations, where the status said them all.
    pub pods: Vec<PodInfo>,
}

/// Every ready pod sandbox with what enrolment needs: identity, netns, IPs, annotations.
pub async fn ready_pods(client: &mut Client) -> Result<Sandboxes, CriError> {
    let filter =
        PodSandboxFilter { state: Some(PodSandboxStateValue { state: PodSandboxState::SandboxReady as i32 }), ..Default::default() };
    let list = client
        .list_pod_sandbox(ListPodSandboxRequest { filter: Some(filter) })
        .await
        .map_err(|e| CriError::Call { call: "ListPodSandbox", source: Box::new(e) })?
        .into_inner();
    let mut out = Sandboxes::default();
    for sb in list.items {
        if let Some(meta) = &sb.metadata {
            out.running.insert(meta.uid.clone());
        }
        let status = client
            .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: sb.id.clone(), verbose: true })
            .await
            .map_err(|e| CriError::Call { call: "PodSandboxStatus", source: Box::new(e) })?
            .into_inner();
        let Some(st) = status.status else { continue };
        let Some(meta) = st.metadata else { continue };
        let Some(netns) = netns_path(&status.info) else { continue };
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(net) = st.network {
            ips.extend(net.ip.parse::<IpAddr>().ok());
            ips.extend(net.additional_ips.iter().filter_map(|a| a.ip.parse::<IpAddr>().ok()));
        }
        out.pods.push(PodInfo {
            uid: meta.uid,
            name: meta.name,
            namespace: meta.namespace,
            netns,
            ips,
            annotations: st.annotations.into_iter().collect::<BTreeMap<_, _>>(),
            container_id: Some(sb.id),
        });
    }
    Ok(out)
}

/// containerd's verbose status carries the sandbox's OCI spec; its network
/// namespace path is where the pod's netns is pinned.
fn netns_path(info: &std::collections::HashMap<String, String>) -> Option<PathBuf> {
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    v["runtimeSpec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}
