//! When to renew a workload certificate, and how to retry when it fails.
//! Pure, so the schedule is tested without waiting for it.

use std::time::{Duration, SystemTime};

/// Half its life, moved by up to a tenth of the lifetime either way so the
/// certificates of pods started together do not all renew at one instant.
/// `jitter` is uniform in [0, 1).
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let half = life / 2;
    let spread = life.as_secs_f64() / 10.0 * (jitter.clamp(0.0, 1.0) * 2.0 - 1.0);
    if spread >= 0.0 { not_before + half + Duration::from_secs_f64(spread) } else { not_before + half - Duration::from_secs_f64(-spread) }
}

/// Retries of a failed renewal: doubling from `initial` up to `max`. The
/// certificate in use stays until it expires, so a retry never waits past
/// the point where it would be too late to matter.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max, next: initial }
    }

    /// When to try again after a failure at `now`, for a certificate that
    /// expires at `not_after`.
    pub fn retry_at(&mut self, now: SystemTime, not_after: SystemTime) -> SystemTime {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        let left = not_after.duration_since(now).unwrap_or_default();
        // Keep a few tries inside what is left of the certificate's life.
        now + wait.min(left / 4).max(Duration::from_millis(100))
    }

    pub fn succeeded(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_half_life_within_a_tenth() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = t0 + Duration::from_secs(24 * 3600);
        assert_eq!(renew_at(t0, end, 0.5), t0 + Duration::from_secs(12 * 3600));
        let early = renew_at(t0, end, 0.0);
        let late = renew_at(t0, end, 0.999_999);
        assert!(early >= t0 + Duration::from_secs(12 * 3600 - 8640 - 1) && early < t0 + Duration::from_secs(12 * 3600), "{early:?}");
        assert!(late > t0 + Duration::from_secs(12 * 3600) && late <= t0 + Duration::from_secs(12 * 3600 + 8640), "{late:?}");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_stays_within_the_certificates_life() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let far = now + Duration::from_secs(24 * 3600);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let waits: Vec<u64> = (0..7).map(|_| b.retry_at(now, far).duration_since(now).unwrap().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        b.succeeded();
        assert_eq!(b.retry_at(now, far), now + Duration::from_secs(1));
        // A certificate with 8 s left: retries come at most 2 s apart.
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(60));
        assert_eq!(b.retry_at(now, now + Duration::from_secs(8)), now + Duration::from_secs(2));
    }
}
