//! The lab: a Kubernetes node simulated on one machine.
//!
//! A [`Node`] is a network namespace whose bridge and pod wiring are made by the
//! real CNI plugins (`bridge`, `host-local`, `loopback`, `portmap`), driven the
//! way a container runtime drives a conflist. A [`Pod`] is a network namespace
//! plus a cgroup v2 directory under the lab's own subtree.
//!
//! Every resource is named with [`names::PREFIX`] and removed by a guard on drop,
//! also when a test panics; [`sweep::sweep`] removes whatever a killed run left.

pub mod admin;
pub mod agent;
pub mod apiserver;
pub mod cluster;
pub mod cni;
pub mod containerd;
pub mod images;
pub mod injector;
pub mod kubelet;
pub mod mesh;
pub mod node;
pub mod pod;
pub mod proxy;
pub mod workload;

// The host resources live in their own crate (xtask sweeps with it before set-up);
// the lab's modules and its users reach them under the same paths as before.
pub use podsteer_lab_host::{cgroup, names, netns, process, sweep, wait};

pub use node::{Node, NodeOptions};
pub use pod::{Pod, PodSpec};

/// Generates `mod NAME { fn ebpf(); fn iptables(); }` tests from `fn NAME(mode: &str)`,
/// so every interception case runs, by name, in both modes.
#[macro_export]
macro_rules! both_modes {
    ($body:ident) => {
        mod $body {
            #[test]
            fn ebpf() -> anyhow::Result<()> {
                super::$body("ebpf")
            }
            #[test]
            fn iptables() -> anyhow::Result<()> {
                super::$body("iptables")
            }
        }
    };
}
