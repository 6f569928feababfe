//! Finding and signalling a builder's processes through /proc.
//!
//! A builder is not one process: sshd forks (and re-execs) a child per connection, which runs a
//! shell, which runs `nix-store --serve` or `nix-daemon --stdio`. They all share the mount
//! namespace created for the builder's sshd, so "the builder's processes" are exactly the
//! processes whose `/proc/<pid>/ns/mnt` is that namespace. We never look processes up by name:
//! other engineers' rigs and tests run the same programs on the same machine.
//!
//! Namespace inode numbers are recycled as soon as a namespace dies (seen here: a restarted
//! builder often gets its old number back, and a parallel test may get it too). So before
//! signalling by namespace we *pin* it: an open file on `/proc/<pid>/ns/mnt` keeps the
//! namespace, and thus its number, alive. A namespace is pinned only through a process that
//! provably belongs to the builder: the sshd we spawned, or a process whose `/proc/<pid>/root/nix`
//! is the builder's store directory (same device and inode). The namespace check then also
//! covers processes that cannot be recognised by their /nix, like sshd's pre-auth children,
//! which chroot to /run/sshd.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::error::{Result, RigError};

/// One process of a builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: u32,
    /// `/proc/<pid>/cmdline` with NULs replaced by spaces (sshd rewrites its own, e.g.
    /// `sshd: root@notty`); empty for kernel threads and processes that just exited.
    pub cmdline: String,
}

/// Identity of a file: (device, inode).
pub(crate) type FileId = (u64, u64);

/// The (device, inode) of a path.
pub(crate) fn file_id(path: &Path) -> std::io::Result<FileId> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// The mount namespace inode of a process, from the `mnt:[INODE]` link.
pub(crate) fn mount_ns(pid: u32) -> std::io::Result<u64> {
    parse_ns_link(&fs::read_link(format!("/proc/{pid}/ns/mnt"))?.to_string_lossy())
}

/// Our own mount namespace.
pub(crate) fn self_mount_ns() -> std::io::Result<u64> {
    parse_ns_link(&fs::read_link("/proc/self/ns/mnt")?.to_string_lossy())
}

fn parse_ns_link(link: &str) -> std::io::Result<u64> {
    link.strip_prefix("mnt:[")
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected namespace link {link:?}"),
            )
        })
}

/// What `/nix` is for a process: `/proc/<pid>/root` resolves paths through that process's
/// mount namespace, so this is the builder's store directory for its processes and the host's
/// /nix for everyone else.
pub(crate) fn nix_dir_of(pid: u32) -> std::io::Result<FileId> {
    file_id(Path::new(&format!("/proc/{pid}/root/nix")))
}

/// The cmdline of a process, NULs as spaces.
pub(crate) fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            let s = String::from_utf8_lossy(&b).replace('\0', " ");
            s.trim_end().to_owned()
        })
        .unwrap_or_default()
}

/// The one-letter state from `/proc/<pid>/stat` (`T` = stopped), if the process exists.
pub(crate) fn state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// All pids currently in /proc.
fn all_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether one of `pid`'s file descriptors is the TCP socket listening on 127.0.0.1:`port`
/// (state `0A` in `/proc/<pid>/net/tcp`, matched by socket inode with `/proc/<pid>/fd`).
pub(crate) fn owns_listener(pid: u32, port: u16) -> bool {
    let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    let wanted = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&wanted.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|i| format!("socket:[{i}]")))
                .flatten()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path()).is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
    })
}

/// The processes of a builder: those in its sshd's mount namespace `ns`, plus those in other
/// (non-host) namespaces that see the builder's store `store_nix` as their /nix. Nix 2.8's
/// `nix-store` and `nix-daemon` unshare a private mount namespace of their own at start (a
/// copy of sshd's, so /nix is still the builder's store), and their builds inherit it: they
/// are not in `ns`. Matching by /nix also finds builds orphaned by a dead Nix process.
pub(crate) fn of_builder(ns: u64, store_nix: FileId) -> Vec<ProcInfo> {
    let me = std::process::id();
    let host = [self_mount_ns().ok(), mount_ns(1).ok()];
    all_pids()
        .into_iter()
        .filter(|&pid| {
            if pid == me {
                return false;
            }
            match mount_ns(pid) {
                Ok(n) if n == ns => true,
                Ok(n) => !host.contains(&Some(n)) && nix_dir_of(pid).ok() == Some(store_nix),
                Err(_) => false,
            }
        })
        .map(|pid| ProcInfo {
            pid,
            cmdline: cmdline(pid),
        })
        .collect()
}

/// An open handle on a mount namespace: while it exists, no other namespace can get its inode
/// number.
#[derive(Debug)]
pub(crate) struct PinnedNs {
    _file: fs::File,
    ino: u64,
}

impl PinnedNs {
    /// Pins the mount namespace `pid` is in now, refusing ours and init's.
    pub(crate) fn of(what: &str, pid: u32) -> Result<Self> {
        let path = format!("/proc/{pid}/ns/mnt");
        let file = fs::File::open(&path).map_err(|e| RigError::io(format!("opening {path}"), e))?;
        let ino = file
            .metadata()
            .map_err(|e| RigError::io(format!("stat {path}"), e))?
            .ino();
        check_foreign_namespace(what, ino)?;
        Ok(Self { _file: file, ino })
    }

    /// The namespace's inode number (as in `mnt:[INODE]`).
    pub(crate) fn ino(&self) -> u64 {
        self.ino
    }
}

/// Pins every namespace (other than ours and init's) in which some process sees `store_nix` as
/// its /nix: the builder's sshd namespace and any `PrivateStore::command` namespaces over the
/// same directory.
pub(crate) fn pin_store_namespaces(what: &str, store_nix: FileId) -> Vec<PinnedNs> {
    let host = [self_mount_ns().ok(), mount_ns(1).ok()];
    let mut pins: Vec<PinnedNs> = Vec::new();
    for pid in all_pids() {
        let Ok(ns) = mount_ns(pid) else { continue };
        if host.contains(&Some(ns))
            || pins.iter().any(|p| p.ino == ns)
            || nix_dir_of(pid).ok() != Some(store_nix)
        {
            continue;
        }
        let Ok(pin) = PinnedNs::of(what, pid) else {
            continue;
        };
        // Re-check after pinning: the pid might have exited and been reused in between.
        if pin.ino == ns && nix_dir_of(pid).ok() == Some(store_nix) {
            pins.push(pin);
        }
    }
    pins
}

/// Refuses namespaces that are clearly not a builder's: ours or init's.
pub(crate) fn check_foreign_namespace(what: &str, ns: u64) -> Result<()> {
    let refuse = |reason: &str| {
        Err(RigError::Refused {
            what: what.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if self_mount_ns().ok() == Some(ns) {
        return refuse("its mount namespace is our own (sshd did not enter a private namespace)");
    }
    if mount_ns(1).ok() == Some(ns) {
        return refuse("its mount namespace is the one of pid 1");
    }
    Ok(())
}

/// Sends `sig` to `pid`; a process that is already gone is not an error.
pub(crate) fn signal(pid: u32, sig: Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if let Some(p) = Pid::from_raw(raw) {
        // ESRCH (already gone) is the expected race here; nothing else can fail for root.
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// SIGKILLs every process in the pinned namespaces except `keep`, repeatedly (sessions may
/// fork while we kill), until all are gone or `timeout` passes. Returns how many distinct
/// processes were signalled.
pub(crate) fn kill_namespaces(
    what: &str,
    pins: &[&PinnedNs],
    keep: Option<u32>,
    timeout: Duration,
) -> Result<usize> {
    for pin in pins {
        check_foreign_namespace(what, pin.ino)?;
    }
    let inos: Vec<u64> = pins.iter().map(|p| p.ino).collect();
    let me = std::process::id();
    let deadline = Instant::now() + timeout;
    // A process counts as gone once its namespace link is: the kernel drops it late in
    // do_exit (a zombie has none), after the process released its files and sockets.
    let mut signalled = std::collections::BTreeMap::new();
    loop {
        let mut alive = Vec::new();
        for pid in all_pids() {
            if pid == me || Some(pid) == keep {
                continue;
            }
            let Ok(ns) = mount_ns(pid) else { continue };
            if inos.contains(&ns) {
                signal(pid, Signal::KILL);
                let cmd = signalled.entry(pid).or_insert_with(|| cmdline(pid));
                alive.push(format!("{pid} {cmd}"));
            }
        }
        if alive.is_empty() {
            return Ok(signalled.len());
        }
        if Instant::now() >= deadline {
            return Err(RigError::ProcessesSurvived {
                what: what.to_owned(),
                timeout,
                survivors: alive,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends SIGSTOP or SIGCONT to every process in the pinned namespace until a pass finds nobody
/// new, then (for SIGSTOP) waits until all of them report state `T`.
/// Processes in the namespaces the builder's own Nix processes unshared (see [`of_builder`])
/// are included, found by `store_nix`.
pub(crate) fn signal_namespace(
    what: &str,
    pin: &PinnedNs,
    store_nix: FileId,
    sig: Signal,
    timeout: Duration,
) -> Result<()> {
    check_foreign_namespace(what, pin.ino)?;
    let deadline = Instant::now() + timeout;
    let mut done = std::collections::BTreeSet::new();
    loop {
        let procs = of_builder(pin.ino, store_nix);
        let fresh: Vec<u32> = procs
            .iter()
            .map(|p| p.pid)
            .filter(|pid| !done.contains(pid))
            .collect();
        for &pid in &fresh {
            signal(pid, sig);
            done.insert(pid);
        }
        // `D` (uninterruptible) counts as stopped: the signal is pending and takes effect
        // when the process leaves that state. A build's shell can stay in `D` for good: a
        // vfork parent waits uninterruptibly for its child, which we stopped before it
        // exec'd.
        let settled = sig != Signal::STOP
            || procs
                .iter()
                .all(|p| matches!(state(p.pid), Some('T' | 't' | 'D') | None));
        if fresh.is_empty() && settled {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RigError::ProcessesSurvived {
                what: format!("{what} (signal {sig:?} not taking effect)"),
                timeout,
                survivors: procs
                    .iter()
                    .map(|p| format!("{} {} state {:?}", p.pid, p.cmdline, state(p.pid)))
                    .collect(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespace_links() {
        assert_eq!(parse_ns_link("mnt:[4026531832]").ok(), Some(4026531832));
        assert!(parse_ns_link("net:[1]").is_err());
        assert!(parse_ns_link("mnt:[x]").is_err());
    }

    #[test]
    fn own_process_is_visible() {
        let me = std::process::id();
        assert!(state(me).is_some());
        assert!(!cmdline(me).is_empty());
        let ns = self_mount_ns().expect("own namespace");
        assert_eq!(mount_ns(me).expect("ns of own pid"), ns);
        assert!(check_foreign_namespace("self", ns).is_err());
    }
}
