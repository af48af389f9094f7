//! Map keys, values and constants shared by the eBPF programs and the agent.
//!
//! Everything is `#[repr(C)]` plain data: the kernel side reads it with no
//! allocation, and userspace writes the same bytes through aya.
#![no_std]

pub mod policy;
pub mod sock;
pub mod telemetry;

pub use policy::{Cidr, PodPolicy, Verdict};
pub use sock::{Addr, SockKey, SockPairKey};
pub use telemetry::{ConnRecord, ConnResult, DirectConn, PodTraffic};

/// Bytes of the ring buffer of direct-connection records (a power of two):
/// at ~100 bytes a record, about 10,000 closes between two reads by the agent.
pub const CONN_EVENTS_BYTES: u32 = 1 << 20;

/// Default port of each pod's outbound listener (Istio's choice, kept for familiarity).
pub const OUTBOUND_PORT: u16 = 15001;
/// Default port of each pod's inbound listener.
pub const INBOUND_PORT: u16 = 15006;
/// Default mark on the proxy's own sockets, so they are never redirected again.
pub const PROXY_MARK: u32 = 0x539;
/// Default UID of a per-pod sidecar proxy (Istio's 1337).
pub const PROXY_UID: u32 = 1337;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Names of the maps, which are also their pin file names under the bpffs dir.
pub mod map_names {
    pub const PODS: &str = "PODS";
    pub const POD_BY_IP: &str = "POD_BY_IP";
    /// Socket storage: a redirected socket's original destination until it is established.
    pub const SOCK_ORIG_DST: &str = "SOCK_ORIG_DST";
    pub const ORIG_BY_PAIR: &str = "ORIG_BY_PAIR";
    pub const SOCK_PAIRS: &str = "SOCK_PAIRS";
    /// Socket storage: sockets kept on TCP by sk_msg.
    pub const SOCK_NO_BYPASS: &str = "SOCK_NO_BYPASS";
    pub const PASSTHROUGH: &str = "PASSTHROUGH";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const COUNTERS: &str = "COUNTERS";
    /// Meshed pods on other nodes (pod IP, port 0): connects to them are proxied.
    pub const MESH_PEERS: &str = "MESH_PEERS";
    /// Socket storage: a direct connection's start and what its state changes showed.
    pub const DIRECT_CONNS: &str = "DIRECT_CONNS";
    /// Per pod (netns cookie), per CPU: its direct connections' totals.
    pub const DIRECT_TRAFFIC: &str = "DIRECT_TRAFFIC";
    /// Ring buffer: one record per closed direct connection.
    pub const CONN_EVENTS: &str = "CONN_EVENTS";
    pub const ALL: &[&str] = &[
        PODS,
        POD_BY_IP,
        SOCK_ORIG_DST,
        ORIG_BY_PAIR,
        SOCK_PAIRS,
        SOCK_NO_BYPASS,
        PASSTHROUGH,
        INBOUND_LISTENERS,
        COUNTERS,
        MESH_PEERS,
        DIRECT_CONNS,
        DIRECT_TRAFFIC,
        CONN_EVENTS,
    ];
    /// Maps earlier versions pinned that this one no longer has (LRU maps that
    /// became socket storage or took a wider key): their pins are removed at
    /// start, so an upgraded node does not keep them.
    pub const RETIRED: &[&str] = &["ORIG_BY_COOKIE", "ORIG_BY_TUPLE", "NO_BYPASS"];
}

/// Names of the programs, which are also their pin and link names.
pub mod program_names {
    pub const CONNECT4: &str = "podsteer_connect4";
    pub const CONNECT6: &str = "podsteer_connect6";
    pub const GETSOCKOPT: &str = "podsteer_getsockopt";
    pub const SOCKOPS: &str = "podsteer_sockops";
    pub const SK_MSG: &str = "podsteer_sk_msg";
    pub const SK_LOOKUP: &str = "podsteer_sk_lookup";
    /// tp_btf on tcp_receive_reset: tells a server's reset from the app's own.
    pub const RESET_SEEN: &str = "podsteer_reset_seen";
}

/// Slots of the per-CPU COUNTERS array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    OutboundRedirects = 0,
    OrigDstHits = 1,
    OrigDstMisses = 2,
    SkMsgRedirects = 3,
    SkMsgFallbacks = 4,
    InboundSteers = 5,
    SkipProxySocket = 6,
    SkipExcluded = 7,
    /// Inbound connections to a meshed pod refused because its proxy had no
    /// listener there (proxy down or restarting): fail closed, never to the app.
    InboundRefused = 8,
    /// Outbound connects left direct: the destination is not meshed.
    DirectConnects = 9,
    /// Direct-connection records dropped because the ring buffer was full
    /// (the per-pod totals still count those connections).
    RecordsLost = 10,
}

impl Counter {
    pub const ALL: [Counter; 11] = [
        Counter::OutboundRedirects,
        Counter::OrigDstHits,
        Counter::OrigDstMisses,
        Counter::SkMsgRedirects,
        Counter::SkMsgFallbacks,
        Counter::InboundSteers,
        Counter::SkipProxySocket,
        Counter::SkipExcluded,
        Counter::InboundRefused,
        Counter::DirectConnects,
        Counter::RecordsLost,
    ];
    /// Slots in the pinned COUNTERS map: more than are used, so a counter added
    /// later fits the map an older agent pinned, and an upgrade need not re-pin it.
    pub const SLOTS: u32 = 32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::OutboundRedirects => "outbound_redirects",
            Counter::OrigDstHits => "orig_dst_hits",
            Counter::OrigDstMisses => "orig_dst_misses",
            Counter::SkMsgRedirects => "sk_msg_redirects",
            Counter::SkMsgFallbacks => "sk_msg_fallbacks",
            Counter::InboundSteers => "inbound_steers",
            Counter::SkipProxySocket => "skipped_proxy_sockets",
            Counter::SkipExcluded => "skipped_excluded",
            Counter::InboundRefused => "inbound_refused",
            Counter::DirectConnects => "direct_connects",
            Counter::RecordsLost => "records_lost",
        }
    }
}
