//! Several lab nodes joined as a cluster's nodes are: each node netns has its
//! own bridge and pod CIDR, an `eth0` on an underlay (a switch netns holding
//! one bridge), and a route to every other node's pod CIDRs via that node's
//! underlay address (host-gw style: no overlay, no NAT), so pods on different
//! nodes reach each other by their own addresses, across the underlay.

use std::net::IpAddr;
use std::process::Command;

use anyhow::Context as _;

use crate::names::LabId;
use crate::netns::NetNs;
use crate::node::{Node, NodeOptions};

/// The underlay bridge in the switch netns, and each node's port on it.
const SWITCH_BRIDGE: &str = "underlay";
const NODE_LINK: &str = "eth0";

pub struct Cluster {
    // Nodes first: their netns (and their end of each veth) go before the switch.
    pub nodes: Vec<Node>,
    switch: NetNs,
}

/// Node `i`'s pod CIDRs: node 0 has the single-node lab's defaults.
pub fn pod_subnets(i: usize) -> (String, String) {
    (format!("10.244.{i}.0/24"), format!("fd00:10:244:{i:x}::/64"))
}

/// Node `i`'s underlay addresses.
pub fn underlay_ips(i: usize) -> (IpAddr, IpAddr) {
    let host = 10 + i as u8;
    (IpAddr::from([192, 168, 100, host]), IpAddr::from([0xfd00, 0x100, 0, 0, 0, 0, 0, u16::from(host)]))
}

impl Cluster {
    /// `n` nodes (at most 200) with `opts` each, but their own pod CIDRs.
    pub fn new(n: usize, opts: NodeOptions) -> anyhow::Result<Cluster> {
        anyhow::ensure!((1..=200).contains(&n), "a cluster has 1 to 200 nodes, not {n}");
        let switch = NetNs::create(&LabId::fresh().netns_name("switch"))?;
        ip(&switch, &["link", "add", SWITCH_BRIDGE, "type", "bridge"])?;
        ip(&switch, &["link", "set", SWITCH_BRIDGE, "up"])?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let (v4, v6) = pod_subnets(i);
            let node = Node::new(NodeOptions { pod_subnet_v4: v4, pod_subnet_v6: v6, ..opts.clone() })?;
            let port = format!("n{i}");
            let node_ns = node.netns().name().to_owned();
            ip(&switch, &["link", "add", &port, "type", "veth", "peer", "name", NODE_LINK, "netns", &node_ns])?;
            ip(&switch, &["link", "set", &port, "master", SWITCH_BRIDGE, "up"])?;
            let (a4, a6) = underlay_ips(i);
            ip(node.netns(), &["addr", "add", &format!("{a4}/24"), "dev", NODE_LINK])?;
            ip(node.netns(), &["addr", "add", &format!("{a6}/64"), "dev", NODE_LINK, "nodad"])?;
            ip(node.netns(), &["link", "set", NODE_LINK, "up"])?;
            // A node routes its pods' packets on, as any Kubernetes node does.
            node.netns().run(|| -> std::io::Result<()> {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            })??;
            nodes.push(node);
        }
        for (i, node) in nodes.iter().enumerate() {
            for j in (0..n).filter(|j| *j != i) {
                let ((v4, v6), (g4, g6)) = (pod_subnets(j), underlay_ips(j));
                ip(node.netns(), &["route", "add", &v4, "via", &g4.to_string()])?;
                ip(node.netns(), &["-6", "route", "add", &v6, "via", &g6.to_string()])?;
            }
        }
        Ok(Cluster { nodes, switch })
    }

    /// The switch netns: the underlay, where a capture sees what crosses nodes.
    pub fn switch(&self) -> &NetNs {
        &self.switch
    }

    /// Starts tcpdump on the underlay bridge, in the switch netns, writing
    /// every TCP packet whole to `pcap`; returns once it is capturing.
    pub fn capture(&self, pcap: &std::path::Path) -> anyhow::Result<Capture> {
        use std::io::BufRead as _;
        let mut cmd = Command::new("tcpdump");
        // Immediate mode and packet-buffered: each packet is in the file as it
        // is seen, so [`Capture::wait_for`] can tell when traffic has arrived.
        cmd.args(["-i", SWITCH_BRIDGE, "--immediate-mode", "-U", "-s", "0", "-n", "-w"]).arg(pcap).arg("tcp");
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        let ns = std::fs::File::open(self.switch.path())?.into();
        crate::process::enter_before_exec(&mut cmd, Some(ns), None);
        let mut p = crate::process::LabProcess::spawn("tcpdump", cmd, self.nodes[0].state_dir())?;
        let stderr = p.child_mut().stderr.take().context("stderr is piped")?;
        let mut lines = std::io::BufReader::new(stderr).lines();
        // "listening on underlay, link-type EN10MB ..." once the capture runs.
        match lines.next() {
            Some(Ok(l)) if l.contains("listening on") => {}
            other => anyhow::bail!("tcpdump did not start: {other:?}"),
        }
        Ok(Capture { process: p, pcap: pcap.into() })
    }

    /// Node `i`'s port on the underlay bridge, in the switch netns.
    pub fn switch_port(i: usize) -> String {
        format!("n{i}")
    }
}

/// `ip ARGS` inside `ns` (iproute2 enters it itself; only that process moves).
fn ip(ns: &NetNs, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(["-n", ns.name()]).args(args).output().context("running ip")?;
    anyhow::ensure!(out.status.success(), "ip -n {} {}: {}", ns.name(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// A running capture of the underlay.
pub struct Capture {
    process: crate::process::LabProcess,
    pcap: std::path::PathBuf,
}

impl Capture {
    /// Waits until at least `n` captured packets match the pcap `filter`.
    pub fn wait_for(&self, filter: &str, n: usize) -> anyhow::Result<()> {
        crate::wait::until(&format!("{n} packets matching {filter:?} in the capture"), std::time::Duration::from_secs(10), || {
            (count(&self.pcap, filter).ok()? >= n).then_some(())
        })
    }

    /// Stops the capture and returns the pcap file's bytes: every packet whole.
    pub fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        self.process.signal(nix::sys::signal::Signal::SIGINT)?;
        self.process.wait_exit(std::time::Duration::from_secs(10))?;
        Ok(std::fs::read(&self.pcap)?)
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// How many packets of a pcap file match `filter` (as `tcpdump -r` reads it).
pub fn count(pcap: &std::path::Path, filter: &str) -> anyhow::Result<usize> {
    let out = Command::new("tcpdump").args(["-n", "-r"]).arg(pcap).args(filter.split_whitespace()).output()?;
    // A file still being written may end in a partial packet: what was read counts.
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}
