//! Small helpers shared by the modules: finding programs, running them with useful errors,
//! and checking that paths can be written unquoted into config files.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Result, RigError};

/// Directories searched after `$PATH`: test runners and `env -i` often run with a minimal PATH
/// that lacks the sbin directories where Debian puts some of our tools.
const FALLBACK_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The PATH given to sshd and to processes in private stores: the usual Debian one, so the
/// result does not depend on the caller's environment (cargo, pyenv shims, ...).
pub(crate) const CLEAN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Absolute path of sshd. Used absolutely because sshd refuses to re-exec itself otherwise
/// ("sshd re-exec requires execution with an absolute path").
pub(crate) const SSHD: &str = "/usr/sbin/sshd";

/// Finds an executable by name on `$PATH` and the fallback directories; an absolute `name`
/// is checked as is.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.starts_with('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_exec(p))
}

/// Like [`find_program`] but an error naming the program when it is missing.
pub(crate) fn program(name: &str) -> Result<PathBuf> {
    find_program(name).ok_or_else(|| RigError::MissingTools {
        missing: vec![name.to_owned()],
        hint: "call nixmux_rig::ensure_peers_installed() (as root) or run \
               `apt-get install -y nix-bin openssh-server`"
            .to_owned(),
    })
}

/// Renders a command line for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            s.push('\'');
            s.push_str(&a.replace('\'', r"'\''"));
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs a command to completion, capturing output; a non-zero exit becomes
/// [`RigError::CommandFailed`] with both streams.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output> {
    let output = cmd
        .output()
        .map_err(|e| RigError::io(format!("running `{}`", describe(cmd)), e))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(RigError::CommandFailed {
            command: describe(cmd),
            status: output.status,
            stdout: tail(&String::from_utf8_lossy(&output.stdout), 40),
            stderr: tail(&String::from_utf8_lossy(&output.stderr), 40),
        })
    }
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// Checks that `path` is absolute and contains only characters that need no quoting in
/// sshd_config, ssh_config and the whitespace-separated Nix machines file.
pub(crate) fn check_plain_path(path: &Path) -> Result<()> {
    let bad = |reason: &str| RigError::UnsuitablePath {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if !path.is_absolute() {
        return Err(bad("not absolute"));
    }
    let s = path.to_str().ok_or_else(|| bad("not UTF-8"))?;
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/._-+@=:%,".contains(*c)))
    {
        return Err(bad(&format!("contains {c:?}")));
    }
    Ok(())
}

/// `true` when we run with effective uid 0.
pub(crate) fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Our effective uid, for error messages.
pub(crate) fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Fails with [`RigError::NotRoot`] unless we are root.
pub(crate) fn require_root(action: &'static str) -> Result<()> {
    if is_root() {
        Ok(())
    } else {
        Err(RigError::NotRoot {
            action,
            uid: euid(),
        })
    }
}

/// Converts anything path-like to `&OsStr` for argument lists.
pub(crate) fn os(p: &Path) -> &OsStr {
    p.as_os_str()
}

/// Locks a mutex, recovering from poisoning: the data is plain bookkeeping, still valid after
/// a panicking test thread, and Drop must be able to clean up after such a panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
