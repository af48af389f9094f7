//! Authorization end to end on a two-node cluster: a table of cases (policy
//! set, source, destination, expected verdict and deciding rule), each run as
//! a real connection through the destination's proxy and through `podsteer
//! explain` on the source's node, which must agree with each other and with
//! the table.

use podsteer_lab::mesh::Mesh;
use podsteer_lab::workload::{addr, run_client, start_server};

/// An AuthorizationPolicy in `production` (or `ns`), its spec as YAML lines.
fn ap(ns: &str, name: &str, spec: &str) -> String {
    let spec: String = spec.trim_matches('\n').lines().map(|l| format!("  {l}\n")).collect();
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}---\n")
}

fn pa(name: &str, spec: &str) -> String {
    let spec: String = spec.trim_matches('\n').lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: production\nspec:\n{spec}---\n"
    )
}

struct Case {
    name: &'static str,
    policies: String,
    source: &'static str,
    dest: &'static str,
    port: u16,
    allow: bool,
    decided_by: String,
}

fn case(name: &'static str, policies: &str, source: &'static str, dest: &'static str, port: u16, allow: bool, decided_by: &str) -> Case {
    Case { name, policies: policies.into(), source, dest, port, allow, decided_by: decided_by.into() }
}

/// The seed document's payment policy as written: its only rule needs the
/// HTTP method and path, which L4 cannot see.
const SEED: &str = "selector:\n  matchLabels:\n    app: payment\nrules:\n- from:\n  - source:\n      principals: [cluster.local/ns/production/sa/order-service, cluster.local/ns/production/sa/refund-service]\n  to:\n  - operation:\n      methods: [POST]\n      paths: [/api/v1/charge, /api/v1/refund]\n";

fn cases(payment_ip: std::net::IpAddr) -> Vec<Case> {
    let l4_seed = ap(
        "production",
        "payment-l4",
        "selector:\n  matchLabels:\n    app: payment\nrules:\n- from:\n  - source:\n      principals: [cluster.local/ns/production/sa/order-service, cluster.local/ns/production/sa/refund-service]\n  to:\n  - operation:\n      ports: [\"8080\"]\n",
    );
    let allow =
        |name: &str, rule: &str| ap("production", name, &format!("selector:\n  matchLabels:\n    app: payment\nrules:\n- {rule}\n"));
    let deny_staging = ap("production", "deny-staging", "action: DENY\nrules:\n- from:\n  - source:\n      namespaces: [staging]\n");
    let mesh_deny = ap("istio-system", "deny-staging-mesh", "action: DENY\nrules:\n- from:\n  - source:\n      namespaces: [staging]\n");
    let prefix = allow("prefix", "from:\n  - source:\n      principals: [\"cluster.local/ns/production/*\"]");
    let suffix = allow("suffix", "from:\n  - source:\n      principals: [\"*/sa/order-service\"]");
    let not_order = allow("not-order", "from:\n  - source:\n      notPrincipals: [cluster.local/ns/production/sa/order-service]");
    let in_production = allow("in-production", "from:\n  - source:\n      namespaces: [production]");
    let not_production = allow("not-production", "from:\n  - source:\n      notNamespaces: [production]");
    let node0_ips = allow("node0", "from:\n  - source:\n      ipBlocks: [10.244.0.0/24]");
    let not_node0 = allow("not-node0", "from:\n  - source:\n      notIpBlocks: [10.244.0.0/24]");
    let not_9090 = allow("not-9090", "to:\n  - operation:\n      notPorts: [\"9090\"]");
    let when_ns = allow("when-ns", "when:\n  - key: source.namespace\n    values: [production]");
    let when_refund = allow("when-refund", "when:\n  - key: source.principal\n    values: [cluster.local/ns/production/sa/refund-service]");
    let when_9090 = allow("when-9090", "when:\n  - key: destination.port\n    values: [\"9090\"]");
    let when_ip = allow("when-ip", &format!("when:\n  - key: destination.ip\n    values: [\"{payment_ip}\"]"));
    let deny_get = ap(
        "production",
        "deny-get",
        "selector:\n  matchLabels:\n    app: payment\naction: DENY\nrules:\n- to:\n  - operation:\n      methods: [GET]\n",
    );
    let deny_refund_allow_prod = ap(
        "production",
        "deny-refund",
        "action: DENY\nrules:\n- from:\n  - source:\n      principals: [cluster.local/ns/production/sa/refund-service]\n",
    ) + &ap("production", "allow-prod", "rules:\n- from:\n  - source:\n      namespaces: [production]\n");
    let audit = ap(
        "production",
        "audit-order",
        "action: AUDIT\nrules:\n- from:\n  - source:\n      principals: [cluster.local/ns/production/sa/order-service]\n",
    );
    let dry_deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: dry-deny\n  namespace: production\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/production/sa/order-service]\n---\n".to_string();
    let other_selector = ap("production", "other", "selector:\n  matchLabels:\n    app: other\naction: DENY\nrules:\n- {}\n");
    let by_version = ap("production", "v1", "selector:\n  matchLabels:\n    version: v1\naction: DENY\nrules:\n- {}\n");
    let strict = pa("strict", "mtls:\n  mode: STRICT\n");
    let strict_but_9090 = pa(
        "strict",
        "selector:\n  matchLabels:\n    app: payment\nmtls:\n  mode: STRICT\nportLevelMtls:\n  \"9090\":\n    mode: PERMISSIVE\n",
    );
    vec![
        case("no policy: a meshed client", "", "order", "payment", 8080, true, "default"),
        case("no policy: plaintext under PERMISSIVE", "", "outsider", "payment", 8080, true, "default"),
        case("L4 seed: order-service", &l4_seed, "order", "payment", 8080, true, "production/payment-l4#0"),
        case("L4 seed: refund-service", &l4_seed, "refund", "payment", 8080, true, "production/payment-l4#0"),
        case("L4 seed: staging's order-service", &l4_seed, "staging-order", "payment", 8080, false, "default"),
        case("L4 seed: another port", &l4_seed, "order", "payment", 9090, false, "default"),
        case("L4 seed: plaintext has no principal", &l4_seed, "outsider", "payment", 8080, false, "default"),
        case("L4 seed: another workload is not selected", &l4_seed, "order", "reviews", 8080, true, "default"),
        case(
            "seed as written: an L7 ALLOW matches nothing at L4",
            &ap("production", "payment-service-policy", SEED),
            "order",
            "payment",
            8080,
            false,
            "default",
        ),
        case("namespace DENY: staging", &deny_staging, "staging-order", "payment", 8080, false, "production/deny-staging#0"),
        case("namespace DENY: production passes", &deny_staging, "order", "payment", 8080, true, "default"),
        case(
            "root namespace DENY applies everywhere",
            &mesh_deny,
            "staging-order",
            "reviews",
            8080,
            false,
            "istio-system/deny-staging-mesh#0",
        ),
        case("principal prefix matches", &prefix, "refund", "payment", 8080, true, "production/prefix#0"),
        case("principal prefix misses", &prefix, "staging-order", "payment", 8080, false, "default"),
        case("principal suffix matches across namespaces", &suffix, "staging-order", "payment", 8080, true, "production/suffix#0"),
        case("notPrincipals lets the others in", &not_order, "refund", "payment", 8080, true, "production/not-order#0"),
        case("notPrincipals keeps order out", &not_order, "order", "payment", 8080, false, "default"),
        case("namespaces", &in_production, "refund", "payment", 8080, true, "production/in-production#0"),
        case("notNamespaces", &not_production, "order", "payment", 8080, false, "default"),
        case("ipBlocks admit plaintext by address", &node0_ips, "outsider", "payment", 8080, true, "production/node0#0"),
        case("notIpBlocks", &not_node0, "order", "payment", 8080, false, "default"),
        case("notPorts keeps 9090 out", &not_9090, "order", "payment", 9090, false, "default"),
        case("notPorts lets 8080 in", &not_9090, "order", "payment", 8080, true, "production/not-9090#0"),
        case("when source.namespace", &when_ns, "refund", "payment", 8080, true, "production/when-ns#0"),
        case("when source.principal misses", &when_refund, "order", "payment", 8080, false, "default"),
        case("when destination.port", &when_9090, "order", "payment", 9090, true, "production/when-9090#0"),
        case("when destination.ip", &when_ip, "order", "payment", 8080, true, "production/when-ip#0"),
        case("a DENY naming L7 fields denies on its L4 part", &deny_get, "order", "payment", 8080, false, "production/deny-get#0"),
        case("DENY before ALLOW", &deny_refund_allow_prod, "refund", "payment", 8080, false, "production/deny-refund#0"),
        case("ALLOW when no DENY matches", &deny_refund_allow_prod, "order", "payment", 8080, true, "production/allow-prod#0"),
        case("AUDIT decides nothing", &audit, "order", "payment", 8080, true, "default"),
        case("a dry-run DENY is not enforced", &dry_deny, "order", "payment", 8080, true, "default"),
        case("a selector that selects another workload", &other_selector, "order", "payment", 8080, true, "default"),
        case("a selector on another label", &by_version, "order", "payment", 8080, false, "production/v1#0"),
        case("STRICT refuses plaintext", &strict, "outsider", "payment", 8080, false, "production/strict"),
        case("STRICT, but PERMISSIVE on 9090", &strict_but_9090, "outsider", "payment", 9090, true, "default"),
    ]
}

#[test]
fn every_case_gets_its_verdict_on_the_wire_and_in_explain() -> anyhow::Result<()> {
    let mut mesh = Mesh::new(2)?;
    let (ca_dir, wl, policies) = (mesh.ca("ca")?, mesh.scratch("workloads")?, mesh.scratch("policies")?);
    let p = policies.display().to_string();
    mesh.start_with("ebpf", &[&ca_dir, &ca_dir], &[&wl, &wl], &["--policy-dir", &p])?;
    let sources = [
        ("order", mesh.pod_in(0, "production", "order", "order-service", &[], true)?),
        ("refund", mesh.pod_in(0, "production", "refund", "refund-service", &[], true)?),
        ("staging-order", mesh.pod_in(0, "staging", "order-staging", "order-service", &[], true)?),
        ("outsider", mesh.pod_in(0, "production", "outsider", "", &[], false)?),
    ];
    let dests = [
        ("payment", mesh.pod_in(1, "production", "payment", "payment", &[("app", "payment"), ("version", "v1")], true)?),
        ("reviews", mesh.pod_in(1, "production", "reviews", "reviews", &[("app", "reviews")], true)?),
    ];
    let mut apps = Vec::new();
    for (_, d) in &dests {
        apps.push(start_server(d, None, &["echo", "[::]:8080"])?);
        apps.push(start_server(d, None, &["echo", "[::]:9090"])?);
    }
    mesh.wait_peers(10)?;
    let ip =
        |pods: &[(&str, podsteer_lab::Pod)], name: &str| pods.iter().find(|(n, _)| *n == name).and_then(|(_, p)| p.ipv4()).expect("v4");
    let cases = cases(ip(&dests, "payment"));
    assert!(cases.len() >= 30, "at least 30 cases");
    let mut failures = Vec::new();
    for c in &cases {
        mesh.set_policies(&policies, &c.policies, 1)?;
        let (_, src) = sources.iter().find(|(n, _)| *n == c.source).expect("a source of the table");
        let to = addr(ip(&dests, c.dest), c.port);
        let wire = run_client(src, &["request", &to, "64"]).is_ok_and(|o| o.starts_with("ok"));
        // A pod of this node by name; the unmeshed one by its address.
        let who = if c.source == "outsider" { ip(&sources, "outsider").to_string() } else { format!("{}/{}", src.namespace(), src.name()) };
        let e = mesh.explain(0, &who, &to)?;
        let a = &e["authorization"];
        let explained = (a["decision"] == "allow", a["decided_by"].as_str().unwrap_or_default().to_string());
        if wire != c.allow || explained != (c.allow, c.decided_by.clone()) {
            failures.push(format!(
                "{}: expected {} by {}; the connection was {}, explain said {} by {}",
                c.name,
                if c.allow { "allow" } else { "deny" },
                c.decided_by,
                if wire { "allowed" } else { "refused" },
                a["decision"],
                explained.1
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases disagree:\n{}", failures.len(), cases.len(), failures.join("\n"));
    Ok(())
}

/// The seed's example as written: `explain` says which L7 fields L4 cannot
/// check and what it made of them, and shows the path, identities and mode.
#[test]
fn explain_names_the_l7_fields_of_the_seed_policy() -> anyhow::Result<()> {
    let mut mesh = Mesh::new(2)?;
    let (ca_dir, wl, policies) = (mesh.ca("ca")?, mesh.scratch("workloads")?, mesh.scratch("policies")?);
    let p = policies.display().to_string();
    mesh.start_with("ebpf", &[&ca_dir, &ca_dir], &[&wl, &wl], &["--policy-dir", &p])?;
    let order = mesh.pod_in(0, "production", "order", "order-service", &[], true)?;
    let payment = mesh.pod_in(1, "production", "payment", "payment", &[("app", "payment")], true)?;
    mesh.wait_peers(4)?;
    mesh.set_policies(&policies, &ap("production", "payment-service-policy", SEED), 1)?;
    let to = addr(payment.ipv4().expect("v4"), 8080);
    let e = mesh.explain(0, "production/order", &to)?;
    let a = &e["authorization"];
    assert_eq!(a["path"], "hbone", "{e}");
    assert_eq!(a["source_identity"], "spiffe://cluster.local/ns/production/sa/order-service");
    assert_eq!(a["destination_identity"], "spiffe://cluster.local/ns/production/sa/payment");
    assert_eq!(a["peer_authentication"], "PERMISSIVE");
    assert_eq!((a["decision"].as_str(), a["decided_by"].as_str()), (Some("deny"), Some("default")), "{e}");
    let notes = a["l7_notes"].to_string();
    assert!(
        notes.contains("to.operation.methods") && notes.contains("to.operation.paths") && notes.contains("matches nothing at L4"),
        "{notes}"
    );
    // The same in the table, with the agent stopped: explain reads files only.
    mesh.agents[0].kill();
    let out = mesh.ctl(0, &["explain", "production/order", &to]).output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    // For the README (shown with --nocapture).
    println!("$ podsteer explain production/order {to}\n{table}");
    assert!(
        table.contains("HBONE (mTLS)") && table.contains("DENY by default") && table.contains("L7:"),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = order;
    Ok(())
}
