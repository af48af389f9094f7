//! The semantics as a table: policy set, source, destination, the expected
//! verdict and the policy and rule that decide it (or the default). The same
//! table is meant to run end to end through real connections once mTLS
//! carries identities between nodes (issue #16).

use std::collections::BTreeMap;
use std::net::IpAddr;

use podsteer_authz::eval::{Conn, Decision, PolicySet, Workload};
use podsteer_authz::policy::{PolicyError, parse_yaml};
use podsteer_identity::spiffe::SpiffeId;

const ORDER: &str = "spiffe://cluster.local/ns/production/sa/order-service";
const REFUND: &str = "spiffe://cluster.local/ns/production/sa/refund-service";
const STAGING_ORDER: &str = "spiffe://cluster.local/ns/staging/sa/order-service";

/// The seed document's example, as written.
const SEED: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: payment-service-policy
  namespace: production
spec:
  selector:
    matchLabels:
      app: payment
  rules:
    - from:
        - source:
            principals:
              - "cluster.local/ns/production/sa/order-service"
              - "cluster.local/ns/production/sa/refund-service"
      to:
        - operation:
            methods: ["POST"]
            paths: ["/api/v1/charge", "/api/v1/refund"]
"#;

fn policy(ns: &str, name: &str, spec: &str) -> String {
    let spec = spec.trim_matches('\n');
    let indented: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{indented}---\n"
    )
}

struct Case {
    name: &'static str,
    policies: String,
    /// Source identity (None: plaintext) and address.
    source: Option<&'static str>,
    source_ip: &'static str,
    /// Destination workload: (namespace, app label), address and port.
    dest: (&'static str, &'static str),
    dest_ip: &'static str,
    port: u16,
    expect: Decision,
    /// "ns/name#rule", or "default".
    decided_by: &'static str,
}

fn case(
    name: &'static str,
    policies: String,
    source: Option<&'static str>,
    dest: (&'static str, &'static str),
    port: u16,
    expect: Decision,
    decided_by: &'static str,
) -> Case {
    Case { name, policies, source, source_ip: "10.244.1.5", dest, dest_ip: "10.244.0.7", port, expect, decided_by }
}

fn cases() -> Vec<Case> {
    use Decision::*;
    let pay = ("production", "payment");
    let reviews = ("default", "reviews");
    let l4_seed = policy(
        "production",
        "payment-l4",
        "selector:\n  matchLabels:\n    app: payment\nrules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/production/sa/order-service\", \"cluster.local/ns/production/sa/refund-service\"]\n  to:\n  - operation:\n      ports: [\"8080\"]",
    );
    let deny_staging = policy("production", "deny-staging", "action: DENY\nrules:\n- from:\n  - source:\n      namespaces: [staging]");
    let deny_delete = policy(
        "production",
        "no-deletes",
        "action: DENY\nrules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/production/sa/order-service\"]\n  to:\n  - operation:\n      methods: [DELETE]",
    );
    let allow_nothing = policy("production", "allow-nothing", "{}");
    let allow_all = policy("production", "allow-all", "rules:\n- {}");
    let deny_all = policy("production", "deny-all", "action: DENY\nrules:\n- {}");
    let root_deny_block =
        policy("istio-system", "block-bad-subnet", "action: DENY\nrules:\n- from:\n  - source:\n      ipBlocks: [\"10.244.9.0/24\"]");
    let reviews_only = policy(
        "default",
        "reviews-from-prod",
        "selector:\n  matchLabels:\n    app: reviews\nrules:\n- from:\n  - source:\n      namespaces: [production]",
    );
    let prefix = policy("production", "prod-prefix", "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/production/*\"]");
    let suffix = policy("production", "order-suffix", "rules:\n- from:\n  - source:\n      principals: [\"*/sa/order-service\"]");
    let any_auth = policy("production", "any-authenticated", "rules:\n- from:\n  - source:\n      principals: [\"*\"]");
    let not_order = policy(
        "production",
        "not-order",
        "rules:\n- from:\n  - source:\n      notPrincipals: [\"cluster.local/ns/production/sa/order-service\"]",
    );
    let when_ns = policy("production", "when-prod", "rules:\n- when:\n  - key: source.namespace\n    values: [production]");
    let deny_not_9090 =
        policy("production", "only-9090", "action: DENY\nrules:\n- when:\n  - key: destination.port\n    notValues: [\"9090\"]");
    let not_ports = policy("production", "not-9090", "rules:\n- to:\n  - operation:\n      notPorts: [\"9090\"]");
    let dry_deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: dry-deny-staging\n  namespace: production\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [staging]\n---\n".to_string();
    let audit = policy("production", "audit-all", "action: AUDIT\nrules:\n- {}");
    let remote = policy("production", "from-node-1", "rules:\n- from:\n  - source:\n      remoteIpBlocks: [\"10.244.1.0/24\"]");
    let other_selector = policy(
        "istio-system",
        "other-app",
        "selector:\n  matchLabels:\n    app: other\nrules:\n- from:\n  - source:\n      principals: [\"nobody\"]",
    );
    let header_allow = policy("production", "header-allow", "rules:\n- when:\n  - key: request.headers[x-user]\n    values: [alice]");
    let header_deny =
        policy("production", "header-deny", "action: DENY\nrules:\n- when:\n  - key: request.headers[x-user]\n    values: [mallory]");
    let dest_ip =
        policy("production", "deny-pod-range", "action: DENY\nrules:\n- when:\n  - key: destination.ip\n    values: [\"10.244.0.0/16\"]");
    let ns_allow = policy("production", "ns-prod", "rules:\n- from:\n  - source:\n      namespaces: [production]");
    let two_rules = policy(
        "production",
        "two-rules",
        "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/production/sa/refund-service\"]\n- to:\n  - operation:\n      ports: [\"9090\"]",
    );
    vec![
        case("no policy: allow by default", String::new(), Some(ORDER), pay, 8080, Allow, "default"),
        case("seed: an ALLOW rule with methods/paths matches nothing at L4", SEED.into(), Some(ORDER), pay, 8080, Deny, "default"),
        case("seed: refund-service likewise", SEED.into(), Some(REFUND), pay, 8080, Deny, "default"),
        case("seed: another workload is not selected", SEED.into(), Some(ORDER), reviews, 8080, Allow, "default"),
        case("L4 seed: order-service to 8080", l4_seed.clone(), Some(ORDER), pay, 8080, Allow, "production/payment-l4#0"),
        case("L4 seed: refund-service to 8080", l4_seed.clone(), Some(REFUND), pay, 8080, Allow, "production/payment-l4#0"),
        case("L4 seed: order-service to another port", l4_seed.clone(), Some(ORDER), pay, 9090, Deny, "default"),
        case("L4 seed: staging's order-service", l4_seed.clone(), Some(STAGING_ORDER), pay, 8080, Deny, "default"),
        case("L4 seed: plaintext has no principal", l4_seed.clone(), None, pay, 8080, Deny, "default"),
        case("DENY a namespace: staging", deny_staging.clone(), Some(STAGING_ORDER), pay, 8080, Deny, "production/deny-staging#0"),
        case("DENY a namespace: production passes", deny_staging.clone(), Some(ORDER), pay, 8080, Allow, "default"),
        case("DENY with methods: applies on its L4 part", deny_delete.clone(), Some(ORDER), pay, 8080, Deny, "production/no-deletes#0"),
        case("DENY with methods: others unaffected", deny_delete, Some(REFUND), pay, 8080, Allow, "default"),
        case("ALLOW with an empty spec denies all", allow_nothing, Some(ORDER), pay, 8080, Deny, "default"),
        case("ALLOW with an empty rule allows all", allow_all.clone(), None, pay, 8080, Allow, "production/allow-all#0"),
        case("DENY with an empty rule denies all", deny_all, Some(ORDER), pay, 8080, Deny, "production/deny-all#0"),
        Case {
            source_ip: "10.244.9.3",
            ..case(
                "root namespace DENY applies everywhere",
                root_deny_block.clone(),
                Some(ORDER),
                reviews,
                8080,
                Deny,
                "istio-system/block-bad-subnet#0",
            )
        },
        case("root namespace DENY: other addresses pass", root_deny_block, Some(ORDER), reviews, 8080, Allow, "default"),
        case("namespace policy with a selector: its workload", reviews_only.clone(), Some(STAGING_ORDER), reviews, 9080, Deny, "default"),
        case("namespace policy with a selector: not another namespace", reviews_only, Some(STAGING_ORDER), pay, 9080, Allow, "default"),
        case("principal prefix: production/*", prefix.clone(), Some(REFUND), pay, 8080, Allow, "production/prod-prefix#0"),
        case("principal prefix: not staging", prefix, Some(STAGING_ORDER), pay, 8080, Deny, "default"),
        case(
            "principal suffix: */sa/order-service from staging",
            suffix,
            Some(STAGING_ORDER),
            pay,
            8080,
            Allow,
            "production/order-suffix#0",
        ),
        case("principal *: any authenticated", any_auth.clone(), Some(STAGING_ORDER), pay, 8080, Allow, "production/any-authenticated#0"),
        case("principal *: not plaintext", any_auth, None, pay, 8080, Deny, "default"),
        case("notPrincipals: others pass", not_order.clone(), Some(REFUND), pay, 8080, Allow, "production/not-order#0"),
        case("notPrincipals: the named one does not", not_order.clone(), Some(ORDER), pay, 8080, Deny, "default"),
        case("notPrincipals: plaintext has none, so it is not excluded", not_order, None, pay, 8080, Allow, "production/not-order#0"),
        case("when source.namespace", when_ns.clone(), Some(ORDER), pay, 8080, Allow, "production/when-prod#0"),
        case("when source.namespace: staging", when_ns, Some(STAGING_ORDER), pay, 8080, Deny, "default"),
        case(
            "DENY when destination.port notValues: 8080 denied",
            deny_not_9090.clone(),
            Some(ORDER),
            pay,
            8080,
            Deny,
            "production/only-9090#0",
        ),
        case("DENY when destination.port notValues: 9090 passes", deny_not_9090, Some(ORDER), pay, 9090, Allow, "default"),
        case("notPorts: 8080 allowed", not_ports.clone(), Some(ORDER), pay, 8080, Allow, "production/not-9090#0"),
        case("notPorts: 9090 denied", not_ports, Some(ORDER), pay, 9090, Deny, "default"),
        case("dry-run DENY is not enforced", dry_deny.clone(), Some(STAGING_ORDER), pay, 8080, Allow, "default"),
        case("AUDIT changes nothing", audit, Some(ORDER), pay, 8080, Allow, "default"),
        case("DENY beats ALLOW", format!("{allow_all}{deny_staging}"), Some(STAGING_ORDER), pay, 8080, Deny, "production/deny-staging#0"),
        case("remoteIpBlocks: the client's address at L4", remote.clone(), None, pay, 8080, Allow, "production/from-node-1#0"),
        Case { source_ip: "10.244.2.5", ..case("remoteIpBlocks: another subnet", remote, None, pay, 8080, Deny, "default") },
        Case {
            source_ip: "::ffff:10.244.1.5",
            ..case(
                "a v4-mapped client matches a v4 block",
                policy("production", "v4", "rules:\n- from:\n  - source:\n      ipBlocks: [\"10.244.1.5\"]"),
                None,
                pay,
                8080,
                Allow,
                "production/v4#0",
            )
        },
        case("a root policy selecting another app does not apply", other_selector, Some(ORDER), pay, 8080, Allow, "default"),
        case("ALLOW when on a request header matches nothing", header_allow, Some(ORDER), pay, 8080, Deny, "default"),
        case("DENY when on a request header denies at L4", header_deny, Some(ORDER), pay, 8080, Deny, "production/header-deny#0"),
        case("DENY when destination.ip", dest_ip, Some(ORDER), pay, 8080, Deny, "production/deny-pod-range#0"),
        case("namespaces need an identity: plaintext", ns_allow, None, pay, 8080, Deny, "default"),
        case("rules OR: the second rule's port", two_rules.clone(), Some(ORDER), pay, 9090, Allow, "production/two-rules#1"),
        case("rules OR: the first rule's principal", two_rules, Some(REFUND), pay, 8080, Allow, "production/two-rules#0"),
    ]
}

fn labels(app: &str) -> BTreeMap<String, String> {
    [("app".to_string(), app.to_string())].into()
}

#[test]
fn every_case_gets_its_verdict_and_deciding_rule() -> anyhow::Result<()> {
    let cases = cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for c in &cases {
        let set = PolicySet {
            root_namespace: "istio-system".into(),
            policies: parse_yaml(&c.policies).map_err(|e| anyhow::anyhow!("{}: {e}", c.name))?,
        };
        let lbl = labels(c.dest.1);
        let w = Workload { namespace: c.dest.0, labels: &lbl };
        let conn = Conn {
            source: c.source.map(SpiffeId::parse).transpose()?,
            source_ip: c.source_ip.parse::<IpAddr>()?,
            dest_ip: c.dest_ip.parse::<IpAddr>()?,
            dest_port: c.port,
        };
        let v = set.evaluate(&w, &conn);
        let by = v.decided_by.as_ref().map(|m| format!("{}#{}", m.policy, m.rule)).unwrap_or_else(|| "default".into());
        assert_eq!((v.decision, by.as_str()), (c.expect, c.decided_by), "{}: {v:#?}", c.name);
    }
    Ok(())
}

#[test]
fn explain_material_names_l7_fields_dry_runs_and_audits() -> anyhow::Result<()> {
    let lbl = labels("payment");
    let w = Workload { namespace: "production", labels: &lbl };
    let conn = |src: &str| -> anyhow::Result<Conn> {
        Ok(Conn { source: Some(SpiffeId::parse(src)?), source_ip: "10.244.1.5".parse()?, dest_ip: "10.244.0.7".parse()?, dest_port: 8080 })
    };
    let seed = PolicySet { root_namespace: "istio-system".into(), policies: parse_yaml(SEED)? };
    let v = seed.evaluate(&w, &conn(ORDER)?);
    assert_eq!(
        v.l7_notes,
        [
            "production/payment-service-policy rules[0] names to.operation.methods, to.operation.paths: an ALLOW rule needing L7 matches nothing at L4"
        ]
    );
    assert!(v.reason.contains("production/payment-service-policy"), "{}", v.reason);

    let dry = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: dry\n  namespace: production\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  action: DENY\n  rules:\n  - {}\n";
    let audit = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: audit\n  namespace: production\nspec:\n  action: AUDIT\n  rules:\n  - {}\n";
    let set = PolicySet { root_namespace: "istio-system".into(), policies: parse_yaml(&format!("{dry}---\n{audit}"))? };
    let v = set.evaluate(&w, &conn(ORDER)?);
    assert_eq!(v.decision, Decision::Allow);
    let would = v.dry_run.as_ref().expect("the dry-run policy would decide otherwise");
    assert_eq!((would.decision, would.decided_by.as_ref().map(|m| m.policy.as_str())), (Decision::Deny, Some("production/dry")));
    assert_eq!(v.audited.iter().map(|m| m.policy.as_str()).collect::<Vec<_>>(), ["production/audit"]);
    Ok(())
}

#[test]
fn invalid_policies_are_refused_with_the_reason_never_read_as_allow_all() {
    let good = policy("production", "good", "rules:\n- {}");
    let cases: &[(&str, String, &str)] = &[
        ("CUSTOM", policy("production", "ext", "action: CUSTOM\nprovider:\n  name: opa\nrules:\n- {}"), "CUSTOM"),
        ("an unknown action", policy("production", "x", "action: PERMIT"), "\"PERMIT\" is not ALLOW"),
        ("a bad CIDR", policy("production", "x", "rules:\n- from:\n  - source:\n      ipBlocks: [\"10.0.0.0/33\"]"), "not an IP or CIDR"),
        ("a port that is a name", policy("production", "x", "rules:\n- to:\n  - operation:\n      ports: [\"http\"]"), "not a port"),
        ("port 0", policy("production", "x", "rules:\n- to:\n  - operation:\n      ports: [\"0\"]"), "not a port"),
        ("a misspelt field", policy("production", "x", "rules:\n- from:\n  - source:\n      notPrincipal: [\"a\"]"), "unknown field `notPrincipal`"),
        ("an unknown when key", policy("production", "x", "rules:\n- when:\n  - key: source.user\n    values: [a]"), "unknown condition key \"source.user\""),
        ("a when without values", policy("production", "x", "rules:\n- when:\n  - key: source.ip"), "neither values nor notValues"),
        ("targetRefs", policy("production", "x", "targetRefs:\n- kind: Gateway\n  name: gw"), "targetRef"),
        ("a bad dry-run value", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\n  namespace: p\n  annotations:\n    istio.io/dry-run: \"yes\"\nspec: {}\n".into(), "istio.io/dry-run"),
        ("another kind", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: x\nspec: {}\n".into(), "kind \"PeerAuthentication\""),
        ("not YAML", "apiVersion: [".into(), "document 1: not YAML"),
    ];
    for (what, text, why) in cases {
        // A bad policy next to a good one: the whole text is refused.
        let err = parse_yaml(&format!("{good}{text}")).expect_err(what);
        assert!(err.to_string().contains(why), "{what}: {err}");
        assert!(matches!(err, PolicyError::Parse { .. } | PolicyError::Invalid { .. }));
    }
    assert_eq!(parse_yaml(&good).map(|p| p.len()), Ok(1));
}
