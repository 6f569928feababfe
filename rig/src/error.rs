//! The one error type of the rig.
//!
//! Every variant says what was attempted and, where there is one, what to do about it: the rig
//! runs in CI and on developer machines, and a failing test should point at the fix rather than
//! at a line number.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Result with [`RigError`] as the default error.
pub type Result<T, E = RigError> = std::result::Result<T, E>;

/// Everything that can go wrong while installing, starting, controlling or tearing down real
/// peers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RigError {
    /// The operation needs root (installing packages, `unshare --mount`, `nsenter`, signalling
    /// sshd sessions that run as root).
    #[error(
        "{action} needs root (CAP_SYS_ADMIN for mount namespaces, dpkg for installs), but this \
         process runs as uid {uid}; run the tests as root or in a root container"
    )]
    NotRoot {
        /// What was attempted.
        action: &'static str,
        /// The effective uid we run as.
        uid: u32,
    },

    /// A required program is missing and installing it did not help (or was not attempted).
    #[error("required program(s) missing: {missing:?}; {hint}")]
    MissingTools {
        /// The programs that could not be found.
        missing: Vec<String>,
        /// What to do about it.
        hint: String,
    },

    /// `apt-get` failed.
    #[error(
        "`{command}` failed ({status}); check network access to the Debian mirror and \
         that no other dpkg run is stuck. Output (tail):\n{output}"
    )]
    Install {
        /// The command line that failed.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// The last lines of its combined output.
        output: String,
    },

    /// An I/O operation failed; `context` says which one and on what.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path or program.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A helper program exited unsuccessfully.
    #[error("`{command}` failed ({status})\nstderr:\n{stderr}\nstdout:\n{stdout}")]
    CommandFailed {
        /// The command line, for copy-paste reproduction.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard output (lossy UTF-8, possibly truncated).
        stdout: String,
        /// Its standard error (lossy UTF-8, possibly truncated).
        stderr: String,
    },

    /// A rig or store directory path that cannot be written unquoted into sshd_config, the Nix
    /// machines file (whitespace-separated) or ssh_config.
    #[error(
        "unsuitable path {path:?}: {reason}; use a directory without whitespace, quotes, `#` \
         or `;` (e.g. under /tmp)"
    )]
    UnsuitablePath {
        /// The offending path.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },

    /// sshd exited or did not answer with an SSH banner in time.
    #[error(
        "sshd of {builder} (127.0.0.1:{port}) did not become ready within {timeout:?}: \
         {reason}\n--- {log_path} (tail) ---\n{log_tail}",
        log_path = log_path.display()
    )]
    SshdNotReady {
        /// Builder name.
        builder: String,
        /// The port sshd was asked to listen on.
        port: u16,
        /// How long we waited.
        timeout: Duration,
        /// What went wrong (exit status, no banner, ...).
        reason: String,
        /// sshd's log file.
        log_path: PathBuf,
        /// The end of sshd's log.
        log_tail: String,
    },

    /// The fixed port of a restarted builder is taken by someone else.
    #[error(
        "port 127.0.0.1:{port} of {builder} is in use by another process; the builder keeps \
         its port across restarts so known_hosts and the machines file stay valid"
    )]
    PortInUse {
        /// Builder name.
        builder: String,
        /// The port.
        port: u16,
    },

    /// An operation needs a running sshd (e.g. `freeze`, `exec_in_namespace` via nsenter).
    #[error("sshd of {builder} is not running; call start_sshd() first")]
    SshdNotRunning {
        /// Builder name.
        builder: String,
    },

    /// Processes survived SIGKILL for longer than the bound (e.g. stuck in uninterruptible
    /// sleep on a hung filesystem).
    #[error("processes of {what} still alive {timeout:?} after SIGKILL: {survivors:?}")]
    ProcessesSurvived {
        /// Which builder or rig.
        what: String,
        /// How long we waited.
        timeout: Duration,
        /// `pid cmdline` of the survivors.
        survivors: Vec<String>,
    },

    /// A safety check refused to signal processes (e.g. the namespace to kill turned out to be
    /// the host's own mount namespace).
    #[error("refusing to signal processes of {what}: {reason}")]
    Refused {
        /// Which builder or rig.
        what: String,
        /// Why.
        reason: String,
    },

    /// A combination of [`RigConfig`](crate::RigConfig) settings the rig cannot provide.
    #[error("unsupported rig configuration: {reason}")]
    UnsupportedConfig {
        /// Which settings and why.
        reason: String,
    },

    /// The `rig.json` state file of a kept rig is missing or unreadable.
    #[error(
        "rig state file {path:?}: {reason}; is this a directory left by Rig::keep()?",
        path = path.display()
    )]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl RigError {
    /// Wraps an I/O error with a description of what was being done.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        RigError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attaches context to `io::Result`s.
pub(crate) trait IoContext<T> {
    /// Converts the error into [`RigError::Io`] with a lazily built context.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| RigError::io(context(), e))
    }
}
