//! The agent's Unix-socket protocol, shared by the CNI plugin and the debug CLI:
//! one JSON request line, one JSON response line, per connection. A proxy
//! registering an inbound listener passes its fd alongside with SCM_RIGHTS.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the agent listens, and where the plugin and CLI look by default.
pub const DEFAULT_SOCKET: &str = "/var/run/podsteer/agent.sock";

/// A pod as the CNI plugin (or CRI repair) reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The sandbox's container id, which CNI GC lists attachments by.
    #[serde(default)]
    pub container_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Add {
        pod: PodInfo,
    },
    Del {
        uid: String,
    },
    Check {
        uid: String,
    },
    Status,
    Pods,
    /// The inbound listener fd for `family` (2 or 10) comes with the message.
    RegisterListener {
        uid: String,
        family: u16,
    },
    /// CNI GC: forget every pod whose sandbox is not in `keep`.
    Gc {
        keep: Vec<String>,
    },
    /// A sidecar's part of the mesh (answered with a
    /// [`crate::control::SidecarMesh`]): its own pod's certificate, the
    /// mesh view and the node's policies; only a generation when nothing
    /// changed since `seen`.
    SidecarMesh {
        uid: String,
        #[serde(default)]
        seen: Option<u64>,
    },
}

impl Request {
    /// The request's name, as it appears in metrics and refusals.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Add { .. } => "add",
            Request::Del { .. } => "del",
            Request::Check { .. } => "check",
            Request::Status => "status",
            Request::Pods => "pods",
            Request::RegisterListener { .. } => "register_listener",
            Request::Gc { .. } => "gc",
            Request::SidecarMesh { .. } => "sidecar_mesh",
        }
    }
}

/// Why a request failed; the CNI plugin maps these to CNI error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    InvalidPolicy,
    BadNetns,
    NotFound,
    NotReady,
    Internal,
    /// The caller may not send this request (see `peer`).
    Forbidden,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Response {
        Response { ok: true, data: serde_json::to_value(data).ok(), error: None }
    }

    pub fn err(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response { ok: false, data: None, error: Some(ApiError { kind, message: message.into() }) }
    }

    pub fn into_result(self) -> Result<serde_json::Value, ApiError> {
        match (self.ok, self.error) {
            (true, _) => Ok(self.data.unwrap_or(serde_json::Value::Null)),
            (false, Some(e)) => Err(e),
            (false, None) => Err(ApiError { kind: ErrorKind::Internal, message: "error without detail".into() }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent")]
    Io(#[from] std::io::Error),
    #[error("agent sent an unreadable answer")]
    Decode(#[from] serde_json::Error),
    #[error("agent closed the connection without answering")]
    NoAnswer,
}

/// Sends one request and waits up to `deadline` for the answer.
pub fn call(socket: &Path, req: &Request, deadline: Duration, fd: Option<BorrowedFd<'_>>) -> Result<Response, ClientError> {
    call_on(connect(socket)?, req, deadline, fd)
}

/// Connects to the agent socket. The agent knows a caller by the credentials it
/// had when it connected, so a process that is about to drop privileges can
/// connect first and send its request on this stream afterwards (soon: the
/// agent cuts off a connection silent for 2 s).
pub fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket).map_err(|source| ClientError::Connect { path: socket.display().to_string(), source })
}

/// [`call`] on a stream from [`connect`].
pub fn call_on(stream: UnixStream, req: &Request, deadline: Duration, fd: Option<BorrowedFd<'_>>) -> Result<Response, ClientError> {
    stream.set_read_timeout(Some(deadline))?;
    stream.set_write_timeout(Some(deadline))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    match fd {
        Some(fd) => send_with_fd(&stream, &line, fd)?,
        None => (&stream).write_all(&line)?,
    }
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(ClientError::NoAnswer);
    }
    Ok(serde_json::from_str(&answer)?)
}

fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [fd.as_raw_fd()];
    let iov = [std::io::IoSlice::new(bytes)];
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)?;
    if sent < bytes.len() {
        (&*stream).write_all(&bytes[sent..])?;
    }
    Ok(())
}

/// Reads one request line, with any fds that came with it.
pub fn read_request(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::FromRawFd as _;
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    while !line.contains(&b'\n') {
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let n = msg.bytes;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in our table.
                fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > 1 << 20 {
            return Err(std::io::Error::other("request larger than 1 MiB"));
        }
    }
    Ok((line, fds))
}
