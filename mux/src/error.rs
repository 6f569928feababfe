//! The one error type of nixmux.
//!
//! Whatever protocol a builder speaks and whichever layer failed, the scheduler gets an
//! [`Error`] with: what went wrong ([`ErrorKind`]), who is to blame ([`Initiator`]: the caller,
//! nixmux or the local machine, or the builder), which builder, whether retrying can help, and
//! a sentence saying what to do about it when we know.

use std::fmt;

use nixmux_session::SessionError;
use nixmux_transport::{ErrorKind as TErr, TransportError};

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The builder's configuration is unusable (bad URL, unreadable key file...).
    Config,
    /// The builder could not be reached (DNS, TCP refused, no route).
    Connect,
    /// The builder's host key is unknown, mismatched or revoked.
    HostKey,
    /// The builder refused our keys.
    Auth,
    /// The remote program (`nix-store` / `nix-daemon`) was not found on the builder.
    RemoteCommandMissing,
    /// The builder speaks something we cannot use (version, magic, garbage).
    Protocol,
    /// The builder's Nix refused because the remote user is not trusted.
    NotTrusted,
    /// The builder's Nix reported an error for the operation.
    Remote,
    /// A build could not be run at all (as opposed to a failed build, which is a result).
    BuildFailed,
    /// A wait exceeded its bound.
    TimedOut,
    /// The connection to the builder was lost.
    Disconnected,
    /// The operation was cancelled.
    Cancelled,
    /// No session became free within the acquire timeout.
    PoolExhausted,
    /// The operation is not available on this builder (protocol version, or Lix refusing CA
    /// operations).
    Unsupported,
    /// Data did not match its metadata (NAR hash or size).
    Verification,
    /// The local store (the machine nixmux runs on) failed.
    LocalStore,
    /// The caller passed something invalid.
    InvalidInput,
    /// No builder of the pool can ever take the derivation (system, features).
    NoSuitableBuilder,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Config => "configuration",
            ErrorKind::Connect => "connect",
            ErrorKind::HostKey => "host key",
            ErrorKind::Auth => "authentication",
            ErrorKind::RemoteCommandMissing => "remote command missing",
            ErrorKind::Protocol => "protocol",
            ErrorKind::NotTrusted => "not trusted",
            ErrorKind::Remote => "remote error",
            ErrorKind::BuildFailed => "build failed",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::PoolExhausted => "pool exhausted",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Verification => "verification",
            ErrorKind::LocalStore => "local store",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::NoSuitableBuilder => "no suitable builder",
        })
    }
}

/// Who is to blame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Initiator {
    /// The code calling nixmux (bad arguments, cancellation).
    Caller,
    /// nixmux itself or the machine it runs on (local store, local config, a bug).
    Local,
    /// The builder: its network, sshd, Nix, or configuration.
    Builder,
}

impl fmt::Display for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Initiator::Caller => "caller",
            Initiator::Local => "local",
            Initiator::Builder => "builder",
        })
    }
}

/// A nixmux error. Cloneable, so that one failure (a connection attempt, say) can be handed
/// to every caller that was waiting on it.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    initiator: Initiator,
    builder: Option<String>,
    retryable: bool,
    message: String,
    hint: Option<String>,
    source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, initiator: Initiator, message: impl Into<String>) -> Self {
        Error {
            kind,
            initiator,
            builder: None,
            retryable: matches!(
                kind,
                ErrorKind::Connect
                    | ErrorKind::TimedOut
                    | ErrorKind::Disconnected
                    | ErrorKind::PoolExhausted
            ),
            message: message.into(),
            hint: None,
            source: None,
        }
    }

    /// Names the builder.
    pub fn on(mut self, builder: impl Into<String>) -> Self {
        if self.builder.is_none() {
            self.builder = Some(builder.into());
        }
        self
    }

    /// Adds what to do about it.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Overrides retryability.
    pub fn retryable(mut self, yes: bool) -> Self {
        self.retryable = yes;
        self
    }

    /// Attaches the underlying error.
    pub fn caused_by(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(std::sync::Arc::new(e));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Who is to blame.
    pub fn initiator(&self) -> Initiator {
        self.initiator
    }

    /// The builder, when the error concerns one.
    pub fn builder(&self) -> Option<&str> {
        self.builder.as_deref()
    }

    /// Whether trying again (possibly on another connection) can help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message without builder name or hint.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What to do about it, when known.
    pub fn hint_text(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// The underlying transport error, if any (e.g. for the host-key report).
    pub fn transport_error(&self) -> Option<&TransportError> {
        self.source.as_ref().and_then(|s| s.downcast_ref())
    }

    /// The underlying session error, if any.
    pub fn session_error(&self) -> Option<&SessionError> {
        self.source.as_ref().and_then(|s| s.downcast_ref())
    }

    pub(crate) fn local(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::new(kind, Initiator::Local, message)
    }

    pub(crate) fn remote(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::new(kind, Initiator::Builder, message)
    }

    pub(crate) fn caller(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::new(kind, Initiator::Caller, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(b) = &self.builder {
            write!(f, "{b}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " ({h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// The result type of nixmux.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        let (kind, initiator) = match e.kind() {
            TErr::Config => (ErrorKind::Config, Initiator::Local),
            TErr::Unreachable => (ErrorKind::Connect, Initiator::Builder),
            TErr::Timeout => (ErrorKind::TimedOut, Initiator::Builder),
            TErr::HostKey => (ErrorKind::HostKey, Initiator::Builder),
            TErr::Auth => (ErrorKind::Auth, Initiator::Builder),
            TErr::ChannelOpenRefused => (ErrorKind::Connect, Initiator::Builder),
            TErr::ExecRejected => (ErrorKind::RemoteCommandMissing, Initiator::Builder),
            TErr::Disconnected | TErr::ChannelClosed => {
                (ErrorKind::Disconnected, Initiator::Builder)
            }
            TErr::Protocol => (ErrorKind::Protocol, Initiator::Builder),
            _ => (ErrorKind::Connect, Initiator::Builder),
        };
        let retryable = e.is_retryable();
        Error::new(kind, initiator, e.to_string())
            .retryable(retryable)
            .caused_by(e)
    }
}

/// Turns a session error into an [`Error`]. A trust refusal becomes
/// [`ErrorKind::NotTrusted`] with the fix, whichever protocol reported it: the worker protocol
/// as a `STDERR_ERROR`, the serve protocol as its stderr when the server died.
pub(crate) fn from_session(e: SessionError) -> Error {
    let msg = e.to_string();
    let remote_text = match &e {
        SessionError::Remote(r) => Some(r.plain_message()),
        SessionError::Closed { explanation, .. } => explanation.clone(),
        _ => None,
    };
    if let Some(text) = &remote_text {
        if is_trust_refusal(text) {
            return Error::remote(ErrorKind::NotTrusted, msg)
                .hint(TRUST_HINT)
                .caused_by(e);
        }
        if matches!(e, SessionError::Remote(_)) && text.contains("ca derivations are not supported")
        {
            return Error::remote(ErrorKind::Unsupported, msg).caused_by(e);
        }
    }
    let (kind, initiator) = match &e {
        SessionError::Closed { .. } | SessionError::Io { .. } => {
            (ErrorKind::Disconnected, Initiator::Builder)
        }
        SessionError::Remote(_) | SessionError::RemoteStopped => {
            (ErrorKind::Remote, Initiator::Builder)
        }
        SessionError::Unsupported(_) => (ErrorKind::Unsupported, Initiator::Builder),
        SessionError::Timeout { .. } => (ErrorKind::TimedOut, Initiator::Builder),
        SessionError::Sink(_) | SessionError::Source(_) => {
            (ErrorKind::LocalStore, Initiator::Local)
        }
        SessionError::NarMismatch { .. } => (ErrorKind::Verification, Initiator::Builder),
        // The builder hashed what we sent; our NAR did not match our own record.
        SessionError::UploadMismatch { .. } => (ErrorKind::Verification, Initiator::Local),
        SessionError::Poisoned => (ErrorKind::Protocol, Initiator::Local),
        _ => (ErrorKind::Protocol, Initiator::Builder),
    };
    // Retryability follows the kind (see `Error::new`).
    Error::new(kind, initiator, msg).caused_by(e)
}

/// What fixes a trust refusal, whichever protocol reported it.
pub(crate) const TRUST_HINT: &str = "the builder's Nix does not trust this SSH user: add the user to `trusted-users` in the builder's nix.conf, or sign the paths and add the key to the builder's `trusted-public-keys`";

/// Whether a builder's message is Nix refusing an untrusted user.
pub(crate) fn is_trust_refusal(text: &str) -> bool {
    const PATTERNS: [&str; 5] = [
        // Newer Nix and Lix, then Nix 2.8's wording.
        "lacks a signature by a trusted key",
        "lacks a valid signature",
        "you are not privileged",
        "is not trusted",
        "not allowed to",
    ];
    PATTERNS.iter().any(|p| text.contains(p))
}
