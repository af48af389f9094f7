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

/// One read from a proxied socket that, when it comes up short (the socket
/// is drained), tells tokio so: the next wait goes to epoll instead of a read
/// that would return EAGAIN, one syscall less per message. Tokio's own
/// `poll_read` does the same; `try_read` does not. Readiness that arrived
/// after the wait began is kept (tokio compares ticks), and so is a FIN.
pub fn read_draining(tcp: &tokio::net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use nix::sys::socket::MsgFlags;
    let mut short = None;
    let read = tcp.try_io(tokio::io::Interest::READABLE, || {
        let n = nix::sys::socket::recv(tcp.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)?;
        if n > 0 && n < buf.len() {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, short) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (read, _) => read,
    }
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

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    fn ready_now(tcp: &TcpStream) -> bool {
        matches!(tcp.poll_read_ready(&mut Context::from_waker(Waker::noop())), Poll::Ready(_))
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let dialled = TcpStream::connect(l.local_addr().expect("address")).await.expect("connect");
        (dialled, l.accept().await.expect("accept").0)
    }

    async fn readable(tcp: &TcpStream) {
        tokio::time::timeout(Duration::from_secs(5), tcp.readable()).await.expect("readable within 5 s").expect("readable");
    }

    #[tokio::test]
    async fn a_short_read_leaves_the_next_wait_to_epoll_and_loses_nothing() {
        let (mut peer, tcp) = pair().await;
        let mut buf = [0u8; 64];
        // What try_read leaves: still "ready", so the next step is a read that returns EAGAIN.
        peer.write_all(b"hello").await.expect("write");
        readable(&tcp).await;
        assert_eq!(tcp.try_read(&mut buf).expect("read"), 5);
        assert!(ready_now(&tcp), "try_read keeps readiness after a short read");
        assert_eq!(tcp.try_read(&mut buf).expect_err("drained").kind(), io::ErrorKind::WouldBlock);
        // A short read through read_draining: readiness is cleared at once.
        peer.write_all(b"world").await.expect("write");
        readable(&tcp).await;
        assert_eq!(read_draining(&tcp, &mut buf).expect("read"), 5);
        assert_eq!(&buf[..5], b"world");
        assert!(!ready_now(&tcp), "a short read clears readiness");
        // Bytes that come later wake the next wait, and a FIN still reads as the end.
        peer.write_all(b"again").await.expect("write");
        readable(&tcp).await;
        assert_eq!(read_draining(&tcp, &mut buf).expect("read"), 5);
        peer.shutdown().await.expect("FIN");
        readable(&tcp).await;
        assert_eq!(read_draining(&tcp, &mut buf).expect("end of stream"), 0);
    }

    #[tokio::test]
    async fn a_full_read_keeps_readiness_for_what_is_still_queued() {
        let (mut peer, tcp) = pair().await;
        peer.write_all(&[7u8; 100]).await.expect("write");
        readable(&tcp).await;
        // Wait until all 100 bytes are queued, so the first read is full and not short.
        let mut probe = [0u8; 100];
        tokio::time::timeout(Duration::from_secs(5), async {
            while peek(std::os::fd::AsFd::as_fd(&tcp), &mut probe).unwrap_or(0) < 100 {
                tcp.readable().await.expect("readable");
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("100 bytes queued within 5 s");
        let mut buf = [0u8; 60];
        assert_eq!(read_draining(&tcp, &mut buf).expect("read"), 60);
        assert!(ready_now(&tcp), "a full read may have left bytes: readiness stays");
        assert_eq!(read_draining(&tcp, &mut buf).expect("read"), 40);
        assert!(!ready_now(&tcp));
    }
}
