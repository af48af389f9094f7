//! A lab cluster whose nodes run the mesh: an agent with `--ca-dir` (and the
//! flags a test adds) and a shared proxy on each, one workload directory
//! standing in for the API server, and helpers to load it and change its files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::Agent;
use crate::cluster::Cluster;
use crate::proxy::Proxy;
use crate::{NodeOptions, Pod, PodSpec};

/// A cluster whose nodes each run an agent (with `--ca-dir`) and a shared proxy.
pub struct Mesh {
    // Agents and proxies go before the nodes they run on.
    pub proxies: Vec<Proxy>,
    pub agents: Vec<Agent>,
    /// Each node's workload directory (usually one, shared, as one API server is).
    workloads: Vec<PathBuf>,
    /// With [`Mesh::start_api`]: the API server the agents watch instead.
    pub api: Option<crate::apiserver::ApiServer>,
    pub cluster: Cluster,
}

impl Mesh {
    /// An `n`-node cluster; [`Mesh::start`] runs its agents and proxies.
    pub fn new(n: usize) -> anyhow::Result<Mesh> {
        let cluster = Cluster::new(n, NodeOptions::default())?;
        Ok(Mesh { proxies: Vec::new(), agents: Vec::new(), workloads: Vec::new(), api: None, cluster })
    }

    /// A directory that goes with the lab (node 0's state).
    pub fn scratch(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.cluster.nodes[0].state_dir().join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// A fresh CA (`podsteer ca create`'s code) in the scratch directory `name`.
    pub fn ca(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.cluster.nodes[0].state_dir().join(name);
        podsteer_identity::ca::create(&d, "cluster.local", 1)?;
        Ok(d)
    }

    /// `ca[i]` and `workloads[i]`: node i's CA and workload directories.
    pub fn start(&mut self, mode: &str, ca: &[&Path], workloads: &[&Path]) -> anyhow::Result<()> {
        self.start_with(mode, ca, workloads, &[])
    }

    /// As [`Mesh::start`], with more agent flags on every node.
    pub fn start_with(&mut self, mode: &str, ca: &[&Path], workloads: &[&Path], extra: &[&str]) -> anyhow::Result<()> {
        let ca: Vec<Option<&Path>> = ca.iter().map(|c| Some(*c)).collect();
        self.start_opts(mode, &ca, workloads, extra, &[])
    }

    /// The general form: a node without a CA (None) runs no HBONE; `proxy`
    /// flags go to every shared proxy.
    pub fn start_opts(
        &mut self,
        mode: &str,
        ca: &[Option<&Path>],
        workloads: &[&Path],
        extra: &[&str],
        proxy: &[&str],
    ) -> anyhow::Result<()> {
        for (i, node) in self.cluster.nodes.iter().enumerate() {
            let (w, c) = (workloads[i].display().to_string(), ca[i].map(|c| c.display().to_string()));
            // The mesh runs the product's default: unmeshed destinations go direct.
            // Every node serves a sidecar socket too, for [`Mesh::sidecar_pod`].
            let sidecars = sidecar_socket(node).display().to_string();
            let mut args =
                vec!["--workload-dir", &w, "--workload-wait-ms", "5000", "--unmeshed-outbound", "direct", "--sidecar-socket", &sidecars];
            if let Some(c) = &c {
                args.extend(["--ca-dir", c.as_str()]);
            }
            args.extend_from_slice(extra);
            let agent = Agent::start_with_proxy(node, mode, &args)?;
            self.proxies.push(Proxy::start_shared(node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, proxy)?);
            self.agents.push(agent);
        }
        self.workloads = workloads.iter().map(|p| p.to_path_buf()).collect();
        Ok(())
    }

    /// Every node's agent with `--kubernetes`, watching one lab API server
    /// (with Istio's CRDs installed if `crds`), and `--node-name` set;
    /// node `i` is named [`node_name`]`(i)`.
    pub fn start_api(&mut self, mode: &str, ca: &Path, crds: bool, extra: &[&str]) -> anyhow::Result<()> {
        let nodes: Vec<&crate::Node> = self.cluster.nodes.iter().collect();
        let api = crate::apiserver::ApiServer::start(&nodes, crds)?;
        let c = ca.display().to_string();
        for (i, node) in self.cluster.nodes.iter().enumerate() {
            let (kc, name) = (api.kubeconfig(i).display().to_string(), node_name(i));
            let mut args = vec![
                "--kubernetes",
                "--kubeconfig",
                &kc,
                "--node-name",
                &name,
                "--workload-wait-ms",
                "5000",
                "--ca-dir",
                &c,
                "--unmeshed-outbound",
                "direct",
            ];
            args.extend_from_slice(extra);
            let agent = Agent::start_with_proxy(node, mode, &args)?;
            self.proxies.push(Proxy::start_shared(node, agent.proxy_socket.as_deref().expect("proxy socket"), 15020, &[])?);
            self.agents.push(agent);
        }
        self.api = Some(api);
        Ok(())
    }

    /// A pod on node `node`. Meshed: its manifest (with `service_account` and
    /// its addresses, as the API server has them once the pod runs) goes into
    /// every workload directory, and its node's agent enrols it.
    pub fn pod(&self, node: usize, name: &str, service_account: &str, meshed: bool) -> anyhow::Result<Pod> {
        self.pod_in(node, "production", name, service_account, &[], meshed)
    }

    /// As [`Mesh::pod`], in `namespace`, with `labels`.
    pub fn pod_in(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: &[(&str, &str)],
        meshed: bool,
    ) -> anyhow::Result<Pod> {
        let pod = self.cluster.nodes[node].add_pod(PodSpec::new(namespace, name))?;
        if meshed {
            for dir in &self.workloads {
                write_manifest_labelled(dir, &pod, service_account, labels)?;
            }
            if let Some(api) = &self.api {
                api.apply(crate::apiserver::pod_object(&pod, service_account, &node_name(node), labels))?;
            }
            self.agents[node].add_pod(&pod, &[])?.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(pod)
    }

    /// A meshed pod on node `node` served by its own sidecar (as the
    /// injector makes one: proxy UID 1337, the node's sidecar socket), which
    /// gets the pod's identity from the agent. The sidecar's admin endpoint
    /// is on 127.0.0.1:15021 in the pod.
    pub fn sidecar_pod(&self, node: usize, name: &str, service_account: &str, labels: &[(&str, &str)]) -> anyhow::Result<(Pod, Proxy)> {
        let n = &self.cluster.nodes[node];
        let pod = n.add_pod(PodSpec::new("production", name))?;
        for dir in &self.workloads {
            write_manifest_labelled(dir, &pod, service_account, labels)?;
        }
        self.agents[node].add_pod(&pod, &[("podsteer.io/proxy-mode", "sidecar")])?.map_err(|e| anyhow::anyhow!("{e}"))?;
        let socket = sidecar_socket(n).display().to_string();
        let sidecar = Proxy::start_sidecar(n, &pod, 15021, &["--agent-socket", &socket, "--pod-uid", pod.uid()])?;
        Ok((pod, sidecar))
    }

    /// Node `node`'s sidecar socket.
    pub fn sidecar_socket(&self, node: usize) -> PathBuf {
        sidecar_socket(&self.cluster.nodes[node])
    }

    /// Until every proxy's mesh view holds `n` pod addresses.
    pub fn wait_peers(&self, n: usize) -> anyhow::Result<()> {
        for (i, p) in self.proxies.iter().enumerate() {
            crate::wait::until(&format!("node {i}'s proxy to know {n} mesh addresses"), Duration::from_secs(10), || {
                (p.metric("podsteer_proxy_mesh_peers").ok()? as usize == n).then_some(())
            })?;
        }
        Ok(())
    }

    /// `podsteer explain SOURCE DEST --output json` with node `node`'s agent state.
    pub fn explain(&self, node: usize, source: &str, dest: &str) -> anyhow::Result<serde_json::Value> {
        self.ctl_json(node, &["explain", source, dest])
    }

    /// `podsteer ARGS --output json` with node `node`'s agent state.
    pub fn ctl_json(&self, node: usize, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.ctl(node, args).arg("--output").arg("json").output()?;
        anyhow::ensure!(out.status.success(), "podsteer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `podsteer ARGS` with node `node`'s agent state, to run.
    pub fn ctl(&self, node: usize, args: &[&str]) -> std::process::Command {
        let a = &self.agents[node];
        let mut cmd = std::process::Command::new(crate::agent::bin("podsteer"));
        cmd.args(["--bpffs", &a.bpffs.display().to_string()])
            .args(["--state-dir", &a.state_dir.display().to_string()])
            .args(["--socket", &a.socket.display().to_string()])
            .args(["--cni-conf-dir", &self.cluster.nodes[node].cni_conf_dir().display().to_string()])
            .args(args);
        cmd
    }

    /// Replaces every policy file with `text` and waits until node `node`'s
    /// proxy has taken a new set (when it differs from the last).
    pub fn set_policies(&self, dir: &Path, text: &str, node: usize) -> anyhow::Result<()> {
        let before = self.proxies[node].metric("podsteer_proxy_policy_updates_total")?;
        let path = dir.join("policies.yaml");
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text) {
            return Ok(());
        }
        put_policy(dir, "policies.yaml", text)?;
        crate::wait::until("the proxy to take the new policies", Duration::from_secs(5), || {
            (self.proxies[node].metric("podsteer_proxy_policy_updates_total").ok()? > before).then_some(())
        })
    }

    pub fn proxy_log(&self, node: usize) -> String {
        std::fs::read_to_string(&self.proxies[node].log).unwrap_or_default()
    }
}

fn sidecar_socket(node: &crate::Node) -> PathBuf {
    node.state_dir().join("sidecar").join("agent.sock")
}

/// The name node `i` has in [`Mesh::start_api`]'s cluster.
pub fn node_name(i: usize) -> String {
    format!("lab-node-{i}")
}

pub fn write_manifest(dir: &Path, pod: &Pod, service_account: &str) -> anyhow::Result<()> {
    let ips: String = pod.ips().iter().map(|ip| format!("  - ip: {ip}\n")).collect();
    let text = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\nspec:\n  serviceAccountName: {service_account}\n  containers:\n  - name: app\n    image: app:latest\nstatus:\n  podIPs:\n{ips}",
        pod.name(),
        pod.namespace(),
        pod.uid()
    );
    std::fs::write(dir.join(format!("{}.yaml", pod.uid())), text)?;
    Ok(())
}

pub fn write_manifest_labelled(dir: &Path, pod: &Pod, service_account: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
    write_manifest(dir, pod, service_account)?;
    let path = dir.join(format!("{}.yaml", pod.uid()));
    let text = std::fs::read_to_string(&path)?;
    let labels: String = labels.iter().map(|(k, v)| format!("    {k}: {v}\n")).collect();
    std::fs::write(&path, text.replacen("metadata:\n", &format!("metadata:\n  labels:\n{labels}"), 1))?;
    Ok(())
}

/// Writes a policy file atomically (rename), as a ConfigMap update lands.
pub fn put_policy(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// Runs `loop` (connect, echo, close, again) from `pod` to `to` for `millis`
/// in a thread; the handle gives its "ok n=.. failures=.." line.
pub fn load(pod: &Pod, to: String, millis: u64) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<String>>> {
    let mut cmd = pod.command(crate::agent::bin("podsteer-lab-tool"))?;
    cmd.args(["loop", &to, &millis.to_string()]);
    Ok(std::thread::spawn(move || -> anyhow::Result<String> {
        let out = cmd.output()?;
        anyhow::ensure!(out.status.success(), "loop: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }))
}

/// `(n, failures)` of a `loop` line.
pub fn load_result(line: &str) -> (u64, u64) {
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok()).unwrap_or(0);
    (field("n="), field("failures="))
}

/// Replaces a CA file the way a Secret update lands: whole, by rename.
pub fn put_ca_file(dir: &Path, name: &str, text: &[u8]) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}
