//! HTTPS: `POST /inject/namespace` and `POST /inject/pod` take an
//! AdmissionReview (see [`crate::decide::Scope`]); `GET /ready` answers the
//! kubelet, `GET /metrics` Prometheus. A body that is no AdmissionReview for a pod gets 400 and a log line.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::SidecarConfig;
use crate::decide::Scope;
use crate::metrics::Metrics;
use crate::review::{Verdict, review};

/// The API server sends objects up to its 3 MiB request limit; past this the
/// body is refused rather than buffered.
const MAX_BODY: usize = 4 << 20;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, sidecar: Arc<SidecarConfig>, metrics: Arc<Metrics>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept");
                // Out of fds the next accept fails at once: pause, not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let (sidecar, metrics) = (sidecar.clone(), metrics.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return warn!(%peer, error = %e, "TLS handshake"),
                Err(_) => return warn!(%peer, "TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |req| handle(req, sidecar.clone(), metrics.clone()));
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                warn!(%peer, error = %e, "connection");
            }
        });
    }
}

async fn handle(req: Request<Incoming>, sidecar: Arc<SidecarConfig>, metrics: Arc<Metrics>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    Ok(match (req.method(), Scope::from_path(&path)) {
        (&Method::GET, None) if path == "/ready" => text(StatusCode::OK, "ready\n"),
        (&Method::GET, None) if path == "/metrics" => text(StatusCode::OK, &metrics.encode()),
        (&Method::POST, Some(scope)) => match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => admit(&body.to_bytes(), scope, &sidecar, &metrics),
            Err(e) => {
                metrics.count("malformed", scope.label());
                bad_request(&path, &format!("reading the body: {e}"))
            }
        },
        (_, Some(_)) => text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn admit(body: &[u8], scope: Scope, sidecar: &SidecarConfig, metrics: &Metrics) -> Response<Full<Bytes>> {
    let reviewed = match review(body, scope, sidecar) {
        Ok(r) => r,
        Err(e) => {
            metrics.count("malformed", scope.label());
            return bad_request(scope.label(), &e.to_string());
        }
    };
    let (uid, pod) = (&reviewed.uid, &reviewed.pod);
    let result = match &reviewed.verdict {
        Verdict::Injected => {
            info!(uid, pod, ?scope, "injected");
            "injected"
        }
        Verdict::Skipped(why) => {
            info!(uid, pod, ?scope, why, "not injected");
            "skipped"
        }
        Verdict::Refused(why) => {
            warn!(uid, pod, ?scope, why, "refused: the patch could not be built");
            "refused"
        }
    };
    metrics.count(result, scope.label());
    match serde_json::to_vec(&reviewed.response) {
        Ok(json) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(json)))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "encoding the response\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("encoding the response: {e}\n")),
    }
}

fn bad_request(what: &str, why: &str) -> Response<Full<Bytes>> {
    warn!(what, error = why, "malformed AdmissionReview");
    text(StatusCode::BAD_REQUEST, &format!("podsteer-injector: {why}\n"))
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r
}
