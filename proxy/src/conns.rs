//! A pod's live connections and the sweeper that ends idle ones and, once the
//! pod is removed, drained ones. Timers live here, off the data path: a relayed
//! connection only checks one flag per wakeup.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use tokio::sync::watch;

use crate::metrics::{Direction, Outcome};

/// Why the sweeper ended a connection (0 while it lives).
const LIVE: u8 = 0;
const IDLE: u8 = 1;
const DRAINED: u8 = 2;
const SILENT: u8 = 3;
const DENIED: u8 = 4;

/// `last_ms` of a connection on which nothing has been moved yet.
const NEVER: u64 = u64::MAX;

/// Shared between a connection's task and the sweeper.
pub struct ConnState {
    start: Instant,
    inbound: bool,
    last_ms: AtomicU64,
    ended: AtomicU8,
    waker: AtomicWaker,
    /// What authorization judged this connection by, to judge it again when
    /// the policy changes. None: not subject to it (outbound).
    checked: Option<podsteer_authz::eval::Conn>,
}

impl ConnState {
    /// Marks activity; called for every chunk moved.
    pub fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        match self.last_ms.load(Ordering::Relaxed) {
            NEVER => self.start.elapsed(),
            last => self.start.elapsed().saturating_sub(Duration::from_millis(last)),
        }
    }

    /// Open for `at_least` with not one byte either way.
    fn silent_for(&self, at_least: Duration) -> bool {
        self.last_ms.load(Ordering::Relaxed) == NEVER && self.start.elapsed() >= at_least
    }

    /// The sweeper's verdict, if any; registers the task to be woken for one.
    pub fn poll_ended(&self, waker: &std::task::Waker) -> Option<Outcome> {
        self.waker.register(waker);
        match self.ended.load(Ordering::Acquire) {
            IDLE => Some(Outcome::IdleTimeout),
            DRAINED => Some(Outcome::Drained),
            SILENT => Some(Outcome::FirstByteTimeout),
            DENIED => Some(Outcome::PolicyDenied),
            _ => None,
        }
    }

    fn end(&self, why: u8) {
        if self.ended.compare_exchange(LIVE, why, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            self.waker.wake();
        }
    }
}

/// The connections of one pod.
#[derive(Default)]
pub struct Conns {
    live: Mutex<Vec<Weak<ConnState>>>,
}

impl Conns {
    pub fn open(&self, dir: Direction) -> Arc<ConnState> {
        self.open_checked(dir, None)
    }

    /// An inbound connection that authorization allowed for `checked`.
    pub fn open_checked(&self, dir: Direction, checked: Option<podsteer_authz::eval::Conn>) -> Arc<ConnState> {
        let c = Arc::new(ConnState {
            start: Instant::now(),
            inbound: dir == Direction::Inbound,
            last_ms: AtomicU64::new(NEVER),
            ended: AtomicU8::new(LIVE),
            waker: AtomicWaker::new(),
            checked,
        });
        self.live.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&c));
        c
    }

    /// A policy changed: ends every live connection `allowed` no longer
    /// allows; returns how many it ended.
    pub fn recheck(&self, allowed: impl Fn(&podsteer_authz::eval::Conn) -> bool) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended = 0;
        for c in live.iter().filter_map(Weak::upgrade) {
            if let Some(conn) = &c.checked
                && c.ended.load(Ordering::Acquire) == LIVE
                && !allowed(conn)
            {
                c.end(DENIED);
                ended += 1;
            }
        }
        ended
    }

    /// Ends what must end and forgets closed connections; returns how many live.
    fn sweep(&self, t: &Timeouts, drain_over: bool) -> usize {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        // Counted before this sweep ends any: a flood is judged by its size.
        let flooded = t.first_byte.is_some_and(|(_, over)| live.len() > over);
        live.retain(|w| match w.upgrade() {
            None => false,
            Some(c) => {
                if drain_over {
                    c.end(DRAINED);
                } else if c.idle_for() >= t.idle {
                    c.end(IDLE);
                } else if let Some((deadline, _)) = t.first_byte.filter(|_| flooded && c.inbound)
                    && c.silent_for(deadline)
                {
                    c.end(SILENT);
                }
                true
            }
        });
        live.len()
    }
}

/// What a pod's sweeper ends connections for.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub idle: Duration,
    pub drain: Duration,
    /// Silent inbound connections older than this end while the pod has more
    /// than this many connections open.
    pub first_byte: Option<(Duration, usize)>,
}

impl Timeouts {
    pub fn of(s: &crate::relay::Settings) -> Timeouts {
        Timeouts { idle: s.idle_timeout, drain: s.drain_timeout, first_byte: s.first_byte_timeout.map(|d| (d, s.max_conns_per_pod / 2)) }
    }

    /// Four checks per timeout (at most every second, at least every 10 ms),
    /// so a connection ends within a quarter of its timeout after it.
    fn tick(&self) -> Duration {
        let shortest = self.first_byte.map_or(self.idle, |(d, _)| d.min(self.idle));
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)).min(self.drain.max(Duration::from_millis(10)))
    }
}

/// Runs until the pod is removed and its last connection is gone.
pub async fn sweeper(conns: Arc<Conns>, mut stopping: watch::Receiver<bool>, t: Timeouts) {
    let tick = t.tick();
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            r = stopping.changed(), if drain_deadline.is_none() => {
                if r.is_err() || *stopping.borrow() {
                    drain_deadline = Some(tokio::time::Instant::now() + t.drain);
                }
            }
        }
        let drain_over = drain_deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        let live = conns.sweep(&t, drain_over);
        if drain_deadline.is_some() && live == 0 {
            return;
        }
    }
}
