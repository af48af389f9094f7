//! Rules as data. Every podsteer rule carries a `podsteer/<why>` comment, and
//! podsteer owns only its chains (two in `nat`, one in `filter`, one in `raw`)
//! plus the jumps into them.

use std::net::IpAddr;

use podsteer_common::Verdict;

use crate::policy::Policy;

pub const OUTPUT_CHAIN: &str = "PODSTEER_OUTPUT";
pub const INBOUND_CHAIN: &str = "PODSTEER_INBOUND";
/// In `filter`: the nat table may not drop.
pub const INPUT_CHAIN: &str = "PODSTEER_INPUT";

const JUMP_OUTPUT: &str = "OUTPUT -p tcp -m comment --comment podsteer/outbound -j PODSTEER_OUTPUT";
const JUMP_INBOUND: &str = "PREROUTING -p tcp -m comment --comment podsteer/inbound -j PODSTEER_INBOUND";
const JUMP_INPUT: &str = "INPUT -p tcp -m comment --comment podsteer/input -j PODSTEER_INPUT";
/// In `raw`: the proxy's legs to the app that carry a client's address (and
/// the app's answers on them, which take their mark) are never tracked.
/// Tracked, such a leg shares conntrack with the pod's real inbound
/// connections from that client: a new one that reuses its tuple while it
/// closes is taken for part of it, and passes `PREROUTING` without its REDIRECT.
pub const UNTRACKED_CHAIN: &str = "PODSTEER_UNTRACKED";
/// `0x53a` is `podsteer_proto::control::CLIENT_ADDRESS_MARK` (a test checks it).
const JUMP_UNTRACKED_OUT: &str = "OUTPUT -p tcp -m mark --mark 0x53a -m comment --comment podsteer/client-address -j PODSTEER_UNTRACKED";
const JUMP_UNTRACKED_IN: &str =
    "PREROUTING -i lo -p tcp -m mark --mark 0x53a -m comment --comment podsteer/client-address -j PODSTEER_UNTRACKED";

/// What podsteer owns in each table it touches.
const TABLES: [(&str, &[&str], &[&str]); 3] = [
    ("nat", &[OUTPUT_CHAIN, INBOUND_CHAIN], &[JUMP_OUTPUT, JUMP_INBOUND]),
    ("filter", &[INPUT_CHAIN], &[JUMP_INPUT]),
    ("raw", &[UNTRACKED_CHAIN], &[JUMP_UNTRACKED_OUT, JUMP_UNTRACKED_IN]),
];

/// The tables [`crate::iptables::Backend::save`] must read for these plans.
pub const TABLE_NAMES: [&str; 3] = [TABLES[0].0, TABLES[1].0, TABLES[2].0];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn has(self, ip: &IpAddr) -> bool {
        ip.is_ipv4() == (self == Family::V4)
    }
}

fn rule(chain: &str, spec: &str, why: &str, target: &str) -> String {
    let spec = if spec.is_empty() { String::new() } else { format!("{spec} ") };
    format!("-A {chain} {spec}-m comment --comment podsteer/{why} -j {target}")
}

/// The restore input that installs podsteer's rules for one family. Re-running it
/// is a no-op: declaring a chain flushes it, and jumps are added only when absent.
pub fn install_plan(policy: &Policy, family: Family, current_save: &str) -> String {
    let mut out = vec!["*nat".to_owned(), format!(":{OUTPUT_CHAIN} - [0:0]"), format!(":{INBOUND_CHAIN} - [0:0]")];
    let o = OUTPUT_CHAIN;
    out.push(rule(o, &format!("-m mark --mark {:#x}", policy.proxy_mark), "proxy-mark", "RETURN"));
    // Only a sidecar pod has a proxy running as the proxy UID. In a shared-proxy
    // pod an app running as that UID must gain nothing (eBPF mode agrees:
    // its UID exemption needs the SIDECAR flag).
    if policy.proxy_mode == crate::policy::ProxyMode::Sidecar {
        out.push(rule(o, &format!("-m owner --uid-owner {}", policy.proxy_uid), "proxy-uid", "RETURN"));
    }
    for verdict in Verdict::OUTBOUND_ORDER {
        for (why, spec, target) in outbound_rules(verdict, policy, family) {
            debug_assert!(verdict.rule_names().contains(&why), "{verdict:?} has no rule {why}");
            out.push(rule(o, &spec, why, &target));
        }
    }

    let i = INBOUND_CHAIN;
    out.push(rule(i, "-i lo", "loopback", "RETURN"));
    for port in [policy.outbound_port, policy.inbound_port].iter().chain(&policy.excluded_inbound_ports) {
        out.push(rule(i, &format!("-p tcp --dport {port}"), "excluded-inbound-port", "RETURN"));
    }
    out.push(rule(i, "-p tcp", "redirect-inbound", &format!("REDIRECT --to-ports {}", policy.inbound_port)));
    jumps(&mut out, current_save, &[JUMP_OUTPUT, JUMP_INBOUND]);
    out.push("COMMIT".into());

    // A connection made straight to the inbound port was not redirected (so no
    // DNAT): its original destination would be the proxy's own listener. The
    // proxy resets such connections too; here they never reach it.
    out.extend(["*filter".to_owned(), format!(":{INPUT_CHAIN} - [0:0]")]);
    let direct = format!("-p tcp --dport {} -m conntrack ! --ctstate DNAT", policy.inbound_port);
    out.push(rule(INPUT_CHAIN, &direct, "direct-to-inbound-port", "DROP"));
    jumps(&mut out, current_save, &[JUMP_INPUT]);
    out.push("COMMIT".into());

    out.extend(["*raw".to_owned(), format!(":{UNTRACKED_CHAIN} - [0:0]")]);
    out.push(rule(UNTRACKED_CHAIN, "", "client-address-untracked", "CT --notrack"));
    jumps(&mut out, current_save, &[JUMP_UNTRACKED_OUT, JUMP_UNTRACKED_IN]);
    out.push("COMMIT".into());
    out.join("\n") + "\n"
}

/// The rules of one verdict of [`Verdict::OUTBOUND_ORDER`]: (name, match, target).
/// Exhaustive, so a new verdict cannot reach one mode and not the other.
fn outbound_rules(v: Verdict, policy: &Policy, family: Family) -> Vec<(&'static str, String, String)> {
    let ret = |why, spec: String| (why, spec, "RETURN".to_owned());
    match v {
        Verdict::Local => std::iter::once(ret("loopback", format!("-d {}", family.loopback())))
            .chain(policy.ips.iter().filter(|ip| family.has(ip)).map(|ip| ret("own-ip", format!("-d {ip}/{}", family.host_prefix()))))
            .collect(),
        // The app's interface scope cannot be carried through the proxy.
        Verdict::LinkLocal if family == Family::V6 => vec![ret("link-local", "-d fe80::/10".into())],
        Verdict::LinkLocal => Vec::new(),
        Verdict::ExcludedPort => {
            policy.excluded_outbound_ports.iter().map(|p| ret("excluded-outbound-port", format!("-p tcp --dport {p}"))).collect()
        }
        Verdict::ExcludedCidr => policy
            .excluded_outbound_cidrs
            .iter()
            .filter(|n| family.has(&n.addr))
            .map(|n| ret("excluded-outbound-cidr", format!("-d {n}")))
            .collect(),
        Verdict::Redirect => vec![("redirect-outbound", "-p tcp".into(), format!("REDIRECT --to-ports {}", policy.outbound_port))],
        // Outbound off: the install leaves out the jump, not a rule.
        Verdict::OutboundOff => Vec::new(),
        // iptables mode has no set of meshed destinations: it proxies every
        // connection the exemptions above leave (see the README's path table).
        Verdict::Direct => Vec::new(),
    }
}

fn jumps(out: &mut Vec<String>, current_save: &str, want: &[&str]) {
    for jump in want {
        if !has_rule(current_save, jump) {
            out.push(format!("-A {jump}"));
        }
    }
}

/// The restore input that removes exactly what [`install_plan`] added, or None
/// when nothing of podsteer's is there.
pub fn remove_plan(current_save: &str) -> Option<String> {
    let mut out = Vec::new();
    for (table, chains, jumps) in TABLES {
        let mut section = Vec::new();
        for jump in jumps {
            if has_rule(current_save, jump) {
                section.push(format!("-D {jump}"));
            }
        }
        for chain in chains {
            if current_save.lines().any(|l| l.starts_with(&format!(":{chain} "))) {
                section.push(format!(":{chain} - [0:0]"));
                section.push(format!("-X {chain}"));
            }
        }
        if !section.is_empty() {
            out.push(format!("*{table}"));
            out.extend(section);
            out.push("COMMIT".into());
        }
    }
    (!out.is_empty()).then(|| out.join("\n") + "\n")
}

/// iptables-save prints comments quoted or not depending on the backend; compare without quotes.
fn has_rule(save: &str, spec: &str) -> bool {
    let want = format!("-A {spec}");
    save.lines().any(|l| l.replace('"', "") == want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{NodeDefaults, Policy};
    use std::collections::BTreeMap;

    fn policy(ann: &[(&str, &str)]) -> Policy {
        let a: BTreeMap<String, String> = ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let ips = ["10.244.0.7".parse().unwrap(), "fd00:10:244::7".parse().unwrap()];
        Policy::from_annotations(&NodeDefaults::default(), &a, &ips).unwrap()
    }

    const EMPTY_SAVE: &str = include_str!("../../../tests/testdata/iptables-save-empty.txt");
    const INSTALLED_SAVE: &str = include_str!("../../../tests/testdata/iptables-save-installed.txt");

    #[test]
    fn install_plan_matches_the_fixture() {
        let p = policy(&[("podsteer.io/exclude-outbound-ports", "5432"), ("podsteer.io/exclude-outbound-cidrs", "192.168.0.0/16")]);
        let plan = install_plan(&p, Family::V4, EMPTY_SAVE);
        let want = include_str!("../../../tests/testdata/iptables-plan-v4.txt");
        assert_eq!(plan, want);
    }

    /// The plan's PODSTEER_OUTPUT, after the proxy's own exemptions, is the
    /// shared verdict table in its order: what connect4/6 and explain decide with.
    #[test]
    fn the_outbound_chain_follows_the_shared_verdict_order() {
        let p = policy(&[
            ("podsteer.io/exclude-outbound-ports", "5432"),
            ("podsteer.io/exclude-outbound-cidrs", "192.168.0.0/16,fd00:ab::/32"),
        ]);
        for family in [Family::V4, Family::V6] {
            let plan = install_plan(&p, family, EMPTY_SAVE);
            let mut names: Vec<&str> = plan
                .lines()
                .filter(|l| l.starts_with(&format!("-A {OUTPUT_CHAIN} ")))
                .filter_map(|l| l.split("--comment podsteer/").nth(1)?.split(' ').next())
                .filter(|n| !n.starts_with("proxy-"))
                .collect();
            names.dedup();
            let want: Vec<&str> = Verdict::OUTBOUND_ORDER
                .iter()
                .flat_map(|v| v.rule_names().iter().copied())
                .filter(|n| family == Family::V6 || *n != "link-local")
                .collect();
            assert_eq!(names, want, "{family:?}");
        }
    }

    /// OUTBOUND_ORDER is the order outbound_verdict really tries: a destination
    /// that two verdicts fit gets the one listed first.
    #[test]
    fn the_shared_order_is_the_order_the_programs_decide_in() {
        let p =
            policy(&[("podsteer.io/exclude-outbound-ports", "5432"), ("podsteer.io/exclude-outbound-cidrs", "10.244.0.0/16,fe80::/10")])
                .to_kernel();
        let rank = |v: Verdict| Verdict::OUTBOUND_ORDER.iter().position(|x| *x == v).unwrap();
        let cases = [
            ("127.0.0.1:5432", Verdict::Local, Verdict::ExcludedPort),
            ("10.244.0.7:80", Verdict::Local, Verdict::ExcludedCidr),
            ("[fe80::1]:5432", Verdict::LinkLocal, Verdict::ExcludedPort),
            ("[fe80::1]:80", Verdict::LinkLocal, Verdict::ExcludedCidr),
            ("10.244.3.3:5432", Verdict::ExcludedPort, Verdict::ExcludedCidr),
        ];
        for (dst, first, then) in cases {
            let dst: std::net::SocketAddr = dst.parse().unwrap();
            let mut key = crate::ebpf::maps::ip_key(dst.ip());
            key.port = dst.port().to_be();
            assert!(rank(first) < rank(then), "{first:?} is listed before {then:?}");
            assert_eq!(p.outbound_verdict(&key), first, "{dst}");
        }
    }

    #[test]
    fn reinstall_adds_no_second_jump() {
        let plan = install_plan(&policy(&[]), Family::V4, INSTALLED_SAVE);
        assert!(!plan.contains("-A OUTPUT"), "{plan}");
        assert!(!plan.contains("-A PREROUTING"), "{plan}");
        assert!(!plan.contains("-A INPUT"), "{plan}");
    }

    #[test]
    fn v6_plan_has_only_v6_addresses() {
        let p = policy(&[("podsteer.io/exclude-outbound-cidrs", "192.168.0.0/16,fd00:ab::/32")]);
        let plan = install_plan(&p, Family::V6, EMPTY_SAVE);
        assert!(plan.contains("-d ::1/128") && plan.contains("-d fd00:10:244::7/128") && plan.contains("-d fd00:ab::/32"), "{plan}");
        assert!(!plan.contains("192.168") && !plan.contains("10.244.0.7"), "{plan}");
    }

    #[test]
    fn the_untracked_jumps_match_the_proxys_client_address_mark() {
        let mark = format!("--mark {:#x} ", podsteer_proto::control::CLIENT_ADDRESS_MARK);
        assert!(JUMP_UNTRACKED_OUT.contains(&mark) && JUMP_UNTRACKED_IN.contains(&mark));
    }

    #[test]
    fn remove_plan_undoes_exactly_the_install() {
        let plan = remove_plan(INSTALLED_SAVE).expect("something to remove");
        assert_eq!(
            plan,
            "*nat\n-D OUTPUT -p tcp -m comment --comment podsteer/outbound -j PODSTEER_OUTPUT\n\
             -D PREROUTING -p tcp -m comment --comment podsteer/inbound -j PODSTEER_INBOUND\n\
             :PODSTEER_OUTPUT - [0:0]\n-X PODSTEER_OUTPUT\n:PODSTEER_INBOUND - [0:0]\n-X PODSTEER_INBOUND\nCOMMIT\n\
             *filter\n-D INPUT -p tcp -m comment --comment podsteer/input -j PODSTEER_INPUT\n\
             :PODSTEER_INPUT - [0:0]\n-X PODSTEER_INPUT\nCOMMIT\n\
             *raw\n-D OUTPUT -p tcp -m mark --mark 0x53a -m comment --comment podsteer/client-address -j PODSTEER_UNTRACKED\n\
             -D PREROUTING -i lo -p tcp -m mark --mark 0x53a -m comment --comment podsteer/client-address -j PODSTEER_UNTRACKED\n\
             :PODSTEER_UNTRACKED - [0:0]\n-X PODSTEER_UNTRACKED\nCOMMIT\n"
        );
        assert_eq!(remove_plan(EMPTY_SAVE), None);
    }
}
