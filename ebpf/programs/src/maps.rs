//! Every map, pinned by name so a restarted agent (and the debug CLI) finds them.

use aya_ebpf::bindings::{BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock};
use aya_ebpf::helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get};
use aya_ebpf::macros::{btf_map, map};
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash};
use podsteer_common::{Addr, CONN_EVENTS_BYTES, ConnRecord, Counter, DirectConn, PodPolicy, PodTraffic, SockKey, SockPairKey};

/// Meshed pods: netns cookie -> policy. Absent netns are never touched.
#[map(name = "PODS")]
pub static PODS: HashMap<u64, PodPolicy> = HashMap::pinned(4096, 0);

/// Pod IP (port 0) -> netns cookie, for inbound lookups that only see addresses.
#[map(name = "POD_BY_IP")]
pub static POD_BY_IP: HashMap<Addr, u64> = HashMap::pinned(8192, 0);

/// A redirected socket's original destination, from connect() until it is
/// established. It lives with the socket: nothing to evict, nothing to leak.
#[btf_map(name = "SOCK_ORIG_DST")]
pub static SOCK_ORIG_DST: SkStorage<Addr> = SkStorage::new();

/// (netns, app socket, proxy listener) -> original destination: what
/// SO_ORIGINAL_DST answers the proxy for the socket it accepted. Keyed by the
/// whole 4-tuple, written at establishment, removed when the app's socket
/// closes; not LRU, so a live entry is never evicted (a full map leaves the
/// connection unanswered, and the proxy resets it: counted, never misrouted).
#[map(name = "ORIG_BY_PAIR")]
pub static ORIG_BY_PAIR: HashMap<SockPairKey, Addr> = HashMap::pinned(65536, 0);

/// Established local sockets, keyed from their own side, for sk_msg.
#[map(name = "SOCK_PAIRS")]
pub static SOCK_PAIRS: SockHash<SockPairKey> = SockHash::pinned(65536, 0);

/// Set on a socket whose first message went over TCP because its peer was not
/// yet in SOCK_PAIRS: it stays on TCP so no later message can overtake that
/// one. Socket storage, so the mark lasts exactly as long as the socket.
#[btf_map(name = "SOCK_NO_BYPASS")]
pub static SOCK_NO_BYPASS: SkStorage<u8> = SkStorage::new();

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

/// Meshed pods on other nodes, by address (port 0), from the mesh view: a
/// connect to one is proxied (mTLS, the far side's authorization). Meshed
/// pods on this node are POD_BY_IP's.
#[map(name = "MESH_PEERS")]
pub static MESH_PEERS: HashMap<Addr, u8> = HashMap::pinned(65536, 0);

/// A direct connection's start and what its state changes showed; lives
/// exactly as long as the socket.
#[btf_map(name = "DIRECT_CONNS")]
pub static DIRECT_CONNS: SkStorage<DirectConn> = SkStorage::new();

/// Per pod, per CPU: its direct connections' totals. The agent creates and
/// removes a pod's entry with the pod; the programs only add to it.
#[map(name = "DIRECT_TRAFFIC")]
pub static DIRECT_TRAFFIC: PerCpuHashMap<u64, PodTraffic> = PerCpuHashMap::pinned(4096, 0);

/// One record per closed direct connection; a full buffer drops the record
/// (counted in RecordsLost), never the connection.
#[map(name = "CONN_EVENTS")]
pub static CONN_EVENTS: RingBuf = RingBuf::pinned(CONN_EVENTS_BYTES, 0);

#[inline(always)]
pub fn record(r: &ConnRecord) {
    match CONN_EVENTS.reserve::<ConnRecord>(0) {
        Some(mut slot) => {
            slot.write(*r);
            slot.submit(0);
        }
        None => count(Counter::RecordsLost),
    }
}

#[inline(always)]
pub fn traffic(netns: u64) -> Option<*mut PodTraffic> {
    DIRECT_TRAFFIC.get_ptr_mut(netns)
}

#[inline(always)]
pub fn is_meshed(dst: &Addr) -> bool {
    let ip_only = Addr { port: 0, ..*dst };
    // SAFETY: presence checks only.
    unsafe { POD_BY_IP.get(&ip_only).is_some() || MESH_PEERS.get(&ip_only).is_some() }
}

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

/// `BPF_MAP_TYPE_SK_STORAGE` in BTF form, pinned by name like every other map
/// (so a restarted agent's programs see the storage its predecessor's wrote).
/// aya-ebpf's own `SkStorage` has no pinning field and takes only a sock_addr
/// context; sockops and sk_msg hand us the socket directly.
#[repr(C)]
pub struct SkStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    pinning: *const [i32; 1],
}

// SAFETY: the fields are BTF placeholders the loader reads; never dereferenced.
unsafe impl<T> Sync for SkStorage<T> {}

impl<T> SkStorage<T> {
    pub const fn new() -> Self {
        SkStorage {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    #[inline(always)]
    fn ptr(&self) -> *mut core::ffi::c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }

    /// The socket's value, if it has one.
    ///
    /// # Safety
    /// `sk` must be a non-null socket pointer from the program's context.
    #[inline(always)]
    pub unsafe fn get(&self, sk: *mut bpf_sock) -> Option<*mut T> {
        // SAFETY: the caller passes a live socket.
        let p = unsafe { bpf_sk_storage_get(self.ptr(), sk.cast(), core::ptr::null_mut(), 0) };
        (!p.is_null()).then_some(p.cast())
    }

    /// Sets the socket's value (creating its storage); false if the kernel
    /// could not allocate it.
    ///
    /// # Safety
    /// `sk` must be a non-null socket pointer from the program's context.
    #[inline(always)]
    pub unsafe fn set(&self, sk: *mut bpf_sock, value: &T) -> bool
    where
        T: Copy,
    {
        let mut init = *value;
        // SAFETY: the caller passes a live socket; `init` outlives the call.
        let p =
            unsafe { bpf_sk_storage_get(self.ptr(), sk.cast(), core::ptr::from_mut(&mut init).cast(), BPF_SK_STORAGE_GET_F_CREATE.into()) };
        if p.is_null() {
            return false;
        }
        // An existing value (a socket that connects again) is overwritten.
        // SAFETY: the kernel returned this socket's value, sized T.
        unsafe { core::ptr::write_volatile(p.cast::<T>(), *value) };
        true
    }

    /// # Safety
    /// `sk` must be a non-null socket pointer from the program's context.
    #[inline(always)]
    pub unsafe fn delete(&self, sk: *mut bpf_sock) {
        // SAFETY: the caller passes a live socket.
        let _ = unsafe { bpf_sk_storage_delete(self.ptr(), sk.cast()) };
    }
}
