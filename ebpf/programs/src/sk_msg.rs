//! sk_msg: data between two local sockets goes straight to the peer's receive
//! queue, past the TCP/IP stack.

use aya_ebpf::bindings::{BPF_F_INGRESS, sk_action, sk_msg_md};
use aya_ebpf::helpers::bpf_get_netns_cookie;
use aya_ebpf::macros::sk_msg;
use aya_ebpf::programs::SkMsgContext;
use podsteer_common::{Counter, SockPairKey};

use crate::ctx::{addr, field, rd};
use crate::maps::{SOCK_NO_BYPASS, SOCK_PAIRS, count};

#[sk_msg]
pub fn podsteer_sk_msg(ctx: SkMsgContext) -> u32 {
    let md: *mut sk_msg_md = ctx.msg;
    let family = rd(field!((*md).family));
    let local_port = (rd(field!((*md).local_port)) as u16).to_be();
    let remote_port = (rd(field!((*md).remote_port)) >> 16) as u16;
    // SAFETY: the helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(md.cast()) };
    let me = SockPairKey::new(
        netns,
        addr(family, field!((*md).local_ip4), field!((*md).local_ip6), local_port),
        addr(family, field!((*md).remote_ip4), field!((*md).remote_ip6), remote_port),
    );
    // SAFETY: `sk` is the sending socket, always set for sk_msg.
    let sk = unsafe { (*md).__bindgen_anon_3.sk };
    if sk.is_null() {
        return sk_action::SK_PASS;
    }
    // SAFETY: a live socket from the context; presence check only.
    if unsafe { SOCK_NO_BYPASS.get(sk) }.is_some() {
        return sk_action::SK_PASS;
    }
    let mut peer = me.peer();
    if SOCK_PAIRS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64 {
        count(Counter::SkMsgRedirects);
        return sk_action::SK_PASS;
    }
    // The peer is not enrolled yet: this message goes over TCP, and so must every
    // later one, or a redirected message could overtake it in the peer's queue.
    // SAFETY: as above. Should the kernel not allocate the mark, the next
    // message tries the redirect again; the peer is still not enrolled then
    // unless it just was, the one case this mark exists for.
    let _ = unsafe { SOCK_NO_BYPASS.set(sk, &1) };
    count(Counter::SkMsgFallbacks);
    sk_action::SK_PASS
}
