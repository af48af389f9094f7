//! Typed access to every map: the agent writes through it, the debug CLI reads
//! the same maps from their pins while the agent is down.

use std::net::IpAddr;
use std::path::Path;

use aya::Ebpf;
use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, SockHash};
use podsteer_common::{Addr, Counter, PodPolicy, PodTraffic, SockKey, SockPairKey, map_names as names};

use super::loader::EbpfError;
use super::pins::PinDir;
use crate::policy::ip6_words;

pub struct Maps {
    pub pods: HashMap<MapData, u64, PodPolicy>,
    pub pod_by_ip: HashMap<MapData, Addr, u64>,
    /// What SO_ORIGINAL_DST answers; the per-socket state (`SOCK_ORIG_DST`,
    /// `SOCK_NO_BYPASS`) is socket storage, which only a socket can look up.
    pub orig_by_pair: HashMap<MapData, SockPairKey, Addr>,
    pub sock_pairs: SockHash<MapData, SockPairKey>,
    pub passthrough: aya::maps::HashMap<MapData, SockPairKey, u8>,
    pub inbound_listeners: SockHash<MapData, SockKey>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Meshed pods on other nodes: connects to them are proxied.
    pub mesh_peers: HashMap<MapData, Addr, u8>,
    /// Each enrolled pod's direct-connection totals (read by [`crate::telemetry`]).
    pub direct_traffic: PerCpuHashMap<MapData, u64, PodTraffic>,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |e| EbpfError::Map { name, source: Box::new(e) }
}

/// Where a map comes from: the freshly loaded object or a pin.
trait Source {
    fn get(&mut self, name: &'static str) -> Result<Map, EbpfError>;
}

impl Source for Ebpf {
    fn get(&mut self, name: &'static str) -> Result<Map, EbpfError> {
        self.take_map(name).ok_or(EbpfError::Map { name, source: Box::new(aya::maps::MapError::InvalidName { name: name.into() }) })
    }
}

impl Source for PinDir {
    fn get(&mut self, name: &'static str) -> Result<Map, EbpfError> {
        let data = MapData::from_pin(self.map(name)).map_err(map_err(name))?;
        Map::from_map_data(data).map_err(map_err(name))
    }
}

macro_rules! typed {
    ($src:expr, $name:expr) => {
        $src.get($name)?.try_into().map_err(map_err($name))?
    };
}

impl Maps {
    fn from_source(src: &mut impl Source) -> Result<Self, EbpfError> {
        Ok(Maps {
            pods: typed!(src, names::PODS),
            pod_by_ip: typed!(src, names::POD_BY_IP),
            orig_by_pair: typed!(src, names::ORIG_BY_PAIR),
            sock_pairs: typed!(src, names::SOCK_PAIRS),
            passthrough: typed!(src, names::PASSTHROUGH),
            inbound_listeners: typed!(src, names::INBOUND_LISTENERS),
            counters: typed!(src, names::COUNTERS),
            mesh_peers: typed!(src, names::MESH_PEERS),
            direct_traffic: typed!(src, names::DIRECT_TRAFFIC),
        })
    }

    pub(crate) fn take(bpf: &mut Ebpf) -> Result<Self, EbpfError> {
        Self::from_source(bpf)
    }

    /// Opens the pinned maps without loading anything (the debug CLI's way in).
    pub fn open_pinned(bpffs: &Path) -> Result<Self, EbpfError> {
        Self::from_source(&mut PinDir::new(bpffs))
    }

    pub(crate) fn sock_pairs_fd(&self) -> &aya::maps::sock::SockMapFd {
        self.sock_pairs.fd()
    }

    /// Registers a pod: its policy, then its addresses. A pod is live for the
    /// programs once PODS has it, so that write comes last.
    pub fn enroll(&mut self, cookie: u64, policy: &PodPolicy, ips: &[IpAddr]) -> Result<(), EbpfError> {
        for ip in ips {
            self.pod_by_ip.insert(ip_key(*ip), cookie, 0).map_err(map_err(names::POD_BY_IP))?;
        }
        // Kept if there (an agent that restarts keeps counting from its totals).
        if self.direct_traffic.get(&cookie, 0).is_err() {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| EbpfError::Cpus(e))?;
            let zero = PerCpuValues::try_from(vec![PodTraffic::default(); cpus]).map_err(EbpfError::Cpus)?;
            self.direct_traffic.insert(cookie, zero, 0).map_err(map_err(names::DIRECT_TRAFFIC))?;
        }
        self.pods.insert(cookie, *policy, 0).map_err(map_err(names::PODS))
    }

    /// Makes MESH_PEERS hold exactly `ips`: what is new is added, what is gone removed.
    pub fn set_mesh_peers(&mut self, ips: &[IpAddr]) -> Result<(), EbpfError> {
        let want: std::collections::HashSet<Addr> = ips.iter().map(|ip| ip_key(*ip)).collect();
        let have: Vec<Addr> = self.mesh_peers.keys().filter_map(Result::ok).collect();
        for gone in have.iter().filter(|a| !want.contains(a)) {
            ignore_missing(self.mesh_peers.remove(gone)).map_err(map_err(names::MESH_PEERS))?;
        }
        let have: std::collections::HashSet<Addr> = have.into_iter().collect();
        for new in want.iter().filter(|a| !have.contains(a)) {
            self.mesh_peers.insert(*new, 1, 0).map_err(map_err(names::MESH_PEERS))?;
        }
        Ok(())
    }

    /// Whether connects to `ip` are proxied as a meshed destination.
    pub fn is_meshed(&self, ip: IpAddr) -> bool {
        let key = ip_key(ip);
        self.pod_by_ip.get(&key, 0).is_ok() || self.mesh_peers.get(&key, 0).is_ok()
    }

    /// Unregisters a pod: PODS first, so the programs stop acting on it at once.
    pub fn unenroll(&mut self, cookie: u64, ips: &[IpAddr]) -> Result<(), EbpfError> {
        ignore_missing(self.pods.remove(&cookie)).map_err(map_err(names::PODS))?;
        for ip in ips {
            // Only our own entry: after IP reuse a late cleanup of an old pod
            // must not take the address from the new pod that now holds it.
            let key = ip_key(*ip);
            if self.pod_by_ip.get(&key, 0).ok() == Some(cookie) {
                ignore_missing(self.pod_by_ip.remove(&key)).map_err(map_err(names::POD_BY_IP))?;
            }
        }
        for family in [podsteer_common::AF_INET, podsteer_common::AF_INET6] {
            ignore_missing(self.inbound_listeners.remove(&listener_key(cookie, family))).map_err(map_err(names::INBOUND_LISTENERS))?;
        }
        ignore_missing(self.direct_traffic.remove(&cookie)).map_err(map_err(names::DIRECT_TRAFFIC))?;
        Ok(())
    }

    /// Removes every trace of a pod known only by its cookie (its record is
    /// gone or was never written): PODS, each POD_BY_IP entry that points at
    /// it, and its listeners.
    pub fn forget(&mut self, cookie: u64) -> Result<(), EbpfError> {
        let ips: Vec<Addr> = self.pod_by_ip.iter().filter_map(Result::ok).filter(|(_, c)| *c == cookie).map(|(ip, _)| ip).collect();
        for key in ips {
            ignore_missing(self.pod_by_ip.remove(&key)).map_err(map_err(names::POD_BY_IP))?;
        }
        self.unenroll(cookie, &[])
    }

    /// Cookies of every pod in PODS.
    pub fn pod_cookies(&self) -> Vec<u64> {
        self.pods.keys().filter_map(Result::ok).collect()
    }

    /// Points a pod's sk_lookup at the proxy's inbound listener for one family.
    pub fn set_inbound_listener(&mut self, cookie: u64, family: u16, listener: std::os::fd::BorrowedFd<'_>) -> Result<(), EbpfError> {
        self.inbound_listeners.insert(listener_key(cookie, family), listener, 0).map_err(map_err(names::INBOUND_LISTENERS))
    }

    /// Sums each per-CPU counter.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, EbpfError> {
        Counter::ALL
            .iter()
            .map(|c| {
                let v = self.counters.get(&(*c as u32), 0).map_err(map_err(names::COUNTERS))?;
                Ok((*c, v.iter().sum()))
            })
            .collect()
    }
}

pub fn listener_key(cookie: u64, family: u16) -> SockKey {
    SockKey { netns: cookie, addr: Addr { family, ..Addr::default() }, _pad: 0 }
}

/// The kernel's view of an address: IPv4-mapped IPv6 is IPv4, as the programs key it.
pub fn ip_key(ip: IpAddr) -> Addr {
    match ip.to_canonical() {
        IpAddr::V4(a) => Addr::v4(u32::from(a).to_be(), 0),
        IpAddr::V6(a) => Addr::v6(ip6_words(a), 0),
    }
}

/// The address a map holds, as std's (the inverse of [`ip_key`]).
pub fn ip_of(a: &Addr) -> IpAddr {
    if a.family == podsteer_common::AF_INET {
        IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(a.ip[0])))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in a.ip.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(std::net::Ipv6Addr::from(o))
    }
}

/// An endpoint a map or record holds (port in network order), as std's.
pub fn socket_addr_of(a: &Addr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip_of(a), u16::from_be(a.port))
}

/// Removal is idempotent: a key already gone is success (hash maps say
/// KeyNotFound, sock maps pass the kernel's ENOENT through).
fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
