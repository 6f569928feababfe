//! The environment of a run: the builders (embedded rig or given on the command line), the
//! client's private store, the WAN relays, and the ssh_config / machines files the OpenSSH
//! and Nix baselines use. Everything lives under temporary directories removed at the end.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use nixmux::local::{LocalStore, LocalStoreAccess};
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::transport::{Endpoint, HostKeyCheck, HostPublicKey, Identity, TransportConfig};
use nixmux::{BuilderConfig, ConnectTarget, Protocol};
use nixmux_rig::{PrivateStore, Rig, RigConfig};

use crate::relay::{Link, Relay};
use crate::report::WanSettings;

/// What to measure against.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Start `builders` local rig builders (the default) and remove them afterwards.
    Embedded {
        /// How many.
        builders: usize,
        /// Their sshd's `MaxSessions` (`None`: sshd's default, 10).
        max_sessions: Option<u32>,
    },
    /// Builders given on the command line (store URLs or a machines file).
    External(Vec<BuilderConfig>),
}

/// The builders and the client side of a run.
pub struct Env {
    rig: Option<Arc<Rig>>,
    external: Vec<BuilderConfig>,
    relays: Vec<Relay>,
    wan: Option<WanSettings>,
    tmp: tempfile::TempDir,
    ssh_config: PathBuf,
    local: Option<Arc<LocalStore>>,
    fixtures: Mutex<Fixtures>,
    seq: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Fixtures {
    small: Option<Vec<StorePath>>,
    large: Vec<(u64, StorePath)>,
    outputs: Vec<(u64, StorePath)>,
    real: Option<(Vec<StorePath>, u64)>,
}

/// The local store the bench uses on the rig's client store: sessions are `nix-daemon --stdio`
/// in the store's mount namespace, and the store's files are read directly.
fn client_local_store(rig: &Arc<Rig>) -> LocalStore {
    let r = rig.clone();
    let files = r.client_store().store_dir();
    LocalStore::new(LocalStoreAccess::Command(Arc::new(move || {
        tokio::process::Command::from(r.client_store().command("nix-daemon", ["--stdio"]))
    })))
    // The daemon runs in the store's mount namespace; its files are here.
    .with_store_files(Some(files))
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("embedded", &self.rig.is_some())
            .field("wan", &self.wan)
            .finish_non_exhaustive()
    }
}

/// A store path from its absolute form.
pub fn store_path(s: &str) -> anyhow::Result<StorePath> {
    StorePath::parse(&StoreDir::default(), s.trim()).map_err(|e| anyhow!("{s:?}: {e}"))
}

impl Env {
    /// Starts the rig (embedded) or takes the given builders, and the WAN relays if asked.
    ///
    /// # Errors
    /// The rig does not start (not root, Nix or sshd missing and not installable), a relay
    /// cannot listen, or `--wan` with external builders.
    pub async fn start(targets: Targets, wan: Option<WanSettings>) -> anyhow::Result<Env> {
        let tmp = tempfile::Builder::new()
            .prefix("nixmux-bench-")
            .tempdir()
            .context("creating the bench's temporary directory")?;
        let (rig, external) = match targets {
            Targets::Embedded {
                builders,
                max_sessions,
            } => {
                let rig = tokio::task::spawn_blocking(move || {
                    nixmux_rig::ensure_peers_installed()?;
                    let defaults = RigConfig::default();
                    Rig::start(RigConfig {
                        max_sessions: max_sessions.unwrap_or(defaults.max_sessions),
                        // As in the baselines of docs (nix-build with max-jobs 8).
                        max_jobs: 8,
                        // The session-counting helpers need DEBUG1; the bench does not, and
                        // sshd should spend as little as possible on logging.
                        log_level: "INFO".into(),
                        // A multi-user builder: ssh-ng sessions reach its daemon's socket.
                        nix_daemon: true,
                        ..RigConfig::with_builders(builders.max(1))
                    })
                })
                .await
                .context("starting the rig")?
                .context("starting local rig builders")?;
                (Some(Arc::new(rig)), Vec::new())
            }
            Targets::External(b) => {
                if b.is_empty() {
                    bail!("no builders given");
                }
                if wan.is_some() {
                    bail!(
                        "--wan emulates a link between this machine and local rig builders; it cannot be combined with external builders"
                    );
                }
                (None, b)
            }
        };
        let mut relays = Vec::new();
        if let (Some(w), Some(r)) = (&wan, &rig) {
            let link = Link::new(w.rtt_ms, w.mbit.unwrap_or(0.0));
            for b in r.builders() {
                relays.push(
                    Relay::start(b.addr(), link)
                        .await
                        .context("starting a WAN relay")?,
                );
            }
        }
        let local = rig.as_ref().map(|r| Arc::new(client_local_store(r)));
        let ssh_config = tmp.path().join("ssh_config");
        let env = Env {
            rig,
            external,
            relays,
            wan,
            tmp,
            ssh_config,
            local,
            fixtures: Mutex::new(Fixtures::default()),
            seq: std::sync::atomic::AtomicU64::new(0),
        };
        if env.rig.is_some() {
            env.write_ssh_config()?;
        }
        Ok(env)
    }

    /// The embedded rig, if the builders are its.
    pub fn rig(&self) -> Option<&Rig> {
        self.rig.as_deref()
    }

    /// Whether the builders are the embedded rig's.
    pub fn embedded(&self) -> bool {
        self.rig.is_some()
    }

    /// The emulated link, if any.
    pub fn wan(&self) -> Option<WanSettings> {
        self.wan
    }

    /// Number of builders.
    pub fn builder_count(&self) -> usize {
        match &self.rig {
            Some(r) => r.builders().len(),
            None => self.external.len(),
        }
    }

    /// Names of the builders, for the report.
    pub fn builder_names(&self) -> Vec<String> {
        match &self.rig {
            Some(r) => r.builders().iter().map(|b| b.name().to_owned()).collect(),
            None => self.external.iter().map(|b| b.name.clone()).collect(),
        }
    }

    /// A directory for this run's scratch files.
    pub fn scratch(&self) -> &Path {
        self.tmp.path()
    }

    /// A number unique in this run (salts, file names).
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The `nixmux` program (for `nixmux agent` and the `nixmux connect` Nix runs):
    /// `$NIXMUX_BIN`, else this program if it is `nixmux`, else a `nixmux` next to it or one
    /// directory up (a test binary in `target/*/deps`).
    pub fn nixmux_program(&self) -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("NIXMUX_BIN") {
            return Some(PathBuf::from(p));
        }
        let me = std::env::current_exe().ok()?;
        if me.file_name().is_some_and(|n| n == "nixmux") {
            return Some(me);
        }
        let dir = me.parent()?;
        [dir.join("nixmux"), dir.parent()?.join("nixmux")]
            .into_iter()
            .find(|p| p.is_file())
    }

    /// A machines file nixmux (and its agent) can use for the first `n` rig builders: one
    /// `scheme://root@127.0.0.1:PORT` line each (the relay's port under `--wan`), with the
    /// client key, max-jobs 8 and the pinned host key.
    ///
    /// # Errors
    /// No embedded rig, or the file cannot be written.
    pub fn nixmux_machines_file(&self, protocol: Protocol, n: usize) -> anyhow::Result<PathBuf> {
        let rig = self
            .rig
            .as_ref()
            .ok_or_else(|| anyhow!("needs the embedded rig"))?;
        let mut text = String::new();
        for (i, b) in rig.builders().iter().enumerate().take(n) {
            text.push_str(&format!(
                "{}://root@127.0.0.1:{} {} {} 8 1 - - {}\n",
                protocol.scheme(),
                self.port(i)?,
                nixmux::config::local_system(),
                rig.client_key().display(),
                b.host_key_base64()
            ));
        }
        let path = self
            .tmp
            .path()
            .join(format!("nixmux-machines-{}-{n}", protocol.scheme()));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The client's local store (embedded rig only: the rig's private client store).
    pub fn local(&self) -> Option<Arc<LocalStore>> {
        self.local.clone()
    }

    /// A local store of its own on the client's private store (embedded rig only), whose
    /// daemon sessions end when it is dropped: what a side uses when the temporary roots its
    /// sessions hold must not outlive a sample (a fetched path deleted before the next).
    pub fn fresh_local(&self) -> Option<LocalStore> {
        self.rig.as_ref().map(client_local_store)
    }

    /// The client's private store (embedded rig only).
    pub fn client_store(&self) -> Option<&PrivateStore> {
        self.rig.as_deref().map(Rig::client_store)
    }

    fn port(&self, i: usize) -> anyhow::Result<u16> {
        let rig = self.rig.as_ref().ok_or_else(|| anyhow!("no rig"))?;
        let b = rig
            .builders()
            .get(i)
            .ok_or_else(|| anyhow!("no builder {i}"))?;
        Ok(match self.relays.get(i) {
            Some(r) => r.port(),
            None => b.port(),
        })
    }

    fn write_ssh_config(&self) -> anyhow::Result<()> {
        let Some(rig) = &self.rig else {
            return Ok(());
        };
        let mut text = String::from(
            "# nixmux bench: OpenSSH client config for the rig builders (through the WAN relay\n# when --wan is given). HostKeyAlias keeps host-key checks on the real keys.\n",
        );
        for (i, b) in rig.builders().iter().enumerate() {
            text.push_str(&format!(
                "\nHost {name}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  \
                 IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {kh}\n  \
                 GlobalKnownHostsFile /dev/null\n  HostKeyAlias {name}\n  \
                 StrictHostKeyChecking yes\n  UpdateHostKeys no\n  BatchMode yes\n",
                name = b.name(),
                port = self.port(i)?,
                key = rig.client_key().display(),
                kh = rig.known_hosts().display(),
            ));
        }
        std::fs::write(&self.ssh_config, text)
            .with_context(|| format!("writing {}", self.ssh_config.display()))
    }

    /// The ssh_config file for OpenSSH baselines (embedded rig).
    pub fn ssh_config(&self) -> &Path {
        &self.ssh_config
    }

    /// nixmux's configuration for builder `i` speaking `protocol` (through the relay in WAN
    /// mode).
    ///
    /// # Errors
    /// No such builder.
    pub fn nixmux_config(&self, i: usize, protocol: Protocol) -> anyhow::Result<BuilderConfig> {
        match &self.rig {
            Some(rig) => {
                let b = rig
                    .builders()
                    .get(i)
                    .ok_or_else(|| anyhow!("no builder {i}"))?;
                let host_keys = if self.relays.is_empty() {
                    HostKeyCheck::strict([rig.known_hosts()])
                } else {
                    // The relay's port has no known_hosts line; the key is the builder's.
                    HostKeyCheck::pinned([HostPublicKey::from_openssh(b.host_key())
                        .map_err(|e| anyhow!("host key of {}: {e}", b.name()))?])
                };
                let target = ConnectTarget {
                    endpoint: Endpoint::new("127.0.0.1", self.port(i)?, "root"),
                    identities: vec![Identity::key_file(rig.client_key())],
                    host_keys,
                    transport: TransportConfig::default(),
                    jump: None,
                    hooks: Default::default(),
                };
                let mut c = BuilderConfig::new(
                    format!("{}://{}", protocol.scheme(), b.name()),
                    protocol,
                    target,
                );
                c.machine.max_jobs = 8;
                Ok(c)
            }
            None => {
                let mut c = self
                    .external
                    .get(i)
                    .cloned()
                    .ok_or_else(|| anyhow!("no builder {i}"))?;
                if c.protocol != protocol {
                    let standard = BuilderConfig::new("", c.protocol, c.target.clone());
                    if c.remote_command != standard.remote_command {
                        bail!(
                            "{} uses a custom remote command; only {} is measured on it",
                            c.name,
                            c.protocol.scheme()
                        );
                    }
                    c = BuilderConfig {
                        name: format!("{} ({})", c.name, protocol.scheme()),
                        ..BuilderConfig::new(c.name.clone(), protocol, c.target.clone())
                    };
                }
                Ok(c)
            }
        }
    }

    /// The `ssh` arguments that reach builder `i` (before the remote command).
    ///
    /// # Errors
    /// No such builder, or a builder reached through a jump host (not replicated for
    /// OpenSSH baselines).
    pub fn ssh_args(&self, i: usize) -> anyhow::Result<Vec<OsString>> {
        match &self.rig {
            Some(rig) => {
                let b = rig
                    .builders()
                    .get(i)
                    .ok_or_else(|| anyhow!("no builder {i}"))?;
                Ok(vec![
                    "-F".into(),
                    self.ssh_config.clone().into(),
                    b.name().into(),
                ])
            }
            None => {
                let mut v = self.external_ssh_options(i)?;
                let c = self
                    .external
                    .get(i)
                    .ok_or_else(|| anyhow!("no builder {i}"))?;
                v.push(c.target.endpoint.host.clone().into());
                Ok(v)
            }
        }
    }

    /// OpenSSH options (no host) that reach external builder `i` the way nixmux does: its
    /// port, user and key files, and a known_hosts file written for it (its pinned key and
    /// the known_hosts files nixmux checks), with strict checking.
    fn external_ssh_options(&self, i: usize) -> anyhow::Result<Vec<OsString>> {
        let c = self
            .external
            .get(i)
            .ok_or_else(|| anyhow!("no builder {i}"))?;
        let t = &c.target;
        if t.jump.is_some() {
            bail!("reached through ProxyJump: no OpenSSH baseline");
        }
        let kh = self.tmp.path().join(format!("known_hosts-{i}"));
        if !kh.exists() {
            let mut text = String::new();
            let name = nixmux::transport::host_key::lookup_name(&t.endpoint.host, t.endpoint.port);
            for key in &t.host_keys.pinned {
                text.push_str(&format!("{name} {}\n", key.to_openssh()));
            }
            for f in &t.host_keys.known_hosts_files {
                if let Ok(more) = std::fs::read_to_string(f) {
                    text.push_str(&more);
                    if !more.ends_with('\n') {
                        text.push('\n');
                    }
                }
            }
            std::fs::write(&kh, text).with_context(|| format!("writing {}", kh.display()))?;
        }
        let mut v: Vec<OsString> = vec![
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", kh.display()).into(),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-p".into(),
            t.endpoint.port.to_string().into(),
            "-l".into(),
            t.endpoint.user.clone().into(),
        ];
        let keys: Vec<&Path> = t
            .identities
            .iter()
            .filter_map(|id| match id {
                Identity::KeyFile { path, .. } => Some(path.as_path()),
                Identity::Agent { .. } => None,
            })
            .collect();
        if !keys.is_empty() && keys.len() == t.identities.len() {
            v.push("-o".into());
            v.push("IdentitiesOnly=yes".into());
        }
        for k in keys {
            v.push("-i".into());
            v.push(k.into());
        }
        Ok(v)
    }

    /// Nix's store URL for builder `i` (`ssh-ng://root@builder0`), to be used with
    /// [`Env::nix_command`].
    ///
    /// # Errors
    /// Why Nix itself cannot reach it (a jump host).
    pub fn nix_url(&self, i: usize, protocol: Protocol) -> anyhow::Result<String> {
        match &self.rig {
            Some(rig) => {
                let b = rig
                    .builders()
                    .get(i)
                    .ok_or_else(|| anyhow!("no builder {i}"))?;
                Ok(format!("{}://root@{}", protocol.scheme(), b.name()))
            }
            None => {
                let c = self
                    .external
                    .get(i)
                    .ok_or_else(|| anyhow!("no builder {i}"))?;
                let e = &c.target.endpoint;
                // Port, keys and known_hosts go in NIX_SSHOPTS ([`Env::nix_command_for`]):
                // Nix 2.8 store URLs carry no port.
                self.external_ssh_options(i)?;
                Ok(format!("{}://{}@{}", protocol.scheme(), e.user, e.host))
            }
        }
    }

    /// A Nix command as a client: in the rig's private client store with
    /// `NIX_SSHOPTS="-F <ssh_config>"` (embedded), or the host's Nix (external).
    ///
    /// # Errors
    /// Never for now; kept fallible for callers.
    pub fn nix_command<I, S>(
        &self,
        program: &str,
        args: I,
    ) -> anyhow::Result<tokio::process::Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.nix_command_for(None, program, args)
    }

    /// [`Env::nix_command`] for reaching builder `builder`: with external builders,
    /// `NIX_SSHOPTS` carries its port, user, keys and known_hosts.
    ///
    /// # Errors
    /// The builder's OpenSSH options cannot be made.
    pub fn nix_command_for<I, S>(
        &self,
        builder: Option<usize>,
        program: &str,
        args: I,
    ) -> anyhow::Result<tokio::process::Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = match &self.rig {
            Some(rig) => {
                let mut c = rig.client_store().command(program, args);
                c.env("NIX_SSHOPTS", format!("-F {}", self.ssh_config.display()));
                tokio::process::Command::from(c)
            }
            None => {
                let mut c = tokio::process::Command::new(program);
                if program == "nix" {
                    // Nix 2.8 to 2.x: `nix store ping` and `nix copy` are experimental.
                    c.args(["--extra-experimental-features", "nix-command"]);
                }
                c.args(args);
                if let Some(i) = builder {
                    let opts: Vec<String> = self
                        .external_ssh_options(i)?
                        .iter()
                        .map(|o| o.to_string_lossy().into_owned())
                        .collect();
                    c.env("NIX_SSHOPTS", opts.join(" "));
                }
                c
            }
        };
        cmd.kill_on_drop(true);
        Ok(cmd)
    }

    /// A machines file for Nix naming builders `0..n` with `protocol` (embedded rig).
    ///
    /// # Errors
    /// Not embedded, or the file cannot be written.
    pub fn machines_file(&self, protocol: Protocol, n: usize) -> anyhow::Result<PathBuf> {
        let rig = self
            .rig
            .as_ref()
            .ok_or_else(|| anyhow!("needs the embedded rig"))?;
        let all = std::fs::read_to_string(rig.machines_ssh_config())
            .context("reading the rig's machines-ssh-config")?;
        let names: Vec<String> = rig
            .builders()
            .iter()
            .take(n)
            .map(|b| format!("{}://root@{} ", protocol.scheme(), b.name()))
            .collect();
        let lines: Vec<&str> = all
            .lines()
            .filter(|l| names.iter().any(|n| l.starts_with(n.as_str())))
            .collect();
        if lines.len() != n.min(rig.builders().len()) {
            bail!("the rig's machines-ssh-config lacks lines for {names:?}");
        }
        let path = self
            .tmp
            .path()
            .join(format!("machines-{}-{n}", protocol.scheme()));
        std::fs::write(&path, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Empties builder `i`'s store: stops its sshd (and every session), removes everything
    /// under its `/nix`, initialises the store again and restarts sshd on the same port.
    ///
    /// # Errors
    /// Not embedded, or a step fails.
    pub async fn reset_store(&self, i: usize) -> anyhow::Result<()> {
        let rig = self
            .rig
            .clone()
            .ok_or_else(|| anyhow!("resetting a store needs the embedded rig"))?;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let b = rig
                .builders()
                .get(i)
                .ok_or_else(|| anyhow!("no builder {i}"))?;
            b.stop_sshd().context("stopping sshd")?;
            let nix = b.store().nix_dir();
            for entry in std::fs::read_dir(&nix).with_context(|| format!("{}", nix.display()))? {
                let p = entry?.path();
                if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                }
                .with_context(|| format!("removing {}", p.display()))?;
            }
            b.store()
                .run("nix-store", ["--init"])
                .context("initialising the empty store")?;
            b.start_sshd().context("restarting sshd")?;
            Ok(())
        })
        .await
        .context("store reset task")?
    }

    /// 200 small paths (~8.5 KB of random bytes each, ~1.7 MB together) in the client store,
    /// made once per run.
    ///
    /// # Errors
    /// Not embedded, or `nix-store --add` fails.
    pub async fn small_paths(&self) -> anyhow::Result<Vec<StorePath>> {
        if let Ok(f) = self.fixtures.lock()
            && let Some(s) = &f.small
        {
            return Ok(s.clone());
        }
        let dir = self.tmp.path().join("small");
        std::fs::create_dir_all(&dir)?;
        let mut files = Vec::new();
        let mut rng = Rng::seeded();
        for k in 0..200 {
            let p = dir.join(format!("small-{k:03}"));
            // 1.7 MB / 200 = 8.5 KB, varied a little as real paths are.
            let len = 7_500 + usize::try_from(rng.next_u64() % 2_000).unwrap_or(0);
            std::fs::write(&p, rng.bytes(len))?;
            files.push(p);
        }
        let paths = self.add_to_client(files).await?;
        if let Ok(mut f) = self.fixtures.lock() {
            f.small = Some(paths.clone());
        }
        Ok(paths)
    }

    /// Real binaries in the client store, made once: each shared library `ldd nix-store`
    /// lists, and GCC's internal directory (`/usr/lib/gcc`) as one path. Returns the paths
    /// and their NAR bytes.
    ///
    /// # Errors
    /// Not embedded, `ldd` or `nix-store --add` fails.
    pub async fn real_closure(&self) -> anyhow::Result<(Vec<StorePath>, u64)> {
        if let Ok(f) = self.fixtures.lock()
            && let Some(r) = &f.real
        {
            return Ok(r.clone());
        }
        let nix_store = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join("nix-store"))
            .find(|p| p.is_file())
            .ok_or_else(|| anyhow!("nix-store is not on PATH"))?;
        let ldd = tokio::process::Command::new("ldd")
            .arg(&nix_store)
            .output()
            .await
            .context("running ldd")?;
        let mut inputs: Vec<PathBuf> = String::from_utf8_lossy(&ldd.stdout)
            .lines()
            .filter_map(|l| {
                l.split("=>")
                    .nth(1)?
                    .split_whitespace()
                    .next()
                    .map(PathBuf::from)
            })
            .filter(|p| p.is_absolute())
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
            .collect();
        inputs.sort();
        inputs.dedup();
        if Path::new("/usr/lib/gcc").is_dir() {
            inputs.push(PathBuf::from("/usr/lib/gcc"));
        }
        let paths = self.add_to_client(inputs).await?;
        let local = self.local().ok_or_else(|| anyhow!("no local store"))?;
        let set: BTreeSet<StorePath> = paths.iter().cloned().collect();
        let bytes = local.closure(&set).await?.iter().map(|i| i.nar_size).sum();
        if let Ok(mut f) = self.fixtures.lock() {
            f.real = Some((paths.clone(), bytes));
        }
        Ok((paths, bytes))
    }

    /// One path of `size` random bytes in the client store, made once per size.
    ///
    /// # Errors
    /// Not embedded, or `nix-store --add` fails.
    pub async fn large_path(&self, size: u64) -> anyhow::Result<StorePath> {
        if let Ok(f) = self.fixtures.lock()
            && let Some((_, p)) = f.large.iter().find(|(s, _)| *s == size)
        {
            return Ok(p.clone());
        }
        let p = self.tmp.path().join(format!("large-{size}"));
        let path = p.clone();
        tokio::task::spawn_blocking(move || write_random_file(&path, size, &mut Rng::seeded()))
            .await??;
        let paths = self.add_to_client(vec![p.clone()]).await?;
        // The file is in the store now; the scratch copy is not needed.
        let _ = std::fs::remove_file(&p);
        let sp = paths
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("nix-store --add printed no path"))?;
        if let Ok(mut f) = self.fixtures.lock() {
            f.large.push((size, sp.clone()));
        }
        Ok(sp)
    }

    /// A path of `size` random bytes that a build made in the client store: input-addressed,
    /// as the outputs a build farm pushes mostly are (unlike [`Env::large_path`]'s
    /// `nix-store --add`, content-addressed: Nix 2.8 re-reads and re-hashes those after
    /// importing them, `LocalStore::addToStore`).
    ///
    /// # Errors
    /// Not embedded, or the build fails.
    pub async fn large_output(&self, size: u64) -> anyhow::Result<StorePath> {
        if let Ok(f) = self.fixtures.lock()
            && let Some((_, p)) = f.outputs.iter().find(|(s, _)| *s == size)
        {
            return Ok(p.clone());
        }
        let salt = format!("{}-{}", std::process::id(), self.next_seq());
        let sp = self
            .build_random_output(&format!("large-output-{salt}"), size)
            .await?;
        if let Ok(mut f) = self.fixtures.lock() {
            f.outputs.push((size, sp.clone()));
        }
        Ok(sp)
    }

    /// Paths for fetch workloads, on builder `i` and not in the client store: a source of
    /// `size` random bytes (`nix-store --add`, content-addressed) and a build output of `size`
    /// random bytes (input-addressed), made in the client store, pushed to the builder, then
    /// deleted here. Named apart from the push fixtures, which stay in the client store.
    ///
    /// # Errors
    /// Not embedded, or a step fails.
    pub async fn fetch_paths(&self, i: usize, size: u64) -> anyhow::Result<Vec<StorePath>> {
        let salt = format!("{}-{}", std::process::id(), self.next_seq());
        let file = self.tmp.path().join(format!("fetch-source-{salt}"));
        let path = file.clone();
        tokio::task::spawn_blocking(move || write_random_file(&path, size, &mut Rng::seeded()))
            .await??;
        let mut paths = self.add_to_client(vec![file.clone()]).await?;
        let _ = std::fs::remove_file(&file);
        paths.push(
            self.build_random_output(&format!("fetch-output-{salt}"), size)
                .await?,
        );
        let local = self.local().ok_or_else(|| anyhow!("no local store"))?;
        let set: BTreeSet<StorePath> = paths.iter().cloned().collect();
        let pool = nixmux::Pool::new();
        let b = pool.add(self.nixmux_config(i, Protocol::Worker)?);
        let pushed = b.push_closure(&local, &set, false, None).await;
        pool.shutdown().await;
        pushed.context("pushing the fetch paths to the builder")?;
        self.delete_from_client(&set).await?;
        Ok(paths)
    }

    /// Deletes those of `paths` that are valid in the client store (nothing may refer to
    /// them).
    ///
    /// # Errors
    /// Not embedded, or `nix-store --delete` fails.
    pub async fn delete_from_client(&self, paths: &BTreeSet<StorePath>) -> anyhow::Result<()> {
        let local = self.local().ok_or_else(|| anyhow!("no local store"))?;
        let valid = local.query_valid_paths(paths).await?;
        if valid.is_empty() {
            return Ok(());
        }
        let dir = StoreDir::default();
        // A session that fetched a path held a temporary root on it until its daemon process
        // ended, which may be a moment after the session was dropped.
        let mut tries = 0;
        loop {
            let mut cmd = self.nix_command(
                "nix-store",
                std::iter::once(OsString::from("--delete"))
                    .chain(valid.iter().map(|p| OsString::from(p.to_absolute(&dir)))),
            )?;
            match run_output(&mut cmd, Duration::from_secs(120)).await {
                Ok(_) => return Ok(()),
                Err(e) if tries >= 10 => return Err(e.context("deleting fetched paths")),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// `count` distinct paths of `size` random bytes each in the client store (a closure of
    /// many large paths, for transfers that can be split over several channels).
    pub async fn many_paths(&self, count: usize, size: u64) -> anyhow::Result<Vec<StorePath>> {
        let dir = self.tmp.path().join(format!("many-{count}-{size}"));
        let d = dir.clone();
        let files = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<PathBuf>> {
            std::fs::create_dir_all(&d)?;
            let mut rng = Rng::seeded();
            let mut files = Vec::with_capacity(count);
            for i in 0..count {
                let path = d.join(format!("part-{i}"));
                write_random_file(&path, size, &mut rng)?;
                files.push(path);
            }
            Ok(files)
        })
        .await??;
        let paths = self.add_to_client(files).await;
        // In the store now (or failed): the scratch copies are not needed.
        let _ = std::fs::remove_dir_all(&dir);
        paths
    }

    /// Builds, in the client store, the derivation `name` whose output is `size` random
    /// bytes (input-addressed), and returns that output.
    async fn build_random_output(&self, name: &str, size: u64) -> anyhow::Result<StorePath> {
        let file = self.tmp.path().join(format!("{name}.nix"));
        std::fs::write(
            &file,
            format!(
                r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "/usr/bin/head -c {size} /dev/urandom > $out"]; }}"#
            ),
        )?;
        let mut cmd = self.nix_command(
            "nix-build",
            [OsString::from("--no-out-link"), OsString::from(&file)],
        )?;
        let out = run_output(&mut cmd, Duration::from_secs(300)).await?;
        String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(store_path)
            .next_back()
            .ok_or_else(|| anyhow!("nix-build printed no path"))?
    }

    async fn add_to_client(&self, files: Vec<PathBuf>) -> anyhow::Result<Vec<StorePath>> {
        let mut cmd = self.nix_command(
            "nix-store",
            std::iter::once(OsString::from("--add")).chain(files.into_iter().map(OsString::from)),
        )?;
        let out = run_output(&mut cmd, Duration::from_secs(300)).await?;
        String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(store_path)
            .collect()
    }

    /// Instantiates `n` trivial derivations, unique to this call, in the client store.
    ///
    /// # Errors
    /// Not embedded, or `nix-instantiate` fails.
    pub async fn trivial_derivations(&self, n: usize) -> anyhow::Result<Vec<StorePath>> {
        let salt = format!(
            "{}-{}-{}",
            std::process::id(),
            self.next_seq(),
            Rng::seeded().next_u64()
        );
        let file = self.tmp.path().join(format!("trivial-{salt}.nix"));
        std::fs::write(
            &file,
            format!(
                r#"builtins.genList (i: derivation {{
  name = "trivial-${{toString i}}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo {salt} ${{toString i}} > $out" ];
}}) {n}
"#
            ),
        )?;
        let mut cmd = self.nix_command("nix-instantiate", [file.as_os_str()])?;
        let out = run_output(&mut cmd, Duration::from_secs(120)).await?;
        let _ = std::fs::remove_file(&file);
        let drvs: Vec<StorePath> = String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(store_path)
            .collect::<anyhow::Result<_>>()?;
        if drvs.len() != n {
            bail!("nix-instantiate gave {} derivations, not {n}", drvs.len());
        }
        Ok(drvs)
    }

    /// The outputs of a derivation of the client store (`out` only: trivial derivations).
    ///
    /// # Errors
    /// Not embedded, or the `.drv` cannot be read.
    pub async fn drv_outputs(&self, drv: &StorePath) -> anyhow::Result<BTreeSet<StorePath>> {
        let local = self
            .local()
            .ok_or_else(|| anyhow!("needs the embedded rig"))?;
        let d = local
            .read_derivation(drv)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        Ok(d.outputs.values().filter_map(|o| o.path.clone()).collect())
    }

    /// Stops everything (relays, the rig) and removes the temporary files.
    pub async fn shutdown(self) {
        // The local store's sessions hold the rig (its command closure) and child processes.
        drop(self.local);
        drop(self.relays);
        if let Some(rig) = self.rig {
            // Dropping the rig kills its processes and removes its directory; it blocks. Every
            // other holder (sides, the local store) is gone by now.
            if Arc::strong_count(&rig) > 1 {
                tracing::warn!(
                    "the rig is still referenced; it is torn down when the last user ends"
                );
            }
            let _ = tokio::task::spawn_blocking(move || drop(rig)).await;
        }
    }
}

/// Writes `size` bytes of `rng`'s output to a new file at `path` (blocking).
fn write_random_file(path: &Path, size: u64, rng: &mut Rng) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = size;
    while left > 0 {
        let n = left.min(1 << 20);
        f.write_all(&rng.bytes(usize::try_from(n).unwrap_or(1 << 20)))?;
        left -= n;
    }
    f.flush()
}

/// Runs a command to completion with a timeout (killed on expiry), returning stdout.
///
/// # Errors
/// Spawn failure, timeout, or a non-zero exit (with the stderr tail).
pub async fn run_output(
    cmd: &mut tokio::process::Command,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let what = format!("{:?}", cmd.as_std().get_program());
    let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.with_context(|| format!("waiting for {what}"))?,
        Err(_) => bail!("{what} did not finish within {timeout:?} (killed)"),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{what} failed ({}): {}", out.status, tail.join(" | "));
    }
    Ok(out.stdout)
}

/// A small xorshift generator: random bytes for fixtures without another dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock and the pid.
    pub fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() ^ u64::from(d.subsec_nanos()) << 20)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Rng((t ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}
