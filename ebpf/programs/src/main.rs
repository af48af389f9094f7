//! podsteer's kernel programs. Data path, in the order a connection meets them:
//!
//! 1. `connect` (cgroup connect4/6): a meshed app's connect() goes to its proxy;
//!    the original destination is kept under the socket cookie.
//! 2. `sockops`: on establishment, re-keys that record by (netns, app addr) and
//!    puts local socket pairs into the SockHash.
//! 3. `getsockopt`: answers SO_ORIGINAL_DST for the proxy's accepted socket.
//! 4. `sk_msg`: sends data between local pairs straight to the peer socket.
//! 5. `sk_lookup`: steers inbound connections to a pod's proxy listener, no NAT.
//!
//! A connect the proxy would add nothing to (an unmeshed destination) goes
//! direct instead: `connect` marks it, `sockops` follows its states and
//! accounts it at close (per-pod totals, one ring-buffer record), and `reset`
//! tells a server's reset from the app's own.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `field!` is used inside unsafe blocks too.
#![allow(unused_unsafe)]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod getsockopt;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod reset;
#[cfg(target_arch = "bpf")]
mod sk_lookup;
#[cfg(target_arch = "bpf")]
mod sk_msg;
#[cfg(target_arch = "bpf")]
mod sockops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never called.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// On the host this crate is only a workspace member; aya-build compiles it for bpf.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
