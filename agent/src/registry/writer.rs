//! Writes the registry off the caller's thread, newest snapshot first. A file
//! replaced by rename on ext4 is flushed to the disk on the spot
//! (auto_da_alloc), so a burst of changes costs one write, not one each. A DEL
//! or a replay needs no wait: a record a lost write kept is removed at start
//! once its netns is gone. An ADD does wait (`flush`): a pod's map entries with
//! no record are an orphan to the next agent, which removes them.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing::warn;

#[derive(Default)]
struct Slot {
    /// The newest snapshot not yet written, with its generation.
    pending: Option<(u64, Vec<u8>)>,
    queued: u64,
    written: u64,
    stop: bool,
}

pub struct Writer {
    shared: Arc<(Mutex<Slot>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn spawn(path: PathBuf) -> std::io::Result<Writer> {
        let shared = Arc::new((Mutex::new(Slot::default()), Condvar::new()));
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("registry-writer".into()).spawn(move || run(&path, &s))?;
        Ok(Writer { shared, thread: Some(thread) })
    }

    /// Queues a snapshot; an older one still waiting is dropped unwritten.
    pub fn submit(&self, body: Vec<u8>) {
        let (lock, cv) = &*self.shared;
        let mut slot = lock.lock().unwrap_or_else(|p| p.into_inner());
        slot.queued += 1;
        slot.pending = Some((slot.queued, body));
        cv.notify_all();
    }

    /// Waits until the newest snapshot is on disk, or `deadline` passed.
    pub fn flush(&self, deadline: Duration) -> bool {
        let (lock, cv) = &*self.shared;
        let slot = lock.lock().unwrap_or_else(|p| p.into_inner());
        let want = slot.queued;
        let (slot, _) = cv.wait_timeout_while(slot, deadline, |s| s.written < want).unwrap_or_else(|p| p.into_inner());
        slot.written >= want
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.flush(Duration::from_secs(5)) {
            warn!("the pod registry was not written before exit; the next agent repairs from the CRI");
        }
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(path: &std::path::Path, shared: &(Mutex<Slot>, Condvar)) {
    let (lock, cv) = shared;
    loop {
        let (generation, body) = {
            let mut slot = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(p) = slot.pending.take() {
                    break p;
                }
                if slot.stop {
                    return;
                }
                slot = cv.wait(slot).unwrap_or_else(|p| p.into_inner());
            }
        };
        if let Err(e) = crate::sys::replace_file(path, &body, 0o600) {
            warn!(path = %path.display(), error = %e, "saving the pod registry");
        }
        let mut slot = lock.lock().unwrap_or_else(|p| p.into_inner());
        slot.written = slot.written.max(generation);
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removed on drop, also when an assertion fails.
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn flush_sees_the_newest_snapshot_on_disk_and_drop_waits_for_it() {
        let dir = TempDir(std::env::temp_dir().join(format!("podsteer-registry-test-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let path = dir.0.join("pods.json");
        let w = Writer::spawn(path.clone()).expect("writer");
        for i in 0..100 {
            w.submit(format!("{{\"n\":{i}}}").into_bytes());
        }
        assert!(w.flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&path).expect("written"), "{\"n\":99}");
        w.submit(b"{\"n\":100}".to_vec());
        drop(w);
        assert_eq!(std::fs::read_to_string(&path).expect("written"), "{\"n\":100}");
        let names: Vec<_> = std::fs::read_dir(&dir.0).expect("dir").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(names, ["pods.json"], "the temporary file is renamed into place");
    }
}
