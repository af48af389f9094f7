//! Serves the agent socket: owner-only, one thread per connection (CNI calls
//! are few, and fd passing is simplest on blocking sockets). Threads are
//! bounded per network namespace and every read has a deadline, so silent
//! connections from a pod can neither pile up threads nor crowd out the plugin.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::api::{self, ErrorKind, Request, Response};
use crate::state::{Event, Handle};

/// Which socket a connection came in on, which decides who its peer can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    /// The agent socket: owner-only, for the plugin, the CLI and root sidecars.
    Agent,
    /// The sidecar socket: world-connectable, for sidecars running as `proxy_uid`.
    Sidecars { proxy_uid: u32 },
}

impl Socket {
    fn name(self) -> &'static str {
        match self {
            Socket::Agent => "agent",
            Socket::Sidecars { .. } => "sidecar",
        }
    }
}

pub fn bind(path: &Path, socket: Socket) -> anyhow::Result<UnixListener> {
    let mode = match socket {
        Socket::Agent => 0o600,
        // Who may use it is decided per connection, by netns and uid.
        Socket::Sidecars { .. } => 0o666,
    };
    Ok(UnixListener::from(crate::sys::bind_unix(path, nix::sys::socket::SockType::Stream, mode)?))
}

/// Connections served at once from the node's own netns (the CNI plugin runs
/// one per pod the runtime is setting up, so a burst of pod starts fits).
const NODE_CONNECTIONS: usize = 64;
/// Connections served at once from any other netns (a sidecar needs one).
const OTHER_CONNECTIONS: usize = 4;
/// A request is one line sent right after connecting; a peer silent for this
/// long is cut off so it does not hold its thread.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub fn serve(listener: UnixListener, state: Handle, socket: Socket) {
    let own = crate::peer::NetnsId::own().ok();
    let open: Arc<Mutex<HashMap<crate::peer::NetnsId, usize>>> = Arc::default();
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                accept_failed(socket.name(), &e);
                continue;
            }
        };
        // Who connected is read first, before a byte of the request is trusted.
        let peer = match crate::peer::Peer::of(&stream) {
            Ok(p) => p,
            Err(e) => {
                reply(&stream, &Response::err(ErrorKind::Forbidden, crate::controller::error_chain(&e)));
                continue;
            }
        };
        let limit = if Some(peer.netns) == own { NODE_CONNECTIONS } else { OTHER_CONNECTIONS };
        let Some(slot) = Slot::take(&open, peer.netns, limit) else {
            count("connect", "busy");
            reply(&stream, &Response::err(ErrorKind::NotReady, format!("agent busy: {limit} connections from this netns already open")));
            continue;
        };
        let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
        let state = state.clone();
        let spawned = std::thread::Builder::new().name("agent-conn".into()).spawn(move || {
            let _slot = slot;
            handle(stream, peer, &state, socket)
        });
        if let Err(e) = spawned {
            warn!(error = %e, "no thread for an agent connection");
        }
    }
}

/// One of a netns's connection slots, given back on drop.
struct Slot {
    open: Arc<Mutex<HashMap<crate::peer::NetnsId, usize>>>,
    netns: crate::peer::NetnsId,
}

impl Slot {
    fn take(open: &Arc<Mutex<HashMap<crate::peer::NetnsId, usize>>>, netns: crate::peer::NetnsId, limit: usize) -> Option<Slot> {
        let mut map = open.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(netns).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Slot { open: open.clone(), netns })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.netns) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.netns);
            }
        }
    }
}

fn reply(stream: &UnixStream, resp: &Response) {
    let mut out = serde_json::to_vec(resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    let _ = std::io::Write::write_all(&mut &*stream, &out);
}

/// Out of fds, the next accept fails the same way at once: pause rather than
/// spin a core and flood the log.
fn accept_failed(socket: &str, e: &dyn std::fmt::Display) {
    warn!(error = %e, "accept on the {socket} socket");
    std::thread::sleep(std::time::Duration::from_millis(50));
}

fn handle(stream: UnixStream, peer: crate::peer::Peer, state: &Handle, socket: Socket) {
    let resp = match api::read_request(&stream) {
        Err(e) => Response::err(ErrorKind::BadRequest, format!("reading request: {e}")),
        Ok((line, fds)) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::err(ErrorKind::BadRequest, format!("malformed request: {e}")),
            Ok(req) => {
                let command = req.name();
                let r = answer(state, &peer, socket, req, fds.into_iter().next());
                count(command, result_label(&r));
                r
            }
        },
    };
    reply(&stream, &resp);
}

/// Authorizes a request against the newest snapshot, answers reads from it,
/// and queues changes for the state manager. An ADD for the shared proxy first
/// waits, outside the manager, until a live proxy is connected (see
/// `ProxyLink::wait_live`); a missing one shows up as the ADD's own "try
/// again" error.
fn answer(state: &Handle, peer: &crate::peer::Peer, socket: Socket, req: Request, fd: Option<std::os::fd::OwnedFd>) -> Response {
    let snap = state.snapshot();
    let caller = match socket {
        Socket::Agent => snap.caller(peer),
        Socket::Sidecars { proxy_uid } => snap.sidecar_caller(peer, proxy_uid),
    };
    if let Err(why) = crate::peer::authorize(&caller, &req) {
        warn!(pid = peer.pid, uid = peer.uid, ?caller, request = req.name(), why, "request refused");
        return Response::err(ErrorKind::Forbidden, why);
    }
    match req {
        Request::Status => Response::ok(&snap.status),
        Request::Pods => Response::ok(&*snap.pods),
        req => {
            if let Request::Add { pod } = &req {
                if let Err(why) = state.wait_for_workload(pod) {
                    return Response::err(ErrorKind::NotReady, why);
                }
                if let Some((link, deadline)) = state.proxy_to_wait_for(pod) {
                    link.wait_live(deadline);
                }
            }
            state.ask(|reply| Event::Request { req, fd, reply }).unwrap_or_else(|e| e.response())
        }
    }
}

fn result_label(r: &Response) -> &'static str {
    match &r.error {
        None => "ok",
        Some(e) if e.kind == ErrorKind::Forbidden => "forbidden",
        Some(_) => "error",
    }
}

fn count(command: &str, result: &str) {
    crate::metrics::metrics()
        .requests
        .get_or_create(&crate::metrics::CommandResult { command: command.into(), result: result.into() })
        .inc();
}

/// Accepts proxies on the control socket; the state manager replays each.
pub fn serve_proxies(listener: std::os::fd::OwnedFd, state: &Handle, identity: crate::peer::ProxyIdentity) {
    use crate::proxy_link::{self, ProxyConn, REPLY_TIMEOUT};
    loop {
        let fd = match proxy_link::accept(listener.as_fd()) {
            Ok(fd) => fd,
            Err(e) => {
                accept_failed("proxy", &e);
                continue;
            }
        };
        match ProxyConn::handshake(fd, REPLY_TIMEOUT, &identity) {
            Ok(conn) => {
                if let Err(e) = state.tell(Event::ProxyConnected(conn)) {
                    warn!(error = %e, "proxy not replayed");
                }
            }
            Err(e) => warn!(error = %crate::controller::error_chain(&e), "proxy handshake refused"),
        }
    }
}
