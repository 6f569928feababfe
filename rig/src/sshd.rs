//! Starting one sshd for a builder: its configuration, the namespace it runs in, readiness.
//!
//! sshd runs as `unshare --mount --propagation private -- /bin/sh -c 'mount --bind ... /nix;
//! exec /usr/sbin/sshd -D ...'` (see [`PrivateStore::command`]): every session it forks inherits
//! the builder's /nix.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::builder::{KILL_TIMEOUT, Live};
use crate::error::{IoContext, Result, RigError};
use crate::procs::{self, PinnedNs};
use crate::rig::RigConfig;
use crate::store::PrivateStore;
use crate::util::{self, CLEAN_PATH, SSHD, os, program};

/// Exact substrings of sshd 9.2 log lines (`LogLevel DEBUG1`), verified against OpenSSH
/// 9.2p1 (Debian 12). Count them with [`Builder::count_log`](crate::Builder::count_log).
pub mod log_patterns {
    /// A TCP connection reached sshd (INFO). Includes the rig's own readiness probe, one per
    /// sshd start, so prefer [`ACCEPTED`] to count SSH connections.
    pub const CONNECTION: &str = "Connection from 127.0.0.1 port ";
    /// A client authenticated with its key (INFO): one per real SSH connection.
    pub const ACCEPTED: &str = "Accepted publickey for root from ";
    /// A client asked for a session channel (DEBUG1), whether or not it was granted; the full
    /// line is `debug1: server_input_channel_open: ctype session rchan N win N max N`.
    pub const SESSION_OPEN: &str = "server_input_channel_open: ctype session ";
    /// A session channel was granted (DEBUG1).
    pub const SESSION_CONFIRMED: &str = "server_input_channel_open: confirm session";
    /// A session channel was refused because the connection already has MaxSessions (INFO);
    /// sshd also logs `server_input_channel_open: failure session` at DEBUG1.
    pub const SESSION_REFUSED: &str = "no more sessions";
    /// A command started on a session channel (INFO): `Starting session: command for root from
    /// 127.0.0.1 port N id N`.
    pub const EXEC: &str = "Starting session: command for ";
    /// A session ended (INFO).
    pub const SESSION_CLOSED: &str = "Close session: ";
}

/// Starts a builder's sshd in a fresh namespace over its store and waits until it answers;
/// returns its child handle, pid and pinned namespace.
pub(crate) fn launch(
    name: &str,
    store: &PrivateStore,
    wrapper: Option<&Path>,
    config_path: &Path,
    log_path: &Path,
    port: u16,
    timeout: Duration,
) -> Result<Live> {
    ensure_privsep_dir()?;
    let sshd_args = [
        os(Path::new("-D")),
        os(Path::new("-f")),
        os(config_path),
        os(Path::new("-E")),
        os(log_path),
    ];
    let server = ServerCommand {
        program: Path::new(SSHD),
        args: &sshd_args,
        ready: Ready::LogLine(format!("Server listening on 127.0.0.1 port {port}.")),
    };
    launch_server(name, store, wrapper, &server, log_path, port, timeout)
}

/// How to start an SSH server in a builder's namespace (OpenSSH here, Dropbear in
/// `dropbear.rs`).
pub(crate) struct ServerCommand<'a> {
    /// The server binary, absolute.
    pub(crate) program: &'a Path,
    /// Its arguments: it must stay in the foreground and log to stderr or `log_path`.
    pub(crate) args: &'a [&'a std::ffi::OsStr],
    /// How to tell that the server listens on our port.
    pub(crate) ready: Ready,
}

/// Proof that the banner on our port is our server's, not that of a process that grabbed the
/// port in between.
pub(crate) enum Ready {
    /// The server logs this line once it listens (sshd: `Server listening on ...`).
    LogLine(String),
    /// The server logs no such line (Dropbear): one of its file descriptors must be the
    /// socket listening on the port.
    OwnsListener,
}

/// Starts `server` in a fresh namespace over the builder's store (through `wrapper`, which
/// prepares the namespace and execs the rest of its arguments) and waits until it answers.
pub(crate) fn launch_server(
    name: &str,
    store: &PrivateStore,
    wrapper: Option<&Path>,
    server: &ServerCommand<'_>,
    log_path: &Path,
    port: u16,
    timeout: Duration,
) -> Result<Live> {
    let log_start = fs::metadata(log_path).map(|m| m.len()).unwrap_or(0);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .ctx(|| format!("opening {}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .ctx(|| format!("duplicating {}", log_path.display()))?;
    let mut cmd = match wrapper {
        // The wrapper prepares the namespace, then execs the server, so the pid is still
        // the server's.
        Some(w) => {
            let mut args = vec![os(w), os(server.program)];
            args.extend(server.args);
            store.command("/bin/sh", args)
        }
        None => store.command(server.program, server.args),
    };
    // sshd builds session environments from scratch plus `SetEnv`; give sshd itself a clean
    // one too so nothing of the test runner's environment leaks into the builder.
    cmd.env_clear().env("PATH", CLEAN_PATH);
    for (k, v) in store.env() {
        cmd.env(k, v);
    }
    // Early errors (bad config, failed bind mount) go to stderr, i.e. into the same log.
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    let what = util::describe(&cmd);
    let mut child = cmd.spawn().ctx(|| format!("spawning `{what}`"))?;
    let pid = child.id();
    let checked = wait_ready(
        name,
        &mut child,
        port,
        &server.ready,
        log_path,
        log_start,
        timeout,
    )
    .and_then(|()| {
        // Only now is the pid sshd itself inside the new namespace (before the exec chain it
        // is unshare in ours, which PinnedNs refuses).
        let ns = PinnedNs::of(name, pid)?;
        let nix = procs::nix_dir_of(pid).ctx(|| format!("stat /proc/{pid}/root/nix"))?;
        if nix != store.nix_id() {
            return Err(RigError::Refused {
                what: name.to_owned(),
                reason: format!("sshd (pid {pid}) does not see its private store as /nix"),
            });
        }
        Ok(ns)
    });
    match checked {
        Ok(ns) => Ok(Live {
            child: Some(child),
            pid: Some(pid),
            ns: Some(ns),
        }),
        Err(e) => {
            // Also kill children sshd may have forked (e.g. for our readiness probe).
            if let Ok(ns) = PinnedNs::of(name, pid) {
                let _ = procs::kill_namespaces(name, &[&ns], None, KILL_TIMEOUT);
            }
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Waits until the server is known to listen on `port` (see [`Ready`]) and answers a TCP
/// connection with an `SSH-2.0-` banner. Checking that first makes sure the banner is our
/// server's, not that of a process that grabbed the port in between.
fn wait_ready(
    name: &str,
    child: &mut Child,
    port: u16,
    ready: &Ready,
    log_path: &Path,
    log_start: u64,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let not_ready = |reason: String| RigError::SshdNotReady {
        builder: name.to_owned(),
        port,
        timeout,
        reason,
        log_path: log_path.to_owned(),
        log_tail: util::tail(&read_from(log_path, log_start), 30),
    };
    loop {
        if let Some(status) = child
            .try_wait()
            .ctx(|| format!("waiting for sshd of {name}"))?
        {
            let log = read_from(log_path, log_start);
            // sshd and Dropbear both quote strerror(EADDRINUSE).
            if log.contains("Address already in use") {
                return Err(RigError::PortInUse {
                    builder: name.to_owned(),
                    port,
                });
            }
            return Err(not_ready(format!("sshd exited ({status})")));
        }
        let listens = match ready {
            Ready::LogLine(line) => read_from(log_path, log_start).contains(line.as_str()),
            Ready::OwnsListener => procs::owns_listener(child.id(), port),
        };
        if listens && banner_ok(port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(not_ready(
                "not seen listening with an SSH banner in time".to_owned(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects and reads the server's identification line.
fn banner_ok(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_secs(1))).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.starts_with(b"SSH-2.0-")
}

/// The part of a file after `offset`, lossily decoded.
fn read_from(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// sshd refuses to start without its privilege separation directory, which Debian normally
/// creates at boot via systemd-tmpfiles (absent in containers).
fn ensure_privsep_dir() -> Result<()> {
    let dir = Path::new("/run/sshd");
    if dir.is_dir() {
        return Ok(());
    }
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(RigError::io(
            "creating sshd's privsep directory /run/sshd",
            e,
        )),
    }
}

/// A port that was free a moment ago.
pub(crate) fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .ctx(|| "binding 127.0.0.1:0 to find a free port".to_owned())?;
    Ok(l.local_addr()
        .ctx(|| "reading the probe socket's address".to_owned())?
        .port())
}

/// Generates an ed25519 key pair without passphrase.
pub(crate) fn keygen(path: &Path, comment: &str) -> Result<()> {
    let mut cmd = Command::new(program("ssh-keygen")?);
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null());
    util::run_checked(&mut cmd).map(drop)
}

/// Everything that makes up a builder's sshd_config.
pub(crate) struct SshdSettings<'a> {
    pub(crate) port: u16,
    pub(crate) host_key: &'a Path,
    pub(crate) authorized_keys: &'a Path,
    pub(crate) store: &'a PrivateStore,
    pub(crate) config: &'a RigConfig,
    pub(crate) builder_dir: &'a Path,
    /// `ForceCommand` for every session (a trixie builder's chroot script).
    pub(crate) forced_command: Option<&'a Path>,
}

pub(crate) fn sshd_config(s: &SshdSettings<'_>) -> String {
    let match_at = s
        .config
        .extra_sshd_config
        .iter()
        .position(|l| l.trim_start().to_ascii_lowercase().starts_with("match "))
        .unwrap_or(s.config.extra_sshd_config.len());
    let (front, matches) = s.config.extra_sshd_config.split_at(match_at);
    let mut out = String::from(
        "# Generated by nixmux-rig. sshd keeps the first value of a keyword, so extra lines come\n\
         # first and override the settings below.\n",
    );
    for l in front {
        out.push_str(l);
        out.push('\n');
    }
    let settings = [
        format!("ListenAddress 127.0.0.1:{}", s.port),
        format!("HostKey {}", s.host_key.display()),
        // Never touch the system sshd's /run/sshd.pid.
        "PidFile none".to_owned(),
        format!("LogLevel {}", s.config.log_level),
        "PubkeyAuthentication yes".to_owned(),
        "PasswordAuthentication no".to_owned(),
        "KbdInteractiveAuthentication no".to_owned(),
        "UsePAM no".to_owned(),
        "PermitRootLogin prohibit-password".to_owned(),
        // The rig directory is a temp dir whose parents sshd would otherwise audit.
        "StrictModes no".to_owned(),
        format!("AuthorizedKeysFile {}", s.authorized_keys.display()),
        format!("MaxSessions {}", s.config.max_sessions),
        format!("MaxStartups {}", s.config.max_startups),
        // Sessions get the store's HOME (so bash, which sshd runs commands through, reads no
        // ~/.bashrc of the real root: this machine's runs `pyenv init`, 0.13 s per exec) and
        // NIX_CONF_DIR. SetEnv is applied after sshd's own HOME, so it wins.
        format!(
            "SetEnv HOME={} NIX_CONF_DIR={}",
            s.store.home().display(),
            s.store.conf_dir().display()
        ),
        // Nor /root/.ssh/rc or /root/.ssh/environment.
        "PermitUserRC no".to_owned(),
        "PermitUserEnvironment no".to_owned(),
        "PrintMotd no".to_owned(),
        "PrintLastLog no".to_owned(),
        "UseDNS no".to_owned(),
        "X11Forwarding no".to_owned(),
    ];
    for l in settings {
        out.push_str(&l);
        out.push('\n');
    }
    if let Some(c) = s.forced_command {
        out.push_str(&format!("ForceCommand {}\n", c.display()));
    }
    for l in matches {
        out.push_str(l);
        out.push('\n');
    }
    if let Some(user) = &s.config.untrusted_user {
        // Its own writable HOME; the store's NIX_CONF_DIR (clients read it too).
        out.push_str(&format!(
            "Match User {user}\n  SetEnv HOME={} NIX_CONF_DIR={}\n",
            crate::untrusted::home(s.builder_dir).display(),
            s.store.conf_dir().display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_sshd_lines_come_first_and_match_blocks_last() {
        let store_dir = tempfile::tempdir().expect("tempdir");
        let store = PrivateStore::new(store_dir.path()).expect("store");
        let config = RigConfig {
            extra_sshd_config: vec![
                "MaxSessions 3".to_owned(),
                "Match User nobody".to_owned(),
                "  PermitTTY no".to_owned(),
            ],
            ..RigConfig::default()
        };
        let text = sshd_config(&SshdSettings {
            port: 2222,
            host_key: Path::new("/k"),
            authorized_keys: Path::new("/a"),
            store: &store,
            config: &config,
            builder_dir: Path::new("/b"),
            forced_command: None,
        });
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines[0], "MaxSessions 3");
        assert_eq!(lines[lines.len() - 2], "Match User nobody");
        assert!(text.contains("ListenAddress 127.0.0.1:2222\n"));
        assert!(text.contains("MaxSessions 10\n"));
        assert!(text.contains(&format!("SetEnv HOME={}/home ", store.path().display())));
    }
}
