//! podsteer-identity: who a workload is, and the certificates that prove it.
//!
//! - [`spiffe`]: IDs of the form
//!   `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, parsed strictly;
//! - [`ca`]: the mesh's trust bundle and issuing certificate, made and read as
//!   files (a Kubernetes Secret on a cluster);
//! - [`issuer`]: signs short-lived leaf certificates (ECDSA P-256, the SPIFFE
//!   ID as the only URI SAN) for workloads; the [`issuer::Issuer`] trait is the
//!   seam for other issuers;
//! - [`renewal`]: when a leaf is renewed (half its life, with jitter) and how a
//!   failed renewal backs off while the valid certificate is kept;
//! - [`tls`]: the mTLS configurations of HBONE, which accept a peer only for
//!   the SPIFFE identity expected of it.

pub mod ca;
pub mod issuer;
pub mod renewal;
pub mod spiffe;
pub mod tls;
