//! The admin endpoints of the agent and the proxy, read from inside the netns they listen in.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::BorrowedFd;
use std::time::Duration;

/// An HTTP GET on an admin endpoint at `addr` in `netns`; the whole response.
pub fn get(netns: BorrowedFd<'_>, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let path = path.to_owned();
    crate::netns::run_in(netns, "admin endpoint", move || -> anyhow::Result<String> {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(c, "GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n")?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s)
    })?
}

/// One sample from /metrics, matched by its full name and label text; 0 when absent.
pub fn metric(netns: BorrowedFd<'_>, addr: SocketAddr, name_and_labels: &str) -> anyhow::Result<f64> {
    let text = get(netns, addr, "/metrics")?;
    Ok(text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok()).unwrap_or(0.0))
}
