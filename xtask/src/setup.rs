//! `cargo xtask setup`: everything a fresh machine of this kind lacks.
//!
//! xtask itself needs none of it (it links no project crate that builds eBPF or
//! the CRI bindings), so set-up can run before anything else has been built.
//! Each step checks first, so a second run is a no-op in about a second; a step
//! that has work to do says so, and how long it takes here, before it starts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

/// Debian packages the tests, demo and benchmark run against.
const APT_PACKAGES: &[&str] = &[
    "iptables",
    "iproute2",
    "containernetworking-plugins",
    "containerd",
    "runc",
    "haproxy",
    "iperf3",
    "sockperf",
    "jq",
    // Captures on the lab's underlay: the mesh suite checks what crosses nodes.
    "tcpdump",
    // A static busybox: the rootfs of the lab's locally built container images.
    "busybox-static",
];

const BPF_LINKER_VERSION: &str = "0.13";

/// Where the vendored protoc is linked for the CRI bindings' build script;
/// `.cargo/config.toml` points `PROTOC` here, so plain `cargo build` finds it too.
pub const PROTOC_LINK: &str = "target/tools/protoc";

/// One step of set-up: what it is called, and what to try when it fails.
struct Step {
    name: &'static str,
    hint: &'static str,
}

impl Step {
    /// Runs `cmd`, announcing `what` (with how long it takes here) first. Its
    /// output goes to a log file, shown in part only when it fails; a failure
    /// names the step, the command, the log and the hint.
    fn run(&self, what: &str, cmd: &mut Command) -> anyhow::Result<()> {
        println!("setup: {what}");
        let started = Instant::now();
        let log = std::env::temp_dir().join(format!("podsteer-setup-{}.log", self.name.replace(' ', "-")));
        let file = std::fs::File::create(&log).map_err(|e| self.failed(cmd, &format!("creating {}: {e}", log.display())))?;
        let file2 = file.try_clone().map_err(|e| self.failed(cmd, &e.to_string()))?;
        let status = cmd.stdout(file).stderr(file2).status().map_err(|e| self.failed(cmd, &e.to_string()))?;
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(self.failed(cmd, &format!("{status}; the last lines of {}:\n    {}", log.display(), tail.join("\n    "))));
        }
        println!("setup:   done in {:.1?}", started.elapsed());
        Ok(())
    }

    fn failed(&self, cmd: &Command, why: &str) -> anyhow::Error {
        anyhow::anyhow!("set-up step '{}' failed: `{}`: {why}\n  try: {}", self.name, shown(cmd), self.hint)
    }
}

/// A command as a user would type it, to repeat it by hand.
fn shown(cmd: &Command) -> String {
    let env: Vec<String> = cmd.get_envs().filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy()))).collect();
    let words: Vec<String> = std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy().into_owned()).collect();
    [env, words].concat().join(" ")
}

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut did = 0;
    did += apt_packages()? as u32;
    did += rust_src()? as u32;
    did += bpf_linker()? as u32;
    did += protoc()? as u32;
    if did == 0 {
        println!("setup: nothing to do: apt packages, nightly rust-src, bpf-linker {BPF_LINKER_VERSION} and protoc are in place");
    } else {
        println!("setup: {did} step(s) done in {:.0?}", started.elapsed());
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running `{}`", shown(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", shown(cmd), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the missing Debian packages; true when it had to.
fn apt_packages() -> anyhow::Result<bool> {
    // One dpkg-query for all of them: a package it does not know is missing too.
    let out = Command::new("dpkg-query").args(["-W", "-f=${Package} ${Status}\n"]).args(APT_PACKAGES).output();
    let listed = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !listed.lines().any(|l| l.starts_with(&format!("{p} ")) && l.ends_with("install ok installed")))
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let step = Step {
        name: "apt packages",
        hint: "check that the Debian mirror in /etc/apt/sources.list answers (`apt-get update`), then run `cargo xtask setup` again",
    };
    step.run("refreshing the apt package lists: about 5 s", Command::new("apt-get").args(["update", "-qq"]))?;
    step.run(
        &format!("installing {} apt packages ({}): about 20 s", missing.len(), missing.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(true)
}

/// Adds rust-src to the nightly, which builds the eBPF programs' core library.
fn rust_src() -> anyhow::Result<bool> {
    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .context("set-up step 'rust-src': the nightly toolchain builds the eBPF programs; `rustup toolchain list` should show one")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(false);
    }
    let step = Step { name: "rust-src", hint: "`rustup component add rust-src --toolchain nightly` by hand shows rustup's own error" };
    step.run(
        "adding rust-src to the nightly toolchain (builds the eBPF programs' core library): about 5 s",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )?;
    Ok(true)
}

/// bpf-linker links against the nightly's own libLLVM, so eBPF objects get the
/// same LLVM that rustc emitted them with. True when it had to build it.
fn bpf_linker() -> anyhow::Result<bool> {
    // rustup run puts the nightly's lib dir (and so libLLVM) on the library path.
    let have = Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]).output();
    if let Ok(o) = have
        && o.status.success()
        && String::from_utf8_lossy(&o.stdout).contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
    {
        return Ok(false);
    }
    let major = llvm_major(&output(Command::new("rustc").args(["+nightly", "-vV"]))?)?;
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    let libllvm = find_libllvm(&sysroot.join("lib"), major)?;
    let prefix = llvm_prefix(&libllvm)?;
    let step = Step {
        name: "bpf-linker",
        hint: "the error above is cargo's; `rustc +nightly -vV` must name the LLVM major that the nightly's lib/libLLVM.so.<major>.* carries",
    };
    step.run(
        &format!("building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major}: about a minute on 2 cores, once"),
        Command::new("cargo")
            .args(["install", "--quiet", "bpf-linker", "--version", &format!("^{BPF_LINKER_VERSION}"), "--locked", "--force"])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )?;
    Ok(true)
}

/// Links the protoc that the protoc-bin-vendored crate ships where cargo's
/// `PROTOC` points; true when the link had to be made. No package is installed.
fn protoc() -> anyhow::Result<bool> {
    let vendored =
        protoc_bin_vendored::protoc_bin_path().context("set-up step 'protoc': protoc-bin-vendored has no protoc for this platform")?;
    let link = workspace_root().join(PROTOC_LINK);
    if std::fs::read_link(&link).is_ok_and(|t| t == vendored) && link.is_file() {
        return Ok(false);
    }
    println!("setup: linking the vendored protoc ({}) at {PROTOC_LINK}", vendored.display());
    let parent = link.parent().context("protoc link has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("set-up step 'protoc': creating {}", parent.display()))?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&vendored, &link).with_context(|| format!("set-up step 'protoc': linking {}", link.display()))?;
    Ok(true)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root").to_path_buf()
}

/// Reads the major version from `rustc -vV`'s "LLVM version: 22.1.4".
fn llvm_major(version_info: &str) -> anyhow::Result<u32> {
    version_info
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.trim().parse().ok())
        .context("set-up step 'bpf-linker': `rustc +nightly -vV` names no LLVM version")
}

/// The nightly ships `libLLVM.so.<ver>-rust-<ver>-nightly`; the name varies, the pattern not.
fn find_libllvm(libdir: &Path, major: u32) -> anyhow::Result<PathBuf> {
    let want = format!("libLLVM.so.{major}.");
    std::fs::read_dir(libdir)
        .with_context(|| format!("set-up step 'bpf-linker': reading the nightly's {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&want)))
        .with_context(|| format!("set-up step 'bpf-linker': no {want}* in {}", libdir.display()))
}

/// bpf-linker's build wants an LLVM prefix: any `bin/llvm-config` and `lib/libLLVM.so`.
fn llvm_prefix(libllvm: &Path) -> anyhow::Result<PathBuf> {
    let prefix = std::env::temp_dir().join("podsteer-llvm-prefix");
    let (bin, lib) = (prefix.join("bin"), prefix.join("lib"));
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&lib)?;
    let config = bin.join("llvm-config");
    std::fs::write(&config, "#!/bin/sh\nexit 0\n")?;
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(libllvm, &link)?;
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_major_from_rustc() {
        let vv = "rustc 1.97.0-nightly\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv).unwrap(), 22);
        assert!(llvm_major("rustc 1.95.0\n").is_err());
    }

    #[test]
    fn a_failed_step_names_itself_the_command_and_a_hint() {
        let step = Step { name: "apt packages", hint: "check the mirror" };
        let err = step.run("running a command that fails", Command::new("false").arg("--flag").env("X", "1")).unwrap_err().to_string();
        assert!(err.starts_with("set-up step 'apt packages' failed: `X=1 false --flag`: exit status: 1; the last lines of"), "{err}");
        assert!(err.ends_with("try: check the mirror"), "{err}");
    }

    #[test]
    fn the_protoc_link_is_where_cargo_looks() {
        let config = std::fs::read_to_string(workspace_root().join(".cargo/config.toml")).unwrap();
        assert!(config.contains(&format!("PROTOC = {{ value = \"{PROTOC_LINK}\", relative = true }}")), "{config}");
    }
}
