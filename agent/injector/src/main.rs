//! podsteer-injector entry point.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use podsteer_injector::config::InjectorConfig;
use tracing::info;

fn main() -> anyhow::Result<()> {
    let cfg = InjectorConfig::parse();
    podsteer_proto::logs::init(cfg.log_json);
    let tls = podsteer_injector::tls::server_config(&cfg.tls_cert, &cfg.tls_key).context("loading the webhook certificate")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("building the runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("listening on {}", cfg.listen))?;
        info!(listen = %listener.local_addr()?, image = cfg.sidecar.proxy_image, native_sidecars = cfg.sidecar.native_sidecars, "injector ready");
        let metrics = Arc::new(podsteer_injector::metrics::Metrics::default());
        let serve = podsteer_injector::server::serve(listener, tls, Arc::new(cfg.sidecar), metrics);
        tokio::select! {
            _ = serve => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
            r = terminate() => r,
        }
    })
}

/// SIGTERM, as the kubelet stops a pod: in-flight reviews are short, and the
/// API server retries on failure, so no drain is needed.
async fn terminate() -> anyhow::Result<()> {
    let mut s = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    s.recv().await;
    info!("SIGTERM: stopping");
    Ok(())
}
