//! The HBONE listener on port 15008 inside each meshed pod's netns. A
//! connection must complete mutual TLS 1.3 with a client certificate chained
//! to the trust bundle and naming a SPIFFE ID in the trust domain; each
//! CONNECT stream on it is one connection to the app, made (from the source
//! pod's address, where the return path allows) before the stream is answered:
//! 200 once the app accepted, 400 for a request that is not a CONNECT to this
//! pod, 503 when the app cannot be reached.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use podsteer_identity::spiffe::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{Instrument as _, debug, warn};

use crate::metrics::{ClosedLabels, ConnLabels, Direction, Metrics, Outcome};
use crate::relay::{PodCtx, Settings};

/// Where a meshed pod's HBONE listeners bind, in its netns.
pub fn addresses() -> [SocketAddr; 2] {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    [
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), super::HBONE_PORT),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), super::HBONE_PORT),
    ]
}

/// Accepts until the pod stops; each TLS connection runs on its own task.
pub async fn accept_loop(l: TcpListener, pod: Arc<PodCtx>, s: Arc<Settings>, m: Arc<Metrics>) {
    let mut stop: watch::Receiver<bool> = pod.stopping.clone();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                if *stop.borrow() { break; }
            }
            r = l.accept() => match r {
                Ok((conn, from)) => {
                    let span = tracing::info_span!("hbone", pod = %pod.label, from = %from);
                    tokio::spawn(serve_conn(conn, pod.clone(), s.clone(), m.clone()).instrument(span));
                }
                Err(e) => {
                    warn!(pod = %pod.label, error = %e, "HBONE accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Counted as live for its whole life, so a draining proxy waits for its
/// HBONE connections to close gracefully, not only for their streams.
async fn serve_conn(tcp: TcpStream, pod: Arc<PodCtx>, s: Arc<Settings>, m: Arc<Metrics>) {
    m.conn_accepted(crate::metrics::Direction::Inbound);
    serve_conn_counted(tcp, pod, s, &m).await;
    m.conn_done(crate::metrics::Direction::Inbound);
}

async fn serve_conn_counted(tcp: TcpStream, pod: Arc<PodCtx>, s: Arc<Settings>, m: &Arc<Metrics>) {
    let (Ok(from), Ok(local)) = (tcp.peer_addr(), tcp.local_addr()) else { return };
    // HTTP/2 frames are small and each waits for an answer: no Nagle.
    let _ = tcp.set_nodelay(true);
    let Some(tls) = pod.tls.clone() else { return };
    // Before the trust is read, so a change after it is not missed.
    let mut trust_changed = pod.hbone.mesh.trust_changed();
    let Some(trust) = pod.hbone.mesh.get().trust.clone() else {
        warn!("HBONE before the agent sent a trust bundle; refused");
        return;
    };
    let config = match trust.server_config(tls.cert.clone()) {
        Ok(c) => c,
        Err(e) => return warn!(error = %e, "HBONE server configuration"),
    };
    let tls_stream = match tokio::time::timeout(
        s.connect_timeout,
        tokio_rustls::TlsAcceptor::from(config).accept(super::read_ahead::ReadAhead::new(tcp)),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            m.hbone_refused.inc();
            return warn!(error = %podsteer_proto::error_chain(&e), "HBONE handshake refused");
        }
        Err(_) => {
            m.hbone_refused.inc();
            return warn!("HBONE handshake timed out");
        }
    };
    // The verifier accepted exactly one SPIFFE ID in the trust domain.
    let peer = match tls_stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(podsteer_identity::tls::spiffe_id_of) {
        Some(Ok(id)) => id,
        _ => return warn!("HBONE peer without an identity"),
    };
    let mut h2 = match h2::server::Builder::new()
        .initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .handshake::<_, Bytes>(tls_stream)
        .await
    {
        Ok(c) => c,
        Err(e) => return debug!(error = %e, "HBONE HTTP/2 preface"),
    };
    debug!(%peer, "HBONE connection accepted");
    let peer = Arc::new(peer);
    let mut stopping = pod.stopping.clone();
    let mut shutting = false;
    loop {
        let next = tokio::select! {
            next = h2.accept() => next,
            // Verified with a trust that is no more, or the pod is going (or
            // this proxy hands over): no new streams here, the client dials
            // anew (verified against the new trust, or reaching the next
            // proxy on the same kept listener); the streams under way finish.
            r = trust_changed.changed(), if !shutting => {
                debug!(trust_changed = r.is_ok(), "shutting this HBONE connection down gracefully");
                h2.graceful_shutdown();
                shutting = true;
                continue;
            }
            r = stopping.changed(), if !shutting => {
                if r.is_err() || *stopping.borrow() {
                    debug!("pod stopping; shutting this HBONE connection down gracefully");
                    h2.graceful_shutdown();
                    shutting = true;
                }
                continue;
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok((req, respond)) => {
                let span = tracing::info_span!("stream", peer = %peer);
                tokio::spawn(
                    serve_stream(req, respond, Peer { id: peer.clone(), addr: from, local }, pod.clone(), s.clone(), m.clone())
                        .instrument(span),
                );
            }
            Err(e) => {
                debug!(error = %e, "HBONE connection ended");
                break;
            }
        }
    }
}

/// Who a stream came from: the identity its TLS connection proved, and the address.
struct Peer {
    /// Shared by every stream of the connection.
    id: Arc<SpiffeId>,
    addr: SocketAddr,
    /// The pod address the tunnel reached.
    local: SocketAddr,
}

async fn serve_stream(
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: Peer,
    pod: Arc<PodCtx>,
    s: Arc<Settings>,
    m: Arc<Metrics>,
) {
    let dir = Direction::Inbound;
    let labels = ConnLabels { pod: pod.label.clone(), direction: dir };
    pod.serving.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    m.conn_accepted(dir);
    m.opened.get_or_create(&labels).inc();
    m.active.get_or_create(&labels).inc();
    let started = Instant::now();
    let (head, body) = req.into_parts();
    let target = target(&head, &peer, &pod);
    // Its headers are read: freed now, not held (with the HPACK buffer their
    // values point into) for the life of a stream that may idle for hours.
    drop(head);
    let target_text = target.as_ref().map(|t| t.to_string()).unwrap_or_default();
    let (mut policy, mut reason) = (None, String::new());
    let judged = target.as_ref().ok().map(|t| {
        let c = podsteer_authz::eval::Conn {
            source: Some(SpiffeId::clone(&peer.id)),
            source_ip: peer.addr.ip().to_canonical(),
            dest_ip: t.ip().to_canonical(),
            dest_port: t.port(),
        };
        let verdict = pod.policy.check(&pod.hbone.policies, &c, &pod.label, pod.tls.as_ref().map(|t| &t.id), &m);
        (c, verdict)
    });
    let (outcome, up, down) = match (target, judged) {
        (Err((status, why)), _) => {
            debug!(status = status.as_u16(), why, "HBONE request refused");
            answer(respond, status);
            (Outcome::BadRequest, 0, 0)
        }
        (Ok(_), Some((_, Err(denial)))) => {
            // As ztunnel answers a denied stream.
            answer(respond, StatusCode::UNAUTHORIZED);
            (policy, reason) = (denial.policy, denial.reason);
            (Outcome::PolicyDenied, 0, 0)
        }
        // Boxed: a transient state, and the task is as large as its largest
        // state for the stream's whole life.
        (Ok(t), judged) => match Box::pin(crate::relay::connect(t, Some(peer.addr), &pod, &s, &m, dir)).await {
            Err(e) => {
                debug!(error = %e, target = %t, "app unreachable");
                answer(respond, StatusCode::SERVICE_UNAVAILABLE);
                (Outcome::ConnectFailed, 0, 0)
            }
            Ok(app) => {
                let _ = app.set_nodelay(true);
                match ok(respond) {
                    None => (Outcome::ClientDisconnected, 0, 0),
                    Some(send) => {
                        let state = pod.conns.open_checked(dir, judged.map(|(c, _)| c));
                        let (o, app_to_client, client_to_app) = super::stream::relay(&app, send, body, false, &state).await;
                        m.bytes_from_client.get_or_create(&labels).inc_by(client_to_app);
                        m.bytes_to_client.get_or_create(&labels).inc_by(app_to_client);
                        (o, client_to_app, app_to_client)
                    }
                }
            }
        },
    };
    m.active.get_or_create(&labels).dec();
    m.closed.get_or_create(&ClosedLabels { pod: pod.label.clone(), direction: dir, result: outcome }).inc();
    crate::access::Access {
        client: peer.addr.to_string(),
        original_dst: target_text,
        peer_identity: peer.id.to_string(),
        policy,
        reason,
        bytes_from_client: up,
        bytes_to_client: down,
    }
    .log(&pod, dir, started, outcome);
    pod.serving.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    pod.forget_if_done(&m);
    m.conn_done(dir);
}

/// The app address a CONNECT asks for, if it is one this tunnel may reach.
fn target(req: &http::request::Parts, peer: &Peer, pod: &PodCtx) -> Result<SocketAddr, (StatusCode, &'static str)> {
    if req.method != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "not a CONNECT"));
    }
    let t: SocketAddr =
        req.uri.authority().and_then(|a| a.as_str().parse().ok()).ok_or((StatusCode::BAD_REQUEST, ":authority is not an IP:port"))?;
    if t.ip().to_canonical() != peer.local.ip().to_canonical() {
        return Err((StatusCode::BAD_REQUEST, "the target is not the address this tunnel reached"));
    }
    if [super::HBONE_PORT, pod.inbound_port, pod.outbound_port].contains(&t.port()) {
        return Err((StatusCode::BAD_REQUEST, "the target is one of the proxy's own ports"));
    }
    Ok(t)
}

fn status(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

fn answer(mut respond: SendResponse<Bytes>, code: StatusCode) {
    let _ = respond.send_response(status(code), true);
}

fn ok(mut respond: SendResponse<Bytes>) -> Option<h2::SendStream<Bytes>> {
    respond.send_response(status(StatusCode::OK), false).ok()
}
