//! Waiting on a condition with a deadline, never on a fixed sleep.

use std::time::{Duration, Instant};

/// Polls `cond` until it returns `Some`, or fails with `what` once `deadline` has passed.
pub fn until<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if Instant::now() >= end {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
