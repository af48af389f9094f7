//! Named network namespaces, made the way `ip netns add` makes them (a bind
//! mount under /run/netns), so `ip netns list` and the CNI plugins see them.

use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace, removed on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    file: File,
}

impl NetNs {
    /// A new netns with `lo` up.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let ns = NetNs::create_with_loopback_down(name)?;
        ns.run(set_loopback_up)??;
        Ok(ns)
    }

    /// A new netns as the kernel makes it: `lo` down.
    pub fn create_with_loopback_down(name: &str) -> anyhow::Result<Self> {
        fs::create_dir_all(NETNS_DIR).context("creating /run/netns")?;
        let path = Path::new(NETNS_DIR).join(name);
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("netns {name} already exists or cannot be made"))?;
        // unshare(CLONE_NEWNET) only moves the calling thread, so a throwaway
        // thread makes the namespace and pins it with the bind mount.
        let target = path.clone();
        let made = std::thread::spawn(move || -> anyhow::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            mount(Some("/proc/thread-self/ns/net"), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .context("bind-mounting the new netns")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?;
        if let Err(e) = made {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(NetNs { name: name.to_owned(), path, file })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` on a thread that has entered this netns; sockets made there stay in it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        run_in(self.file.as_fd(), &self.name, f)
    }

    /// Reads one interface's counters from /proc/thread-self/net/dev inside this netns.
    pub fn if_counters(&self, ifname: &str) -> anyhow::Result<IfCounters> {
        let text = self.run(|| fs::read_to_string("/proc/thread-self/net/dev"))??;
        parse_net_dev(&text, ifname).with_context(|| format!("no interface {ifname} in {}", self.name))
    }
}

/// Runs `f` on a fresh thread inside the netns `fd`; the caller's thread never moves.
pub fn run_in<T: Send>(fd: BorrowedFd<'_>, name: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<T> {
            setns(fd, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {name}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns {name} panicked"))?
    })
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = remove_named(&self.path) {
            eprintln!("lab: removing netns {}: {e:#}", self.name);
        }
    }
}

/// Unmounts and unlinks a named netns; shared by the guard and the sweep.
pub fn remove_named(path: &Path) -> anyhow::Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("umount {}", path.display())),
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("unlink {}", path.display())),
    }
}

/// Packet and byte counters of one interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

fn parse_net_dev(text: &str, ifname: &str) -> Option<IfCounters> {
    text.lines().skip(2).find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        Some(IfCounters { rx_bytes: *f.first()?, rx_packets: *f.get(1)?, tx_bytes: *f.get(8)?, tx_packets: *f.get(9)? })
    })
}

/// A fresh netns has `lo` down; pods get it up from the loopback plugin, the node from here.
fn set_loopback_up() -> anyhow::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    use std::os::fd::AsRawFd;
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    // SAFETY: ifreq is plain data; the ioctls read and write only that struct.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS lo");
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS lo");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:     120       2    0    0    0     0          0         0      120       2    0    0    0     0       0          0\n  \
eth0: 5000 10 0 0 0 0 0 0 7000 12 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(text, "eth0"), Some(IfCounters { rx_bytes: 5000, rx_packets: 10, tx_bytes: 7000, tx_packets: 12 }));
        assert_eq!(parse_net_dev(text, "lo").map(|c| c.tx_packets), Some(2));
        assert_eq!(parse_net_dev(text, "eth1"), None);
    }
}
