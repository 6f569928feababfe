//! Wire primitives shared by both protocols: little-endian `u64` words, booleans, padded byte
//! strings, and counted collections.
//!
//! Decoding is resumable by restarting: a decoder runs over whatever bytes have arrived and
//! either returns a value, says how many more bytes it needs at least ([`ReadError::Incomplete`]),
//! or reports the stream corrupt ([`ReadError::Proto`]). Nothing here blocks or allocates past
//! the [`Limits`]: a length is checked against its bound *before* anything is reserved, and a
//! count is never trusted for pre-allocation beyond what the buffered bytes could hold.

use bytes::BufMut;

use crate::error::{Malformed, ProtoError};
use crate::limits::Limits;

/// Why a read stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Not enough bytes yet; at least `needed` more must arrive before retrying makes sense.
    Incomplete {
        /// Lower bound on the number of missing bytes.
        needed: usize,
    },
    /// The stream is corrupt or the peer misbehaved; it cannot be resumed.
    Proto(ProtoError),
}

impl From<ProtoError> for ReadError {
    fn from(e: ProtoError) -> Self {
        ReadError::Proto(e)
    }
}

/// Result of a primitive read.
pub type ReadResult<T> = Result<T, ReadError>;

/// Runs `decode` over `buf`. Returns the value and the number of bytes it used, `None` when more
/// bytes are needed, or the fatal error.
pub fn try_decode<T>(
    buf: &[u8],
    limits: &Limits,
    decode: impl FnOnce(&mut WireReader<'_>) -> ReadResult<T>,
) -> Result<Option<(T, usize)>, ProtoError> {
    let mut r = WireReader::new(buf, limits);
    match decode(&mut r) {
        Ok(v) => Ok(Some((v, r.position()))),
        Err(ReadError::Incomplete { .. }) => Ok(None),
        Err(ReadError::Proto(e)) => Err(e),
    }
}

/// Like [`try_decode`], but also reports the minimum number of missing bytes, so a driver can
/// wait for at least that much before trying again (keeps decoding of large replies linear).
pub fn try_decode_hint<T>(
    buf: &[u8],
    limits: &Limits,
    decode: impl FnOnce(&mut WireReader<'_>) -> ReadResult<T>,
) -> Result<Result<(T, usize), usize>, ProtoError> {
    let mut r = WireReader::new(buf, limits);
    match decode(&mut r) {
        Ok(v) => Ok(Ok((v, r.position()))),
        Err(ReadError::Incomplete { needed }) => Ok(Err(needed)),
        Err(ReadError::Proto(e)) => Err(e),
    }
}

/// Number of zero bytes that follow a string of `len` bytes.
pub const fn padding(len: u64) -> u64 {
    (8 - len % 8) % 8
}

/// [`padding`] for in-memory lengths.
pub const fn padding_usize(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// Reads wire values from a byte slice that may end early.
#[derive(Debug)]
pub struct WireReader<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: &'a Limits,
}

impl<'a> WireReader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8], limits: &'a Limits) -> Self {
        Self {
            buf,
            pos: 0,
            limits,
        }
    }

    /// The limits this reader enforces.
    pub fn limits(&self) -> &'a Limits {
        self.limits
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not consumed yet.
    pub fn remaining(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Takes exactly `n` raw bytes.
    pub fn read_raw(&mut self, n: usize) -> ReadResult<&'a [u8]> {
        let avail = self.buf.len() - self.pos;
        if avail < n {
            return Err(ReadError::Incomplete { needed: n - avail });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// One little-endian 64-bit word.
    pub fn read_u64(&mut self) -> ReadResult<u64> {
        let raw = self.read_raw(8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(raw);
        Ok(u64::from_le_bytes(word))
    }

    /// A handshake greeting: `expected` magic, then a protocol version word. A wrong magic is
    /// the peer misbehaving (often a shell printing text before the program starts).
    pub fn read_hello(
        &mut self,
        expected: u64,
        field: &'static str,
    ) -> ReadResult<crate::version::ProtocolVersion> {
        let got = self.read_u64()?;
        if got != expected {
            return Err(
                ProtoError::from(crate::error::Misbehaved::WrongMagic { expected, got }).into(),
            );
        }
        let word = self.read_u64()?;
        crate::version::ProtocolVersion::from_wire(word)
            .ok_or_else(|| ProtoError::invalid(field, format!("{word:#x}")).into())
    }

    /// A word converted into a narrower integer; a value that does not fit is malformed.
    pub fn read_int<T: TryFrom<u64>>(&mut self, field: &'static str) -> ReadResult<T> {
        let v = self.read_u64()?;
        T::try_from(v).map_err(|_| {
            ReadError::Proto(ProtoError::Malformed {
                field,
                kind: Malformed::OutOfRange(v),
            })
        })
    }

    /// A boolean. Writers send 0 or 1; like Nix, any non-zero word reads as true.
    pub fn read_bool(&mut self) -> ReadResult<bool> {
        Ok(self.read_u64()? != 0)
    }

    /// A signed time value sent as a word; Nix never sends values above `i64::MAX`.
    pub fn read_time(&mut self, field: &'static str) -> ReadResult<i64> {
        self.read_int::<i64>(field)
    }

    /// A length-prefixed, zero-padded byte string of at most `max` bytes.
    pub fn read_bytes_max(&mut self, field: &'static str, max: u64) -> ReadResult<&'a [u8]> {
        let len = self.read_u64()?;
        if len > max {
            return Err(ProtoError::Malformed {
                field,
                kind: Malformed::TooLong { len, max },
            }
            .into());
        }
        // `len <= max` and limits are far below usize::MAX on 64-bit targets; still convert
        // checked so a 32-bit build cannot truncate.
        let n = usize::try_from(len).map_err(|_| {
            ReadError::Proto(ProtoError::Malformed {
                field,
                kind: Malformed::TooLong { len, max },
            })
        })?;
        let pad = padding_usize(n);
        let avail = self.buf.len() - self.pos;
        if avail < n + pad {
            return Err(ReadError::Incomplete {
                needed: n + pad - avail,
            });
        }
        let data = &self.buf[self.pos..self.pos + n];
        let padding_bytes = &self.buf[self.pos + n..self.pos + n + pad];
        if padding_bytes.iter().any(|&b| b != 0) {
            return Err(ProtoError::Malformed {
                field,
                kind: Malformed::NonZeroPadding,
            }
            .into());
        }
        self.pos += n + pad;
        Ok(data)
    }

    /// A byte string bounded by [`Limits::max_string`].
    pub fn read_bytes(&mut self, field: &'static str) -> ReadResult<&'a [u8]> {
        self.read_bytes_max(field, self.limits.max_string)
    }

    /// A byte string that must be UTF-8 (store paths, option names, hash strings...).
    pub fn read_string(&mut self, field: &'static str) -> ReadResult<String> {
        let bytes = self.read_bytes(field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ProtoError::invalid(field, "not UTF-8").into())
    }

    /// A byte string decoded leniently: log lines and error texts are arbitrary bytes.
    pub fn read_text(&mut self, field: &'static str, max: u64) -> ReadResult<String> {
        let bytes = self.read_bytes_max(field, max)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// A collection count, checked against [`Limits::max_list`].
    pub fn read_count(&mut self, field: &'static str) -> ReadResult<usize> {
        let n = self.read_u64()?;
        let max = self.limits.max_list;
        if n > max {
            return Err(ProtoError::Malformed {
                field,
                kind: Malformed::TooLong { len: n, max },
            }
            .into());
        }
        usize::try_from(n).map_err(|_| {
            ProtoError::Malformed {
                field,
                kind: Malformed::TooLong { len: n, max },
            }
            .into()
        })
    }

    /// A counted list of `T`. Capacity is reserved only for as many elements as the buffered
    /// bytes could possibly hold (each element is at least one word), never for the count alone.
    pub fn read_list<T>(
        &mut self,
        field: &'static str,
        mut item: impl FnMut(&mut Self) -> ReadResult<T>,
    ) -> ReadResult<Vec<T>> {
        let n = self.read_count(field)?;
        let plausible = (self.buf.len() - self.pos) / 8;
        let mut out = Vec::with_capacity(n.min(plausible));
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }

    /// A counted list of UTF-8 strings.
    pub fn read_string_list(&mut self, field: &'static str) -> ReadResult<Vec<String>> {
        self.read_list(field, |r| r.read_string(field))
    }
}

/// Writing wire values into any [`BufMut`] (a `BytesMut`, a `Vec<u8>`).
pub trait WireWrite: BufMut {
    /// One little-endian 64-bit word.
    fn put_word(&mut self, v: u64) {
        self.put_u64_le(v);
    }

    /// A boolean as 0 or 1.
    fn put_flag(&mut self, v: bool) {
        self.put_u64_le(u64::from(v));
    }

    /// A signed time; negative values are clamped to 0 because C++ readers reject them.
    fn put_time(&mut self, t: i64) {
        self.put_u64_le(u64::try_from(t).unwrap_or(0));
    }

    /// A length-prefixed byte string with zero padding to a multiple of 8.
    fn put_bytes_padded(&mut self, data: &[u8]) {
        self.put_u64_le(data.len() as u64);
        self.put_slice(data);
        self.put_bytes(0, padding_usize(data.len()));
    }

    /// A string (same layout as bytes).
    fn put_str(&mut self, s: &str) {
        self.put_bytes_padded(s.as_bytes());
    }

    /// A counted list of strings.
    fn put_str_list<I, S>(&mut self, items: I)
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: ExactSizeIterator,
        S: AsRef<str>,
    {
        let it = items.into_iter();
        self.put_u64_le(it.len() as u64);
        for s in it {
            self.put_str(s.as_ref());
        }
    }
}

impl<B: BufMut + ?Sized> WireWrite for B {}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits::DEFAULT;

    #[test]
    fn bool_any_nonzero_is_true() {
        let bytes = [0x12, 0x34, 0x56, 0, 0, 0, 0, 0];
        let v = try_decode(&bytes, &L, |r| r.read_bool()).expect("ok");
        assert_eq!(v, Some((true, 8)));
    }

    #[test]
    fn string_round_trip_with_padding() {
        let mut buf = Vec::new();
        buf.put_str("hello");
        assert_eq!(buf.len(), 16);
        assert_eq!(&buf[8..13], b"hello");
        let v = try_decode(&buf, &L, |r| r.read_string("s")).expect("ok");
        assert_eq!(v, Some(("hello".to_owned(), 16)));
        buf.clear();
        buf.put_str("");
        assert_eq!(buf, [0u8; 8]);
    }

    #[test]
    fn short_input_asks_for_the_missing_bytes() {
        let mut buf = Vec::new();
        buf.put_str("hello world!");
        let cut = &buf[..12];
        let v = try_decode_hint(cut, &L, |r| r.read_string("s")).expect("not corrupt");
        assert_eq!(v, Err(24 - 12));
    }

    #[test]
    fn nonzero_padding_is_rejected() {
        let mut buf = Vec::new();
        buf.put_str("abc");
        buf[12] = 1;
        let e = try_decode(&buf, &L, |r| r.read_string("s")).expect_err("corrupt");
        assert!(matches!(
            e,
            ProtoError::Malformed {
                kind: Malformed::NonZeroPadding,
                ..
            }
        ));
    }

    #[test]
    fn huge_length_is_refused_before_allocation() {
        let mut buf = Vec::new();
        buf.put_word(1 << 63);
        let e =
            try_decode(&buf, &L, |r| r.read_bytes("s").map(<[u8]>::to_vec)).expect_err("too long");
        assert!(matches!(
            e,
            ProtoError::Malformed {
                kind: Malformed::TooLong { .. },
                ..
            }
        ));
        let e = try_decode(&buf, &L, |r| r.read_string_list("l")).expect_err("too many");
        assert!(matches!(
            e,
            ProtoError::Malformed {
                kind: Malformed::TooLong { .. },
                ..
            }
        ));
    }

    #[test]
    fn narrow_integer_out_of_range() {
        let mut buf = Vec::new();
        buf.put_word(u64::from(u32::MAX) + 1);
        let e = try_decode(&buf, &L, |r| r.read_int::<u32>("f")).expect_err("range");
        assert!(matches!(
            e,
            ProtoError::Malformed {
                kind: Malformed::OutOfRange(_),
                ..
            }
        ));
    }
}
