//! The container and the volume the injector adds. Pure, from the config.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, ObjectFieldSelector, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::SIDECAR_NAME;
use crate::config::SidecarConfig;

/// The volume holding the agent's sidecar socket.
pub const SOCKET_VOLUME: &str = "podsteer-sidecar-socket";
/// Where the sidecar sees that directory.
pub const SOCKET_MOUNT: &str = "/var/run/podsteer/sidecar";
/// The socket in it (the agent's `--sidecar-socket`).
pub const SOCKET_FILE: &str = "agent.sock";

pub fn container(cfg: &SidecarConfig) -> Container {
    let admin = i32::from(cfg.admin_port);
    let probe = |period, failures| Probe {
        http_get: Some(HTTPGetAction { path: Some("/ready".into()), port: IntOrString::Int(admin), ..Default::default() }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let quantities = |pairs: [(&str, &String); 2]| {
        let m: BTreeMap<String, Quantity> =
            pairs.into_iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.to_string(), Quantity(v.clone()))).collect();
        (!m.is_empty()).then_some(m)
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(cfg.proxy_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["podsteer-proxy".into()]),
        args: Some(
            ["--sidecar".into(), format!("--admin=0.0.0.0:{}", cfg.admin_port)]
                .into_iter()
                .chain(mounts_socket(cfg).then(|| format!("--agent-socket={SOCKET_MOUNT}/{SOCKET_FILE}")))
                .collect(),
        ),
        // The agent registered the pod by its UID; the kubelet fills it in.
        env: Some(vec![EnvVar {
            name: "PODSTEER_POD_UID".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "metadata.uid".into(), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some("podsteer-admin".into()),
            container_port: admin,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // Native sidecar: started before the containers after it, stopped after them.
        restart_policy: cfg.native_sidecars.then(|| "Always".into()),
        // The kubelet starts the next container only once this passes, so the
        // app's first connection finds the listeners open.
        startup_probe: cfg.native_sidecars.then(|| probe(1, 120)),
        readiness_probe: Some(probe(5, 3)),
        resources: Some(ResourceRequirements {
            requests: quantities([("cpu", &cfg.cpu_request), ("memory", &cfg.memory_request)]),
            limits: quantities([("cpu", &cfg.cpu_limit), ("memory", &cfg.memory_limit)]),
            ..Default::default()
        }),
        // The interception skips this UID. No capability at all: the node's
        // agent does the interception, and without CAP_NET_ADMIN the proxy
        // connects to the app from the pod's own address (README, Proxy).
        security_context: Some(SecurityContext {
            run_as_user: Some(cfg.proxy_uid),
            run_as_group: Some(cfg.proxy_uid),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: mounts_socket(cfg)
            .then(|| vec![VolumeMount { name: SOCKET_VOLUME.into(), mount_path: SOCKET_MOUNT.into(), ..Default::default() }]),
        ..Default::default()
    }
}

/// The agent's sidecar socket directory. `Directory`, not `DirectoryOrCreate`:
/// on a node whose agent has not made it yet the pod waits, as it waits for
/// the CNI plugin, rather than start a sidecar that cannot register.
pub fn volume(cfg: &SidecarConfig) -> Option<Volume> {
    mounts_socket(cfg).then(|| Volume {
        name: SOCKET_VOLUME.into(),
        host_path: Some(HostPathVolumeSource { path: cfg.sidecar_socket_dir.clone(), type_: Some("Directory".into()) }),
        ..Default::default()
    })
}

fn mounts_socket(cfg: &SidecarConfig) -> bool {
    !cfg.sidecar_socket_dir.is_empty()
}
