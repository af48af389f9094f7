//! podsteer-agent: the DaemonSet process.

use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand};
use podsteer_agent::config::AgentConfig;
use podsteer_agent::controller::Controller;
use podsteer_agent::ebpf::EbpfDataPath;
use podsteer_agent::server;
use tracing::info;

#[derive(Parser)]
#[command(name = "podsteer-agent", version, about = "podsteer node agent")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    config: AgentConfig,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Remove every pin; interception stops for all pods.
    RemovePins,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.config.log_json);
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::RemovePins => {
            EbpfDataPath::remove_pins(&cli.config.bpffs)?;
            info!(bpffs = %cli.config.bpffs.display(), "pins removed");
            Ok(())
        }
        Cmd::Run => {
            let listener = server::bind(&cli.config.socket)?;
            let ctl = Controller::start(cli.config)?;
            info!("ready");
            server::serve(listener, Arc::new(Mutex::new(ctl)));
            Ok(())
        }
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json { b.json().init() } else { b.init() }
}
