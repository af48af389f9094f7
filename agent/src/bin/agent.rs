//! podsteer-agent: the DaemonSet process.

use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand};
use podsteer_agent::config::AgentConfig;
use podsteer_agent::controller::Controller;
use podsteer_agent::ebpf::EbpfDataPath;
use podsteer_agent::{proxy_link, server};
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
            let proxy_listener = cli.config.proxy_socket.as_deref().map(proxy_link::bind).transpose()?;
            let ctl = Arc::new(Mutex::new(Controller::start(cli.config)?));
            if let Some(l) = proxy_listener {
                let ctl = ctl.clone();
                std::thread::Builder::new().name("proxy-link".into()).spawn(move || server::serve_proxies(l, &ctl))?;
            }
            info!("ready");
            server::serve(listener, ctl);
            Ok(())
        }
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colour only for a terminal: logs usually land in files and collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json { b.json().init() } else { b.init() }
}
