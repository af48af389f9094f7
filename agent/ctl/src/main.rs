//! podsteer: what podsteer does on this node, readable with the agent stopped.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use podsteer_agent::config::defaults;
use podsteer_ctl::output::{Format, print_json};
use podsteer_ctl::{self as ctl, CtlError, Paths, exit, explain, maps, status};

#[derive(Parser)]
#[command(
    name = "podsteer",
    version,
    about = "Inspect podsteer on this node: maps, status, pods, and why a connection is (not) intercepted"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Output format; JSON has a stable schema (see README).
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    output: Format,
    #[arg(long, global = true, env = "PODSTEER_BPFFS", default_value = defaults::BPFFS)]
    bpffs: PathBuf,
    #[arg(long, global = true, env = "PODSTEER_STATE_DIR", default_value = defaults::STATE_DIR)]
    state_dir: PathBuf,
    #[arg(long, global = true, env = "PODSTEER_SOCKET", default_value = defaults::SOCKET)]
    socket: PathBuf,
    #[arg(long, global = true, env = "PODSTEER_CNI_CONF_DIR", default_value = defaults::CNI_CONF_DIR)]
    cni_conf_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Dump the redirect maps from their pins.
    Maps {
        /// Only this map: pods, pod_ips, original_destinations, sock_pairs, passthrough, inbound_listeners, counters.
        #[arg(long)]
        map: Option<String>,
        /// Only entries of this pod (NAMESPACE/NAME).
        #[arg(long)]
        pod: Option<String>,
    },
    /// Mode and why, kernel features, attach points and pins, agent and proxy health, the CNI entry.
    Status,
    /// Meshed pods and their state.
    Pods,
    /// Would a connection from POD (NAMESPACE/NAME) to DEST (IP:PORT) be intercepted?
    Explain { pod: String, dest: String },
}

fn run(cli: Cli) -> Result<(), CtlError> {
    ctl::require_root()?;
    let paths = Paths { bpffs: cli.bpffs, state_dir: cli.state_dir, socket: cli.socket, cni_conf_dir: cli.cni_conf_dir };
    let json = cli.output == Format::Json;
    match cli.cmd {
        Cmd::Maps { map, pod } => {
            let d = maps::dump(&paths, map.as_deref(), pod.as_deref())?;
            if json { print_json(&d) } else { print!("{}", maps::render(&d)) }
        }
        Cmd::Status => {
            let s = status::status(&paths)?;
            if json { print_json(&s) } else { print!("{}", status::render_status(&s)) }
        }
        Cmd::Pods => {
            let p = status::pods(&paths)?;
            if json { print_json(&p) } else { print!("{}", status::render_pods(&p)) }
        }
        Cmd::Explain { pod, dest } => {
            let e = explain::explain(&paths, &pod, &dest)?;
            if json { print_json(&e) } else { print!("{}", explain::render(&e)) }
        }
    }
    Ok(())
}

fn main() {
    let code = match run(Cli::parse()) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("podsteer: {e}");
            e.code
        }
    };
    std::process::exit(code);
}
