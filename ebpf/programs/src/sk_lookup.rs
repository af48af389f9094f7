//! sk_lookup: a new inbound connection to a meshed pod's address goes to the
//! pod's proxy listener; the proxy reads the original destination as its local address.

use aya_ebpf::bindings::{bpf_sk_lookup, sk_action};
use aya_ebpf::macros::sk_lookup;
use aya_ebpf::programs::SkLookupContext;
use podsteer_common::policy::flags;
use podsteer_common::{Addr, Counter, SockKey, SockPairKey};

use crate::ctx::{addr, field, rd};
use crate::maps::{INBOUND_LISTENERS, PASSTHROUGH, POD_BY_IP, count, policy};

const IPPROTO_TCP: u32 = 6;

/// What became of one inbound lookup.
enum Steer {
    /// Not ours to steer: the normal socket lookup goes on.
    Untouched,
    /// Handed to the proxy's inbound listener.
    ToProxy,
    /// Meant for the proxy, which has no listener in the pod right now.
    NoListener,
}

#[sk_lookup]
pub fn podsteer_sk_lookup(ctx: SkLookupContext) -> u32 {
    match steer(&ctx) {
        Steer::Untouched | Steer::ToProxy => sk_action::SK_PASS,
        // Fail closed: while the proxy is down or restarting (its listener closed,
        // so the kernel dropped it from INBOUND_LISTENERS), a connection that
        // would have gone to it is refused (the kernel answers the SYN with a
        // reset) rather than delivered to the app unproxied, past any policy.
        Steer::NoListener => {
            count(Counter::InboundRefused);
            sk_action::SK_DROP
        }
    }
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) -> Steer {
    let lk: *mut bpf_sk_lookup = ctx.lookup;
    if rd(field!((*lk).protocol)) != IPPROTO_TCP {
        return Steer::Untouched;
    }
    let family = rd(field!((*lk).family));
    let port = rd(field!((*lk).local_port)) as u16;
    let local = addr(family, field!((*lk).local_ip4), field!((*lk).local_ip6), 0);
    let remote = addr(family, field!((*lk).remote_ip4), field!((*lk).remote_ip6), 0);
    // sk_lookup may not call bpf_get_netns_cookie, so the pod is found by the
    // address the connection is for: only a meshed pod's own IP is steered.
    // SAFETY: copied out at once.
    let Some(netns) = (unsafe { POD_BY_IP.get(&local) }).copied() else { return Steer::Untouched };
    let Some(pol) = policy(netns) else { return Steer::Untouched };
    if !pol.has(flags::INBOUND) {
        return Steer::Untouched;
    }
    // The pod talking to itself, including the proxy's passthrough to the app, stays put.
    if local.is_loopback() || remote.is_loopback() || remote.same_ip(&local) {
        return Steer::Untouched;
    }
    // The proxy's own connection to the app from the client's address (see
    // PASSTHROUGH), by its 4-tuple: ports in network order, as sockops keys it.
    let remote_port = rd(field!((*lk).remote_port));
    let tuple = SockPairKey::new(0, Addr { port: remote_port, ..remote }, Addr { port: port.to_be(), ..local });
    // SAFETY: presence check only.
    if unsafe { PASSTHROUGH.get(&tuple) }.is_some() {
        return Steer::Untouched;
    }
    if port == pol.inbound_port || port == pol.outbound_port || pol.excludes_inbound_port(port) {
        count(Counter::SkipExcluded);
        return Steer::Untouched;
    }
    let key = SockKey { netns, addr: Addr { family: local.family, ..Addr::default() }, _pad: 0 };
    if INBOUND_LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
        count(Counter::InboundSteers);
        Steer::ToProxy
    } else {
        Steer::NoListener
    }
}
