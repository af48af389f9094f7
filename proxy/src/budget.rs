//! A pod's share of the proxy's user-space buffers.
//!
//! A relay keeps bytes in user space only when the receiving side cannot take
//! them at once (at most one read, 64 KiB, per direction). Across thousands of
//! connections that is a lot of memory one pod could take from all the others,
//! so each pod has a budget. Once its connections hold that much, they switch
//! to a held-back read: peek, write what the peer takes, consume only that.
//! Nothing more is kept, and what the peer cannot take stays in the sending
//! socket, where TCP's receive window slows the sender down. Only the pod at its
//! budget is slowed; its neighbours keep their full-size reads.
//!
//! All pods together also have a budget, below the proxy container's memory
//! limit: past it every pod is held back, which is slower but not an OOM kill.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Bytes held against a limit; the gauge is also the metric series.
#[derive(Clone, Debug)]
pub struct Share {
    held: Gauge,
    limit: usize,
}

impl Share {
    pub fn new(held: Gauge, limit: usize) -> Share {
        Share { held, limit }
    }

    fn spent(&self) -> bool {
        usize::try_from(self.held.get()).unwrap_or(0) >= self.limit
    }
}

pub struct Budget {
    /// This pod's (`buffered_bytes{pod}`).
    pod: Share,
    /// Every pod's together (`buffered_bytes_all_pods`).
    proxy: Share,
    /// Reads done held back because a budget was spent.
    throttled: Counter,
}

impl Budget {
    pub fn new(pod: Share, proxy: Share, throttled: Counter) -> Budget {
        Budget { pod, proxy, throttled }
    }

    /// Whether a new read may leave bytes behind in user space.
    pub fn spent(&self) -> bool {
        self.pod.spent() || self.proxy.spent()
    }

    pub fn take(&self, n: usize) {
        if n > 0 {
            self.pod.held.inc_by(n as i64);
            self.proxy.held.inc_by(n as i64);
        }
    }

    pub fn give(&self, n: usize) {
        if n > 0 {
            self.pod.held.dec_by(n as i64);
            self.proxy.held.dec_by(n as i64);
        }
    }

    pub fn held_back(&self) {
        self.throttled.inc();
    }
}
