//! podsteer-injector: a mutating admission webhook for pods.
//!
//! It adds podsteer's proxy to a pod as a native sidecar (an init container
//! with `restartPolicy: Always`, so it starts before the app and stops after
//! it) and nothing else: no init container, no capability. podsteer's agent
//! intercepts the pod's traffic from the node, so the pod needs no NET_ADMIN.
//!
//! - [`config`]: flags, and the sidecar they describe;
//! - [`decide`]: who is injected (pure);
//! - [`sidecar`]: the container and volume added (pure);
//! - [`patch`]: the RFC 6902 patch, checked by applying it before it is sent;
//! - [`review`]: `AdmissionReview` in, `AdmissionReview` out;
//! - [`server`], [`tls`]: HTTPS; [`metrics`]: what it did.

pub mod config;
pub mod decide;
pub mod metrics;
pub mod patch;
pub mod review;
pub mod server;
pub mod sidecar;
pub mod tls;

/// The name of the container the injector adds; its presence means injected.
pub const SIDECAR_NAME: &str = "podsteer-proxy";
