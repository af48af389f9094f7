//! A pod's live connections and the sweeper that ends idle ones and, once the
//! pod is removed, drained ones. Timers live here, off the data path: a relayed
//! connection only checks one flag per wakeup.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use tokio::sync::watch;

use crate::metrics::Outcome;

/// Why the sweeper ended a connection (0 while it lives).
const LIVE: u8 = 0;
const IDLE: u8 = 1;
const DRAINED: u8 = 2;

/// Shared between a connection's task and the sweeper.
pub struct ConnState {
    start: Instant,
    last_ms: AtomicU64,
    ended: AtomicU8,
    waker: AtomicWaker,
}

impl ConnState {
    /// Marks activity; called for every chunk moved.
    pub fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// The sweeper's verdict, if any; registers the task to be woken for one.
    pub fn poll_ended(&self, waker: &std::task::Waker) -> Option<Outcome> {
        self.waker.register(waker);
        match self.ended.load(Ordering::Acquire) {
            IDLE => Some(Outcome::IdleTimeout),
            DRAINED => Some(Outcome::Drained),
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
    pub fn open(&self) -> Arc<ConnState> {
        let c = Arc::new(ConnState {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            ended: AtomicU8::new(LIVE),
            waker: AtomicWaker::new(),
        });
        self.live.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&c));
        c
    }

    /// Ends what must end and forgets closed connections; returns how many live.
    fn sweep(&self, idle_timeout: Duration, drain_over: bool) -> usize {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|w| match w.upgrade() {
            None => false,
            Some(c) => {
                if drain_over {
                    c.end(DRAINED);
                } else if c.idle_for() >= idle_timeout {
                    c.end(IDLE);
                }
                true
            }
        });
        live.len()
    }
}

/// Runs until the pod is removed and its last connection is gone. Checks four
/// times per idle timeout (at most every second), so idle connections end within
/// a quarter of the timeout after it.
pub async fn sweeper(conns: Arc<Conns>, mut stopping: watch::Receiver<bool>, idle_timeout: Duration, drain_timeout: Duration) {
    let tick =
        (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)).min(drain_timeout.max(Duration::from_millis(10)));
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            r = stopping.changed(), if drain_deadline.is_none() => {
                if r.is_err() || *stopping.borrow() {
                    drain_deadline = Some(tokio::time::Instant::now() + drain_timeout);
                }
            }
        }
        let drain_over = drain_deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        let live = conns.sweep(idle_timeout, drain_over);
        if drain_deadline.is_some() && live == 0 {
            return;
        }
    }
}
