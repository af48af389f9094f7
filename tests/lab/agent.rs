//! Runs the real `podsteer-agent` binary as a node process of a lab node.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use podsteer_agent::api::{self, ApiError, PodInfo, Request};
use serde_json::Value;

use crate::node::Node;
use crate::pod::Pod;
use crate::process::LabProcess;

/// Where the workspace's binaries are: `PODSTEER_BIN_DIR`, else next to the
/// running test (target/<profile>/deps/..).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("PODSTEER_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

pub const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// The agent's default admin address, inside the node's netns.
const ADMIN: ([u8; 4], u16) = ([127, 0, 0, 1], 15021);

/// A running agent, killed on drop. Its pins and state live in the node's state dir.
pub struct Agent {
    process: Option<LabProcess>,
    node: Node,
    args: Vec<String>,
    /// Runs the agent under this command (`setpriv ...`), if any.
    wrapper: Vec<String>,
    pub socket: PathBuf,
    /// The shared proxy's control socket, when started with one.
    pub proxy_socket: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Starts an agent for `node` in `mode` (auto, ebpf, iptables) and waits until it answers.
    pub fn start(node: &Node, mode: &str, extra: &[&str]) -> anyhow::Result<Agent> {
        Agent::start_under(node, mode, extra, &[])
    }

    /// As [`Agent::start`], run under `wrapper` (with only some capabilities, say).
    pub fn start_under(node: &Node, mode: &str, extra: &[&str], wrapper: &[String]) -> anyhow::Result<Agent> {
        let dir = node.state_dir().join("agent");
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("agent.sock");
        let bpffs = node.state_dir().join("bpffs");
        let mut args: Vec<String> = vec![
            "--mode".into(),
            mode.into(),
            "--cgroup".into(),
            node.pods_cgroup().display().to_string(),
            "--bpffs".into(),
            bpffs.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--state-dir".into(),
            dir.display().to_string(),
            // The tests call the agent from the host's netns, not the lab node's:
            // node-level, as the plugin and CLI are on a real node.
            "--node-netns".into(),
            format!("/proc/{}/ns/net", std::process::id()),
        ];
        // The interception suites test the proxied path, and most of their
        // destinations are unmeshed pods: they keep those proxied. Suites of
        // the direct path (and the mesh's) ask for the product's default.
        if !extra.contains(&"--unmeshed-outbound") {
            args.extend(["--unmeshed-outbound".into(), "proxy".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let proxy_socket = args.iter().position(|a| a == "--proxy-socket").and_then(|i| args.get(i + 1)).map(PathBuf::from);
        let mut agent = Agent {
            process: None,
            node: node.clone(),
            args,
            wrapper: wrapper.to_vec(),
            socket,
            proxy_socket,
            bpffs,
            state_dir: dir.clone(),
            log: dir.join("agent.log"),
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = match self.wrapper.split_first() {
            None => self.node.command(bin("podsteer-agent"))?,
            Some((program, args)) => {
                let mut c = self.node.command(program)?;
                c.args(args).arg(bin("podsteer-agent"));
                c
            }
        };
        cmd.args(&self.args).stdout(Stdio::null()).stderr(log);
        let mut p = self.node.spawn_owned("podsteer-agent", cmd)?;
        let socket = self.socket.clone();
        let ready = crate::wait::until("agent to answer on its socket", Duration::from_secs(20), || {
            if let Ok(Some(st)) = p.child_mut().try_wait() {
                return Some(Err(anyhow::anyhow!("agent exited with {st}")));
            }
            api::call(&socket, &Request::Status, CALL_DEADLINE, None).ok().map(|_| Ok(()))
        });
        let outcome = ready.and_then(|r| r);
        if let Err(e) = outcome {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            return Err(e.context(format!("agent log:\n{log}")));
        }
        self.process = Some(p);
        Ok(())
    }

    /// Starts an agent that hands pods to a shared proxy on `<state>/agent/proxy.sock`.
    pub fn start_with_proxy(node: &Node, mode: &str, extra: &[&str]) -> anyhow::Result<Agent> {
        let sock = node.state_dir().join("agent").join("proxy.sock").display().to_string();
        let mut args = vec!["--proxy-socket", sock.as_str()];
        args.extend_from_slice(extra);
        Agent::start(node, mode, &args)
    }

    /// Starts the agent the same way and returns the exit status and log, for
    /// configurations that must refuse to start.
    pub fn start_expect_failure(node: &Node, mode: &str, extra: &[&str]) -> anyhow::Result<String> {
        match Agent::start(node, mode, extra) {
            Ok(_) => anyhow::bail!("agent started but was expected to fail"),
            Err(e) => Ok(format!("{e:#}")),
        }
    }

    pub fn call(&self, req: &Request) -> anyhow::Result<Result<Value, ApiError>> {
        Ok(api::call(&self.socket, req, CALL_DEADLINE, None).context("agent call")?.into_result())
    }

    /// Registers a lab pod as the CNI plugin would, with extra annotations.
    pub fn add_pod(&self, pod: &Pod, annotations: &[(&str, &str)]) -> anyhow::Result<Result<Value, ApiError>> {
        self.call(&Request::Add { pod: pod_info(pod, annotations) })
    }

    pub fn status(&self) -> anyhow::Result<Value> {
        self.call(&Request::Status)?.map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn pods(&self) -> anyhow::Result<Value> {
        self.call(&Request::Pods)?.map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().map(LabProcess::pid)
    }

    /// Waits until the shared proxy with `pid` is current: the agent promotes a
    /// proxy only after replaying every pod to it and pointing inbound steering
    /// at its listeners, so from then on every pod is served by it.
    pub fn wait_proxy_current(&self, pid: i32) -> anyhow::Result<()> {
        crate::wait::until("the agent to promote the new proxy", Duration::from_secs(10), || {
            (self.status().ok()?["proxy_pid"].as_i64()? == i64::from(pid)).then_some(())
        })
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        self.process = None;
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// One sample of the agent's /metrics (on its default admin address in the node netns).
    pub fn metric(&self, name_and_labels: &str) -> anyhow::Result<f64> {
        let netns = std::fs::File::open(self.node.netns().path())?;
        crate::admin::metric(std::os::fd::AsFd::as_fd(&netns), ADMIN.into(), name_and_labels)
    }

    /// An HTTP GET on the agent's admin endpoint; the whole response.
    pub fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        let netns = std::fs::File::open(self.node.netns().path())?;
        crate::admin::get(std::os::fd::AsFd::as_fd(&netns), ADMIN.into(), path)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// What the CNI plugin would send for a lab pod.
pub fn pod_info(pod: &Pod, annotations: &[(&str, &str)]) -> PodInfo {
    PodInfo {
        uid: pod.uid().into(),
        name: pod.name().into(),
        namespace: pod.namespace().into(),
        netns: pod.netns().path().to_owned(),
        ips: pod.ips().to_vec(),
        annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        container_id: Some(pod.attachment().container_id.clone()),
    }
}

impl Agent {
    /// An agent that installs podsteer-cni into the node's CNI dirs (as the
    /// DaemonSet does) and hands pods to a shared proxy.
    pub fn start_installed(node: &Node, mode: &str, extra: &[&str]) -> anyhow::Result<Agent> {
        let bin_dir = node.cni_bin_dir().display().to_string();
        let conf_dir = node.cni_conf_dir().display().to_string();
        let plugin = bin("podsteer-cni").display().to_string();
        let log = node.state_dir().join("cni.log").display().to_string();
        let mut args =
            vec!["--install-cni", "--cni-bin-dir", &bin_dir, "--cni-conf-dir", &conf_dir, "--cni-plugin", &plugin, "--cni-log-file", &log];
        args.extend_from_slice(extra);
        Agent::start_with_proxy(node, mode, &args)
    }

    /// Sends a signal to the running agent.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
        self.process.as_ref().context("agent is not running")?.signal(sig)
    }

    /// How the agent ended, if it did (the lab did not kill it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut()?.child_mut().try_wait().ok()?
    }

    /// Waits for the agent to exit on its own (after SIGTERM or SIGUSR1).
    pub fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let st = self.process.as_mut().context("agent is not running")?.wait_exit(deadline)?;
        self.process = None;
        Ok(st)
    }
}
