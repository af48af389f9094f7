//! Kernel bugs that bite eBPF mode on some releases, kept as data. The mode
//! probe reports each one that applies to the running kernel. A bug podsteer
//! works around is named in the mode choice with its workaround. A bug it
//! cannot work around becomes a missing feature (`kernel-bug:<name>`), so
//! `--mode auto` picks iptables and `--mode ebpf` refuses, naming it.

use std::fmt;

/// A kernel release, as major and minor: what a fix is dated by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release(pub u32, pub u32);

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

impl Release {
    /// "6.1.0-18-amd64" -> 6.1. None for anything that does not start with two numbers.
    pub fn parse(s: &str) -> Option<Release> {
        let mut parts = s.trim().split(['.', '-', '+']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Release(major, minor))
    }

    /// The running kernel's release, from procfs.
    pub fn running() -> Option<Release> {
        Release::parse(&std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// podsteer's programs avoid the bug; the text says how.
    WorkedAround(&'static str),
    /// eBPF mode is not safe on these releases.
    Avoid,
}

#[derive(Clone, Copy, Debug)]
pub struct KernelBug {
    pub name: &'static str,
    /// First affected release.
    pub first: Release,
    /// First release with the fix: releases from `first` up to, but not
    /// including, this one are affected.
    pub fixed: Release,
    pub what: &'static str,
    pub handling: Handling,
}

impl KernelBug {
    pub fn affects(&self, r: Release) -> bool {
        self.first <= r && r < self.fixed
    }
}

/// The bugs known to bite podsteer, and what it does about each.
pub const KNOWN: &[KernelBug] = &[KernelBug {
    name: "getsockopt-optlen-above-page",
    first: Release(5, 12),
    fixed: Release(6, 5),
    what: "a cgroup getsockopt program that leaves optlen above PAGE_SIZE makes every such getsockopt in the cgroup fail with EFAULT (iptables-legacy's IPT_SO_GET_ENTRIES is one)",
    handling: Handling::WorkedAround("the getsockopt program sets optlen = 0 above PAGE_SIZE"),
}];

/// What the probe says about `release`: the features that are missing because
/// of a bug podsteer must avoid, and a note for each bug it works around. An
/// unknown release (unparsable) is reported as such and blocks nothing.
pub fn assess(release: Option<Release>, table: &[KernelBug]) -> (Vec<String>, Vec<String>) {
    let Some(r) = release else {
        return (Vec::new(), vec!["kernel release unknown: known kernel bugs not checked".to_owned()]);
    };
    let mut missing = Vec::new();
    let mut notes = Vec::new();
    for bug in table.iter().filter(|b| b.affects(r)) {
        match bug.handling {
            Handling::Avoid => missing.push(format!("kernel-bug:{}", bug.name)),
            Handling::WorkedAround(how) => {
                notes.push(format!("kernel {r} has {} ({}, fixed in {}): worked around, {how}", bug.name, bug.what, bug.fixed))
            }
        }
    }
    (missing, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_as_distributions_spell_them() {
        assert_eq!(Release::parse("6.1.0-18-amd64"), Some(Release(6, 1)));
        assert_eq!(Release::parse("5.15.0-91-generic\n"), Some(Release(5, 15)));
        assert_eq!(Release::parse("6.18.0+"), Some(Release(6, 18)));
        assert_eq!(Release::parse("6"), None);
        assert_eq!(Release::parse("linux"), None);
    }

    #[test]
    fn the_getsockopt_bug_is_named_as_worked_around_where_it_applies() {
        for (r, affected) in
            [(Release(5, 11), false), (Release(5, 12), true), (Release(6, 1), true), (Release(6, 4), true), (Release(6, 5), false)]
        {
            let (missing, notes) = assess(Some(r), KNOWN);
            assert!(missing.is_empty(), "{r}: a worked-around bug blocks nothing");
            assert_eq!(
                notes.iter().any(|n| n.contains("getsockopt-optlen-above-page") && n.contains("worked around")),
                affected,
                "{r}: {notes:?}"
            );
        }
    }

    #[test]
    fn a_bug_to_avoid_is_a_missing_feature_so_auto_picks_iptables() {
        let table = [KernelBug { name: "example", first: Release(5, 15), fixed: Release(5, 16), what: "w", handling: Handling::Avoid }];
        let (missing, _) = assess(Some(Release(5, 15)), &table);
        assert_eq!(missing, ["kernel-bug:example"]);
        let features = missing.iter().map(|n| crate::mode::Feature { name: n.clone(), present: false }).collect();
        let choice = crate::mode::choose(crate::mode::ModeRequest::Auto, features).expect("auto always chooses");
        assert_eq!(choice.mode, crate::mode::Mode::Iptables);
        assert!(choice.reason.contains("kernel-bug:example"), "{}", choice.reason);
        assert!(assess(Some(Release(5, 16)), &table).0.is_empty(), "fixed in 5.16");
    }

    #[test]
    fn an_unknown_release_is_said_and_blocks_nothing() {
        let (missing, notes) = assess(None, KNOWN);
        assert!(missing.is_empty());
        assert!(notes[0].contains("unknown"), "{notes:?}");
    }
}
