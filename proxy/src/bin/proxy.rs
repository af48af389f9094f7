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
use podsteer_proxy::{admin, control, sidecar_mesh};
use tracing::info;

fn main() -> anyhow::Result<()> {
    let cfg = ProxyConfig::parse();
    podsteer_proxy::logs::init(cfg.log_json);
    anyhow::ensure!(cfg.control.is_some() || cfg.sidecar, "give --control SOCKET (shared mode) or --sidecar");
    raise_fd_limit()?;
    // A sidecar drops to its UID first, while it is the only thread: the
    // capabilities it keeps (see `privileges`) are then every thread's. Its
    // registrations with the agent go on streams it connected as root, one
    // per inbound listener, and so does its first ask for its mesh identity.
    let mut agent_streams = Vec::new();
    if cfg.sidecar
        && let Some(uid) = cfg.run_as_uid
    {
        if let (Some(sock), Some(_)) = (&cfg.agent_socket, &cfg.pod_uid) {
            for _ in 0..3 {
                agent_streams.push(podsteer_proto::api::connect(sock).context("connecting to the agent socket")?);
            }
        }
        let kept = podsteer_proxy::privileges::drop_to(uid).context("dropping to the proxy UID")?;
        info!(uid, kept_network_capabilities = kept, "dropped to the proxy UID");
    }
    // One worker means a current-thread runtime: no work-stealing handoffs, and
    // the thread that runs main drives every connection (the sidecar shape).
    let mut rt = if cfg.workers == 1 { tokio::runtime::Builder::new_current_thread() } else { tokio::runtime::Builder::new_multi_thread() };
    if cfg.workers > 1 {
        rt.worker_threads(cfg.workers);
    }
    let rt = rt.enable_all().thread_name("data").build().context("building the runtime")?;
    let metrics = Arc::new(Metrics::new());
    let settings = Arc::new(cfg.settings());
    metrics.set_limits(&settings);
    let hbone = Arc::new(podsteer_proxy::hbone::Node::default());
    rt.spawn(podsteer_proxy::hbone::pool::sweeper(hbone.pool.clone(), podsteer_proxy::hbone::pool::IDLE));
    let pods = Pods::new(rt.handle().clone(), settings, metrics.clone(), hbone);
    let state = Arc::new(State::new(pods, metrics));
    let admin = admin::spawn(cfg.admin, state.clone()).with_context(|| format!("admin endpoint {}", cfg.admin))?;
    info!(%admin, "admin endpoint");

    if cfg.sidecar {
        // Meshed: the pod's certificate, the view and the policies come
        // before any listener opens. Without an agent socket: plaintext.
        let meshed = match (&cfg.agent_socket, &cfg.pod_uid) {
            (Some(sock), Some(uid)) => {
                let stream = match agent_streams.pop() {
                    Some(s) => s,
                    None => podsteer_proto::api::connect(sock)?,
                };
                sidecar_mesh::first(stream, sock.clone(), uid, &state).context("asking the agent for the pod's mesh identity")?
            }
            _ => None,
        };
        // A meshed sidecar's metrics and logs name its pod, as the shared proxy's do.
        let (label, tls, namespace, labels, feed) = match meshed {
            Some(m) => (format!("{}/{}", m.namespace, m.name), Some(m.tls), m.namespace, m.labels, Some(m.feed)),
            None => ("self".into(), None, String::new(), Default::default(), None),
        };
        // With an agent socket this is eBPF mode, where sk_msg may feed the
        // pod's sockets: no splice(2) until the agent says it does not.
        let req = PodRequest {
            uid: "self".into(),
            label,
            outbound_port: cfg.outbound_port,
            inbound_port: cfg.inbound_port,
            splice_allowed: cfg.agent_socket.is_none(),
            // Decided below, once the sidecar's privileges are settled.
            keep_client_address: false,
            kept: Vec::new(),
            tls,
            namespace,
            labels,
        };
        let listeners = state.with_pods(|p| p.add(req, PodNetns::Current)).context("opening sidecar listeners")?;
        if let (Some(sock), Some(uid)) = (&cfg.agent_socket, &cfg.pod_uid) {
            let mut sk_msg = false;
            for (id, fd) in listeners.iter().filter(|(id, _)| id.inbound) {
                let family = id.family;
                let stream = match agent_streams.pop() {
                    Some(s) => s,
                    None => podsteer_proto::api::connect(sock)?,
                };
                sk_msg |= register_listener(stream, uid, family, fd)
                    .with_context(|| format!("registering the inbound listener (family {family}) with the agent"))?;
            }
            if !sk_msg {
                state.with_pods(|p| p.allow_splice("self"));
            }
        }
        // The app sees its clients' addresses when this sidecar may connect
        // from them (CAP_NET_ADMIN or CAP_NET_RAW, kept across the UID switch)
        // and the agent gave the pod the way back.
        let keep = podsteer_proxy::socket::return_path_ready();
        state.with_pods(|p| p.keep_client_address("self", keep));
        if let Some(feed) = feed {
            let st = state.clone();
            std::thread::Builder::new().name("mesh-feed".into()).spawn(move || sidecar_mesh::poll(feed, st))?;
        }
        state.serving.store(true, std::sync::atomic::Ordering::Relaxed);
        info!(keep_client_address = keep, "sidecar listeners open");
    }
    if let Some(socket) = cfg.control.clone() {
        let st = state.clone();
        std::thread::Builder::new().name("control".into()).spawn(move || control::run(&socket, &st))?;
    }
    let drain = Duration::from_millis(cfg.drain_timeout_ms);
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let end = tokio::select! {
            _ = term.recv() => {
                // Stop, not hand over: the next proxy may start only after this
                // one exits. Outbound accepts end first; inbound ones go on until
                // the outbound connections in flight are done, since one to a pod
                // on this node needs this proxy to accept its inbound leg too.
                info!("SIGTERM: closing outbound listeners, then inbound, and draining");
                state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                state.with_pods(|p| p.stop_outbound());
                let end = tokio::time::Instant::now() + drain;
                wait_until_done(&state.metrics.live_outbound, end).await;
                state.with_pods(|p| p.remove_all());
                end
            }
            _ = tokio::signal::ctrl_c() => {
                state.with_pods(|p| p.remove_all());
                tokio::time::Instant::now() + drain
            }
            _ = state.drained.notified() => tokio::time::Instant::now() + drain,
        };
        wait_until_done(&state.metrics.live, end).await;
        anyhow::Ok(())
    })?;
    info!("drained; exiting");
    Ok(())
}

/// Hands one inbound listener to the agent: one JSON request line on its
/// socket with the fd attached (SCM_RIGHTS), one JSON answer line back, which
/// says whether sk_msg feeds the pod's sockets.
fn register_listener(stream: std::os::unix::net::UnixStream, uid: &str, family: u16, fd: &std::os::fd::OwnedFd) -> anyhow::Result<bool> {
    use podsteer_proto::api::{Request, call_on};
    use std::os::fd::AsFd as _;
    let req = Request::RegisterListener { uid: uid.into(), family };
    let data = call_on(stream, &req, Duration::from_secs(5), Some(fd.as_fd()))?
        .into_result()
        .map_err(|e| anyhow::anyhow!("agent refused: {e}"))?;
    // An agent that does not say is treated as feeding them: copying is always correct.
    Ok(data["sk_msg"].as_bool().unwrap_or(true))
}

/// Every relayed connection costs two fds; the usual soft limit of 1024 would cap
/// a node at ~500 connections. As root the hard limit goes up to fs.nr_open too.
fn raise_fd_limit() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    if nr_open > 0 && setrlimit(Resource::RLIMIT_NOFILE, nr_open, nr_open).is_ok() {
        return Ok(());
    }
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

/// Waits until `live` counts no connection, or `end`.
async fn wait_until_done(live: &prometheus_client::metrics::gauge::Gauge, end: tokio::time::Instant) {
    while tokio::time::Instant::now() < end && live.get() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
