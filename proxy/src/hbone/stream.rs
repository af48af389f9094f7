//! The relay between a TCP connection and one HTTP/2 stream: TCP bytes go out
//! as DATA frames as the peer's window allows, DATA frames go into TCP and
//! their window is given back only once written, so a slow reader holds its
//! sender back through HTTP/2 flow control instead of filling memory. A FIN
//! is END_STREAM and back; a reset on either side resets the other.

use std::future::poll_fn;
use std::io;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::conns::ConnState;
use crate::metrics::Outcome;

/// One read from TCP: a full TLS record's worth of payload.
const READ_CHUNK: usize = 16 * 1024;

enum End {
    Done(Result<(), Broke>),
    /// Timed out or drained by the pod's sweeper.
    Swept(Outcome),
}

/// Which end a relay failure came from.
enum Broke {
    Tcp(io::Error),
    Stream(h2::Error),
}

/// Relays until both directions have ended; the bytes each way for the access log.
/// `tcp_is_client`: the TCP side is the app's client (outbound), else the app.
pub async fn relay(
    tcp: &mut TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    tcp_is_client: bool,
    state: &ConnState,
) -> (Outcome, u64, u64) {
    let ended = poll_fn(|cx| match state.poll_ended(cx.waker()) {
        Some(o) => std::task::Poll::Ready(o),
        None => std::task::Poll::Pending,
    });
    let (mut r, mut w) = tcp.split();
    let (mut up, mut down) = (0u64, 0u64);
    let to_stream = async {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = r.read(&mut buf).await.map_err(Broke::Tcp)?;
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(Broke::Stream)?;
                return Ok::<(), Broke>(());
            }
            state.touch();
            send_all(&mut send, Bytes::copy_from_slice(&buf[..n])).await.map_err(Broke::Stream)?;
            up += n as u64;
        }
    };
    let to_tcp = async {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(Broke::Stream)?;
            state.touch();
            w.write_all(&chunk).await.map_err(Broke::Tcp)?;
            down += chunk.len() as u64;
            recv.flow_control().release_capacity(chunk.len()).map_err(Broke::Stream)?;
        }
        // END_STREAM: a half-close.
        let _ = w.shutdown().await;
        Ok::<(), Broke>(())
    };
    // The first error ends both directions; so does the sweeper (idle, drain).
    let end = tokio::select! {
        r = async { tokio::try_join!(to_stream, to_tcp) } => End::Done(r.map(|_| ())),
        o = ended => End::Swept(o),
    };
    let outcome = match end {
        End::Done(Ok(())) => Outcome::Ok,
        End::Swept(o) => {
            let _ = crate::socket::set_reset_on_close(std::os::fd::AsFd::as_fd(tcp));
            o
        }
        End::Done(Err(b)) => {
            let tcp_broke = matches!(b, Broke::Tcp(_));
            match &b {
                Broke::Tcp(e) => tracing::debug!(error = %e, "TCP side of a tunnel broke"),
                Broke::Stream(e) => tracing::debug!(error = %e, "HTTP/2 side of a tunnel broke"),
            }
            // A reset goes on as a reset: the TCP side's here, the stream's
            // (RST_STREAM CANCEL) as its handles drop unfinished.
            let _ = crate::socket::set_reset_on_close(std::os::fd::AsFd::as_fd(tcp));
            // The client's side broke, or the upstream's.
            if tcp_broke == tcp_is_client { Outcome::ClientDisconnected } else { Outcome::BackendDisconnected }
        }
    };
    (outcome, up, down)
}

/// Sends `data` as the peer's window opens.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(c) => c?,
            None => return Err(h2::Error::from(Reason::CANCEL)),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, false)?;
    }
    Ok(())
}
