//! podsteer-authz: Istio's `AuthorizationPolicy`, at L4.
//!
//! - [`spec`]: the `security.istio.io/v1` objects as users write them (serde);
//! - [`policy`]: validated policies, each rule split into the L4 part podsteer
//!   checks and the L7 fields it cannot, so an invalid policy is refused with
//!   a reason rather than read as allow-all;
//! - [`peer_auth`]: Istio's `PeerAuthentication` (STRICT or PERMISSIVE), resolved per workload;
//! - [`source`]: both kinds read from a directory as one bundle;
//! - [`judge`]: peer authentication, then authorization: the one decision
//!   the proxy enforces and `explain` reports;
//! - [`eval`]: the verdict for one connection, with the policy and rule that
//!   decided it and the dry-run policies that would have decided otherwise.
//!
//! The semantics are Istio's, as ztunnel applies them at L4: any matching
//! DENY denies; with no ALLOW policy for the workload, allow; any matching
//! ALLOW allows; otherwise deny. A rule's `from`, `to` and `when` must all
//! match; within each list any entry may; within an entry every field set
//! must. An ALLOW rule that needs L7 attributes matches nothing; a DENY rule
//! that has them denies on its L4 part alone. Both fail safe.

pub mod eval;
pub mod judge;
pub mod peer_auth;
pub mod policy;
pub mod source;
pub mod spec;
