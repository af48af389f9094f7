//! Who each netns cookie is, for the records and series: a projection of the
//! registry (its one writer), read by the telemetry thread.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodName {
    /// `namespace/name`, as the proxy labels a pod.
    pub label: String,
    /// The pod's SPIFFE ID, if it has one.
    pub identity: String,
}

#[derive(Clone, Default)]
pub struct PodNames(Arc<RwLock<HashMap<u64, PodName>>>);

impl PodNames {
    /// Replaces the whole map (the registry publishes after each change).
    pub fn publish(&self, all: HashMap<u64, PodName>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = all;
    }

    pub fn get(&self, cookie: u64) -> Option<PodName> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(&cookie).cloned()
    }
}
