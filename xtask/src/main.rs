//! `cargo xtask`: the project's tasks. The README documents `setup`, `demo` and `test`.

mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "podsteer project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (apt packages, rust-src, bpf-linker). Idempotent.
    Setup,
    /// Build every crate, eBPF included.
    Build,
    /// Build and run the demo on a simulated node, then clean up.
    Demo,
    /// Check formatting and clippy, then run every test: unit tests and lab
    /// suites against the real kernel and plugins, then the quick benchmark.
    Test {
        /// Extra arguments for `cargo test` (a test name filter, say).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Measure hop latency, throughput, connection rate, memory and CNI ADD
    /// latency against direct traffic and haproxy + iptables, in one run.
    Bench {
        /// About a minute instead of about fifteen.
        #[arg(long)]
        quick: bool,
        /// Where results.json and latency.svg go (default: bench/ for a full run).
        #[arg(long)]
        out: Option<String>,
    },
    /// The lab's own maintenance.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Remove every lab leftover by name prefix: netns, cgroups, pins, state, recorded processes.
    Clean,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            cargo(&["build", "--workspace", "--release"])
        }
        Task::Demo => {
            setup::run()?;
            cargo(&["build", "--workspace", "--release"])?;
            cargo(&["run", "--release", "--quiet", "-p", "podsteer-lab", "--bin", "podsteer-demo"])
        }
        Task::Test { args } => {
            setup::run()?;
            // Style first, as aya and ztunnel check it in CI: it fails in seconds.
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
            // Lab suites run the real binaries (agent, plugin, proxy), which
            // `cargo test` alone does not build for packages without tests of their own.
            cargo(&["build", "--workspace", "--bins"])?;
            let mut test = vec!["test", "--workspace"];
            test.extend(args.iter().map(String::as_str));
            let result = cargo(&test);
            // A test that leaked lab resources has a cleanup bug, even if it passed.
            let leftovers = podsteer_lab_host::sweep::sweep()?;
            result?;
            if !leftovers.is_empty() {
                bail!("tests left lab resources behind (now removed):\n  {}", leftovers.join("\n  "));
            }
            println!("lab: no leftovers after the tests");
            // The benchmark's quick run is part of the tests: it checks every
            // scenario end to end (replies, checksums, counts) on each change.
            // Debug binaries suffice for that and spare CI a second full build.
            bench(true, Some("target/bench-quick".into()), Profile::Debug)
        }
        Task::Bench { quick, out } => {
            setup::run()?;
            bench(quick, out, Profile::Release)
        }
        Task::Lab { cmd: LabCmd::Clean } => {
            let removed = podsteer_lab_host::sweep::sweep()?;
            if removed.is_empty() {
                println!("lab clean: nothing to remove");
            } else {
                println!("lab clean: removed\n  {}", removed.join("\n  "));
            }
            Ok(())
        }
    }
}

#[derive(PartialEq)]
enum Profile {
    Debug,
    Release,
}

fn bench(quick: bool, out: Option<String>, profile: Profile) -> anyhow::Result<()> {
    let release = if profile == Profile::Release { vec!["--release"] } else { vec![] };
    let mut build = vec!["build", "--workspace", "--bins"];
    build.extend(&release);
    cargo(&build)?;
    let out = out.unwrap_or_else(|| if quick { "target/bench-quick".into() } else { "bench".into() });
    let mut args = vec!["run", "--quiet"];
    args.extend(&release);
    args.extend(["-p", "podsteer-lab", "--bin", "podsteer-bench", "--", "--out", out.as_str()]);
    if quick {
        args.push("--quick");
    }
    let result = cargo(&args);
    let leftovers = podsteer_lab_host::sweep::sweep()?;
    result?;
    if !leftovers.is_empty() {
        bail!("the benchmark left lab resources behind (now removed):\n  {}", leftovers.join("\n  "));
    }
    Ok(())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo).args(args).status().with_context(|| format!("running cargo {args:?}"))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}
