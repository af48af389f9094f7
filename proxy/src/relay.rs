//! One proxied connection: find where it was going, connect there from inside
//! the pod (marked, so it is not intercepted again), then relay both directions
//! until each side has finished. Resets are passed on as resets.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::debug;

use crate::budget::Budget;
use crate::conns::ConnState;
use crate::inpod::netns::PodNetns;
use crate::metrics::{ClosedLabels, ConnLabels, ConnectErrorLabels, Direction, DirectionLabels, Metrics, Outcome};
use crate::socket;
use crate::splice::{Fill, Pipe, SpliceMode};

/// The per-thread read buffer. 64 KiB takes a full loopback TSO segment (or a
/// whole sk_msg batch) in one read.
const SCRATCH_BUFFER: usize = 64 * 1024;

/// Knobs of the data path, fixed at start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// Checked by each pod's sweeper, not on the data path.
    pub idle_timeout: Duration,
    /// How long a removed pod's connections may go on before they are reset.
    pub drain_timeout: Duration,
    pub mark: Option<u32>,
    pub splice: SpliceMode,
    /// Connections one pod may have in the shared proxy at once, both
    /// directions together, so no pod (or client of one) exhausts it for the rest.
    pub max_conns_per_pod: usize,
    /// Bytes one pod's connections may keep in user space, all together (see [`crate::budget`]).
    pub max_buffered_per_pod: usize,
    /// The same for all pods together: below the container's memory limit.
    pub max_buffered: usize,
    /// An inbound connection on which neither side has said anything this long
    /// is closed, but only while its pod holds over half its connection limit:
    /// server-speaks-first and pre-opened pool connections are fine until the
    /// pod is under a silent-connection flood.
    pub first_byte_timeout: Option<Duration>,
}

/// What every connection of one pod shares.
pub struct PodCtx {
    pub label: String,
    pub netns: PodNetns,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Flips to true when the pod is removed or the proxy drains.
    pub stopping: watch::Receiver<bool>,
    /// Flips to true first when the proxy stops on SIGTERM: outbound accepts
    /// end, inbound ones go on until the outbound connections in flight are done.
    pub outbound_stopping: watch::Receiver<bool>,
    /// Live connections, which the pod's sweeper times out and drains.
    pub conns: Arc<crate::conns::Conns>,
    /// False while the pod's sockets may be fed by sk_msg, which splice(2)
    /// cannot read (see [`crate::splice`]).
    pub splice_allowed: std::sync::atomic::AtomicBool,
    /// The agent installed the pod's return path: inbound connections reach
    /// the app from the client's address (see [`crate::socket::set_transparent`]).
    pub keep_client_address: std::sync::atomic::AtomicBool,
    /// Connections being served, metrics included; the last one to end after
    /// the pod was removed drops the pod's metric series.
    pub serving: std::sync::atomic::AtomicUsize,
    /// The pod's share of user-space buffers.
    pub budget: Budget,
    /// Meshed with an identity: HBONE in and out (see [`crate::hbone`]).
    pub tls: Option<Arc<crate::hbone::mesh::PodTls>>,
    pub hbone: Arc<crate::hbone::Node>,
    pub uid: String,
    /// Who the pod is to policies, and its part of the current set.
    pub policy: crate::authz::PodPolicy,
}

impl PodCtx {
    /// Called once the pod is removed and whenever one of its connections
    /// ends: with the pod gone and nothing left serving, its series go.
    pub fn forget_if_done(&self, m: &Metrics) {
        if *self.stopping.borrow() && self.serving.load(std::sync::atomic::Ordering::Acquire) == 0 {
            m.forget_pod(&self.label);
        }
    }
}

impl PodCtx {
    fn splice_mode(&self, s: &Settings) -> SpliceMode {
        if self.splice_allowed.load(std::sync::atomic::Ordering::Relaxed) { s.splice } else { SpliceMode::Never }
    }
}

/// Which side broke a relay half.
enum Broke {
    From(io::Error),
    To(io::Error),
}

pub async fn serve(client: TcpStream, dir: Direction, pod: Arc<PodCtx>, s: Arc<Settings>, m: Arc<Metrics>) {
    let serving = pod.serving.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
    if serving > s.max_conns_per_pod {
        // Refused before any upstream work: a reset, counted, and nothing else.
        reset(&client);
        m.closed.get_or_create(&ClosedLabels { pod: pod.label.clone(), direction: dir, result: Outcome::PodLimit }).inc();
    } else {
        serve_counted(client, dir, &pod, &s, &m).await;
    }
    pod.serving.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    pod.forget_if_done(&m);
    m.conn_done(dir);
}

async fn serve_counted(client: TcpStream, dir: Direction, pod: &Arc<PodCtx>, s: &Settings, m: &Metrics) {
    let labels = ConnLabels { pod: pod.label.clone(), direction: dir };
    m.opened.get_or_create(&labels).inc();
    // With `RUST_LOG=access=debug`, a line as each connection is taken, before
    // any upstream work: a proxy killed mid-connection still leaves a trace of
    // every connection it took (the completion line below comes at the end).
    // Read now: once the client has gone (a reset, say) the socket no longer knows it.
    let client_addr = client.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    debug!(target: "access", pod = %pod.label, direction = dir.as_str(), client = %client_addr, "opened");
    m.active.get_or_create(&labels).inc();
    let started = Instant::now();
    let mut dst = None;
    let mut peer = None;
    let (mut policy, mut reason) = (None, String::new());
    let (outcome, up, down) = match destination(&client, dir, pod) {
        Err(_) => {
            reset(&client);
            (Outcome::NoOriginalDst, 0, 0)
        }
        Ok(d) if is_own_listener(d, &client, pod) => {
            dst = Some(d);
            reset(&client);
            (Outcome::OwnListener, 0, 0)
        }
        Ok(d) => {
            dst = Some(d);
            match gate(dir, d, &client, pod, m) {
                Err(denial) => {
                    reset(&client);
                    let refused = if denial.reason.starts_with("plaintext") { Outcome::PlaintextRefused } else { Outcome::PolicyDenied };
                    (policy, reason) = (denial.policy, denial.reason);
                    (refused, 0, 0)
                }
                Ok(checked) => match crate::hbone::route(dir, d, pod) {
                    Some(route) => {
                        peer = Some(route.peer.clone());
                        // Boxed: its dial and handshake state is large, and a
                        // plaintext connection's task should not carry it.
                        Box::pin(crate::hbone::outbound(&client, d, route, pod, s, m, &labels)).await
                    }
                    // Boxed, as each transient await of a connection's task
                    // is: the task's size is its largest state's, kept for
                    // the connection's whole life.
                    None => match Box::pin(connect(d, client.peer_addr().ok(), pod, s, m, dir)).await {
                        Err(_) => {
                            reset(&client);
                            (Outcome::ConnectFailed, 0, 0)
                        }
                        Ok(upstream) => {
                            let state = pod.conns.open_checked(dir, checked);
                            relay(&client, &upstream, &state, pod, pod.splice_mode(s), m, &labels).await
                        }
                    },
                },
            }
        }
    };
    m.active.get_or_create(&labels).dec();
    m.closed.get_or_create(&ClosedLabels { pod: pod.label.clone(), direction: dir, result: outcome }).inc();
    crate::access::Access {
        client: client_addr,
        original_dst: dst.map(|a| a.to_string()).unwrap_or_default(),
        peer_identity: peer.map(|p| p.to_string()).unwrap_or_default(),
        policy,
        reason,
        bytes_from_client: up,
        bytes_to_client: down,
    }
    .log(pod, dir, started, outcome);
}

/// Inbound plaintext is judged by the pod's policy (no source identity);
/// what was judged is kept with the connection, to judge it again when the
/// policy changes. Outbound is judged where it lands.
fn gate(
    dir: Direction,
    dst: SocketAddr,
    client: &TcpStream,
    pod: &PodCtx,
    m: &Metrics,
) -> Result<Option<podsteer_authz::eval::Conn>, crate::authz::Denial> {
    if dir != Direction::Inbound {
        return Ok(None);
    }
    let source_ip = client.peer_addr().map(|a| a.ip().to_canonical()).unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let c = podsteer_authz::eval::Conn { source: None, source_ip, dest_ip: dst.ip().to_canonical(), dest_port: dst.port() };
    pod.policy.check(&pod.hbone.policies, &c, &pod.label, pod.tls.as_ref().map(|t| &t.id), m)?;
    Ok(Some(c))
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

/// Whether `dst` is one of this pod's own listeners: a proxy port on a local
/// address (loopback, unspecified, or the address the client reached us on).
/// A client that connects straight to a proxy port is not redirected, so the
/// original destination is the listener itself, and relaying it would connect
/// the proxy to itself again and again, two fds a level, until it runs out.
fn is_own_listener(dst: SocketAddr, client: &TcpStream, pod: &PodCtx) -> bool {
    if dst.port() != pod.outbound_port && dst.port() != pod.inbound_port {
        return false;
    }
    let ip = dst.ip().to_canonical();
    ip.is_loopback() || ip.is_unspecified() || client.local_addr().is_ok_and(|l| l.ip().to_canonical() == ip)
}

/// Connects to `dst` from inside the pod, counted. `client`: the address the
/// connection came from, which an inbound leg keeps where it may.
pub(crate) async fn connect(
    dst: SocketAddr,
    client: Option<SocketAddr>,
    pod: &PodCtx,
    s: &Settings,
    m: &Metrics,
    dir: Direction,
) -> io::Result<TcpStream> {
    let started = Instant::now();
    // Inbound, the app sees the client's own address where the agent put the
    // way back in place (see the agent's `return_path`).
    let from = match dir {
        Direction::Inbound if pod.keep_client_address.load(std::sync::atomic::Ordering::Relaxed) => {
            client.and_then(|c| same_family(c, dst))
        }
        _ => None,
    };
    let result = dial(dst, from, pod, s).await;
    match &result {
        Ok(_) => m.connect_duration.get_or_create(&DirectionLabels { direction: dir }).observe(started.elapsed().as_secs_f64()),
        Err(e) => {
            m.connect_errors.get_or_create(&ConnectErrorLabels { pod: pod.label.clone(), kind: socket::connect_error_kind(e) }).inc();
        }
    }
    result
}

/// A connection from inside the pod's netns to `dst`: from `from` with the
/// client-address mark, else from the pod's own address with the proxy's
/// mark, so the pod's interception passes it by. Within the connect timeout.
pub(crate) async fn dial(dst: SocketAddr, from: Option<SocketAddr>, pod: &PodCtx, s: &Settings) -> io::Result<TcpStream> {
    let sock = pod.netns.run(|| -> io::Result<TcpSocket> {
        let new = || if dst.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
        let sock = match from {
            Some(src) => match transparent(new, src) {
                Ok(sock) => sock,
                Err(e) => {
                    transparent_failed(&e);
                    plain(new()?, s)?
                }
            },
            None => plain(new()?, s)?,
        };
        sock.set_nodelay(true)?;
        Ok(sock)
    });
    let sock = sock.map_err(io::Error::other)??;
    if from.is_some() {
        // Before the SYN, so even a proxy killed mid-connect leaves the trace:
        // the address the app will see this connection come from.
        debug!(target: "access", from = %sock.local_addr().map(|a| a.to_string()).unwrap_or_default(), "connecting");
    }
    match tokio::time::timeout(s.connect_timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::from(io::ErrorKind::TimedOut)),
    }
}

/// The proxy's own address, marked so the pod's interception passes it by.
fn plain(sock: TcpSocket, s: &Settings) -> io::Result<TcpSocket> {
    if let Some(mark) = s.mark {
        socket::set_mark(sock.as_fd(), mark)?;
    }
    Ok(sock)
}

/// A socket on the client's address, marked so the app's answers come back
/// here. Its port is any but the client's own: with that one, the SYN would
/// carry the very 4-tuple of the connection the proxy accepted from the client
/// in this netns (sk_lookup steering keeps the app's port), and land on it.
fn transparent(new: impl Fn() -> io::Result<TcpSocket>, src: SocketAddr) -> io::Result<TcpSocket> {
    for _ in 0..3 {
        let sock = new()?;
        socket::set_transparent(sock.as_fd(), src.is_ipv6())?;
        socket::set_mark(sock.as_fd(), podsteer_proto::control::CLIENT_ADDRESS_MARK)?;
        sock.bind(SocketAddr::new(src.ip(), 0))?;
        if sock.local_addr()?.port() != src.port() {
            return Ok(sock);
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, "no port but the client's own on its address"))
}

/// Without CAP_NET_ADMIN (a proxy run without it), the app sees the proxy's
/// address as before; said once, not per connection.
fn transparent_failed(e: &io::Error) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| tracing::warn!(error = %e, "cannot connect to apps from their clients' addresses; they see the proxy's"));
}

/// `client` in `dst`'s family (an IPv4 client may arrive v4-mapped), if it has one.
fn same_family(client: SocketAddr, dst: SocketAddr) -> Option<SocketAddr> {
    let ip = client.ip().to_canonical();
    match (ip, dst) {
        (std::net::IpAddr::V4(_), SocketAddr::V4(_)) | (std::net::IpAddr::V6(_), SocketAddr::V6(_)) => {
            Some(SocketAddr::new(ip, client.port()))
        }
        _ => None,
    }
}

fn reset(s: &TcpStream) {
    // Best effort: the socket may already be gone, which is the same outcome.
    let _ = socket::set_reset_on_close(s.as_fd());
}

async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    state: &ConnState,
    pod: &PodCtx,
    splice: SpliceMode,
    m: &Metrics,
    labels: &ConnLabels,
) -> (Outcome, u64, u64) {
    let _ = client.set_nodelay(true);
    let spliced = m.bytes_spliced.get_or_create(labels).clone();
    let half = |moved: &Family<ConnLabels, Counter>| {
        Half::new(moved.get_or_create(labels).clone(), spliced.clone(), m.splice_fallbacks.clone(), splice)
    };
    let mut copy = Copy { up: half(&m.bytes_from_client), down: half(&m.bytes_to_client), client, upstream, state, budget: &pod.budget };
    let outcome = (&mut copy).await;
    if outcome != Outcome::Ok {
        reset(client);
        reset(upstream);
    }
    (outcome, copy.up.moved.total, copy.down.moved.total)
}

/// One direction of the relay. Bytes are read into a per-thread scratch buffer
/// and written straight on; only what the peer cannot take right away is kept,
/// so an idle connection holds no buffer at all. A bulk direction moves on to
/// splice(2) through its own pipe.
struct Half {
    /// Bytes read but not yet written (the peer's send buffer was full).
    pending: Vec<u8>,
    moved: Moved,
    /// EOF seen and passed on as a half-close.
    done: bool,
    splice: SpliceMode,
    /// Set once this direction splices; `pending` is always empty before the pipe fills.
    pipe: Option<Pipe>,
    spliced: Counter,
    fallbacks: Counter,
}

/// Bytes written on, for the access log and the metric.
struct Moved {
    total: u64,
    counter: Counter,
}

impl Moved {
    fn add(&mut self, n: usize) {
        self.total += n as u64;
        self.counter.inc_by(n as u64);
    }
}

thread_local! {
    /// Every relay on a worker thread reads through this one buffer: polls on a
    /// thread never overlap, and the buffer is empty again when a poll returns.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; SCRATCH_BUFFER].into_boxed_slice());
}

impl Half {
    fn new(counter: Counter, spliced: Counter, fallbacks: Counter, splice: SpliceMode) -> Half {
        let mut h = Half { pending: Vec::new(), moved: Moved { total: 0, counter }, done: false, splice, pipe: None, spliced, fallbacks };
        if splice == SpliceMode::Always {
            h.start_splicing();
        }
        h
    }

    fn start_splicing(&mut self) {
        match Pipe::new() {
            Ok(p) => self.pipe = Some(p),
            // Out of fds: this direction keeps copying, which is correct, only slower.
            Err(e) => {
                tracing::debug!(error = %e, "no pipe for splice; copying");
                self.splice = SpliceMode::Never;
            }
        }
    }

    /// End of stream passed on: FIN on the write side only.
    fn half_close(&mut self, to: &TcpStream) -> Poll<Result<(), Broke>> {
        self.done = true;
        let _ = socket::shutdown_write(to.as_fd());
        Poll::Ready(Ok(()))
    }

    /// Writes out what is pending; Ready(Ok) once nothing is.
    fn poll_flush(&mut self, cx: &mut Context<'_>, to: &TcpStream, budget: &Budget) -> Poll<Result<(), Broke>> {
        while !self.pending.is_empty() {
            ready!(to.poll_write_ready(cx)).map_err(Broke::To)?;
            match to.try_write(&self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                    self.moved.add(n);
                    budget.give(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(Broke::To(e))),
            }
        }
        // Give the memory back once the backlog is gone.
        self.pending = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Moves bytes from `from` to `to` until one would block, EOF, or an error.
    fn poll_copy(&mut self, cx: &mut Context<'_>, e: &Ends<'_>) -> Poll<Result<(), Broke>> {
        let Ends { from, to, state, budget } = *e;
        loop {
            ready!(self.poll_flush(cx, to, budget))?;
            if self.pipe.is_some() {
                return self.poll_splice(cx, e);
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            let held_back = budget.spent();
            if held_back {
                // Only the peer's readiness says when to go on; wait for it first.
                ready!(to.poll_write_ready(cx)).map_err(Broke::To)?;
            }
            ready!(from.poll_read_ready(cx)).map_err(Broke::From)?;
            let step = if held_back { self.held_back_step(from, to, budget) } else { self.step(from, to, budget) };
            match step {
                Err(b) => return Poll::Ready(Err(b)),
                Ok(None) => {
                    // EOF: finish what is pending, then half-close.
                    ready!(self.poll_flush(cx, to, budget))?;
                    return self.half_close(to);
                }
                Ok(Some(0)) => continue,
                Ok(Some(n)) => {
                    state.touch();
                    if self.splice.promote(n, SCRATCH_BUFFER) {
                        self.start_splicing();
                    }
                }
            }
        }
    }

    /// One full-size read, written straight on; what the peer cannot take now
    /// is kept (and counted against the pod's budget). `None` at EOF, `Some(0)`
    /// when either side would block.
    fn step(&mut self, from: &TcpStream, to: &TcpStream, budget: &Budget) -> Result<Option<usize>, Broke> {
        SCRATCH.with_borrow_mut(|buf| -> Result<Option<usize>, Broke> {
            let n = match read_now(socket::read_draining(from, buf))? {
                Some(n) if n > 0 => n,
                eof_or_nothing => return Ok(eof_or_nothing),
            };
            let sent = written_now(to.try_write(&buf[..n]))?;
            self.pending.extend_from_slice(&buf[sent..n]);
            budget.take(n - sent);
            self.moved.add(sent);
            Ok(Some(n))
        })
    }

    /// The pod's budget is spent: peek, write what the peer takes, and consume
    /// only that, so nothing is left in user space. The rest stays queued in
    /// `from`, and TCP's window holds its sender back.
    fn held_back_step(&mut self, from: &TcpStream, to: &TcpStream, budget: &Budget) -> Result<Option<usize>, Broke> {
        budget.held_back();
        SCRATCH.with_borrow_mut(|buf| -> Result<Option<usize>, Broke> {
            let n = match read_now(from.try_io(Interest::READABLE, || socket::peek(from.as_fd(), buf)))? {
                Some(n) if n > 0 => n,
                eof_or_nothing => return Ok(eof_or_nothing),
            };
            let sent = written_now(to.try_write(&buf[..n]))?;
            // The peeked bytes are queued and this task is the socket's only
            // reader, so reading `sent` of them cannot block or come up short;
            // if it ever did, going on would resend bytes: end the connection.
            let mut left = sent;
            while left > 0 {
                match from.try_read(&mut buf[..left]) {
                    Ok(k) if k > 0 => left -= k,
                    Ok(_) => return Err(Broke::From(io::Error::other("peeked bytes vanished"))),
                    Err(e) => return Err(Broke::From(e)),
                }
            }
            self.moved.add(sent);
            Ok(Some(sent))
        })
    }

    /// The splice(2) twin of the copy loop: empty the pipe into `to`, then
    /// refill it from `from`, until one would block, EOF, or an error.
    fn poll_splice(&mut self, cx: &mut Context<'_>, e: &Ends<'_>) -> Poll<Result<(), Broke>> {
        let Ends { from, to, state, .. } = *e;
        let Some(pipe) = self.pipe.as_mut() else { return Poll::Ready(Ok(())) };
        loop {
            while pipe.held > 0 {
                ready!(to.poll_write_ready(cx)).map_err(Broke::To)?;
                match to.try_io(Interest::WRITABLE, || pipe.drain_to(to.as_fd())) {
                    Ok(n) => {
                        self.moved.add(n);
                        self.spliced.inc_by(n as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(Broke::To(e))),
                }
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            ready!(from.poll_read_ready(cx)).map_err(Broke::From)?;
            // Inside try_io, so readiness is cleared only when nothing was there to read.
            match from.try_io(Interest::READABLE, || pipe.fill_from(from.as_fd())) {
                Ok(Fill::Eof) => return self.half_close(to),
                Ok(Fill::Spliced(_)) => state.touch(),
                Ok(Fill::CopyOnly) => {
                    tracing::debug!("a sockmap feeds this socket; copying from now on");
                    self.pipe = None;
                    self.splice = SpliceMode::Never;
                    self.fallbacks.inc();
                    return self.poll_copy(cx, e);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(Broke::From(e))),
            }
        }
    }
}

/// A non-blocking read: `None` at EOF, `Some(0)` when nothing was there.
fn read_now(r: io::Result<usize>) -> Result<Option<usize>, Broke> {
    match r {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(0)),
        Err(e) => Err(Broke::From(e)),
    }
}

/// A non-blocking write: what it took, 0 when the peer takes nothing now.
fn written_now(r: io::Result<usize>) -> Result<usize, Broke> {
    match r {
        Ok(k) => Ok(k),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(Broke::To(e)),
    }
}

/// What one direction of a relay reads from, writes to, and answers to.
#[derive(Clone, Copy)]
struct Ends<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    state: &'a ConnState,
    budget: &'a Budget,
}

/// Both directions in one future, so each finishes on its own (half-close)
/// and the first error ends the pair.
struct Copy<'a> {
    up: Half,
    down: Half,
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    state: &'a ConnState,
    budget: &'a Budget,
}

impl Drop for Copy<'_> {
    /// Bytes still pending when the connection ends are dropped with it.
    fn drop(&mut self) {
        self.budget.give(self.up.pending.len() + self.down.pending.len());
    }
}

impl Future for Copy<'_> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        if let Some(ended) = this.state.poll_ended(cx.waker()) {
            return Poll::Ready(ended);
        }
        let up = this.up.poll_copy(cx, &Ends { from: this.client, to: this.upstream, state: this.state, budget: this.budget });
        if let Poll::Ready(Err(b)) = up {
            return Poll::Ready(classify_one(Some(&Err(b))));
        }
        let down = this.down.poll_copy(cx, &Ends { from: this.upstream, to: this.client, state: this.state, budget: this.budget });
        if let Poll::Ready(Err(b)) = down {
            return Poll::Ready(classify_one(Some(&swap_sides(&Err(b)))));
        }
        if up.is_ready() && down.is_ready() { Poll::Ready(Outcome::Ok) } else { Poll::Pending }
    }
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
