//! A private Nix store: a directory bind-mounted over `/nix` in a fresh mount namespace for
//! every command run "in" it.
//!
//! Nix 2.8 hard-codes `/nix/store` into store paths, so a second store on one machine cannot
//! live elsewhere (a chroot store would give different paths than a real builder). A private
//! mount namespace gives each builder, and the test's client side, its own `/nix` with the
//! real paths, while the host's `/nix` stays untouched. Nix initialises an empty directory as
//! a store on first use, running single-user as root with no daemon.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

use crate::error::{IoContext, Result, RigError};
use crate::procs::{FileId, file_id};
use crate::util::{describe, program, require_root, run_checked, tail};

/// The shell snippet run by `unshare` inside the new namespace: bind the store directory ($1)
/// over /nix, then replace itself with the real command, so that the command's pid is the one
/// the caller spawned (kill and wait work on it directly).
const ENTER_SCRIPT: &str = r#"mount --bind "$1" /nix || { echo "nixmux-rig: cannot bind-mount $1 over /nix" >&2; exit 125; }
shift
exec "$@""#;

/// Settings every private store gets. Without internet, an empty `substituters` avoids waiting
/// on cache.nixos.org for every build; `build-users-group =` lets root build without the
/// nixbld users; `sandbox = false` because Debian's Nix cannot sandbox here. `require-sigs`
/// keeps Nix's default (true) so that ssh-ng imports behave as on a real builder.
const BASE_CONF: &str = "\
substituters =
sandbox = false
experimental-features = nix-command
build-users-group =
";

/// Environment variables removed from commands run in a store, so that the caller's Nix
/// settings (a daemon socket, extra config, other XDG dirs) cannot leak in.
const SCRUBBED_ENV: [&str; 13] = [
    "NIX_REMOTE",
    "NIX_CONFIG",
    "NIX_USER_CONF_FILES",
    "NIX_STORE_DIR",
    "NIX_STORE",
    "NIX_STATE_DIR",
    "NIX_LOG_DIR",
    "NIX_PATH",
    "XDG_CONFIG_HOME",
    "XDG_CONFIG_DIRS",
    "XDG_CACHE_HOME",
    "XDG_DATA_HOME",
    "XDG_STATE_HOME",
];

/// A Nix store of its own: `<dir>/nix` is `/nix` for every command run through
/// [`PrivateStore::command`], with `NIX_CONF_DIR=<dir>/etc` and `HOME=<dir>/home`.
///
/// Layout:
/// * `<dir>/nix`: the store (`<dir>/nix/store/...`) and its database (`<dir>/nix/var/nix`);
/// * `<dir>/etc/nix.conf`: the store's Nix configuration;
/// * `<dir>/home`: a clean home directory (no shell rc files, no `~/.config/nix`).
#[derive(Debug)]
pub struct PrivateStore {
    root: PathBuf,
    nix_id: FileId,
    unshare: PathBuf,
    /// Set for [`PrivateStore::temp`]: the directory is removed when the store is dropped.
    _temp: Option<TempDir>,
}

impl PrivateStore {
    /// A store rooted at `dir` (created if needed). An existing store there is reused; its
    /// `nix.conf` is rewritten.
    ///
    /// # Errors
    /// Not root, `unshare`/`mount` missing, or the directories cannot be created.
    pub fn new(dir: impl AsRef<Path>) -> Result<Self> {
        Self::with_config(dir, &[] as &[&str])
    }

    /// Like [`PrivateStore::new`], appending `extra_conf` lines to `nix.conf` (later settings
    /// override earlier ones, e.g. `require-sigs = false`).
    ///
    /// # Errors
    /// As [`PrivateStore::new`].
    pub fn with_config(dir: impl AsRef<Path>, extra_conf: &[impl AsRef<str>]) -> Result<Self> {
        Self::create(dir.as_ref(), extra_conf, None)
    }

    /// A store in a fresh temporary directory, removed when the store is dropped.
    ///
    /// # Errors
    /// As [`PrivateStore::new`].
    pub fn temp() -> Result<Self> {
        Self::temp_with_config(&[] as &[&str])
    }

    /// [`PrivateStore::temp`] with extra `nix.conf` lines.
    ///
    /// # Errors
    /// As [`PrivateStore::new`].
    pub fn temp_with_config(extra_conf: &[impl AsRef<str>]) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("nixmux-store-")
            .tempdir()
            .ctx(|| "creating a temporary directory for a private store".to_owned())?;
        let dir = tmp.path().to_owned();
        Self::create(&dir, extra_conf, Some(tmp))
    }

    fn create(dir: &Path, extra_conf: &[impl AsRef<str>], temp: Option<TempDir>) -> Result<Self> {
        require_root("a private Nix store (unshare --mount)")?;
        let unshare = program("unshare")?;
        program("mount")?;
        ensure_nix_mount_point()?;
        for sub in ["nix", "etc", "home"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }
        let root = dir
            .canonicalize()
            .ctx(|| format!("resolving {}", dir.display()))?;
        let mut conf = BASE_CONF.to_owned();
        for line in extra_conf {
            conf.push_str(line.as_ref());
            conf.push('\n');
        }
        let conf_path = root.join("etc/nix.conf");
        std::fs::write(&conf_path, conf).ctx(|| format!("writing {}", conf_path.display()))?;
        let nix_id = file_id(&root.join("nix")).ctx(|| format!("stat {}/nix", root.display()))?;
        let store = Self {
            root,
            nix_id,
            unshare,
            _temp: temp,
        };
        // Create the database now. Nix 2.8 creates it on first use, and two Nix processes
        // starting at once on an empty store (say `nix-store --serve` and `nix-daemon --stdio`
        // from two sessions) race: one fails with "SQLite database ... is busy". A real
        // builder's store exists already, so tests must not see that race either.
        store.run("nix-store", ["--init"])?;
        Ok(store)
    }

    /// The store's root directory (`<dir>`).
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The host's view of this store's `/nix`: `<dir>/nix`.
    pub fn nix_dir(&self) -> PathBuf {
        self.root.join("nix")
    }

    /// The host's view of `/nix/store`: `<dir>/nix/store`. Handy to check from outside which
    /// paths exist, without entering the namespace.
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("nix/store")
    }

    /// `NIX_CONF_DIR` of this store: `<dir>/etc`.
    pub fn conf_dir(&self) -> PathBuf {
        self.root.join("etc")
    }

    /// The clean `HOME` of commands in this store: `<dir>/home`.
    pub fn home(&self) -> PathBuf {
        self.root.join("home")
    }

    /// The environment a command needs to use this store's configuration: `HOME` and
    /// `NIX_CONF_DIR` (the namespace provides /nix itself).
    pub fn env(&self) -> [(&'static str, PathBuf); 2] {
        [("HOME", self.home()), ("NIX_CONF_DIR", self.conf_dir())]
    }

    /// (device, inode) of `<dir>/nix`, to recognise processes that see this store as /nix.
    pub(crate) fn nix_id(&self) -> FileId {
        self.nix_id
    }

    /// A command that runs `program args...` with this store as `/nix`, in a fresh private
    /// mount namespace (`unshare --mount --propagation private`, then `mount --bind`, then
    /// `exec`), so the spawned pid is the program itself once it runs. The caller's
    /// environment is kept except for Nix/XDG variables that would point elsewhere; `HOME` and
    /// `NIX_CONF_DIR` are the store's. Convert to `tokio::process::Command` with `From` if
    /// needed.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.unshare);
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(ENTER_SCRIPT)
            .arg("nixmux-private-store")
            .arg(self.nix_dir())
            .arg(program)
            .args(args);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `program args...` in the store and waits, capturing output.
    ///
    /// # Errors
    /// [`RigError::CommandFailed`] (with stdout and stderr) if it exits unsuccessfully; use
    /// [`PrivateStore::command`] to inspect failures yourself.
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program, args);
        cmd.stdin(Stdio::null());
        run_checked(&mut cmd)
    }

    /// Like [`PrivateStore::run`], feeding `input` on stdin (e.g. `nix-store --import`).
    ///
    /// # Errors
    /// As [`PrivateStore::run`].
    pub fn run_with_stdin<I, S>(
        &self,
        program: impl AsRef<OsStr>,
        args: I,
        input: &[u8],
    ) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program, args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = describe(&cmd);
        let mut child = cmd.spawn().ctx(|| format!("spawning `{what}`"))?;
        let stdin = child.stdin.take();
        // Feed stdin from a thread so a command that writes a lot before reading cannot
        // deadlock against us.
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || {
            if let Some(mut stdin) = stdin {
                // A command that exits early closes its stdin: not our error to report.
                let _ = stdin.write_all(&input);
            }
        });
        let output = child
            .wait_with_output()
            .ctx(|| format!("waiting for `{what}`"))?;
        let _ = feeder.join();
        if output.status.success() {
            Ok(output)
        } else {
            Err(RigError::CommandFailed {
                command: what,
                status: output.status,
                stdout: tail(&String::from_utf8_lossy(&output.stdout), 40),
                stderr: tail(&String::from_utf8_lossy(&output.stderr), 40),
            })
        }
    }

    /// Adds a file or directory to the store (`nix-store --add`), returning the store path.
    ///
    /// # Errors
    /// As [`PrivateStore::run`].
    pub fn add(&self, path: impl AsRef<Path>) -> Result<String> {
        let out = self.run(
            "nix-store",
            [OsStr::new("--add"), path.as_ref().as_os_str()],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Whether `store_path` is valid (registered) in this store.
    ///
    /// # Errors
    /// As [`PrivateStore::run`] (e.g. a path outside /nix/store).
    pub fn is_valid(&self, store_path: &str) -> Result<bool> {
        let out = self.run(
            "nix-store",
            ["--check-validity", "--print-invalid", store_path],
        )?;
        Ok(out.stdout.iter().all(u8::is_ascii_whitespace))
    }
}

/// `mount --bind` needs an existing mount point. Debian's nix-bin setup creates /nix, but a
/// machine where Nix was never used may lack it; an empty directory is the only host change.
fn ensure_nix_mount_point() -> Result<()> {
    match std::fs::create_dir("/nix") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(RigError::io("creating the /nix mount point", e)),
    }
}
