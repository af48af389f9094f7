//! `cargo xtask bench`: what a mesh hop costs with podsteer, against direct
//! traffic and against haproxy + iptables (istio-init plus a sidecar), all in
//! one run on lab nodes. Scenarios alternate round by round so drift cancels;
//! every figure is the median over rounds.

mod flood;
mod measure;
mod mtls;
mod report;
mod setup;

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(about = "podsteer benchmark")]
pub struct Opts {
    /// About a minute: fewer rounds, shorter runs (what CI runs).
    #[arg(long)]
    pub quick: bool,
    /// Only scenarios whose name contains this (for investigating one setup).
    #[arg(long)]
    pub only: Option<String>,
    /// Rounds, overriding the plan.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// CNI ADDs to time, overriding the plan (for investigating the tail).
    #[arg(long)]
    pub cni_adds: Option<usize>,
    /// Idle connections held for the memory figure, overriding the plan.
    #[arg(long)]
    pub idle_conns: Option<usize>,
    /// Where results.json and latency.svg go.
    #[arg(long, default_value = "bench")]
    pub out: PathBuf,
}

/// Durations and sizes for one run.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub warm_ms: u64,
    pub run_ms: u64,
    pub idle_conns: usize,
    pub cni_adds: usize,
}

impl Plan {
    fn from(o: &Opts) -> Plan {
        if o.quick {
            Plan { quick: true, rounds: 2, warm_ms: 50, run_ms: 250, idle_conns: 1000, cni_adds: 20 }
        } else {
            // Idle connections all come from one pod: within its default limit (4096).
            Plan { quick: false, rounds: 5, warm_ms: 300, run_ms: 1200, idle_conns: 4_000, cni_adds: 200 }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let mut plan = Plan::from(&opts);
    // Idle connections through a proxy cost it two fds each; every lab process
    // inherits this process's limit, which only CAP_SYS_RESOURCE can raise.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")?.trim().parse()?;
    if setrlimit(Resource::RLIMIT_NOFILE, nr_open, nr_open).is_err() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        let fit = ((hard.saturating_sub(1000)) / 2) as usize;
        if fit < plan.idle_conns {
            eprintln!(
                "bench: the open-file limit is {hard} and cannot be raised here; measuring {fit} idle connections instead of {}",
                plan.idle_conns
            );
            plan.idle_conns = fit;
        }
    }
    let started = std::time::Instant::now();
    eprintln!("bench: setting up lab nodes ({})", if opts.quick { "quick" } else { "full" });
    if let Some(r) = opts.rounds {
        plan.rounds = r;
    }
    if let Some(n) = opts.cni_adds {
        plan.cni_adds = n;
    }
    if let Some(n) = opts.idle_conns {
        plan.idle_conns = n;
    }
    let mut lab = setup::Lab::new()?;
    if let Some(only) = &opts.only {
        lab.scenarios.retain(|s| s.name == "direct" || s.name.contains(only.as_str()));
    }
    let results = measure::run(&lab, &plan)?;
    let report = report::Report::new(plan, results, started.elapsed());
    print!("{}", report.table());
    std::fs::create_dir_all(&opts.out)?;
    std::fs::write(opts.out.join("results.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(opts.out.join("latency.svg"), report.svg())?;
    eprintln!("bench: wrote {} and {}", opts.out.join("results.json").display(), opts.out.join("latency.svg").display());
    report.check_correctness()
}
