//! cgroup connect4/connect6: a meshed app's TCP connect() goes to its proxy.

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use aya_ebpf::helpers::{bpf_get_current_uid_gid, bpf_get_netns_cookie};
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;
use podsteer_common::policy::flags;
use podsteer_common::{Addr, Counter, DirectConn, Verdict};

use crate::ctx::{field, rd, rd6};
use crate::maps::{DIRECT_CONNS, SOCK_ORIG_DST, count, is_meshed, policy};

const SOCK_STREAM: u32 = 1;
/// Tells the kernel to go on with the (possibly rewritten) connect.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn podsteer_connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn podsteer_connect6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, true);
    ALLOW
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext, v6: bool) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if rd(field!((*sa).type_)) != SOCK_STREAM {
        return;
    }
    // SAFETY: the helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    let Some(pol) = policy(netns) else { return };
    // The proxy's own sockets: marked (shared proxy) or owned by the proxy UID (sidecar).
    // SAFETY: `sk` is a valid socket pointer in connect hooks.
    let mark = unsafe { rd(field!((*(*sa).__bindgen_anon_1.sk).mark)) };
    let uid = bpf_get_current_uid_gid() as u32;
    if (pol.proxy_mark != 0 && mark == pol.proxy_mark) || (pol.has(flags::SIDECAR) && uid == pol.proxy_uid) {
        count(Counter::SkipProxySocket);
        return;
    }
    let port_be = rd(field!((*sa).user_port)) as u16;
    // A dual-stack socket's `::ffff:a.b.c.d` is decided, recorded and answered
    // (SO_ORIGINAL_DST on the proxy's IPv4 listener) as the IPv4 address it is.
    let dst = if v6 { Addr::v6_unmapped(rd6(field!((*sa).user_ip6)), port_be) } else { Addr::v4(rd(field!((*sa).user_ip4)), port_be) };
    // SAFETY: `sk` is a valid socket pointer in connect hooks.
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    match pol.outbound_decision(&dst, is_meshed(&dst)) {
        Verdict::Redirect => {}
        Verdict::Direct => {
            // Accounted from here: sockops follows the socket's states to its close.
            // SAFETY: the helper takes no arguments.
            let conn = DirectConn { started_ns: unsafe { bpf_ktime_get_ns() }, ..DirectConn::default() };
            // SAFETY: a live socket from the context, checked non-null.
            if !sk.is_null() && unsafe { DIRECT_CONNS.set(sk, &conn) } {
                count(Counter::DirectConnects);
            }
            return;
        }
        Verdict::ExcludedPort | Verdict::ExcludedCidr => {
            count(Counter::SkipExcluded);
            return;
        }
        Verdict::OutboundOff | Verdict::Local | Verdict::LinkLocal => return,
    }
    // SAFETY: a live socket from the context.
    if sk.is_null() || !unsafe { SOCK_ORIG_DST.set(sk, &dst) } {
        // Rare: no record, no redirect, since the proxy could not tell where to go.
        aya_log_ebpf::warn!(ctx, "SOCK_ORIG_DST not stored; connect not redirected");
        return;
    }
    let proxy_port = (pol.outbound_port.to_be()) as u32;
    // SAFETY: writes to user_ip4/user_ip6/user_port are allowed in connect hooks.
    unsafe {
        if v6 {
            // [::1] for IPv6, ::ffff:127.0.0.1 (the proxy's IPv4 listener) for IPv4-mapped.
            let mapped = dst.family == podsteer_common::AF_INET;
            let ip6 = field!((*sa).user_ip6) as *mut u32;
            core::ptr::write_volatile(ip6, 0);
            core::ptr::write_volatile(ip6.add(1), 0);
            core::ptr::write_volatile(ip6.add(2), if mapped { 0xffffu32.to_be() } else { 0 });
            core::ptr::write_volatile(ip6.add(3), if mapped { 0x7f00_0001u32.to_be() } else { 1u32.to_be() });
        } else {
            core::ptr::write_volatile(field!((*sa).user_ip4) as *mut u32, 0x7f00_0001u32.to_be());
        }
        core::ptr::write_volatile(field!((*sa).user_port) as *mut u32, proxy_port);
    }
    count(Counter::OutboundRedirects);
}
