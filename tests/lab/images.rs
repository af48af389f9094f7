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

/// One layer: /bin/busybox and the applets the tests use as symlinks.
fn layer() -> anyhow::Result<Vec<u8>> {
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
    Ok(b.into_inner()?)
}

/// Writes an OCI layout tarball for `name` with `entrypoint`.
pub fn write_oci_tar(path: &Path, name: &str, entrypoint: &[&str]) -> anyhow::Result<()> {
    let layer = layer()?;
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
