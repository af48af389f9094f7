//! Socket addresses as the kernel hands them to BPF programs.

/// An IPv4 or IPv6 endpoint. `ip` and `port` are in network byte order, as in
/// `bpf_sock_addr` and `bpf_sock_ops`; IPv4 uses `ip[0]` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr {
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
}

impl Addr {
    pub const fn v4(ip_be: u32, port_be: u16) -> Self {
        Addr { ip: [ip_be, 0, 0, 0], port: port_be, family: crate::AF_INET }
    }

    pub const fn v6(ip_be: [u32; 4], port_be: u16) -> Self {
        Addr { ip: ip_be, port: port_be, family: crate::AF_INET6 }
    }

    /// An IPv6 address as the connection really is: IPv4-mapped (`::ffff:a.b.c.d`,
    /// a dual-stack socket talking IPv4) becomes plain IPv4, so every decision and
    /// every key treats it as the IPv4 destination it is.
    pub const fn v6_unmapped(ip_be: [u32; 4], port_be: u16) -> Self {
        if Addr::is_v4_mapped(&ip_be) { Addr::v4(ip_be[3], port_be) } else { Addr::v6(ip_be, port_be) }
    }

    pub const fn is_v4_mapped(ip_be: &[u32; 4]) -> bool {
        ip_be[0] == 0 && ip_be[1] == 0 && ip_be[2] == 0xffffu32.to_be()
    }

    /// fe80::/10: only meaningful with the scope (interface) the app chose,
    /// which a proxy's own connect cannot reproduce.
    pub const fn is_link_local(&self) -> bool {
        self.family == crate::AF_INET6 && (u32::from_be(self.ip[0]) >> 22) == (0xfe80 >> 6)
    }

    /// 127.0.0.0/8 or ::1: the app talking to itself.
    pub const fn is_loopback(&self) -> bool {
        if self.family == crate::AF_INET {
            (u32::from_be(self.ip[0]) >> 24) == 127
        } else {
            self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == 0 && u32::from_be(self.ip[3]) == 1
        }
    }

    pub const fn same_ip(&self, other: &Addr) -> bool {
        self.family == other.family
            && self.ip[0] == other.ip[0]
            && self.ip[1] == other.ip[1]
            && self.ip[2] == other.ip[2]
            && self.ip[3] == other.ip[3]
    }
}

/// One endpoint inside one network namespace. Two pods may use the same
/// 127.0.0.1 addresses at the same time, so the netns cookie is part of every key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub addr: Addr,
    pub _pad: u32,
}

/// A connected socket, seen from its own side: (netns, local, remote).
/// The peer socket on the same node has the key with local and remote swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockPairKey {
    pub netns: u64,
    pub local: Addr,
    pub remote: Addr,
}

impl SockPairKey {
    /// The key of a socket seen from its own side. Loopback pairs repeat in every
    /// pod, so they carry the netns; pod addresses are unique on a node, so a pair
    /// between two pods (or a pod and itself) does not, and both ends, each in its
    /// own netns, find each other.
    pub const fn new(netns: u64, local: Addr, remote: Addr) -> SockPairKey {
        let netns = if local.is_loopback() || remote.is_loopback() { netns } else { 0 };
        SockPairKey { netns, local, remote }
    }

    pub const fn peer(&self) -> SockPairKey {
        SockPairKey { netns: self.netns, local: self.remote, remote: self.local }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are repr(C) plain data with explicit padding fields.
    unsafe impl aya::Pod for super::Addr {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockPairKey {}
}
