//! Outbound HBONE: one TLS connection per (source pod, destination identity,
//! destination address), many CONNECT streams on it. A key dials once at a
//! time (concurrent first connections wait for that dial rather than each
//! making its own), a connection that broke is dialled anew, and one with no
//! stream for the idle time is closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use podsteer_identity::spiffe::SpiffeId;
use podsteer_identity::tls::Trust;
use tracing::{debug, info};

use super::mesh::PodTls;
use crate::metrics::Metrics;
use crate::relay::{PodCtx, Settings};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// The source pod's UID: its connections leave from its own netns and address.
    pub pod: String,
    pub dst_id: SpiffeId,
    /// The destination pod's HBONE address.
    pub dst: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no trust bundle from the agent yet")]
    NoTrust,
    #[error("dialling {0}")]
    Dial(SocketAddr, #[source] std::io::Error),
    #[error("mTLS with {0}")]
    Tls(SocketAddr, #[source] std::io::Error),
    #[error("{0} did not negotiate h2")]
    NoH2(SocketAddr),
    #[error("HTTP/2 with {0}")]
    H2(SocketAddr, #[source] h2::Error),
    #[error("a CONNECT to {0}")]
    Request(SocketAddr, #[source] http::Error),
    #[error("{0}: a fresh connection failed as the pooled one had")]
    Retried(SocketAddr),
    #[error("{0} answered the CONNECT with {1}")]
    Status(SocketAddr, http::StatusCode),
}

struct Pooled {
    send: SendRequest<Bytes>,
    /// When the first of the two certificates it was made with expires: no
    /// new stream after that, so a renewal or a root rotation reaches every
    /// connection within a certificate's life.
    expires: std::time::SystemTime,
    /// The trust it was verified with: a new bundle (a root removed, say)
    /// gets its new streams a new connection, verified against it.
    trust: Arc<Trust>,
    streams: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

/// How long a pooled connection with no stream stays open.
pub const IDLE: Duration = Duration::from_secs(10);

type Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

#[derive(Default)]
pub struct Pool {
    slots: Mutex<HashMap<Key, Slot>>,
}

/// An open tunnel stream; the guard keeps its connection counted as busy.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    _busy: Busy,
}

struct Busy {
    streams: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    /// A CONNECT stream to `target` through the pooled connection of `key`,
    /// answered 200 by the destination's proxy.
    pub async fn open(
        &self,
        key: Key,
        target: SocketAddr,
        route: (&PodTls, &Arc<Trust>),
        pod: &PodCtx,
        s: &Settings,
        m: &Metrics,
    ) -> Result<Tunnel, TunnelError> {
        let (tls, trust) = route;
        let slot = self.slots.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().clone();
        // A connection found closed is dialled again, once.
        for attempt in 0..2 {
            let (send, busy) = {
                let mut g = slot.lock().await;
                if g.as_ref().is_none_or(|p| {
                    attempt > 0 || is_closed(&p.send) || std::time::SystemTime::now() >= p.expires || !Arc::ptr_eq(&p.trust, trust)
                }) {
                    m.hbone_dials.inc();
                    // Boxed: the TLS handshake's state is large and needed only
                    // while dialling, not for the life of every stream's task.
                    *g = Some(Box::pin(self.dial(&key, pod, tls, trust, s)).await?);
                }
                let p = g.as_ref().expect("just filled");
                p.streams.fetch_add(1, Ordering::AcqRel);
                (p.send.clone(), Busy { streams: p.streams.clone(), last_used: p.last_used.clone() })
            };
            let mut send = match send.ready().await {
                Ok(s) => s,
                Err(e) if attempt == 0 => {
                    debug!(error = %e, dst = %key.dst, "pooled connection gone; dialling again");
                    continue;
                }
                Err(e) => return Err(TunnelError::H2(key.dst, e)),
            };
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(target.to_string())
                .version(http::Version::HTTP_2)
                .body(())
                .map_err(|e| TunnelError::Request(key.dst, e))?;
            // A stream the peer refused unprocessed (it is shutting the
            // connection down: its trust changed, say) goes on a new one.
            let sent = send.send_request(req, false);
            let resp = match sent {
                Ok((resp, stream)) => resp.await.map(|r| (r, stream)),
                Err(e) => Err(e),
            };
            let (resp, stream) = match resp {
                Ok(r) => r,
                Err(e) if attempt == 0 && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)) => {
                    debug!(error = %e, dst = %key.dst, "stream refused unprocessed; dialling again");
                    continue;
                }
                Err(e) => return Err(TunnelError::H2(key.dst, e)),
            };
            if resp.status() != http::StatusCode::OK {
                return Err(TunnelError::Status(key.dst, resp.status()));
            }
            return Ok(Tunnel { send: stream, recv: resp.into_body(), _busy: busy });
        }
        Err(TunnelError::Retried(key.dst))
    }

    async fn dial(&self, key: &Key, pod: &PodCtx, tls: &PodTls, trust: &Arc<Trust>, s: &Settings) -> Result<Pooled, TunnelError> {
        let dst = key.dst;
        let tcp = crate::relay::dial(dst, None, pod, s).await.map_err(|e| TunnelError::Dial(dst, e))?;
        let config =
            trust.client_config(tls.cert.clone(), key.dst_id.clone()).map_err(|e| TunnelError::Tls(dst, std::io::Error::other(e)))?;
        let name = rustls_pki_types::ServerName::IpAddress(dst.ip().into());
        let handshake = tokio_rustls::TlsConnector::from(config).connect(name, super::read_ahead::ReadAhead::new(tcp));
        let tls_stream = match tokio::time::timeout(s.connect_timeout, handshake).await {
            Ok(r) => r.map_err(|e| TunnelError::Tls(dst, e))?,
            Err(_) => return Err(TunnelError::Tls(dst, std::io::ErrorKind::TimedOut.into())),
        };
        if tls_stream.get_ref().1.alpn_protocol() != Some(podsteer_identity::tls::ALPN_H2) {
            return Err(TunnelError::NoH2(dst));
        }
        let peer_cert = tls_stream.get_ref().1.peer_certificates().and_then(|c| c.first());
        let own_cert = tls.cert.get();
        let expires = [peer_cert, own_cert.end_entity_cert().ok()]
            .into_iter()
            .map(|c| c.and_then(|c| podsteer_identity::tls::not_after_of(c).ok()).unwrap_or(std::time::SystemTime::UNIX_EPOCH))
            .min()
            .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME)
            .handshake(tls_stream)
            .await
            .map_err(|e| TunnelError::H2(dst, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, %dst, "HBONE connection ended");
            }
        });
        info!(%dst, peer = %key.dst_id, "HBONE connection open");
        Ok(Pooled { send, expires, trust: trust.clone(), streams: Arc::default(), last_used: Arc::new(Mutex::new(Instant::now())) })
    }

    /// Closes connections idle for `idle` and forgets broken ones; how many went.
    pub fn sweep(&self, idle: Duration) -> usize {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let before = slots.len();
        slots.retain(|_, slot| {
            // One being dialled or used right now stays.
            let Ok(g) = slot.try_lock() else { return true };
            g.as_ref().is_some_and(|p| {
                !is_closed(&p.send)
                    && (p.streams.load(Ordering::Acquire) > 0 || std::time::SystemTime::now() < p.expires)
                    && (p.streams.load(Ordering::Acquire) > 0 || p.last_used.lock().unwrap_or_else(|e| e.into_inner()).elapsed() < idle)
            })
        });
        before - slots.len()
    }

    /// A removed pod's connections close (their streams end with it).
    pub fn forget_pod(&self, uid: &str) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.pod != uid);
    }

    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether the connection behind `send` has ended (a GOAWAY or a broken link).
fn is_closed(send: &SendRequest<Bytes>) -> bool {
    let mut s = send.clone();
    let waker = std::task::Waker::noop();
    matches!(s.poll_ready(&mut std::task::Context::from_waker(waker)), std::task::Poll::Ready(Err(_)))
}

/// Sweeps every pool entry idle for `idle`, until the proxy ends.
pub async fn sweeper(pool: Arc<Pool>, idle: Duration) {
    let mut tick = tokio::time::interval(idle / 2);
    loop {
        tick.tick().await;
        let closed = pool.sweep(idle);
        if closed > 0 {
            debug!(closed, "idle HBONE connections closed");
        }
    }
}
