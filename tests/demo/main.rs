//! `cargo xtask demo`: a simulated node with a few pods, traffic between them,
//! and a summary. Everything is removed on exit.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use podsteer_lab::{Node, NodeOptions, PodSpec};

fn main() -> anyhow::Result<()> {
    let node = Node::new(NodeOptions::default())?;
    println!("node {} (netns {}), pods cgroup {}", node.id(), node.netns().name(), node.pods_cgroup().display());
    let pods = ["frontend", "backend", "db"]
        .iter()
        .map(|n| node.add_pod(PodSpec::new("demo", n)))
        .collect::<anyhow::Result<Vec<_>>>()?;

    println!("\n{:<10} {:<14} {:<22} {}", "POD", "IPv4", "IPv6", "NETNS");
    for p in &pods {
        let v4 = p.ipv4().map(|i| i.to_string()).unwrap_or_default();
        let v6 = p.ipv6().map(|i| i.to_string()).unwrap_or_default();
        println!("{:<10} {:<14} {:<22} {}", p.name(), v4, v6, p.netns().name());
    }

    println!("\n{:<10} {:<24} {:<24} {}", "FROM", "TO", "SEEN BY SERVER AS", "RESULT");
    for (from, to) in [(0, 1), (1, 2), (2, 0)] {
        let server = &pods[to];
        let ip = server.ipv4().ok_or_else(|| anyhow::anyhow!("{} has no IPv4", server.name()))?;
        let listener = server.run(|| TcpListener::bind(SocketAddr::new(ip, 8080)))??;
        let accept = std::thread::spawn(move || -> anyhow::Result<SocketAddr> {
            let (mut c, peer) = listener.accept()?;
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf)?;
            c.write_all(&buf)?;
            Ok(peer)
        });
        let dst = SocketAddr::new(ip, 8080);
        let mut conn = pods[from].run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))??;
        conn.write_all(b"hello")?;
        let mut back = [0u8; 5];
        conn.read_exact(&mut back)?;
        let peer = accept.join().map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
        let result = if &back == b"hello" { "echoed 5 bytes" } else { "MISMATCH" };
        println!("{:<10} {:<24} {:<24} {}", pods[from].name(), dst, peer, result);
    }
    println!("\nInterception is not wired in yet: traffic above goes pod to pod directly.");
    drop(pods);
    drop(node);
    println!("lab removed: netns, cgroups and state are gone");
    Ok(())
}
