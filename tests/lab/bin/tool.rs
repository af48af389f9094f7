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
//! `bulk ADDR BYTES`               stream BYTES pseudo-random bytes to an echo server while
//!                                 checking every byte that comes back; print "ok <n> <hash>".
//! `bulk-for ADDR STREAMS MILLIS`  STREAMS blocking connections to an echo server, each writing
//!                                 for MILLIS while checking every byte that comes back;
//!                                 print "ok streams=<n> bytes=<echoed>", or fail on any error.
//! `halfclose-server ADDR`         "A": read to EOF, answer "got N", close.
//!                                 "B": say "bye", shut writes, read to EOF, remember N.
//!                                 "S": reset the connection at once (SO_LINGER 0).
//!                                 "D": say "ready", then remember how the connection ended.
//!                                 anything else: answer what the last "B" or "D" remembered
//!                                 (empty while that connection is still open).
//! `halfclose ADDR client|server [--local]`  exercise one direction of half-close, print "ok ...".
//! `reset ADDR client|server [--local]`      one side resets (against halfclose-server); print what
//!                                 the other side saw: "... reset" or "... eof".
//!                                 `--local` ends the line with " local=<the connection's address>".
//! `expect-reset ADDR [--quiet]`   connect, send (or stay quiet), report how the proxy ended it.
//! `expect-dropped ADDR MILLIS`    connect; print "dropped" if no answer came within MILLIS.
//! `concurrent ADDR N`             N connections open at once, each echoing a message.
//! `loop ADDR MILLIS`              connect/echo/close in a loop; print "ok n=.. failures=..".
//! `loop-ports ADDR`               connect/echo/close until killed, a line per connection:
//!                                 "ok <local port> <peer address>" or "failed <error>".
//! `echo-peers ADDR`               as echo, printing "peer <address>" as each connection comes.
//! `try ADDR`                      connect and read to the end; print "refused", or how it
//!                                 ended ("reset", "eof"): a closed port, direct or proxied.
//! `chat ADDR`                     one long-lived connection to an echo server: each stdin
//!                                 line is sent and its echo printed.
//! `agent-call SOCKET JSON [FD]`   send one request to the agent from wherever this runs
//!                                 (a pod, say), print the answer as JSON; FD is a socket to
//!                                 pass along: `listen4` (a TCP listener), `udp4`, `tcp4` (unconnected).
//! `blocking-probe ADDR MILLIS`    blocking socket to an echo server: one thread writes for
//!                                 MILLIS while the main thread does blocking reads; print
//!                                 "ok eagain=<spurious EAGAINs> sent=<n> received=<n>".
//! `shutdown-probe ADDR`           a thread blocks in recv() on a connection to an echo server;
//!                                 once it sleeps there, another half-closes, so the server's
//!                                 FIN wakes the reader; print what recv returned:
//!                                 "woke=eof" (TCP's answer), "woke=eagain", "woke=error ...".
//! `hold ADDR N`                   open N connections to an echo server one by one, keep those
//!                                 that echo a byte back, print "listening held=K refused=R",
//!                                 then hold them until killed.
//! `silent ADDR N`                 open N connections, never send a byte; print "listening held=N".
//! `sink ADDR`                     accept connections and never read from them.
//! `push ADDR N`                   N connections writing 64 KiB chunks without end (to a sink);
//!                                 print "listening pushing=N".
//! `big-getsockopt`                a getsockopt whose answer is longer than a page (SO_PEERGROUPS
//!                                 of a peer in 1,100 groups); print "ok len=<bytes> first=<gid>".
//! `rogue-hello SOCKET`            say Hello on the proxy control socket as a proxy would, then
//!                                 print what the agent sends: "closed", or "got <type>".

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    // Tests hold a thousand connections open at once.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["echo", addr] => echo(addr),
        ["echo-peers", addr] => echo_peers(addr),
        ["loop-ports", addr] => loop_ports(addr),
        ["request", addr, bytes] => request(addr, bytes.parse()?),
        ["whoami", addr, name, rest @ ..] => whoami(addr, name, rest),
        ["hello", addr, rest @ ..] => hello(addr.parse()?, rest),
        ["bulk", addr, bytes] => bulk(addr, bytes.parse()?),
        ["bulk-for", addr, streams, millis] => bulk_for(addr, streams.parse()?, Duration::from_millis(millis.parse()?)),
        ["halfclose-server", addr] => halfclose_server(addr),
        ["halfclose", addr, side] => halfclose(addr, side, false),
        ["halfclose", addr, side, "--local"] => halfclose(addr, side, true),
        ["reset", addr, side] => reset(addr, side, false),
        ["reset", addr, side, "--local"] => reset(addr, side, true),
        ["expect-reset", addr] => expect_reset(addr, false),
        ["expect-reset", addr, "--quiet"] => expect_reset(addr, true),
        ["expect-dropped", addr, millis] => expect_dropped(addr, Duration::from_millis(millis.parse()?)),
        ["concurrent", addr, n] => concurrent(addr, n.parse()?),
        ["loop", addr, millis] => connect_loop(addr, millis.parse()?),
        ["chat", addr] => chat(addr),
        ["try", addr] => try_connect(addr),
        ["rogue-hello", socket] => rogue_hello(socket),
        ["big-getsockopt"] => big_getsockopt(),
        ["hold", addr, n] => hold(addr, n.parse()?),
        ["silent", addr, n] => silent(addr, n.parse()?),
        ["sink", addr] => sink(addr),
        ["push", addr, n] => push(addr, n.parse()?),
        ["shutdown-probe", addr] => shutdown_probe(addr),
        ["blocking-probe", addr, millis] => blocking_probe(addr, millis.parse()?),
        ["agent-call", socket, json, rest @ ..] => agent_call(socket, json, rest.first().copied()),
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

fn echo_peers(addr: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr)?;
    println!("listening {}", l.local_addr()?);
    for conn in l.incoming() {
        let mut c = conn?;
        println!("peer {}", c.peer_addr()?);
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Each line is printed once the echo is back, so a line "ok P" means the
/// proxy had already taken the connection from port P, if it went through one.
fn loop_ports(addr: &str) -> anyhow::Result<()> {
    loop {
        let r = ping(addr).and_then(|c| Ok((c.local_addr()?.port(), c.peer_addr()?)));
        match r {
            Ok((port, peer)) => println!("ok {port} {peer}"),
            Err(e) => {
                println!("failed {e}");
                // A refusal comes back at once: do not spin.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
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

fn agent_call(socket: &str, json: &str, fd: Option<&str>) -> anyhow::Result<()> {
    let req: podsteer_agent::api::Request = serde_json::from_str(json)?;
    let listener;
    let other;
    let fd = match fd {
        None => None,
        Some("listen4") => {
            listener = TcpListener::bind("127.0.0.1:0")?;
            Some(listener.as_fd())
        }
        Some("udp4") => {
            other = socket_of(nix::sys::socket::SockType::Datagram)?;
            Some(other.as_fd())
        }
        Some("tcp4") => {
            other = socket_of(nix::sys::socket::SockType::Stream)?;
            Some(other.as_fd())
        }
        Some(k) => anyhow::bail!("unknown fd kind {k}"),
    };
    let resp = podsteer_agent::api::call(socket.as_ref(), &req, Duration::from_secs(5), fd)?;
    println!("{}", serde_json::to_string(&resp)?);
    Ok(())
}

/// What a blocking app (the JVM's default I/O, many C clients) sees: a blocking
/// read must block until data or EOF, never fail with EAGAIN.
fn blocking_probe(addr: &str, millis: u64) -> anyhow::Result<()> {
    let c = TcpStream::connect(addr)?;
    let writer = c.try_clone()?;
    let until = std::time::Instant::now() + Duration::from_millis(millis);
    let sent = std::thread::spawn(move || -> std::io::Result<u64> {
        let chunk = [7u8; 1024];
        let mut sent = 0u64;
        while std::time::Instant::now() < until {
            (&writer).write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(sent)
    });
    let (mut eagain, mut received) = (0u64, 0u64);
    let mut buf = [0u8; 65536];
    loop {
        match (&c).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => eagain += 1,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let sent = sent.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    println!("ok eagain={eagain} sent={sent} received={received}");
    Ok(())
}

fn shutdown_probe(addr: &str) -> anyhow::Result<()> {
    let c = TcpStream::connect(addr)?;
    let reader = c.try_clone()?;
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let woke = std::thread::spawn(move || {
        let _ = tid_tx.send(nix::unistd::gettid());
        let mut buf = [0u8; 16];
        match (&reader).read(&mut buf) {
            Ok(0) => "eof".to_owned(),
            Ok(n) => format!("data {n}"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "eagain".to_owned(),
            Err(e) => format!("error {e}"),
        }
    });
    let tid = tid_rx.recv()?;
    // Wait, with a deadline, until the reader sleeps inside recv().
    let stat = format!("/proc/self/task/{tid}/stat");
    let end = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let st = std::fs::read_to_string(&stat)?;
        let state = st.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("");
        let wchan = std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default();
        if state == "S" && !wchan.is_empty() && wchan != "0" {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < end, "reader never blocked (state {state}, wchan {wchan})");
        std::thread::yield_now();
    }
    // Half-close: the echo server sees end of stream and closes, and its FIN
    // is what wakes the reader.
    c.shutdown(std::net::Shutdown::Write)?;
    let how = woke.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
    println!("woke={how}");
    Ok(())
}

fn hold(addr: &str, n: usize) -> anyhow::Result<()> {
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        let mut c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut b = [0u8; 1];
        match c.write_all(b"x").and_then(|()| read_retrying(&c, &mut b)) {
            Ok(1) => held.push(c),
            _ => refused += 1,
        }
    }
    println!("listening held={} refused={refused}", held.len());
    loop {
        std::thread::park();
    }
}

/// Opens `n` connections and says nothing on any of them, ever.
fn silent(addr: &str, n: usize) -> anyhow::Result<()> {
    let held: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(addr)).collect::<Result<_, _>>()?;
    println!("listening held={}", held.len());
    loop {
        std::thread::park();
    }
}

/// A server that accepts and never reads: its peers' sends back up.
fn sink(addr: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr)?;
    println!("listening {}", l.local_addr()?);
    let mut held = Vec::new();
    for c in l.incoming() {
        held.push(c?);
    }
    Ok(())
}

/// `n` connections, each writing 64 KiB chunks for as long as it can.
fn push(addr: &str, n: usize) -> anyhow::Result<()> {
    let conns: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(addr)).collect::<Result<_, _>>()?;
    for mut c in conns {
        std::thread::spawn(move || {
            let buf = vec![7u8; 64 * 1024];
            while c.write_all(&buf).is_ok() {}
        });
    }
    println!("listening pushing={n}");
    loop {
        std::thread::park();
    }
}

/// Kernels 5.12 to 6.4 fail every getsockopt whose answer is longer than a page
/// with EFAULT for processes under a cgroup getsockopt program that does not
/// reset optlen; the answer here must be what it is unmeshed.
fn big_getsockopt() -> anyhow::Result<()> {
    let groups: Vec<nix::unistd::Gid> = (10_000..11_100).map(nix::unistd::Gid::from_raw).collect();
    nix::unistd::setgroups(&groups)?;
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    let mut buf = vec![0u8; 16384];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf and len are valid for the size given.
    let rc = unsafe { libc::getsockopt(a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERGROUPS, buf.as_mut_ptr().cast(), &mut len) };
    anyhow::ensure!(rc == 0, "getsockopt(SO_PEERGROUPS): {}", std::io::Error::last_os_error());
    anyhow::ensure!(len as usize > 4096, "the answer ({len} bytes) is not longer than a page");
    let first = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
    println!("ok len={len} first={first}");
    Ok(())
}

fn rogue_hello(socket: &str) -> anyhow::Result<()> {
    use podsteer_proxy::control::wire::{self, FromProxy};
    let conn = wire::connect(socket.as_ref())?;
    wire::send(conn.as_fd(), &FromProxy::Hello { pid: std::process::id(), version: "rogue".into() }, &[])?;
    let tv = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::ReceiveTimeout, &tv)?;
    match wire::recv_raw(conn.as_fd()) {
        Ok((bytes, fds)) if !bytes.is_empty() => {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            println!("got {} with {} fds", v["type"].as_str().unwrap_or("?"), fds.len());
        }
        _ => println!("closed"),
    }
    Ok(())
}

fn socket_of(kind: nix::sys::socket::SockType) -> anyhow::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, socket};
    Ok(socket(AddressFamily::Inet, kind, SockFlag::SOCK_CLOEXEC, None)?)
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
        let orig = original_dst(&c)
            .map(|a| a.to_string())
            .unwrap_or_else(|| format!("local:{}", c.local_addr().map(|a| a.to_string()).unwrap_or_default()));
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

/// read(2) on a blocking socket, retrying the spurious EAGAIN that tcp_bpf's
/// recvmsg returns when a peer's FIN or RST wakes a reader whose socket sits in a
/// SockHash (seen on 6.18). Epoll-driven apps never see it; blocking ones do.
fn read_retrying(c: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    let end = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match (&*c).read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < end => continue,
            other => return other,
        }
    }
}

fn read_to_end_retrying(c: &TcpStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = read_retrying(c, &mut buf)?;
        if n == 0 {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// A reproducible byte stream indexed by position, so writer and reader agree
/// however the bytes are chunked on the way.
fn fill_at(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        let mut x = (pos >> 3).wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        *b = (x >> ((pos & 7) * 8)) as u8;
    }
}

/// One echo stream for `run`: a writer thread sends until the deadline, then
/// half-closes; this thread checks every byte back. Any error fails it.
fn echo_stream_for(addr: &str, run: Duration) -> anyhow::Result<u64> {
    let c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = c.try_clone()?;
    let end = std::time::Instant::now() + run;
    let writer = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while std::time::Instant::now() < end {
            fill_at(sent, &mut buf);
            w.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        w.shutdown(std::net::Shutdown::Write)?;
        Ok(sent)
    });
    let (mut got, mut buf, mut want) = (0u64, vec![0u8; 256 * 1024], vec![0u8; 256 * 1024]);
    loop {
        let n = (&c).read(&mut buf)?;
        if n == 0 {
            break;
        }
        fill_at(got, &mut want[..n]);
        anyhow::ensure!(buf[..n] == want[..n], "byte mismatch at offset {got}");
        got += n as u64;
    }
    let sent = writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    anyhow::ensure!(got == sent, "sent {sent} bytes, got {got} back");
    Ok(got)
}

fn bulk_for(addr: &str, streams: usize, run: Duration) -> anyhow::Result<()> {
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let addr = addr.to_owned();
            std::thread::spawn(move || echo_stream_for(&addr, run))
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| anyhow::anyhow!("stream panicked"))??;
    }
    println!("ok streams={streams} bytes={total}");
    Ok(())
}

fn bulk(addr: &str, total: u64) -> anyhow::Result<()> {
    let c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = c.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(buf.len() as u64) as usize;
            fill_at(sent, &mut buf[..n]);
            w.write_all(&buf[..n])?;
            sent += n as u64;
        }
        w.shutdown(std::net::Shutdown::Write)
    });
    let (mut got, mut buf, mut want) = (0u64, vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    loop {
        let n = read_retrying(&c, &mut buf)?;
        if n == 0 {
            break;
        }
        fill_at(got, &mut want[..n]);
        anyhow::ensure!(buf[..n] == want[..n], "byte mismatch at offset {got}");
        for b in &buf[..n] {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        got += n as u64;
    }
    writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    anyhow::ensure!(got == total, "sent {total} bytes, got {got} back");
    println!("ok {got} {hash:016x}");
    Ok(())
}

fn halfclose_server(addr: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr)?;
    println!("listening {}", l.local_addr()?);
    // What the last "B" or "D" connection ended with; empty while one is in
    // progress, so a query never reads an earlier connection's answer.
    let remembered: std::sync::Arc<std::sync::Mutex<String>> = std::sync::Arc::default();
    for conn in l.incoming() {
        let mut c = conn?;
        let remembered = remembered.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            let remember = |what: String| *remembered.lock().unwrap_or_else(|p| p.into_inner()) = what;
            let mut kind = [0u8; 1];
            c.read_exact(&mut kind)?;
            match &kind {
                b"S" => reset_on_close(&c)?,
                b"D" => {
                    remember(String::new());
                    c.write_all(b"ready\n")?;
                    remember(how_it_ended(&c));
                }
                b"A" => {
                    let n = read_to_end_retrying(&c)?.len();
                    writeln!(c, "got {n}")?;
                }
                b"B" => {
                    remember(String::new());
                    c.write_all(b"bye\n")?;
                    c.shutdown(std::net::Shutdown::Write)?;
                    remember(read_to_end_retrying(&c)?.len().to_string());
                }
                _ => {
                    let what = remembered.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    writeln!(c, "{what}")?;
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// SO_LINGER {on, 0}: when the socket is closed (dropped), the peer gets RST, not FIN.
fn reset_on_close(c: &TcpStream) -> std::io::Result<()> {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `l` outlives the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(c.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&raw const l).cast(), std::mem::size_of::<libc::linger>() as _)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads until the connection ends: "reset" for RST, "eof" for FIN.
fn how_it_ended(c: &TcpStream) -> String {
    let mut buf = [0u8; 4096];
    loop {
        match read_retrying(c, &mut buf) {
            Ok(0) => return "eof".into(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return "reset".into(),
            Err(e) => return format!("error {e}"),
        }
    }
}

fn reset(addr: &str, side: &str, show_local: bool) -> anyhow::Result<()> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    // With --local, each line ends with the connection's own address (a
    // test then finds that connection's access line by it).
    let local = if show_local { format!(" local={}", c.local_addr()?) } else { String::new() };
    match side {
        "server" => {
            c.write_all(b"S")?;
            println!("ok server reset: the client saw {}{local}", how_it_ended(&c));
        }
        "client" => {
            c.write_all(b"D")?;
            let mut ready = [0u8; 6];
            c.read_exact(&mut ready)?;
            anyhow::ensure!(&ready == b"ready\n", "{ready:?}");
            reset_on_close(&c)?;
            drop(c);
            println!("ok client reset: the server saw {}{local}", poll_remembered(addr)?);
        }
        _ => anyhow::bail!("side is client or server"),
    }
    Ok(())
}

fn halfclose(addr: &str, side: &str, show_local: bool) -> anyhow::Result<()> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    // With --local, each line ends with the connection's own address (a
    // test then finds that connection's access line by it).
    let local = if show_local { format!(" local={}", c.local_addr()?) } else { String::new() };
    match side {
        "client" => {
            c.write_all(b"A")?;
            c.write_all(&[7u8; 1000])?;
            c.shutdown(std::net::Shutdown::Write)?;
            let s = read_to_end_retrying(&c)?;
            anyhow::ensure!(s == "got 1000\n", "after our FIN the server still answered: {s:?}");
            println!("ok client half-close: {}{local}", s.trim());
        }
        "server" => {
            c.write_all(b"B")?;
            let s = read_to_end_retrying(&c)?;
            anyhow::ensure!(s == "bye\n", "{s:?}");
            // The server has shut its side; ours must still carry data.
            c.write_all(&[9u8; 777])?;
            drop(c);
            let n: u64 = poll_remembered(addr)?.parse()?;
            anyhow::ensure!(n == 777, "server got {n} bytes after its FIN, want 777");
            println!("ok server half-close: server read {n} after its FIN{local}");
        }
        _ => anyhow::bail!("side is client or server"),
    }
    Ok(())
}

/// What halfclose-server remembered of the last "B" or "D" connection, once it has it.
fn poll_remembered(addr: &str) -> anyhow::Result<String> {
    let end = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"?")?;
        let s = read_to_end_retrying(&c)?.trim().to_owned();
        if !s.is_empty() {
            return Ok(s);
        }
        anyhow::ensure!(std::time::Instant::now() < end, "halfclose-server remembered nothing within 5 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn expect_reset(addr: &str, quiet: bool) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(20)))?;
    if !quiet {
        // A reset that arrives before this write is reported by the write.
        if let Err(e) = c.write_all(b"x")
            && matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
        {
            println!("reset after {}ms (on write)", started.elapsed().as_millis());
            return Ok(());
        }
    }
    let mut buf = [0u8; 16];
    let how = match read_retrying(&c, &mut buf) {
        Ok(0) => "eof".to_owned(),
        Ok(n) => format!("data {n}"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".to_owned(),
        Err(e) => format!("error {e}"),
    };
    println!("{how} after {}ms", started.elapsed().as_millis());
    Ok(())
}

/// A SYN that gets no answer at all (dropped) times the connect out.
fn expect_dropped(addr: &str, within: Duration) -> anyhow::Result<()> {
    match TcpStream::connect_timeout(&addr.parse()?, within) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => println!("dropped"),
        Err(e) => println!("error {e}"),
        Ok(_) => println!("connected"),
    }
    Ok(())
}

fn concurrent(addr: &str, n: usize) -> anyhow::Result<()> {
    // Open all first, so the proxy really holds n connections at once.
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        conns.push(c);
    }
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(format!("{i:08}").as_bytes())?;
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut back = [0u8; 8];
        c.read_exact(&mut back)?;
        anyhow::ensure!(back == *format!("{i:08}").as_bytes(), "connection {i} got another's bytes");
    }
    println!("ok {n} concurrent");
    Ok(())
}

/// One connection that echoes "ping" back, still open.
fn ping(addr: &str) -> std::io::Result<TcpStream> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"ping")?;
    let mut back = [0u8; 4];
    c.read_exact(&mut back)?;
    if &back != b"ping" {
        return Err(std::io::Error::other("bad echo"));
    }
    Ok(c)
}

fn connect_loop(addr: &str, millis: u64) -> anyhow::Result<()> {
    let end = std::time::Instant::now() + Duration::from_millis(millis);
    let (mut n, mut failures) = (0u64, 0u64);
    let mut first_error = String::new();
    while std::time::Instant::now() < end {
        n += 1;
        let r = ping(addr);
        if let Err(e) = r {
            failures += 1;
            if first_error.is_empty() {
                first_error = e.to_string();
            }
        }
    }
    println!("ok n={n} failures={failures} first_error={first_error:?}");
    Ok(())
}

fn try_connect(addr: &str) -> anyhow::Result<()> {
    match TcpStream::connect(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => println!("refused"),
        Err(e) => anyhow::bail!("connect: {e}"),
        Ok(c) => {
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            println!("{}", how_it_ended(&c));
        }
    }
    Ok(())
}

fn chat(addr: &str) -> anyhow::Result<()> {
    let c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    println!("connected {}", c.local_addr()?);
    for line in std::io::stdin().lock().lines() {
        let line = line? + "\n";
        (&c).write_all(line.as_bytes())?;
        let mut back = vec![0u8; line.len()];
        let mut got = 0;
        while got < back.len() {
            match read_retrying(&c, &mut back[got..])? {
                0 => anyhow::bail!("connection closed"),
                n => got += n,
            }
        }
        print!("{}", String::from_utf8_lossy(&back));
        std::io::stdout().flush()?;
    }
    Ok(())
}
