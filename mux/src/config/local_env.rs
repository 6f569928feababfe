//! Who and where we are locally: the facts ssh takes from the password database.

use std::fs;
use std::path::PathBuf;

use super::error::ConfigError;

/// The local user, home directory, uid and host name, as ssh uses them for defaults (`User`),
/// `~` and the `%u`, `%d`, `%i`, `%l`, `%L` tokens. Tests build one by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEnv {
    /// Local user name (the default remote user).
    pub user: String,
    /// Home directory (`~`).
    pub home: PathBuf,
    /// Real uid.
    pub uid: u32,
    /// Local host name (`%l`; `%L` is its first label).
    pub hostname: String,
}

impl LocalEnv {
    /// This process's environment. Like ssh, user name and home come from the password entry
    /// of the real uid (`getpwuid(getuid())`, read from `/etc/passwd`); when there is none
    /// (users from LDAP and the like), from `$USER` / `$LOGNAME` and `$HOME`.
    pub fn current() -> Result<LocalEnv, ConfigError> {
        let uid = real_uid()?;
        let entry = fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|text| passwd_entry(&text, uid));
        let (user, home) = match entry {
            Some((user, home)) => (user, PathBuf::from(home)),
            None => {
                let user = std::env::var("USER")
                    .or_else(|_| std::env::var("LOGNAME"))
                    .ok()
                    .filter(|u| !u.is_empty())
                    .ok_or_else(|| {
                        ConfigError::LocalUser(format!(
                            "uid {uid} has no /etc/passwd entry and USER is not set"
                        ))
                    })?;
                let home = std::env::var("HOME")
                    .ok()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| {
                        ConfigError::LocalUser(format!(
                            "uid {uid} has no /etc/passwd entry and HOME is not set"
                        ))
                    })?;
                (user, PathBuf::from(home))
            }
        };
        let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "localhost".to_owned());
        Ok(LocalEnv {
            user,
            home,
            uid,
            hostname,
        })
    }
}

/// The real uid from `/proc/self/status` (no `unsafe` libc call needed).
fn real_uid() -> Result<u32, ConfigError> {
    proc_uid(0)
}

/// This process's effective uid (what `SO_PEERCRED` reports to a peer), from
/// `/proc/self/status`.
pub fn effective_uid() -> Result<u32, ConfigError> {
    proc_uid(1)
}

/// Field `index` of the `Uid:` line of `/proc/self/status` (real, effective, saved, fs).
fn proc_uid(index: usize) -> Result<u32, ConfigError> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| ConfigError::LocalUser(format!("reading /proc/self/status: {e}")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(index))
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| ConfigError::LocalUser("no Uid line in /proc/self/status".to_owned()))
}

/// The name of `uid` in `/etc/passwd`, if it has an entry.
pub fn user_name(uid: u32) -> Option<String> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    passwd_entry(&text, uid).map(|(name, _)| name)
}

/// The uid of user `name` in `/etc/passwd`, if it has an entry.
pub fn user_id(name: &str) -> Option<u32> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    passwd_uid(&text, name)
}

/// The uid of the first `/etc/passwd` line for `name`.
fn passwd_uid(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

/// `(name, home)` of the first `/etc/passwd` line for `uid`.
fn passwd_entry(text: &str, uid: u32) -> Option<(String, String)> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 7 && f[2].parse::<u32>().ok() == Some(uid) && !f[0].is_empty() {
            Some((f[0].to_owned(), f[5].to_owned()))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{passwd_entry, passwd_uid};

    #[test]
    fn passwd() {
        let text = "root:x:0:0:root:/root:/bin/bash\nnix:x:1000:1000::/home/nix:/bin/sh\n";
        assert_eq!(
            passwd_entry(text, 1000),
            Some(("nix".into(), "/home/nix".into()))
        );
        assert_eq!(passwd_entry(text, 0), Some(("root".into(), "/root".into())));
        assert_eq!(passwd_entry(text, 5), None);
        assert_eq!(passwd_uid(text, "nix"), Some(1000));
        assert_eq!(passwd_uid(text, "nobody"), None);
    }
}
