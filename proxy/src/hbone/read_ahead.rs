//! Socket reads in batches under TLS. rustls asks its socket for at most
//! 4 KiB a read, so a bulk tunnel paid five `recvmsg` calls (and as many
//! buffer resizes) for every 16 KiB record. Here a read that fills what
//! rustls asked for (more is surely queued) switches the connection to
//! batches of [`BATCH`] bytes; a batch that was short (the peer is not
//! streaming) is freed once drained, so request/response traffic and idle
//! connections read straight through and hold no buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One batched socket read: four full TLS records.
pub const BATCH: usize = 64 * 1024;
/// A batch shorter than one full record says the peer is not streaming.
const STREAMING: usize = 16 * 1024;

pub struct ReadAhead<T> {
    io: T,
    /// Bytes read and not yet handed on: `buf[at..end]`.
    buf: Option<Box<[u8]>>,
    at: usize,
    end: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(io: T) -> Self {
        Self { io, buf: None, at: 0, end: 0 }
    }

    /// Whether a batch buffer is held now.
    pub fn is_batching(&self) -> bool {
        self.buf.is_some()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at == this.end {
            let Some(buf) = this.buf.as_mut() else {
                let asked = out.remaining();
                let before = out.filled().len();
                ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
                if asked > 0 && out.filled().len() - before == asked {
                    this.buf = Some(vec![0u8; BATCH].into_boxed_slice());
                }
                return Poll::Ready(Ok(()));
            };
            let mut batch = ReadBuf::new(buf);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut batch))?;
            (this.at, this.end) = (0, batch.filled().len());
            if this.end == 0 {
                // End of stream: nothing to hand on, nothing to keep.
                this.buf = None;
                return Poll::Ready(Ok(()));
            }
        }
        let Some(buf) = this.buf.as_ref() else { return Poll::Ready(Ok(())) };
        let n = out.remaining().min(this.end - this.at);
        out.put_slice(&buf[this.at..this.at + n]);
        this.at += n;
        if this.at == this.end && this.end < STREAMING {
            this.buf = None;
            (this.at, this.end) = (0, 0);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Reads of `ask` bytes at a time until `want` bytes came, as rustls reads.
    async fn read_in(r: &mut ReadAhead<tokio::io::DuplexStream>, ask: usize, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = vec![0u8; ask];
        while got.len() < want {
            let n = r.read(&mut chunk).await.expect("read");
            assert_ne!(n, 0, "early end of stream after {} bytes", got.len());
            got.extend_from_slice(&chunk[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_stream_batches_and_small_messages_read_straight_through() {
        let (mut peer, io) = tokio::io::duplex(4 * BATCH);
        let mut r = ReadAhead::new(io);
        // A small message: read straight through, no buffer taken.
        peer.write_all(b"ping").await.expect("write");
        assert_eq!(read_in(&mut r, 4096, 4).await, b"ping");
        assert!(!r.is_batching());
        // A stream: the first full read switches to batches, and every byte
        // comes through in order.
        let bulk: Vec<u8> = (0..3 * BATCH).map(|i| (i % 251) as u8).collect();
        peer.write_all(&bulk).await.expect("write");
        assert_eq!(read_in(&mut r, 4096, bulk.len()).await, bulk);
        assert!(r.is_batching(), "a stream reads in batches");
        // Quiet again: the short batch that followed was freed once drained.
        peer.write_all(b"pong").await.expect("write");
        assert_eq!(read_in(&mut r, 4096, 4).await, b"pong");
        assert!(!r.is_batching(), "a short batch is not kept");
        drop(peer);
        let mut rest = Vec::new();
        assert_eq!(r.read_to_end(&mut rest).await.expect("end of stream"), 0);
    }
}
