//! Picks the interception mode once, from kernel probes and an override, and
//! says why, down to the exact missing feature.

use std::path::Path;

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Ebpf,
    Iptables,
}

impl Mode {
    /// As in the config, the status and the metrics' `mode` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModeRequest {
    Auto,
    Ebpf,
    Iptables,
}

/// One probed kernel feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    pub name: String,
    pub present: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("eBPF mode was requested but the kernel lacks: {}", missing.join(", "))]
pub struct MissingFeatures {
    pub missing: Vec<String>,
}

/// The decision and its reason, logged at start and shown by `podsteer status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeChoice {
    pub mode: Mode,
    pub reason: String,
    pub features: Vec<Feature>,
    /// Known kernel bugs on this kernel that podsteer works around (see
    /// [`crate::kernel_bugs`]); one it cannot work around is a missing feature.
    #[serde(default)]
    pub kernel_notes: Vec<String>,
}

/// Probes everything eBPF mode needs. `masked` names features to report as
/// absent, so operators can rehearse the fallback on a kernel that has it all.
/// Also returns the notes on known kernel bugs podsteer works around, from the
/// same one look at the running kernel's release.
pub fn probe(cgroup_root: Option<&Path>, masked: &[String]) -> (Vec<Feature>, Vec<String>) {
    let prog = |t: ProgramType| is_program_supported(t).unwrap_or(false);
    let helper = |t: ProgramType, h: BpfHelper| is_helper_supported(t, h).unwrap_or(false);
    let map = |t: MapType| is_map_supported(t).unwrap_or(false);
    let mut f = vec![
        ("cgroup2", cgroup_root.is_some()),
        (
            "bpffs",
            Path::new("/proc/filesystems").exists() && std::fs::read_to_string("/proc/filesystems").is_ok_and(|s| s.contains("\tbpf")),
        ),
        ("prog:cgroup_sock_addr", prog(ProgramType::CgroupSockAddr)),
        ("prog:cgroup_sockopt", prog(ProgramType::CgroupSockopt)),
        ("prog:sock_ops", prog(ProgramType::SockOps)),
        ("prog:sk_msg", prog(ProgramType::SkMsg)),
        ("prog:sk_lookup", prog(ProgramType::SkLookup)),
        ("map:sockhash", map(MapType::SockHash)),
        ("map:lru_hash", map(MapType::LruHash)),
        ("map:percpu_array", map(MapType::PerCpuArray)),
        ("map:percpu_hash", map(MapType::PerCpuHash)),
        ("map:ringbuf", map(MapType::RingBuf)),
        ("helper:get_netns_cookie(cgroup_sock_addr)", helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_netns_cookie)),
        ("helper:get_netns_cookie(sock_ops)", helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie)),
        ("helper:get_netns_cookie(sk_msg)", helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_get_netns_cookie)),
        ("helper:get_netns_cookie(cgroup_sockopt)", helper(ProgramType::CgroupSockopt, BpfHelper::BPF_FUNC_get_netns_cookie)),
        ("map:sk_storage", map(MapType::SkStorage)),
        ("helper:sk_storage_get(cgroup_sock_addr)", helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_sk_storage_get)),
        ("helper:sk_storage_get(sock_ops)", helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get)),
        ("helper:sk_storage_get(sk_msg)", helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_sk_storage_get)),
        ("helper:sock_hash_update(sock_ops)", helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_hash_update)),
        ("helper:msg_redirect_hash(sk_msg)", helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash)),
        ("helper:sk_assign(sk_lookup)", helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign)),
    ]
    .into_iter()
    .map(|(name, present)| Feature { name: name.to_owned(), present })
    .collect::<Vec<_>>();
    let (buggy, kernel_notes) = crate::kernel_bugs::assess(crate::kernel_bugs::Release::running(), crate::kernel_bugs::KNOWN);
    f.extend(buggy.into_iter().map(|name| Feature { name, present: false }));
    for feat in &mut f {
        if masked.iter().any(|m| m == &feat.name) {
            feat.present = false;
        }
    }
    (f, kernel_notes)
}

/// Decides the mode from the request and the probe; pure, so it is table-tested.
pub fn choose(request: ModeRequest, features: Vec<Feature>) -> Result<ModeChoice, MissingFeatures> {
    let missing: Vec<String> = features.iter().filter(|f| !f.present).map(|f| f.name.clone()).collect();
    let (mode, reason) = match (request, missing.is_empty()) {
        (ModeRequest::Iptables, _) => (Mode::Iptables, "iptables mode was requested".to_owned()),
        (ModeRequest::Ebpf, true) => (Mode::Ebpf, "eBPF mode was requested and the kernel has every feature".to_owned()),
        (ModeRequest::Ebpf, false) => return Err(MissingFeatures { missing }),
        (ModeRequest::Auto, true) => (Mode::Ebpf, "auto: the kernel has every eBPF feature".to_owned()),
        (ModeRequest::Auto, false) => (Mode::Iptables, format!("auto: falling back to iptables, the kernel lacks {}", missing.join(", "))),
    };
    Ok(ModeChoice { mode, reason, features, kernel_notes: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats(missing: &[&str]) -> Vec<Feature> {
        ["cgroup2", "prog:sk_lookup", "helper:sk_assign(sk_lookup)"]
            .iter()
            .map(|n| Feature { name: n.to_string(), present: !missing.contains(n) })
            .collect()
    }

    #[test]
    fn mode_choice_table() {
        let cases = [
            ("auto, all present", ModeRequest::Auto, vec![], Some(Mode::Ebpf)),
            ("auto, sk_lookup missing", ModeRequest::Auto, vec!["prog:sk_lookup"], Some(Mode::Iptables)),
            ("forced ebpf, all present", ModeRequest::Ebpf, vec![], Some(Mode::Ebpf)),
            ("forced ebpf, cgroup2 missing", ModeRequest::Ebpf, vec!["cgroup2"], None),
            ("forced iptables", ModeRequest::Iptables, vec![], Some(Mode::Iptables)),
        ];
        for (name, req, missing, want) in cases {
            let got = choose(req, feats(&missing));
            assert_eq!(got.as_ref().ok().map(|c| c.mode), want, "case {name}");
            if let Err(e) = got {
                assert!(e.to_string().contains(missing[0]), "case {name}: {e}");
            }
        }
        let c = choose(ModeRequest::Auto, feats(&["prog:sk_lookup"])).unwrap();
        assert!(c.reason.contains("prog:sk_lookup"), "{}", c.reason);
    }
}
