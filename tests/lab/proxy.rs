//! Runs the real `podsteer-proxy` in the lab: shared (a node process in the
//! proxy cgroup, fed by the agent) or per pod (a sidecar in the pod's netns).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use std::os::fd::AsFd;

use crate::node::Node;
use crate::pod::Pod;
use crate::process::LabProcess;

pub struct Proxy {
    process: LabProcess,
    pub admin: SocketAddr,
    /// The netns the admin endpoint listens in: the node's, or the pod's for a sidecar.
    admin_netns: std::fs::File,
    pub log: std::path::PathBuf,
}

impl Proxy {
    /// A shared proxy connected to the agent's control socket, ready once the agent replayed.
    pub fn start_shared(node: &Node, control: &Path, admin_port: u16, extra: &[&str]) -> anyhow::Result<Proxy> {
        Proxy::start_shared_under(node, control, admin_port, extra, &[])
    }

    /// As [`Proxy::start_shared`], run under `wrapper` (with only some capabilities, say).
    pub fn start_shared_under(node: &Node, control: &Path, admin_port: u16, extra: &[&str], wrapper: &[String]) -> anyhow::Result<Proxy> {
        Proxy::start_shared_with(node, control, admin_port, extra, wrapper, &[])
    }

    /// As [`Proxy::start_shared`], logging a line as each connection is taken
    /// (`access=debug`), so a test can account for every connection even of a
    /// proxy it kills.
    pub fn start_shared_logging_opens(node: &Node, control: &Path, admin_port: u16) -> anyhow::Result<Proxy> {
        Proxy::start_shared_with(node, control, admin_port, &[], &[], &[("RUST_LOG", "info,access=debug")])
    }

    fn start_shared_with(
        node: &Node,
        control: &Path,
        admin_port: u16,
        extra: &[&str],
        wrapper: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proxy> {
        let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
        let log = node.state_dir().join(format!("proxy-{admin_port}.log"));
        let mut cmd = match wrapper.split_first() {
            None => node.proxy_command(crate::agent::bin("podsteer-proxy"))?,
            Some((program, args)) => {
                let mut c = node.proxy_command(program)?;
                c.args(args).arg(crate::agent::bin("podsteer-proxy"));
                c
            }
        };
        cmd.args(["--control", &control.display().to_string(), "--admin", &admin.to_string()])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let process = node.spawn_owned("podsteer-proxy", cmd)?;
        let p = Proxy { process, admin, admin_netns: std::fs::File::open(node.netns().path())?, log };
        p.wait_ready()?;
        Ok(p)
    }

    /// A per-pod proxy inside `pod`'s netns and cgroup, dropping to the proxy UID.
    pub fn start_sidecar(node: &Node, pod: &Pod, admin_port: u16, extra: &[&str]) -> anyhow::Result<Proxy> {
        let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
        let log = node.state_dir().join(format!("sidecar-{}.log", pod.name()));
        let mut cmd = pod.command(crate::agent::bin("podsteer-proxy"))?;
        // No --mark: a sidecar's defaults must work as shipped.
        cmd.args(["--sidecar", "--run-as-uid", "1337", "--admin", &admin.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let process = pod.spawn("podsteer-proxy", cmd)?;
        let p = Proxy { process, admin, admin_netns: std::fs::File::open(pod.netns().path())?, log };
        p.wait_ready()?;
        Ok(p)
    }

    pub fn wait_ready(&self) -> anyhow::Result<()> {
        crate::wait::until("proxy /ready", Duration::from_secs(10), || self.get("/ready").ok().filter(|r| r.starts_with("HTTP/1.1 200")))
            .map(drop)
            .map_err(|e| e.context(std::fs::read_to_string(&self.log).unwrap_or_default()))
    }

    /// An HTTP GET on the admin endpoint, from inside the node netns.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        crate::admin::get(self.admin_netns.as_fd(), self.admin, path)
    }

    /// One sample from /metrics, matched by its full name and label text.
    pub fn metric(&self, name_and_labels: &str) -> anyhow::Result<f64> {
        crate::admin::metric(self.admin_netns.as_fd(), self.admin, name_and_labels)
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    pub fn process_mut(&mut self) -> &mut LabProcess {
        &mut self.process
    }
}
