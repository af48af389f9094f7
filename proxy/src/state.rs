//! What the control, admin and data-plane threads share.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::pods::Pods;

pub struct State {
    pods: Mutex<Pods>,
    pub metrics: Arc<Metrics>,
    /// Shared mode: the agent's control session is up. Sidecar mode: its
    /// listeners are open and, in eBPF mode, registered with the agent (a
    /// sidecar ready before that would be taken by the kubelet as able to
    /// receive the pod's traffic, which would not yet reach it).
    pub serving: AtomicBool,
    pub draining: AtomicBool,
    /// Signalled when a drain was requested, so main can wait for connections to end.
    pub drained: Notify,
}

impl State {
    pub fn new(pods: Pods, metrics: Arc<Metrics>) -> State {
        State { pods: Mutex::new(pods), metrics, serving: AtomicBool::new(false), draining: AtomicBool::new(false), drained: Notify::new() }
    }

    pub fn with_pods<T>(&self, f: impl FnOnce(&mut Pods) -> T) -> T {
        // A panic while holding the lock leaves the map usable: recover it.
        let mut g = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Ready: serving (see the field), every pod the agent registered has open
    /// listeners (adds return only after that), and no drain is under way.
    pub fn ready(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        !self.draining.load(Relaxed) && self.serving.load(Relaxed)
    }
}
