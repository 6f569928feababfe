//! The on-disk memory of accepted keys ([`TransportConfig::accepted_keys_file`]): which
//! (host, port, user, public-key fingerprint) an endpoint accepted, so that a new process
//! starts where the last one left off (see `auth.rs` for what the memory is used for).
//!
//! Format, plain text:
//!
//! ```text
//! nixmux-accepted-keys v1
//! build-box.example.org 22 nix SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU
//! ```
//!
//! A header naming the format and its version, then one entry a line, oldest first: host,
//! port, user and the SHA-256 fingerprint of the public key, separated by single spaces.
//! Nothing private is stored: no key, no path, no signature.
//!
//! Security. Remembering an acceptance only changes *how* we authenticate, never *whether*
//! we trust the host: host keys are checked exactly as without the file, before any of this
//! is consulted. What an entry changes: a key file's request is signed at once anyway (with
//! `fast_auth`), so for key files only the first channel's open goes behind the request; an
//! agent key is signed at once instead of queried first (the server learns the same public
//! key either way, and only a server whose host key was verified sees the signature, which
//! is bound to this session's identifier, RFC 4252 §7). A wrong or forged entry therefore
//! costs at most a refused request (one round trip, and with Dropbear one new connection),
//! and is then dropped. What the file reveals to whoever reads it: which keys (by
//! fingerprint) log in to which hosts, ports and accounts, like an unhashed `known_hosts`
//! and more (the user names): hence mode 0600 in a 0700 directory.
//!
//! Writes replace the file atomically (a temporary file in the same directory, then
//! `rename(2)`), after re-reading it, so two processes adding entries at once keep both
//! unless their writes interleave exactly (then one addition is lost, which only costs the
//! next process a round trip); a reader never sees a half-written file. A file that cannot be
//! read or parsed is ignored (logged) and rewritten on the next change: it never fails a
//! connection.
//!
//! [`TransportConfig::accepted_keys_file`]: crate::TransportConfig::accepted_keys_file

use std::io::Write;
use std::path::Path;

/// The first line of the file: the format and its version. A file with any other first
/// line (a later version, or not this file at all) is ignored, and replaced on the next
/// change.
const HEADER: &str = "nixmux-accepted-keys v1";

/// One endpoint's acceptance of one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Entry {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    /// `SHA256:...`, as [`crate::host_key`] prints fingerprints.
    pub(crate) fingerprint: String,
}

impl Entry {
    /// Whether the entry can be written as one line of the format: every field non-empty,
    /// without whitespace or control characters (a host or user name with a space cannot be
    /// a word of the line; it is then remembered in memory only).
    pub(crate) fn storable(&self) -> bool {
        let word =
            |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        word(&self.host) && word(&self.user) && word(&self.fingerprint)
    }
}

/// Parses the file's text. Empty text is an empty memory (a file created but never
/// written, e.g. after a crash before the rename's data reached the disk).
pub(crate) fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let mut lines = text.lines();
    match lines.next() {
        None => return Ok(Vec::new()),
        Some(HEADER) => {}
        Some(other) => {
            return Err(format!(
                "first line is {:?}, not {HEADER:?}",
                other.chars().take(40).collect::<String>()
            ));
        }
    }
    let mut entries = Vec::new();
    for (n, line) in lines.enumerate() {
        let bad = || format!("line {}: not `host port user fingerprint`", n + 2);
        let mut words = line.split(' ');
        let (Some(host), Some(port), Some(user), Some(fingerprint), None) = (
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
        ) else {
            return Err(bad());
        };
        let entry = Entry {
            host: host.to_string(),
            port: port.parse().map_err(|_| bad())?,
            user: user.to_string(),
            fingerprint: fingerprint.to_string(),
        };
        if !entry.storable() || !entry.fingerprint.starts_with("SHA256:") {
            return Err(bad());
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// The file's text for `entries` (those that cannot be written are left out).
pub(crate) fn render(entries: &[Entry]) -> String {
    let mut text = format!("{HEADER}\n");
    for e in entries.iter().filter(|e| e.storable()) {
        text.push_str(&format!(
            "{} {} {} {}\n",
            e.host, e.port, e.user, e.fingerprint
        ));
    }
    text
}

/// The entries in the file at `path`: none if it does not exist; none, logged, if it cannot
/// be read or parsed.
pub(crate) fn load(path: &Path) -> Vec<Entry> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).unwrap_or_else(|reason| {
            tracing::warn!(
                "ignoring the accepted-keys file {}: {reason}",
                path.display()
            );
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(
                "ignoring the accepted-keys file {}: cannot read it: {e}",
                path.display()
            );
            Vec::new()
        }
    }
}

/// Replaces the file at `path` with `entries`, atomically: a temporary file (mode 0600) in
/// the same directory, renamed over it. The directory is created (mode 0700) if missing.
pub(crate) fn store(path: &Path, entries: &[Entry]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    // tempfile creates it with O_EXCL and mode 0600, and removes it if we fail before the
    // rename.
    let mut tmp = tempfile::Builder::new()
        .prefix(".accepted-keys.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(render(entries).as_bytes())?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Keeps the newest `max` of `entries` (the last ones).
pub(crate) fn bound(entries: &mut Vec<Entry>, max: usize) {
    if entries.len() > max {
        entries.drain(..entries.len() - max);
    }
}

/// Re-reads the file, applies `change` (which says whether it changed anything), bounds it
/// to `max` entries and writes it back if anything changed.
pub(crate) fn update(
    path: &Path,
    max: usize,
    change: impl FnOnce(&mut Vec<Entry>) -> bool,
) -> std::io::Result<()> {
    let mut entries = load(path);
    if change(&mut entries) {
        bound(&mut entries, max);
        store(path, &entries)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entry(host: &str, port: u16) -> Entry {
        Entry {
            host: host.into(),
            port,
            user: "nix".into(),
            fingerprint: "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU".into(),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/nixmux/accepted-keys");
        let entries = vec![entry("build-box", 22), entry("::1", 2222)];
        store(&path, &entries).expect("store");
        assert_eq!(load(&path), entries);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("nixmux-accepted-keys v1\n"), "{text}");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
    }

    #[test]
    fn missing_empty_and_corrupt_files_are_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("accepted-keys");
        assert!(load(&path).is_empty());
        for text in [
            "",
            "garbage\n",
            "nixmux-accepted-keys v2\nh 22 u SHA256:x\n",
            "nixmux-accepted-keys v1\nh 22 u\n",
            "nixmux-accepted-keys v1\nh 99999 u SHA256:x\n",
            "nixmux-accepted-keys v1\nh 22 u SHA256:x extra\n",
            "nixmux-accepted-keys v1\nh 22 u MD5:x\n",
            "\u{0}\u{1}binary",
        ] {
            std::fs::write(&path, text).expect("write");
            assert!(load(&path).is_empty(), "{text:?}");
        }
        // A directory where the file should be: unreadable, ignored.
        std::fs::remove_file(&path).expect("rm");
        std::fs::create_dir(&path).expect("mkdir");
        assert!(load(&path).is_empty());
    }

    #[test]
    fn unstorable_entries_are_left_out() {
        let mut odd = entry("a host", 22);
        assert!(!odd.storable());
        odd.host = "h".into();
        odd.user = String::new();
        assert!(!odd.storable());
        let text = render(&[odd, entry("h", 22)]);
        assert_eq!(parse(&text).expect("parse"), vec![entry("h", 22)]);
    }

    #[test]
    fn update_bounds_to_the_newest_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("accepted-keys");
        for port in 1..=10 {
            update(&path, 4, |e| {
                e.push(entry("h", port));
                true
            })
            .expect("update");
        }
        let ports: Vec<u16> = load(&path).iter().map(|e| e.port).collect();
        assert_eq!(ports, [7, 8, 9, 10]);
        // Nothing changed: not rewritten.
        let before = std::fs::metadata(&path).expect("meta").modified().ok();
        std::thread::sleep(std::time::Duration::from_millis(20));
        update(&path, 4, |_| false).expect("update");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").modified().ok(),
            before
        );
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["accepted-keys"]);
    }

    #[test]
    fn concurrent_writers_never_tear_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("accepted-keys");
        let writers: Vec<_> = (0..4u16)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for i in 0..50u16 {
                        update(&path, 64, |e| {
                            e.push(entry(&format!("host{w}"), i));
                            true
                        })
                        .expect("update");
                        // Every read sees a whole file.
                        let text = std::fs::read_to_string(&path).expect("read");
                        parse(&text).expect("whole file");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        let entries = load(&path);
        assert!(!entries.is_empty() && entries.len() <= 64);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "temp files left"
        );
    }
}
