//! The relay between a TCP connection and one HTTP/2 stream: TCP bytes go out
//! as DATA frames as the peer's window allows, DATA frames go into TCP and
//! their window is given back only once written, so a slow reader holds its
//! sender back through HTTP/2 flow control instead of filling memory. A FIN
//! is END_STREAM and back; a reset on either side resets the other.
//!
//! Both directions are one small hand-written future ([`Relay`]): an idle
//! tunnelled connection holds it, its socket and its stream, and nothing else
//! (two `async` loops joined took about 1 KiB more on each side).

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::net::TcpStream;

use crate::conns::ConnState;
use crate::metrics::Outcome;

/// One read from TCP, sized so that the DATA frame it becomes (a 9-byte
/// header and the payload) fills whole TLS records (16 KiB of plaintext
/// each): 16 KiB of payload made a full record and a 9-byte one.
const READ_CHUNK: usize = 4 * TLS_RECORD - H2_FRAME_HEADER;
const TLS_RECORD: usize = 16 * 1024;
const H2_FRAME_HEADER: usize = 9;

thread_local! {
    /// Every tunnel relay on a worker thread reads through this one buffer
    /// (a poll never overlaps another on its thread), and copies out only
    /// what it read.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
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
    send: SendStream<Bytes>,
    recv: RecvStream,
    tcp_is_client: bool,
    state: &ConnState,
) -> (Outcome, u64, u64) {
    let mut r = Relay {
        tcp,
        state,
        send,
        recv,
        to_send: Bytes::new(),
        to_write: Bytes::new(),
        writing: 0,
        up: 0,
        down: 0,
        up_ended: false,
        down_ended: false,
    };
    let end = poll_fn(|cx| r.poll(cx)).await;
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
    (outcome, r.up, r.down)
}

struct Relay<'a> {
    tcp: &'a TcpStream,
    state: &'a ConnState,
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Read from TCP, waiting for the peer's window.
    to_send: Bytes,
    /// The rest of a DATA chunk being written to TCP; `writing` is the whole
    /// chunk's size, whose window goes back once all of it is written.
    to_write: Bytes,
    writing: usize,
    /// Bytes TCP→stream and stream→TCP.
    up: u64,
    down: u64,
    /// TCP's FIN went on as END_STREAM; END_STREAM went on as a FIN.
    up_ended: bool,
    down_ended: bool,
}

impl Relay<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        if let Some(o) = self.state.poll_ended(cx.waker()) {
            return Poll::Ready(End::Swept(o));
        }
        // The first error ends both directions; one that ended waits for the other.
        if !self.up_ended
            && let Poll::Ready(Err(b)) = self.poll_up(cx)
        {
            return Poll::Ready(End::Done(Err(b)));
        }
        if !self.down_ended
            && let Poll::Ready(Err(b)) = self.poll_down(cx)
        {
            return Poll::Ready(End::Done(Err(b)));
        }
        if self.up_ended && self.down_ended { Poll::Ready(End::Done(Ok(()))) } else { Poll::Pending }
    }

    /// TCP into the stream, as the peer's window allows, until TCP would
    /// block, the window is shut, or TCP's FIN went on as END_STREAM.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Broke>> {
        loop {
            if !self.to_send.is_empty() {
                self.send.reserve_capacity(self.to_send.len());
                let cap = match ready!(self.send.poll_capacity(cx)) {
                    Some(c) => c.map_err(Broke::Stream)?,
                    None => return Poll::Ready(Err(Broke::Stream(h2::Error::from(Reason::CANCEL)))),
                };
                if cap > 0 {
                    let chunk = self.to_send.split_to(cap.min(self.to_send.len()));
                    self.send.send_data(chunk, false).map_err(Broke::Stream)?;
                }
                continue;
            }
            // Readiness first, then one read into the thread's scratch
            // buffer: an idle connection holds no buffer of its own.
            ready!(self.tcp.poll_read_ready(cx)).map_err(Broke::Tcp)?;
            let read = SCRATCH.with_borrow_mut(|buf| match crate::socket::read_draining(self.tcp, buf) {
                Ok(n) => Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(Broke::Tcp(e)),
            })?;
            let Some(data) = read else { continue };
            if data.is_empty() {
                self.send.send_data(Bytes::new(), true).map_err(Broke::Stream)?;
                self.up_ended = true;
                return Poll::Ready(Ok(()));
            }
            self.state.touch();
            self.up += data.len() as u64;
            self.to_send = data;
        }
    }

    /// The stream's DATA into TCP, each chunk's window given back once it is
    /// written, until either would block or END_STREAM went on as a FIN.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Broke>> {
        loop {
            if !self.to_write.is_empty() {
                ready!(self.tcp.poll_write_ready(cx)).map_err(Broke::Tcp)?;
                match self.tcp.try_write(&self.to_write) {
                    Ok(n) => self.to_write.advance(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(Broke::Tcp(e))),
                }
                if !self.to_write.is_empty() {
                    continue;
                }
                self.down += self.writing as u64;
                self.recv.flow_control().release_capacity(self.writing).map_err(Broke::Stream)?;
                self.writing = 0;
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(chunk) => {
                    let chunk = chunk.map_err(Broke::Stream)?;
                    self.state.touch();
                    self.writing = chunk.len();
                    if chunk.is_empty() {
                        continue;
                    }
                    self.to_write = chunk;
                }
                None => {
                    // END_STREAM: a half-close.
                    let _ = crate::socket::shutdown_write(std::os::fd::AsFd::as_fd(self.tcp));
                    self.down_ended = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}
