//! podsteer-agent: the DaemonSet process.

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use podsteer_agent::cli::{Cli, Cmd};
use podsteer_agent::controller::Controller;
use podsteer_agent::ebpf::EbpfDataPath;
use podsteer_agent::state::Event;
use podsteer_agent::{proxy_link, server};
use tracing::info;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(podsteer_agent::config::args_with_file(std::env::args_os().collect())?);
    podsteer_proto::logs::init(cli.config.log_json);
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::RemovePins => {
            EbpfDataPath::remove_pins(&cli.config.bpffs)?;
            info!(bpffs = %cli.config.bpffs.display(), "pins removed");
            Ok(())
        }
        Cmd::MountBpffs => {
            podsteer_agent::sys::ensure_bpffs(&cli.config.bpffs)?;
            info!(bpffs = %cli.config.bpffs.display(), "bpffs mounted");
            Ok(())
        }
        Cmd::Uninstall => {
            let cfg = cli.config.clone();
            Controller::start(cli.config)?.remove_all()?;
            cfg.installer().uninstall()?;
            info!("podsteer removed from this node");
            Ok(())
        }
        Cmd::Run => {
            // Signals are taken by one thread with sigwait; every other thread inherits the block.
            let signals = block_signals()?;
            let listener = server::bind(&cli.config.socket, server::Socket::Agent)?;
            let sidecars = server::Socket::Sidecars { proxy_uid: cli.config.proxy_uid };
            let sidecar_listener = cli.config.sidecar_socket.as_deref().map(|p| server::bind(p, sidecars)).transpose()?;
            if cli.config.install_cni {
                let installer = cli.config.installer();
                if let Err(e) = installer.install() {
                    tracing::warn!(error = %podsteer_agent::controller::error_chain(&e), "CNI install; the watcher retries when the conf dir changes");
                }
                std::thread::Builder::new().name("cni-watch".into()).spawn(move || {
                    let reinserted = || {
                        podsteer_agent::metrics::metrics().conflist_reinsertions.inc();
                        info!("conflist rewritten by someone else; podsteer-cni entry re-inserted");
                    };
                    if let Err(e) = installer.watch(reinserted) {
                        tracing::error!(error = %podsteer_agent::controller::error_chain(&e), "CNI conf watcher stopped");
                    }
                })?;
            }
            let proxy_listener = cli.config.proxy_socket.as_deref().map(proxy_link::bind).transpose()?;
            let cfg_for_uninstall = cli.config.clone();
            let state = podsteer_agent::state::spawn(Controller::start(cli.config)?)?;
            if let Some(l) = proxy_listener {
                let state = state.clone();
                let identity = podsteer_agent::peer::ProxyIdentity {
                    uid: cfg_for_uninstall.proxy_peer_uid,
                    netns: podsteer_agent::peer::NetnsId::own()?,
                };
                std::thread::Builder::new().name("proxy-link".into()).spawn(move || server::serve_proxies(l, &state, identity))?;
            }
            if let Some(cri) = cfg_for_uninstall.cri_socket.clone() {
                let state = state.clone();
                let every = std::time::Duration::from_secs(cfg_for_uninstall.repair_interval_secs.max(1));
                std::thread::Builder::new()
                    .name("repair".into())
                    .spawn(move || podsteer_agent::repair::run_forever(&state, &cri, every))?;
            }
            let admin = podsteer_agent::admin::spawn(cfg_for_uninstall.admin_addr, state.clone())?;
            info!(%admin, "ready");
            std::thread::Builder::new().name("api".into()).spawn({
                let state = state.clone();
                move || server::serve(listener, state, server::Socket::Agent)
            })?;
            if let Some(l) = sidecar_listener {
                let state = state.clone();
                std::thread::Builder::new().name("sidecar-api".into()).spawn(move || server::serve(l, state, sidecars))?;
            }
            let sig = signals.wait()?;
            if sig == Signal::SIGUSR1 || cfg_for_uninstall.uninstall_on_exit {
                // The explicit uninstall signal; a plain SIGTERM is an upgrade and leaves everything in place.
                info!(signal = ?sig, "uninstalling podsteer from this node");
                state.ask(|reply| Event::RemoveAll { reply })?.map_err(anyhow::Error::msg)?;
                cfg_for_uninstall.installer().uninstall()?;
            } else {
                info!(signal = ?sig, "exiting; interception, pins and the CNI entry stay for the next agent");
            }
            state.ask(|reply| Event::Persist { reply })?;
            Ok(())
        }
    }
}

fn block_signals() -> anyhow::Result<SigSet> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1] {
        set.add(s);
    }
    set.thread_block()?;
    Ok(set)
}
