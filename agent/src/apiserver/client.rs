//! The API client and the thread that drives the watches.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};
use tracing::{info, warn};

use super::ApiSource;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("reading the kubeconfig {0}")]
    Kubeconfig(PathBuf, #[source] kube::config::KubeconfigError),
    #[error("no Kubernetes API configuration (neither in-cluster nor a kubeconfig)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes API client")]
    Client(#[source] kube::Error),
    #[error("starting the Kubernetes API thread")]
    Thread(#[source] std::io::Error),
    #[error("the Kubernetes API thread did not start within {0:?}")]
    Timeout(Duration),
}

async fn config(kubeconfig: Option<&Path>) -> Result<Config, ApiError> {
    match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| ApiError::Kubeconfig(path.into(), e))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(|e| ApiError::Kubeconfig(path.into(), e))
        }
        None => Config::infer().await.map_err(ApiError::Infer),
    }
}

/// Starts the thread; returns once its client is built (or could not be).
pub fn spawn(kubeconfig: Option<&Path>, source: ApiSource, wait: Duration) -> Result<(), ApiError> {
    let kubeconfig = kubeconfig.map(PathBuf::from);
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("kubernetes".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(ApiError::Thread(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let client = match config(kubeconfig.as_deref()).await.and_then(|c| {
                    info!(server = %c.cluster_url, "Kubernetes API");
                    Client::try_from(c).map_err(ApiError::Client)
                }) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(()));
                let pods = super::pods::run(client.clone(), source.pods.clone());
                match source.policies.clone() {
                    Some(p) => {
                        tokio::join!(pods, super::policies::run(client, p));
                    }
                    None => pods.await,
                }
                warn!("the Kubernetes API watches ended");
            });
        })
        .map_err(ApiError::Thread)?;
    rx.recv_timeout(wait).map_err(|_| ApiError::Timeout(wait))?
}

/// Backoff between failed watch attempts: from 500 ms, doubling, at most 30 s.
pub struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Backoff {
        Backoff(Duration::from_millis(500))
    }

    pub fn reset(&mut self) {
        self.0 = Duration::from_millis(500);
    }

    /// Waits the current step (with jitter, so nodes do not retry in step) and doubles it.
    pub async fn wait(&mut self) {
        let jitter = self.0.mul_f64(fastrand::f64() * 0.25);
        tokio::time::sleep(self.0 + jitter).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(30));
    }
}
