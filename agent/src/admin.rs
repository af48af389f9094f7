//! The agent's admin endpoint: /healthz (alive), /readyz (mode chosen, kernel
//! programmed, proxy connected) and /metrics. A plain thread, off the CNI path.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use crate::controller::Controller;
use crate::metrics::{CounterLabel, ModeLabel, metrics};

pub fn spawn(addr: SocketAddr, ctl: Arc<Mutex<Controller>>) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let bound = l.local_addr()?;
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for conn in l.incoming().flatten() {
            let _ = answer(conn, &ctl);
        }
    })?;
    Ok(bound)
}

fn answer(conn: TcpStream, ctl: &Mutex<Controller>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut first = String::new();
    BufReader::new(&conn).read_line(&mut first)?;
    let path = first.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/healthz" => ("200 OK", "ok\n".to_owned()),
        "/readyz" => match ctl.lock().map_err(|_| "agent state poisoned".to_owned()).and_then(|c| c.ready()) {
            Ok(()) => ("200 OK", "ready\n".to_owned()),
            Err(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        "/metrics" => {
            refresh(ctl);
            ("200 OK", metrics().encode())
        }
        _ => ("404 Not Found", "not found\n".to_owned()),
    };
    let mut w = &conn;
    write!(w, "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}

/// Gauges that are read at scrape time: pods by mode and the eBPF counters.
fn refresh(ctl: &Mutex<Controller>) {
    let Ok(c) = ctl.lock() else { return };
    let m = metrics();
    let pods = c.pods();
    for mode in ["ebpf", "iptables"] {
        let n = pods.iter().filter(|p| serde_json::to_value(p.mode).ok().and_then(|v| v.as_str().map(|s| s == mode)).unwrap_or(false)).count();
        m.pods.get_or_create(&ModeLabel { mode: mode.into() }).set(n as i64);
    }
    if let Some(counters) = c.ebpf_counters() {
        for (counter, v) in counters {
            m.ebpf.get_or_create(&CounterLabel { counter: counter.name().into() }).set(v as i64);
        }
    }
}
