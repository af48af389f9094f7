//! `/metrics`: what the injector did, by result and webhook, as Istio's
//! injector counts its requests, successes, skips and failures.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Review {
    /// injected, skipped, refused (the patch could not be built) or malformed (400).
    pub result: &'static str,
    /// namespace or pod: which webhook sent it.
    pub scope: &'static str,
}

pub struct Metrics {
    pub reviews: Family<Review, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("podsteer_injector");
        let reviews = Family::<Review, Counter>::default();
        registry.register("reviews", "AdmissionReviews answered, by result and webhook", reviews.clone());
        Metrics { reviews, registry }
    }
}

impl Metrics {
    pub fn count(&self, result: &'static str, scope: &'static str) {
        self.reviews.get_or_create(&Review { result, scope }).inc();
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
