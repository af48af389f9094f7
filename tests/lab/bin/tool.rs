//! Workloads that run inside lab pods: small TCP peers for the tests and demo.
//!
//! `echo ADDR`                     echo every connection until the peer closes.
//! `request ADDR BYTES`            send BYTES bytes, read them back, print "ok <n> ...".
//! `whoami ADDR NAME [--register SOCKET UID]`
//!                                 answer each connection with one line: NAME, the
//!                                 original destination (SO_ORIGINAL_DST, else the local
//!                                 address) and the peer. With --register, hand the
//!                                 listener to the agent as the pod's inbound listener.
//! `hello ADDR [--mark N] [--bind-port P] [--uid U]`
//!                                 connect, print the first line the server sends.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["echo", addr] => echo(addr),
        ["request", addr, bytes] => request(addr, bytes.parse()?),
        ["whoami", addr, name, rest @ ..] => whoami(addr, name, rest),
        ["hello", addr, rest @ ..] => hello(addr.parse()?, rest),
        _ => anyhow::bail!("usage: see the module doc of podsteer-lab-tool"),
    }
}

fn echo(addr: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr)?;
    println!("listening {}", l.local_addr()?);
    for conn in l.incoming() {
        let mut c = conn?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn request(addr: &str, n: usize) -> anyhow::Result<()> {
    let mut c = TcpStream::connect(addr)?;
    let msg: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    c.write_all(&msg)?;
    let mut back = vec![0u8; n];
    c.read_exact(&mut back)?;
    anyhow::ensure!(back == msg, "echo mismatch");
    println!("ok {n} local={} peer={}", c.local_addr()?, c.peer_addr()?);
    Ok(())
}

fn whoami(addr: &str, name: &str, rest: &[&str]) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr)?;
    if let ["--register", socket, uid] = rest {
        let family = if l.local_addr()?.is_ipv4() { 2 } else { 10 };
        let req = podsteer_agent::api::Request::RegisterListener { uid: uid.to_string(), family };
        podsteer_agent::api::call(socket.as_ref(), &req, Duration::from_secs(5), Some(l.as_fd()))?
            .into_result()
            .map_err(|e| anyhow::anyhow!("registering listener: {e}"))?;
    }
    println!("listening {}", l.local_addr()?);
    for conn in l.incoming() {
        let mut c = conn?;
        let orig = original_dst(&c).map(|a| a.to_string()).unwrap_or_else(|| format!("local:{}", c.local_addr().map(|a| a.to_string()).unwrap_or_default()));
        let local = c.local_addr()?;
        let peer = c.peer_addr()?;
        let _ = writeln!(c, "server={name} orig={orig} local={local} peer={peer}");
    }
    Ok(())
}

/// SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, as a transparent proxy asks it.
fn original_dst(c: &TcpStream) -> Option<SocketAddr> {
    let v6 = c.local_addr().ok()?.is_ipv6();
    let mut buf = [0u8; 28];
    let mut len = buf.len() as libc::socklen_t;
    let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: buf and len are valid for the sizes given.
    let rc = unsafe { libc::getsockopt(c.as_raw_fd(), level, 80, buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    match u16::from_ne_bytes([buf[0], buf[1]]) as i32 {
        libc::AF_INET => Some(SocketAddr::new(std::net::Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]).into(), port)),
        libc::AF_INET6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&buf[8..24]);
            Some(SocketAddr::new(std::net::Ipv6Addr::from(o).into(), port))
        }
        _ => None,
    }
}

fn hello(addr: SocketAddr, rest: &[&str]) -> anyhow::Result<()> {
    let flags: Vec<(&str, &str)> = rest.chunks(2).map(|c| (c[0], c.get(1).copied().unwrap_or(""))).collect();
    // A sidecar proxy runs as its own UID from the start: drop to it before the
    // socket exists, since iptables' owner match uses the socket's creator.
    if let Some((_, uid)) = flags.iter().find(|(f, _)| *f == "--uid") {
        nix::unistd::setuid(nix::unistd::Uid::from_raw(uid.parse()?))?;
    }
    let sock = socket2_like(addr.is_ipv4())?;
    for (flag, v) in flags {
        match flag {
            "--mark" => set_int(&sock, libc::SOL_SOCKET, libc::SO_MARK, parse_num(v)? as i32)?,
            "--bind-port" => bind_port(&sock, addr.is_ipv4(), v.parse()?)?,
            "--uid" => {}
            _ => anyhow::bail!("unknown flag {flag}"),
        }
    }
    let stream = connect(sock, addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    print!("{line}");
    Ok(())
}

fn parse_num(v: &str) -> anyhow::Result<u32> {
    Ok(match v.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16)?,
        None => v.parse()?,
    })
}

fn socket2_like(v4: bool) -> anyhow::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let fam = if v4 { AddressFamily::Inet } else { AddressFamily::Inet6 };
    Ok(socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?)
}

fn set_int(fd: &impl AsRawFd, level: i32, opt: i32, v: i32) -> anyhow::Result<()> {
    // SAFETY: v is a valid int for the size given.
    let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), level, opt, (&raw const v).cast(), 4) };
    anyhow::ensure!(rc == 0, "setsockopt: {}", std::io::Error::last_os_error());
    Ok(())
}

fn bind_port(fd: &impl AsFd, v4: bool, port: u16) -> anyhow::Result<()> {
    use nix::sys::socket::{SockaddrIn, SockaddrIn6, bind};
    set_int(&fd.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if v4 {
        bind(fd.as_fd().as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, port))?;
    } else {
        bind(fd.as_fd().as_raw_fd(), &SockaddrIn6::from(std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0)))?;
    }
    Ok(())
}

fn connect(fd: std::os::fd::OwnedFd, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    use nix::sys::socket::{SockaddrStorage, connect};
    connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(TcpStream::from(fd))
}
