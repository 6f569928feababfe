//! One builder of a rig and the fault-injection controls on it.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::error::{Result, RigError};
use crate::procs::{self, PinnedNs, ProcInfo};
use crate::sshd::log_patterns;
use crate::state::{BuilderRecord, StateFile};
use crate::store::PrivateStore;
use crate::util::{self, CLEAN_PATH, lock, program};

/// Bound for "SIGKILL, then wait until gone".
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Which Nix protocol a store URL speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `ssh://`: `nix-store --serve --write` (the legacy serve protocol).
    Serve,
    /// `ssh-ng://`: `nix-daemon --stdio` (the worker protocol).
    Worker,
}

impl Protocol {
    /// The URL scheme: `ssh` or `ssh-ng`.
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Serve => "ssh",
            Protocol::Worker => "ssh-ng",
        }
    }
}

/// The running part of a builder.
#[derive(Debug, Default)]
pub(crate) struct Live {
    /// The listening sshd, our child (the `unshare` + `sh` chain exec'd into it).
    pub(crate) child: Option<Child>,
    pub(crate) pid: Option<u32>,
    /// sshd's mount namespace, pinned so that its inode number identifies it for as long as
    /// we signal by it.
    pub(crate) ns: Option<PinnedNs>,
}

/// One builder: an sshd on 127.0.0.1 in a mount namespace where its private store is /nix.
///
/// All control methods take `&self`, so a rig can be shared (e.g. in an `Arc`) between the
/// test and tasks that inject faults.
#[derive(Debug)]
pub struct Builder {
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    pub(crate) port: u16,
    pub(crate) host_key: String,
    pub(crate) host_key_base64: String,
    pub(crate) config_path: PathBuf,
    pub(crate) log_path: PathBuf,
    pub(crate) store: PrivateStore,
    pub(crate) client_key: PathBuf,
    pub(crate) system: String,
    pub(crate) max_jobs: u32,
    pub(crate) ready_timeout: Duration,
    /// Script that prepares the namespace (untrusted user, nix-daemon) before sshd starts.
    pub(crate) wrapper: Option<PathBuf>,
    /// Which SSH server to (re)start (see `peers.rs`).
    pub(crate) server: crate::peers::ServerSpec,
    pub(crate) live: Mutex<Live>,
    pub(crate) state: Arc<StateFile>,
}

impl Builder {
    /// Position in the rig.
    pub fn index(&self) -> usize {
        self.index
    }

    /// `builderN`: also the `Host` alias in the rig's `ssh_config` and the `HostKeyAlias`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The builder's directory (sshd config, host key, log, store).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sshd port on 127.0.0.1; fixed for the rig's lifetime, across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address to connect to.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The host key's public line as in the `.pub` file: `ssh-ed25519 AAAA... comment`.
    pub fn host_key(&self) -> &str {
        &self.host_key
    }

    /// The host key in known_hosts form, without comment: `ssh-ed25519 AAAA...`.
    pub fn host_key_entry(&self) -> String {
        self.host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Field 8 of a machines line: `base64 -w0` of the host key's `.pub` file.
    pub fn host_key_base64(&self) -> &str {
        &self.host_key_base64
    }

    /// The sshd configuration file.
    pub fn sshd_config_path(&self) -> &Path {
        &self.config_path
    }

    /// sshd's log file (`-E`); it accumulates across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The builder's Nix store. Commands run through it see the same /nix as the builder's
    /// sessions (in a separate namespace over the same directory).
    pub fn store(&self) -> &PrivateStore {
        &self.store
    }

    /// `ssh://root@127.0.0.1:PORT` or `ssh-ng://root@127.0.0.1:PORT`. Nix 2.8 itself cannot
    /// parse the port (it hands `127.0.0.1:PORT` to ssh as a host name); nixmux can.
    pub fn store_url(&self, protocol: Protocol) -> String {
        format!("{}://root@127.0.0.1:{}", protocol.scheme(), self.port)
    }

    /// The builder's line in the rig's `machines` file for `protocol`.
    pub fn machines_line(&self, protocol: Protocol) -> String {
        self.machines_line_for(&self.store_url(protocol))
    }

    pub(crate) fn machines_line_for(&self, uri: &str) -> String {
        format!(
            "{uri} {} {} {} 1 - - {}",
            self.system,
            self.client_key.display(),
            self.max_jobs,
            self.host_key_base64
        )
    }

    /// The listening sshd's pid, if it runs.
    pub fn sshd_pid(&self) -> Option<u32> {
        lock(&self.live).pid
    }

    /// The inode of the builder's mount namespace, if sshd runs (a new one after each
    /// restart).
    pub fn mount_ns(&self) -> Option<u64> {
        lock(&self.live).ns.as_ref().map(PinnedNs::ino)
    }

    /// Whether the listening sshd is alive (it may be frozen).
    pub fn is_running(&self) -> bool {
        let mut live = lock(&self.live);
        match live.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the listening sshd and every session (and the Nix processes they run), waiting
    /// until they are gone. Idempotent.
    ///
    /// # Errors
    /// Processes that survive SIGKILL for 5 s, or a failed state file update.
    pub fn stop_sshd(&self) -> Result<()> {
        let mut live = lock(&self.live);
        let killed = match &live.ns {
            Some(ns) => {
                let nix = self.nix_namespaces();
                let mut pins: Vec<&PinnedNs> = nix.iter().collect();
                pins.push(ns);
                procs::kill_namespaces(&self.name, &pins, None, KILL_TIMEOUT).map(drop)
            }
            None => Ok(()),
        };
        if let Some(mut child) = live.child.take() {
            // Our own child: it is at worst an unreaped zombie, so its pid cannot have been
            // reused and signalling it directly is safe.
            let _ = child.kill();
            let _ = child.wait();
        }
        live.pid = None;
        live.ns = None;
        drop(live);
        killed?;
        self.save_state()
    }

    /// Starts sshd again on the same port, with the same host key, configuration and store.
    /// Does nothing if it is running.
    ///
    /// # Errors
    /// [`RigError::PortInUse`] if someone took the port meanwhile, [`RigError::SshdNotReady`]
    /// if sshd does not come up.
    pub fn start_sshd(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        // The listener may have died on its own, leaving sessions in the old namespace.
        self.stop_sshd()?;
        let running = crate::peers::launch(
            &self.server,
            &self.dir,
            &self.name,
            &self.store,
            self.wrapper.as_deref(),
            &self.config_path,
            &self.log_path,
            self.port,
            self.ready_timeout,
        )?;
        {
            let mut live = lock(&self.live);
            *live = running;
        }
        self.save_state()
    }

    /// Kills every session of the builder (sshd's per-connection processes and whatever they
    /// run) but keeps the listener, so new connections work. Returns how many processes were
    /// killed.
    ///
    /// # Errors
    /// [`RigError::SshdNotRunning`], or processes that survive SIGKILL.
    pub fn kill_sessions(&self) -> Result<usize> {
        let live = lock(&self.live);
        let (Some(pid), Some(ns)) = (live.pid, &live.ns) else {
            return Err(self.not_running());
        };
        let nix = self.nix_namespaces();
        let mut pins: Vec<&PinnedNs> = nix.iter().collect();
        pins.push(ns);
        procs::kill_namespaces(&self.name, &pins, Some(pid), KILL_TIMEOUT)
    }

    /// The mount namespaces (other than sshd's) whose processes see the builder's store as
    /// /nix: Nix 2.8's `nix-store`/`nix-daemon` unshare one each at start, and their builds
    /// run in it (see [`Builder::processes`]).
    fn nix_namespaces(&self) -> Vec<PinnedNs> {
        procs::pin_store_namespaces(&self.name, self.store.nix_id())
    }

    /// SIGSTOPs every process of the builder, listener included: TCP connects still succeed
    /// (the kernel completes the handshake) but nothing answers, like a hung host. Returns
    /// once all of them are stopped.
    ///
    /// # Errors
    /// [`RigError::SshdNotRunning`], or processes that do not stop within 5 s.
    pub fn freeze(&self) -> Result<()> {
        self.signal_all(Signal::STOP)
    }

    /// SIGCONTs every process of the builder (undoes [`Builder::freeze`]).
    ///
    /// # Errors
    /// [`RigError::SshdNotRunning`].
    pub fn thaw(&self) -> Result<()> {
        self.signal_all(Signal::CONT)
    }

    fn signal_all(&self, sig: Signal) -> Result<()> {
        let live = lock(&self.live);
        let Some(ns) = &live.ns else {
            return Err(self.not_running());
        };
        procs::signal_namespace(&self.name, ns, self.store.nix_id(), sig, KILL_TIMEOUT)
    }

    /// All processes of the builder (sshd's, the sessions', remote Nix processes and their
    /// builds, `exec_in_namespace` commands): those in sshd's mount namespace, and those in
    /// the private namespaces Nix 2.8's `nix-store`/`nix-daemon` unshare at start (found by
    /// their /nix being the builder's store). Empty when sshd is stopped. This is how a test
    /// checks that a remote `nix-daemon --stdio` and its build have exited.
    pub fn processes(&self) -> Vec<ProcInfo> {
        match self.mount_ns() {
            Some(ns) => procs::of_builder(ns, self.store.nix_id()),
            None => Vec::new(),
        }
    }

    /// The whole sshd log (empty if unreadable).
    pub fn sshd_log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Number of log lines containing `pattern` (see [`log_patterns`]).
    pub fn count_log(&self, pattern: &str) -> usize {
        self.sshd_log()
            .lines()
            .filter(|l| l.contains(pattern))
            .count()
    }

    /// Authenticated SSH connections so far ([`log_patterns::ACCEPTED`]).
    pub fn accepted_connections(&self) -> usize {
        self.count_log(log_patterns::ACCEPTED)
    }

    /// Session channel open requests so far ([`log_patterns::SESSION_OPEN`]).
    pub fn session_opens(&self) -> usize {
        self.count_log(log_patterns::SESSION_OPEN)
    }

    /// Session channels refused for exceeding MaxSessions ([`log_patterns::SESSION_REFUSED`]).
    pub fn refused_sessions(&self) -> usize {
        self.count_log(log_patterns::SESSION_REFUSED)
    }

    /// Waits until at least `at_least` log lines contain `pattern` or `timeout` passes, and
    /// returns the last count. sshd writes its log asynchronously to the client's view, so a
    /// test should wait for, not just read, a count it expects.
    pub fn wait_for_log(&self, pattern: &str, at_least: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.count_log(pattern);
            if n >= at_least || Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A command running `program args...` inside the builder's live mount namespace (via
    /// `nsenter --mount=/proc/<sshd pid>/ns/mnt`) with the builder's `HOME` and
    /// `NIX_CONF_DIR`; it shows up in [`Builder::processes`]. When sshd is stopped, it runs
    /// through the builder's [`PrivateStore`] instead (same /nix, fresh namespace).
    ///
    /// # Errors
    /// `nsenter` missing.
    pub fn command_in_namespace<I, S>(
        &self,
        program_name: impl AsRef<std::ffi::OsStr>,
        args: I,
    ) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let Some(pid) = self.sshd_pid() else {
            return Ok(self.store.command(program_name, args));
        };
        let mut cmd = Command::new(program("nsenter")?);
        cmd.arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .arg("--")
            .arg(program_name)
            .args(args);
        cmd.env_clear().env("PATH", CLEAN_PATH);
        for (k, v) in self.store.env() {
            cmd.env(k, v);
        }
        Ok(cmd)
    }

    /// Runs [`Builder::command_in_namespace`] to completion.
    ///
    /// # Errors
    /// [`RigError::CommandFailed`] on a non-zero exit.
    pub fn exec_in_namespace<I, S>(
        &self,
        program_name: impl AsRef<std::ffi::OsStr>,
        args: I,
    ) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command_in_namespace(program_name, args)?;
        cmd.stdin(Stdio::null());
        util::run_checked(&mut cmd)
    }

    fn not_running(&self) -> RigError {
        RigError::SshdNotRunning {
            builder: self.name.clone(),
        }
    }

    fn record(&self) -> BuilderRecord {
        let live = lock(&self.live);
        let (dev, ino) = self.store.nix_id();
        BuilderRecord {
            name: self.name.clone(),
            port: self.port,
            sshd_pid: live.pid,
            mount_ns: live.ns.as_ref().map(PinnedNs::ino),
            store: self.store.path().to_owned(),
            store_nix_dev: dev,
            store_nix_ino: ino,
            sshd_log: self.log_path.clone(),
            host_key: self.host_key.clone(),
        }
    }

    pub(crate) fn save_state(&self) -> Result<()> {
        let record = self.record();
        let index = self.index;
        self.state.update(|s| {
            if let Some(slot) = s.builders.get_mut(index) {
                *slot = record;
            } else {
                s.builders.push(record);
            }
        })
    }

    /// Kills everything in the builder's namespace and in any other namespace over its store
    /// (leftovers of `PrivateStore::command`), and reaps sshd. Used by `Drop`.
    pub(crate) fn teardown(&self) -> Result<()> {
        let mut live = lock(&self.live);
        let others = procs::pin_store_namespaces(&self.name, self.store.nix_id());
        let mut pins: Vec<&PinnedNs> = others.iter().collect();
        pins.extend(live.ns.as_ref());
        let result = procs::kill_namespaces(&self.name, &pins, None, KILL_TIMEOUT);
        if let Some(mut child) = live.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        live.pid = None;
        live.ns = None;
        result.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_schemes() {
        assert_eq!(Protocol::Serve.scheme(), "ssh");
        assert_eq!(Protocol::Worker.scheme(), "ssh-ng");
    }
}
