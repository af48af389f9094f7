//! podsteer's node agent: picks the interception mode, programs it per pod and
//! answers the CNI plugin, the proxy and the debug CLI on its socket.

pub mod admin;
pub mod api;
pub mod cli;
pub mod cni;
pub mod config;
pub mod controller;
pub mod cri;
pub mod ctl;
pub mod ebpf;
pub mod install;
pub mod iptables;
pub mod kept;
pub mod metrics;
pub mod mode;
pub mod peer;
pub mod policy;
pub mod proxy_link;
pub mod redirect;
pub mod registry;
pub mod repair;
pub mod server;
pub mod sys;
