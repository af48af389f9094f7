//! Serves the agent socket: owner-only, one thread per connection (CNI calls
//! are few, and fd passing is simplest on blocking sockets).

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::api::{self, ErrorKind, Request, Response};
use crate::controller::Controller;

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    Ok(UnixListener::from(crate::sys::bind_owner_only(path, nix::sys::socket::SockType::Stream)?))
}

pub fn serve(listener: UnixListener, ctl: Arc<Mutex<Controller>>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let ctl = ctl.clone();
                std::thread::spawn(move || handle(stream, &ctl));
            }
            Err(e) => accept_failed("agent", &e),
        }
    }
}

/// Out of fds, the next accept fails the same way at once: pause rather than
/// spin a core and flood the log.
fn accept_failed(socket: &str, e: &dyn std::fmt::Display) {
    warn!(error = %e, "accept on the {socket} socket");
    std::thread::sleep(std::time::Duration::from_millis(50));
}

fn handle(stream: UnixStream, ctl: &Mutex<Controller>) {
    // Who connected is read first, before a byte of the request is trusted.
    let peer = crate::peer::Peer::of(&stream);
    let resp = match (peer, api::read_request(&stream)) {
        (Err(e), _) => Response::err(ErrorKind::Forbidden, crate::controller::error_chain(&e)),
        (_, Err(e)) => Response::err(ErrorKind::BadRequest, format!("reading request: {e}")),
        (Ok(peer), Ok((line, fds))) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::err(ErrorKind::BadRequest, format!("malformed request: {e}")),
            Ok(req) => match ctl.lock() {
                Err(_) => Response::err(ErrorKind::Internal, "agent state poisoned by an earlier panic"),
                Ok(mut c) => {
                    let caller = c.caller(&peer);
                    match crate::peer::authorize(&caller, &req) {
                        Ok(()) => dispatch(&mut c, req, fds.first().map(|f| f.as_fd())),
                        Err(why) => {
                            warn!(pid = peer.pid, uid = peer.uid, ?caller, request = req.name(), why, "request refused");
                            count(req.name(), "forbidden");
                            Response::err(ErrorKind::Forbidden, why)
                        }
                    }
                }
            },
        },
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    let _ = std::io::Write::write_all(&mut &stream, &out);
}

fn dispatch(c: &mut Controller, req: Request, fd: Option<std::os::fd::BorrowedFd<'_>>) -> Response {
    let command = req.name();
    let r = dispatch_inner(c, req, fd);
    count(command, if r.ok { "ok" } else { "error" });
    r
}

fn count(command: &str, result: &str) {
    crate::metrics::metrics()
        .requests
        .get_or_create(&crate::metrics::CommandResult { command: command.into(), result: result.into() })
        .inc();
}

fn dispatch_inner(c: &mut Controller, req: Request, fd: Option<std::os::fd::BorrowedFd<'_>>) -> Response {
    match req {
        Request::Add { pod } => c.add(pod),
        Request::Del { uid } => c.del(&uid),
        Request::Check { uid } => c.check(&uid),
        Request::Status => Response::ok(c.status()),
        Request::Pods => Response::ok(c.pods()),
        Request::RegisterListener { uid, family } => c.register_listener(&uid, family, fd),
        Request::Gc { keep } => c.gc(&keep),
    }
}

/// Accepts proxies on the control socket; each is replayed under the controller lock.
pub fn serve_proxies(listener: std::os::fd::OwnedFd, ctl: &Mutex<Controller>, identity: crate::peer::ProxyIdentity) {
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
            Ok(conn) => match ctl.lock() {
                Ok(mut c) => c.on_proxy(conn),
                Err(_) => warn!("agent state poisoned; proxy not replayed"),
            },
            Err(e) => warn!(error = %crate::controller::error_chain(&e), "proxy handshake refused"),
        }
    }
}
