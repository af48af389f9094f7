//! podsteer-proxy entry point: wiring, signals and drain.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use podsteer_proxy::config::ProxyConfig;
use podsteer_proxy::inpod::netns::PodNetns;
use podsteer_proxy::metrics::Metrics;
use podsteer_proxy::pods::{PodRequest, Pods};
use podsteer_proxy::state::State;
use podsteer_proxy::{admin, control};
use tracing::info;

fn main() -> anyhow::Result<()> {
    let cfg = ProxyConfig::parse();
    init_logs(cfg.log_json);
    anyhow::ensure!(cfg.control.is_some() || cfg.sidecar, "give --control SOCKET (shared mode) or --sidecar");
    // Every relayed connection costs two fds; the default soft limit of 1024 would cap a node at ~500.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.workers > 0 {
        rt.worker_threads(cfg.workers);
    }
    let rt = rt.enable_all().thread_name("data").build().context("building the runtime")?;
    let metrics = Arc::new(Metrics::new());
    let pods = Pods::new(rt.handle().clone(), Arc::new(cfg.settings()), metrics.clone());
    let state = Arc::new(State::new(pods, metrics, cfg.control.is_some()));
    let admin = admin::spawn(cfg.admin, state.clone()).with_context(|| format!("admin endpoint {}", cfg.admin))?;
    info!(%admin, "admin endpoint");

    if cfg.sidecar {
        let req = PodRequest { uid: "self".into(), label: "self".into(), outbound_port: cfg.outbound_port, inbound_port: cfg.inbound_port };
        state.with_pods(|p| p.add(req, PodNetns::Current)).context("opening sidecar listeners")?;
        if let Some(uid) = cfg.run_as_uid {
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).context("dropping to the proxy UID")?;
        }
        info!("sidecar listeners open");
    }
    if let Some(socket) = cfg.control.clone() {
        let st = state.clone();
        std::thread::Builder::new().name("control".into()).spawn(move || control::run(&socket, &st))?;
    }
    let drain = Duration::from_millis(cfg.drain_timeout_ms);
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {
                info!("SIGTERM: closing listeners and draining");
                state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                state.with_pods(|p| p.remove_all());
            }
            _ = tokio::signal::ctrl_c() => state.with_pods(|p| p.remove_all()),
            _ = state.drained.notified() => {}
        }
        wait_for_connections(&state, drain).await;
        anyhow::Ok(())
    })?;
    info!("drained; exiting");
    Ok(())
}

/// Waits until no connection is active, or the drain timeout passed.
async fn wait_for_connections(state: &State, deadline: Duration) {
    let end = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < end && state.metrics.encode().lines().any(|l| l.starts_with("podsteer_proxy_connections_active{") && !l.ends_with(" 0")) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colour only for a terminal: logs usually land in files and collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json { b.json().init() } else { b.init() }
}
