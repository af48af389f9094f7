//! The way back to the proxy for connections that keep the client's address.
//!
//! The proxy connects to an app from the client's own address (IP_TRANSPARENT,
//! from inside the pod's netns), so the app sees who called it. The app's
//! answers are addressed to that client, and would leave the pod for a client
//! that never saw this connection. So in each meshed pod's netns:
//!
//! - `net.ipv4.tcp_fwmark_accept = 1` (for IPv4 and IPv6): a socket the app
//!   accepts takes the mark of the SYN that opened it, which is the proxy's
//!   [`CLIENT_ADDRESS_MARK`]; every other connection arrives unmarked;
//! - a rule `fwmark CLIENT_ADDRESS_MARK lookup CLIENT_ADDRESS_TABLE`, and in that
//!   table `local default dev lo`, per family: marked packets are delivered
//!   locally, to the proxy's transparent socket.
//!
//! No iptables and no conntrack: the same in eBPF and iptables mode. The plan is
//! data ([`plan`]), applied in one trip into the netns.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::BorrowedFd;

use podsteer_proto::control::{CLIENT_ADDRESS_MARK as MARK, CLIENT_ADDRESS_RULE_PRIORITY as PRIORITY, CLIENT_ADDRESS_TABLE as TABLE};
use rtnetlink::packet_route::route::{RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::RuleAction;
use rtnetlink::{Handle, RouteMessageBuilder};

/// `lo` is the first interface of every network namespace.
const LOOPBACK: u32 = 1;
const SYSCTL: &str = "net/ipv4/tcp_fwmark_accept";

#[derive(Debug, thiserror::Error)]
pub enum ReturnPathError {
    #[error("entering the pod's netns")]
    Netns(#[from] crate::sys::SysError),
    #[error("setting {SYSCTL}")]
    Sysctl(#[source] std::io::Error),
    #[error("netlink socket in the pod's netns")]
    Socket(#[source] std::io::Error),
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// One change to a pod's netns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Sysctl { name: &'static str, value: &'static str },
    Route { v6: bool },
    Rule { v6: bool },
}

/// What [`install`] applies, in order: the sysctl, then per family the table's
/// route before the rule that selects it.
pub fn plan() -> Vec<Step> {
    vec![
        Step::Sysctl { name: SYSCTL, value: "1" },
        Step::Route { v6: false },
        Step::Rule { v6: false },
        Step::Route { v6: true },
        Step::Rule { v6: true },
    ]
}

/// Installs the return path in the pod's netns. Idempotent.
pub fn install(netns: BorrowedFd<'_>) -> Result<(), ReturnPathError> {
    crate::sys::in_netns(netns, || apply(&plan(), true))?
}

/// Removes it again (best effort: a netns on its way out takes it along).
pub fn remove(netns: BorrowedFd<'_>) -> Result<(), ReturnPathError> {
    let mut steps = plan();
    steps.retain(|s| !matches!(s, Step::Sysctl { .. }));
    steps.reverse();
    crate::sys::in_netns(netns, || apply(&steps, false))?
}

/// Runs in the pod's netns: the netlink socket is opened there.
fn apply(steps: &[Step], add: bool) -> Result<(), ReturnPathError> {
    for step in steps {
        if let Step::Sysctl { name, value } = step {
            crate::sys::write_sysctl(name, value).map_err(ReturnPathError::Sysctl)?;
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ReturnPathError::Socket)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(ReturnPathError::Socket)?;
        let driver = tokio::spawn(conn);
        let mut result = Ok(());
        for step in steps {
            let r = match (step, add) {
                (Step::Sysctl { .. }, _) => Ok(()),
                (Step::Route { v6 }, true) => handle.route().add(route(*v6)).replace().execute().await,
                (Step::Route { v6 }, false) => handle.route().del(route(*v6)).execute().await,
                (Step::Rule { v6 }, true) => rule(&handle, *v6, true).await,
                (Step::Rule { v6 }, false) => rule(&handle, *v6, false).await,
            };
            if let Err(e) = r.or_else(|e| if already_so(&e, add) { Ok(()) } else { Err(e) }) {
                result = Err(ReturnPathError::Netlink { what: format!("{step:?}"), source: e });
                if add {
                    break;
                }
            }
        }
        driver.abort();
        result
    })
}

/// `local default dev lo table TABLE`.
fn route(v6: bool) -> RouteMessage {
    if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(LOOPBACK)
            .table_id(TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(LOOPBACK)
            .table_id(TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build()
    }
}

/// `fwmark MARK lookup TABLE priority PRIORITY`, added or deleted.
async fn rule(handle: &Handle, v6: bool, add: bool) -> Result<(), rtnetlink::Error> {
    let req = handle.rule().add().fw_mark(MARK).table_id(TABLE).priority(PRIORITY).action(RuleAction::ToTable);
    match (v6, add) {
        (false, true) => req.v4().execute().await,
        (true, true) => req.v6().execute().await,
        (false, false) => handle.rule().del(req.v4().message_mut().clone()).execute().await,
        (true, false) => handle.rule().del(req.v6().message_mut().clone()).execute().await,
    }
}

/// EEXIST on add, ENOENT/ESRCH on delete: already as wanted.
fn already_so(e: &rtnetlink::Error, add: bool) -> bool {
    let rtnetlink::Error::NetlinkError(m) = e else { return false };
    let code = m.raw_code().abs();
    if add { code == libc::EEXIST } else { code == libc::ENOENT || code == libc::ESRCH }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sysctl_comes_first_and_each_table_route_before_its_rule() {
        let p = plan();
        assert_eq!(p[0], Step::Sysctl { name: "net/ipv4/tcp_fwmark_accept", value: "1" });
        for v6 in [false, true] {
            let route = p.iter().position(|s| *s == Step::Route { v6 });
            let rule = p.iter().position(|s| *s == Step::Rule { v6 });
            assert!(route.is_some() && route < rule, "{p:?}");
        }
    }

    #[test]
    fn the_mark_is_not_the_proxys_own() {
        assert_ne!(MARK, podsteer_common::PROXY_MARK, "the proxy's outbound connections must keep routing normally");
    }
}
