//! Store directories and validated store paths.
//!
//! A store path is `<store dir>/<32 nix32 chars>-<name>`. Both sides of a connection must use
//! the same store directory: paths always travel in full on the wire (`nix-protocols.md` §1.2),
//! and each side parses them against its own `storeDir`.
//!
//! The rules follow `StorePath::StorePath` and `checkName` in NixOS/nix `src/libstore/path.cc`:
//!
//! * the hash part is 32 characters of the nix32 alphabet, followed by `-`;
//! * the name is 1 to 211 characters of `A-Za-z0-9+-._?=`;
//! * the name is not `.` or `..` and does not start with `.-` or `..-`.
//!
//! Two quirks of Nix 2.8.0 (our primary peer) that we deliberately do *not* copy:
//! it never checks that the 33rd character is a `-` (any byte is taken as the separator), and it
//! accepts the names `.`, `..`, `.-x`, `..-x`. Newer Nix (the `nameRegexStr` rule in
//! `path-regex.hh`, 2.2x onwards) rejects those, so no path that every Nix accepts is lost.
//! A name may otherwise start with a dot: `builtins.path { path = ./.envrc; }` yields
//! `<hash>-.envrc`, so "no leading dot" would be wrong.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

use bytes::BufMut;

use crate::error::ProtoError;
use crate::hash::{Hash, nix32_decode_into, nix32_encode};
use crate::wire::{ReadError, ReadResult, WireReader, WireWrite};

/// Length of the hash part of a store path, in nix32 characters.
pub const HASH_PART_LEN: usize = 32;
/// Size of the decoded hash part in bytes (160 bits, a truncated SHA-256).
pub const HASH_BYTES: usize = 20;
/// Longest name Nix accepts (`StorePath::MaxPathLen`).
pub const MAX_NAME_LEN: usize = 211;
/// Suffix of derivation names (`drvExtension`).
pub const DRV_EXTENSION: &str = ".drv";

/// The directory that holds the store, e.g. `/nix/store`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl StoreDir {
    /// The default `/nix/store`.
    pub const DEFAULT: &'static str = "/nix/store";

    /// A validated store directory: absolute, canonical (no empty, `.` or `..` components, no
    /// trailing slash), not `/` itself, no NUL. Nix canonicalises its setting the same way, so a
    /// non-canonical value would never match what the peer prints.
    pub fn new(dir: impl Into<String>) -> Result<Self, ProtoError> {
        let dir = dir.into();
        let bad = |reason: &str| ProtoError::invalid("store dir", format!("{dir:?}: {reason}"));
        let Some(rest) = dir.strip_prefix('/') else {
            return Err(bad("not absolute"));
        };
        if rest.is_empty() {
            return Err(bad("the root directory cannot be a store"));
        }
        if dir.contains('\0') {
            return Err(bad("contains NUL"));
        }
        if rest
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad("not canonical (trailing slash, '//', '.' or '..')"));
        }
        Ok(Self(dir))
    }

    /// The directory as a string, without trailing slash.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for StoreDir {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid store path, independent of the store directory.
///
/// The hash part is kept decoded (20 bytes). Ordering is Nix's: by the printed base name
/// (`StorePath::operator<` compares `baseName`), which is what sorted path sets on the wire and
/// in `.drv` files follow. nix32 prints the digest as one little-endian integer, most
/// significant digit first, and the alphabet is in ASCII order, so comparing the bytes from the
/// last to the first gives exactly the order of the printed hash parts.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    hash: [u8; HASH_BYTES],
    name: String,
}

impl StorePath {
    /// A store path from its decoded hash and a name, validating the name.
    pub fn new(hash: [u8; HASH_BYTES], name: impl Into<String>) -> Result<Self, ProtoError> {
        let name = name.into();
        check_name(&name)
            .map_err(|r| ProtoError::invalid("store path", format!("name {name:?}: {r}")))?;
        Ok(Self { hash, name })
    }

    /// Parses an absolute path `<dir>/<hash>-<name>`. Nothing may follow the name: a path
    /// *inside* a store path is not a store path.
    pub fn parse(dir: &StoreDir, path: &str) -> Result<Self, ProtoError> {
        Self::parse_field(dir, path, "store path")
    }

    /// [`StorePath::parse`], naming `field` in the error.
    pub fn parse_field(
        dir: &StoreDir,
        path: &str,
        field: &'static str,
    ) -> Result<Self, ProtoError> {
        let base = path
            .strip_prefix(dir.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| {
                ProtoError::invalid(field, format!("{path:?} is not in the store {dir}"))
            })?;
        Self::from_base_name_field(base, field)
    }

    /// Parses a base name `<hash>-<name>` (no directory), as in realisations and
    /// `QueryPathFromHashPart`.
    pub fn from_base_name(base: &str) -> Result<Self, ProtoError> {
        Self::from_base_name_field(base, "store path")
    }

    /// [`StorePath::from_base_name`], naming `field` in the error.
    pub fn from_base_name_field(base: &str, field: &'static str) -> Result<Self, ProtoError> {
        let bad = |reason: String| ProtoError::invalid(field, format!("{base:?}: {reason}"));
        let bytes = base.as_bytes();
        let (hash_part, rest) = bytes
            .split_at_checked(HASH_PART_LEN)
            .ok_or_else(|| bad("too short to be a store path".into()))?;
        let name = rest
            .strip_prefix(b"-")
            .ok_or_else(|| bad("the hash part is not followed by '-'".into()))?;
        let mut hash = [0u8; HASH_BYTES];
        nix32_decode_into(hash_part, &mut hash)
            .ok_or_else(|| bad("the hash part is not 32 nix32 characters".into()))?;
        // `name` is a suffix of a `&str` after an ASCII prefix, so it is valid UTF-8; check_name
        // then restricts it to ASCII anyway.
        let name = std::str::from_utf8(name).map_err(|_| bad("name is not UTF-8".into()))?;
        check_name(name).map_err(|r| bad(format!("invalid name: {r}")))?;
        Ok(Self {
            hash,
            name: name.to_owned(),
        })
    }

    /// The full path in `dir`.
    pub fn to_absolute(&self, dir: &StoreDir) -> String {
        let mut s =
            String::with_capacity(dir.as_str().len() + 1 + HASH_PART_LEN + 1 + self.name.len());
        s.push_str(dir.as_str());
        s.push('/');
        s.push_str(&self.hash_part());
        s.push('-');
        s.push_str(&self.name);
        s
    }

    /// The 32-character nix32 hash part.
    pub fn hash_part(&self) -> String {
        nix32_encode(&self.hash)
    }

    /// The decoded hash part.
    pub fn hash_bytes(&self) -> &[u8; HASH_BYTES] {
        &self.hash
    }

    /// The name after the hash part.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True for names ending in `.drv` (`StorePath::isDerivation`).
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(DRV_EXTENSION)
    }
}

/// `Store::makeStorePath` (NixOS/nix `src/libstore/store-api.cc`): the path named `name`
/// whose hash part is the SHA-256 of `<kind>:sha256:<base16 hash>:<store dir>:<name>`, folded
/// to 20 bytes (`compressHash`, `src/libutil/hash.cc`).
pub fn make_store_path(
    dir: &StoreDir,
    kind: &str,
    hash: &Hash,
    name: &str,
) -> Result<StorePath, ProtoError> {
    let text = format!(
        "{kind}:{}:{}:{}:{name}",
        hash.algo(),
        hash.to_base16(),
        dir.as_str()
    );
    let full = Hash::sha256_of(text.as_bytes());
    let mut short = [0u8; HASH_BYTES];
    for (i, b) in full.digest().iter().enumerate() {
        short[i % HASH_BYTES] ^= b;
    }
    StorePath::new(short, name)
}

/// The path of a NAR added by content with SHA-256 and no references (`fixed:r:sha256`):
/// `nix-store --add`, `builtins.path`, `./.` and flake sources. `Store::makeFixedOutputPath`
/// gives these the `source` kind, whose hash is the NAR's own hash
/// (`src/libstore/store-api.cc`).
pub fn make_source_path(
    dir: &StoreDir,
    nar_hash: &Hash,
    name: &str,
) -> Result<StorePath, ProtoError> {
    make_store_path(dir, "source", nar_hash, name)
}

impl StorePath {
    /// The hash bytes from the last to the first as two integers: comparing them compares the
    /// printed hash parts (a `u128` and a `u32` instead of 20 byte comparisons; sets of store
    /// paths sort and search on this).
    fn order_key(&self) -> (u128, u32) {
        let [l0, l1, l2, l3, h @ ..] = self.hash;
        (u128::from_le_bytes(h), u32::from_le_bytes([l0, l1, l2, l3]))
    }
}

impl Ord for StorePath {
    fn cmp(&self, other: &Self) -> Ordering {
        self.order_key()
            .cmp(&other.order_key())
            .then_with(|| self.name.as_bytes().cmp(other.name.as_bytes()))
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for StorePath {
    /// The base name `<hash>-<name>`; use [`StorePath::to_absolute`] for the full path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hash_part(), self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

/// Checks a store path name (`checkName`, NixOS/nix `src/libstore/path.cc`).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} characters"));
    }
    // `.` and `..`, alone or as the first dash-separated component (Nix >= 2.2x's nameRegexStr).
    let first = name.split('-').next().unwrap_or(name);
    if first == "." || first == ".." {
        return Err(format!("first component must not be {first:?}"));
    }
    if let Some(c) = name
        .bytes()
        .find(|&c| !(c.is_ascii_alphanumeric() || b"+-._?=".contains(&c)))
    {
        return Err(format!("illegal character {:?}", char::from(c)));
    }
    Ok(())
}

/// Reads one store path (a `str` holding an absolute path).
pub fn read_store_path(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
    field: &'static str,
) -> ReadResult<StorePath> {
    let s = read_str(r, field)?;
    StorePath::parse_field(dir, s, field).map_err(ReadError::Proto)
}

/// A UTF-8 string borrowed from the input (store paths are parsed without a copy first).
fn read_str<'a>(r: &mut WireReader<'a>, field: &'static str) -> ReadResult<&'a str> {
    let bytes = r.read_bytes(field)?;
    std::str::from_utf8(bytes).map_err(|_| ProtoError::invalid(field, "not UTF-8").into())
}

/// Reads an optional store path: the empty string means none (derivers,
/// `QueryPathFromHashPart`).
pub fn read_opt_store_path(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
    field: &'static str,
) -> ReadResult<Option<StorePath>> {
    let s = read_str(r, field)?;
    if s.is_empty() {
        return Ok(None);
    }
    StorePath::parse_field(dir, s, field)
        .map(Some)
        .map_err(ReadError::Proto)
}

/// Reads a counted set of store paths. Nix writes sets sorted, but like Nix we accept any order
/// (and merge duplicates).
pub fn read_store_path_set(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
    field: &'static str,
) -> ReadResult<BTreeSet<StorePath>> {
    let n = r.read_count(field)?;
    let mut out = BTreeSet::new();
    for _ in 0..n {
        out.insert(read_store_path(r, dir, field)?);
    }
    Ok(out)
}

/// Writes a store path in full.
pub fn put_store_path<B: BufMut + ?Sized>(out: &mut B, dir: &StoreDir, path: &StorePath) {
    out.put_str(&path.to_absolute(dir));
}

/// Writes an optional store path (empty string for none).
pub fn put_opt_store_path<B: BufMut + ?Sized>(
    out: &mut B,
    dir: &StoreDir,
    path: Option<&StorePath>,
) {
    match path {
        Some(p) => put_store_path(out, dir, p),
        None => out.put_str(""),
    }
}

/// Writes a set of store paths in Nix's order.
pub fn put_store_path_set<'a, B, I>(out: &mut B, dir: &StoreDir, paths: I)
where
    B: BufMut + ?Sized,
    I: IntoIterator<Item = &'a StorePath>,
    I::IntoIter: ExactSizeIterator,
{
    let it = paths.into_iter();
    out.put_word(it.len() as u64);
    for p in it {
        put_store_path(out, dir, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_matches_printed_order() {
        let a = StorePath::from_base_name("0c8l4igrdiw127iv5cyp53mnrsmk4lxk-foo").expect("valid");
        let b = StorePath::from_base_name("1c8l4igrdiw127iv5cyp53mnrsmk4lxk-foo").expect("valid");
        let c = StorePath::from_base_name("0c8l4igrdiw127iv5cyp53mnrsmk4lxz-foo").expect("valid");
        assert!(a < b);
        assert!(a < c);
        assert!(c < b);
    }
}
