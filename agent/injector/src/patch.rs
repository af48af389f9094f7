//! The RFC 6902 patch that injects a pod. It is applied to the pod here
//! before it is sent and the result read back as a `Pod`, so the API server
//! gets a patch that is known to apply whole, or none at all.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::Pod;
use podsteer_proto::annotations::{EXCLUDE_INBOUND_PORTS, PROXY_MODE};
use serde_json::Value;

use crate::SIDECAR_NAME;
use crate::config::SidecarConfig;
use crate::sidecar;

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the object is not a valid Pod")]
    NotAPod(#[source] serde_json::Error),
    #[error("the pod already has a volume named {0}")]
    VolumeTaken(&'static str),
    #[error("encoding the sidecar")]
    Encode(#[source] serde_json::Error),
    #[error("the patch does not apply to the pod")]
    Apply(#[source] json_patch::PatchError),
    #[error("the patched pod is not a valid Pod")]
    Result(#[source] serde_json::Error),
    #[error("the patched pod has {0} {SIDECAR_NAME} containers, not one")]
    Sidecars(usize),
}

/// The patch for `pod` (as the API server sent it), once it is known to make a valid pod.
pub fn inject(pod: &Value, cfg: &SidecarConfig) -> Result<Patch, PatchError> {
    let typed: Pod = serde_json::from_value(pod.clone()).map_err(PatchError::NotAPod)?;
    let spec = typed.spec.clone().unwrap_or_default();
    if spec.volumes.iter().flatten().any(|v| v.name == sidecar::SOCKET_VOLUME) {
        return Err(PatchError::VolumeTaken(sidecar::SOCKET_VOLUME));
    }
    let container = serde_json::to_value(sidecar::container(cfg)).map_err(PatchError::Encode)?;
    let volume = sidecar::volume(cfg).map(serde_json::to_value).transpose().map_err(PatchError::Encode)?;
    let mut ops = Vec::new();
    // First of the init containers, so the ones after it have the mesh (their
    // connections are intercepted from the sandbox's start); first of the
    // containers on clusters without native sidecars, as the kubelet starts
    // them in order.
    let (list, present) = match cfg.native_sidecars {
        true => ("initContainers", spec.init_containers.as_ref().is_some_and(|c| !c.is_empty())),
        false => ("containers", !spec.containers.is_empty()),
    };
    ops.push(match present {
        true => add(&["spec", list, "0"], container),
        false => add(&["spec", list], Value::Array(vec![container])),
    });
    if let Some(volume) = volume {
        ops.push(match spec.volumes.is_some() {
            true => add(&["spec", "volumes", "-"], volume),
            false => add(&["spec", "volumes"], Value::Array(vec![volume])),
        });
    }
    let annotations = typed.metadata.annotations.clone().unwrap_or_default();
    let admin = cfg.admin_port.to_string();
    // The kubelet probes the sidecar's admin port from the node: that is not
    // the app's traffic, so it is not steered into the proxy.
    let excluded = match annotations.get(EXCLUDE_INBOUND_PORTS).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        Some(v) if v.split(',').any(|p| p.trim() == admin) => v.to_owned(),
        Some(v) => format!("{v},{admin}"),
        None => admin,
    };
    let ours = [(PROXY_MODE, "sidecar".to_owned()), (EXCLUDE_INBOUND_PORTS, excluded)];
    if typed.metadata.annotations.is_none() {
        ops.push(add(&["metadata", "annotations"], ours.iter().map(|(k, v)| (k.to_string(), Value::from(v.clone()))).collect()));
    } else {
        // `add` on an existing member replaces it (RFC 6902 4.1).
        ops.extend(ours.into_iter().map(|(k, v)| add(&["metadata", "annotations", k], Value::from(v))));
    }
    let patch = Patch(ops);
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).map_err(PatchError::Apply)?;
    let result: Pod = serde_json::from_value(out).map_err(PatchError::Result)?;
    let spec = result.spec.as_ref();
    let sidecars = spec.into_iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
    match sidecars.filter(|c| c.name == SIDECAR_NAME).count() {
        1 => Ok(patch),
        n => Err(PatchError::Sidecars(n)),
    }
}

fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(path.iter().copied()), value })
}
