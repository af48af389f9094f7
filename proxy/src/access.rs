//! The access line: one per connection (an HBONE stream is one), written as
//! it ends, the same fields whichever way it came.

use crate::metrics::{Direction, Outcome};
use crate::relay::PodCtx;

/// What one connection was; `Default` for what it never got to.
#[derive(Default)]
pub struct Access {
    pub client: String,
    pub original_dst: String,
    /// The identity the peer proved over HBONE (outbound: the destination;
    /// inbound: the source); empty for plaintext.
    pub peer_identity: String,
    /// When authorization refused the connection: the deciding policy and why.
    pub policy: Option<String>,
    pub reason: String,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

impl Access {
    pub fn log(&self, pod: &PodCtx, dir: Direction, started: std::time::Instant, outcome: Outcome) {
        // The connection's span adds its id; pod and direction stay in the
        // event so an access line reads on its own.
        tracing::info!(
            target: "access",
            pod = %pod.label,
            direction = dir.as_str(),
            client = %self.client,
            original_dst = %self.original_dst,
            peer_identity = %self.peer_identity,
            // The pod's own identity, if it has one.
            identity = %pod.tls.as_ref().map(|t| t.id.to_string()).unwrap_or_default(),
            policy = %self.policy.as_deref().unwrap_or_default(),
            reason = %self.reason,
            bytes_from_client = self.bytes_from_client,
            bytes_to_client = self.bytes_to_client,
            duration_ms = started.elapsed().as_millis() as u64,
            result = outcome.as_str(),
        );
    }
}
