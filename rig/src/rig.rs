//! The rig: N Nix builders, each a real OpenSSH sshd on 127.0.0.1 in its own mount namespace
//! with its own /nix, plus the client-side files (key, known_hosts, machines, ssh_config) that
//! point at them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;

use crate::builder::{Builder, KILL_TIMEOUT, Protocol};
use crate::error::{IoContext, Result, RigError};
use crate::install::ensure_peers_installed;
use crate::peers::{NixPeer, SshServer};
use crate::procs::{self, FileId, PinnedNs};
use crate::sshd::{self, SshdSettings};
use crate::state::{RigState, STATE_FILE, STATE_VERSION, StateFile};
use crate::store::PrivateStore;
use crate::util::{check_plain_path, require_root};

/// How many free ports to try for a builder before giving up (another process can grab the
/// port between our probe bind and sshd's bind).
const PORT_ATTEMPTS: usize = 8;

/// How to build a rig.
#[derive(Debug, Clone)]
pub struct RigConfig {
    /// Number of builders (`builder0`, `builder1`, ...).
    pub builders: usize,
    /// sshd `MaxSessions`: session channels per connection (sshd default 10).
    pub max_sessions: u32,
    /// sshd `MaxStartups` (`start:rate:full`, sshd default `10:30:100`).
    pub max_startups: String,
    /// sshd `LogLevel`. `DEBUG1` (the default here) logs every session channel open, which the
    /// session-counting helpers rely on.
    pub log_level: String,
    /// Extra sshd_config lines. They are placed before the rig's own settings, because sshd
    /// keeps the first value of a keyword, so they override them; lines from the first
    /// `Match` on go to the end, as sshd requires.
    pub extra_sshd_config: Vec<String>,
    /// Extra nix.conf lines for every builder's store (e.g. `require-sigs = false`).
    pub extra_nix_conf: Vec<String>,
    /// Field 4 (max jobs) of the machines file lines.
    pub max_jobs: u32,
    /// How long to wait for each sshd to answer with its banner.
    pub ready_timeout: Duration,
    /// A non-root account to create on every builder (e.g. `"nixuser"`). Its commands reach
    /// the store through a `nix-daemon` running as root in the builder's namespace, which
    /// does not trust it (`trusted-users` is root only), as on a shared builder. The account
    /// exists only inside the builder's namespace: its `/etc/passwd`, `/etc/group` and
    /// `/etc/shadow` are private copies bind-mounted over the host's.
    pub untrusted_user: Option<String>,
    /// Run a `nix-daemon` as root in every builder's namespace, as a multi-user install
    /// does (implied by `untrusted_user`): `ssh-ng://` sessions can then use its socket.
    pub nix_daemon: bool,
    /// The builders' SSH server (default OpenSSH; see [`SshServer`]).
    pub ssh_server: SshServer,
    /// The Nix the builders' sessions run (default the host's 2.8; see [`NixPeer`]).
    pub nix: NixPeer,
}

impl Default for RigConfig {
    fn default() -> Self {
        Self {
            builders: 1,
            max_sessions: 10,
            max_startups: "10:30:100".to_owned(),
            log_level: "DEBUG1".to_owned(),
            extra_sshd_config: Vec::new(),
            extra_nix_conf: Vec::new(),
            max_jobs: 4,
            ready_timeout: Duration::from_secs(10),
            untrusted_user: None,
            nix_daemon: false,
            ssh_server: SshServer::OpenSsh,
            nix: NixPeer::Host,
        }
    }
}

impl RigConfig {
    /// The default configuration with `n` builders.
    pub fn with_builders(n: usize) -> Self {
        Self {
            builders: n,
            ..Self::default()
        }
    }
}

/// A running rig. Dropping it kills every builder process (found by namespace, never by name)
/// and removes its directory, also when a test panics; [`Rig::keep`] leaves it running.
#[derive(Debug)]
pub struct Rig {
    dir: PathBuf,
    config: RigConfig,
    builders: Vec<Builder>,
    client_store: PrivateStore,
    state: Arc<StateFile>,
    keep: bool,
}

impl Rig {
    /// Starts a rig in a fresh temporary directory (`$TMPDIR/nixmux-rig-XXXXXX`). Installs the
    /// peers first if needed ([`ensure_peers_installed`]).
    ///
    /// # Errors
    /// Not root, missing tools, or a builder that does not start (the error includes the tail
    /// of its sshd log).
    pub fn start(config: RigConfig) -> Result<Rig> {
        let dir = tempfile::Builder::new()
            .prefix("nixmux-rig-")
            .tempdir()
            .ctx(|| "creating the rig's temporary directory".to_owned())?
            .keep();
        Self::start_at(dir, config)
    }

    /// Starts a rig in `dir`, which must be absent or empty; the rig owns it afterwards (Drop
    /// removes it).
    ///
    /// # Errors
    /// As [`Rig::start`], or `dir` not empty.
    pub fn start_in(dir: impl AsRef<Path>, config: RigConfig) -> Result<Rig> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let mut entries = fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))?;
        if entries.next().is_some() {
            return Err(RigError::UnsuitablePath {
                path: dir.to_owned(),
                reason: "not empty (the rig removes its directory when dropped)".to_owned(),
            });
        }
        let dir = dir
            .canonicalize()
            .ctx(|| format!("resolving {}", dir.display()))?;
        Self::start_at(dir, config)
    }

    fn start_at(dir: PathBuf, config: RigConfig) -> Result<Rig> {
        let prepared = (|| {
            check_plain_path(&dir)?;
            require_root("starting a rig (unshare --mount, sshd as root)")?;
            ensure_peers_installed()?;
            PrivateStore::new(dir.join("client"))
        })();
        let client_store = match prepared {
            Ok(store) => store,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here on the Rig value owns `dir` and its processes, so any early return (or
        // panic) cleans up through Drop.
        let state = Arc::new(StateFile {
            path: dir.join(STATE_FILE),
            state: Mutex::new(RigState {
                version: STATE_VERSION,
                dir: dir.clone(),
                started_by_pid: std::process::id(),
                client_store: dir.join("client"),
                builders: Vec::new(),
            }),
        });
        let mut rig = Rig {
            dir,
            config,
            builders: Vec::new(),
            client_store,
            state,
            keep: false,
        };
        rig.populate()?;
        Ok(rig)
    }

    fn populate(&mut self) -> Result<()> {
        self.state.update(|_| ())?;
        let key = self.client_key();
        sshd::keygen(&key, "nixmux-rig-client")?;
        let pubkey = fs::read_to_string(self.client_pub_key())
            .ctx(|| format!("reading {}", self.client_pub_key().display()))?;
        fs::write(self.authorized_keys(), &pubkey)
            .ctx(|| format!("writing {}", self.authorized_keys().display()))?;
        for index in 0..self.config.builders {
            let builder = self.new_builder(index)?;
            self.builders.push(builder);
            if let Some(b) = self.builders.last() {
                b.save_state()?;
            }
        }
        self.write_client_files()
    }

    fn new_builder(&self, index: usize) -> Result<Builder> {
        let name = format!("builder{index}");
        let dir = self.dir.join(&name);
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let host_key_path = dir.join("ssh_host_ed25519_key");
        sshd::keygen(&host_key_path, &format!("{name}@nixmux-rig"))?;
        let pub_path = dir.join("ssh_host_ed25519_key.pub");
        let pub_file = fs::read(&pub_path).ctx(|| format!("reading {}", pub_path.display()))?;
        let host_key = String::from_utf8_lossy(&pub_file).trim().to_owned();
        let store = PrivateStore::with_config(dir.join("store"), &self.config.extra_nix_conf)?;
        let wrapper = match &self.config.untrusted_user {
            Some(user) => Some(crate::untrusted::prepare(&dir, user)?),
            None if self.config.nix_daemon => Some(crate::daemon::prepare(&dir)?),
            None => None,
        };
        let (server, wrapper) = crate::peers::prepare(
            &self.config,
            &dir,
            &store,
            &host_key_path,
            &self.authorized_keys(),
            wrapper,
        )?;
        let config_path = dir.join("sshd_config");
        let log_path = dir.join("sshd.log");
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = sshd::free_port()?;
            let text = sshd::sshd_config(&SshdSettings {
                port,
                host_key: &host_key_path,
                authorized_keys: &self.authorized_keys(),
                store: &store,
                config: &self.config,
                builder_dir: &dir,
                forced_command: server.forced_command.as_deref(),
            });
            fs::write(&config_path, text).ctx(|| format!("writing {}", config_path.display()))?;
            match crate::peers::launch(
                &server,
                &dir,
                &name,
                &store,
                wrapper.as_deref(),
                &config_path,
                &log_path,
                port,
                self.config.ready_timeout,
            ) {
                Ok(live) => {
                    return Ok(Builder {
                        index,
                        name,
                        dir,
                        port,
                        host_key,
                        host_key_base64: base64::engine::general_purpose::STANDARD
                            .encode(&pub_file),
                        config_path,
                        log_path,
                        store,
                        client_key: self.client_key(),
                        system: format!("{}-linux", std::env::consts::ARCH),
                        max_jobs: self.config.max_jobs,
                        ready_timeout: self.config.ready_timeout,
                        wrapper: wrapper.clone(),
                        server: server.clone(),
                        live: Mutex::new(live),
                        state: Arc::clone(&self.state),
                    });
                }
                Err(e @ RigError::PortInUse { .. }) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(RigError::PortInUse {
            builder: name,
            port: 0,
        }))
    }

    fn write_client_files(&self) -> Result<()> {
        let mut known_hosts = String::new();
        let mut machines = String::from(
            "# nixmux-rig: one ssh:// and one ssh-ng:// line per builder.\n\
             # Nix 2.8 cannot use these (it passes `127.0.0.1:PORT` to ssh as a host name);\n\
             # for Nix itself use machines-ssh-config with NIX_SSHOPTS=\"-F <rig>/ssh_config\".\n",
        );
        let mut machines_alias = String::from(
            "# nixmux-rig: for Nix itself, with NIX_SSHOPTS=\"-F <rig>/ssh_config\" (which maps\n\
             # builderN to its port; HostKeyAlias makes Nix's field-8 host key check match).\n",
        );
        let mut ssh_config = String::from(
            "# nixmux-rig: OpenSSH client config for the builders; use with `ssh -F <this file>`.\n",
        );
        for b in &self.builders {
            let entry = b.host_key_entry();
            // `[host]:port` is how OpenSSH (and nixmux) look up a non-22 port; the alias line
            // serves ssh_config's HostKeyAlias.
            known_hosts.push_str(&format!("[127.0.0.1]:{} {entry}\n", b.port));
            known_hosts.push_str(&format!("{} {entry}\n", b.name));
            machines.push_str(&b.machines_line(Protocol::Serve));
            machines.push('\n');
            machines.push_str(&b.machines_line(Protocol::Worker));
            machines.push('\n');
            for p in [Protocol::Serve, Protocol::Worker] {
                machines_alias.push_str(&b.machines_line_for(&format!(
                    "{}://root@{}",
                    p.scheme(),
                    b.name
                )));
                machines_alias.push('\n');
            }
            ssh_config.push_str(&format!(
                "\nHost {name}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  \
                 IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {kh}\n  \
                 GlobalKnownHostsFile /dev/null\n  HostKeyAlias {name}\n  \
                 StrictHostKeyChecking yes\n  UpdateHostKeys no\n  BatchMode yes\n",
                name = b.name,
                port = b.port,
                key = self.client_key().display(),
                kh = self.known_hosts().display(),
            ));
        }
        for (path, text) in [
            (self.known_hosts(), known_hosts),
            (self.machines(), machines),
            (self.machines_ssh_config(), machines_alias),
            (self.ssh_config(), ssh_config),
        ] {
            fs::write(&path, text).ctx(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// The rig directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the rig was started with.
    pub fn config(&self) -> &RigConfig {
        &self.config
    }

    /// The builders.
    pub fn builders(&self) -> &[Builder] {
        &self.builders
    }

    /// Builder `i`.
    ///
    /// # Panics
    /// If `i` is not below the number of builders (like slice indexing).
    pub fn builder(&self, i: usize) -> &Builder {
        &self.builders[i]
    }

    /// A private store for the client side of tests (`<rig>/client`): push from it, fetch into
    /// it, without touching the host's /nix.
    pub fn client_store(&self) -> &PrivateStore {
        &self.client_store
    }

    /// The client's private key (`<rig>/id_ed25519`), authorised on every builder.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    /// The client's public key (`<rig>/id_ed25519.pub`).
    pub fn client_pub_key(&self) -> PathBuf {
        self.dir.join("id_ed25519.pub")
    }

    /// `<rig>/authorized_keys`, shared by all builders' sshd.
    pub fn authorized_keys(&self) -> PathBuf {
        self.dir.join("authorized_keys")
    }

    /// `<rig>/known_hosts`: per builder `[127.0.0.1]:PORT ssh-ed25519 AAAA...` and the same key
    /// under the alias `builderN` (for ssh_config's HostKeyAlias).
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// The non-root account configured with [`RigConfig::untrusted_user`].
    pub fn untrusted_user(&self) -> Option<&str> {
        self.config.untrusted_user.as_deref()
    }

    /// `<rig>/machines`: per builder an `ssh://root@127.0.0.1:PORT` and an
    /// `ssh-ng://root@127.0.0.1:PORT` line: `URI SYSTEM KEY MAXJOBS 1 - - BASE64HOSTKEY`.
    pub fn machines(&self) -> PathBuf {
        self.dir.join("machines")
    }

    /// `<rig>/machines-ssh-config`: the same lines with `root@builderN` URIs, for unmodified Nix
    /// with `NIX_SSHOPTS="-F <rig>/ssh_config"` (verified with Nix 2.8 `nix store ping`).
    pub fn machines_ssh_config(&self) -> PathBuf {
        self.dir.join("machines-ssh-config")
    }

    /// `<rig>/ssh_config`: `Host builderN` entries for the real OpenSSH client.
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.join("ssh_config")
    }

    /// `<rig>/rig.json`, the state file used by [`Rig::stop_dir`].
    pub fn state_file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// A real OpenSSH `ssh -F <rig>/ssh_config builderN -- remote_command` (for baselines and
    /// tests).
    ///
    /// # Panics
    /// If `builder` is out of range.
    pub fn ssh(&self, builder: usize, remote_command: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(self.ssh_config())
            .arg(self.builder(builder).name())
            .arg("--")
            .arg(remote_command);
        cmd
    }

    /// Leaves the rig running (for the README demo or manual poking) and returns its
    /// directory. `rig.json` there records pids, ports and namespaces; tear it down later with
    /// [`Rig::stop_dir`].
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        for b in &self.builders {
            if let Err(e) = b.save_state() {
                eprintln!("nixmux-rig: keeping {}: {e}", self.dir.display());
            }
        }
        self.dir.clone()
    }

    /// Reads the state file of a rig directory.
    ///
    /// # Errors
    /// [`RigError::State`] if it is missing or malformed.
    pub fn read_state(dir: impl AsRef<Path>) -> Result<RigState> {
        let path = dir.as_ref().join(STATE_FILE);
        let bytes = fs::read(&path).map_err(|e| RigError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let state: RigState = serde_json::from_slice(&bytes).map_err(|e| RigError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(RigError::State {
                path,
                reason: format!("unsupported version {}", state.version),
            });
        }
        Ok(state)
    }

    /// Tears down a rig left by [`Rig::keep`] (possibly from another process): kills the
    /// processes of every builder, then removes the directory.
    ///
    /// Processes are killed by mount namespace, and a namespace only qualifies (and is pinned
    /// while we kill) if some process in it sees the builder's store directory (same device
    /// and inode as recorded) as its /nix, so a pid or namespace inode reused since the rig
    /// was kept is never hit. A recorded sshd pid that no longer passes this check is reported
    /// on stderr and left alone. Limitation: if the listener died and only sshd's pre-auth
    /// children (chrooted to /run/sshd, so their /nix is not the store) remain, their
    /// namespace cannot be attributed and they are left to exit at sshd's LoginGraceTime.
    ///
    /// # Errors
    /// Not a rig directory, not root, or processes that survive SIGKILL (the directory is
    /// then kept for inspection).
    pub fn stop_dir(dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let state = Self::read_state(dir)?;
        let canonical = dir
            .canonicalize()
            .ctx(|| format!("resolving {}", dir.display()))?;
        if state.dir != canonical {
            return Err(RigError::State {
                path: dir.join(STATE_FILE),
                reason: format!(
                    "records directory {} but lives in {}",
                    state.dir.display(),
                    canonical.display()
                ),
            });
        }
        require_root("stopping a rig")?;
        let mut first_err = None;
        for b in &state.builders {
            let recorded: FileId = (b.store_nix_dev, b.store_nix_ino);
            match procs::file_id(&b.store.join("nix")) {
                Ok(id) if id == recorded => {}
                Ok(_) => {
                    first_err.get_or_insert(RigError::Refused {
                        what: b.name.clone(),
                        reason: format!(
                            "{}/nix was replaced since the rig was kept",
                            b.store.display()
                        ),
                    });
                    continue;
                }
                // The store is gone: nothing can use it any more.
                Err(_) => continue,
            }
            // The builder's namespace (pinned through its sshd or any other process that sees
            // the store as /nix) and namespaces of PrivateStore commands over the same store.
            let pins = procs::pin_store_namespaces(&b.name, recorded);
            if let (Some(pid), Some(ns)) = (b.sshd_pid, b.mount_ns) {
                let verified = procs::mount_ns(pid).ok() == Some(ns)
                    && procs::nix_dir_of(pid).ok() == Some(recorded);
                if !verified {
                    eprintln!(
                        "nixmux-rig: {}: recorded sshd pid {pid} no longer belongs to the \
                         builder (exited or reused); not signalling it",
                        b.name
                    );
                }
            }
            let pin_refs: Vec<&PinnedNs> = pins.iter().collect();
            if let Err(e) = procs::kill_namespaces(&b.name, &pin_refs, None, KILL_TIMEOUT) {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if let Ok(client) = procs::file_id(&state.client_store.join("nix")) {
            kill_store_users("client store", client)?;
        }
        fs::remove_dir_all(&canonical).ctx(|| format!("removing {}", canonical.display()))
    }
}

/// Kills every process in every namespace that uses the store as its /nix.
fn kill_store_users(what: &str, store_nix: FileId) -> Result<usize> {
    let pins = procs::pin_store_namespaces(what, store_nix);
    let refs: Vec<&PinnedNs> = pins.iter().collect();
    procs::kill_namespaces(what, &refs, None, KILL_TIMEOUT)
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let mut clean = true;
        for b in &self.builders {
            if let Err(e) = b.teardown() {
                eprintln!("nixmux-rig: tearing down {}: {e}", b.name);
                clean = false;
            }
        }
        if let Err(e) = kill_store_users("client store", self.client_store.nix_id()) {
            eprintln!("nixmux-rig: tearing down the client store: {e}");
            clean = false;
        }
        if !clean {
            eprintln!(
                "nixmux-rig: removing {} although some processes may still use it",
                self.dir.display()
            );
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("nixmux-rig: removing {}: {e}", self.dir.display());
        }
    }
}
