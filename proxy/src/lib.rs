//! podsteer-proxy: where intercepted connections land. Shared per node (pods
//! arrive over the control socket and get listeners inside their netns) or per
//! pod as a sidecar.

pub mod access;
pub mod admin;
pub mod authz;
pub mod budget;
pub mod config;
pub mod conns;
pub mod control;
pub mod hbone;
pub mod inpod;
pub mod listeners;
pub use podsteer_proto::logs;
pub mod metrics;
pub mod pods;
pub mod privileges;
pub mod relay;
pub mod sidecar_mesh;
pub mod socket;
pub mod splice;
pub mod state;
pub mod updates;
