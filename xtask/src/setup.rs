//! `cargo xtask setup`: everything a fresh machine of this kind lacks. Each step
//! checks first, so a second run is a fast no-op.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian packages the tests, demo and benchmark use.
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
    // Builds the CRI API bindings (k8s-cri).
    "protobuf-compiler",
    // A static busybox: the rootfs of the lab's locally built container images.
    "busybox-static",
];

const BPF_LINKER_VERSION: &str = "0.13";

pub fn run() -> anyhow::Result<()> {
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(Command::new("apt-get").args(["install", "-y", "-qq", "--no-install-recommends"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .context("the nightly toolchain is needed to build eBPF")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("setup: adding rust-src to nightly");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker links against the nightly's own libLLVM, so eBPF objects get the
/// same LLVM that rustc emitted them with.
fn bpf_linker() -> anyhow::Result<()> {
    // rustup run puts the nightly's lib dir (and so libLLVM) on the library path.
    let have = Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]).output();
    if let Ok(o) = have
        && o.status.success()
        && String::from_utf8_lossy(&o.stdout).contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
    {
        return Ok(());
    }
    let major = llvm_major(&output(Command::new("rustc").args(["+nightly", "-vV"]))?)?;
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    let libllvm = find_libllvm(&sysroot.join("lib"), major)?;
    let prefix = llvm_prefix(&libllvm)?;
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against {} (a few minutes, once)", libllvm.display());
    status(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", &format!("^{BPF_LINKER_VERSION}"), "--locked", "--force"])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// Reads the major version from `rustc -vV`'s "LLVM version: 22.1.4".
fn llvm_major(version_info: &str) -> anyhow::Result<u32> {
    version_info
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.trim().parse().ok())
        .context("rustc +nightly -vV names no LLVM version")
}

/// The nightly ships `libLLVM.so.<ver>-rust-<ver>-nightly`; the name varies, the pattern not.
fn find_libllvm(libdir: &Path, major: u32) -> anyhow::Result<PathBuf> {
    let want = format!("libLLVM.so.{major}.");
    std::fs::read_dir(libdir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&want)))
        .with_context(|| format!("no {want}* in {}", libdir.display()))
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
}
