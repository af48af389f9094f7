//! tp_btf on tcp_receive_reset: marks a direct connection whose peer reset it,
//! so its close is told apart from the app's own abort (both go straight
//! from ESTABLISHED to CLOSE). Runs for every reset on the node, and does
//! one socket-storage lookup for each: resets are rare.

use aya_ebpf::bindings::bpf_sock;
use aya_ebpf::macros::btf_tracepoint;
use aya_ebpf::programs::BtfTracePointContext;
use podsteer_common::telemetry::seen;

use crate::maps::DIRECT_CONNS;

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn podsteer_reset_seen(ctx: BtfTracePointContext) -> i32 {
    // The tracepoint's one argument: the socket the reset arrived on.
    let sk: *mut bpf_sock = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    // SAFETY: the kernel's socket pointer, typed by BTF; storage lookup only.
    if let Some(conn) = unsafe { DIRECT_CONNS.get(sk) } {
        // SAFETY: this socket's own storage, sized DirectConn.
        unsafe { (*conn).seen |= seen::RESET_IN };
    }
    0
}
