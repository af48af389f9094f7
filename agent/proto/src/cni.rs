//! The names that tie the plugin to the conflist entry the agent installs.

/// The plugin's `type` in a conflist, and its binary's name.
pub const PLUGIN_TYPE: &str = "podsteer-cni";
/// Annotation capability key, as containerd passes pod annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
