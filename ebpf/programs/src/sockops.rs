//! sock_ops: on establishment, re-key the original destination by the app's
//! address (what the proxy sees as its peer) and enrol local pairs for sk_msg.

use aya_ebpf::bindings::{
    BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_ops,
};
use aya_ebpf::helpers::bpf_get_netns_cookie;
use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use aya_ebpf::macros::sock_ops;
use aya_ebpf::programs::SockOpsContext;
use podsteer_common::policy::flags;
use podsteer_common::{Addr, ConnRecord, DirectConn, SockPairKey};

use crate::ctx::{addr, field, rd};
use crate::maps::{DIRECT_CONNS, ORIG_BY_PAIR, PASSTHROUGH, POD_BY_IP, SOCK_ORIG_DST, SOCK_PAIRS, policy, record, traffic};

const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn podsteer_sockops(ctx: SockOpsContext) -> u32 {
    on_event(&ctx);
    0
}

#[inline(always)]
fn on_event(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    let op = rd(field!((*ops).op));
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
        && op != BPF_SOCK_OPS_TCP_CONNECT_CB
    {
        return;
    }
    // SAFETY: the helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    let Some(pol) = policy(netns) else { return };
    let family = rd(field!((*ops).family));
    // local_port is host order; remote_port holds the network-order port in its high half.
    let local_port = (rd(field!((*ops).local_port)) as u16).to_be();
    let remote_port = (rd(field!((*ops).remote_port)) >> 16) as u16;
    let local = addr(family, field!((*ops).local_ip4), field!((*ops).local_ip6), local_port);
    let remote = addr(family, field!((*ops).remote_ip4), field!((*ops).remote_ip6), remote_port);
    let pair = SockPairKey::new(netns, local, remote);

    // SAFETY: `sk` is a valid (or null) socket pointer in sock_ops.
    let sk = unsafe { (*ops).__bindgen_anon_2.sk };
    // SAFETY: a live socket from the context, checked non-null.
    let direct = if sk.is_null() { None } else { unsafe { DIRECT_CONNS.get(sk) } };
    if op == BPF_SOCK_OPS_STATE_CB {
        // args[0] is the old state, args[1] the new; the sockets leave
        // SOCK_PAIRS, and their socket storage goes, by themselves.
        // SAFETY: reading the args array of the context.
        let new_state = unsafe { rd(field!((*ops).__bindgen_anon_1.args[1])) };
        if let Some(conn) = direct {
            // SAFETY: as above.
            let old_state = unsafe { rd(field!((*ops).__bindgen_anon_1.args[0])) };
            // SAFETY: this socket's own storage, sized DirectConn.
            if direct_state(ctx, netns, unsafe { &mut *conn }, old_state, new_state, local, remote) {
                // Accounted once; a socket that connects again starts afresh.
                // SAFETY: the live socket the storage belongs to.
                unsafe { DIRECT_CONNS.delete(sk) };
            }
        }
        if new_state == TCP_CLOSE {
            let _ = ORIG_BY_PAIR.remove(&pair);
            let _ = PASSTHROUGH.remove(&pair);
        }
        return;
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB && direct.is_some() {
        // A direct connection: follow its states to the close, and count it open.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        if let Some(t) = traffic(netns) {
            // SAFETY: this CPU's value; no other writer on this CPU.
            unsafe { (*t).opened += 1 };
        }
        return;
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // The proxy connecting to this pod's app from a client's address: only
        // IP_TRANSPARENT (CAP_NET_ADMIN) allows a source the netns does not own.
        // Its SYN must reach the app, not be steered back to the proxy.
        let own = |a: Addr| {
            let ip_only = Addr { port: 0, ..a };
            // SAFETY: copied out at once.
            unsafe { POD_BY_IP.get(&ip_only) }.copied() == Some(netns)
        };
        if !local.is_loopback() && !remote.is_loopback() && own(remote) && !own(local) && PASSTHROUGH.insert(&pair, &1, 0).is_ok() {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        return;
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: a live socket from the context, checked non-null.
        if !sk.is_null()
            && let Some(orig) = unsafe { SOCK_ORIG_DST.get(sk) }
        {
            // SAFETY: this socket's value, sized Addr.
            let orig = unsafe { *orig };
            // SAFETY: as above.
            unsafe { SOCK_ORIG_DST.delete(sk) };
            if ORIG_BY_PAIR.insert(&pair, &orig, 0).is_ok() {
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            } else {
                aya_log_ebpf::warn!(ctx, "ORIG_BY_PAIR is full; the proxy cannot answer this connection");
            }
        }
    }
    // Only pairs whose both ends are meshed sockets on this node can be spliced:
    // loopback (app and proxy), the pod's own address (proxy to app), or another
    // meshed pod's address (proxy to proxy, pod to pod).
    let local_peer = remote.is_loopback() || remote.same_ip(&local) || {
        let ip_only = Addr { port: 0, ..remote };
        // SAFETY: presence check only.
        unsafe { POD_BY_IP.get(&ip_only) }.is_some()
    };
    if pol.has(flags::SK_MSG) && local_peer {
        let mut key = pair;
        // SAFETY: `ops` is the live context the helper expects.
        match SOCK_PAIRS.update(&mut key, unsafe { &mut *ops }, BPF_ANY as u64) {
            Ok(()) => {}
            // Rare (the map is full): this pair stays on TCP, which is correct, only slower.
            Err(e) => aya_log_ebpf::warn!(ctx, "SOCK_PAIRS update failed ({}); pair stays on TCP", e),
        }
    }
}

/// One state change of a direct connection; at its close, the totals and a
/// record, and true.
#[inline(always)]
fn direct_state(ctx: &SockOpsContext, netns: u64, conn: &mut DirectConn, old: u32, new: u32, local: Addr, remote: Addr) -> bool {
    let Some(result) = conn.on_state(old, new) else { return false };
    let ops: *mut bpf_sock_ops = ctx.ops;
    let (from_client, to_client) = conn.payload(rd(field!((*ops).bytes_acked)), rd(field!((*ops).bytes_received)));
    // SAFETY: the helper takes no arguments.
    let ended_ns = unsafe { bpf_ktime_get_ns() };
    if let Some(t) = traffic(netns) {
        // SAFETY: this CPU's value; no other writer on this CPU.
        unsafe {
            (*t).closed[(result as u32 & 3) as usize] += 1;
            (*t).bytes_from_client += from_client;
            (*t).bytes_to_client += to_client;
            (*t).duration_ns += ended_ns.saturating_sub(conn.started_ns);
        }
    }
    record(&ConnRecord {
        netns,
        started_ns: conn.started_ns,
        ended_ns,
        bytes_from_client: from_client,
        bytes_to_client: to_client,
        client: local,
        destination: remote,
        result: result as u32,
        _pad: 0,
    });
    true
}
