//! Protocol versions as the Nix peers encode them: `(major << 8) | minor` in one `u64`.

use std::fmt;

/// A serve or worker protocol version. Ordered major first, then minor, so comparisons never
/// look at the minor number alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    /// Major number: 2 for serve, 1 for worker.
    pub major: u8,
    /// Minor number: the one that gates fields.
    pub minor: u8,
}

impl ProtocolVersion {
    /// Builds a version from its parts.
    pub const fn new(major: u8, minor: u8) -> Self {
        Self { major, minor }
    }

    /// Decodes the wire form. The wire word is 64 bits but only 16 carry meaning; anything
    /// above is reported as `None` so the caller can name the peer as malformed.
    pub fn from_wire(word: u64) -> Option<Self> {
        if word > 0xffff {
            return None;
        }
        let major = u8::try_from(word >> 8).ok()?;
        let minor = u8::try_from(word & 0xff).ok()?;
        Some(Self { major, minor })
    }

    /// The wire form.
    pub const fn to_wire(self) -> u64 {
        ((self.major as u64) << 8) | self.minor as u64
    }

    /// The negotiated version: Nix peers gate fields on the lower of the two.
    pub fn negotiate(self, theirs: Self) -> Self {
        self.min(theirs)
    }

    /// The version to speak with a peer that announced `theirs`: refused when its major
    /// differs from ours or it is older than `min`.
    pub fn negotiate_checked(
        self,
        theirs: Self,
        min: Self,
    ) -> Result<Self, crate::error::Incompatible> {
        if theirs.major != self.major {
            return Err(crate::error::Incompatible::MajorVersion { ours: self, theirs });
        }
        if theirs < min {
            return Err(crate::error::Incompatible::TooOld { min, theirs });
        }
        Ok(self.negotiate(theirs))
    }

    /// True when this version has the feature introduced at `major.minor`.
    pub fn at_least(self, major: u8, minor: u8) -> bool {
        self >= Self::new(major, minor)
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_and_order() {
        let v = ProtocolVersion::from_wire(0x122).expect("valid");
        assert_eq!(v, ProtocolVersion::new(1, 34));
        assert_eq!(v.to_wire(), 0x122);
        assert!(ProtocolVersion::new(2, 0) > ProtocolVersion::new(1, 38));
        assert_eq!(
            ProtocolVersion::new(1, 38).negotiate(ProtocolVersion::new(1, 34)),
            ProtocolVersion::new(1, 34)
        );
        assert_eq!(ProtocolVersion::from_wire(1 << 40), None);
        assert_eq!(v.to_string(), "1.34");
    }
}
