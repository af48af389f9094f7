//! Dropping to the proxy UID. A sidecar given `CAP_NET_ADMIN` or `CAP_NET_RAW`
//! keeps only those across the switch, so it can still connect to its app from
//! a client's address (`IP_TRANSPARENT` and the return path's mark, see
//! [`crate::socket::return_path_ready`]); every other capability goes. One
//! given neither drops to a UID with no capability at all, as before.

use std::io;

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, as two 32-bit halves.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Half {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> io::Result<[Half; 2]> {
    let mut h = Header { version: VERSION_3, pid: 0 };
    let mut d = [Half::default(); 2];
    // SAFETY: header and two data halves, as version 3 of the ABI takes.
    let r = unsafe { libc::syscall(libc::SYS_capget, &raw mut h, d.as_mut_ptr()) };
    if r != 0 { Err(io::Error::last_os_error()) } else { Ok(d) }
}

fn capset(d: [Half; 2]) -> io::Result<()> {
    let mut h = Header { version: VERSION_3, pid: 0 };
    // SAFETY: as in capget; the kernel only reads the data.
    let r = unsafe { libc::syscall(libc::SYS_capset, &raw mut h, d.as_ptr()) };
    if r != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Switches to `uid`, keeping `CAP_NET_ADMIN` and `CAP_NET_RAW` where the
/// process had them; true if it kept either.
pub fn drop_to(uid: u32) -> io::Result<bool> {
    let before = capget()?;
    let keep = ((1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)) & before[0].permitted;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).map_err(io::Error::from)?;
    // SAFETY: as above; later execs must not inherit the kept set.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    // setuid kept the permitted set and cleared the effective one: keep only
    // the two network capabilities, effective, and nothing else.
    capset([Half { effective: keep, permitted: keep, inheritable: 0 }, Half::default()])?;
    Ok(keep != 0)
}
