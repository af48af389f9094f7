//! The relay between a TCP connection and one HTTP/2 stream: TCP bytes go out
//! as DATA frames as the peer's window allows, DATA frames go into TCP and
//! their window is given back only once written, so a slow reader holds its
//! sender back through HTTP/2 flow control instead of filling memory. A FIN
//! is END_STREAM and back; a reset on either side resets the other.

use std::future::poll_fn;
use std::io;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::net::TcpStream;

use crate::conns::ConnState;
use crate::metrics::Outcome;

/// One read from TCP: a full TLS record's worth of payload (64 KiB measured no better).
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Every tunnel relay on a worker thread reads through this one buffer
    /// (a poll never overlaps another on its thread), and copies out only
    /// what it read.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

/// Writes all of `data` as the socket takes it.
async fn write_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

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
    tcp: &TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    tcp_is_client: bool,
    state: &ConnState,
) -> (Outcome, u64, u64) {
    let ended = poll_fn(|cx| match state.poll_ended(cx.waker()) {
        Some(o) => std::task::Poll::Ready(o),
        None => std::task::Poll::Pending,
    });
    let tcp: &TcpStream = tcp;
    let (mut up, mut down) = (0u64, 0u64);
    let to_stream = async {
        loop {
            // Readiness first, then one read into the thread's scratch
            // buffer: an idle connection holds no buffer of its own.
            tcp.readable().await.map_err(Broke::Tcp)?;
            let read = SCRATCH.with_borrow_mut(|buf| match tcp.try_read(buf) {
                Ok(n) => Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(Broke::Tcp(e)),
            })?;
            let Some(data) = read else { continue };
            if data.is_empty() {
                send.send_data(Bytes::new(), true).map_err(Broke::Stream)?;
                return Ok::<(), Broke>(());
            }
            state.touch();
            up += data.len() as u64;
            send_all(&mut send, data).await.map_err(Broke::Stream)?;
        }
    };
    let to_tcp = async {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(Broke::Stream)?;
            state.touch();
            write_all(tcp, &chunk).await.map_err(Broke::Tcp)?;
            down += chunk.len() as u64;
            recv.flow_control().release_capacity(chunk.len()).map_err(Broke::Stream)?;
        }
        // END_STREAM: a half-close.
        let _ = crate::socket::shutdown_write(std::os::fd::AsFd::as_fd(tcp));
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
