//! Identity and mTLS between nodes: on a two-node lab cluster, traffic between
//! meshed pods goes over HBONE (HTTP/2 CONNECT in mutual TLS 1.3, port 15008),
//! checked on the wire by a capture of the underlay; a destination must prove
//! the identity the workload source gives it, and an untrusted peer is
//! refused by either side.

use std::path::{Path, PathBuf};
use std::time::Duration;

use podsteer_lab::PodSpec;
use podsteer_lab::cluster::{contains, count};
use podsteer_lab::mesh::{Mesh, load, load_result, put_ca_file, put_policy, write_manifest, write_manifest_labelled};
use podsteer_lab::proxy::Proxy;
use podsteer_lab::workload::{addr, run_client, start_server};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/production/sa/order-service";

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

fn peer_authentication(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: production\nspec:\n  mtls:\n    mode: {mode}\n"
    )
}

/// The seed document's policy, reduced to what L4 can check: only
/// order-service may call payment, on 8080.
const PAYMENT_POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: payment-l4\n  namespace: production\nspec:\n  selector:\n    matchLabels:\n      app: payment\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/production/sa/order-service]\n    to:\n    - operation:\n        ports: [\"8080\"]\n";

/// PeerAuthentication STRICT: plaintext into a meshed pod is reset, while
/// HBONE goes on; back to PERMISSIVE, plaintext is taken again. An invalid
/// change is refused and leaves STRICT in force.
#[test]
fn strict_peer_authentication_refuses_plaintext_and_permissive_takes_it() -> anyhow::Result<()> {
    let mut mesh = Mesh::new(2)?;
    let (ca_dir, wl, policies) = (mesh.ca("ca")?, mesh.scratch("workloads")?, mesh.scratch("policies")?);
    put_policy(&policies, "peer.yaml", &peer_authentication("STRICT"))?;
    let p = policies.display().to_string();
    mesh.start_with("ebpf", &[&ca_dir, &ca_dir], &[&wl, &wl], &["--policy-dir", &p])?;
    let client = mesh.pod(0, "order", "order-service", true)?;
    let outsider = mesh.pod(0, "outsider", "", false)?;
    let server = mesh.pod(1, "payment", "payment", true)?;
    let _app = start_server(&server, None, &["echo", "[::]:8080"])?;
    mesh.wait_peers(4)?;
    let to = addr(server.ipv4().expect("v4"), 8080);

    assert!(run_client(&client, &["request", &to, "64"])?.starts_with("ok"), "HBONE is taken under STRICT");
    let refused = run_client(&outsider, &["request", &to, "64"]);
    assert!(refused.is_err(), "plaintext is refused under STRICT: {refused:?}");
    let log = mesh.proxy_log(1);
    assert!(
        log.lines().any(|l| l.contains("plaintext_refused") && l.contains("policy=production/default")),
        "the server's proxy names the PeerAuthentication that refused it:\n{log}"
    );

    // An invalid change is refused: STRICT stays.
    put_policy(&policies, "peer.yaml", &peer_authentication("LAX"))?;
    podsteer_lab::wait::until("the agent to refuse the invalid policy", Duration::from_secs(5), || {
        (mesh.agents[1].metric("podsteer_agent_policies_refused_total").ok()? >= 1.0).then_some(())
    })?;
    assert!(run_client(&outsider, &["request", &to, "64"]).is_err(), "still STRICT after an invalid change");

    put_policy(&policies, "peer.yaml", &peer_authentication("PERMISSIVE"))?;
    podsteer_lab::wait::until("plaintext to be taken under PERMISSIVE", Duration::from_secs(5), || {
        run_client(&outsider, &["request", &to, "64"]).ok().filter(|o| o.starts_with("ok"))
    })?;
    assert!(run_client(&client, &["request", &to, "64"])?.starts_with("ok"), "HBONE still");
    Ok(())
}

/// The seed's payment policy at L4, enforced by payment's proxy: order-service
/// over HBONE passes; another identity gets 401 (its app sees a reset), and
/// so does plaintext, which has no principal. A policy change closes the
/// live connections it now denies within a second, and leaves the rest.
#[test]
fn the_receiving_proxy_enforces_authorization_and_recheck_live_connections() -> anyhow::Result<()> {
    use std::io::{BufRead as _, Write as _};
    let mut mesh = Mesh::new(2)?;
    let (ca_dir, wl, policies) = (mesh.ca("ca")?, mesh.scratch("workloads")?, mesh.scratch("policies")?);
    put_policy(&policies, "payment.yaml", PAYMENT_POLICY)?;
    let p = policies.display().to_string();
    mesh.start_with("ebpf", &[&ca_dir, &ca_dir], &[&wl, &wl], &["--policy-dir", &p])?;
    let order = mesh.pod(0, "order", "order-service", true)?;
    let rogue = mesh.pod(0, "rogue", "rogue", true)?;
    let outsider = mesh.pod(0, "outsider", "", false)?;
    let server = mesh.cluster.nodes[1].add_pod(PodSpec::new("production", "payment"))?;
    write_manifest_labelled(&wl, &server, "payment", &[("app", "payment")])?;
    mesh.agents[1].add_pod(&server, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let _apps = [start_server(&server, None, &["echo", "[::]:8080"])?, start_server(&server, None, &["echo", "[::]:9090"])?];
    mesh.wait_peers(6)?;
    let (v4, v6) = (server.ipv4().expect("v4"), server.ipv6().expect("v6"));

    for to in [addr(v4, 8080), addr(v6, 8080)] {
        assert!(run_client(&order, &["request", &to, "64"])?.starts_with("ok"), "order-service may call payment on {to}");
        assert!(run_client(&rogue, &["request", &to, "64"]).is_err(), "rogue may not");
        assert!(run_client(&outsider, &["request", &to, "64"]).is_err(), "plaintext has no principal");
    }
    assert!(run_client(&order, &["request", &addr(v4, 9090), "64"]).is_err(), "not on 9090");
    let log = mesh.proxy_log(0);
    assert!(log.contains("answered the CONNECT with 401"), "the rogue's proxy was answered 401:\n{log}");
    let denied =
        mesh.proxies[1].metric("podsteer_proxy_authz_decisions_total{pod=\"production/payment\",decision=\"deny\",policy=\"\"}")?;
    assert_eq!(denied, 5.0, "rogue twice, plaintext twice, 9090 once: each denied by the default (no ALLOW matched)");
    let allowed = mesh.proxies[1]
        .metric("podsteer_proxy_authz_decisions_total{pod=\"production/payment\",decision=\"allow\",policy=\"production/payment-l4\"}")?;
    assert_eq!(allowed, 2.0);
    // Each denied connection, by who was refused and by which policy.
    let denied_from = |source: &str| {
        mesh.proxies[1].metric(&format!(
            "podsteer_proxy_authz_denied_total{{pod=\"production/payment\",source_identity=\"{source}\",destination_identity=\"spiffe://cluster.local/ns/production/sa/payment\",policy=\"\"}}"
        ))
    };
    assert_eq!(denied_from("spiffe://cluster.local/ns/production/sa/rogue")?, 2.0);
    assert_eq!(denied_from("")?, 2.0, "plaintext: no source identity");
    assert_eq!(denied_from(CLIENT_ID)?, 1.0, "order-service on 9090");

    // Two live connections from order-service, one to each family. A policy
    // that denies order-service on IPv6 only closes exactly that one.
    let chat = |to: String| -> anyhow::Result<(
        podsteer_lab::process::LabProcess,
        std::process::ChildStdin,
        std::io::BufReader<std::process::ChildStdout>,
    )> {
        let mut cmd = order.command(podsteer_lab::agent::bin("podsteer-lab-tool"))?;
        cmd.args(["chat", &to])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut p = order.spawn("chat", cmd)?;
        let stdin = p.child_mut().stdin.take().expect("piped");
        let mut out = std::io::BufReader::new(p.child_mut().stdout.take().expect("piped"));
        let mut l = String::new();
        out.read_line(&mut l)?;
        anyhow::ensure!(l.starts_with("connected"), "{l}");
        Ok((p, stdin, out))
    };
    let (mut p4, mut in4, mut out4) = chat(addr(v4, 8080))?;
    let (mut p6, mut in6, mut out6) = chat(addr(v6, 8080))?;
    let say = |stdin: &mut std::process::ChildStdin,
               out: &mut std::io::BufReader<std::process::ChildStdout>,
               w: &str|
     -> anyhow::Result<String> {
        writeln!(stdin, "{w}")?;
        let mut l = String::new();
        out.read_line(&mut l)?;
        Ok(l)
    };
    assert_eq!(say(&mut in4, &mut out4, "one")?, "one\n");
    assert_eq!(say(&mut in6, &mut out6, "one")?, "one\n");
    let deny_v6 = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-v6\n  namespace: production\nspec:\n  action: DENY\n  rules:\n  - when:\n    - key: destination.ip\n      values: [\"{v6}\"]\n"
    );
    // Under load: order-service keeps opening IPv4 connections, which the
    // new policy still allows, all through the change.
    let allowed_by_policy = || {
        mesh.proxies[1]
            .metric("podsteer_proxy_authz_decisions_total{pod=\"production/payment\",decision=\"allow\",policy=\"production/payment-l4\"}")
    };
    let before = allowed_by_policy()?;
    let running = load(&order, addr(v4, 8080), 3000)?;
    podsteer_lab::wait::until("the load to be under way", Duration::from_secs(5), || {
        (allowed_by_policy().ok()? >= before + 10.0).then_some(())
    })?;
    put_policy(&policies, "no-v6.yaml", &deny_v6)?;
    let changed = std::time::Instant::now();
    // The chat client learns its connection ended on its next exchange.
    podsteer_lab::wait::until("the IPv6 connection to be closed", Duration::from_secs(5), || match say(&mut in6, &mut out6, "ping") {
        Ok(l) if l == "ping\n" => None,
        _ => Some(()),
    })?;
    let took = changed.elapsed();
    let ended = p6.wait_exit(Duration::from_secs(5))?;
    assert!(!ended.success(), "the IPv6 connection ended with an error: {ended:?}");
    // The agent reads the files within its tick (250 ms): a second in all.
    assert!(took < Duration::from_secs(1) + Duration::from_millis(300), "closed within a second of the change: {took:?}");
    assert_eq!(say(&mut in4, &mut out4, "two")?, "two\n", "the IPv4 connection is untouched");
    drop(in4);
    let _ = p4.wait_exit(Duration::from_secs(5));
    let line = running.join().map_err(|_| anyhow::anyhow!("load panicked"))??;
    let (n, failures) = load_result(&line);
    assert!(n > 50 && failures == 0, "the allowed load went on untouched through the change: {line}");
    assert_eq!(mesh.proxies[1].metric("podsteer_proxy_authz_closed_live_total")?, 1.0, "only the IPv6 connection was closed");
    Ok(())
}

/// Leaves that live 3 s, under continuous load: each is renewed at about
/// half its life, pooled connections are dialled anew as the certificates
/// they were made with expire, and not one connection fails.
#[test]
fn certificates_renewed_every_few_seconds_under_load_fail_no_connection() -> anyhow::Result<()> {
    let mut mesh = Mesh::new(2)?;
    let (ca_dir, wl) = (mesh.ca("ca")?, mesh.scratch("workloads")?);
    mesh.start_with("ebpf", &[&ca_dir, &ca_dir], &[&wl, &wl], &["--cert-lifetime-ms", "3000"])?;
    let client = mesh.pod(0, "order", "order-service", true)?;
    let server = mesh.pod(1, "payment", "payment", true)?;
    let _app = start_server(&server, None, &["echo", "[::]:8080"])?;
    mesh.wait_peers(4)?;
    let line = load(&client, addr(server.ipv4().expect("v4"), 8080), 9000)?.join().map_err(|_| anyhow::anyhow!("load panicked"))??;
    let (n, failures) = load_result(&line);
    assert!(n > 100 && failures == 0, "no connection fails across renewals: {line}");
    for (i, a) in mesh.agents.iter().enumerate() {
        let renewed = a.metric("podsteer_agent_certificates_issued_total{action=\"renewal\"}")?;
        assert!(renewed >= 4.0, "node {i} renewed its pod's certificate every ~1.5 s: {renewed}");
    }
    let dials = mesh.proxies[0].metric("podsteer_proxy_hbone_dials_total")?;
    assert!(dials >= 3.0, "pooled connections were dialled anew as their certificates expired: {dials}");
    Ok(())
}

/// A root rotation with an overlap (both roots trusted, then the new issuer,
/// then the old root dropped, node by node) under continuous load fails no
/// connection. Without the overlap, one node on the new root alone cannot
/// talk to one on the old: refused in the handshake, and said so.
#[test]
fn a_root_rotation_with_overlap_fails_nothing_and_without_one_fails_clearly() -> anyhow::Result<()> {
    use podsteer_identity::ca::{BUNDLE_FILE, ISSUER_CERT_FILE, ISSUER_KEY_FILE};
    let mut mesh = Mesh::new(2)?;
    let (old, new, newest) = (mesh.ca("old")?, mesh.ca("new")?, mesh.ca("newest")?);
    let node_dirs = [mesh.scratch("ca-0")?, mesh.scratch("ca-1")?];
    for d in &node_dirs {
        for f in [BUNDLE_FILE, ISSUER_CERT_FILE, ISSUER_KEY_FILE] {
            std::fs::copy(old.join(f), d.join(f))?;
        }
    }
    let wl = mesh.scratch("workloads")?;
    mesh.start("ebpf", &[&node_dirs[0], &node_dirs[1]], &[&wl, &wl])?;
    let client = mesh.pod(0, "order", "order-service", true)?;
    let server = mesh.pod(1, "payment", "payment", true)?;
    let _app = start_server(&server, None, &["echo", "[::]:8080"])?;
    mesh.wait_peers(4)?;
    let read = |dir: &Path, f: &str| std::fs::read(dir.join(f));
    let roots = |i: usize, n: f64| -> anyhow::Result<()> {
        podsteer_lab::wait::until(&format!("node {i}'s proxy to trust {n} roots"), Duration::from_secs(5), || {
            (mesh.proxies[i].metric("podsteer_proxy_trust_roots").ok()? == n).then_some(())
        })
    };
    let renewed_since = |i: usize, before: f64| -> anyhow::Result<()> {
        podsteer_lab::wait::until(&format!("node {i} to reissue its pod's certificate"), Duration::from_secs(5), || {
            (mesh.agents[i].metric("podsteer_agent_certificates_issued_total{action=\"renewal\"}").ok()? > before).then_some(())
        })
    };

    let running = load(&client, addr(server.ipv4().expect("v4"), 8080), 6000)?;
    // 1. Both roots trusted everywhere.
    let both = [read(&old, BUNDLE_FILE)?, read(&new, BUNDLE_FILE)?].concat();
    for (i, d) in node_dirs.iter().enumerate() {
        put_ca_file(d, BUNDLE_FILE, &both)?;
        roots(i, 2.0)?;
    }
    // 2. Node by node, the new issuer: every leaf is reissued at once.
    for (i, d) in node_dirs.iter().enumerate() {
        let before = mesh.agents[i].metric("podsteer_agent_certificates_issued_total{action=\"renewal\"}")?;
        put_ca_file(d, ISSUER_KEY_FILE, &read(&new, ISSUER_KEY_FILE)?)?;
        put_ca_file(d, ISSUER_CERT_FILE, &read(&new, ISSUER_CERT_FILE)?)?;
        renewed_since(i, before)?;
    }
    // 3. The old root goes.
    for (i, d) in node_dirs.iter().enumerate() {
        put_ca_file(d, BUNDLE_FILE, &read(&new, BUNDLE_FILE)?)?;
        roots(i, 1.0)?;
    }
    let line = running.join().map_err(|_| anyhow::anyhow!("load panicked"))??;
    let (n, failures) = load_result(&line);
    assert!(n > 50 && failures == 0, "no connection fails across the rotation: {line}");

    // Without an overlap: node 1 moves to another root alone.
    let before = mesh.agents[1].metric("podsteer_agent_certificates_issued_total{action=\"renewal\"}")?;
    for f in [ISSUER_KEY_FILE, ISSUER_CERT_FILE, BUNDLE_FILE] {
        put_ca_file(&node_dirs[1], f, &read(&newest, f)?)?;
    }
    renewed_since(1, before)?;
    // Connections already pooled keep their session; a new one is needed.
    mesh.proxies[0].metric("podsteer_proxy_hbone_dials_total")?;
    let failed = podsteer_lab::wait::until("a connection across the unshared roots to fail", Duration::from_secs(10), || {
        run_client(&client, &["request", &addr(server.ipv4().expect("v4"), 8080), "64"]).err()
    })?;
    let log = mesh.proxy_log(0);
    assert!(
        log.contains("no HBONE tunnel") && log.contains("invalid peer certificate"),
        "the client's proxy says the peer's certificate is not trusted ({failed}):\n{log}"
    );
    Ok(())
}

/// The lifecycle guarantees hold under mTLS load: both agents restarted,
/// node 1's proxy handed over to a new one, node 0's proxy killed and
/// started again. The HBONE listeners are kept by the agent like the pod's
/// others, so a new proxy accepts on the same sockets; a restarted agent
/// gives the proxy certificates it then renews. Only a connection in flight
/// at the kill may fail.
#[test]
fn restarts_during_mtls_traffic_keep_the_lifecycle_guarantees() -> anyhow::Result<()> {
    let mut mesh = Mesh::new(2)?;
    let (ca_dir, wl) = (mesh.ca("ca")?, mesh.scratch("workloads")?);
    mesh.start("ebpf", &[&ca_dir, &ca_dir], &[&wl, &wl])?;
    let client = mesh.pod(0, "order", "order-service", true)?;
    let server = mesh.pod(1, "payment", "payment", true)?;
    let _app = start_server(&server, None, &["echo", "[::]:8080"])?;
    mesh.wait_peers(4)?;
    let to = addr(server.ipv4().expect("v4"), 8080);
    let running = load(&client, to.clone(), 10_000)?;
    let mut logs: Vec<PathBuf> = mesh.proxies.iter().map(|p| p.log.clone()).collect();
    // Node 0's proxy sees the client's side, node 1's the server's.
    let progress = |what: &str, i: usize, p: &Proxy| -> anyhow::Result<()> {
        let series = if i == 0 {
            "podsteer_proxy_connections_opened_total{pod=\"production/order\",direction=\"outbound\"}"
        } else {
            "podsteer_proxy_connections_opened_total{pod=\"production/payment\",direction=\"inbound\"}"
        };
        let before = p.metric(series)?;
        podsteer_lab::wait::until(what, Duration::from_secs(5), || (p.metric(series).ok()? > before + 10.0).then_some(()))
    };
    for i in 0..2 {
        mesh.agents[i].restart()?;
        progress(&format!("traffic through node {i} after its agent restarted"), i, &mesh.proxies[i])?;
    }
    let control = mesh.agents[1].proxy_socket.clone().expect("proxy socket");
    let newer = Proxy::start_shared(&mesh.cluster.nodes[1], &control, 15031, &[])?;
    mesh.agents[1].wait_proxy_current(newer.pid())?;
    progress("traffic through node 1's new proxy", 1, &newer)?;
    logs.push(newer.log.clone());
    let _older = std::mem::replace(&mut mesh.proxies[1], newer);
    mesh.proxies[0].process_mut().kill();
    let control = mesh.agents[0].proxy_socket.clone().expect("proxy socket");
    let restarted = Proxy::start_shared(&mesh.cluster.nodes[0], &control, 15032, &[])?;
    logs.push(restarted.log.clone());
    progress("traffic through node 0's restarted proxy", 0, &restarted)?;
    mesh.proxies[0] = restarted;
    let line = running.join().map_err(|_| anyhow::anyhow!("load panicked"))??;
    let (n, failures) = load_result(&line);
    assert!(n > 100, "{line}");
    let failed: Vec<String> = logs
        .iter()
        .flat_map(|l| std::fs::read_to_string(l).unwrap_or_default().lines().map(String::from).collect::<Vec<_>>())
        .filter(|l| (l.contains("access") && l.contains("result=") && !l.contains("result=\"ok\"")) || l.contains("WARN"))
        .collect();
    assert!(failures <= 1, "only the connection in flight at the kill may fail: {line}\n{}", failed.join("\n"));
    Ok(())
}

/// `podsteer certs` shows the bundle's root and each pod's identity,
/// issuer, expiry and next renewal from the running agent, never a key; with
/// the agent stopped it says the certificates lived in its memory.
#[test]
fn podsteer_certs_shows_identities_expiry_and_issuer_never_keys() -> anyhow::Result<()> {
    let mut mesh = Mesh::new(1)?;
    let (ca_dir, wl) = (mesh.ca("ca")?, mesh.scratch("workloads")?);
    mesh.start("ebpf", &[&ca_dir], &[&wl])?;
    mesh.pod(0, "order", "order-service", true)?;
    mesh.pod(0, "payment", "payment", true)?;
    let c = mesh.ctl_json(0, &["certs"])?;
    assert_eq!(c["trust_domain"], "cluster.local");
    assert_eq!(c["roots"][0]["subject"], "CN=podsteer mesh CA for cluster.local, O=cluster.local", "{c}");
    let ids: Vec<&str> = c["certificates"].as_array().into_iter().flatten().filter_map(|x| x["identity"].as_str()).collect();
    assert_eq!(ids, [CLIENT_ID, "spiffe://cluster.local/ns/production/sa/payment"]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    for cert in c["certificates"].as_array().into_iter().flatten() {
        assert_eq!(cert["issuer"], "CN=podsteer mesh CA for cluster.local, O=cluster.local");
        let (renew, expire) = (cert["renew_at"].as_u64().unwrap_or(0), cert["not_after"].as_u64().unwrap_or(0));
        // 24 h by default, renewed at half-life give or take a tenth.
        assert!(expire > now + 23 * 3600 && renew > now + 9 * 3600 && renew < now + 15 * 3600, "{cert}");
    }
    let table = String::from_utf8_lossy(&mesh.ctl(0, &["certs"]).output()?.stdout).into_owned();
    // For the README (shown with --nocapture).
    println!("$ podsteer certs\n{table}");
    assert!(table.contains(CLIENT_ID) && (table.contains("in 23h") || table.contains("in 24h")), "{table}");
    for text in [c.to_string(), table] {
        assert!(!text.contains("PRIVATE") && !text.contains("\"key\""), "no key material: {text}");
    }
    mesh.agents[0].kill();
    let out = mesh.ctl(0, &["certs"]).output()?;
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("live only in the running agent's memory"));
    Ok(())
}

const LEDGER_POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ledger-l4\n  namespace: production\nspec:\n  selector:\n    matchLabels:\n      app: ledger\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/production/sa/order-service, cluster.local/ns/production/sa/checkout]\n";

/// Injected sidecars are in the mesh as the shared proxy's pods are: each
/// asks its agent for its own pod's certificate, the mesh view and the
/// policies (over the sidecar socket, as the proxy UID), then tunnels and
/// takes HBONE with that identity. Shared to sidecar, sidecar to shared and
/// sidecar to sidecar across nodes: no plaintext on the underlay, the
/// receiving side logs the sender's identity and judges it by policy, and
/// leaves renewed every two seconds reach the sidecars under load without a
/// failed connection. A pod may not ask for another pod's key, nor a
/// shared-mode pod for its own (the shared proxy holds it).
fn sidecars_speak_hbone_with_their_pods_identity(mode: &str) -> anyhow::Result<()> {
    let mut mesh = Mesh::new(2)?;
    let (ca_dir, wl, policies, scratch) =
        (mesh.ca("ca")?, mesh.scratch("workloads")?, mesh.scratch("policies")?, mesh.scratch("captures")?);
    put_policy(&policies, "ledger.yaml", LEDGER_POLICY)?;
    let p = policies.display().to_string();
    mesh.start_with(mode, &[&ca_dir, &ca_dir], &[&wl, &wl], &["--policy-dir", &p, "--cert-lifetime-ms", "4000"])?;
    let order = mesh.pod(0, "order", "order-service", true)?;
    let rogue = mesh.pod(0, "rogue", "rogue", true)?;
    let (checkout, checkout_sidecar) = mesh.sidecar_pod(0, "checkout", "checkout", &[])?;
    let (ledger, ledger_sidecar) = mesh.sidecar_pod(1, "ledger", "ledger", &[("app", "ledger")])?;
    let payment = mesh.pod(1, "payment", "payment", true)?;
    let _apps = [start_server(&ledger, None, &["echo", "[::]:8080"])?, start_server(&payment, None, &["echo", "[::]:8080"])?];
    mesh.wait_peers(10)?;
    for s in [&checkout_sidecar, &ledger_sidecar] {
        podsteer_lab::wait::until("the sidecar to know every mesh address", Duration::from_secs(5), || {
            (s.metric("podsteer_proxy_mesh_peers").ok()? == 10.0).then_some(())
        })?;
    }
    let sidecar_log = |s: &Proxy| std::fs::read_to_string(&s.log).unwrap_or_default();
    let logs =
        || format!("{}\n{}\n{}\n{}", mesh.proxy_log(0), mesh.proxy_log(1), sidecar_log(&checkout_sidecar), sidecar_log(&ledger_sidecar));

    let pcap = scratch.join("sidecars.pcap");
    let capture = mesh.cluster.capture(&pcap)?;
    let ledger_v4 = ledger.ipv4().expect("v4");
    for (from, to) in [(&order, ledger.ipv4()), (&order, ledger.ipv6()), (&checkout, payment.ipv4()), (&checkout, ledger.ipv6())] {
        let to = addr(to.expect("address"), 8080);
        let out = run_client(from, &["request", &to, "65536"]).map_err(|e| e.context(logs()))?;
        assert!(out.starts_with("ok 65536"), "{mode}: {} to {to}: {out}", from.name());
    }
    capture.wait_for("tcp port 15008", 10)?;
    let seen = capture.finish()?;
    assert_eq!(count(&pcap, "tcp port 8080")?, 0, "{mode}: none to the app port: {}", summary(&pcap));
    assert!(!contains(&seen, &marker()), "{mode}: no plaintext of meshed pods on the underlay");
    let checkout_id = "spiffe://cluster.local/ns/production/sa/checkout";
    let identified = |log: &str, id: &str| log.lines().filter(|l| l.contains("access") && l.contains(id)).count();
    assert!(identified(&sidecar_log(&ledger_sidecar), CLIENT_ID) >= 2, "{mode}: the ledger's sidecar logs order-service:\n{}", logs());
    assert!(identified(&sidecar_log(&ledger_sidecar), checkout_id) >= 1, "{mode}: and checkout, sidecar to sidecar:\n{}", logs());
    assert!(identified(&mesh.proxy_log(1), checkout_id) >= 1, "{mode}: the shared proxy logs the sidecar's identity:\n{}", logs());

    // The ledger's sidecar judges by the node's policies, with the pod's labels.
    assert!(run_client(&rogue, &["request", &addr(ledger_v4, 8080), "64"]).is_err(), "{mode}: rogue may not call the ledger");
    let denied = ledger_sidecar.metric(
        "podsteer_proxy_authz_denied_total{pod=\"production/ledger\",source_identity=\"spiffe://cluster.local/ns/production/sa/rogue\",destination_identity=\"spiffe://cluster.local/ns/production/sa/ledger\",policy=\"\"}",
    )?;
    assert_eq!(denied, 1.0, "{mode}");
    let certs = mesh.ctl_json(1, &["certs"])?;
    let ids: Vec<&str> = certs["certificates"].as_array().into_iter().flatten().filter_map(|x| x["identity"].as_str()).collect();
    assert!(
        ids.contains(&"spiffe://cluster.local/ns/production/sa/ledger"),
        "{mode}: the node's agent holds the sidecar pod's certificate: {certs}"
    );

    // Leaves of 4 s, renewed at about 2 s: over 7 s each sidecar takes several.
    let renewed_before = sidecar_log(&ledger_sidecar).matches("certificate renewed").count();
    let loads = [load(&order, addr(ledger_v4, 8080), 7000)?, load(&checkout, addr(payment.ipv4().expect("v4"), 8080), 7000)?];
    for l in loads {
        let line = l.join().map_err(|_| anyhow::anyhow!("load panicked"))??;
        let (n, failures) = load_result(&line);
        assert!(n > 50 && failures == 0, "{mode}: no failed connection across renewals: {line}\n{}", logs());
    }
    let renewed = sidecar_log(&ledger_sidecar).matches("certificate renewed").count() - renewed_before;
    assert!(renewed >= 2, "{mode}: the ledger's sidecar took {renewed} renewals in 7 s");

    // Asking the agent as a pod's proxy UID: its own pod's material only, and only a sidecar's.
    let ask = |pod: &podsteer_lab::Pod, uid: &str| -> anyhow::Result<podsteer_agent::api::Response> {
        let mut cmd = pod.command("setpriv")?;
        cmd.args(["--reuid", "1337", "--regid", "1337", "--clear-groups"]).arg(podsteer_lab::agent::bin("podsteer-lab-tool"));
        let req = podsteer_agent::api::Request::SidecarMesh { uid: uid.into(), seen: None };
        let out = cmd.args(["agent-call", &mesh.sidecar_socket(0).display().to_string(), &serde_json::to_string(&req)?]).output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let own = ask(&checkout, checkout.uid())?;
    assert_eq!(own.data.as_ref().map(|d| d["material"]["cert"]["identity"].clone()), Some(checkout_id.into()), "{mode}: {own:?}");
    for (what, r) in [
        ("checkout asking for order's key", ask(&checkout, order.uid())?),
        ("a shared-mode pod asking for its own", ask(&order, order.uid())?),
    ] {
        let e = r.error.unwrap_or_else(|| panic!("{mode}: {what} was answered"));
        assert_eq!(e.kind, podsteer_agent::api::ErrorKind::Forbidden, "{mode}: {what}: {}", e.message);
    }
    Ok(())
}
podsteer_lab::both_modes!(sidecars_speak_hbone_with_their_pods_identity);

/// Two nodes whose agents watch a lab API server (Istio's CRDs not
/// installed), order-service on node 0, payment (`app: payment`) on node 1
/// with an echo server on 8080.
fn api_mesh() -> anyhow::Result<(Mesh, podsteer_lab::Pod, podsteer_lab::Pod, podsteer_lab::process::LabProcess)> {
    let mut mesh = Mesh::new(2)?;
    let ca_dir = mesh.ca("ca")?;
    mesh.start_api("ebpf", &ca_dir, false, &[])?;
    let order = mesh.pod(0, "order", "order-service", true)?;
    let payment = mesh.pod_in(1, "production", "payment", "payment", &[("app", "payment")], true)?;
    let app = start_server(&payment, None, &["echo", "[::]:8080"])?;
    Ok((mesh, order, payment, app))
}

/// An `AuthorizationPolicy` (or any object) written as YAML, as JSON for the lab's API server.
fn object(yaml: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_yaml::from_str(yaml)?)
}

/// `--kubernetes`: the API server is the source of who each pod is, of the
/// mesh's peers and of the policies. A pod the API places on another node is
/// not enrolled here; Istio's CRDs missing means no policy (not a closed
/// door); a policy created, refused as invalid (the last good set stays),
/// and deleted takes effect through the watch, which survives the server
/// ending it; with the agent stopped, `explain` works from what the watches
/// saved, and an agent restarted while the API is down answers from it too.
#[test]
fn the_kubernetes_api_gives_identities_peers_and_policies() -> anyhow::Result<()> {
    let (mut mesh, order, payment, _app) = api_mesh()?;
    let rogue = mesh.pod(0, "rogue", "rogue", true)?;
    mesh.wait_peers(6)?;
    // Dropped before the mesh: the agents then see the API go away, as in any cluster.
    let api = mesh.api.take().expect("the API server");
    let to = addr(payment.ipv4().expect("v4"), 8080);

    // The identity is the API's, and the path HBONE; without Istio's CRDs no policy applies.
    assert!(run_client(&order, &["request", &to, "64"])?.starts_with("ok"));
    assert!(run_client(&rogue, &["request", &to, "64"])?.starts_with("ok"), "no policy: allowed");
    podsteer_lab::wait::until("payment's proxy to log order's identity", Duration::from_secs(5), || {
        mesh.proxy_log(1).contains(&format!("peer_identity={CLIENT_ID}")).then_some(())
    })?;
    let status = mesh.agents[1].status()?;
    let k = &status["kubernetes"];
    assert_eq!((k["synced"].as_bool(), k["pods"].as_u64()), (Some(true), Some(3)), "{status}");
    assert_eq!(k["policies"]["AuthorizationPolicy"]["crd_installed"], false, "{status}");
    let out = mesh.ctl(1, &["status"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.contains("workloads")
            && l.contains("kubernetes: 3 pods listed; AuthorizationPolicy (no CRD), PeerAuthentication (no CRD)")),
        "{text}"
    );
    // Installed now: the watches look again within their backoff.
    api.set_crds(true);

    // A pod the API has on node 1, added on node 0: not this node's to sign.
    let stray = mesh.cluster.nodes[0].add_pod(PodSpec::new("production", "stray"))?;
    api.apply(podsteer_lab::apiserver::pod_object(&stray, "payment", &podsteer_lab::mesh::node_name(1), &[]))?;
    let before = mesh.agents[0].pods()?;
    let e = mesh.agents[0].add_pod(&stray, &[])?.expect_err("another node's pod");
    assert!(e.message.contains("is on node lab-node-1 to the workload source, and this is node lab-node-0"), "{e}");
    assert_eq!(mesh.agents[0].pods()?, before, "nothing enrolled");
    api.delete("Pod", "production", "stray")?;

    // The CRDs installed and the seed's L4 policy created: rogue is refused, order is not.
    let updates = |m: &Mesh| m.proxies[1].metric("podsteer_proxy_policy_updates_total");
    let seen = updates(&mesh)?;
    api.apply(object(PAYMENT_POLICY)?)?;
    podsteer_lab::wait::until("payment's proxy to take the API's policy", Duration::from_secs(20), || {
        (updates(&mesh).ok()? > seen && run_client(&rogue, &["request", &to, "64"]).is_err()).then_some(())
    })?;
    assert!(run_client(&order, &["request", &to, "64"])?.starts_with("ok"), "order-service is allowed");

    // An invalid policy is refused by both agents; the last good set stays.
    let mut bad = object(PAYMENT_POLICY)?;
    bad["metadata"]["name"] = "typo".into();
    bad["spec"]["action"] = "PERMIT".into();
    api.apply(bad)?;
    for (i, a) in mesh.agents.iter().enumerate() {
        podsteer_lab::wait::until(&format!("node {i}'s agent to refuse the invalid policy"), Duration::from_secs(10), || {
            (a.metric("podsteer_agent_policies_refused_total").ok()? >= 1.0).then_some(())
        })?;
        let st = a.status()?;
        assert!(st["policies_refused"].as_str().is_some_and(|r| r.contains("PERMIT")), "{st}");
        let out = mesh.ctl(i, &["status"]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.lines().any(|l| l.contains("REFUSED, the last good set is in force") && l.contains("PERMIT")), "{text}");
    }
    assert!(run_client(&rogue, &["request", &to, "64"]).is_err(), "still refused");
    assert!(run_client(&order, &["request", &to, "64"])?.starts_with("ok"), "still allowed");

    // With node 1's agent stopped, explain reads what its watches saved.
    mesh.agents[1].kill();
    let e = mesh.explain(1, &rogue.ipv4().expect("v4").to_string(), &to)?;
    let a = &e["authorization"];
    assert_eq!((a["decision"].as_str(), a["decided_by"].as_str()), (Some("deny"), Some("default")), "{e}");
    assert_eq!(a["destination_identity"], "spiffe://cluster.local/ns/production/sa/payment", "{e}");
    mesh.agents[1].restart()?;

    // Every watch open now is ended by the server (as the API server ends
    // them) and re-opened; the deletions after that still arrive.
    let opened = api.watches();
    podsteer_lab::wait::until("the server to end every open watch", Duration::from_secs(10), || {
        (api.watches_ended() >= opened).then_some(())
    })?;
    api.delete("AuthorizationPolicy", "production", "typo")?;
    api.delete("AuthorizationPolicy", "production", "payment-l4")?;
    podsteer_lab::wait::until("rogue to be allowed once the policy is deleted", Duration::from_secs(10), || {
        run_client(&rogue, &["request", &to, "64"]).ok().filter(|o| o.starts_with("ok"))
    })?;
    assert_eq!(api.unauthorized(), 0, "every request carried the kubeconfig's token");

    // A pod deleted from the API leaves the peers of every node, even when
    // its deletion was compacted away before a watch saw it (410 Gone, then
    // a fresh list: what the list no longer holds is gone).
    assert!(api.delete_unseen("Pod", "production", "rogue")?);
    mesh.wait_peers(4)?;

    // The API down: a restarted agent answers from its snapshot (saved
    // within a second of a change), and the peers it hands the proxy are
    // still the mesh's.
    podsteer_lab::wait::until("node 0's snapshot to catch up", Duration::from_secs(5), || {
        (mesh.agents[0].status().ok()?["kubernetes"]["saved"] == true).then_some(())
    })?;
    mesh.agents[0].kill();
    drop(api);
    mesh.agents[0].restart()?;
    let st = mesh.agents[0].status()?;
    assert_eq!((st["kubernetes"]["synced"].as_bool(), st["kubernetes"]["from_snapshot"].as_bool()), (Some(false), Some(true)), "{st}");
    mesh.wait_peers(4)?;
    assert!(run_client(&order, &["request", &to, "64"])?.starts_with("ok"), "HBONE from the snapshot's peers");
    Ok(())
}

/// A mesh larger than one control message (2,000 pod addresses elsewhere in
/// the cluster, about 150 KiB of view): every proxy still gets the whole
/// view, and HBONE between this node's pods goes on.
#[test]
fn a_mesh_view_larger_than_a_control_message_reaches_every_proxy() -> anyhow::Result<()> {
    let (mesh, order, payment, _app) = api_mesh()?;
    let api = mesh.api.as_ref().expect("the API server");
    for i in 0..2000u32 {
        let (name, ip) = (format!("elsewhere-{i}"), format!("10.99.{}.{}", i / 250, 1 + i % 250));
        api.apply(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "production", "uid": format!("elsewhere-uid-{i}") },
            "spec": { "serviceAccountName": format!("account-{}", i % 50), "nodeName": "lab-node-far", "containers": [] },
            "status": { "phase": "Running", "podIPs": [{ "ip": ip }] },
        }))?;
    }
    mesh.wait_peers(2004)?;
    assert!(mesh.proxy_log(0).contains("mesh view peers=2004"), "{}", mesh.proxy_log(0));
    assert!(run_client(&order, &["request", &addr(payment.ipv4().expect("v4"), 8080), "64"])?.starts_with("ok"));
    // The server's proxy logs the stream when it ends, just after the client's reply.
    podsteer_lab::wait::until("payment's proxy to log order's HBONE stream", Duration::from_secs(5), || {
        mesh.proxy_log(1).contains(&format!("peer_identity={CLIENT_ID}")).then_some(())
    })?;
    Ok(())
}
