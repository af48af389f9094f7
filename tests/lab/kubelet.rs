//! The part of the kubelet the lab needs to run a pod spec through the CRI:
//! a Kubernetes container becomes a CRI `ContainerConfig`, as the kubelet
//! builds it (command, args, env with the downward API, hostPath mounts, the
//! security context). Anything the lab cannot honour is an error, not skipped.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, Pod};

/// `c` of `pod` (whose UID is `uid`) as the CRI wants it. `host_dir` maps a
/// hostPath volume's path to where the lab keeps that directory.
pub fn container_config(
    pod: &Pod,
    uid: &str,
    c: &Container,
    host_dir: impl Fn(&str) -> Option<PathBuf>,
) -> anyhow::Result<cri::ContainerConfig> {
    let mut envs = Vec::new();
    for e in c.env.iter().flatten() {
        let value = match (&e.value, e.value_from.as_ref().and_then(|v| v.field_ref.as_ref())) {
            (Some(v), _) => v.clone(),
            (None, Some(f)) => match f.field_path.as_str() {
                "metadata.uid" => uid.to_owned(),
                "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
                other => bail!("{}: env {} from {other}: not in the lab's downward API", c.name, e.name),
            },
            (None, None) if e.value_from.is_some() => bail!("{}: env {}: only fieldRef is supported", c.name, e.name),
            (None, None) => String::new(),
        };
        envs.push(cri::KeyValue { key: e.name.clone(), value });
    }
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let v = volumes.iter().find(|v| v.name == m.name).with_context(|| format!("{}: no volume {}", c.name, m.name))?;
        let Some(hp) = &v.host_path else { bail!("{}: volume {} is not a hostPath, which is all the lab mounts", c.name, m.name) };
        let dir = host_dir(&hp.path).with_context(|| format!("{}: the lab has no directory for hostPath {}", c.name, hp.path))?;
        if hp.type_.as_deref() == Some("Directory") && !dir.is_dir() {
            bail!("{}: hostPath {} ({}) is not a directory", c.name, hp.path, dir.display());
        }
        mounts.push(cri::Mount {
            container_path: m.mount_path.clone(),
            host_path: dir.display().to_string(),
            readonly: m.read_only.unwrap_or(false),
            ..Default::default()
        });
    }
    let sc = c.security_context.clone().unwrap_or_default();
    let caps = sc.capabilities.clone().unwrap_or_default();
    let security_context = cri::LinuxContainerSecurityContext {
        capabilities: Some(cri::Capability {
            add_capabilities: caps.add.unwrap_or_default(),
            drop_capabilities: caps.drop.unwrap_or_default(),
            ..Default::default()
        }),
        privileged: sc.privileged.unwrap_or(false),
        run_as_user: sc.run_as_user.map(|value| cri::Int64Value { value }),
        run_as_group: sc.run_as_group.map(|value| cri::Int64Value { value }),
        readonly_rootfs: sc.read_only_root_filesystem.unwrap_or(false),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        ..Default::default()
    };
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: c.name.clone(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: c.image.clone().unwrap_or_default(), ..Default::default() }),
        command: c.command.clone().unwrap_or_default(),
        args: c.args.clone().unwrap_or_default(),
        envs,
        mounts,
        log_path: format!("{}.log", c.name),
        linux: Some(cri::LinuxContainerConfig { security_context: Some(security_context), ..Default::default() }),
        ..Default::default()
    })
}
