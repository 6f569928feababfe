//! Typed protocol errors.
//!
//! Three families, following rustls' split, so a caller can tell "the bytes are broken" from
//! "this peer is too old" from "the peer said something legal at the wrong moment":
//!
//! * [`ProtoError::Malformed`]: bytes that do not parse (bad padding, invalid store path,
//!   a length over its limit).
//! * [`ProtoError::Incompatible`]: a peer that speaks a protocol or version we cannot use.
//! * [`ProtoError::Misbehaved`]: well-formed values in a sequence the protocol forbids (wrong
//!   magic, unknown stderr code).
//!
//! Errors the *remote* reports on purpose (a worker `STDERR_ERROR`, a failed build) are not
//! protocol errors: they are values ([`crate::worker::RemoteError`], build results).
//! Any `ProtoError` means the byte stream can no longer be trusted: the session that saw it
//! must be closed, never reused.

use crate::version::ProtocolVersion;

/// A fatal protocol error. The session that produced it is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The peer sent bytes that do not decode.
    #[error("malformed {field}: {kind}")]
    Malformed {
        /// Which field was being decoded, e.g. `"QueryPathInfos.narHash"`.
        field: &'static str,
        /// What was wrong with it.
        kind: Malformed,
    },
    /// The peer speaks something we cannot use.
    #[error("incompatible peer: {0}")]
    Incompatible(#[from] Incompatible),
    /// The peer sent valid values in a sequence the protocol does not allow.
    #[error("peer misbehaved: {0}")]
    Misbehaved(#[from] Misbehaved),
}

/// What was wrong with a malformed field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// A length prefix above the configured [`crate::Limits`].
    #[error("length {len} exceeds the limit of {max}")]
    TooLong {
        /// Length announced by the peer.
        len: u64,
        /// The configured bound.
        max: u64,
    },
    /// Padding after a string was not all zero bytes (Nix rejects this too).
    #[error("non-zero padding")]
    NonZeroPadding,
    /// An integer that does not fit the field's range.
    #[error("value {0} out of range")]
    OutOfRange(u64),
    /// Any other invalid content, with a human-readable reason.
    #[error("{0}")]
    Invalid(String),
}

/// Why a peer cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Incompatible {
    /// Major protocol version differs from ours.
    #[error("protocol major version {theirs} is not {ours}")]
    MajorVersion {
        /// What we speak.
        ours: ProtocolVersion,
        /// What the peer announced.
        theirs: ProtocolVersion,
    },
    /// The peer's version is below the oldest we support.
    #[error("protocol version {theirs} is older than the oldest supported, {min}")]
    TooOld {
        /// Oldest version this crate supports for that protocol.
        min: ProtocolVersion,
        /// What the peer announced.
        theirs: ProtocolVersion,
    },
    /// The operation needs a newer negotiated version than this session has.
    #[error("{op} needs protocol {needs}, this session negotiated {negotiated}")]
    OperationUnsupported {
        /// Operation name.
        op: &'static str,
        /// Minimum version the operation needs.
        needs: ProtocolVersion,
        /// Version this session negotiated.
        negotiated: ProtocolVersion,
    },
    /// The request cannot be expressed with the features this session negotiated (e.g. a
    /// hash-modulo realisation id once `realisation-with-path-not-hash` is on, or a
    /// derivation-path id without it).
    #[error("{op} cannot be sent on this session: {reason}")]
    FeatureMismatch {
        /// Operation name.
        op: &'static str,
        /// Why not.
        reason: &'static str,
    },
}

/// A peer that sent legal values at the wrong time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Misbehaved {
    /// The first word from the server was not the protocol's magic: often a login shell that
    /// prints text, or a remote program that is not Nix.
    #[error("wrong magic {got:#x}, expected {expected:#x}")]
    WrongMagic {
        /// What we expected.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// A worker `STDERR_*` code we do not know.
    #[error("unknown stderr message code {0:#x}")]
    UnknownStderrCode(u64),
    /// A message that is valid in the protocol but not here.
    #[error("unexpected {0}")]
    Unexpected(String),
    /// Data after the end of a self-delimiting structure, or a reply that does not match the
    /// request (e.g. more results than paths asked for).
    #[error("{0}")]
    Inconsistent(String),
}

impl ProtoError {
    /// Shorthand for a malformed field with a free-text reason.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ProtoError::Malformed {
            field,
            kind: Malformed::Invalid(reason.into()),
        }
    }
}
