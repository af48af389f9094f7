//! Processes the lab starts: recorded by PID (with start time, so a reused PID
//! is never mistaken for ours) and killed on drop.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where a lab records the PIDs it started.
pub fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("pids")
}

/// A child process of the lab, killed and reaped on drop.
#[derive(Debug)]
pub struct LabProcess {
    name: String,
    child: Option<Child>,
}

impl LabProcess {
    /// Spawns `cmd` and records it in `state_dir` before anything else can fail.
    pub fn spawn(name: &str, mut cmd: Command, state_dir: &Path) -> anyhow::Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id() as i32;
        let proc = LabProcess { name: name.to_owned(), child: Some(child) };
        record(state_dir, pid)?;
        Ok(proc)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child is present until drop")
    }

    /// Sends a signal, for tests that kill a daemon on purpose.
    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.pid()), sig).with_context(|| format!("signalling {}", self.name))
    }

    /// Waits for the process to end on its own, up to `deadline`.
    pub fn wait_exit(&mut self, deadline: std::time::Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.child_mut();
        crate::wait::until("process exit", deadline, || child.try_wait().ok().flatten())
    }
}

impl LabProcess {
    /// SIGKILL and reap, now; dropping does the same.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn record(state_dir: &Path, pid: i32) -> anyhow::Result<()> {
    let start = start_time(pid).unwrap_or(0);
    let mut f = OpenOptions::new().create(true).append(true).open(pid_file(state_dir))?;
    writeln!(f, "{pid} {start}")?;
    Ok(())
}

/// Field 22 of /proc/PID/stat: ticks since boot when the process started.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Kills every recorded process that is still the one recorded; returns how many.
pub fn kill_recorded(state_dir: &Path) -> usize {
    let Ok(text) = fs::read_to_string(pid_file(state_dir)) else { return 0 };
    let mut killed = 0;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(Ok(pid)), Some(Ok(start))) = (f.next().map(str::parse::<i32>), f.next().map(str::parse::<u64>)) else {
            continue;
        };
        if start_time(pid) == Some(start) && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

/// Makes `cmd` enter a netns and, optionally, a cgroup, just before exec.
/// Both fds are opened beforehand, since the child may only make syscalls.
pub fn enter_before_exec(cmd: &mut Command, netns: Option<OwnedFd>, cgroup_procs: Option<File>) {
    // SAFETY: the closure only calls setns and write, both async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(ns) = &netns
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &cgroup_procs {
                // Writing "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A command that enters the netns at `netns` and joins `cgroup` before exec:
/// how the lab starts every pod and node process.
pub fn command_in(program: impl AsRef<std::ffi::OsStr>, netns: &Path, cgroup: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new(program);
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?.into();
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    enter_before_exec(&mut cmd, Some(ns), Some(procs));
    Ok(cmd)
}
