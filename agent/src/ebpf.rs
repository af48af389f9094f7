//! The eBPF data path: the embedded object, loading or adopting pinned state,
//! attaching, and the typed map writers.

pub mod loader;
pub mod maps;
pub mod pins;

pub use loader::{EbpfDataPath, EbpfError};

/// The object aya-build compiled from `ebpf/programs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podsteer-ebpf"));
