//! A real containerd (from apt) for one lab node: private config, root, state
//! and socket under the node's state dir, started inside the node netns so the
//! bridge and routes its CNI plugins make stay there. Its CRI plugin runs the
//! node's conf dir and bin dir, exactly as a kubelet's runtime would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use k8s_cri::v1 as cri;

use crate::cgroup::{CgroupDir, V1Dirs};
use crate::images::{self, APP_IMAGE, PAUSE_IMAGE};
use crate::node::{Node, SYSTEM_PLUGIN_DIRS};
use crate::process::{LabProcess, command_in};

/// The system plugins containerd's CRI needs in its single bin dir.
const PLUGINS: &[&str] = &["bridge", "host-local", "loopback", "portmap"];

pub struct Containerd {
    // Drop order: the daemon, then its cgroup (which ends shims and containers).
    process: LabProcess,
    _cgroup: CgroupDir,
    _v1: V1Dirs,
    pub socket: PathBuf,
    pub dir: PathBuf,
    rt: tokio::runtime::Runtime,
    client: podsteer_agent::cri::Client,
    node: Node,
}

impl Containerd {
    pub fn start(node: &Node) -> anyhow::Result<Containerd> {
        let dir = node.state_dir().join("containerd");
        std::fs::create_dir_all(&dir)?;
        for p in PLUGINS {
            let link = node.cni_bin_dir().join(p);
            let src =
                SYSTEM_PLUGIN_DIRS.iter().map(|d| Path::new(d).join(p)).find(|s| s.exists()).with_context(|| format!("CNI plugin {p}"))?;
            if !link.exists() {
                std::os::unix::fs::symlink(src, link)?;
            }
        }
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml(node, &dir, &socket))?;
        // Under the pods' parent: on this hybrid-cgroup host runc places containers
        // only in v1 hierarchies, so in v2 they stay in the shim's cgroup, and the
        // cgroup programs must see them there, as they would under kubepods.
        let cgroup = CgroupDir::create(node.pods_cgroup().join("containerd"))?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let mut cmd = command_in("containerd", node.netns().path(), cgroup.path())?;
        cmd.args(["--config", &config.display().to_string()]).stdout(Stdio::null()).stderr(log);
        let process = node.spawn_owned("containerd", cmd)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = crate::wait::until("containerd's CRI socket", Duration::from_secs(20), || {
            rt.block_on(async {
                let mut c = podsteer_agent::cri::connect(&socket).await.ok()?;
                c.version(cri::VersionRequest::default()).await.ok()?;
                Some(c)
            })
        })
        .map_err(|e| e.context(std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()))?;
        let v1 = V1Dirs { name: node.id().to_string() };
        let c = Containerd { process, _cgroup: cgroup, _v1: v1, socket, dir, rt, client, node: node.clone() };
        c.import(PAUSE_IMAGE, &["/bin/busybox", "sleep", "2147483647"])?;
        c.import(APP_IMAGE, &["/bin/sh", "-c"])?;
        Ok(c)
    }

    fn import(&self, name: &str, entrypoint: &[&str]) -> anyhow::Result<()> {
        self.import_with(name, entrypoint, &[])
    }

    /// Imports an image of busybox plus `extra` files (see [`images::with_libraries`]).
    pub fn import_with(&self, name: &str, entrypoint: &[&str], extra: &[(PathBuf, String)]) -> anyhow::Result<()> {
        let tar = self.dir.join(format!("{}.tar", name.replace(['/', ':'], "_")));
        images::write_oci_tar_with(&tar, name, entrypoint, extra)?;
        let out = std::process::Command::new("ctr")
            .args(["--address", &self.socket.display().to_string(), "-n", "k8s.io", "images", "import", "--snapshotter", "native"])
            .arg(&tar)
            .output()?;
        anyhow::ensure!(out.status.success(), "ctr import {name}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Runs a CRI call to completion.
    pub fn cri<T>(&mut self, f: impl AsyncFnOnce(&mut podsteer_agent::cri::Client) -> Result<T, tonic::Status>) -> anyhow::Result<T> {
        let client = &mut self.client;
        Ok(self.rt.block_on(f(client))?)
    }

    /// RunPodSandbox, as the kubelet asks it: metadata, annotations, a log dir.
    pub fn run_pod(&mut self, namespace: &str, name: &str, annotations: &[(&str, &str)]) -> anyhow::Result<String> {
        let uid = format!("{}-{name}", self.node.id());
        let logs = self.dir.join("logs").join(name);
        std::fs::create_dir_all(&logs)?;
        let config = self.sandbox_config(namespace, name, &uid, &logs, annotations);
        let id = self.cri(async |c| {
            Ok(c.run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() })
                .await?
                .into_inner()
                .pod_sandbox_id)
        })?;
        Ok(id)
    }

    fn sandbox_config(&self, namespace: &str, name: &str, uid: &str, logs: &Path, annotations: &[(&str, &str)]) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata { name: name.into(), uid: uid.into(), namespace: namespace.into(), attempt: 0 }),
            hostname: name.into(),
            log_directory: logs.display().to_string(),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
            linux: Some(cri::LinuxPodSandboxConfig {
                // Named under the lab's id, so v1 cgroup dirs runc makes are swept by prefix.
                cgroup_parent: format!("/{}/pods/{CRI_CGROUP_PREFIX}{name}", self.node.id()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// CreateContainer + StartContainer of the app image running `script` with sh -c;
    /// waits for it to exit and returns its log.
    pub fn run_to_completion(&mut self, sandbox: &str, namespace: &str, name: &str, script: &str) -> anyhow::Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: "app".into(), attempt: 0 }),
            image: Some(cri::ImageSpec { image: APP_IMAGE.into(), ..Default::default() }),
            args: vec![script.into()],
            log_path: "app.log".into(),
            ..Default::default()
        };
        let id = self.start_container(sandbox, namespace, name, &[], config)?;
        self.wait_exited(&id, Duration::from_secs(20))?;
        Ok(self.container_log(name, "app.log"))
    }

    /// The uid the lab gives the pod `name` (CNI_ARGS' K8S_POD_UID).
    pub fn pod_uid(&self, name: &str) -> String {
        format!("{}-{name}", self.node.id())
    }

    /// CreateContainer + StartContainer of `config` in the sandbox of pod
    /// `name` (made with `annotations`); its id.
    pub fn start_container(
        &mut self,
        sandbox: &str,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
        config: cri::ContainerConfig,
    ) -> anyhow::Result<String> {
        let logs = self.dir.join("logs").join(name);
        let sandbox_config = self.sandbox_config(namespace, name, &self.pod_uid(name), &logs, annotations);
        let sb = sandbox.to_owned();
        self.cri(async |c| {
            let id = c
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sb,
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                })
                .await?
                .into_inner()
                .container_id;
            c.start_container(cri::StartContainerRequest { container_id: id.clone() }).await?;
            Ok(id)
        })
    }

    /// Waits for container `id` to exit.
    pub fn wait_exited(&mut self, id: &str, deadline: Duration) -> anyhow::Result<()> {
        let rt = &self.rt;
        let client = &mut self.client;
        crate::wait::until("the container to exit", deadline, || {
            rt.block_on(async {
                let st = client
                    .container_status(cri::ContainerStatusRequest { container_id: id.to_owned(), verbose: false })
                    .await
                    .ok()?
                    .into_inner()
                    .status?;
                (st.state == cri::ContainerState::ContainerExited as i32).then_some(())
            })
        })
    }

    /// A container's log (its `log_path`, under pod `name`'s log directory).
    pub fn container_log(&self, name: &str, log_path: &str) -> String {
        std::fs::read_to_string(self.dir.join("logs").join(name).join(log_path)).unwrap_or_default()
    }

    /// RunPodSandbox for every name at once, as a kubelet starting a burst of
    /// pods does; each name's sandbox id, or the runtime's error.
    pub fn run_pods(&mut self, namespace: &str, names: &[String]) -> Vec<(String, anyhow::Result<String>)> {
        let mut set = tokio::task::JoinSet::new();
        for name in names {
            let uid = format!("{}-{name}", self.node.id());
            let logs = self.dir.join("logs").join(name);
            if let Err(e) = std::fs::create_dir_all(&logs) {
                return vec![(name.clone(), Err(e.into()))];
            }
            let config = self.sandbox_config(namespace, name, &uid, &logs, &[]);
            let mut client = self.client.clone();
            let name = name.clone();
            set.spawn_on(
                async move {
                    let r =
                        client.run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() }).await;
                    (name, r.map(|r| r.into_inner().pod_sandbox_id).map_err(anyhow::Error::from))
                },
                self.rt.handle(),
            );
        }
        self.rt.block_on(set.join_all())
    }

    /// StopPodSandbox + RemovePodSandbox for every id at once.
    pub fn stop_and_remove_all(&mut self, ids: &[String]) -> Vec<anyhow::Result<()>> {
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let mut client = self.client.clone();
            let id = id.clone();
            set.spawn_on(
                async move {
                    client.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await?;
                    client.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id.clone() }).await?;
                    anyhow::Ok(())
                },
                self.rt.handle(),
            );
        }
        self.rt.block_on(set.join_all())
    }

    /// Waits until the CRI plugin has loaded a CNI config that mentions
    /// `plugin`: containerd reloads its conf dir on change, asynchronously, so
    /// a sandbox run just after an install may still get the old chain.
    pub fn wait_cni_config_with(&mut self, plugin: &str) -> anyhow::Result<()> {
        let rt = &self.rt;
        let client = &mut self.client;
        crate::wait::until(&format!("containerd to load a CNI config with {plugin}"), Duration::from_secs(20), || {
            rt.block_on(async {
                let info = client.status(cri::StatusRequest { verbose: true }).await.ok()?.into_inner().info;
                info.get("cniconfig").filter(|c| c.contains(plugin)).map(drop)
            })
        })
    }

    /// The pod names of every ready sandbox.
    pub fn ready_pods(&mut self) -> anyhow::Result<std::collections::BTreeSet<String>> {
        let list = self.cri(async |c| Ok(c.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }).await?.into_inner().items))?;
        Ok(list
            .into_iter()
            .filter(|sb| sb.state == cri::PodSandboxState::SandboxReady as i32)
            .filter_map(|sb| sb.metadata.map(|m| m.name))
            .collect())
    }

    pub fn stop_and_remove(&mut self, sandbox: &str) -> anyhow::Result<()> {
        let id = sandbox.to_owned();
        self.cri(async |c| {
            c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await?;
            c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id }).await?;
            Ok(())
        })
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.process.kill();
        // runc put the containers in v2 cgroups of their own under the pods'
        // parent; end them before the v1 twins of those cgroups are removed.
        let pods = self.node.pods_cgroup().to_owned();
        for dir in std::fs::read_dir(&pods).into_iter().flatten().filter_map(|e| e.ok().map(|e| e.path())) {
            if dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with(CRI_CGROUP_PREFIX))
                && let Err(e) = crate::cgroup::remove_tree(&dir)
            {
                eprintln!("lab: removing {}: {e:#}", dir.display());
            }
        }
    }
}

/// Prefix of the cgroup parents the lab gives CRI sandboxes.
const CRI_CGROUP_PREFIX: &str = "cri-";

fn config_toml(node: &Node, dir: &Path, socket: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        socket = socket.display(),
        bin = node.cni_bin_dir().display(),
        conf = node.cni_conf_dir().display(),
    )
}
