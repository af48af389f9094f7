//! podsteer's node agent: picks the interception mode, programs it per pod and
//! answers the CNI plugin, the proxy and the debug CLI on its socket.

pub mod admin;
pub mod apiserver;
pub use podsteer_proto::api;
pub mod cli;
pub mod config;
pub mod controller;
pub mod cri;
pub mod ebpf;
pub mod install;
pub mod iptables;
pub mod kept;
pub mod kernel_bugs;
pub mod mesh;
pub mod metrics;
pub mod mode;
pub mod peer;
pub mod policies;
pub mod policy;
pub mod proxy_link;
pub mod redirect;
pub mod registry;
pub mod repair;
pub mod return_path;
pub mod server;
pub mod state;
pub mod sys;
pub mod telemetry;
pub mod workloads;
