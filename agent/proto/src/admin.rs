//! The admin endpoints' HTTP server: a plain thread with blocking I/O, apart
//! from the data-plane workers, so a scrape cannot add latency to traffic. The
//! proxy and the agent both serve through it.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};

use tracing::warn;

/// An answer: status line text and a plain-text body.
pub type Answer = (&'static str, String);

pub const OK: &str = "200 OK";
pub const UNAVAILABLE: &str = "503 Service Unavailable";
pub const NOT_FOUND: &str = "404 Not Found";

/// Serves GET requests on `addr`, answering each path with `route`.
pub fn serve(addr: SocketAddr, route: impl Fn(&str) -> Answer + Send + 'static) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let bound = l.local_addr()?;
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for conn in l.incoming().flatten() {
            if let Err(e) = answer(conn, &route) {
                warn!(error = %e, "admin request");
            }
        }
    })?;
    Ok(bound)
}

fn answer(conn: TcpStream, route: &impl Fn(&str) -> Answer) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut first = String::new();
    BufReader::new(&conn).read_line(&mut first)?;
    let (status, body) = route(first.split_whitespace().nth(1).unwrap_or("/"));
    let mut w = &conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
