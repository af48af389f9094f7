//! Socket options the proxy needs; the only unsafe code in the proxy.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn set_int(fd: BorrowedFd<'_>, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: v outlives the call and its size is passed.
    check(unsafe { libc::setsockopt(fd.as_raw_fd(), level, opt, (&raw const v).cast(), size_of::<libc::c_int>() as _) })
}

/// SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6): where the app meant to
/// go. Answered by conntrack in iptables mode, by podsteer's getsockopt hook in eBPF mode.
pub fn original_dst(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let mut buf = [0u8; 28];
    let mut len = buf.len() as libc::socklen_t;
    let level = if ipv6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: buf and len are valid for the size given.
    check(unsafe { libc::getsockopt(fd.as_raw_fd(), level, SO_ORIGINAL_DST, buf.as_mut_ptr().cast(), &mut len) })?;
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    match i32::from(u16::from_ne_bytes([buf[0], buf[1]])) {
        libc::AF_INET => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7])), port)),
        libc::AF_INET6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&buf[8..24]);
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        f => Err(io::Error::other(format!("original destination has family {f}"))),
    }
}

/// SO_MARK, so the interception layer recognises the proxy's own connections.
pub fn set_mark(fd: BorrowedFd<'_>, mark: u32) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

/// Whether this netns has the agent's return path for legs that keep the
/// client's address (a rule for the mark, to a table holding `local default`),
/// and this process may make such legs (mark and IP_TRANSPARENT, as the legs
/// themselves need): a transparent datagram socket with the mark, connected to
/// a far address (TEST-NET-1; no packet is sent), is then routed locally and
/// takes that address as its source. Without the path the app's answers to such
/// a leg would leave the pod, so the proxy must not make one.
pub fn return_path_ready() -> bool {
    let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0") else { return false };
    let fd = std::os::fd::AsFd::as_fd(&s);
    let far = std::net::Ipv4Addr::new(192, 0, 2, 1);
    set_mark(fd, podsteer_proto::control::CLIENT_ADDRESS_MARK).is_ok()
        && set_transparent(fd, false).is_ok()
        && s.connect((far, 9)).is_ok()
        && s.local_addr().is_ok_and(|a| a.ip() == std::net::IpAddr::V4(far))
}

/// IP_TRANSPARENT (IPV6_TRANSPARENT): the socket may bind an address that is
/// not the netns's own (the client's). Needs CAP_NET_ADMIN.
pub fn set_transparent(fd: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    match v6 {
        false => set_int(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1),
        true => set_int(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1),
    }
}

/// SO_LINGER {on, 0}: the next close sends RST, which is how a refused or
/// reset upstream is passed on to the client.
pub fn set_reset_on_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: l outlives the call and its size is passed.
    check(unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&raw const l).cast(), size_of::<libc::linger>() as _)
    })
}

pub fn set_v6only(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)
}

/// Sends FIN on the write side only: half-close, the other direction keeps flowing.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write).map_err(io::Error::from)
}

/// Reads without consuming: the bytes stay queued until read for real.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    use nix::sys::socket::MsgFlags;
    nix::sys::socket::recv(fd.as_raw_fd(), buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
}

/// How a failed connect is counted.
pub fn connect_error_kind(e: &io::Error) -> crate::metrics::ConnectError {
    use crate::metrics::ConnectError;
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectError::Refused,
        io::ErrorKind::TimedOut => ConnectError::Timeout,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => ConnectError::Unreachable,
        _ => ConnectError::Other,
    }
}
