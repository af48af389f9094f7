//! podsteer's node agent: picks the interception mode, programs it per pod and
//! tells the proxy about each pod.

pub mod ebpf;
