//! The annotations podsteer reads on a pod, in the style of Istio's
//! `sidecar.istio.io/*`. The agent parses them; the injector writes some.

/// Meshes a pod ("true") or leaves it alone ("false").
pub const INJECT: &str = "podsteer.io/inject";
/// Istio's opt-out, honoured when [`INJECT`] is absent: a pod kept out of
/// Istio's mesh stays out of podsteer's when a cluster moves over.
pub const ISTIO_INJECT: &str = "sidecar.istio.io/inject";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "podsteer.io/exclude-outbound-ports";
pub const EXCLUDE_INBOUND_PORTS: &str = "podsteer.io/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "podsteer.io/exclude-outbound-cidrs";
/// `shared` (the node's proxy) or `sidecar` (a proxy in the pod).
pub const PROXY_MODE: &str = "podsteer.io/proxy-mode";
pub const SK_MSG: &str = "podsteer.io/sk-msg";
/// Where a connection to an unmeshed destination goes: `direct` (the node's
/// default: the proxy would add nothing, the kernel accounts it) or `proxy`
/// (every connection through the proxy, for its access log and behaviour).
pub const UNMESHED_OUTBOUND: &str = "podsteer.io/unmeshed-outbound";
