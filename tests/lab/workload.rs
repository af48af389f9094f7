//! Starting the lab tool's workloads in pods and reading what they report.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::Stdio;

use anyhow::Context as _;

use crate::pod::Pod;
use crate::process::LabProcess;

pub const TOOL: &str = "podsteer-lab-tool";

/// Runs `podsteer-lab-tool ARGS` in `pod` (in `cgroup`, default the pod's own)
/// and returns once it printed its "listening" line.
pub fn start_server(pod: &Pod, cgroup: Option<&Path>, args: &[&str]) -> anyhow::Result<LabProcess> {
    start_server_with(pod, cgroup, crate::agent::bin(TOOL), args)
}

/// Like [`start_server`], for another program that prints "listening" once ready.
pub fn start_server_with(pod: &Pod, cgroup: Option<&Path>, program: std::path::PathBuf, args: &[&str]) -> anyhow::Result<LabProcess> {
    let mut cmd = match cgroup {
        Some(cg) => pod.command_in_cgroup(&program, cg)?,
        None => pod.command(&program)?,
    };
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut p = pod.spawn(args[0], cmd)?;
    let mut line = String::new();
    let stdout = p.child_mut().stdout.take().context("stdout is piped")?;
    BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("listening") {
        let mut err = String::new();
        if let Some(e) = p.child_mut().stderr.take() {
            let _ = std::io::Read::read_to_string(&mut BufReader::new(e), &mut err);
        }
        anyhow::bail!("{args:?} did not start: {line}{err}");
    }
    Ok(p)
}

/// Runs a client to completion in the pod's netns and cgroup; stdout on success.
pub fn run_client(pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = pod.command(crate::agent::bin(TOOL))?;
    let out = cmd.args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        anyhow::bail!("{args:?} in pod {} failed: {}{}", pod.name(), stdout, String::from_utf8_lossy(&out.stderr));
    }
    Ok(stdout)
}

/// `ip:port` as a client argument (IPv6 in brackets).
pub fn addr(ip: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// Runs `podsteer-lab-tool ARGS` in the network namespace at `netns` (a CRI
/// sandbox's, say), in a cgroup of its own under the node's pods, with stdout
/// going to `out`. The cgroup is removed once the process is gone.
pub fn start_in_netns(
    node: &crate::Node,
    netns: &Path,
    name: &str,
    args: &[&str],
    out: &Path,
) -> anyhow::Result<(LabProcess, crate::cgroup::CgroupDir)> {
    let cgroup = crate::cgroup::CgroupDir::create(node.pods_cgroup().join(format!("tool-{name}")))?;
    let mut cmd = crate::process::command_in(crate::agent::bin(TOOL), netns, cgroup.path())?;
    cmd.args(args).stdout(std::fs::File::create(out)?).stderr(Stdio::null());
    let p = node.spawn_owned(name, cmd)?;
    Ok((p, cgroup))
}
