//! The agent's only home for raw syscalls: entering a netns, reading its cookie,
//! and the bpf link calls aya 0.14 does not expose for every program type.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("opening netns {path}")]
    OpenNetns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace")]
    NotNetns { path: String },
    #[error("{call}")]
    Syscall {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("thread in netns {path} panicked")]
    ThreadPanic { path: String },
}

fn syscall(call: &'static str) -> SysError {
    SysError::Syscall { call, source: std::io::Error::last_os_error() }
}

/// A listening Unix socket at `path` that only root can connect to. A stale
/// socket file from an earlier run is replaced.
pub fn bind_owner_only(path: &Path, kind: nix::sys::socket::SockType) -> std::io::Result<OwnedFd> {
    bind_unix(path, kind, 0o600)
}

/// A listening Unix socket at `path` with file mode `mode` (which decides who
/// may connect), replacing a stale one.
pub fn bind_unix(path: &Path, kind: nix::sys::socket::SockType, mode: u32) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, UnixAddr, bind, listen, socket};
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let fd = socket(AddressFamily::Unix, kind, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    listen(&fd, Backlog::new(128).map_err(std::io::Error::from)?)?;
    Ok(fd)
}

/// Replaces `path` with `bytes` so that a reader, or a crash, sees the old file
/// or the new one, never half of one: write a temporary file beside it, then
/// rename it into place.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension(format!("podsteer-tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

/// Opens a netns by path and checks it really is one (NS_GET_NSTYPE).
pub fn open_netns(path: &Path) -> Result<File, SysError> {
    let shown = path.display().to_string();
    let f = File::open(path).map_err(|source| SysError::OpenNetns { path: shown.clone(), source })?;
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: ioctl on an fd we own, no memory arguments.
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(SysError::NotNetns { path: shown });
    }
    Ok(f)
}

/// Runs `f` on a short-lived thread inside `netns`; the caller's thread never moves.
pub fn in_netns<T: Send>(netns: BorrowedFd<'_>, f: impl FnOnce() -> T + Send) -> Result<T, SysError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(netns, CloneFlags::CLONE_NEWNET).map_err(|e| SysError::Syscall { call: "setns", source: e.into() })?;
            Ok(f())
        })
        .join()
        .map_err(|_| SysError::ThreadPanic { path: format!("fd {}", netns.as_raw_fd()) })?
    })
}

/// Where a procfs of the agent's own is mounted when the container's
/// `/proc/sys` is read-only (as runtimes mount it for unprivileged containers).
static OWN_PROCFS: std::sync::OnceLock<Result<std::path::PathBuf, String>> = std::sync::OnceLock::new();
/// Set once at start: the directory [`write_sysctl`] may mount a procfs on.
static PROCFS_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

pub fn set_procfs_dir(dir: std::path::PathBuf) {
    let _ = PROCFS_DIR.set(dir);
}

/// Writes `/proc/sys/<name>` for the calling thread's netns (net sysctls are
/// looked up in the opener's netns, whichever procfs the path is on). Where
/// `/proc/sys` is read-only, a fresh procfs (whose `sys` is writable, with
/// CAP_SYS_ADMIN and CAP_NET_ADMIN) is mounted once in the agent's own mount
/// namespace and used instead.
pub fn write_sysctl(name: &str, value: &str) -> std::io::Result<()> {
    match std::fs::write(Path::new("/proc/sys").join(name), value) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            let root = OWN_PROCFS.get_or_init(mount_own_procfs).clone().map_err(std::io::Error::other)?;
            std::fs::write(root.join("sys").join(name), value)
        }
        other => other,
    }
}

fn mount_own_procfs() -> Result<std::path::PathBuf, String> {
    use nix::mount::{MsFlags, mount};
    let dir = PROCFS_DIR.get().ok_or("/proc/sys is read-only and no directory was set for a procfs of the agent's own")?.clone();
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), &dir, Some("proc"), flags, None::<&str>).map_err(|e| format!("mounting a procfs on {}: {e}", dir.display()))?;
    Ok(dir)
}

/// What one trip into a new pod's netns finds.
pub struct PodNetnsInfo {
    /// SO_NETNS_COOKIE (Linux 5.14): the key every program looks the pod up by.
    pub cookie: u64,
    /// Every address on the netns's interfaces, to check the ADD's `ips` against.
    pub addresses: Vec<std::net::IpAddr>,
}

/// One trip into a new pod's netns: read its cookie and addresses, and let the
/// kernel move queued connections between the proxies' SO_REUSEPORT listeners
/// during a handover (tcp_migrate_req; best effort, older kernels lack it).
pub fn enter_pod(netns: BorrowedFd<'_>) -> Result<PodNetnsInfo, SysError> {
    in_netns(netns, || {
        if let Err(e) = write_sysctl("net/ipv4/tcp_migrate_req", "1") {
            tracing::warn!(error = %e, "net.ipv4.tcp_migrate_req: a proxy handover may reset connections queued on the old listener");
        }
        let addresses = nix::ifaddrs::getifaddrs()
            .map_err(|e| SysError::Syscall { call: "getifaddrs", source: e.into() })?
            .filter_map(|a| {
                let a = a.address?;
                a.as_sockaddr_in()
                    .map(|v4| std::net::IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
            })
            .collect();
        loopback_up()?;
        Ok(PodNetnsInfo { cookie: cookie_here()?, addresses })
    })?
}

/// Sets the pod's `lo` up, as the runtime's loopback plugin does. containerd
/// attaches a pod's networks (loopback among them) concurrently, so this
/// chain can run while `lo` is still down, and with it 127.0.0.1 and ::1,
/// where the proxy's outbound listeners go. Idempotent: the plugin, coming
/// later, finds it up.
fn loopback_up() -> Result<(), SysError> {
    let sock = unbound_socket()?;
    // SAFETY: an all-zero ifreq is valid; the name is "lo" and NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write the ifreq given.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) } != 0 {
        return Err(syscall("ioctl(SIOCGIFFLAGS, lo)"));
    }
    // SAFETY: the flags member is the one SIOCGIFFLAGS filled in.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const req) } != 0 {
        return Err(syscall("ioctl(SIOCSIFFLAGS, lo up)"));
    }
    tracing::info!("the pod's lo was down (its loopback attachment had not run yet): set it up");
    Ok(())
}

/// A socket made in the current netns and bound to nothing: it needs no
/// address, so it works before `lo` is up.
fn unbound_socket() -> Result<OwnedFd, SysError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .or_else(|_| socket(AddressFamily::Inet6, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None))
        .map_err(|e| SysError::Syscall { call: "socket", source: e.into() })
}

fn sockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, opt: libc::c_int) -> Result<i32, String> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for the size given.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, opt, (&raw mut v).cast(), &mut len) };
    if rc != 0 { Err(std::io::Error::last_os_error().to_string()) } else { Ok(v) }
}

/// Checks that an fd handed over SCM_RIGHTS as a pod's inbound listener is a
/// listening TCP socket of `family` inside the netns with cookie `netns_cookie`.
pub fn check_listener(fd: BorrowedFd<'_>, family: u16, netns_cookie: u64) -> Result<(), String> {
    let domain = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(|e| format!("not a socket ({e})"))?;
    if domain != i32::from(family) {
        return Err(format!("socket family {domain}, registered as {family}"));
    }
    if sockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)? != libc::IPPROTO_TCP {
        return Err("not a TCP socket".into());
    }
    if sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 1 {
        return Err("not listening".into());
    }
    let cookie = socket_netns_cookie(fd).map_err(|e| e.to_string())?;
    if cookie != netns_cookie {
        return Err(format!("the socket lives in netns {cookie}, the pod's is {netns_cookie}"));
    }
    Ok(())
}

fn socket_netns_cookie(fd: BorrowedFd<'_>) -> Result<u64, SysError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for the sizes given.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len) };
    if rc != 0 {
        return Err(syscall("getsockopt(SO_NETNS_COOKIE)"));
    }
    Ok(cookie)
}

fn cookie_here() -> Result<u64, SysError> {
    use std::os::fd::AsFd as _;
    socket_netns_cookie(unbound_socket()?.as_fd())
}

/// Attach types from the kernel's uapi (stable ABI).
pub mod attach_type {
    pub const CGROUP_SOCK_OPS: u32 = 3;
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_INET6_CONNECT: u32 = 11;
    pub const CGROUP_GETSOCKOPT: u32 = 21;
    pub const SK_LOOKUP: u32 = 36;
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Large enough for every bpf_attr variant used here; the kernel checks the tail is zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr, call: &'static str) -> Result<libc::c_long, SysError> {
    // SAFETY: attr is a properly sized, zero-tailed bpf_attr for `cmd`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if rc < 0 { Err(syscall(call)) } else { Ok(rc) }
}

/// BPF_LINK_CREATE: a link owns the attachment, so it can be pinned and outlive the agent.
pub fn link_create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32) -> Result<OwnedFd, SysError> {
    let mut a = Attr::new();
    a.put_u32(0, prog.as_raw_fd() as u32); // prog_fd
    a.put_u32(4, target.as_raw_fd() as u32); // target_fd
    a.put_u32(8, attach_type);
    let fd = bpf(BPF_LINK_CREATE, &mut a, "bpf(BPF_LINK_CREATE)")?;
    // SAFETY: the kernel returned a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_UPDATE: swaps the program behind a link atomically (agent upgrade).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<(), SysError> {
    let mut a = Attr::new();
    a.put_u32(0, link.as_raw_fd() as u32);
    a.put_u32(4, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut a, "bpf(BPF_LINK_UPDATE)").map(drop)
}

/// The inode of the netns a netns link (sk_lookup) is attached to; 0 once that
/// netns is gone, since such a link does not keep its netns alive.
pub fn link_netns_ino(link: BorrowedFd<'_>) -> Result<u32, SysError> {
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose
    // netns member starts with netns_ino.
    let mut info = [0u8; 64];
    let mut a = Attr::new();
    a.put_u32(0, link.as_raw_fd() as u32); // bpf_fd
    a.put_u32(4, info.len() as u32); // info_len
    a.put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a, "bpf(BPF_OBJ_GET_INFO_BY_FD)")?;
    Ok(u32::from_ne_bytes([info[16], info[17], info[18], info[19]]))
}

fn path_attr(path: &Path) -> Result<std::ffi::CString, SysError> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| SysError::Syscall { call: "pin path", source: std::io::Error::other(e) })
}

pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<(), SysError> {
    let p = path_attr(path)?;
    let mut a = Attr::new();
    a.put_u64(0, p.as_ptr() as u64);
    a.put_u32(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut a, "bpf(BPF_OBJ_PIN)").map(drop)
}

pub fn obj_get(path: &Path) -> Result<OwnedFd, SysError> {
    let p = path_attr(path)?;
    let mut a = Attr::new();
    a.put_u64(0, p.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut a, "bpf(BPF_OBJ_GET)")?;
    // SAFETY: the kernel returned a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Mounts a bpffs at `dir` unless one is there already.
pub fn ensure_bpffs(dir: &Path) -> Result<(), SysError> {
    std::fs::create_dir_all(dir).map_err(|source| SysError::Syscall { call: "mkdir bpffs", source })?;
    let st = nix::sys::statfs::statfs(dir).map_err(|e| SysError::Syscall { call: "statfs", source: e.into() })?;
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    if st.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(Some("bpffs"), dir, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| SysError::Syscall { call: "mount bpffs", source: e.into() })
}
