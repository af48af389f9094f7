//! Identity and mTLS between nodes: on a two-node lab cluster, traffic between
//! meshed pods goes over HBONE (HTTP/2 CONNECT in mutual TLS 1.3, port 15008),
//! checked on the wire by a capture of the underlay; a destination must prove
//! the identity the workload source gives it, and an untrusted peer is
//! refused by either side.

use std::path::{Path, PathBuf};
use std::time::Duration;

use podsteer_lab::agent::Agent;
use podsteer_lab::cluster::{Cluster, contains, count};
use podsteer_lab::proxy::Proxy;
use podsteer_lab::workload::{addr, run_client, start_server};
use podsteer_lab::{NodeOptions, Pod, PodSpec};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/production/sa/order-service";

/// A cluster whose nodes each run an agent (with `--ca-dir`) and a shared proxy.
struct Mesh {
    // Agents and proxies go before the nodes they run on.
    proxies: Vec<Proxy>,
    agents: Vec<Agent>,
    /// Each node's workload directory (usually one, shared, as one API server is).
    workloads: Vec<PathBuf>,
    cluster: Cluster,
}

impl Mesh {
    /// An `n`-node cluster; [`Mesh::start`] runs its agents and proxies.
    fn new(n: usize) -> anyhow::Result<Mesh> {
        let cluster = Cluster::new(n, NodeOptions::default())?;
        Ok(Mesh { proxies: Vec::new(), agents: Vec::new(), workloads: Vec::new(), cluster })
    }

    /// A directory that goes with the lab (node 0's state).
    fn scratch(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.cluster.nodes[0].state_dir().join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// A fresh CA (`podsteer ca create`'s code) in the scratch directory `name`.
    fn ca(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.cluster.nodes[0].state_dir().join(name);
        podsteer_identity::ca::create(&d, "cluster.local", 1)?;
        Ok(d)
    }

    /// `ca[i]` and `workloads[i]`: node i's CA and workload directories.
    fn start(&mut self, mode: &str, ca: &[&Path], workloads: &[&Path]) -> anyhow::Result<()> {
        for (i, node) in self.cluster.nodes.iter().enumerate() {
            let (w, c) = (workloads[i].display().to_string(), ca[i].display().to_string());
            let agent = Agent::start_with_proxy(node, mode, &["--workload-dir", &w, "--ca-dir", &c, "--workload-wait-ms", "5000"])?;
            self.proxies.push(Proxy::start_shared(node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?);
            self.agents.push(agent);
        }
        self.workloads = workloads.iter().map(|p| p.to_path_buf()).collect();
        Ok(())
    }

    /// A pod on node `node`. Meshed: its manifest (with `service_account` and
    /// its addresses, as the API server has them once the pod runs) goes into
    /// every workload directory, and its node's agent enrols it.
    fn pod(&self, node: usize, name: &str, service_account: &str, meshed: bool) -> anyhow::Result<Pod> {
        let pod = self.cluster.nodes[node].add_pod(PodSpec::new("production", name))?;
        if meshed {
            for dir in &self.workloads {
                write_manifest(dir, &pod, service_account)?;
            }
            self.agents[node].add_pod(&pod, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(pod)
    }

    /// Until every proxy's mesh view holds `n` pod addresses.
    fn wait_peers(&self, n: usize) -> anyhow::Result<()> {
        for (i, p) in self.proxies.iter().enumerate() {
            podsteer_lab::wait::until(&format!("node {i}'s proxy to know {n} mesh addresses"), Duration::from_secs(10), || {
                (p.metric("podsteer_proxy_mesh_peers").ok()? as usize == n).then_some(())
            })?;
        }
        Ok(())
    }

    fn proxy_log(&self, node: usize) -> String {
        std::fs::read_to_string(&self.proxies[node].log).unwrap_or_default()
    }
}

fn write_manifest(dir: &Path, pod: &Pod, service_account: &str) -> anyhow::Result<()> {
    let ips: String = pod.ips().iter().map(|ip| format!("  - ip: {ip}\n")).collect();
    let text = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\nspec:\n  serviceAccountName: {service_account}\n  containers:\n  - name: app\n    image: app:latest\nstatus:\n  podIPs:\n{ips}",
        pod.name(),
        pod.namespace(),
        pod.uid()
    );
    std::fs::write(dir.join(format!("{}.yaml", pod.uid())), text)?;
    Ok(())
}

/// The address a `whoami` line says the server saw the connection come from.
fn peer_ip(line: &str) -> Option<std::net::IpAddr> {
    let peer: std::net::SocketAddr = line.split_whitespace().find_map(|w| w.strip_prefix("peer="))?.parse().ok()?;
    Some(peer.ip().to_canonical())
}

/// What `request` sends: bytes 0, 1, 2, ... The first 64 of them, whole in
/// one TCP segment, are the plaintext a capture must (or must not) show.
fn marker() -> Vec<u8> {
    (0u8..64).collect()
}

/// The capture as `tcpdump -r` prints it, for a failure message.
fn summary(pcap: &Path) -> String {
    let out = std::process::Command::new("tcpdump").args(["-n", "-r"]).arg(pcap).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_else(|e| e.to_string())
}

/// Meshed to meshed across nodes goes over HBONE: the capture shows traffic
/// on 15008 and never the app's bytes; the server sees the client pod's own
/// address and its proxy logs the client's identity. Meshed to unmeshed, and
/// unmeshed to meshed (PERMISSIVE, the default), stay plaintext, and the
/// capture shows their bytes.
fn meshed_pods_talk_over_hbone_and_the_underlay_carries_none_of_their_bytes(mode: &str) -> anyhow::Result<()> {
    let mut mesh = Mesh::new(2)?;
    let (ca_dir, wl, scratch) = (mesh.ca("ca")?, mesh.scratch("workloads")?, mesh.scratch("captures")?);
    mesh.start(mode, &[&ca_dir, &ca_dir], &[&wl, &wl])?;
    let client = mesh.pod(0, "order", "order-service", true)?;
    let outsider = mesh.pod(0, "outsider", "", false)?;
    let server = mesh.pod(1, "payment", "payment", true)?;
    let open = mesh.pod(1, "open", "", false)?;
    let _apps = [
        start_server(&server, None, &["echo", "[::]:8080"])?,
        start_server(&server, None, &["whoami", "[::]:8082", "payment"])?,
        start_server(&open, None, &["echo", "[::]:8080"])?,
    ];
    mesh.wait_peers(4)?;

    let pcap = scratch.join("meshed.pcap");
    let capture = mesh.cluster.capture(&pcap)?;
    for (from, to) in [(client.ipv4(), server.ipv4()), (client.ipv6(), server.ipv6())] {
        let (from, to) = (from.expect("client address"), to.expect("server address"));
        let out = run_client(&client, &["request", &addr(to, 8080), "65536"])
            .map_err(|e| e.context(format!("{}\n{}", mesh.proxy_log(0), mesh.proxy_log(1))))?;
        assert!(out.starts_with("ok 65536"), "{mode}: {out}");
        let who = run_client(&client, &["hello", &addr(to, 8082)])?;
        assert_eq!(peer_ip(&who), Some(from), "{mode}: across HBONE, the server sees the client pod's address: {who}");
    }
    // Every byte both ways, in TLS records: well over 10 packets on 15008.
    capture.wait_for("tcp port 15008", 10)?;
    let meshed = capture.finish()?;
    assert_eq!(count(&pcap, "tcp port 8080 or tcp port 8082")?, 0, "{mode}: none to the app ports: {}", summary(&pcap));
    assert!(!contains(&meshed, &marker()), "{mode}: no plaintext of meshed pods on the underlay");
    let log = mesh.proxy_log(1);
    let accepted = log.lines().filter(|l| l.contains("access") && l.contains(CLIENT_ID)).count();
    assert!(accepted >= 4, "{mode}: the server's proxy logs the client's identity for each connection:\n{log}");
    assert!(mesh.proxies[0].metric("podsteer_proxy_hbone_dials_total")? >= 2.0, "{mode}: one pooled connection per family, at least");

    let pcap = scratch.join("plain.pcap");
    let capture = mesh.cluster.capture(&pcap)?;
    let to_open = run_client(&client, &["request", &addr(open.ipv4().expect("v4"), 8080), "4096"])?;
    let from_outsider = run_client(&outsider, &["request", &addr(server.ipv4().expect("v4"), 8080), "4096"])?;
    assert!(to_open.starts_with("ok") && from_outsider.starts_with("ok"), "{mode}: {to_open} {from_outsider}");
    // Each connection's handshake, data and close: at least 6 packets each.
    capture.wait_for("tcp port 8080", 12)?;
    let plain = capture.finish()?;
    assert!(contains(&plain, &marker()), "{mode}: unmeshed traffic crosses in plaintext, and the capture sees it:\n{}", summary(&pcap));
    assert_eq!(count(&pcap, "tcp port 15008")?, 0, "{mode}: none of it on 15008");
    Ok(())
}
podsteer_lab::both_modes!(meshed_pods_talk_over_hbone_and_the_underlay_carries_none_of_their_bytes);

/// The client side insists on the identity its destination must present: a
/// server whose node issued it another identity (its workload source says
/// so) is refused in the handshake, and the app's connection is reset, never
/// sent on in plaintext. So is a server with a certificate from another CA.
#[test]
fn a_destination_that_cannot_prove_its_identity_is_refused() -> anyhow::Result<()> {
    let mut mesh = Mesh::new(3)?;
    let (ca_dir, other_ca) = (mesh.ca("ca")?, mesh.ca("other-ca")?);
    let (truth, lie) = (mesh.scratch("truth")?, mesh.scratch("lie")?);
    // Node 1's source gives the server another service account; node 2 has
    // another CA altogether.
    mesh.start("ebpf", &[&ca_dir, &ca_dir, &other_ca], &[&truth, &lie, &truth])?;
    let client = mesh.cluster.nodes[0].add_pod(PodSpec::new("production", "order"))?;
    let impostor = mesh.cluster.nodes[1].add_pod(PodSpec::new("production", "payment"))?;
    let foreign = mesh.cluster.nodes[2].add_pod(PodSpec::new("production", "foreign"))?;
    for (dir, sa) in [(&truth, "payment"), (&lie, "impostor")] {
        write_manifest(dir, &client, "order-service")?;
        write_manifest(dir, &impostor, sa)?;
        write_manifest(dir, &foreign, "foreign")?;
    }
    mesh.agents[0].add_pod(&client, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let rec = mesh.agents[1].add_pod(&impostor, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(rec["identity"], "spiffe://cluster.local/ns/production/sa/impostor");
    mesh.agents[2].add_pod(&foreign, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let _apps = [start_server(&impostor, None, &["echo", "[::]:8080"])?, start_server(&foreign, None, &["echo", "[::]:8080"])?];
    mesh.wait_peers(6)?;

    for (server, why) in [
        (
            &impostor,
            "the destination presented spiffe://cluster.local/ns/production/sa/impostor, not spiffe://cluster.local/ns/production/sa/payment",
        ),
        // Its root has the same name as the mesh's, so the chain fails on the signature.
        (&foreign, "invalid peer certificate: BadSignature"),
    ] {
        let out = run_client(&client, &["request", &addr(server.ipv4().expect("v4"), 8080), "64"]);
        assert!(out.is_err(), "the connection to {} must fail: {out:?}", server.name());
        let log = mesh.proxy_log(0);
        assert!(log.contains("no HBONE tunnel") && log.contains(why), "the client's proxy says why ({why}):\n{log}");
    }
    let refused = mesh.proxies[0]
        .metric("podsteer_proxy_connections_closed_total{pod=\"production/order\",direction=\"outbound\",result=\"tunnel_failed\"}")?;
    assert_eq!(refused, 2.0, "both counted as tunnel failures");
    // The server with the foreign CA refused the client's certificate too.
    podsteer_lab::wait::until("the foreign server to count a refused handshake", Duration::from_secs(5), || {
        (mesh.proxies[2].metric("podsteer_proxy_hbone_handshakes_refused_total").ok()? >= 1.0).then_some(())
    })?;
    Ok(())
}
