//! The chained CNI plugin, `podsteer-cni`: the runtime's side of enrolment.
//! It validates, asks the agent, and only then lets the pod start.

pub mod conf;
pub mod error;
pub mod plugin;

pub use podsteer_proto::cni::PLUGIN_TYPE;
/// CNI versions whose configs the plugin accepts; results are passed through in the config's version.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
pub const SPEC_VERSION: &str = "1.1.0";
