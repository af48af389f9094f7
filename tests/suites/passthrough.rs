//! The proxy only where it adds something: a meshed pod's connections to
//! unmeshed destinations go direct, and the kernel accounts them; the agent
//! writes the access line and the series the proxy would have.

use std::collections::BTreeMap;
use std::time::Duration;

use podsteer_lab::agent::Agent;
use podsteer_lab::process::LabProcess;
use podsteer_lab::proxy::Proxy;
use podsteer_lab::workload::{addr, run_client, start_server};
use podsteer_lab::{Node, NodeOptions, Pod, PodSpec, wait};

const FORCED: (&str, &str) = ("podsteer.io/unmeshed-outbound", "proxy");

/// One node: meshed `direct` (the default) and `forced` (every connection
/// through the proxy), and an unmeshed server pod.
struct Scene {
    _apps: Vec<LabProcess>,
    proxy: Proxy,
    direct: Pod,
    forced: Pod,
    server: Pod,
    agent: Agent,
    _node: Node,
}

impl Scene {
    fn new() -> anyhow::Result<Scene> {
        let node = Node::new(NodeOptions::default())?;
        let agent = Agent::start_with_proxy(&node, "ebpf", &["--unmeshed-outbound", "direct"])?;
        let proxy = Proxy::start_shared(&node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?;
        let direct = node.add_pod(PodSpec::new("default", "direct"))?;
        let forced = node.add_pod(PodSpec::new("default", "forced"))?;
        let server = node.add_pod(PodSpec::new("default", "server"))?;
        agent.add_pod(&direct, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
        agent.add_pod(&forced, &[FORCED])?.map_err(|e| anyhow::anyhow!("{e}"))?;
        let apps =
            vec![start_server(&server, None, &["echo", "[::]:8080"])?, start_server(&server, None, &["halfclose-server", "[::]:9000"])?];
        Ok(Scene { _apps: apps, proxy, direct, forced, server, agent, _node: node })
    }

    fn to(&self, port: u16) -> String {
        addr(self.server.ipv4().expect("v4"), port)
    }

    fn agent_metric(&self, name: &str, pod: &str, extra: &str) -> anyhow::Result<f64> {
        self.agent.metric(&format!("podsteer_proxy_{name}{{pod=\"default/{pod}\",direction=\"outbound\"{extra},path=\"direct\"}}"))
    }

    fn proxy_opened(&self, pod: &str) -> anyhow::Result<f64> {
        self.proxy.metric(&format!("podsteer_proxy_connections_opened_total{{pod=\"default/{pod}\",direction=\"outbound\"}}"))
    }
}

/// The fields of an access line (after `access:`), quotes taken off.
fn access_fields(line: &str) -> Option<BTreeMap<String, String>> {
    let (_, rest) = line.split_once(" access: ")?;
    Some(rest.split_whitespace().filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned())).collect())
}

fn access_lines(log: &str) -> Vec<BTreeMap<String, String>> {
    log.lines().filter_map(access_fields).filter(|f| f.contains_key("result")).collect()
}

/// The access line of one connection, once it is written.
fn line_where(
    what: &str,
    log: impl Fn() -> String,
    pick: impl Fn(&BTreeMap<String, String>) -> bool,
) -> anyhow::Result<BTreeMap<String, String>> {
    wait::until(what, Duration::from_secs(5), || access_lines(&log()).into_iter().find(|f| pick(f))).map_err(|e| e.context(log()))
}

fn local_of(out: &str) -> Option<String> {
    out.split_whitespace().find_map(|w| w.strip_prefix("local=")).map(str::to_owned)
}

fn num(f: &BTreeMap<String, String>, k: &str) -> u64 {
    f.get(k).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
}

/// Each case twice, from `direct` and from `forced`: the agent's line for
/// the direct one matches the proxy's for the forced one, field for field
/// (bytes, result; duration within 250 ms), and both are what the app did.
#[test]
fn direct_connections_are_accounted_as_the_proxy_would_have() -> anyhow::Result<()> {
    let s = Scene::new()?;
    let v6 = addr(s.server.ipv6().expect("v6"), 8080);
    // (name, tool arguments, result, bytes from the app, bytes to the app)
    let cases: Vec<(&str, Vec<String>, &str, u64, u64)> = vec![
        ("echo", vec!["request".into(), s.to(8080), "65536".into()], "ok", 65536, 65536),
        ("echo over IPv6", vec!["request".into(), v6, "1000".into()], "ok", 1000, 1000),
        // "A" and 1000 bytes, FIN; "got 1000\n" back.
        ("client half-close", vec!["halfclose".into(), s.to(9000), "client".into(), "--local".into()], "ok", 1001, 9),
        // "B"; "bye\n" and the server's FIN; 777 bytes more after it.
        ("server half-close", vec!["halfclose".into(), s.to(9000), "server".into(), "--local".into()], "ok", 778, 4),
        ("server reset", vec!["reset".into(), s.to(9000), "server".into(), "--local".into()], "backend_disconnected", 1, 0),
        // "D"; "ready\n"; then the app closes with SO_LINGER 0.
        ("client reset", vec!["reset".into(), s.to(9000), "client".into(), "--local".into()], "client_disconnected", 1, 6),
        ("refused", vec!["try".into(), s.to(9)], "connect_failed", 0, 0),
    ];
    for (name, args, result, from_app, to_app) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut seen = Vec::new();
        for (pod, log) in [
            (&s.direct, Box::new(|| s.agent.log_text()) as Box<dyn Fn() -> String>),
            (&s.forced, Box::new(|| std::fs::read_to_string(&s.proxy.log).unwrap_or_default())),
        ] {
            let out = run_client(pod, &args).map_err(|e| e.context(format!("{name} from {}", pod.name())))?;
            let label = format!("default/{}", pod.name());
            let line = match local_of(&out) {
                Some(local) => line_where(&format!("{name}: the access line of {local}"), &log, |f| f.get("client") == Some(&local))?,
                // A refused connect has no address of its own: the pod's only connection to port 9.
                None => line_where(&format!("{name}: the access line of {label}"), &log, |f| {
                    f.get("pod") == Some(&label) && f.get("original_dst").is_some_and(|d| d.ends_with(":9"))
                })?,
            };
            assert_eq!(line.get("pod"), Some(&label), "{name}: {line:?}");
            assert_eq!(line.get("path").map(String::as_str), (pod.name() == "direct").then_some("direct"), "{name}: {line:?}");
            seen.push(line);
        }
        let (direct, proxied) = (&seen[0], &seen[1]);
        for (k, want) in [("bytes_from_client", *from_app), ("bytes_to_client", *to_app)] {
            assert_eq!((num(direct, k), num(proxied, k)), (want, want), "{name} {k}: direct {direct:?}, proxied {proxied:?}");
        }
        assert_eq!((direct["result"].as_str(), proxied["result"].as_str()), (*result, *result), "{name}: {direct:?} {proxied:?}");
        assert_eq!(direct.get("original_dst"), proxied.get("original_dst"), "{name}");
        for k in ["direction", "peer_identity", "policy", "reason", "identity"] {
            assert_eq!(direct.get(k), proxied.get(k), "{name}: {k}");
        }
        let (d, p) = (num(direct, "duration_ms"), num(proxied, "duration_ms"));
        assert!(d.abs_diff(p) <= 250, "{name}: durations {d} ms direct, {p} ms proxied");
    }

    // The series come from the kernel's totals, not the records: they agree
    // with the lines, and the proxy never saw a direct connection.
    let lines = || {
        access_lines(&s.agent.log_text())
            .into_iter()
            .filter(|f| f.get("pod").map(String::as_str) == Some("default/direct"))
            .collect::<Vec<_>>()
    };
    let want = lines().len() as f64;
    wait::until("the direct series to count every connection", Duration::from_secs(5), || {
        (s.agent_metric("connections_opened_total", "direct", "").ok()? == want).then_some(())
    })?;
    for result in ["ok", "backend_disconnected", "client_disconnected", "connect_failed"] {
        let n = lines().iter().filter(|f| f.get("result").map(String::as_str) == Some(result)).count() as f64;
        assert_eq!(s.agent_metric("connections_closed_total", "direct", &format!(",result=\"{result}\""))?, n, "{result}");
    }
    let bytes: u64 = lines().iter().map(|f| num(f, "bytes_from_client")).sum();
    assert_eq!(s.agent_metric("bytes_from_client_total", "direct", "")?, bytes as f64);
    assert_eq!(s.proxy_opened("direct")?, 0.0, "no direct connection reached the proxy");
    assert!(s.proxy_opened("forced")? >= cases.len() as f64, "every forced one did");
    assert_eq!(s.agent.metric("podsteer_agent_ebpf_events{counter=\"records_lost\"}")?, 0.0);
    Ok(())
}

/// A connect to a meshed pod is proxied; one to an unmeshed pod goes direct
/// until that pod is enrolled, and from then on new connections are proxied
/// while the one already open stays as it was. `explain` says which and why.
#[test]
fn a_destination_that_becomes_meshed_is_proxied_from_then_on() -> anyhow::Result<()> {
    let s = Scene::new()?;
    let ctl = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = std::process::Command::new(podsteer_lab::agent::bin("podsteer"))
            .args(["--bpffs", &s.agent.bpffs.display().to_string(), "--state-dir", &s.agent.state_dir.display().to_string()])
            .args(["--socket", &s.agent.socket.display().to_string()])
            .args(args)
            .args(["--output", "json"])
            .output()?;
        anyhow::ensure!(out.status.success(), "podsteer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let e = ctl(&["explain", "default/direct", &s.to(8080)])?;
    assert_eq!(e["intercepted"], false, "{e}");
    assert!(e["reason"].as_str().unwrap_or("").contains("not meshed"), "{e}");

    let ok = |out: String| assert!(out.starts_with("ok 100"), "{out}");
    ok(run_client(&s.direct, &["request", &s.to(8080), "100"])?);
    assert_eq!(s.proxy_opened("direct")?, 0.0);
    // A connection that stays open across the enrolment.
    let mut chat = s.direct.command(podsteer_lab::agent::bin("podsteer-lab-tool"))?;
    chat.args(["chat", &s.to(8080)]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut chat = chat.spawn()?;
    let mut stdin = chat.stdin.take().expect("stdin");
    let mut stdout = std::io::BufReader::new(chat.stdout.take().expect("stdout"));
    let mut say = |msg: &str| -> anyhow::Result<String> {
        use std::io::{BufRead as _, Write as _};
        writeln!(stdin, "{msg}")?;
        let mut line = String::new();
        while !line.ends_with(&format!("{msg}\n")) {
            line.clear();
            anyhow::ensure!(stdout.read_line(&mut line)? > 0, "chat ended");
        }
        Ok(line)
    };
    say("before")?;

    s.agent.add_pod(&s.server, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let e = ctl(&["explain", "default/direct", &s.to(8080)])?;
    assert_eq!(e["intercepted"], true, "{e}");
    assert!(e["decided_by"].as_str().unwrap_or("").contains("meshed"), "{e}");
    ok(run_client(&s.direct, &["request", &s.to(8080), "100"])?);
    assert_eq!(s.proxy_opened("direct")?, 1.0, "the new connection went through the proxy");
    say("after")?;
    drop(stdin);
    let _ = chat.wait();
    // The chat was opened direct and is accounted there, with the first request.
    wait::until("both direct connections to be closed and counted", Duration::from_secs(5), || {
        (s.agent_metric("connections_closed_total", "direct", ",result=\"ok\"").ok()? == 2.0).then_some(())
    })?;
    assert_eq!(s.proxy_opened("direct")?, 1.0);
    Ok(())
}

/// With the agent frozen (SIGSTOP: it reads nothing), a burst of connections
/// more than twice what the ring buffer holds: none fails, the records that did
/// not fit are counted lost, and lines plus lost records add up to every
/// connection the totals (which lose nothing) counted.
#[test]
fn a_full_ring_buffer_loses_records_visibly_and_no_connection() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    let s = Scene::new()?;
    // Every connection leaves a TIME_WAIT for a minute: give the burst's
    // client the whole port range of its own netns.
    podsteer_lab::netns::run_in(s.direct.netns().fd(), "port range", || {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000")
    })??;
    let fits = (podsteer_common::CONN_EVENTS_BYTES as usize / (std::mem::size_of::<podsteer_common::ConnRecord>() + 8)) as f64;
    s.agent.signal(Signal::SIGSTOP)?;
    let burst = || run_client(&s.direct, &["loop", &s.to(8080), "8000"]);
    let (one, two) = std::thread::scope(|sc| {
        let a = sc.spawn(burst);
        let b = sc.spawn(burst);
        (a.join(), b.join())
    });
    s.agent.signal(Signal::SIGCONT)?;
    let mut made = 0.0;
    for out in [one, two] {
        let out = out.map_err(|_| anyhow::anyhow!("a burst loop panicked"))??;
        assert!(out.contains("failures=0"), "no connection fails: {out}");
        made += out.split_whitespace().find_map(|w| w.strip_prefix("n=")).and_then(|n| n.parse::<f64>().ok()).unwrap_or(0.0);
    }
    assert!(made > 2.0 * fits, "the burst made {made} connections, not twice the {fits} records the buffer holds");
    let lost = || s.agent.metric("podsteer_agent_ebpf_events{counter=\"records_lost\"}");
    let lines =
        || access_lines(&s.agent.log_text()).iter().filter(|f| f.get("pod").map(String::as_str) == Some("default/direct")).count() as f64;
    wait::until("lines and lost records to add up to every connection", Duration::from_secs(20), || {
        let opened = s.agent_metric("connections_opened_total", "direct", "").ok()?;
        (opened == made && lines() + lost().ok()? == made).then_some(())
    })
    .map_err(|e| e.context(format!("made {made}, lines {}, lost {:?}", lines(), lost())))?;
    assert!(lost()? > 0.0, "the burst overflowed the buffer");
    Ok(())
}
