//! Host-key policy and OpenSSH-compatible known_hosts matching.
//!
//! # Rules (those of OpenSSH's `ssh`)
//!
//! * The host is looked up as `host` on port 22 and as `[host]:port` on any other port,
//!   lower-cased (OpenSSH lower-cases the host name before lookup and when it writes).
//! * A host field is a comma-separated list of patterns; `*` and `?` are wildcards, a leading
//!   `!` negates (a matching negated pattern excludes the line even if another pattern
//!   matches). Hashed entries `|1|base64(salt)|base64(HMAC-SHA1(salt, host))` are matched by
//!   recomputing the HMAC over the lookup string.
//! * A key is accepted if any non-marker line for the host holds exactly that key. If none
//!   does but a line holds a key *of the same type*, it is a mismatch (the host key changed).
//!   If the host has no key of that type, it is unknown.
//! * `@revoked` lines refuse the key they hold for the hosts they match, whatever else says.
//! * `@cert-authority` lines are ignored: this client never advertises host-certificate
//!   algorithms, so a server always proves itself with a plain key, which must be listed
//!   directly.
//! * Unparsable lines are skipped with a warning, as OpenSSH does. A file that does not exist
//!   is skipped; a file that exists but cannot be read is an error, because it might hold the
//!   `@revoked` line that matters.
//!
//! Pinned keys (field 8 of a Nix machines file) are authoritative when present: the server
//! must present one of them, known_hosts files are then only consulted for `@revoked`, and
//! AcceptNew never learns over a pin. This mirrors Nix, which hands ssh a known_hosts file
//! holding only the pinned key.
//!
//! All files are read before the connection starts, so the check inside the key exchange is
//! pure computation. To make the server present a key type we can check, the algorithms of
//! known and pinned keys for the host are moved to the front of our host-key algorithm
//! preference, as OpenSSH does.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use data_encoding::BASE64;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::ssh_key;
use russh::keys::{Algorithm, HashAlg};
use sha1::Sha1;

use crate::error::TransportError;

/// A public host key, e.g. one pinned in a Nix machines file.
#[derive(Clone, PartialEq, Eq)]
pub struct HostPublicKey(pub(crate) ssh_key::PublicKey);

impl HostPublicKey {
    /// Parses an OpenSSH public key line, `ssh-ed25519 AAAA... [comment]` (a leading host
    /// field, as in a known_hosts line, is not accepted).
    pub fn from_openssh(line: &str) -> Result<Self, TransportError> {
        let mut fields = line.split_ascii_whitespace();
        let (Some(_alg), Some(b64)) = (fields.next(), fields.next()) else {
            return Err(TransportError::Config(format!(
                "not an OpenSSH public key line: {line:?}"
            )));
        };
        russh::keys::parse_public_key_base64(b64)
            .map(|k| HostPublicKey(ssh_key::PublicKey::new(k.key_data().clone(), "")))
            .map_err(|e| TransportError::Config(format!("bad public key {line:?}: {e}")))
    }

    /// Parses field 8 of a Nix machines file: the base64 encoding of a `.pub` line
    /// (`base64("ssh-ed25519 AAAA... comment")`). A plain `.pub` line is accepted too.
    pub fn from_machines_field(field: &str) -> Result<Self, TransportError> {
        let field = field.trim();
        if field.split_ascii_whitespace().count() >= 2 {
            return Self::from_openssh(field);
        }
        let decoded = BASE64.decode(field.as_bytes()).map_err(|e| {
            TransportError::Config(format!("machines-file host key is not base64: {e}"))
        })?;
        let line = String::from_utf8(decoded)
            .map_err(|_| TransportError::Config("machines-file host key is not UTF-8".into()))?;
        Self::from_openssh(line.trim())
    }

    /// The algorithm name, e.g. `ssh-ed25519`.
    pub fn algorithm(&self) -> String {
        self.0.algorithm().to_string()
    }

    /// The OpenSSH SHA-256 fingerprint, `SHA256:...`.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.0)
    }

    /// `ssh-ed25519 AAAA...` (no comment).
    pub fn to_openssh(&self) -> String {
        openssh_key(&self.0)
    }
}

impl fmt::Debug for HostPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostPublicKey({} {})",
            self.algorithm(),
            self.fingerprint()
        )
    }
}

/// What to do with a server key that is not known.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HostKeyPolicy {
    /// Refuse unknown and mismatched keys (OpenSSH `StrictHostKeyChecking yes`).
    #[default]
    Strict,
    /// Accept a host that has no key of the offered type and append its key to `learn_into`
    /// (OpenSSH `StrictHostKeyChecking accept-new`). A mismatch is still refused.
    AcceptNew {
        /// The known_hosts file to append to (created if missing). It should also be one of
        /// `known_hosts_files`, or the key is learned again on every connection.
        learn_into: PathBuf,
    },
    /// Accept any key. Only constructible through [`HostKeyCheck::insecure_accept_any`], and
    /// reported as [`HostKeySource::InsecureAcceptAny`] so tools can warn loudly.
    InsecureAcceptAny(InsecureMarker),
}

/// Marker that keeps [`HostKeyPolicy::InsecureAcceptAny`] from being built by accident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsecureMarker(());

/// How the server's host key is checked. The default is Strict with no files, which refuses
/// every host: a caller has to say where keys come from.
#[derive(Debug, Clone, Default)]
pub struct HostKeyCheck {
    /// OpenSSH known_hosts files, consulted in order.
    pub known_hosts_files: Vec<PathBuf>,
    /// Keys pinned for this host (Nix machines file field 8). Authoritative when non-empty.
    pub pinned: Vec<HostPublicKey>,
    /// What to do with unknown keys.
    pub policy: HostKeyPolicy,
}

impl HostKeyCheck {
    /// Strict checking against the given known_hosts files.
    pub fn strict(known_hosts_files: impl IntoIterator<Item = PathBuf>) -> Self {
        HostKeyCheck {
            known_hosts_files: known_hosts_files.into_iter().collect(),
            pinned: Vec::new(),
            policy: HostKeyPolicy::Strict,
        }
    }

    /// Strict checking against pinned keys only.
    pub fn pinned(keys: impl IntoIterator<Item = HostPublicKey>) -> Self {
        HostKeyCheck {
            known_hosts_files: Vec::new(),
            pinned: keys.into_iter().collect(),
            policy: HostKeyPolicy::Strict,
        }
    }

    /// Trust on first use: known_hosts files are checked, an unknown host is accepted and
    /// appended to `learn_into`, a mismatch is refused.
    pub fn accept_new(
        known_hosts_files: impl IntoIterator<Item = PathBuf>,
        learn_into: PathBuf,
    ) -> Self {
        HostKeyCheck {
            known_hosts_files: known_hosts_files.into_iter().collect(),
            pinned: Vec::new(),
            policy: HostKeyPolicy::AcceptNew { learn_into },
        }
    }

    /// Accepts any host key. Anyone on the path can then read and alter the traffic,
    /// including build results. For throwaway test hosts only.
    pub fn insecure_accept_any() -> Self {
        HostKeyCheck {
            known_hosts_files: Vec::new(),
            pinned: Vec::new(),
            policy: HostKeyPolicy::InsecureAcceptAny(InsecureMarker(())),
        }
    }
}

/// Where an accepted host key was found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostKeySource {
    /// A known_hosts line.
    KnownHosts {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A key pinned in the machines file.
    Pinned,
    /// Unknown host, learned into this file under policy AcceptNew.
    Learned {
        /// The file appended to.
        path: PathBuf,
    },
    /// Not checked at all (policy InsecureAcceptAny).
    InsecureAcceptAny,
}

impl fmt::Display for HostKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKeySource::KnownHosts { path, line } => write!(f, "{}:{line}", path.display()),
            HostKeySource::Pinned => f.write_str("pinned in the machines file"),
            HostKeySource::Learned { path } => {
                write!(f, "new host, learned into {}", path.display())
            }
            HostKeySource::InsecureAcceptAny => f.write_str("NOT VERIFIED (insecure_accept_any)"),
        }
    }
}

/// Where a key for this host was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyLocation {
    /// A known_hosts line.
    KnownHosts {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Algorithm of the key on that line.
        algorithm: String,
        /// Fingerprint of the key on that line.
        fingerprint: String,
    },
    /// Pinned in the machines file.
    Pinned {
        /// Algorithm of the pinned key.
        algorithm: String,
        /// Fingerprint of the pinned key.
        fingerprint: String,
    },
}

impl fmt::Display for KeyLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyLocation::KnownHosts {
                path,
                line,
                algorithm,
                fingerprint,
            } => write!(f, "{algorithm} {fingerprint} at {}:{line}", path.display()),
            KeyLocation::Pinned {
                algorithm,
                fingerprint,
            } => write!(f, "{algorithm} {fingerprint} pinned in the machines file"),
        }
    }
}

/// Everything needed to understand and fix a refused host key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostKeyProblem {
    /// No key of this type for the host.
    Unknown,
    /// A different key of this type is expected.
    Mismatch,
    /// The key is `@revoked`.
    Revoked,
}

/// The details carried by host-key errors.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostKeyReport {
    /// What kind of refusal.
    pub problem: HostKeyProblem,
    /// The host string as looked up: `host` or `[host]:port`.
    pub lookup: String,
    /// Algorithm of the key the server presented.
    pub algorithm: String,
    /// Fingerprint of the key the server presented (`SHA256:...`).
    pub fingerprint: String,
    /// Keys that were expected instead (for Unknown: keys of other types for this host; for
    /// Revoked: the `@revoked` line).
    pub expected: Vec<KeyLocation>,
    /// The known_hosts files that were searched.
    pub searched: Vec<PathBuf>,
    /// The exact known_hosts line that would accept this key.
    pub known_hosts_line: String,
}

impl fmt::Display for HostKeyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.problem {
            HostKeyProblem::Unknown => "is unknown",
            HostKeyProblem::Mismatch => {
                "DOES NOT MATCH the expected key (possible man-in-the-middle, or the host was reinstalled)"
            }
            HostKeyProblem::Revoked => "is REVOKED",
        };
        write!(
            f,
            "host key for {} {what}: server offered {} {}",
            self.lookup, self.algorithm, self.fingerprint
        )?;
        if !self.expected.is_empty() {
            let label = match self.problem {
                HostKeyProblem::Unknown => "; keys of other types known for this host",
                HostKeyProblem::Mismatch => "; expected",
                HostKeyProblem::Revoked => "; revoked by",
            };
            write!(f, "{label}: ")?;
            for (i, e) in self.expected.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{e}")?;
            }
        }
        f.write_str("; searched: ")?;
        if self.searched.is_empty() {
            f.write_str("no known_hosts files")?;
        } else {
            for (i, p) in self.searched.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{}", p.display())?;
            }
        }
        let pinned = self
            .expected
            .iter()
            .any(|e| matches!(e, KeyLocation::Pinned { .. }));
        if self.problem == HostKeyProblem::Revoked {
        } else if pinned {
            let key = self
                .known_hosts_line
                .split_once(' ')
                .map_or(self.known_hosts_line.as_str(), |(_, k)| k);
            write!(
                f,
                "; pinned keys take precedence over known_hosts: if you trust this key, pin it instead (machines-file field 8 is the base64 of `{key}`)"
            )?;
        } else {
            write!(
                f,
                "; if you trust this key, this known_hosts line accepts it: {}",
                self.known_hosts_line
            )?;
        }
        Ok(())
    }
}

/// The OpenSSH lookup string: `host` on port 22, `[host]:port` otherwise, lower-case.
pub fn lookup_name(host: &str, port: u16) -> String {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

pub(crate) fn fingerprint(key: &ssh_key::PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

pub(crate) fn openssh_key(key: &ssh_key::PublicKey) -> String {
    // A key parsed from the wire has no comment; rebuild without one to be sure.
    ssh_key::PublicKey::new(key.key_data().clone(), "")
        .to_openssh()
        .unwrap_or_else(|_| format!("{} <unencodable key>", key.algorithm()))
}

// ===== known_hosts parsing =====

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    line: usize,
    key: ssh_key::PublicKey,
}

impl Entry {
    fn location(&self) -> KeyLocation {
        KeyLocation::KnownHosts {
            path: self.path.clone(),
            line: self.line,
            algorithm: self.key.algorithm().to_string(),
            fingerprint: fingerprint(&self.key),
        }
    }
}

/// Parses one known_hosts line; `Ok(None)` for blank lines and comments, `Err` for lines that
/// OpenSSH would also skip as invalid, `Ok(Some((marker, hosts, key)))` otherwise.
fn parse_line(line: &str) -> Result<Option<(Marker, &str, ssh_key::PublicKey)>, String> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split_ascii_whitespace();
    let mut first = fields.next().ok_or("empty line")?;
    let marker = if let Some(m) = first.strip_prefix('@') {
        let marker = match m {
            "revoked" => Marker::Revoked,
            "cert-authority" => Marker::CertAuthority,
            other => return Err(format!("unknown marker @{other}")),
        };
        first = fields.next().ok_or("marker without host patterns")?;
        marker
    } else {
        Marker::None
    };
    let hosts = first;
    let alg = fields.next().ok_or("no key type")?;
    let b64 = fields.next().ok_or("no key data")?;
    let key = russh::keys::parse_public_key_base64(b64).map_err(|e| format!("bad key: {e}"))?;
    if key.algorithm().as_str() != alg {
        return Err(format!(
            "key type field {alg:?} does not match the key ({})",
            key.algorithm()
        ));
    }
    Ok(Some((marker, hosts, key)))
}

/// Does a known_hosts host field match the lookup string?
fn hosts_match(field: &str, lookup: &str) -> bool {
    let mut matched = false;
    for pattern in field.split(',') {
        if let Some(hashed) = pattern.strip_prefix("|1|") {
            if hashed_matches(hashed, lookup) {
                matched = true;
            }
            continue;
        }
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern),
        };
        if wildcard_match(pattern.to_ascii_lowercase().as_bytes(), lookup.as_bytes()) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// `salt|hash` (both base64) of a `|1|salt|hash` entry.
fn hashed_matches(salt_and_hash: &str, lookup: &str) -> bool {
    let Some((salt, hash)) = salt_and_hash.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (
        BASE64.decode(salt.as_bytes()),
        BASE64.decode(hash.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(lookup.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

/// OpenSSH glob: `*` any run, `?` any one character; everything else literal.
fn wildcard_match(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, i));
                p += 1;
            }
            Some(&c) if c == b'?' || c == s[i] => {
                p += 1;
                i += 1;
            }
            _ => match star {
                Some((sp, si)) => {
                    p = sp + 1;
                    i = si + 1;
                    star = Some((sp, si + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

// ===== verification =====

/// Everything about the host-key decision for one connection, prepared before connecting.
#[derive(Debug)]
pub(crate) struct Verifier {
    lookup: String,
    /// Non-marker entries whose host field matches.
    entries: Vec<Entry>,
    /// `@revoked` entries whose host field matches.
    revoked: Vec<Entry>,
    pinned: Vec<HostPublicKey>,
    policy: HostKeyPolicy,
    searched: Vec<PathBuf>,
}

impl Verifier {
    /// Reads and filters the known_hosts files. Blocking; call from `spawn_blocking`.
    pub(crate) fn load(
        check: &HostKeyCheck,
        host: &str,
        port: u16,
    ) -> Result<Self, TransportError> {
        let lookup = lookup_name(host, port);
        let mut entries = Vec::new();
        let mut revoked = Vec::new();
        for path in &check.known_hosts_files {
            let text = match std::fs::read(path) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(io) => {
                    return Err(TransportError::KnownHostsRead {
                        path: path.clone(),
                        io,
                    });
                }
            };
            for (idx, raw) in text.lines().enumerate() {
                let line = idx + 1;
                match parse_line(raw) {
                    Ok(None) => {}
                    Ok(Some((marker, hosts, key))) => {
                        if !hosts_match(hosts, &lookup) {
                            continue;
                        }
                        let entry = Entry {
                            path: path.clone(),
                            line,
                            key,
                        };
                        match marker {
                            Marker::None => entries.push(entry),
                            Marker::Revoked => revoked.push(entry),
                            Marker::CertAuthority => {
                                tracing::debug!(
                                    "{}:{line}: @cert-authority ignored (host certificates are not negotiated)",
                                    path.display()
                                );
                            }
                        }
                    }
                    Err(why) => {
                        tracing::warn!(
                            "{}:{line}: skipping invalid known_hosts line: {why}",
                            path.display()
                        );
                    }
                }
            }
        }
        Ok(Verifier {
            lookup,
            entries,
            revoked,
            pinned: check.pinned.clone(),
            policy: check.policy.clone(),
            searched: check.known_hosts_files.clone(),
        })
    }

    /// Host-key algorithms we hold keys for, most authoritative first, for the preference
    /// list (RSA keys as the key type; the caller expands to the rsa-sha2 variants).
    pub(crate) fn known_algorithms(&self) -> Vec<Algorithm> {
        let mut algs: Vec<Algorithm> = Vec::new();
        let keys: Box<dyn Iterator<Item = &ssh_key::PublicKey>> = if self.pinned.is_empty() {
            Box::new(self.entries.iter().map(|e| &e.key))
        } else {
            Box::new(self.pinned.iter().map(|p| &p.0))
        };
        for k in keys {
            let a = k.algorithm();
            if !algs.contains(&a) {
                algs.push(a);
            }
        }
        algs
    }

    fn report(
        &self,
        problem: HostKeyProblem,
        key: &ssh_key::PublicKey,
        expected: Vec<KeyLocation>,
    ) -> Box<HostKeyReport> {
        Box::new(HostKeyReport {
            problem,
            lookup: self.lookup.clone(),
            algorithm: key.algorithm().to_string(),
            fingerprint: fingerprint(key),
            expected,
            searched: self.searched.clone(),
            known_hosts_line: format!("{} {}", self.lookup, openssh_key(key)),
        })
    }

    /// Decides about the key the server presented. Appends to the AcceptNew file (a small
    /// blocking append; it happens at most once per new host).
    pub(crate) fn verify(&self, key: &ssh_key::PublicKey) -> Result<HostKeySource, TransportError> {
        let data = key.key_data();
        if let Some(rev) = self.revoked.iter().find(|e| e.key.key_data() == data) {
            return Err(TransportError::HostKeyRevoked(self.report(
                HostKeyProblem::Revoked,
                key,
                vec![rev.location()],
            )));
        }
        if let HostKeyPolicy::InsecureAcceptAny(_) = self.policy {
            tracing::warn!(
                "host key for {} NOT verified (insecure_accept_any): {} {}",
                self.lookup,
                key.algorithm(),
                fingerprint(key)
            );
            return Ok(HostKeySource::InsecureAcceptAny);
        }
        if !self.pinned.is_empty() {
            if self.pinned.iter().any(|p| p.0.key_data() == data) {
                return Ok(HostKeySource::Pinned);
            }
            let expected = self
                .pinned
                .iter()
                .map(|p| KeyLocation::Pinned {
                    algorithm: p.algorithm(),
                    fingerprint: p.fingerprint(),
                })
                .collect();
            return Err(TransportError::HostKeyMismatch(self.report(
                HostKeyProblem::Mismatch,
                key,
                expected,
            )));
        }
        if let Some(e) = self.entries.iter().find(|e| e.key.key_data() == data) {
            return Ok(HostKeySource::KnownHosts {
                path: e.path.clone(),
                line: e.line,
            });
        }
        let alg = data.algorithm();
        let same_type: Vec<KeyLocation> = self
            .entries
            .iter()
            .filter(|e| e.key.key_data().algorithm() == alg)
            .map(Entry::location)
            .collect();
        if !same_type.is_empty() {
            return Err(TransportError::HostKeyMismatch(self.report(
                HostKeyProblem::Mismatch,
                key,
                same_type,
            )));
        }
        let others: Vec<KeyLocation> = self.entries.iter().map(Entry::location).collect();
        match &self.policy {
            HostKeyPolicy::AcceptNew { learn_into } => {
                let line = format!("{} {}\n", self.lookup, openssh_key(key));
                append_line(learn_into, &line).map_err(|io| TransportError::HostKeyLearn {
                    path: learn_into.clone(),
                    io,
                })?;
                tracing::info!(
                    "learned host key for {}: {} {} into {}",
                    self.lookup,
                    key.algorithm(),
                    fingerprint(key),
                    learn_into.display()
                );
                Ok(HostKeySource::Learned {
                    path: learn_into.clone(),
                })
            }
            _ => Err(TransportError::HostKeyUnknown(self.report(
                HostKeyProblem::Unknown,
                key,
                others,
            ))),
        }
    }
}

/// Appends one line with a single `write` on an `O_APPEND` file, so concurrent learners
/// (several connections to the same new host) cannot interleave within a line.
fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // Start on a fresh line if the file does not end with one.
    let len = f.metadata()?.len();
    let mut buf = String::with_capacity(line.len() + 1);
    if len > 0 {
        let existing = std::fs::read(path)?;
        if existing.last() != Some(&b'\n') {
            buf.push('\n');
        }
    }
    buf.push_str(line);
    f.write_all(buf.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated for this test with `ssh-keygen -t ed25519` (two throwaway keys).
    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAhNaQU7F6y7v84lEy0Oqi/eJz8q0Z9htO7m5GNOoO1P";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBI5vdKxAYDBVXqCNTVGudr5VrIMtTpGYKD+sTPguXIc";

    fn key(line: &str) -> ssh_key::PublicKey {
        HostPublicKey::from_openssh(line).expect("test key").0
    }

    fn verifier_for(
        text: &str,
        host: &str,
        port: u16,
        policy: HostKeyPolicy,
    ) -> (tempfile::TempDir, Verifier) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, text).expect("write");
        let check = HostKeyCheck {
            known_hosts_files: vec![path, dir.path().join("missing")],
            pinned: vec![],
            policy,
        };
        let v = Verifier::load(&check, host, port).expect("load");
        (dir, v)
    }

    #[test]
    fn lookup_names() {
        assert_eq!(lookup_name("Example.COM", 22), "example.com");
        assert_eq!(lookup_name("127.0.0.1", 2222), "[127.0.0.1]:2222");
        assert_eq!(lookup_name("[::1]", 2222), "[::1]:2222");
        assert_eq!(lookup_name("::1", 22), "::1");
    }

    #[test]
    fn wildcards_and_negation() {
        assert!(wildcard_match(b"*.example.com", b"a.example.com"));
        assert!(!wildcard_match(b"*.example.com", b"example.com"));
        assert!(wildcard_match(b"host?", b"host1"));
        assert!(!wildcard_match(b"host?", b"host12"));
        assert!(wildcard_match(b"*", b""));
        assert!(wildcard_match(b"a*b*c", b"axxbyyc"));
        assert!(!wildcard_match(b"a*b*c", b"axxbyy"));
        assert!(hosts_match("foo,*.example.com", "x.example.com"));
        assert!(!hosts_match(
            "*.example.com,!bad.example.com",
            "bad.example.com"
        ));
        assert!(hosts_match("[127.0.0.1]:2222", "[127.0.0.1]:2222"));
        assert!(!hosts_match("127.0.0.1", "[127.0.0.1]:2222"));
        assert!(hosts_match("[127.0.0.1]:*", "[127.0.0.1]:2222"));
        assert!(hosts_match("EXAMPLE.com", "example.com"));
    }

    #[test]
    fn hashed_entries() {
        // `ssh-keygen -H` output for hosts "builder1" and "[127.0.0.1]:2222".
        assert!(hosts_match(
            "|1|3rvMJamxaHOtxlI6TN3i0NkSv7w=|WQcq8/Aq7tueU15CBoSzAoZ2H28=",
            "builder1"
        ));
        assert!(!hosts_match(
            "|1|3rvMJamxaHOtxlI6TN3i0NkSv7w=|WQcq8/Aq7tueU15CBoSzAoZ2H28=",
            "builder2"
        ));
        assert!(hosts_match(
            "|1|eFBjsStsLcO/v7G6CbdPRp3Ivw0=|Oo33wwOPcrmeRkn092qQQRjGHQo=",
            "[127.0.0.1]:2222"
        ));
        assert!(!hosts_match("|1|garbage", "builder1"));
    }

    #[test]
    fn accept_match_mismatch_unknown() {
        let text = format!(
            "# comment\n\n   \nbad line\n[h]:2222 {KEY_A}\nother {KEY_B}\n@cert-authority * {KEY_B}\n"
        );
        let (_d, v) = verifier_for(&text, "h", 2222, HostKeyPolicy::Strict);
        match v.verify(&key(KEY_A)) {
            Ok(HostKeySource::KnownHosts { line, .. }) => assert_eq!(line, 5),
            other => panic!("{other:?}"),
        }
        let err = v.verify(&key(KEY_B)).expect_err("mismatch");
        let r = err.host_key_report().expect("report");
        assert_eq!(r.problem, HostKeyProblem::Mismatch);
        assert_eq!(r.lookup, "[h]:2222");
        assert!(r.known_hosts_line.starts_with("[h]:2222 ssh-ed25519 AAAA"));
        assert!(matches!(
            &r.expected[0],
            KeyLocation::KnownHosts { line: 5, .. }
        ));
        let msg = err.to_string();
        assert!(msg.contains("known_hosts:5"), "{msg}");

        let (_d, v) = verifier_for(&text, "unknown", 2222, HostKeyPolicy::Strict);
        let err = v.verify(&key(KEY_A)).expect_err("unknown");
        assert!(matches!(err, TransportError::HostKeyUnknown(_)));
    }

    #[test]
    fn two_lines_for_one_host_any_match_wins() {
        let text = format!("h {KEY_B}\nh {KEY_A}\n");
        let (_d, v) = verifier_for(&text, "h", 22, HostKeyPolicy::Strict);
        assert!(v.verify(&key(KEY_A)).is_ok());
        assert!(v.verify(&key(KEY_B)).is_ok());
    }

    #[test]
    fn revoked_wins() {
        let text = format!("h {KEY_A}\n@revoked h {KEY_A}\n");
        let (_d, v) = verifier_for(&text, "h", 22, HostKeyPolicy::Strict);
        let err = v.verify(&key(KEY_A)).expect_err("revoked");
        assert!(matches!(err, TransportError::HostKeyRevoked(_)), "{err}");
    }

    #[test]
    fn pinned_is_authoritative() {
        let text = format!("h {KEY_B}\n");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kh");
        std::fs::write(&path, text).expect("write");
        let check = HostKeyCheck {
            known_hosts_files: vec![path],
            pinned: vec![HostPublicKey::from_openssh(KEY_A).expect("key")],
            policy: HostKeyPolicy::Strict,
        };
        let v = Verifier::load(&check, "h", 22).expect("load");
        assert_eq!(
            v.verify(&key(KEY_A)).expect("pinned"),
            HostKeySource::Pinned
        );
        let err = v.verify(&key(KEY_B)).expect_err("not pinned");
        let r = err.host_key_report().expect("report");
        assert!(matches!(r.expected[0], KeyLocation::Pinned { .. }));
        assert!(err.to_string().contains("pinned in the machines file"));
    }

    #[test]
    fn machines_field() {
        let b64 = BASE64.encode(format!("{KEY_A} root@builder\n").as_bytes());
        let k = HostPublicKey::from_machines_field(&b64).expect("parse");
        assert_eq!(k, HostPublicKey::from_openssh(KEY_A).expect("key"));
        assert!(HostPublicKey::from_machines_field("not base64!").is_err());
    }

    #[test]
    fn accept_new_learns_once_and_refuses_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kh = dir.path().join("sub/known_hosts");
        let check = HostKeyCheck::accept_new([kh.clone()], kh.clone());
        let v = Verifier::load(&check, "h", 2200).expect("load");
        assert!(matches!(
            v.verify(&key(KEY_A)),
            Ok(HostKeySource::Learned { .. })
        ));
        let text = std::fs::read_to_string(&kh).expect("learned");
        assert_eq!(text, format!("[h]:2200 {KEY_A}\n"));
        let v = Verifier::load(&check, "h", 2200).expect("load");
        assert!(matches!(
            v.verify(&key(KEY_A)),
            Ok(HostKeySource::KnownHosts { line: 1, .. })
        ));
        assert!(matches!(
            v.verify(&key(KEY_B)),
            Err(TransportError::HostKeyMismatch(_))
        ));
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A directory cannot be read as a file.
        let check = HostKeyCheck::strict([dir.path().to_path_buf()]);
        assert!(matches!(
            Verifier::load(&check, "h", 22),
            Err(TransportError::KnownHostsRead { .. })
        ));
    }
}
