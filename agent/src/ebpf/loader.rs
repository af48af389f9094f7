//! Loads the programs, then attaches them or adopts the links a previous agent
//! pinned, swapping in the new program atomically (BPF_LINK_UPDATE) so there is
//! no moment without interception.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use aya::programs::{CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use podsteer_common::program_names as prog;
use tracing::{info, warn};

use super::maps::Maps;
use super::pins::PinDir;
use crate::sys::{self, SysError, attach_type};

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{op} {path}")]
    Pin {
        op: &'static str,
        path: String,
        #[source]
        source: SysError,
    },
    #[error("pin directory {path}")]
    PinDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("counting the possible CPUs")]
    Cpus(#[source] std::io::Error),
    #[error("opening cgroup {path}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// How the agent came by its attachments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Nothing was pinned: programs were attached afresh.
    Attached,
    /// A previous agent's pinned links were kept and given the new programs.
    Adopted,
}

/// The loaded programs and maps, with every attachment pinned.
pub struct EbpfDataPath {
    bpf: Ebpf,
    pub maps: Maps,
    pins: PinDir,
    origin: Origin,
    stale_pods: Vec<u64>,
}

struct CgroupProgram {
    name: &'static str,
    attach_type: u32,
}

const CGROUP_PROGRAMS: [CgroupProgram; 4] = [
    CgroupProgram { name: prog::CONNECT4, attach_type: attach_type::CGROUP_INET4_CONNECT },
    CgroupProgram { name: prog::CONNECT6, attach_type: attach_type::CGROUP_INET6_CONNECT },
    CgroupProgram { name: prog::GETSOCKOPT, attach_type: attach_type::CGROUP_GETSOCKOPT },
    CgroupProgram { name: prog::SOCKOPS, attach_type: attach_type::CGROUP_SOCK_OPS },
];

fn pin_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(SysError) -> EbpfError + 'a {
    move |source| EbpfError::Pin { op, path: path.display().to_string(), source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    move |e| EbpfError::Program { name, source: Box::new(e) }
}

impl EbpfDataPath {
    /// Loads the object (reusing pinned maps) and attaches to `cgroup`, or adopts what is pinned.
    pub fn start(bpffs: &Path, cgroup: &Path) -> Result<Self, EbpfError> {
        sys::ensure_bpffs(bpffs).map_err(pin_err("mount bpffs at", bpffs))?;
        let pins = PinDir::new(bpffs);
        for dir in [pins.maps(), pins.links()] {
            std::fs::create_dir_all(&dir).map_err(|source| EbpfError::PinDir { path: dir.display().to_string(), source })?;
        }
        for retired in podsteer_common::map_names::RETIRED {
            // Nothing reads them any more; a missing pin is the usual case.
            let _ = std::fs::remove_file(pins.map(retired));
        }
        let mut bpf =
            EbpfLoader::new().default_map_pin_directory(pins.maps()).load(super::OBJECT).map_err(|e| EbpfError::Load(Box::new(e)))?;
        let cg = File::open(cgroup).map_err(|source| EbpfError::Cgroup { path: cgroup.display().to_string(), source })?;
        forward_program_logs(&mut bpf);

        let mut adopted = 0;
        for p in &CGROUP_PROGRAMS {
            let fd = load_cgroup_program(&mut bpf, p.name)?;
            let link = pins.link(p.name);
            if link.exists() {
                let l = sys::obj_get(&link).map_err(pin_err("opening pinned link", &link))?;
                sys::link_update(l.as_fd(), fd).map_err(pin_err("updating link", &link))?;
                adopted += 1;
            } else {
                let l = sys::link_create(fd, cg.as_fd(), p.attach_type).map_err(pin_err("attaching", cgroup))?;
                sys::obj_pin(l.as_fd(), &link).map_err(pin_err("pinning", &link))?;
            }
        }
        let maps = Maps::take(&mut bpf)?;

        // sk_msg attaches to the SockHash itself; the attachment lives as long as the
        // pinned map, so the link is forgotten rather than detached on drop.
        let sk_msg: &mut SkMsg = program(&mut bpf, prog::SK_MSG)?;
        sk_msg.load().map_err(prog_err(prog::SK_MSG))?;
        let id = sk_msg.attach(maps.sock_pairs_fd()).map_err(prog_err(prog::SK_MSG))?;
        std::mem::forget(sk_msg.take_link(id).map_err(prog_err(prog::SK_MSG))?);

        let sk_lookup: &mut SkLookup = program(&mut bpf, prog::SK_LOOKUP)?;
        sk_lookup.load().map_err(prog_err(prog::SK_LOOKUP))?;
        watch_resets(&mut bpf, &pins);
        let origin = if adopted == CGROUP_PROGRAMS.len() { Origin::Adopted } else { Origin::Attached };
        let mut dp = EbpfDataPath { bpf, maps, pins, origin, stale_pods: Vec::new() };
        dp.stale_pods = dp.adopt_pod_links()?;
        info!(origin = ?dp.origin, pins = %dp.pins.root().display(), cgroup = %cgroup.display(), stale = dp.stale_pods.len(), "eBPF data path ready");
        Ok(dp)
    }

    /// Gives every pinned pod link the new sk_lookup program. One pod can never
    /// stop the agent from starting: a link whose netns is gone (the pod died
    /// while no agent ran; sk_lookup links do not keep their netns alive, so the
    /// kernel answers ENOLINK) or that cannot be opened or updated is unpinned,
    /// logged and returned, and the caller forgets that pod.
    fn adopt_pod_links(&self) -> Result<Vec<u64>, EbpfError> {
        let prog = self.sk_lookup_fd()?;
        let mut stale = Vec::new();
        for cookie in self.pins.pod_links() {
            let link = self.pins.pod_link(cookie);
            let updated = sys::obj_get(&link).and_then(|l| sys::link_update(l.as_fd(), prog));
            if let Err(e) = updated {
                warn!(cookie, link = %link.display(), error = %crate::controller::error_chain(&e), "stale pod link removed");
                self.detach_pod(cookie)?;
                stale.push(cookie);
            }
        }
        Ok(stale)
    }

    /// Netns cookies of pods whose pinned links were stale at start (see `adopt_pod_links`).
    pub fn stale_pods(&self) -> &[u64] {
        &self.stale_pods
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    fn sk_lookup_fd(&self) -> Result<BorrowedFd<'_>, EbpfError> {
        let p: &SkLookup = self
            .bpf
            .program(prog::SK_LOOKUP)
            .ok_or(EbpfError::MissingProgram { name: prog::SK_LOOKUP })?
            .try_into()
            .map_err(prog_err(prog::SK_LOOKUP))?;
        Ok(p.fd().map_err(prog_err(prog::SK_LOOKUP))?.as_fd())
    }

    /// Attaches sk_lookup to a pod's netns (once; a pinned link is reused).
    pub fn attach_pod(&self, netns: BorrowedFd<'_>, cookie: u64) -> Result<(), EbpfError> {
        let link = self.pins.pod_link(cookie);
        if link.exists() {
            return Ok(());
        }
        let l = sys::link_create(self.sk_lookup_fd()?, netns, attach_type::SK_LOOKUP).map_err(pin_err("attaching sk_lookup for", &link))?;
        sys::obj_pin(l.as_fd(), &link).map_err(pin_err("pinning", &link))
    }

    /// Unpins a pod's sk_lookup link; with our fd closed too, the kernel detaches it.
    pub fn detach_pod(&self, cookie: u64) -> Result<(), EbpfError> {
        let link = self.pins.pod_link(cookie);
        match std::fs::remove_file(&link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(EbpfError::PinDir { path: link.display().to_string(), source: e }),
            _ => Ok(()),
        }
    }

    /// Uninstall: drops every pin, which detaches the links and frees the maps.
    pub fn remove_pins(bpffs: &Path) -> Result<(), EbpfError> {
        let pins = PinDir::new(bpffs);
        match std::fs::remove_dir_all(pins.root()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(EbpfError::PinDir { path: pins.root().display().to_string(), source: e })
            }
            _ => Ok(()),
        }
    }
}

/// Attaches the reset watch (tp_btf on tcp_receive_reset) and pins it in
/// place of a previous agent's: the new one is attached before the old pin
/// goes, so no reset is missed across a restart. Without it (no kernel BTF)
/// the agent runs on, and a direct connection a server resets reads as the
/// app's own abort (`client_disconnected`).
fn watch_resets(bpf: &mut Ebpf, pins: &PinDir) {
    let mut attach = || -> Result<(), Box<dyn std::error::Error>> {
        let btf = aya::Btf::from_sys_fs()?;
        let p: &mut aya::programs::BtfTracePoint = program(bpf, prog::RESET_SEEN)?;
        p.load("tcp_receive_reset", &btf)?;
        let id = p.attach()?;
        let link: aya::programs::links::FdLink = p.take_link(id)?.into();
        let path = pins.link(prog::RESET_SEEN);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        // Dropping the pinned handle closes our fd; the pin keeps the link.
        drop(link.pin(&path)?);
        Ok(())
    };
    if let Err(e) = attach() {
        warn!(error = %e, "reset watch not attached: a server's reset of a direct connection will read as client_disconnected");
    }
}

/// The programs log only rare events (a full map); a thread forwards them into
/// the agent's log as they come. Without the log map the agent runs on.
fn forward_program_logs(bpf: &mut Ebpf) {
    use std::os::fd::AsFd as _;
    let mut logger = match aya_log::EbpfLogger::init(bpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "eBPF program logs are not forwarded");
            return;
        }
    };
    let spawned = std::thread::Builder::new().name("ebpf-log".into()).spawn(move || {
        loop {
            let mut fds = [nix::poll::PollFd::new(logger.as_fd(), nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) => logger.flush(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "polling eBPF program logs");
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "eBPF program log thread");
    }
}

fn program<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    bpf.program_mut(name).ok_or(EbpfError::MissingProgram { name })?.try_into().map_err(prog_err(name))
}

/// Loads one cgroup program and returns its fd.
fn load_cgroup_program<'a>(bpf: &'a mut Ebpf, name: &'static str) -> Result<BorrowedFd<'a>, EbpfError> {
    let p = bpf.program_mut(name).ok_or(EbpfError::MissingProgram { name })?;
    match p {
        aya::programs::Program::CgroupSockAddr(p) => load_fd::<CgroupSockAddr>(p, name),
        aya::programs::Program::CgroupSockopt(p) => load_fd::<CgroupSockopt>(p, name),
        aya::programs::Program::SockOps(p) => load_fd::<SockOps>(p, name),
        _ => Err(EbpfError::MissingProgram { name }),
    }
}

trait Loadable {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn fd_of(&self) -> Result<BorrowedFd<'_>, aya::programs::ProgramError>;
}

macro_rules! loadable {
    ($t:ty) => {
        impl Loadable for $t {
            fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
            fn fd_of(&self) -> Result<BorrowedFd<'_>, aya::programs::ProgramError> {
                Ok(self.fd()?.as_fd())
            }
        }
    };
}
loadable!(CgroupSockAddr);
loadable!(CgroupSockopt);
loadable!(SockOps);

fn load_fd<'a, T: Loadable>(p: &'a mut T, name: &'static str) -> Result<BorrowedFd<'a>, EbpfError> {
    p.load_it().map_err(prog_err(name))?;
    p.fd_of().map_err(prog_err(name))
}
