//! The eBPF data path: the embedded object, loading, attaching and pinning.

/// The object aya-build compiled from `ebpf/programs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podsteer-ebpf"));
