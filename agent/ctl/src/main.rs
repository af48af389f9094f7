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
    /// Would a connection from POD (NAMESPACE/NAME, or an IP) to DEST
    /// (IP:PORT) be intercepted, and how would the destination's proxy judge it?
    Explain { pod: String, dest: String },
    /// The trust bundle, and each meshed pod's identity, issuer and expiry (never a key).
    Certs,
    /// The mesh's certificate authority, for the local issuer.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Make a root CA in OUT: ca.crt (the trust bundle), issuer.crt and
    /// issuer.key (owner-only). Never overwrites one.
    Create {
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
}

fn run(cli: Cli) -> Result<(), CtlError> {
    let json = cli.output == Format::Json;
    // Every command but `ca` reads this node's state, which is root's.
    let paths = Paths { bpffs: cli.bpffs, state_dir: cli.state_dir, socket: cli.socket, cni_conf_dir: cli.cni_conf_dir };
    let node = || ctl::require_root().map(|()| &paths);
    match cli.cmd {
        Cmd::Maps { map, pod } => {
            let d = maps::dump(node()?, map.as_deref(), pod.as_deref())?;
            if json { print_json(&d) } else { print!("{}", maps::render(&d)) }
        }
        Cmd::Status => {
            let s = status::status(node()?)?;
            if json { print_json(&s) } else { print!("{}", status::render_status(&s)) }
        }
        Cmd::Pods => {
            let p = status::pods(node()?)?;
            if json { print_json(&p) } else { print!("{}", status::render_pods(&p)) }
        }
        Cmd::Explain { pod, dest } => {
            let e = explain::explain(node()?, &pod, &dest)?;
            if json { print_json(&e) } else { print!("{}", explain::render(&e)) }
        }
        Cmd::Certs => {
            let c = ctl::certs::certs(node()?)?;
            if json { print_json(&c) } else { print!("{}", ctl::certs::render(&c)) }
        }
        Cmd::Ca { cmd: CaCmd::Create { trust_domain, out, days } } => {
            use podsteer_identity::ca;
            let made = ca::create(&out, &trust_domain, days).map_err(|e| CtlError::new(exit::FAILURE, e.to_string()))?;
            let files = [ca::BUNDLE_FILE, ca::ISSUER_CERT_FILE, ca::ISSUER_KEY_FILE];
            if json {
                print_json(&serde_json::json!({"trust_domain": trust_domain, "dir": made.dir, "files": files}));
            } else {
                println!("CA for {trust_domain} in {}: {} (the key owner-only)", made.dir.display(), files.join(", "));
                println!(
                    "to hand it to the agents: kubectl -n podsteer-system create secret generic podsteer-ca --from-file={}",
                    made.dir.display()
                );
            }
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
