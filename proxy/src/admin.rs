//! The admin endpoint (node netns): /metrics, /ready, /healthz. A plain thread
//! with blocking I/O, apart from the data-plane workers.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use tracing::warn;

use crate::state::State;

pub fn spawn(addr: SocketAddr, state: Arc<State>) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let bound = l.local_addr()?;
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for conn in l.incoming().flatten() {
            if let Err(e) = answer(conn, &state) {
                warn!(error = %e, "admin request");
            }
        }
    })?;
    Ok(bound)
}

fn answer(conn: TcpStream, state: &State) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut first = String::new();
    BufReader::new(&conn).read_line(&mut first)?;
    let path = first.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/metrics" => ("200 OK", state.metrics.encode()),
        "/ready" if state.ready() => ("200 OK", "ready\n".to_owned()),
        "/ready" => ("503 Service Unavailable", "not ready\n".to_owned()),
        "/healthz" => ("200 OK", "ok\n".to_owned()),
        _ => ("404 Not Found", "not found\n".to_owned()),
    };
    let mut w = &conn;
    write!(w, "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}
