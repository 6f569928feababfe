//! NARs read straight from the local store's files, the way Nix itself reads a local store
//! (`LocalFSStore::narFromPath` → `dumpPath`, NixOS/nix `src/libstore/local-fs-store.cc` and
//! `src/libutil/archive.cc`), instead of through the local daemon.
//!
//! Through the daemon, every byte of a push is read from disk by the daemon, written into a
//! socket or pipe, read back by us and hashed by us, before the builder hashes it again: on a
//! two-core machine that is about a third of the CPU a loopback push costs. Read here, a NAR
//! costs one read of its files.
//!
//! What the daemon's route checked, this one checks differently:
//! * **the right files**: the daemon may serve a store whose files are elsewhere on this
//!   machine (a chroot store, a private mount namespace). Until one NAR read here has hashed to
//!   what the daemon recorded for it, every NAR read here is hashed as it is read; one that
//!   does not match fails its transfer, and the daemon serves every NAR after it. A path
//!   missing here is asked of the daemon.
//! * **every NAR's size** is checked as it is produced: a tree that grew stops before a byte
//!   past the recorded `narSize` is passed on, one that shrank fails at its end. Once the files
//!   are known to be the daemon's, the hash is not computed again here: the receiving Nix
//!   checks it before registering anything (`LocalStore::addToStore`, NixOS/nix
//!   `src/libstore/local-store.cc`), which is all `nix copy` from a local store relies on.

use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::{BufMut, Bytes};
use nixmux_proto::hash::{Hash, Sha256};
use nixmux_proto::nar::NAR_MAGIC;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::wire::WireWrite;

use tokio::sync::mpsc::Sender;

use crate::error::{Error, ErrorKind};

/// Bytes handed on at a time: large enough that per-chunk costs vanish, small enough that a
/// few in flight cost little memory.
const CHUNK: usize = 512 * 1024;

/// Deepest directory nesting read, as deep as our own NAR parser accepts by default
/// (`Limits::max_nar_depth`): deeper is a broken tree, not something to recurse into.
const MAX_DEPTH: usize = 256;

/// The local store's files, as this process sees them.
#[derive(Debug)]
pub(crate) struct StoreFiles {
    /// The real directory holding the store's paths.
    dir: PathBuf,
    /// Set once a NAR read here hashed to the daemon's record: these are its files.
    verified: AtomicBool,
    /// Set when files did not match the daemon's record: they are not read again.
    refused: AtomicBool,
    /// NARs sent from files.
    sent: AtomicU64,
}

/// Why a NAR could not be read from files.
#[derive(Debug)]
pub(crate) enum FilesError {
    /// The path's top is missing or unreadable, and nothing was produced: the daemon may
    /// still serve it (a path deleted since, a store this process cannot read).
    Unavailable(std::io::Error),
    /// Reading failed part-way.
    Io(PathBuf, std::io::Error),
    /// A file of a type a NAR cannot hold (a socket, a device).
    Unsupported(PathBuf),
    /// The files make a NAR with another hash than the store recorded.
    Hash(Hash),
    /// The files make a NAR of another size than the store recorded.
    Size {
        /// What the store recorded.
        expected: u64,
        /// At least this much was produced.
        produced: u64,
    },
    /// The reader of the chunks went away: the transfer was cut off or dropped.
    Stopped,
}

impl FilesError {
    /// As a nixmux error about `info`'s path.
    pub(crate) fn into_error(self, info: &PathInfo) -> Error {
        let path = &info.path;
        match self {
            FilesError::Size { expected, produced } => Error::local(
                ErrorKind::Verification,
                format!(
                    "local store: the files of {path} make a NAR of {produced}{} bytes, the store recorded {expected}",
                    if produced > expected { "+" } else { "" }
                ),
            ),
            FilesError::Hash(h) => Error::local(
                ErrorKind::Verification,
                format!(
                    "local store: the files of {path} make a NAR with hash {}, the store recorded {}",
                    h.to_nix32_prefixed(),
                    info.nar_hash.to_nix32_prefixed()
                ),
            ),
            FilesError::Unsupported(p) => Error::local(
                ErrorKind::LocalStore,
                format!("local store: {} has a type a NAR cannot hold", p.display()),
            ),
            FilesError::Io(p, e) => Error::local(
                ErrorKind::LocalStore,
                format!("local store: reading {}: {e}", p.display()),
            ),
            FilesError::Unavailable(e) => Error::local(
                ErrorKind::LocalStore,
                format!("local store: reading {path}: {e}"),
            ),
            FilesError::Stopped => Error::local(
                ErrorKind::LocalStore,
                format!("local store: reading {path}: the transfer stopped"),
            ),
        }
    }
}

impl StoreFiles {
    /// The store's paths are in `dir` on this machine (not yet trusted).
    pub(crate) fn new(dir: PathBuf) -> Self {
        StoreFiles {
            dir,
            verified: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            sent: AtomicU64::new(0),
        }
    }

    /// The real directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// NARs sent from files so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Files that do not match the daemon's record: the daemon is asked from now on.
    fn refuse(&self, e: FilesError) -> FilesError {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dir = %self.dir.display(),
                "the local store's files here do not match its records: reading NARs through the daemon from now on"
            );
        }
        e
    }

    /// Whether NARs are still read here (no files failed to match the daemon's record).
    pub(crate) fn usable(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// Streams the NAR of `info.path`, read from its files, into a NAR pipe (`tx`): exactly
    /// `info.nar_size` bytes (hashing to `info.nar_hash`, checked until the files are known to
    /// be the daemon's), or an error (see [`FilesError`]).
    pub(crate) async fn send(&self, info: &PathInfo, tx: Sender<Bytes>) -> Result<(), FilesError> {
        let real = self.dir.join(info.path.to_string());
        let expected = info.nar_size;
        let hash = !self.verified.load(Ordering::Relaxed);
        // Chunks go into the upload's pipe as they are read. If the upload stops reading
        // (it failed, or was dropped), the next hand-over fails and the thread stops.
        let reader = tokio::task::spawn_blocking(move || {
            let mut hasher = hash.then(Sha256::new);
            dump_nar(&real, expected, &mut |chunk| {
                if let Some(h) = &mut hasher {
                    h.update(&chunk);
                }
                tx.blocking_send(chunk).map_err(|_| FilesError::Stopped)
            })
            .map(|()| hasher.map(Sha256::finish))
        });
        match reader.await {
            Ok(Ok(None)) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Ok(Some(hash))) if hash == info.nar_hash => {
                self.verified.store(true, Ordering::Relaxed);
                self.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Ok(Some(hash))) => Err(self.refuse(FilesError::Hash(hash))),
            Ok(Err(e @ FilesError::Size { .. })) => Err(self.refuse(e)),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(FilesError::Io(
                self.dir.clone(),
                std::io::Error::other(format!("the reading thread failed: {e}")),
            )),
        }
    }
}

/// Serialises the tree at `real` as a NAR, handing it to `emit` in chunks: exactly `expected`
/// bytes in all, else [`FilesError::Size`] (before anything past `expected` is handed on).
fn dump_nar(
    real: &Path,
    expected: u64,
    emit: &mut dyn FnMut(Bytes) -> Result<(), FilesError>,
) -> Result<(), FilesError> {
    let top = std::fs::symlink_metadata(real).map_err(FilesError::Unavailable)?;
    let mut out = Dump {
        buf: Vec::with_capacity(CHUNK),
        produced: 0,
        expected,
        emit,
    };
    out.buf.put_bytes_padded(NAR_MAGIC);
    out.node(real, &top, 0)?;
    out.flush()?;
    if out.produced != expected {
        return Err(FilesError::Size {
            expected,
            produced: out.produced,
        });
    }
    Ok(())
}

struct Dump<'e> {
    /// Bytes not yet handed on. A `Vec` rather than a `BytesMut`: `Read::read_to_end` fills
    /// its spare capacity without zeroing it first.
    buf: Vec<u8>,
    /// Bytes handed on.
    produced: u64,
    expected: u64,
    emit: &'e mut dyn FnMut(Bytes) -> Result<(), FilesError>,
}

impl Dump<'_> {
    /// Hands on what is buffered, unless that would go past the expected size.
    fn flush(&mut self) -> Result<(), FilesError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let after = self.produced + self.buf.len() as u64;
        if after > self.expected {
            return Err(FilesError::Size {
                expected: self.expected,
                produced: after,
            });
        }
        self.produced = after;
        // The chunk keeps its allocation; the next one gets a whole one of its own.
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        (self.emit)(chunk)
    }

    fn flush_if_full(&mut self) -> Result<(), FilesError> {
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    /// One node, as `dumpPath` writes it: `( type ... )`.
    fn node(
        &mut self,
        path: &Path,
        meta: &std::fs::Metadata,
        depth: usize,
    ) -> Result<(), FilesError> {
        let io = |e| FilesError::Io(path.to_owned(), e);
        self.buf.put_bytes_padded(b"(");
        self.buf.put_bytes_padded(b"type");
        let kind = meta.file_type();
        if kind.is_file() {
            self.buf.put_bytes_padded(b"regular");
            // `dumpPath` marks a file executable when its owner may execute it.
            if meta.permissions().mode() & 0o100 != 0 {
                self.buf.put_bytes_padded(b"executable");
                self.buf.put_bytes_padded(b"");
            }
            self.buf.put_bytes_padded(b"contents");
            self.contents(path, meta.len())?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(path).map_err(io)?;
            self.buf.put_bytes_padded(b"symlink");
            self.buf.put_bytes_padded(b"target");
            self.buf.put_bytes_padded(target.as_os_str().as_bytes());
        } else if kind.is_dir() {
            if depth >= MAX_DEPTH {
                return Err(FilesError::Unsupported(path.to_owned()));
            }
            self.buf.put_bytes_padded(b"directory");
            let mut names = Vec::new();
            for entry in std::fs::read_dir(path).map_err(io)? {
                names.push(entry.map_err(io)?.file_name());
            }
            // Byte order, as the NAR grammar requires (`std::map<std::string, ...>` in Nix).
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                let child = path.join(&name);
                let meta = std::fs::symlink_metadata(&child)
                    .map_err(|e| FilesError::Io(child.clone(), e))?;
                self.buf.put_bytes_padded(b"entry");
                self.buf.put_bytes_padded(b"(");
                self.buf.put_bytes_padded(b"name");
                self.buf.put_bytes_padded(name.as_bytes());
                self.buf.put_bytes_padded(b"node");
                self.node(&child, &meta, depth + 1)?;
                self.buf.put_bytes_padded(b")");
                self.flush_if_full()?;
            }
        } else {
            return Err(FilesError::Unsupported(path.to_owned()));
        }
        self.buf.put_bytes_padded(b")");
        self.flush_if_full()
    }

    /// A regular file's contents: its length, its bytes, its padding. The file must still
    /// have the length `lstat` gave (a file changing under us is a broken tree).
    fn contents(&mut self, path: &Path, len: u64) -> Result<(), FilesError> {
        let io = |e| FilesError::Io(path.to_owned(), e);
        self.buf.put_word(len);
        let mut file = File::open(path).map_err(io)?;
        let mut left = len;
        while left > 0 {
            self.flush_if_full()?;
            // What fills the chunk: never more, so the buffer is never reallocated.
            let room = CHUNK - self.buf.len();
            let want = usize::try_from(left).map_or(room, |l| l.min(room));
            self.buf.reserve(want);
            // At most `want` bytes, fewer only at the file's end.
            let n = (&mut file)
                .take(want as u64)
                .read_to_end(&mut self.buf)
                .map_err(io)?;
            if n == 0 {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the file shrank while being read ({left} of {len} bytes missing)"),
                )));
            }
            left -= n as u64;
        }
        let mut probe = [0u8; 1];
        if file.read(&mut probe).map_err(io)? != 0 {
            return Err(io(std::io::Error::other(format!(
                "the file grew past its {len} bytes while being read"
            ))));
        }
        let pad = nixmux_proto::wire::padding(len);
        self.buf.put_bytes(0, usize::try_from(pad).unwrap_or(0));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    use nixmux_proto::nar::NarNode;

    use super::*;

    fn file(contents: &[u8], executable: bool) -> NarNode {
        NarNode::File {
            executable,
            contents: contents.to_vec(),
        }
    }

    /// Hash and size of the NAR of `real`, stopping past `limit` bytes.
    fn hash_nar(real: &Path, limit: u64) -> Result<(Hash, u64), FilesError> {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        dump_nar(real, limit, &mut |chunk| {
            size += chunk.len() as u64;
            hasher.update(&chunk);
            Ok(())
        })?;
        Ok((hasher.finish(), size))
    }

    fn dumped(real: &Path, expected: u64) -> Result<Vec<u8>, FilesError> {
        let mut out = Vec::new();
        dump_nar(real, expected, &mut |c| {
            out.extend_from_slice(&c);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn a_tree_dumps_as_the_nar_writer_writes_it() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let top = tmp.path().join("top");
        std::fs::create_dir_all(top.join("sub/deeper")).expect("succeeds");
        std::fs::write(top.join("b"), b"hello").expect("succeeds");
        std::fs::write(top.join("a-run"), b"#!/bin/sh\n").expect("succeeds");
        std::fs::set_permissions(top.join("a-run"), std::fs::Permissions::from_mode(0o555))
            .expect("succeeds");
        let big: Vec<u8> = (0..=250u8).cycle().take(3 * CHUNK + 13).collect();
        std::fs::write(top.join("sub/big"), &big).expect("succeeds");
        std::fs::write(top.join("sub/deeper/empty"), b"").expect("succeeds");
        symlink("../b", top.join("sub/link")).expect("succeeds");
        // Byte order: "B" < "a" < "b".
        std::fs::write(top.join("B"), b"x").expect("succeeds");

        let mut deeper = BTreeMap::new();
        deeper.insert(b"empty".to_vec(), file(b"", false));
        let mut sub = BTreeMap::new();
        sub.insert(b"big".to_vec(), file(&big, false));
        sub.insert(b"deeper".to_vec(), NarNode::Directory(deeper));
        sub.insert(
            b"link".to_vec(),
            NarNode::Symlink {
                target: b"../b".to_vec(),
            },
        );
        let mut root = BTreeMap::new();
        root.insert(b"B".to_vec(), file(b"x", false));
        root.insert(b"a-run".to_vec(), file(b"#!/bin/sh\n", true));
        root.insert(b"b".to_vec(), file(b"hello", false));
        root.insert(b"sub".to_vec(), NarNode::Directory(sub));
        let want = NarNode::Directory(root).to_nar();

        assert_eq!(dumped(&top, want.len() as u64).expect("succeeds"), want);
        let (hash, size) = hash_nar(&top, want.len() as u64).expect("succeeds");
        assert_eq!((hash, size), (Hash::sha256_of(&want), want.len() as u64));
    }

    #[test]
    fn a_single_file_and_a_symlink_at_the_top() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let f = tmp.path().join("f");
        std::fs::write(&f, b"abc").expect("succeeds");
        let want = file(b"abc", false).to_nar();
        assert_eq!(dumped(&f, want.len() as u64).expect("succeeds"), want);
        let l = tmp.path().join("l");
        symlink("/nowhere", &l).expect("succeeds");
        let want = NarNode::Symlink {
            target: b"/nowhere".to_vec(),
        }
        .to_nar();
        assert_eq!(dumped(&l, want.len() as u64).expect("succeeds"), want);
    }

    #[test]
    fn a_size_other_than_recorded_fails_without_passing_the_record() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let f = tmp.path().join("f");
        let contents = vec![7u8; 2 * CHUNK];
        std::fs::write(&f, &contents).expect("succeeds");
        let real = file(&contents, false).to_nar().len() as u64;
        let mut handed = 0u64;
        let r = dump_nar(&f, real - 1, &mut |c| {
            handed += c.len() as u64;
            Ok(())
        });
        assert!(matches!(r, Err(FilesError::Size { expected, .. }) if expected == real - 1));
        assert!(handed < real, "nothing past the record is handed on");
        assert!(matches!(
            dumped(&f, real + 8),
            Err(FilesError::Size { produced, .. }) if produced == real
        ));
    }

    #[test]
    fn a_missing_top_is_unavailable_and_a_socket_unsupported() {
        let tmp = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            dumped(&tmp.path().join("gone"), 100),
            Err(FilesError::Unavailable(_))
        ));
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).expect("succeeds");
        let _l = std::os::unix::net::UnixListener::bind(dir.join("sock")).expect("succeeds");
        assert!(matches!(
            dumped(&dir, 10_000),
            Err(FilesError::Unsupported(_))
        ));
    }
}
