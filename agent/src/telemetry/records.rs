//! One closed direct connection: from its ring-buffer record to the access
//! line the proxy would have written for it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use podsteer_common::{Addr, ConnRecord, ConnResult};

use super::PodNames;

pub fn decode(bytes: &[u8]) -> Option<ConnRecord> {
    if bytes.len() != std::mem::size_of::<ConnRecord>() {
        return None;
    }
    // SAFETY: the size is checked and ConnRecord is plain repr(C) data; the
    // ring buffer's bytes need not be aligned, so read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ConnRecord>()) })
}

pub fn socket_addr(a: &Addr) -> SocketAddr {
    let port = u16::from_be(a.port);
    let ip = if a.family == podsteer_common::AF_INET {
        IpAddr::V4(Ipv4Addr::from(u32::from_be(a.ip[0])))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in a.ip.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    };
    SocketAddr::new(ip, port)
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
        client = %socket_addr(&r.client),
        original_dst = %socket_addr(&r.destination),
        peer_identity = "",
        identity = %pod.identity,
        policy = "",
        reason = "",
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
    fn addresses_read_back_as_written() {
        let v4 = Addr::v4(u32::from(Ipv4Addr::new(10, 244, 1, 7)).to_be(), 8080u16.to_be());
        assert_eq!(socket_addr(&v4), "10.244.1.7:8080".parse().unwrap());
        let v6 = Addr::v6(crate::policy::ip6_words("fd00:10:244::9".parse().unwrap()), 443u16.to_be());
        assert_eq!(socket_addr(&v6), "[fd00:10:244::9]:443".parse().unwrap());
    }

    #[test]
    fn a_record_of_the_wrong_size_is_refused() {
        assert!(decode(&[0u8; 7]).is_none());
        let r = ConnRecord { netns: 9, bytes_from_client: 5, ..ConnRecord::default() };
        // SAFETY: viewing plain data as bytes.
        let bytes = unsafe { std::slice::from_raw_parts((&r as *const ConnRecord).cast::<u8>(), std::mem::size_of::<ConnRecord>()) };
        assert_eq!(decode(bytes), Some(r));
    }
}
