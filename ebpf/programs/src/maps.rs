//! Every map, pinned by name so a restarted agent (and the debug CLI) finds them.

use aya_ebpf::macros::map;
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray, SockHash};
use podsteer_common::{Addr, Counter, PodPolicy, SockKey, SockPairKey};

/// Meshed pods: netns cookie -> policy. Absent netns are never touched.
#[map(name = "PODS")]
pub static PODS: HashMap<u64, PodPolicy> = HashMap::pinned(4096, 0);

/// Pod IP (port 0) -> netns cookie, for inbound lookups that only see addresses.
#[map(name = "POD_BY_IP")]
pub static POD_BY_IP: HashMap<Addr, u64> = HashMap::pinned(8192, 0);

/// Socket cookie -> original destination, from connect() until establishment.
#[map(name = "ORIG_BY_COOKIE")]
pub static ORIG_BY_COOKIE: LruHashMap<u64, Addr> = LruHashMap::pinned(65536, 0);

/// (netns, app's local address) -> original destination; what the proxy's peer is.
#[map(name = "ORIG_BY_TUPLE")]
pub static ORIG_BY_TUPLE: LruHashMap<SockKey, Addr> = LruHashMap::pinned(65536, 0);

/// Established local sockets, keyed from their own side, for sk_msg.
#[map(name = "SOCK_PAIRS")]
pub static SOCK_PAIRS: SockHash<SockPairKey> = SockHash::pinned(65536, 0);

/// Sockets whose first message went over TCP because the peer was not yet in
/// SOCK_PAIRS; they stay on TCP so no later message can overtake it.
#[map(name = "NO_BYPASS")]
pub static NO_BYPASS: LruHashMap<SockPairKey, u8> = LruHashMap::pinned(65536, 0);

/// The proxy's connections to an app that carry the client's address, by
/// 4-tuple: sk_lookup leaves their SYN to the app instead of steering it back
/// to the proxy. Written as the proxy connects (sockops TCP_CONNECT_CB), removed
/// when the socket closes; an entry is needed only until the SYN has arrived,
/// so an LRU eviction of an old one costs nothing.
#[map(name = "PASSTHROUGH")]
pub static PASSTHROUGH: LruHashMap<SockPairKey, u8> = LruHashMap::pinned(65536, 0);

/// (netns, family) -> the proxy's inbound listener in that pod.
#[map(name = "INBOUND_LISTENERS")]
pub static INBOUND_LISTENERS: SockHash<SockKey> = SockHash::pinned(8192, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::SLOTS, 0);

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
pub fn policy(netns: u64) -> Option<&'static PodPolicy> {
    // SAFETY: the value is read-only here and copied field by field by callers.
    unsafe { PODS.get(&netns) }
}
