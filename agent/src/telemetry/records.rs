//! One closed direct connection: from its ring-buffer record to the access
//! line the proxy would have written for it.

use podsteer_common::{ConnRecord, ConnResult};

use crate::ebpf::maps::socket_addr_of;

use super::PodNames;

pub fn decode(bytes: &[u8]) -> Option<ConnRecord> {
    if bytes.len() != std::mem::size_of::<ConnRecord>() {
        return None;
    }
    // SAFETY: the size is checked and ConnRecord is plain repr(C) data; the
    // ring buffer's bytes need not be aligned, so read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ConnRecord>()) })
}

/// The proxy's access line (`podsteer_proxy::access`), field for field, with
/// `path="direct"`; fields only a proxy can know (a peer's identity, a
/// deciding policy) are empty, as the proxy leaves them for plaintext.
pub fn log(r: &ConnRecord, names: &PodNames) {
    let pod = names.get(r.netns).unwrap_or_default();
    let duration_ms = r.ended_ns.saturating_sub(r.started_ns) / 1_000_000;
    tracing::info!(
        target: "access",
        pod = %pod.label,
        direction = "outbound",
        path = "direct",
        client = %socket_addr_of(&r.client),
        original_dst = %socket_addr_of(&r.destination),
        // Displayed, as the proxy writes them (`%`), so the lines read alike.
        peer_identity = %"",
        identity = %pod.identity,
        policy = %"",
        reason = %"",
        bytes_from_client = r.bytes_from_client,
        bytes_to_client = r.bytes_to_client,
        duration_ms,
        result = ConnResult::from_u32(r.result).as_str(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_of_the_wrong_size_is_refused() {
        assert!(decode(&[0u8; 7]).is_none());
        let r = ConnRecord { netns: 9, bytes_from_client: 5, ..ConnRecord::default() };
        // SAFETY: viewing plain data as bytes.
        let bytes = unsafe { std::slice::from_raw_parts((&r as *const ConnRecord).cast::<u8>(), std::mem::size_of::<ConnRecord>()) };
        assert_eq!(decode(bytes), Some(r));
    }
}
