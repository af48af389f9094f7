//! Zero-copy relay with splice(2): socket → pipe → socket, so bulk bytes move
//! as page references and never cross into the proxy's memory.
//!
//! A half of a connection is promoted to splice only once it proves to be bulk
//! (a read filled the whole scratch buffer): for small request/response
//! messages a pipe costs two fds and an extra hop for nothing.
//!
//! splice(2) reads the TCP receive queue. A socket that an sk_msg program
//! feeds gets its bytes on a separate queue that only recvmsg(2) reads. The
//! agent says which pods that is, and they are never spliced. As a net for
//! sockmaps nobody told us about, a splice that finds nothing (or end of
//! stream) peeks with recvmsg(2): bytes there mean this socket must be read
//! by copying, and the half falls back for good, losing nothing.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// When the proxy uses splice(2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SpliceMode {
    /// Always copy through user space.
    Never,
    /// Splice a direction once it carries bulk data.
    Auto,
    /// Splice every direction from its first byte (tests use it to exercise the path).
    Always,
}

impl SpliceMode {
    /// Whether a half that has just read `n` bytes into a buffer of `cap` should switch.
    pub fn promote(self, n: usize, cap: usize) -> bool {
        match self {
            SpliceMode::Never => false,
            SpliceMode::Auto => n == cap,
            SpliceMode::Always => true,
        }
    }
}

/// The pipe one direction of a connection splices through.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe, not yet spliced out.
    pub held: usize,
}

/// Bytes asked for per splice into the pipe: the default pipe capacity.
pub const CHUNK: usize = 64 * 1024;

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write, held: 0 })
    }

    /// Socket → pipe; called only when the pipe is empty. WouldBlock when
    /// there is nothing to read anywhere.
    pub fn fill_from(&mut self, socket: BorrowedFd<'_>) -> io::Result<Fill> {
        let first = splice(socket, self.write.as_fd(), CHUNK);
        match &first {
            Ok(n) if *n > 0 => return Ok(self.took(*n)),
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return first.map(|_| Fill::Eof),
            _ => {}
        }
        if !peek(socket)? {
            // Ok(0) is the end of the stream; WouldBlock goes back to wait.
            return first.map(|_| Fill::Eof);
        }
        // recvmsg sees bytes. They may have arrived just after the splice; a
        // second splice tells that race from a sockmap (nothing else reads here).
        match splice(socket, self.write.as_fd(), CHUNK) {
            Ok(0) => Ok(Fill::CopyOnly),
            Ok(n) => Ok(self.took(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Fill::CopyOnly),
            Err(e) => Err(e),
        }
    }

    fn took(&mut self, n: usize) -> Fill {
        self.held += n;
        Fill::Spliced(n)
    }

    /// Pipe → socket.
    pub fn drain_to(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        let n = splice(self.read.as_fd(), socket, self.held)?;
        self.held -= n;
        Ok(n)
    }
}

/// What a splice into the pipe found.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    Spliced(usize),
    Eof,
    /// The receive queue is empty but recvmsg(2) sees bytes: a sockmap feeds
    /// this socket, so it must be read by copying.
    CopyOnly,
}

/// Whether recvmsg(2) would return bytes right now. Ok(false) also for end of stream.
fn peek(socket: BorrowedFd<'_>) -> io::Result<bool> {
    let mut b = [0u8; 1];
    // SAFETY: b is valid for its one byte; MSG_PEEK leaves the data queued.
    let n = unsafe { libc::recv(socket.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    match n {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock { Ok(false) } else { Err(e) }
        }
    }
}

/// One non-blocking splice(2); EAGAIN comes back as WouldBlock for tokio's readiness.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both fds are borrowed, so open for the call; null offsets are
    // what sockets and pipes require.
    let n = unsafe { libc::splice(from.as_raw_fd(), std::ptr::null_mut(), to.as_raw_fd(), std::ptr::null_mut(), len, flags) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}
