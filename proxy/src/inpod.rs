//! Working inside a pod's network namespace from a node-level process.

pub mod netns;
