//! Context field reads. Each goes through read_volatile so LLVM keeps the
//! access size the verifier allows (it rejects merged or narrowed loads).

use core::ptr::read_volatile;

use podsteer_common::{AF_INET, Addr};

#[inline(always)]
pub fn rd<T: Copy>(p: *const T) -> T {
    // SAFETY: callers pass pointers into the program's context.
    unsafe { read_volatile(p) }
}

#[inline(always)]
pub fn rd6(p: *const [u32; 4]) -> [u32; 4] {
    let p = p as *const u32;
    // SAFETY: four u32 words of a context array.
    unsafe { [read_volatile(p), read_volatile(p.add(1)), read_volatile(p.add(2)), read_volatile(p.add(3))] }
}

/// Builds an address from a context's family, ip4/ip6 fields and a network-order
/// port. IPv4-mapped IPv6 (a dual-stack socket talking IPv4) becomes plain IPv4,
/// so both ends of one connection key the same way whatever their socket family.
#[inline(always)]
pub fn addr(family: u32, ip4: *const u32, ip6: *const [u32; 4], port_be: u16) -> Addr {
    if family == AF_INET as u32 {
        return Addr::v4(rd(ip4), port_be);
    }
    Addr::v6_unmapped(rd6(ip6), port_be)
}

/// Address of a context field, without creating a reference to kernel memory.
macro_rules! field {
    ($place:expr) => {
        // SAFETY: only the address is taken; callers pass a live context pointer.
        unsafe { core::ptr::addr_of!($place) }
    };
}
pub(crate) use field;
