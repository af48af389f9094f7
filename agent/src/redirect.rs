//! The one seam between pod bookkeeping and the kernel: enrol or unenrol a pod
//! in whichever mode the node runs.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use crate::ebpf::{EbpfDataPath, EbpfError};
use crate::iptables::{self, Backend, Family, IptablesError};
use crate::mode::Mode;
use crate::policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error("inbound listeners are registered only in eBPF mode")]
    NotEbpf,
}

/// A pod's network namespace, held open while podsteer works on it.
pub struct PodNet {
    pub netns: File,
    pub cookie: u64,
}

pub enum Redirector {
    Ebpf(Box<EbpfDataPath>),
    Iptables(Backend),
}

impl Redirector {
    pub fn mode(&self) -> Mode {
        match self {
            Redirector::Ebpf(_) => Mode::Ebpf,
            Redirector::Iptables(_) => Mode::Iptables,
        }
    }

    pub fn enroll(&mut self, net: &PodNet, policy: &Policy) -> Result<(), RedirectError> {
        match self {
            Redirector::Ebpf(dp) => {
                dp.attach_pod(net.netns.as_fd(), net.cookie)?;
                dp.maps.enroll(net.cookie, &policy.to_kernel(), &policy.ips)?;
            }
            Redirector::Iptables(backend) => {
                for family in families(policy) {
                    let save = backend.save(net.netns.as_fd(), family)?;
                    backend.restore(net.netns.as_fd(), family, &iptables::install_plan(policy, family, &save))?;
                }
            }
        }
        Ok(())
    }

    /// Undoes [`Redirector::enroll`]. Without a netns (already gone) the rules went with it.
    pub fn unenroll(&mut self, net: Option<&PodNet>, cookie: u64, policy: &Policy) -> Result<(), RedirectError> {
        match self {
            Redirector::Ebpf(dp) => {
                dp.maps.unenroll(cookie, &policy.ips)?;
                dp.detach_pod(cookie)?;
            }
            Redirector::Iptables(backend) => {
                let Some(net) = net else { return Ok(()) };
                for family in families(policy) {
                    let save = backend.save(net.netns.as_fd(), family)?;
                    if let Some(plan) = iptables::remove_plan(&save) {
                        backend.restore(net.netns.as_fd(), family, &plan)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the pod's interception is in place right now (CNI CHECK).
    pub fn verify(&self, net: Option<&PodNet>, cookie: u64, policy: &Policy) -> Result<bool, RedirectError> {
        match self {
            Redirector::Ebpf(dp) => Ok(dp.maps.pods.get(&cookie, 0).is_ok() && dp.pins().pod_link(cookie).exists()),
            Redirector::Iptables(backend) => {
                let Some(net) = net else { return Ok(false) };
                for family in families(policy) {
                    let save = backend.save(net.netns.as_fd(), family)?;
                    if iptables::remove_plan(&save).is_none() {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }

    pub fn set_inbound_listener(&mut self, cookie: u64, family: u16, fd: BorrowedFd<'_>) -> Result<(), RedirectError> {
        match self {
            Redirector::Ebpf(dp) => Ok(dp.maps.set_inbound_listener(cookie, family, fd)?),
            Redirector::Iptables(_) => Err(RedirectError::NotEbpf),
        }
    }
}

/// IPv4 always; IPv6 when the pod has an IPv6 address.
fn families(policy: &Policy) -> Vec<Family> {
    let mut f = vec![Family::V4];
    if policy.ips.iter().any(|ip| ip.is_ipv6()) {
        f.push(Family::V6);
    }
    f
}
