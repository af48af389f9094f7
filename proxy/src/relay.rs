//! One proxied connection: find where it was going, connect there from inside
//! the pod (marked, so it is not intercepted again), then relay both directions
//! until each side has finished. Resets are passed on as resets.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::info;

use crate::inpod::netns::PodNetns;
use crate::metrics::{ClosedLabels, ConnLabels, ConnectErrorLabels, Direction, DirectionLabels, Metrics, Outcome};
use crate::socket;

/// Per-connection read buffer. Allocated for a burst of data and dropped when
/// the socket runs dry, so idle connections hold no buffer at all.
const BURST_BUFFER: usize = 16 * 1024;

/// Knobs of the data path, fixed at start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a removed pod's connections may go on before they are reset.
    pub drain_timeout: Duration,
    pub mark: Option<u32>,
}

/// What every connection of one pod shares.
pub struct PodCtx {
    pub label: String,
    pub netns: PodNetns,
    pub inbound_port: u16,
    /// Flips to true when the pod is removed or the proxy drains.
    pub stopping: watch::Receiver<bool>,
}

/// Milliseconds since `start` of the last byte moved, for the idle timeout.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Which side broke a relay half.
enum Broke {
    From(io::Error),
    To(io::Error),
}

pub async fn serve(client: TcpStream, dir: Direction, pod: Arc<PodCtx>, s: Arc<Settings>, m: Arc<Metrics>) {
    let labels = ConnLabels { pod: pod.label.clone(), direction: dir };
    m.opened.get_or_create(&labels).inc();
    m.active.get_or_create(&labels).inc();
    let started = Instant::now();
    let mut dst = None;
    let (outcome, up, down) = match destination(&client, dir, &pod) {
        Err(_) => {
            reset(&client);
            (Outcome::NoOriginalDst, 0, 0)
        }
        Ok(d) => {
            dst = Some(d);
            match connect(d, &pod, &s, &m, dir).await {
                Err(_) => {
                    reset(&client);
                    (Outcome::ConnectFailed, 0, 0)
                }
                Ok(upstream) => relay(&client, &upstream, &pod, &s, &m, &labels).await,
            }
        }
    };
    m.active.get_or_create(&labels).dec();
    m.closed.get_or_create(&ClosedLabels { pod: pod.label.clone(), direction: dir, result: outcome }).inc();
    info!(
        target: "access",
        pod = %pod.label,
        direction = dir.as_str(),
        client = %client.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
        original_dst = %dst.map(|a| a.to_string()).unwrap_or_default(),
        bytes_from_client = up,
        bytes_to_client = down,
        duration_ms = started.elapsed().as_millis() as u64,
        result = outcome.as_str(),
    );
}

/// Outbound: SO_ORIGINAL_DST. Inbound: the local address when sk_lookup steered
/// the connection (no NAT), SO_ORIGINAL_DST when iptables redirected it to our port.
fn destination(client: &TcpStream, dir: Direction, pod: &PodCtx) -> io::Result<SocketAddr> {
    let local = client.local_addr()?;
    if dir == Direction::Inbound && local.port() != pod.inbound_port {
        return Ok(local);
    }
    socket::original_dst(client.as_fd(), local.is_ipv6())
}

async fn connect(dst: SocketAddr, pod: &PodCtx, s: &Settings, m: &Metrics, dir: Direction) -> io::Result<TcpStream> {
    let started = Instant::now();
    let sock = pod.netns.run(|| -> io::Result<TcpSocket> {
        let sock = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(mark) = s.mark {
            socket::set_mark(sock.as_fd(), mark)?;
        }
        sock.set_nodelay(true)?;
        Ok(sock)
    });
    let sock = sock.map_err(io::Error::other)??;
    let result = match tokio::time::timeout(s.connect_timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::from(io::ErrorKind::TimedOut)),
    };
    match &result {
        Ok(_) => m.connect_duration.get_or_create(&DirectionLabels { direction: dir }).observe(started.elapsed().as_secs_f64()),
        Err(e) => {
            m.connect_errors.get_or_create(&ConnectErrorLabels { pod: pod.label.clone(), kind: socket::connect_error_kind(e) }).inc();
        }
    }
    result
}

fn reset(s: &TcpStream) {
    // Best effort: the socket may already be gone, which is the same outcome.
    let _ = socket::set_reset_on_close(s.as_fd());
}

async fn relay(client: &TcpStream, upstream: &TcpStream, pod: &PodCtx, s: &Settings, m: &Metrics, labels: &ConnLabels) -> (Outcome, u64, u64) {
    let _ = client.set_nodelay(true);
    let act = Activity { start: Instant::now(), last_ms: AtomicU64::new(0) };
    let from_client = m.bytes_from_client.get_or_create(labels).clone();
    let to_client = m.bytes_to_client.get_or_create(labels).clone();
    let up = pump(client, upstream, &act, &from_client);
    let down = pump(upstream, client, &act, &to_client);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (None, None);
    let mut stopping = pod.stopping.clone();
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let outcome = loop {
        if let (Some(u), Some(d)) = (&up_done, &down_done) {
            break classify(u, d);
        }
        let idle_left = s.idle_timeout.saturating_sub(act.idle_for());
        let drain_sleep = drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400));
        tokio::select! {
            r = &mut up, if up_done.is_none() => {
                if matches!(r, Err(_)) { up_done = Some(r); break classify_one(up_done.as_ref()); }
                up_done = Some(r);
            }
            r = &mut down, if down_done.is_none() => {
                if matches!(r, Err(_)) { down_done = Some(r); break classify_one(down_done.as_ref().map(swap_sides).as_ref()); }
                down_done = Some(r);
            }
            _ = tokio::time::sleep(idle_left) => {
                if act.idle_for() >= s.idle_timeout { break Outcome::IdleTimeout; }
            }
            _ = stopping.changed(), if drain_deadline.is_none() => {
                if *stopping.borrow() { drain_deadline = Some(tokio::time::Instant::now() + s.drain_timeout); }
            }
            _ = tokio::time::sleep_until(drain_sleep), if drain_deadline.is_some() => break Outcome::Drained,
        }
    };
    if outcome != Outcome::Ok {
        reset(client);
        reset(upstream);
    }
    let bytes = |r: &Option<Result<u64, Broke>>| r.as_ref().and_then(|r| r.as_ref().ok()).copied().unwrap_or(0);
    (outcome, bytes(&up_done), bytes(&down_done))
}

fn swap_sides(r: &Result<u64, Broke>) -> Result<u64, Broke> {
    match r {
        Ok(n) => Ok(*n),
        Err(Broke::From(e)) => Err(Broke::To(io::Error::new(e.kind(), e.to_string()))),
        Err(Broke::To(e)) => Err(Broke::From(io::Error::new(e.kind(), e.to_string()))),
    }
}

/// Seen from the client→upstream half: a read error is the client's, a write error the backend's.
fn classify_one(r: Option<&Result<u64, Broke>>) -> Outcome {
    match r {
        Some(Err(Broke::From(_))) => Outcome::ClientDisconnected,
        Some(Err(Broke::To(_))) => Outcome::BackendDisconnected,
        _ => Outcome::Ok,
    }
}

fn classify(up: &Result<u64, Broke>, down: &Result<u64, Broke>) -> Outcome {
    match (up, down) {
        (Ok(_), Ok(_)) => Outcome::Ok,
        (Err(_), _) => classify_one(Some(up)),
        (_, Err(_)) => classify_one(Some(&swap_sides(down))),
    }
}

/// Copies one direction until EOF, then half-closes the writer.
async fn pump(from: &TcpStream, to: &TcpStream, act: &Activity, counter: &prometheus_client::metrics::counter::Counter) -> Result<u64, Broke> {
    let mut total = 0u64;
    loop {
        from.readable().await.map_err(Broke::From)?;
        // Capacity only: try_read_buf fills spare capacity, so nothing is zeroed.
        let mut buf: Vec<u8> = Vec::with_capacity(BURST_BUFFER);
        loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    let _ = socket::shutdown_write(to.as_fd());
                    return Ok(total);
                }
                Ok(n) => {
                    write_all(to, &buf).await.map_err(Broke::To)?;
                    total += n as u64;
                    counter.inc_by(n as u64);
                    act.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Broke::From(e)),
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
