//! Container images built here, with no registry: an OCI image layout tarball
//! holding a static busybox, imported with `ctr images import`.

use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

/// The busybox Debian's busybox-static installs: statically linked, so it runs in an empty rootfs.
pub const BUSYBOX: &str = "/bin/busybox";
pub const PAUSE_IMAGE: &str = "podsteer.local/pause:lab";
pub const APP_IMAGE: &str = "podsteer.local/app:lab";

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// podsteer-proxy, as built here, with the shared libraries it loads.
pub const PROXY_IMAGE: &str = "podsteer.local/proxy:lab";
/// Where the proxy image has the binary: on its PATH, as in the released
/// image, so the injector's `command: [podsteer-proxy]` finds it.
pub const PROXY_BIN: &str = "/bin/podsteer-proxy";

/// One layer: /bin/busybox and the applets the tests use as symlinks, and
/// `extra` files (host path, path in the image).
fn layer(extra: &[(std::path::PathBuf, String)]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir, "bin/", std::io::empty())?;
    let bytes = std::fs::read(BUSYBOX)?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(bytes.len() as u64);
    b.append_data(&mut h, "bin/busybox", &bytes[..])?;
    for applet in ["sh", "sleep", "nc", "echo", "cat", "wget"] {
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        l.set_mode(0o777);
        b.append_link(&mut l, format!("bin/{applet}"), "busybox")?;
    }
    for (src, dst) in extra {
        // Through symlinks: the image gets the file under the name asked for.
        let bytes = std::fs::read(src).map_err(|e| anyhow::anyhow!("{}: {e}", src.display()))?;
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(bytes.len() as u64);
        b.append_data(&mut h, dst.trim_start_matches('/'), &bytes[..])?;
    }
    Ok(b.into_inner()?)
}

/// `binary` at `at` and every shared library `ldd` names for it, at the same
/// paths: enough for a dynamically linked Rust binary in an empty rootfs.
pub fn with_libraries(binary: &Path, at: &str) -> anyhow::Result<Vec<(std::path::PathBuf, String)>> {
    let out = std::process::Command::new("ldd").arg(binary).output()?;
    anyhow::ensure!(out.status.success(), "ldd {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    let mut files = vec![(binary.to_path_buf(), at.to_owned())];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)".
        let path = line.split("=>").last().and_then(|r| r.split_whitespace().next()).filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            files.push((p.into(), p.to_owned()));
        }
    }
    Ok(files)
}

/// Writes an OCI layout tarball for `name` with `entrypoint`.
pub fn write_oci_tar(path: &Path, name: &str, entrypoint: &[&str]) -> anyhow::Result<()> {
    write_oci_tar_with(path, name, entrypoint, &[])
}

/// As [`write_oci_tar`], with `extra` files in the layer.
pub fn write_oci_tar_with(path: &Path, name: &str, entrypoint: &[&str], extra: &[(std::path::PathBuf, String)]) -> anyhow::Result<()> {
    let layer = layer(extra)?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&layer)]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(&layer), "size": layer.len()}],
    }))?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&manifest),
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
        }],
    }))?;
    let mut out = tar::Builder::new(std::fs::File::create(path)?);
    let mut add = |p: String, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        out.append_data(&mut h, p, data)
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json".into(), &index)?;
    for blob in [&layer, &config, &manifest] {
        add(format!("blobs/sha256/{}", &sha(blob)["sha256:".len()..]), blob)?;
    }
    out.finish()?;
    Ok(())
}
