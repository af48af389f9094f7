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
    /// Proxy connections to unmeshed destinations too (the pod asked for
    /// every connection through the proxy); without it they go direct.
    pub const PROXY_UNMESHED: u32 = 1 << 4;
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

/// What connect4/6 does with one outbound connect, and why. The eBPF program
/// and `podsteer explain` both decide with [`PodPolicy::outbound_verdict`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Redirect,
    /// The pod's outbound interception is off.
    OutboundOff,
    /// The app is talking to itself (loopback or the pod's own address).
    Local,
    /// An IPv6 link-local destination (see [`crate::Addr::is_link_local`]).
    LinkLocal,
    ExcludedPort,
    ExcludedCidr,
    /// The destination is not meshed and the pod did not ask for every
    /// connection through the proxy: the proxy would add nothing, so the
    /// connection goes direct and the kernel accounts it.
    Direct,
}

impl Verdict {
    /// The exemptions in the order [`PodPolicy::outbound_verdict`] tries them,
    /// then the redirect: the one table the iptables plan is built from (one
    /// rule group per entry, in this order), so the two modes cannot drift.
    pub const OUTBOUND_ORDER: [Verdict; 5] =
        [Verdict::Local, Verdict::LinkLocal, Verdict::ExcludedPort, Verdict::ExcludedCidr, Verdict::Redirect];

    /// The `podsteer/<name>` comments of the iptables rules that carry this
    /// verdict in `PODSTEER_OUTPUT` (none for `OutboundOff`: no jump at all).
    pub const fn rule_names(self) -> &'static [&'static str] {
        match self {
            Verdict::Redirect => &["redirect-outbound"],
            Verdict::OutboundOff => &[],
            Verdict::Local => &["loopback", "own-ip"],
            Verdict::LinkLocal => &["link-local"],
            Verdict::ExcludedPort => &["excluded-outbound-port"],
            Verdict::ExcludedCidr => &["excluded-outbound-cidr"],
            // iptables mode has no per-destination decision: it proxies these.
            Verdict::Direct => &[],
        }
    }

    pub const fn reason(self) -> &'static str {
        match self {
            Verdict::Redirect => "redirected to the pod's outbound proxy port",
            Verdict::OutboundOff => "outbound interception is off for this pod",
            Verdict::Local => "loopback or the pod's own address",
            Verdict::LinkLocal => "IPv6 link-local destination: its interface scope cannot be carried through the proxy",
            Verdict::ExcludedPort => "destination port is excluded",
            Verdict::ExcludedCidr => "destination is in an excluded CIDR",
            Verdict::Direct => "destination is not meshed: the proxy would add nothing, so it goes direct (the kernel accounts it)",
        }
    }
}

impl PodPolicy {
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    pub fn is_own_ip(&self, dst: &crate::Addr) -> bool {
        if dst.family == crate::AF_INET {
            self.ipv4 != 0 && dst.ip[0] == self.ipv4
        } else {
            dst.ip[0] == self.ipv6[0] && dst.ip[1] == self.ipv6[1] && dst.ip[2] == self.ipv6[2] && dst.ip[3] == self.ipv6[3]
        }
    }

    /// The decision for a TCP connect to `dst` (port in network order) from a
    /// socket that is not the proxy's own. `dst` must already be unmapped
    /// ([`crate::Addr::v6_unmapped`]): an IPv4-mapped destination is decided as IPv4.
    ///
    /// A proxy port on another host is redirected like any port: exempting it
    /// would be a free egress path past the proxy. A direct connect to the pod's
    /// own proxy ports is `Local` here and refused by the proxy.
    pub fn outbound_verdict(&self, dst: &crate::Addr) -> Verdict {
        if !self.has(flags::OUTBOUND) {
            return Verdict::OutboundOff;
        }
        if dst.is_loopback() || self.is_own_ip(dst) {
            return Verdict::Local;
        }
        if dst.is_link_local() {
            return Verdict::LinkLocal;
        }
        let port = u16::from_be(dst.port);
        if self.excludes_outbound_port(port) {
            return Verdict::ExcludedPort;
        }
        if self.excludes_destination(dst) {
            return Verdict::ExcludedCidr;
        }
        Verdict::Redirect
    }

    /// The eBPF data path's decision: [`PodPolicy::outbound_verdict`], then
    /// whether the proxy adds anything. It does for a meshed destination
    /// (`dst_meshed`: a meshed pod's address; mTLS and the far side's
    /// authorization) and for a pod that asked for every connection.
    pub fn outbound_decision(&self, dst: &crate::Addr, dst_meshed: bool) -> Verdict {
        match self.outbound_verdict(dst) {
            Verdict::Redirect if !dst_meshed && !self.has(flags::PROXY_UNMESHED) => Verdict::Direct,
            v => v,
        }
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
