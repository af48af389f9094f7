//! daemonset.yaml against the Kubernetes API types and against the binaries'
//! own command-line definitions, so the manifest cannot drift from the code.

use std::path::Path;

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount};
use podsteer_agent::cli::{Cli, Cmd};
use podsteer_agent::config::defaults;
use podsteer_proxy::config::ProxyConfig;
use serde::de::DeserializeOwned;

fn docs(path: &str) -> anyhow::Result<Vec<serde_yaml::Value>> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path))?;
    serde_yaml::Deserializer::from_str(&text).map(|d| Ok(serde::Deserialize::deserialize(d)?)).collect()
}

/// Parses one object as `T` and checks the typed object re-serializes to the
/// same JSON: a misspelled or misplaced field would be dropped and show up here.
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &serde_yaml::Value) -> anyhow::Result<T> {
    let json: serde_json::Value = serde_json::to_value(doc)?;
    let t: T = serde_json::from_value(json.clone())?;
    let back = serde_json::to_value(&t)?;
    assert_eq!(back, json, "a field is not part of the Kubernetes type");
    Ok(t)
}

fn by_kind<'a>(d: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    d.iter().find(|x| x["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

struct Manifest {
    config: ConfigMap,
    /// The agent's.
    ds: DaemonSet,
    /// The shared proxy's: its own, so each rolls on its own.
    proxy_ds: DaemonSet,
}

fn manifest() -> anyhow::Result<Manifest> {
    let d = docs("daemonset.yaml")?;
    assert_eq!(d.len(), 7, "Namespace, ServiceAccount, ClusterRole and its binding, ConfigMap, two DaemonSets");
    typed::<Namespace>(by_kind(&d, "Namespace"))?;
    typed::<ServiceAccount>(by_kind(&d, "ServiceAccount"))?;
    typed::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>(by_kind(&d, "ClusterRoleBinding"))?;
    let ds = |name: &str| {
        d.iter().find(|x| x["kind"] == "DaemonSet" && x["metadata"]["name"] == name).unwrap_or_else(|| panic!("no DaemonSet {name}"))
    };
    Ok(Manifest { config: typed(by_kind(&d, "ConfigMap"))?, ds: typed(ds("podsteer"))?, proxy_ds: typed(ds("podsteer-proxy"))? })
}

fn pod_of(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec")
}

fn pod(m: &Manifest) -> &PodSpec {
    pod_of(&m.ds)
}

fn proxy_pod(m: &Manifest) -> &PodSpec {
    pod_of(&m.proxy_ds)
}

fn container<'a>(p: &'a PodSpec, name: &str) -> &'a Container {
    p.containers.iter().chain(p.init_containers.iter().flatten()).find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

/// command + args, then every ConfigMap entry as the flag whose `env` it is:
/// how clap would read the container's environment.
fn agent_argv(m: &Manifest, c: &Container) -> Vec<String> {
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    let cmd = Cli::command();
    for (k, v) in m.config.data.clone().unwrap_or_default() {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == k.as_str()))
            .unwrap_or_else(|| panic!("ConfigMap key {k} is no podsteer-agent flag's env"));
        let long = arg.get_long().expect("env flags are long flags");
        if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            if v == "true" {
                argv.push(format!("--{long}"));
            }
        } else {
            argv.push(format!("--{long}={v}"));
        }
    }
    argv
}

#[test]
fn every_object_is_a_valid_kubernetes_object() -> anyhow::Result<()> {
    let m = manifest()?;
    let p = pod(&m);
    assert_eq!(p.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(
        p.tolerations.as_ref().is_some_and(|t| t.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())),
        "tolerates every taint"
    );
    for ds in [&m.ds, &m.proxy_ds] {
        assert_eq!(ds.spec.as_ref().and_then(|s| s.update_strategy.as_ref()).and_then(|u| u.type_.as_deref()), Some("RollingUpdate"));
    }
    assert_eq!(p.host_pid, Some(true), "the agent identifies socket peers by /proc/<pid>/ns/net");
    assert_eq!(proxy_pod(&m).host_network, Some(true), "the agent hands pods only to a proxy in the node's netns");
    assert!(p.containers.iter().all(|c| c.name != "proxy"), "the proxy is not in the agent's pod: they would roll together");
    // Stop, then start: the sequence `proxy::a_proxy_stopped_then_started_again_refuses_nothing` replays.
    let surge = m
        .proxy_ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_surge.clone());
    assert_eq!(surge, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0)));
    Ok(())
}

#[test]
fn the_agent_args_env_and_ports_parse_with_the_agents_own_cli() -> anyhow::Result<()> {
    let m = manifest()?;
    let p = pod(&m);
    let agent = container(p, "agent");
    let cli = Cli::try_parse_from(agent_argv(&m, agent))?;
    assert_eq!(cli.cmd, Some(Cmd::Run));
    assert!(cli.config.install_cni);
    let admin = cli.config.admin_addr.port() as i32;
    assert!(agent.ports.iter().flatten().any(|pt| pt.container_port == admin), "admin port exposed");
    let probe_port = |pr: &Option<k8s_openapi::api::core::v1::Probe>| {
        pr.as_ref().and_then(|p| p.http_get.as_ref()).map(|g| (g.path.clone(), g.port.clone()))
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(probe_port(&agent.liveness_probe), Some((Some("/healthz".into()), IntOrString::Int(admin))));
    assert_eq!(probe_port(&agent.readiness_probe), Some((Some("/readyz".into()), IntOrString::Int(admin))));

    let init = container(p, "mount-bpffs");
    let init_cli = Cli::try_parse_from(init.command.clone().unwrap_or_default())?;
    assert_eq!(init_cli.cmd, Some(Cmd::MountBpffs));

    let proxy = container(proxy_pod(&m), "proxy");
    let mut argv = proxy.command.clone().unwrap_or_default();
    argv.extend(proxy.args.clone().unwrap_or_default());
    let pc = ProxyConfig::try_parse_from(argv)?;
    assert_eq!(pc.control.as_ref(), cli.config.proxy_socket.as_ref(), "the proxy dials the socket the agent serves");
    assert_eq!(probe_port(&proxy.readiness_probe), Some((Some("/ready".into()), IntOrString::Int(pc.admin.port() as i32))));
    Ok(())
}

/// The agent reads the API (pods, Istio's two policy kinds) and may do
/// nothing else; only its pod has a token, and it knows its node's name.
#[test]
fn the_agent_may_only_read_pods_and_policies_and_the_proxy_not_even_that() -> anyhow::Result<()> {
    let d = docs("daemonset.yaml")?;
    let role: k8s_openapi::api::rbac::v1::ClusterRole = typed(by_kind(&d, "ClusterRole"))?;
    let mut granted: Vec<(String, String, String)> = Vec::new();
    for r in role.rules.iter().flatten() {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                granted.extend(r.verbs.iter().map(|v| (g.clone(), res.clone(), v.clone())));
            }
        }
    }
    granted.sort();
    let mut want = Vec::new();
    for (g, res) in [("", "pods"), ("security.istio.io", "authorizationpolicies"), ("security.istio.io", "peerauthentications")] {
        want.extend(["get", "list", "watch"].map(|v| (g.to_string(), res.to_string(), v.to_string())));
    }
    want.sort();
    assert_eq!(granted, want, "read-only, and only what the watches read");
    let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding = typed(by_kind(&d, "ClusterRoleBinding"))?;
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap_or_default());
    let m = manifest()?;
    assert_eq!(pod(&m).automount_service_account_token, Some(true), "the agent reads the API");
    assert_eq!(proxy_pod(&m).automount_service_account_token, Some(false), "the proxy never does");
    let agent = container(pod(&m), "agent");
    let cfg = Cli::try_parse_from(agent_argv(&m, agent))?.config;
    assert!(cfg.kubernetes, "the API is the workload source");
    let node_name = agent.env.iter().flatten().find(|e| e.name == "PODSTEER_NODE_NAME").and_then(|e| e.value_from.as_ref());
    assert_eq!(node_name.and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str()), Some("spec.nodeName"));
    Ok(())
}

#[test]
fn mounts_cover_every_path_the_agent_uses_and_match_its_defaults() -> anyhow::Result<()> {
    let m = manifest()?;
    let p = pod(&m);
    let agent = container(p, "agent");
    let cfg = Cli::try_parse_from(agent_argv(&m, agent))?.config;
    let mounts: Vec<&str> = agent.volume_mounts.iter().flatten().map(|v| v.mount_path.as_str()).collect();
    let covered = |path: &Path| mounts.iter().any(|m| path.starts_with(m));
    for (what, path) in [
        ("bpffs", cfg.bpffs.clone()),
        ("cgroup", cfg.cgroup.clone()),
        ("state dir", cfg.state_dir.clone()),
        ("socket", cfg.socket.clone()),
        ("cni bin", cfg.cni_bin_dir.clone()),
        ("cni conf", cfg.cni_conf_dir.clone()),
        ("cri socket", cfg.cri_socket.clone().expect("cri socket")),
        ("pod netns", "/var/run/netns".into()),
    ] {
        assert!(covered(&path), "{what} {} is not mounted", path.display());
    }
    assert_eq!(cfg.bpffs, Path::new(defaults::BPFFS));
    assert_eq!(cfg.state_dir, Path::new(defaults::STATE_DIR));
    assert_eq!(cfg.socket, Path::new(defaults::SOCKET));
    // The CNI dirs are mounted from the host's defaults.
    let host = |vol: &str| p.volumes.iter().flatten().find(|v| v.name == vol).and_then(|v| v.host_path.as_ref()).map(|h| h.path.clone());
    assert_eq!(host("cni-bin").as_deref(), Some(defaults::CNI_BIN_DIR));
    assert_eq!(host("cni-conf").as_deref(), Some(defaults::CNI_CONF_DIR));
    assert_eq!(host("bpffs").as_deref(), Some(defaults::BPFFS));
    Ok(())
}

/// Each socket is mounted only where its threat model allows (SECURITY.md): the
/// proxy container sees its control socket and not the agent socket.
#[test]
fn the_proxy_container_mounts_its_control_socket_and_not_the_agent_socket() -> anyhow::Result<()> {
    let m = manifest()?;
    let p = pod(&m);
    let cfg = Cli::try_parse_from(agent_argv(&m, container(p, "agent")))?.config;
    let proxy = container(proxy_pod(&m), "proxy");
    let mounts: Vec<&str> = proxy.volume_mounts.iter().flatten().map(|v| v.mount_path.as_str()).collect();
    let covered = |path: &Path| mounts.iter().any(|m| path.starts_with(m));
    let control = cfg.proxy_socket.clone().expect("the agent has a proxy socket");
    assert!(covered(&control), "the proxy cannot reach {}", control.display());
    let proxy_args = proxy.args.iter().flatten().cloned().collect::<Vec<_>>();
    assert!(proxy_args.contains(&format!("--control={}", control.display())), "{proxy_args:?}");
    assert!(!covered(&cfg.socket), "the proxy container mounts the agent socket {}", cfg.socket.display());
    Ok(())
}

#[test]
fn only_the_bpffs_init_step_is_privileged() -> anyhow::Result<()> {
    let m = manifest()?;
    let pods = [pod(&m), proxy_pod(&m)];
    for c in pods.iter().flat_map(|p| p.containers.iter().chain(p.init_containers.iter().flatten())) {
        let sc = c.security_context.as_ref().expect("explicit securityContext");
        let privileged = sc.privileged == Some(true);
        let bidirectional = c.volume_mounts.iter().flatten().any(|v| v.mount_propagation.as_deref() == Some("Bidirectional"));
        // The API server refuses Bidirectional propagation without privileged.
        assert!(!bidirectional || privileged, "{}", c.name);
        if c.name != "mount-bpffs" {
            assert!(!privileged, "{} must use named capabilities", c.name);
            let caps = sc.capabilities.as_ref().expect("capabilities");
            assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]), "{}", c.name);
            assert!(
                c.resources.as_ref().and_then(|r| r.limits.as_ref()).is_some_and(|l| l.contains_key("memory")),
                "{} has a memory limit",
                c.name
            );
        }
    }
    Ok(())
}

#[test]
fn the_example_app_has_no_init_container_and_no_capability() -> anyhow::Result<()> {
    let d = docs("examples/meshed-app.yaml")?;
    let dep: Deployment = typed(by_kind(&d, "Deployment"))?;
    let spec = dep.spec.and_then(|s| s.template.spec).expect("pod spec");
    assert!(spec.init_containers.is_none());
    for c in &spec.containers {
        let added = c.security_context.as_ref().and_then(|s| s.capabilities.as_ref()).and_then(|c| c.add.clone()).unwrap_or_default();
        assert!(added.is_empty(), "{} adds {added:?}", c.name);
    }
    Ok(())
}

/// `setpriv` arguments that leave a root process only the capabilities the
/// container adds (its securityContext drops ALL), as the runtime would.
fn only_capabilities(c: &Container) -> Vec<String> {
    let add = c.security_context.as_ref().and_then(|s| s.capabilities.as_ref()).and_then(|c| c.add.clone()).unwrap_or_default();
    only(&add.iter().map(String::as_str).collect::<Vec<_>>())
}

fn only(caps: &[&str]) -> Vec<String> {
    let set: String = caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect();
    ["setpriv", "--inh-caps", "-all", "--bounding-set", &format!("-all{set}"), "--"].map(str::to_owned).to_vec()
}

/// containerd's default capabilities for a container: what an app (or a
/// sidecar) in a pod has as root.
const RUNTIME_DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// The agent and the shared proxy, each with exactly the capabilities
/// daemonset.yaml gives it, enrol pods for the plugin (full root), take a
/// sidecar's listener from a pod process with the runtime's default
/// capabilities, and relay traffic. The agent reads each caller's netns from
/// /proc, which for a caller with capabilities the agent lacks takes SYS_PTRACE.
/// It runs with `/proc/sys` read-only, as a runtime mounts it for an
/// unprivileged container, and still sets each pod's sysctls.
fn serve_with_the_manifests_capabilities(mode: &str) -> anyhow::Result<()> {
    use podsteer_lab::workload::{addr, run_client, start_server};
    let m = manifest()?;
    let spec = pod(&m);
    let node = podsteer_lab::Node::new(podsteer_lab::NodeOptions::default())?;
    let control = node.state_dir().join("agent").join("proxy.sock");
    // The pods' netns exist before the agent's mount namespace is made, so it
    // has their mounts whatever the host's propagation (HostToContainer gives
    // the real agent later ones too).
    let [a, b, c] = ["a", "b", "c"].map(|n| node.add_pod(podsteer_lab::PodSpec::new("default", n)));
    let (a, b, c) = (a?, b?, c?);
    let mut wrapper: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$@\"",
        "sh",
    ]
    .map(String::from)
    .into();
    wrapper.extend(only_capabilities(container(spec, "agent")));
    let agent = podsteer_lab::agent::Agent::start_under(&node, mode, &["--proxy-socket", &control.display().to_string()], &wrapper)?;
    let _proxy =
        podsteer_lab::proxy::Proxy::start_shared_under(&node, &control, 15020, &[], &only_capabilities(container(proxy_pod(&m), "proxy")))?;
    for p in [&a, &b, &c] {
        let rec = agent.add_pod(p, &[])?.map_err(|e| anyhow::anyhow!("ADD of {}: {e}\n{}", p.name(), agent.log_text()))?;
        assert_eq!(rec["keeps_client_address"], true, "{rec}\n{}", agent.log_text());
        for sysctl in ["tcp_fwmark_accept", "tcp_migrate_req"] {
            let v = p.run(|| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{sysctl}")))??;
            assert_eq!(v.trim(), "1", "{sysctl} in pod {}", p.name());
        }
    }
    assert!(!agent.log_text().contains("read-only"), "{}", agent.log_text());
    let _echo = start_server(&b, None, &["echo", "[::]:8080"])?;
    let out = run_client(&a, &["request", &addr(b.ipv4().expect("v4"), 8080), "1000"])?;
    assert!(out.starts_with("ok 1000"), "{out}");
    let reg = serde_json::to_string(&podsteer_agent::api::Request::RegisterListener { uid: c.uid().into(), family: 2 })?;
    let mut cmd = c.command(only(RUNTIME_DEFAULT_CAPS)[0].clone())?;
    cmd.args(&only(RUNTIME_DEFAULT_CAPS)[1..]).arg(podsteer_lab::agent::bin("podsteer-lab-tool")).args([
        "agent-call",
        &agent.socket.display().to_string(),
        &reg,
        "listen4",
    ]);
    let out = cmd.output()?;
    let r: podsteer_agent::api::Response =
        serde_json::from_slice(&out.stdout).map_err(|e| anyhow::anyhow!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    // The agent knew the caller for pod c: in eBPF mode its listener is taken;
    // iptables mode has no listeners to register, and says it needs none (not
    // "forbidden", and not an error, which would stop a sidecar starting).
    let what = "a pod process with the runtime's capabilities registering its listener";
    assert!(r.ok, "{what}: {r:?}\n{}", agent.log_text());
    let data = r.data.unwrap_or_default();
    assert_eq!(data["registered"], mode == "ebpf", "{what}: {data}");
    Ok(())
}

#[test]
fn the_agent_and_proxy_serve_with_exactly_the_manifests_capabilities_ebpf() -> anyhow::Result<()> {
    serve_with_the_manifests_capabilities("ebpf")
}

#[test]
fn the_agent_and_proxy_serve_with_exactly_the_manifests_capabilities_iptables() -> anyhow::Result<()> {
    serve_with_the_manifests_capabilities("iptables")
}

/// injector.yaml: the webhook configuration, Service and Deployment, typed.
struct InjectorManifest {
    webhooks: k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
    service: k8s_openapi::api::core::v1::Service,
    deployment: Deployment,
}

fn injector_manifest() -> anyhow::Result<InjectorManifest> {
    let d = docs("injector.yaml")?;
    assert_eq!(d.len(), 3, "MutatingWebhookConfiguration, Service, Deployment");
    Ok(InjectorManifest {
        webhooks: typed(by_kind(&d, "MutatingWebhookConfiguration"))?,
        service: typed(by_kind(&d, "Service"))?,
        deployment: typed(by_kind(&d, "Deployment"))?,
    })
}

#[test]
fn the_injector_manifest_is_typed_and_wired_to_the_injector_and_the_agent() -> anyhow::Result<()> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use podsteer_injector::config::InjectorConfig;
    use podsteer_injector::decide::Scope;
    let m = manifest()?;
    let inj = injector_manifest()?;
    let namespace = m.ds.metadata.namespace.clone().expect("namespace");
    let dep_spec = inj.deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    let c = container(dep_spec, "injector");
    let mut argv = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    let cfg = InjectorConfig::try_parse_from(argv)?;
    assert_eq!(inj.deployment.metadata.namespace.as_deref(), Some(namespace.as_str()));
    assert_eq!(dep_spec.service_account_name, pod(&m).service_account_name, "the ServiceAccount daemonset.yaml makes");
    assert_eq!(dep_spec.automount_service_account_token, Some(false), "no API access");
    let port = i32::from(cfg.listen.port());
    let probe = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("readiness");
    assert_eq!((probe.scheme.as_deref(), probe.port.clone()), (Some("HTTPS"), IntOrString::Int(port)));
    let svc = inj.service.spec.as_ref().expect("service spec");
    assert_eq!(svc.ports.iter().flatten().next().and_then(|p| p.target_port.clone()), Some(IntOrString::Int(port)));
    let service_port = svc.ports.iter().flatten().next().map(|p| p.port);
    let mounts: Vec<&str> = c.volume_mounts.iter().flatten().map(|v| v.mount_path.as_str()).collect();
    assert!(
        mounts.iter().any(|m| cfg.tls_cert.starts_with(m) && cfg.tls_key.starts_with(m)),
        "the Secret is mounted where the flags read it"
    );
    assert_eq!(c.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));

    let hooks = inj.webhooks.webhooks.clone().unwrap_or_default();
    assert_eq!(hooks.len(), 3);
    for h in &hooks {
        let s = h.client_config.service.as_ref().expect("a service");
        assert_eq!(
            (s.name.as_str(), s.namespace.as_str(), s.port),
            (inj.service.metadata.name.as_deref().unwrap_or(""), namespace.as_str(), service_port)
        );
        assert!(s.path.as_deref().and_then(Scope::from_path).is_some(), "{}: the injector serves {:?}", h.name, s.path);
        assert_eq!(h.admission_review_versions, ["v1"]);
        assert_eq!(h.side_effects, "None");
        let rules = h.rules.clone().unwrap_or_default();
        assert!(
            rules.iter().all(|r| r.operations == Some(vec!["CREATE".into()]) && r.resources == Some(vec!["pods".into()])),
            "{}",
            h.name
        );
    }
    let failure = |name: &str| hooks.iter().find(|h| h.name == name).and_then(|h| h.failure_policy.clone());
    assert_eq!(failure("namespace.inject.podsteer.io").as_deref(), Some("Fail"));
    assert_eq!(failure("pod-label.inject.podsteer.io").as_deref(), Some("Fail"));
    assert_eq!(failure("pod-annotation.inject.podsteer.io").as_deref(), Some("Ignore"), "it sees every pod elsewhere");
    // podsteer's own namespace is never sent: it is labelled podsteer.io/inject=false.
    let ns_doc = docs("daemonset.yaml")?.into_iter().find(|x| x["kind"] == "Namespace").expect("namespace");
    assert_eq!(ns_doc["metadata"]["labels"]["podsteer.io/inject"], "false");

    // The sidecar it adds: the agent's sidecar socket, mounted; the proxy's own flags.
    let agent_cfg = Cli::try_parse_from(agent_argv(&m, container(pod(&m), "agent")))?.config;
    let sidecar_socket = agent_cfg.sidecar_socket.clone().expect("the agent serves a sidecar socket");
    assert_eq!(
        sidecar_socket.parent(),
        Some(Path::new(&cfg.sidecar.sidecar_socket_dir)),
        "the injector mounts the directory the agent serves it in"
    );
    let agent_mounts = container(pod(&m), "agent").volume_mounts.clone().unwrap_or_default();
    assert!(agent_mounts.iter().any(|v| sidecar_socket.starts_with(&v.mount_path)), "the agent's mounts hold the sidecar socket");
    assert_eq!(i64::from(agent_cfg.proxy_uid), cfg.sidecar.proxy_uid, "the sidecar runs as the UID the interception skips");
    let sidecar = podsteer_injector::sidecar::container(&cfg.sidecar);
    let mut argv = sidecar.command.clone().unwrap_or_default();
    argv.extend(sidecar.args.clone().unwrap_or_default());
    // The kubelet sets the pod UID from the downward API.
    argv.extend(["--pod-uid".to_string(), "uid-from-the-downward-api".into()]);
    let pc = ProxyConfig::try_parse_from(argv)?;
    assert!(pc.sidecar);
    let in_pod = |p: &Path| sidecar.volume_mounts.iter().flatten().any(|m| p.starts_with(&m.mount_path));
    assert!(pc.agent_socket.as_deref().is_some_and(in_pod), "the sidecar dials a socket in its mount: {:?}", pc.agent_socket);
    let pod_uid_env = ProxyConfig::command()
        .get_arguments()
        .find(|a| a.get_id() == "pod_uid")
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    assert!(sidecar.env.iter().flatten().any(|e| Some(&e.name) == pod_uid_env.as_ref()), "the pod UID arrives in {pod_uid_env:?}");
    assert_eq!(i32::from(pc.admin.port()), i32::from(cfg.sidecar.admin_port));
    Ok(())
}
