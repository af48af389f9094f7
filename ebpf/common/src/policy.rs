//! Per-pod policy, written by the agent, read by every program.

/// Excluded ports per direction; Istio's annotations rarely list more.
pub const MAX_PORTS: usize = 8;
/// Excluded outbound CIDRs per pod.
pub const MAX_CIDRS: usize = 8;

/// An IPv4 or IPv6 prefix; `ip` in network byte order like [`crate::Addr`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub ip: [u32; 4],
    pub family: u16,
    pub prefix_len: u16,
}

impl Cidr {
    pub fn contains(&self, addr: &crate::Addr) -> bool {
        if self.family != addr.family || self.family == 0 {
            return false;
        }
        let mut left = self.prefix_len as u32;
        let mut i = 0;
        while i < 4 && left > 0 {
            let bits = if left >= 32 { 32 } else { left };
            let mask: u32 = if bits == 32 { u32::MAX } else { !(u32::MAX >> bits) };
            if (u32::from_be(self.ip[i]) & mask) != (u32::from_be(addr.ip[i]) & mask) {
                return false;
            }
            left -= bits;
            i += 1;
        }
        true
    }
}

/// Flags of [`PodPolicy::flags`].
pub mod flags {
    /// Redirect outbound connects to the proxy.
    pub const OUTBOUND: u32 = 1 << 0;
    /// Steer inbound connections to the proxy (sk_lookup).
    pub const INBOUND: u32 = 1 << 1;
    /// Splice local socket pairs with sk_msg.
    pub const SK_MSG: u32 = 1 << 2;
    /// The proxy runs inside the pod as `proxy_uid` (sidecar mode).
    pub const SIDECAR: u32 = 1 << 3;
}

/// What the programs need to know about one meshed pod. Keyed by netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    pub flags: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_mark: u32,
    pub proxy_uid: u32,
    /// The pod's IPv4 address, network order; 0 when it has none.
    pub ipv4: u32,
    pub ipv6: [u32; 4],
    /// Ports that are never redirected outbound; 0 ends the list.
    pub excluded_outbound_ports: [u16; MAX_PORTS],
    /// Ports that are never steered inbound; 0 ends the list.
    pub excluded_inbound_ports: [u16; MAX_PORTS],
    /// Destinations that are never redirected; family 0 ends the list.
    pub excluded_cidrs: [Cidr; MAX_CIDRS],
}

impl PodPolicy {
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    pub fn excludes_outbound_port(&self, port: u16) -> bool {
        port_listed(&self.excluded_outbound_ports, port)
    }

    pub fn excludes_inbound_port(&self, port: u16) -> bool {
        port_listed(&self.excluded_inbound_ports, port)
    }

    pub fn excludes_destination(&self, addr: &crate::Addr) -> bool {
        let mut i = 0;
        while i < MAX_CIDRS {
            let c = &self.excluded_cidrs[i];
            if c.family == 0 {
                return false;
            }
            if c.contains(addr) {
                return true;
            }
            i += 1;
        }
        false
    }
}

fn port_listed(list: &[u16; MAX_PORTS], port: u16) -> bool {
    let mut i = 0;
    while i < MAX_PORTS {
        if list[i] == 0 {
            return false;
        }
        if list[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

#[cfg(feature = "user")]
// SAFETY: repr(C) plain data; every field is an integer array or integer.
unsafe impl aya::Pod for PodPolicy {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for Cidr {}
