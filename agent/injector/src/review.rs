//! One AdmissionReview: read it strictly, decide, answer with the request's uid.

use kube_core::DynamicObject;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use crate::config::SidecarConfig;
use crate::decide::{Decision, Scope, decide};
use crate::patch;

/// Why a body is not an AdmissionReview the injector can answer (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the body is not JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("not an admission.k8s.io/v1 AdmissionReview (apiVersion {api_version:?}, kind {kind:?})")]
    NotAReview { api_version: String, kind: String },
    #[error("malformed AdmissionReview: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("the request has no uid")]
    NoUid,
    #[error("the request is for {0}, not a v1 Pod")]
    NotAPod(String),
    #[error("the object is not a valid Pod: {0}")]
    NotAValidPod(#[source] serde_json::Error),
    #[error("the {0} request has no object")]
    NoObject(String),
}

/// What was done with one pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    Skipped(String),
    /// The patch could not be built: the pod is refused, never half-patched
    /// (with `failurePolicy: Fail` the API server would refuse it anyway).
    Refused(String),
}

pub struct Reviewed {
    pub uid: String,
    /// namespace/name (or generateName, at creation).
    pub pod: String,
    pub verdict: Verdict,
    /// The AdmissionReview to send back.
    pub response: Value,
}

pub fn review(body: &[u8], scope: Scope, cfg: &SidecarConfig) -> Result<Reviewed, ReviewError> {
    let v: Value = serde_json::from_slice(body).map_err(ReviewError::Json)?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version != "admission.k8s.io/v1" || kind != "AdmissionReview" {
        return Err(ReviewError::NotAReview { api_version, kind });
    }
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(v).map_err(ReviewError::Malformed)?;
    let req: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| ReviewError::NoRequest)?;
    if req.uid.is_empty() {
        return Err(ReviewError::NoUid);
    }
    let gvk = &req.kind;
    if (gvk.group.as_str(), gvk.version.as_str(), gvk.kind.as_str()) != ("", "v1", "Pod") {
        return Err(ReviewError::NotAPod(format!("{}/{} {}", gvk.group, gvk.version, gvk.kind)));
    }
    let operation = format!("{:?}", req.operation).to_uppercase();
    // A DELETE carries no object, an UPDATE the new one: neither is injected,
    // and neither is refused for what it lacks.
    let creating = matches!(req.operation, Operation::Create);
    let object = match (&req.object, creating) {
        (Some(o), _) => serde_json::to_value(o).map_err(ReviewError::Malformed)?,
        (None, true) => return Err(ReviewError::NoObject(operation)),
        (None, false) => Value::Null,
    };
    let meta = &object["metadata"];
    let name = meta["name"].as_str().filter(|n| !n.is_empty()).or(meta["generateName"].as_str()).unwrap_or(&req.name);
    let namespace = req.namespace.clone().or_else(|| meta["namespace"].as_str().map(String::from)).unwrap_or_default();
    let pod = format!("{namespace}/{name}");
    let mut response = AdmissionResponse::from(&req);
    let verdict = if !creating {
        Verdict::Skipped(format!("{operation}: only pods being created are injected"))
    } else {
        let pod = serde_json::from_value(object.clone()).map_err(ReviewError::NotAValidPod)?;
        match decide(&pod, scope) {
            Decision::Skip(why) => Verdict::Skipped(why),
            Decision::Inject => match patch::inject(&object, cfg)
                .map_err(|e| podsteer_proto::error_chain(&e))
                .and_then(|p| response.clone().with_patch(p).map_err(|e| format!("encoding the patch: {e}")))
            {
                Ok(r) => {
                    response = r;
                    Verdict::Injected
                }
                Err(why) => Verdict::Refused(why),
            },
        }
    };
    if let Verdict::Refused(why) = &verdict {
        response = response.deny(format!("podsteer-injector: {why}"));
    }
    let mut response = serde_json::to_value(response.into_review()).map_err(ReviewError::Malformed)?;
    patch_as_base64(&mut response);
    Ok(Reviewed { uid: req.uid, pod, verdict, response })
}

/// kube-core writes the patch's bytes as a JSON array of numbers, which Go's
/// decoder accepts; the API documents a base64 string (Go's `[]byte`), and
/// that is what is sent, so the response reads as every other webhook's.
fn patch_as_base64(review: &mut Value) {
    use base64::Engine as _;
    let Some(p) = review.pointer_mut("/response/patch") else { return };
    if let Some(bytes) = p.as_array().map(|a| a.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect::<Vec<u8>>()) {
        *p = Value::from(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
}
