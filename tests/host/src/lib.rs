//! The lab's host resources: the names everything is created under, network
//! namespaces, cgroups, recorded processes, and the sweep that removes all of
//! them by prefix.
//!
//! A crate of its own because `cargo xtask lab clean` (and the leak check after
//! the tests) must work on a machine where nothing that set-up installs is
//! there yet: it links neither aya nor the CRI bindings.

pub mod cgroup;
pub mod names;
pub mod netns;
pub mod process;
pub mod sweep;
pub mod wait;
