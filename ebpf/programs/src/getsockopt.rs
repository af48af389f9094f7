//! cgroup getsockopt: answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST for the
//! proxy's accepted socket, so any proxy written for iptables works unchanged.

use aya_ebpf::bindings::bpf_sockopt;
use aya_ebpf::helpers::bpf_get_netns_cookie;
use aya_ebpf::macros::cgroup_sockopt;
use aya_ebpf::programs::SockoptContext;
use podsteer_common::{AF_INET, AF_INET6, Counter, SockPairKey};

use crate::ctx::{addr, field, rd};
use crate::maps::{ORIG_BY_PAIR, count};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST share the number.
const SO_ORIGINAL_DST: i32 = 80;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;
/// Lets the (possibly rewritten) result reach the caller.
const PASS: i32 = 1;

#[cgroup_sockopt(getsockopt)]
pub fn podsteer_getsockopt(ctx: SockoptContext) -> i32 {
    answer(&ctx);
    PASS
}

/// Leaves every call we do not answer exactly as the kernel returned it. The
/// program sees at most one page of the result; when the result is longer,
/// kernels 5.12 to 6.4 fail the caller's getsockopt with EFAULT unless the
/// program sets optlen to 0, which means "return the original untouched".
/// (iptables-legacy's IPT_SO_GET_ENTRIES is one such long call.)
#[inline(always)]
fn pass_through(so: *mut bpf_sockopt) {
    let optlen = rd(field!((*so).optlen));
    // SAFETY: optval/optval_end bound the kernel buffer; only compared here.
    let truncated = unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        !(0..=MAX_PAGE as i32).contains(&optlen) || start.add(optlen as usize) > end
    };
    if truncated {
        // SAFETY: optlen is writable in getsockopt programs.
        unsafe { core::ptr::write_volatile(field!((*so).optlen) as *mut i32, 0) };
    }
}

/// Above this, a result cannot fit the buffer (a page is at most 64 KiB), and
/// below it the verifier accepts the pointer arithmetic (its packet offsets are 16-bit).
const MAX_PAGE: u32 = 0xffff;

#[inline(always)]
fn answer(ctx: &SockoptContext) {
    let so: *mut bpf_sockopt = ctx.sockopt;
    if !answer_original_dst(so) {
        pass_through(so);
    }
}

/// Answers SO_ORIGINAL_DST from ORIG_BY_PAIR; false when the call is not one
/// this program answers.
#[inline(always)]
fn answer_original_dst(so: *mut bpf_sockopt) -> bool {
    let level = rd(field!((*so).level));
    if rd(field!((*so).optname)) != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return false;
    }
    // SAFETY: `sk` is valid in sockopt hooks.
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // The accepted socket's peer is the app's socket, and its local address the
    // listener the app was sent to: the pair sockops keyed from the app's side.
    // SAFETY: reading fields of the socket the kernel handed us.
    let (peer, local) = unsafe {
        let family = rd(field!((*sk).family));
        let dst_port = rd(field!((*sk).dst_port));
        // src_port is host order, dst_port network order.
        let src_port = (rd(field!((*sk).src_port)) as u16).to_be();
        (
            addr(family, field!((*sk).dst_ip4), field!((*sk).dst_ip6), dst_port),
            addr(family, field!((*sk).src_ip4), field!((*sk).src_ip6), src_port),
        )
    };
    // SAFETY: the helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(so.cast()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { ORIG_BY_PAIR.get(&SockPairKey::new(netns, peer, local)) }).copied() else {
        count(Counter::OrigDstMisses);
        return false;
    };
    // SAFETY: optval/optval_end bound the kernel buffer; every write below is checked against them.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        let len = if orig.family == AF_INET { SOCKADDR_IN_LEN } else { SOCKADDR_IN6_LEN };
        if start.add(len) > end || (level == SOL_IP) != (orig.family == AF_INET) {
            count(Counter::OrigDstMisses);
            return false;
        }
        let family = if orig.family == AF_INET { AF_INET } else { AF_INET6 };
        core::ptr::write_volatile(start as *mut u16, family);
        core::ptr::write_volatile(start.add(2) as *mut u16, orig.port);
        if orig.family == AF_INET {
            core::ptr::write_volatile(start.add(4) as *mut u32, orig.ip[0]);
            core::ptr::write_volatile(start.add(8) as *mut u64, 0);
        } else {
            core::ptr::write_volatile(start.add(4) as *mut u32, 0); // flowinfo
            let mut i = 0;
            while i < 4 {
                core::ptr::write_volatile(start.add(8 + 4 * i) as *mut u32, orig.ip[i]);
                i += 1;
            }
            core::ptr::write_volatile(start.add(24) as *mut u32, 0); // scope id
        }
        // Two separate 4-byte stores: a merged 8-byte store is rejected by the verifier.
        core::ptr::write_volatile(field!((*so).optlen) as *mut i32, len as i32);
        core::ptr::write_volatile(field!((*so).retval) as *mut i32, 0);
    }
    count(Counter::OrigDstHits);
    true
}
