//! What the kernel accounts for a connection that goes direct (no proxy):
//! the same figures the proxy's access line and metrics carry.

use crate::Addr;

/// How a direct connection ended, in the proxy's words (its `result` label).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnResult {
    /// Both sides closed with a FIN.
    Ok = 0,
    /// The app aborted (a reset it sent: close with unread data, SO_LINGER 0).
    ClientDisconnected = 1,
    /// The server reset the connection.
    BackendDisconnected = 2,
    /// The connect never completed (refused, timed out, unreachable).
    ConnectFailed = 3,
}

impl ConnResult {
    pub const ALL: [ConnResult; 4] =
        [ConnResult::Ok, ConnResult::ClientDisconnected, ConnResult::BackendDisconnected, ConnResult::ConnectFailed];

    pub const fn from_u32(v: u32) -> ConnResult {
        match v {
            1 => ConnResult::ClientDisconnected,
            2 => ConnResult::BackendDisconnected,
            3 => ConnResult::ConnectFailed,
            _ => ConnResult::Ok,
        }
    }

    /// The proxy's name for the same ending (`podsteer_proxy::metrics::Outcome`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ConnResult::Ok => "ok",
            ConnResult::ClientDisconnected => "client_disconnected",
            ConnResult::BackendDisconnected => "backend_disconnected",
            ConnResult::ConnectFailed => "connect_failed",
        }
    }
}

/// Bits of [`DirectConn::seen`]: what the socket's state changes have shown.
pub mod seen {
    /// The peer's FIN arrived (it is counted in `bytes_received`).
    pub const FIN_IN: u32 = 1 << 0;
    /// Our FIN was acknowledged (it is counted in `bytes_acked`).
    pub const FIN_OUT_ACKED: u32 = 1 << 1;
    /// A reset arrived from the peer.
    pub const RESET_IN: u32 = 1 << 2;
    /// The handshake completed (the SYN is counted in `bytes_acked`).
    pub const ESTABLISHED: u32 = 1 << 3;
}

/// Socket storage of a connection that goes direct, from connect() to close.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectConn {
    pub started_ns: u64,
    pub seen: u32,
    pub _pad: u32,
}

/// One closed direct connection: a ring-buffer record the agent turns into
/// an access line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    pub netns: u64,
    pub started_ns: u64,
    pub ended_ns: u64,
    /// App to server, payload only (SYN and FIN taken off).
    pub bytes_from_client: u64,
    /// Server to app, payload only.
    pub bytes_to_client: u64,
    /// The app's own address.
    pub client: Addr,
    pub destination: Addr,
    pub result: u32,
    pub _pad: u32,
}

/// A pod's direct connections, per CPU: never lost, unlike records, so the
/// metrics stay exact under any overload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodTraffic {
    pub opened: u64,
    /// Indexed by [`ConnResult`].
    pub closed: [u64; 4],
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub duration_ns: u64,
}

/// TCP states as `BPF_SOCK_OPS_STATE_CB` reports them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const CLOSING: u32 = 11;
}

impl DirectConn {
    /// Folds one state change in; at TCP_CLOSE, the ending.
    ///
    /// A socket reaches CLOSE from FIN_WAIT2 when the peer's FIN turned it
    /// into TIME_WAIT, or when the app closed it half-shut before that FIN
    /// came; the two look alike here, and the first (the usual one) is assumed.
    pub fn on_state(&mut self, old: u32, new: u32) -> Option<ConnResult> {
        match new {
            tcp_state::ESTABLISHED => self.seen |= seen::ESTABLISHED,
            tcp_state::CLOSE_WAIT => self.seen |= seen::FIN_IN,
            tcp_state::CLOSING => self.seen |= seen::FIN_IN,
            tcp_state::FIN_WAIT2 => self.seen |= seen::FIN_OUT_ACKED,
            tcp_state::CLOSE => {
                return Some(match old {
                    tcp_state::SYN_SENT | tcp_state::SYN_RECV => ConnResult::ConnectFailed,
                    _ if self.seen & seen::RESET_IN != 0 => ConnResult::BackendDisconnected,
                    tcp_state::FIN_WAIT2 => {
                        self.seen |= seen::FIN_IN;
                        ConnResult::Ok
                    }
                    tcp_state::LAST_ACK | tcp_state::CLOSING => {
                        self.seen |= seen::FIN_OUT_ACKED;
                        ConnResult::Ok
                    }
                    _ => ConnResult::ClientDisconnected,
                });
            }
            _ => {}
        }
        None
    }

    /// Payload bytes from the kernel's counters, which count SYN and FIN too.
    pub fn payload(&self, bytes_acked: u64, bytes_received: u64) -> (u64, u64) {
        let syn = (self.seen & seen::ESTABLISHED != 0) as u64;
        let fin_out = (self.seen & seen::FIN_OUT_ACKED != 0) as u64;
        let fin_in = (self.seen & seen::FIN_IN != 0) as u64;
        (bytes_acked.saturating_sub(syn + fin_out), bytes_received.saturating_sub(fin_in))
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C) plain data with explicit padding fields.
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::PodTraffic {}
}
