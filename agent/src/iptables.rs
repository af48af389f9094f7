//! iptables REDIRECT fallback, in the pod's netns: a pure plan built from the
//! current `iptables-save`, applied with one `iptables-restore --noflush` per family.

pub mod apply;
pub mod plan;

pub use apply::{Backend, IptablesError};
pub use plan::{Family, install_plan, remove_plan};
