//! Installing the real peers (Debian's `nix-bin` and `openssh-server`) on demand.
//!
//! CI starts from a fresh Debian image, so the rig installs what it needs itself instead of
//! relying on a provisioning step that drifts from the code. Tests run in parallel processes
//! (nextest runs one process per test), so installs are serialised with a file lock: dpkg has
//! its own lock, but apt fails instead of waiting on it by default.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::error::{IoContext, Result, RigError};
use crate::util::{self, describe, find_program, require_root, tail};

/// The lock serialising installs across processes. Under /tmp so any user can create it and it
/// vanishes on reboot.
const LOCK_PATH: &str = "/tmp/nixmux-rig-apt.lock";

/// The packages the rig is about: they are always installed together.
const PEER_PACKAGES: [&str; 2] = ["nix-bin", "openssh-server"];

/// Every program the rig runs, with the Debian package that ships it. Packages other than the
/// two peers are essential or pulled in as dependencies on a normal Debian, but a slim image may
/// lack them.
const REQUIRED: [(&str, &str); 8] = [
    ("nix-store", "nix-bin"),
    ("nix-daemon", "nix-bin"),
    (util::SSHD, "openssh-server"),
    ("ssh-keygen", "openssh-client"),
    ("ssh", "openssh-client"),
    ("unshare", "util-linux"),
    ("nsenter", "util-linux"),
    ("mount", "mount"),
];

/// Debian's hook for "may maintainer scripts start services?". While we install, it answers
/// "no" so that openssh-server's postinst does not start a system sshd on port 22 (and nix-bin's
/// does not start nix-daemon) on a CI machine without a service manager.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Programs the rig needs that are not on this machine.
pub fn missing_programs() -> Vec<&'static str> {
    REQUIRED
        .iter()
        .filter(|(prog, _)| find_program(prog).is_none())
        .map(|(prog, _)| *prog)
        .collect()
}

/// Makes sure Nix (`nix-store`, `nix-daemon`), OpenSSH (`/usr/sbin/sshd`, `ssh`, `ssh-keygen`)
/// and util-linux (`unshare`, `nsenter`) are installed, installing `nix-bin openssh-server`
/// with apt-get when something is missing.
///
/// * Fast and silent when everything is present: a few `stat`s, no apt call.
/// * Serialised across processes with `flock` on `/tmp/nixmux-rig-apt.lock`, and re-checked
///   under the lock, so parallel tests install once.
/// * `apt-get update` runs only if the first install fails (stale or missing package lists).
/// * Quiet on success; on failure the error carries the tail of apt's output.
///
/// # Errors
/// [`RigError::NotRoot`] if something is missing and we are not root, [`RigError::Install`]
/// if apt-get fails, [`RigError::MissingTools`] if programs are still missing afterwards.
pub fn ensure_peers_installed() -> Result<()> {
    if missing_programs().is_empty() {
        return Ok(());
    }
    require_root("installing nix-bin and openssh-server")?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o666)
        .open(LOCK_PATH)
        .ctx(|| format!("opening install lock {LOCK_PATH}"))?;
    lock.lock().ctx(|| format!("locking {LOCK_PATH} (flock)"))?;
    let result = install_locked();
    // Dropping the file releases the lock; unlock explicitly to make the intent visible.
    let _ = lock.unlock();
    result
}

/// The install proper, under the lock.
fn install_locked() -> Result<()> {
    let missing = missing_programs();
    if missing.is_empty() {
        // Another process installed while we waited for the lock.
        return Ok(());
    }
    let mut packages: Vec<&str> = PEER_PACKAGES.to_vec();
    for (prog, pkg) in REQUIRED {
        if missing.contains(&prog) && !packages.contains(&pkg) {
            packages.push(pkg);
        }
    }
    let _policy = NoServiceStarts::install()?;
    if apt(&install_args(&packages)).is_err() {
        apt(&["update", "-q"])?;
        apt(&install_args(&packages))?;
    }
    let still = missing_programs();
    if still.is_empty() {
        Ok(())
    } else {
        Err(RigError::MissingTools {
            missing: still.into_iter().map(str::to_owned).collect(),
            hint: format!(
                "still missing after `apt-get install {}` succeeded; is a dpkg diversion or a \
                 non-Debian PATH hiding them?",
                packages.join(" ")
            ),
        })
    }
}

/// `apt-get install` arguments; waits for dpkg's own lock (held by e.g. unattended-upgrades)
/// instead of failing at once.
fn install_args<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300"];
    args.extend_from_slice(packages);
    args
}

/// Runs apt-get non-interactively, capturing its output so that success stays quiet.
fn apt(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PATH", util::CLEAN_PATH);
    let out = cmd
        .output()
        .ctx(|| format!("running `{}`", describe(&cmd)))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Err(RigError::Install {
        command: describe(&cmd),
        status: out.status,
        output: tail(&text, 30),
    })
}

/// Temporarily installs a `policy-rc.d` that forbids starting services, unless the machine
/// already has one (Docker images do). Removed on drop.
struct NoServiceStarts {
    created: bool,
}

impl NoServiceStarts {
    fn install() -> Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return Ok(Self { created: false });
        }
        let mut f = File::create_new(path).ctx(|| format!("creating {POLICY_RC_D}"))?;
        f.write_all(
            b"#!/bin/sh\n# nixmux-rig: no service starts during package installs\nexit 101\n",
        )
        .ctx(|| format!("writing {POLICY_RC_D}"))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o755))
            .ctx(|| format!("chmod {POLICY_RC_D}"))?;
        Ok(Self { created: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_args_wait_for_dpkg_lock() {
        let args = install_args(&["nix-bin", "openssh-server"]);
        assert_eq!(
            args,
            [
                "install",
                "-y",
                "-q",
                "-o",
                "DPkg::Lock::Timeout=300",
                "nix-bin",
                "openssh-server"
            ]
        );
    }
}
