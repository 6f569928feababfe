//! Hashes as Nix prints and parses them: base16, Nix's own base32 ("nix32"), base64 and SRI.
//!
//! Both protocols carry hashes as *strings*, and which format appears depends on the field and
//! the Nix version (see `nix-protocols.md` §1.2): the worker protocol sends a bare base16
//! `narHash`, the serve protocol `sha256:<nix32>`, fixed-output derivations a bare base16
//! `hash`, and every Nix reader accepts all of them. [`Hash::parse`] therefore accepts every
//! format `Hash::parseAny` accepts in NixOS/nix@2.8.0 `src/libutil/hash.cc`.
//!
//! ## nix32
//!
//! Nix's base32 is not RFC 4648. The alphabet `0123456789abcdfghijklmnpqrsvwxyz` omits `e o t
//! u`, and the digits come out in an unusual order: the digest is read as one little-endian
//! integer and printed most significant 5-bit group first. A 20-byte digest is exactly 32
//! digits (160 bits); other sizes leave spare high bits in the first digit, which a reader must
//! find zero (`printHash32` / the base-32 branch of `Hash::Hash(std::string_view, ...)`).

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use crate::error::ProtoError;

/// The hash algorithms Nix knows (`parseHashType` in `src/libutil/hash.cc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashAlgo {
    /// MD5, 16 bytes. Only seen in old fixed-output derivations.
    Md5,
    /// SHA-1, 20 bytes.
    Sha1,
    /// SHA-256, 32 bytes: NAR hashes and nearly every fixed-output hash.
    Sha256,
    /// SHA-512, 64 bytes.
    Sha512,
}

impl HashAlgo {
    /// Every algorithm, in Nix's order.
    pub const ALL: [HashAlgo; 4] = [
        HashAlgo::Md5,
        HashAlgo::Sha1,
        HashAlgo::Sha256,
        HashAlgo::Sha512,
    ];

    /// Digest size in bytes.
    pub const fn digest_len(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// Length of the base16 form.
    pub const fn base16_len(self) -> usize {
        self.digest_len() * 2
    }

    /// Length of the nix32 form: `(bits - 1) / 5 + 1` (`Hash::base32Len`).
    pub const fn nix32_len(self) -> usize {
        nix32_len(self.digest_len())
    }

    /// Length of the padded base64 form (`Hash::base64Len`).
    pub const fn base64_len(self) -> usize {
        self.digest_len().div_ceil(3) * 4
    }

    /// The name Nix prints: `md5`, `sha1`, `sha256`, `sha512`.
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Parses a name as [`HashAlgo::name`] prints it. Case-sensitive, as in Nix.
    pub fn from_name(s: &str) -> Option<Self> {
        HashAlgo::ALL.into_iter().find(|a| a.name() == s)
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HashAlgo::from_name(s).ok_or_else(|| {
            ProtoError::invalid("hash algorithm", format!("unknown hash algorithm {s:?}"))
        })
    }
}

/// Largest digest we store (SHA-512).
const MAX_DIGEST: usize = 64;

/// A digest together with its algorithm.
///
/// Stored inline (no allocation) so it is `Copy`; bytes past the algorithm's digest length are
/// always zero, which keeps the derived equality and ordering meaningful.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash {
    algo: HashAlgo,
    digest: [u8; MAX_DIGEST],
}

impl Hash {
    /// A hash from raw digest bytes; `None` when the length does not match the algorithm.
    pub fn from_digest(algo: HashAlgo, digest: &[u8]) -> Option<Self> {
        if digest.len() != algo.digest_len() {
            return None;
        }
        let mut out = [0u8; MAX_DIGEST];
        out.get_mut(..digest.len())?.copy_from_slice(digest);
        Some(Self { algo, digest: out })
    }

    /// A SHA-256 hash from its 32 digest bytes.
    pub fn sha256_from_bytes(digest: [u8; 32]) -> Self {
        let mut out = [0u8; MAX_DIGEST];
        out[..32].copy_from_slice(&digest);
        Self {
            algo: HashAlgo::Sha256,
            digest: out,
        }
    }

    /// The SHA-256 of `data`, computed in one go.
    pub fn sha256_of(data: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(data);
        h.finish()
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest bytes (exactly [`HashAlgo::digest_len`] of them).
    pub fn digest(&self) -> &[u8] {
        let n = self.algo.digest_len();
        self.digest.get(..n).unwrap_or(&self.digest)
    }

    /// Parses any hash string a Nix reader accepts (`Hash::parseAny`, NixOS/nix@2.8.0
    /// `src/libutil/hash.cc`):
    ///
    /// * `<algo>:<digest>` with the digest in base16, nix32 or base64, told apart by length;
    /// * SRI `<algo>-<base64>`;
    /// * a bare digest, whose algorithm then comes from `expected`.
    ///
    /// As in Nix, `expected` is the algorithm the context requires: a prefixed hash of another
    /// algorithm is rejected, and a bare hash without `expected` is an error. Base16 accepts
    /// upper-case digits, like Nix.
    pub fn parse(s: &str, expected: Option<HashAlgo>) -> Result<Self, ProtoError> {
        Self::parse_field(s, expected, "hash")
    }

    /// [`Hash::parse`], naming `field` in the error.
    pub fn parse_field(
        s: &str,
        expected: Option<HashAlgo>,
        field: &'static str,
    ) -> Result<Self, ProtoError> {
        let bad = |reason: String| ProtoError::invalid(field, format!("hash {s:?}: {reason}"));
        // Nix looks for ':' first and only then for '-': base64 has no '-', nix32 and base16
        // have neither, so the split is unambiguous.
        let (prefix, rest, sri) = if let Some((p, r)) = s.split_once(':') {
            (Some(p), r, false)
        } else if let Some((p, r)) = s.split_once('-') {
            (Some(p), r, true)
        } else {
            (None, s, false)
        };
        let parsed = match prefix {
            Some(p) => Some(
                HashAlgo::from_name(p)
                    .ok_or_else(|| bad(format!("unknown hash algorithm {p:?}")))?,
            ),
            None => None,
        };
        let algo = match (parsed, expected) {
            (Some(p), Some(e)) if p != e => {
                return Err(bad(format!("expected a {e} hash, got {p}")));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(bad("no hash algorithm given".into())),
        };
        let digest = if sri {
            decode_base64(rest).ok_or_else(|| bad("invalid SRI base64".into()))?
        } else if rest.len() == algo.base16_len() {
            decode_base16(rest).ok_or_else(|| bad("invalid base16".into()))?
        } else if rest.len() == algo.nix32_len() {
            nix32_decode(rest, algo.digest_len()).ok_or_else(|| bad("invalid nix32".into()))?
        } else if rest.len() == algo.base64_len() {
            decode_base64(rest).ok_or_else(|| bad("invalid base64".into()))?
        } else {
            return Err(bad(format!(
                "wrong length {} for a {algo} hash",
                rest.len()
            )));
        };
        Hash::from_digest(algo, &digest).ok_or_else(|| {
            bad(format!(
                "digest is {} bytes, not {}",
                digest.len(),
                algo.digest_len()
            ))
        })
    }

    /// Lower-case base16 without a prefix: what the worker protocol sends as `narHash`, and
    /// what every Nix version accepts.
    pub fn to_base16(&self) -> String {
        data_encoding::HEXLOWER.encode(self.digest())
    }

    /// nix32 without a prefix.
    pub fn to_nix32(&self) -> String {
        nix32_encode(self.digest())
    }

    /// `<algo>:<nix32>`, as the serve protocol sends `narHash` and Nix prints by default.
    pub fn to_nix32_prefixed(&self) -> String {
        format!("{}:{}", self.algo, self.to_nix32())
    }

    /// `<algo>:<base16>`.
    pub fn to_base16_prefixed(&self) -> String {
        format!("{}:{}", self.algo, self.to_base16())
    }

    /// Padded base64 without a prefix.
    pub fn to_base64(&self) -> String {
        data_encoding::BASE64.encode(self.digest())
    }

    /// SRI form `<algo>-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }
}

impl fmt::Display for Hash {
    /// `<algo>:<nix32>`, Nix's default rendering.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_nix32())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_base16_prefixed())
    }
}

impl FromStr for Hash {
    type Err = ProtoError;

    /// Parses a hash that names its algorithm (prefixed or SRI).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Hash::parse(s, None)
    }
}

/// Nix's base32 alphabet: the digits and lower-case letters without `e o t u`.
pub const NIX32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Number of nix32 characters for `bytes` bytes of digest.
pub const fn nix32_len(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        (bytes * 8 - 1) / 5 + 1
    }
}

/// Digit values by character, `NOT_NIX32` outside the alphabet (decoding is on the hot path of
/// every store path read from the wire).
const NIX32_VALUES: [u8; 256] = {
    let mut t = [NOT_NIX32; 256];
    let mut i: u8 = 0;
    while (i as usize) < NIX32_ALPHABET.len() {
        t[NIX32_ALPHABET[i as usize] as usize] = i;
        i += 1;
    }
    t
};
const NOT_NIX32: u8 = 0xff;

/// Value of one nix32 digit, `None` for characters outside the alphabet.
pub fn nix32_digit(c: u8) -> Option<u8> {
    let v = match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'd' => c - b'a' + 10,
        b'f'..=b'n' => c - b'f' + 14,
        b'p'..=b's' => c - b'p' + 23,
        b'v'..=b'z' => c - b'v' + 27,
        _ => return None,
    };
    Some(v)
}

/// Bits `5n .. 5n+5` of `bytes` read as a little-endian integer.
fn nix32_group(bytes: &[u8], n: usize) -> u8 {
    let b = n * 5;
    let i = b / 8;
    let j = b % 8;
    let lo = bytes.get(i).copied().unwrap_or(0);
    let hi = bytes.get(i + 1).copied().unwrap_or(0);
    let pair = u16::from_le_bytes([lo, hi]);
    let [v, _] = (pair >> j).to_le_bytes();
    v & 0x1f
}

/// Encodes `bytes` in nix32 (`printHash32`): the most significant 5-bit group first.
pub fn nix32_encode(bytes: &[u8]) -> String {
    let len = nix32_len(bytes.len());
    let mut s = String::with_capacity(len);
    for n in (0..len).rev() {
        let d = usize::from(nix32_group(bytes, n));
        s.push(char::from(NIX32_ALPHABET[d]));
    }
    s
}

/// Decodes a nix32 string into exactly `out_len` bytes. `None` when the length is not
/// [`nix32_len`]`(out_len)`, a character is outside the alphabet, or the spare high bits of the
/// first digit are set (Nix rejects those too, so every digest has exactly one spelling).
pub fn nix32_decode(s: &str, out_len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; out_len];
    nix32_decode_into(s.as_bytes(), &mut out)?;
    Some(out)
}

/// [`nix32_decode`] into a caller-provided buffer (no allocation; used for store path hashes).
pub fn nix32_decode_into(s: &[u8], out: &mut [u8]) -> Option<()> {
    if s.len() != nix32_len(out.len()) {
        return None;
    }
    // The last character is the least significant digit: shift digits into a bit buffer from
    // the end and emit whole bytes as they fill up.
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut bytes = out.iter_mut();
    for &c in s.iter().rev() {
        let digit = NIX32_VALUES[usize::from(c)];
        if digit == NOT_NIX32 {
            return None;
        }
        acc |= u32::from(digit) << bits;
        bits += 5;
        if bits >= 8 {
            *bytes.next()? = acc.to_le_bytes()[0];
            acc >>= 8;
            bits -= 8;
        }
    }
    // Bits left over past the last byte must be zero, or the string is not canonical.
    (bytes.next().is_none() && acc == 0).then_some(())
}

/// Base16 decoding accepting both cases, like Nix's `parseHexDigit`.
fn decode_base16(s: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER_PERMISSIVE.decode(s.as_bytes()).ok()
}

/// Base64 decoding, padded or not (SRI strings in the wild come both ways).
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    data_encoding::BASE64
        .decode(s.as_bytes())
        .or_else(|_| data_encoding::BASE64_NOPAD.decode(s.as_bytes()))
        .ok()
}

/// Streaming SHA-256, producing a [`Hash`]. Uses the CPU's SHA extensions when present (the
/// `sha2` crate detects them at run time), which is what lets NAR hashing run at memory speed.
#[derive(Clone, Default)]
pub struct Sha256(sha2::Sha256);

impl Sha256 {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self(sha2::Sha256::new())
    }

    /// Adds `data`. Pass large slices: the per-call cost is small but not zero.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The hash of everything added so far.
    pub fn finish(self) -> Hash {
        let digest: [u8; 32] = self.0.finalize().into();
        Hash::sha256_from_bytes(digest)
    }

    /// The hash of everything added so far, leaving the hasher usable.
    pub fn current(&self) -> Hash {
        self.clone().finish()
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sha256")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_digits_round_trip() {
        for (i, &c) in NIX32_ALPHABET.iter().enumerate() {
            assert_eq!(nix32_digit(c).map(usize::from), Some(i));
        }
        for c in [b'e', b'o', b't', b'u', b'A', b'-', 0] {
            assert_eq!(nix32_digit(c), None);
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(HashAlgo::Md5.nix32_len(), 26);
        assert_eq!(HashAlgo::Sha1.nix32_len(), 32);
        assert_eq!(HashAlgo::Sha256.nix32_len(), 52);
        assert_eq!(HashAlgo::Sha512.nix32_len(), 103);
        assert_eq!(HashAlgo::Sha256.base64_len(), 44);
        assert_eq!(HashAlgo::Sha512.base64_len(), 88);
        assert_eq!(HashAlgo::Md5.base64_len(), 24);
        assert_eq!(HashAlgo::Sha1.base64_len(), 28);
    }
}
