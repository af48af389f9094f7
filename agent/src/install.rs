//! Installs the CNI plugin on the node: the binary into the CNI bin dir and an
//! entry at the end of the primary conflist. Every change is recorded in an undo
//! file, so uninstall leaves the conflist byte-identical to what it found.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::info;

use podsteer_proto::cni::PLUGIN_TYPE;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a CNI config: {reason}")]
    BadConfig { path: String, reason: String },
    #[error("no CNI config in {dir} yet")]
    NoPrimary { dir: String },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io { op, path: path.display().to_string(), source }
}

/// The primary config, as libcni picks it: the first by name among .conf, .conflist and .json.
pub fn primary(conf_dir: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("conf" | "conflist" | "json")))
        .collect();
    files.sort();
    files.into_iter().next()
}

/// Pure: `existing` with podsteer's entry last (any older copy removed). A
/// single-plugin .conf becomes a conflist, as runtimes read it the same way.
pub fn inject(existing: &Value, ours: &Value) -> Result<Value, String> {
    let mut list = match existing.get("plugins") {
        Some(_) => existing.clone(),
        None => {
            let obj = existing.as_object().ok_or("not a JSON object")?;
            let mut plugin = obj.clone();
            let version = plugin.remove("cniVersion").unwrap_or(json!("1.0.0"));
            let name = plugin.remove("name").ok_or("no name")?;
            json!({"cniVersion": version, "name": name, "plugins": [Value::Object(plugin)]})
        }
    };
    let plugins = list.get_mut("plugins").and_then(Value::as_array_mut).ok_or("plugins is not a list")?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    plugins.push(ours.clone());
    Ok(list)
}

/// Pure: `existing` without podsteer's entry.
pub fn remove(existing: &Value) -> Value {
    let mut v = existing.clone();
    if let Some(p) = v.get_mut("plugins").and_then(Value::as_array_mut) {
        p.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    }
    v
}

pub fn has_entry_last(v: &Value) -> bool {
    v.get("plugins").and_then(Value::as_array).and_then(|p| p.last()).and_then(|p| p.get("type")).and_then(Value::as_str)
        == Some(PLUGIN_TYPE)
}

/// What uninstall needs to put things back.
#[derive(Debug, Serialize, Deserialize)]
struct Undo {
    /// The file as it was before podsteer first touched it.
    original_path: PathBuf,
    original: String,
    /// Where podsteer's version lives (a .conf becomes a .conflist) and what it wrote last.
    written_path: PathBuf,
    written: String,
}

pub struct Installer {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The podsteer-cni binary to copy.
    pub plugin_source: PathBuf,
    pub undo_file: PathBuf,
    /// Our conflist entry.
    pub entry: Value,
}

/// Writes through a temporary file and a rename, so readers never see half a file.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    crate::sys::replace_file(path, bytes, mode).map_err(io("replacing", path))
}

fn render(v: &Value) -> String {
    // Pretty, like the files CNI providers write; serde_json keeps key order.
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

impl Installer {
    pub fn binary_path(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_TYPE)
    }

    /// Idempotent: returns true when it had to (re)insert the entry.
    pub fn install(&self) -> Result<bool, InstallError> {
        let bytes = std::fs::read(&self.plugin_source).map_err(io("reading", &self.plugin_source))?;
        let dst = self.binary_path();
        if std::fs::read(&dst).ok().as_deref() != Some(&bytes[..]) {
            std::fs::create_dir_all(&self.bin_dir).map_err(io("creating", &self.bin_dir))?;
            write_atomic(&dst, &bytes, 0o755)?;
        }
        let path = primary(&self.conf_dir).ok_or_else(|| InstallError::NoPrimary { dir: self.conf_dir.display().to_string() })?;
        let text = std::fs::read_to_string(&path).map_err(io("reading", &path))?;
        let existing: Value =
            serde_json::from_str(&text).map_err(|e| InstallError::BadConfig { path: path.display().to_string(), reason: e.to_string() })?;
        if has_entry_last(&existing) && existing.get("plugins").and_then(Value::as_array).and_then(|p| p.last()) == Some(&self.entry) {
            return Ok(false);
        }
        let new = inject(&existing, &self.entry).map_err(|reason| InstallError::BadConfig { path: path.display().to_string(), reason })?;
        let target =
            if path.extension().and_then(|e| e.to_str()) == Some("conflist") { path.clone() } else { path.with_extension("conflist") };
        let rendered = render(&new);
        // The first write keeps the original; later re-insertions (after the primary
        // CNI rewrote the file) keep the original of the file as that CNI left it.
        let undo = match self.read_undo() {
            Some(u) if u.written_path == target && !has_entry_last(&existing) => {
                Undo { original_path: path.clone(), original: text, written_path: target.clone(), written: rendered.clone() }
            }
            Some(u) => Undo { written: rendered.clone(), ..u },
            None => Undo { original_path: path.clone(), original: text, written_path: target.clone(), written: rendered.clone() },
        };
        self.write_undo(&undo)?;
        write_atomic(&target, rendered.as_bytes(), 0o644)?;
        if target != path {
            std::fs::remove_file(&path).map_err(io("removing", &path))?;
        }
        info!(conflist = %target.display(), "podsteer-cni entry installed");
        Ok(true)
    }

    /// Removes the binary and the entry. If the file is still what podsteer wrote,
    /// the original comes back byte for byte; otherwise only the entry goes.
    pub fn uninstall(&self) -> Result<(), InstallError> {
        if let Some(u) = self.read_undo() {
            let current = std::fs::read_to_string(&u.written_path).ok();
            if current.as_deref() == Some(u.written.as_str()) {
                if u.written_path != u.original_path {
                    std::fs::remove_file(&u.written_path).map_err(io("removing", &u.written_path))?;
                }
                write_atomic(&u.original_path, u.original.as_bytes(), 0o644)?;
            } else if let Some(text) = current
                && let Ok(v) = serde_json::from_str::<Value>(&text)
            {
                write_atomic(&u.written_path, render(&remove(&v)).as_bytes(), 0o644)?;
            }
            let _ = std::fs::remove_file(&self.undo_file);
        }
        match std::fs::remove_file(self.binary_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("removing", &self.binary_path())(e)),
            _ => {
                info!("podsteer-cni uninstalled");
                Ok(())
            }
        }
    }

    fn read_undo(&self) -> Option<Undo> {
        serde_json::from_slice(&std::fs::read(&self.undo_file).ok()?).ok()
    }

    fn write_undo(&self, u: &Undo) -> Result<(), InstallError> {
        let body = serde_json::to_vec_pretty(u).unwrap_or_default();
        write_atomic(&self.undo_file, &body, 0o600)
    }

    /// Re-inserts the entry whenever the conf dir changes (a primary CNI that
    /// rewrites its file would otherwise drop podsteer and start pods unmeshed).
    /// `on_reinsert` is called after every re-insertion.
    pub fn watch(&self, on_reinsert: impl Fn()) -> Result<(), InstallError> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let ino = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| io("inotify", &self.conf_dir)(e.into()))?;
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM;
        ino.add_watch(&self.conf_dir, flags).map_err(|e| io("watching", &self.conf_dir)(e.into()))?;
        loop {
            ino.read_events().map_err(|e| io("reading inotify events for", &self.conf_dir)(e.into()))?;
            match self.install() {
                Ok(true) => on_reinsert(),
                Ok(false) | Err(InstallError::NoPrimary { .. }) => {}
                Err(e) => tracing::warn!(error = %crate::controller::error_chain(&e), "re-inserting the CNI entry"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> Value {
        json!({"type": "podsteer-cni", "agentSocket": "/var/run/podsteer/agent.sock"})
    }

    #[test]
    fn injects_last_and_replaces_an_old_copy() {
        let existing: Value = serde_json::from_str(include_str!("../../tests/testdata/10-calico.conflist")).unwrap();
        let once = inject(&existing, &ours()).unwrap();
        let twice = inject(&once, &ours()).unwrap();
        assert_eq!(once, twice);
        assert!(has_entry_last(&once));
        assert_eq!(once["plugins"].as_array().unwrap().len(), existing["plugins"].as_array().unwrap().len() + 1);
        assert_eq!(remove(&once), existing);
    }

    #[test]
    fn a_single_conf_becomes_a_conflist() {
        let conf: Value = serde_json::from_str(include_str!("../../tests/testdata/10-bridge.conf")).unwrap();
        let list = inject(&conf, &ours()).unwrap();
        assert_eq!(list["name"], conf["name"]);
        assert_eq!(list["cniVersion"], conf["cniVersion"]);
        assert_eq!(list["plugins"][0]["type"], "bridge");
        assert!(list["plugins"][0].get("name").is_none());
        assert!(has_entry_last(&list));
    }

    #[test]
    fn not_an_object_is_refused() {
        assert!(inject(&json!([1, 2]), &ours()).is_err());
        assert!(inject(&json!({"plugins": 3}), &ours()).is_err());
    }
}
