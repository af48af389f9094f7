//! Workloads that run inside lab pods: small, dependency-free TCP peers.
//!
//! `echo LISTEN_ADDR`           echo every connection until the peer closes.
//! `request ADDR BYTES`         connect, send BYTES bytes, read them back, print "ok <n>".

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["echo", addr] => {
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
        ["request", addr, bytes] => {
            let n: usize = bytes.parse()?;
            let mut c = TcpStream::connect(addr)?;
            let msg: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            c.write_all(&msg)?;
            let mut back = vec![0u8; n];
            c.read_exact(&mut back)?;
            anyhow::ensure!(back == msg, "echo mismatch");
            println!("ok {n} local={} peer={}", c.local_addr()?, c.peer_addr()?);
            Ok(())
        }
        _ => anyhow::bail!("usage: podsteer-lab-tool echo ADDR | request ADDR BYTES"),
    }
}
