//! podsteer-loadgen: the benchmark's load generator and server. It runs inside
//! lab pods (so interception applies to it) and prints one JSON line of results.
//!
//! serve ADDR                          echo for rr/connrate, count+hash for bulk, hold for idle
//! rr ADDR SIZE CONNS WARMUP_MS RUN_MS closed-loop request/response, every reply checked
//! bulk ADDR STREAMS RUN_MS            one-way stream, byte count and hash checked by the server
//! connrate ADDR RUN_MS                connect, 1-byte request, close, in a loop
//! idle ADDR COUNT                     open COUNT connections, print "ready", hold until stdin closes
//!
//! Every client command takes an optional trailing CPU number to pin itself to.

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

/// First byte of a connection tells the server what it is.
const KIND_ECHO: u8 = b'E';
const KIND_BULK: u8 = b'B';
const KIND_IDLE: u8 = b'I';

fn main() -> anyhow::Result<()> {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let pin = |cpu: Option<&&str>| -> anyhow::Result<()> {
        if let Some(c) = cpu {
            let mut set = nix::sched::CpuSet::new();
            set.set(c.parse()?)?;
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
        }
        Ok(())
    };
    match a.as_slice() {
        ["serve", addr, rest @ ..] => {
            pin(rest.first())?;
            serve(addr)
        }
        ["rr", addr, size, conns, warm, run, rest @ ..] => {
            pin(rest.first())?;
            rr(addr, size.parse()?, conns.parse()?, ms(warm)?, ms(run)?)
        }
        ["bulk", addr, streams, run, rest @ ..] => {
            pin(rest.first())?;
            bulk(addr, streams.parse()?, ms(run)?)
        }
        ["connrate", addr, run, rest @ ..] => {
            pin(rest.first())?;
            connrate(addr, ms(run)?)
        }
        ["idle", addr, count] => idle(addr, count.parse()?),
        _ => anyhow::bail!("usage: see the module doc of podsteer-loadgen"),
    }
}

fn ms(s: &str) -> anyhow::Result<Duration> {
    Ok(Duration::from_millis(s.parse()?))
}

/// tcp_bpf's recvmsg (sockets in a SockHash, sk_msg on) returns a spurious EAGAIN
/// to a blocking reader that something other than data woke, such as freed send
/// buffer (seen on 6.18). Epoll-driven apps never notice; blocking ones retry.
fn read_exact(c: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match read(c, &mut buf[got..])? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(())
}

/// One read, retrying spurious EAGAIN until the stall deadline (after which
/// EAGAIN is SO_RCVTIMEO's and real).
fn read(c: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    let end = Instant::now() + STALL;
    loop {
        match c.read(buf) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) && Instant::now() < end => {}
            other => return other,
        }
    }
}

/// The bulk checksum. CRC32 with SIMD costs a fraction of what the relay
/// does, so throughput measures the path, not the checksum (a byte-wise hash
/// on both ends capped every scenario near the same figure).
fn checksum() -> crc32fast::Hasher {
    crc32fast::Hasher::new()
}

fn serve(addr: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr)?;
    println!("listening {}", l.local_addr()?);
    std::io::stdout().flush()?;
    for conn in l.incoming() {
        let Ok(c) = conn else { continue };
        // Thousands of idle connections each hold a thread: keep stacks small.
        let _ = std::thread::Builder::new().stack_size(128 * 1024).spawn(move || {
            let _ = handle(c);
        });
    }
    Ok(())
}

fn handle(mut c: TcpStream) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    let mut kind = [0u8; 1];
    read_exact(&mut c, &mut kind)?;
    let mut buf = vec![0u8; 64 * 1024];
    match kind[0] {
        KIND_BULK => {
            let (mut n, mut h) = (0u64, checksum());
            loop {
                let k = read(&mut c, &mut buf)?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                n += k as u64;
            }
            c.write_all(&n.to_le_bytes())?;
            c.write_all(&u64::from(h.finalize()).to_le_bytes())?;
        }
        KIND_IDLE => {
            let _ = read(&mut c, &mut buf)?;
        }
        _ => loop {
            let k = read(&mut c, &mut buf)?;
            if k == 0 {
                break;
            }
            c.write_all(&buf[..k])?;
        },
    }
    Ok(())
}

/// A stalled hop fails the run instead of hanging it.
const STALL: Duration = Duration::from_secs(10);

fn connect(addr: &str, kind: u8) -> anyhow::Result<TcpStream> {
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(STALL))?;
    c.write_all(&[kind])?;
    Ok(c)
}

fn rr(addr: &str, size: usize, conns: usize, warm: Duration, run: Duration) -> anyhow::Result<()> {
    let start = Arc::new(std::sync::Barrier::new(conns));
    let handles: Vec<_> = (0..conns)
        .map(|i| {
            let addr = addr.to_owned();
            let start = start.clone();
            std::thread::spawn(move || -> anyhow::Result<(Histogram<u64>, u64, u64)> {
                let mut c = connect(&addr, KIND_ECHO)?;
                let msg: Vec<u8> = (0..size).map(|j| (i + j) as u8).collect();
                let mut back = vec![0u8; size];
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
                let (mut ok, mut bad) = (0u64, 0u64);
                start.wait();
                let t0 = Instant::now();
                while t0.elapsed() < warm + run {
                    let s = Instant::now();
                    c.write_all(&msg)?;
                    read_exact(&mut c, &mut back)?;
                    // Nanoseconds: reported as fractional microseconds, never truncated to whole ones.
                    let ns = s.elapsed().as_nanos() as u64;
                    if t0.elapsed() > warm {
                        hist.record(ns.max(1))?;
                        if back == msg { ok += 1 } else { bad += 1 }
                    }
                }
                Ok((hist, ok, bad))
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut ok, mut bad) = (0u64, 0u64);
    for h in handles {
        let (hist, o, b) = h.join().map_err(|_| anyhow::anyhow!("rr thread panicked"))??;
        all.add(&hist)?;
        ok += o;
        bad += b;
    }
    println!(
        "{}",
        json!({"p50_us": us(all.value_at_quantile(0.5)), "p99_us": us(all.value_at_quantile(0.99)), "p999_us": us(all.value_at_quantile(0.999)),
               "rps": ok as f64 / run.as_secs_f64(), "requests": ok, "mismatches": bad})
    );
    Ok(())
}

/// A recorded nanosecond figure as microseconds, fractions kept.
fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn bulk(addr: &str, streams: usize, run: Duration) -> anyhow::Result<()> {
    let handles: Vec<_> = (0..streams)
        .map(|i| {
            let addr = addr.to_owned();
            std::thread::spawn(move || -> anyhow::Result<(u64, bool)> {
                let mut c = connect(&addr, KIND_BULK)?;
                let chunk: Vec<u8> = (0..256 * 1024).map(|j| (i * 31 + j * 7) as u8).collect();
                let (mut sent, mut h) = (0u64, checksum());
                let t0 = Instant::now();
                while t0.elapsed() < run {
                    c.write_all(&chunk)?;
                    h.update(&chunk);
                    sent += chunk.len() as u64;
                }
                c.shutdown(Shutdown::Write)?;
                let mut reply = [0u8; 16];
                read_exact(&mut c, &mut reply)?;
                let got = u64::from_le_bytes(reply[..8].try_into()?);
                let hash = u64::from_le_bytes(reply[8..].try_into()?);
                Ok((got, got == sent && hash == u64::from(h.finalize())))
            })
        })
        .collect();
    let t0 = Instant::now();
    let (mut bytes, mut ok) = (0u64, true);
    for h in handles {
        let (b, good) = h.join().map_err(|_| anyhow::anyhow!("bulk thread panicked"))??;
        bytes += b;
        ok &= good;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("{}", json!({"gbit_s": bytes as f64 * 8.0 / secs / 1e9, "bytes": bytes, "checksums_ok": ok}));
    Ok(())
}

fn connrate(addr: &str, run: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let (mut n, mut bad) = (0u64, 0u64);
    let mut b = [0u8; 1];
    while t0.elapsed() < run {
        let mut c = connect(addr, KIND_ECHO)?;
        c.write_all(b"x")?;
        read_exact(&mut c, &mut b)?;
        if &b != b"x" {
            bad += 1;
        }
        n += 1;
    }
    println!("{}", json!({"conn_s": n as f64 / t0.elapsed().as_secs_f64(), "connections": n, "mismatches": bad}));
    Ok(())
}

fn idle(addr: &str, count: usize) -> anyhow::Result<()> {
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        conns.push(connect(addr, KIND_IDLE)?);
    }
    println!("ready {}", conns.len());
    std::io::stdout().flush()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    stop.store(true, Ordering::Relaxed);
    Ok(())
}
