//! The agent's command line, in the library so tests can parse the
//! DaemonSet's arguments with the real definition.

use clap::{Parser, Subcommand};

use crate::config::AgentConfig;

#[derive(Parser, Debug)]
#[command(name = "podsteer-agent", version, about = "podsteer node agent")]
// A flag given twice keeps the last value: the command line overrides the config file.
#[command(args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    #[command(flatten)]
    pub config: AgentConfig,
}

#[derive(Subcommand, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Mount a bpffs at --bpffs if none is there (the DaemonSet's init step).
    MountBpffs,
    /// Remove every pin; interception stops for all pods.
    RemovePins,
    /// Remove podsteer from the node: pods' interception, pins, the CNI entry and binary.
    Uninstall,
}
