//! Dropbear as a builder's SSH server (`SshServer::Dropbear`).
//!
//! Dropbear has no configuration file: everything is a flag (see `dropbear -h`). What the rig
//! relies on, checked against Dropbear 2022.83 (Debian 12's dropbear-bin):
//! * `-F -E`: foreground, log to stderr (the rig sends it to the builder's log file);
//! * `-s`: no password logins; `-e`: sessions inherit the server's environment, which carries
//!   the store's `NIX_CONF_DIR` (Dropbear then sets `HOME` from the passwd entry, so root's
//!   home directory is the store's clean one, bind-mounted over `/root` in the namespace);
//! * keys come from `~/.ssh/authorized_keys` of the account (no `AuthorizedKeysFile`), which
//!   is why `/root` is replaced in the namespace;
//! * `-r`: the host key in Dropbear's own format, converted from the builder's OpenSSH key
//!   with `dropbearconvert`, so known_hosts and the machines file pin the same key;
//! * `-c`: a forced command, run like OpenSSH's `ForceCommand` through the user's shell with
//!   `SSH_ORIGINAL_COMMAND` set;
//! * `-P`: its pid file (default `/var/run/dropbear.pid`, shared by every Dropbear).
//!
//! Dropbear logs no "listening" line, so readiness is proven by the listening socket being
//! one of its file descriptors.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::builder::Live;
use crate::error::{IoContext, Result, RigError};
use crate::peers::quoted;
use crate::sshd::{self, Ready, ServerCommand};
use crate::store::PrivateStore;
use crate::util::{self, find_program, os};

/// The server binary (Debian's dropbear-bin).
pub(crate) const DROPBEAR: &str = "/usr/sbin/dropbear";

/// Substrings of Dropbear 2022.83 log lines (`svr-auth.c`, `svr-authpubkey.c`,
/// `common-session.c`), the counterparts of [`log_patterns`](crate::log_patterns).
pub mod dropbear_log_patterns {
    /// A TCP connection reached Dropbear, including the rig's readiness probe.
    pub const CONNECTION: &str = "Child connection from 127.0.0.1:";
    /// A client authenticated with its key: one per real SSH connection.
    pub const ACCEPTED: &str = "Pubkey auth succeeded for ";
    /// A connection ended (after authentication: `Exit (root) from <...>`).
    pub const EXIT: &str = "Exit (";
}

fn host_key_path(builder_dir: &Path) -> std::path::PathBuf {
    builder_dir.join("dropbear_ed25519_host_key")
}

/// Converts the builder's host key, installs the client key for root (and the untrusted user,
/// if any) and adds the namespace mounts Dropbear needs.
pub(crate) fn prepare(
    builder_dir: &Path,
    store: &PrivateStore,
    openssh_host_key: &Path,
    authorized_keys: &Path,
    untrusted_user: Option<&str>,
    mounts: &mut Vec<String>,
) -> Result<()> {
    if find_program(DROPBEAR).is_none() {
        return Err(RigError::MissingTools {
            missing: vec![DROPBEAR.to_owned()],
            hint: "run scripts/setup-peers or `apt-get install -y dropbear-bin`".to_owned(),
        });
    }
    let convert = find_program("dropbearconvert").ok_or_else(|| RigError::MissingTools {
        missing: vec!["dropbearconvert".to_owned()],
        hint: "run scripts/setup-peers or `apt-get install -y dropbear-bin`".to_owned(),
    })?;
    let mut cmd = Command::new(convert);
    cmd.args(["openssh", "dropbear"])
        .arg(openssh_host_key)
        .arg(host_key_path(builder_dir))
        .stdin(Stdio::null());
    util::run_checked(&mut cmd)?;
    let keys =
        fs::read(authorized_keys).ctx(|| format!("reading {}", authorized_keys.display()))?;
    install_keys(&store.home(), &keys)?;
    if untrusted_user.is_some() {
        install_keys(&crate::untrusted::home(builder_dir), &keys)?;
    }
    mounts.push(format!("mount --bind {} /root", quoted(&store.home())));
    Ok(())
}

/// Writes `home/.ssh/authorized_keys`, owned by the owner of `home`: Dropbear opens it with
/// the account's effective uid and refuses files and directories others can write
/// (`svr-authpubkey.c`, `checkpubkeyperms`).
fn install_keys(home: &Path, keys: &[u8]) -> Result<()> {
    let owner = fs::metadata(home).ctx(|| format!("stat {}", home.display()))?;
    let ssh = home.join(".ssh");
    fs::create_dir_all(&ssh).ctx(|| format!("creating {}", ssh.display()))?;
    fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))
        .ctx(|| format!("chmod {}", ssh.display()))?;
    let file = ssh.join("authorized_keys");
    fs::write(&file, keys).ctx(|| format!("writing {}", file.display()))?;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600))
        .ctx(|| format!("chmod {}", file.display()))?;
    for p in [&ssh, &file] {
        rustix::fs::chown(
            p.as_path(),
            Some(rustix::fs::Uid::from_raw(owner.uid())),
            Some(rustix::fs::Gid::from_raw(owner.gid())),
        )
        .map_err(std::io::Error::from)
        .ctx(|| format!("chown {}", p.display()))?;
    }
    Ok(())
}

/// Starts Dropbear for a builder and waits until it answers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch(
    builder_dir: &Path,
    name: &str,
    store: &PrivateStore,
    wrapper: Option<&Path>,
    forced_command: Option<&Path>,
    log_path: &Path,
    port: u16,
    timeout: Duration,
) -> Result<Live> {
    let listen = format!("127.0.0.1:{port}");
    let host_key = host_key_path(builder_dir);
    let pid_file = builder_dir.join("dropbear.pid");
    let mut args = vec![
        os(Path::new("-F")),
        os(Path::new("-E")),
        os(Path::new("-s")),
        os(Path::new("-e")),
        os(Path::new("-m")),
        os(Path::new("-p")),
        std::ffi::OsStr::new(&listen),
        os(Path::new("-r")),
        os(&host_key),
        os(Path::new("-P")),
        os(&pid_file),
    ];
    if let Some(c) = forced_command {
        args.push(os(Path::new("-c")));
        args.push(os(c));
    }
    let server = ServerCommand {
        program: Path::new(DROPBEAR),
        args: &args,
        ready: Ready::OwnsListener,
    };
    sshd::launch_server(name, store, wrapper, &server, log_path, port, timeout)
}
