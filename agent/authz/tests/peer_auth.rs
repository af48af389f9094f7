//! PeerAuthentication as Istio resolves it: workload over namespace over
//! root, UNSET inherits, portLevelMtls overrides per port; bad ones refused.

use std::collections::BTreeMap;

use podsteer_authz::eval::Workload;
use podsteer_authz::peer_auth::{Mode, resolve};
use podsteer_authz::source::parse;

fn pa(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}---\n")
}

#[test]
fn the_narrowest_set_mode_wins_and_unset_inherits() -> anyhow::Result<()> {
    let text = [
        pa("istio-system", "mesh", "  mtls:\n    mode: STRICT\n"),
        pa("legacy", "ns", "  mtls:\n    mode: PERMISSIVE\n"),
        pa("production", "inherit", "  selector:\n    matchLabels:\n      app: db\n  mtls:\n    mode: UNSET\n  portLevelMtls:\n    \"9090\":\n      mode: PERMISSIVE\n"),
        pa("legacy", "tight", "  selector:\n    matchLabels:\n      app: vault\n  mtls:\n    mode: STRICT\n"),
    ]
    .concat();
    let b = parse(&text)?;
    let labels = |app: &str| BTreeMap::from([("app".to_string(), app.to_string())]);
    let cases = [
        ("production", "web", Mode::Strict, Some("istio-system/mesh"), None),
        ("production", "db", Mode::Strict, Some("istio-system/mesh"), Some((9090, Mode::Permissive))),
        ("legacy", "web", Mode::Permissive, Some("legacy/ns"), None),
        ("legacy", "vault", Mode::Strict, Some("legacy/tight"), None),
    ];
    for (ns, app, mode, by, port) in cases {
        let l = labels(app);
        let r = resolve(&b.peer_authentication, "istio-system", &Workload { namespace: ns, labels: &l });
        assert_eq!((r.mode, r.decided_by.as_deref()), (mode, by), "{ns}/{app}");
        if let Some((p, m)) = port {
            assert_eq!(r.for_port(p), m, "{ns}/{app} port {p}");
            assert_eq!(r.for_port(p + 1), mode);
        }
    }
    // Nothing set anywhere: PERMISSIVE by default.
    let l = labels("x");
    let r = resolve(&[], "istio-system", &Workload { namespace: "a", labels: &l });
    assert_eq!((r.mode, r.decided_by), (Mode::Permissive, None));
    Ok(())
}

#[test]
fn invalid_peer_authentications_are_refused_with_the_reason() {
    for (what, text, why) in [
        ("a bad mode", pa("p", "x", "  mtls:\n    mode: STRICTER\n"), "\"STRICTER\" is not UNSET"),
        ("port level without a selector", pa("p", "x", "  portLevelMtls:\n    \"80\":\n      mode: STRICT\n"), "needs a selector"),
        (
            "a bad port",
            pa("p", "x", "  selector:\n    matchLabels:\n      a: b\n  portLevelMtls:\n    \"http\":\n      mode: STRICT\n"),
            "\"http\" is not a port",
        ),
        ("an unknown field", pa("p", "x", "  mtls:\n    mode: STRICT\n  mtlsMode: STRICT\n"), "unknown field"),
        (
            "another kind",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n".into(),
            "is not AuthorizationPolicy or PeerAuthentication",
        ),
    ] {
        let err = parse(&text).expect_err(what).to_string();
        assert!(err.contains(why), "{what}: {err}");
    }
}
