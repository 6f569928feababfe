//! [`TransportError`]: every failure of this crate, classified by meaning and by stage.
//!
//! russh reports failures through one flat enum of about forty variants, and for an
//! established connection the real cause (keepalive timeout, reset, DISCONNECT from the peer)
//! is only visible to whoever joins its session task; every other caller sees "channel send
//! error". This module turns both into one answer: *what* went wrong ([`ErrorKind`]), *when*
//! ([`Stage`]) and whether trying again can help ([`TransportError::is_retryable`]).
//! `russh::Error` never appears in this crate's API.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::host_key::HostKeyReport;

/// The step of connecting or using a connection at which something failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stage {
    /// Checking the configuration, loading known_hosts files and key files.
    Setup,
    /// Turning the host name into addresses.
    Resolve,
    /// The TCP connect to one of the resolved addresses.
    TcpConnect,
    /// SSH banner exchange and key exchange, up to and including the host key check.
    Handshake,
    /// Host key verification (inside the handshake, before any authentication).
    HostKey,
    /// User authentication.
    Auth,
    /// Opening a channel on an established connection.
    ChannelOpen,
    /// Sending the exec request and waiting for the server's answer.
    Exec,
    /// An established connection or channel in use.
    Connected,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Setup => "setup",
            Stage::Resolve => "resolve",
            Stage::TcpConnect => "TCP connect",
            Stage::Handshake => "SSH handshake",
            Stage::HostKey => "host key verification",
            Stage::Auth => "authentication",
            Stage::ChannelOpen => "channel open",
            Stage::Exec => "exec request",
            Stage::Connected => "established connection",
        })
    }
}

/// Coarse classification of a [`TransportError`], for callers that decide by category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Our own configuration is unusable (bad algorithm name, unreadable known_hosts file).
    Config,
    /// The host could not be reached (resolution or TCP), or it dropped the connection
    /// before the SSH key exchange began ([`TransportError::ClosedAtStartup`]).
    Unreachable,
    /// A stage did not finish within its timeout.
    Timeout,
    /// The server's host key was refused (unknown, mismatched or revoked).
    HostKey,
    /// The server refused every identity we offered, or an identity could not be loaded.
    Auth,
    /// The server refused to open a channel (e.g. sshd `MaxSessions`).
    ChannelOpenRefused,
    /// The server refused to run the command.
    ExecRejected,
    /// An established connection is gone.
    Disconnected,
    /// The server closed a channel (its command ended) while something still waited on it.
    ChannelClosed,
    /// The peer violated the SSH protocol or no common algorithm exists.
    Protocol,
}

/// Why an SSH connection ended. Shared by every waiter of [`crate::SshConnection::closed`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectCause {
    /// The server did not answer `keepalive_max_misses + 1` keepalives in a row (frozen host,
    /// dead link or blackholed route).
    KeepaliveTimeout {
        /// Interval between keepalives.
        interval: Duration,
        /// Unanswered keepalives tolerated before giving up.
        max_misses: usize,
    },
    /// Nothing was received for russh's inactivity timeout.
    InactivityTimeout,
    /// The server sent SSH_MSG_DISCONNECT.
    ClosedByPeer {
        /// The RFC 4253 reason code, as a name (`"ByApplication"`, `"TooManyConnections"`, ...).
        reason: String,
        /// The server's description.
        message: String,
    },
    /// The TCP stream reached end-of-file without an SSH DISCONNECT (sshd killed, network
    /// middlebox closed it).
    ConnectionClosed,
    /// The underlying stream failed (connection reset, broken pipe, ...).
    Io {
        /// The I/O error kind.
        kind: io::ErrorKind,
        /// The I/O error's text.
        message: String,
    },
    /// The SSH protocol was violated or a cryptographic check failed.
    Protocol(String),
    /// We closed it: [`crate::SshConnection::disconnect`], or a connect attempt that was
    /// abandoned after a timeout.
    Local,
    /// The session ended without telling us why (should not happen; reported rather than
    /// guessed).
    Unknown(String),
}

impl fmt::Display for DisconnectCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectCause::KeepaliveTimeout {
                interval,
                max_misses,
            } => write!(
                f,
                "server stopped answering keepalives ({} unanswered, every {:?})",
                max_misses.saturating_add(1),
                interval
            ),
            DisconnectCause::InactivityTimeout => f.write_str("inactivity timeout"),
            DisconnectCause::ClosedByPeer { reason, message } => {
                if message.is_empty() {
                    write!(f, "server disconnected ({reason})")
                } else {
                    write!(f, "server disconnected ({reason}): {message}")
                }
            }
            DisconnectCause::ConnectionClosed => {
                f.write_str("connection closed by the peer without an SSH disconnect")
            }
            DisconnectCause::Io { kind, message } => write!(f, "I/O error ({kind:?}): {message}"),
            DisconnectCause::Protocol(m) => write!(f, "SSH protocol error: {m}"),
            DisconnectCause::Local => f.write_str("closed locally"),
            DisconnectCause::Unknown(m) => write!(f, "connection ended: {m}"),
        }
    }
}

/// The reason code of a refused channel open (RFC 4254 section 5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelOpenRefusal {
    /// `SSH_OPEN_ADMINISTRATIVELY_PROHIBITED` (e.g. forwarding disabled).
    AdministrativelyProhibited,
    /// `SSH_OPEN_CONNECT_FAILED`: what OpenSSH sends when `MaxSessions` is reached, and for a
    /// direct-tcpip target that cannot be reached.
    ConnectFailed,
    /// `SSH_OPEN_UNKNOWN_CHANNEL_TYPE`.
    UnknownChannelType,
    /// `SSH_OPEN_RESOURCE_SHORTAGE`.
    ResourceShortage,
    /// Any other code.
    Other(u32),
}

impl fmt::Display for ChannelOpenRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelOpenRefusal::AdministrativelyProhibited => {
                f.write_str("administratively prohibited")
            }
            ChannelOpenRefusal::ConnectFailed => f.write_str("connect failed"),
            ChannelOpenRefusal::UnknownChannelType => f.write_str("unknown channel type"),
            ChannelOpenRefusal::ResourceShortage => f.write_str("resource shortage"),
            ChannelOpenRefusal::Other(c) => write!(f, "code {c}"),
        }
    }
}

impl ChannelOpenRefusal {
    pub(crate) fn from_russh(r: &russh::ChannelOpenFailure) -> Self {
        match r {
            russh::ChannelOpenFailure::AdministrativelyProhibited => {
                Self::AdministrativelyProhibited
            }
            russh::ChannelOpenFailure::ConnectFailed => Self::ConnectFailed,
            russh::ChannelOpenFailure::UnknownChannelType => Self::UnknownChannelType,
            russh::ChannelOpenFailure::ResourceShortage => Self::ResourceShortage,
            russh::ChannelOpenFailure::Other { code, .. } => Self::Other(*code),
        }
    }
}

/// Everything that can go wrong in this crate.
///
/// Match on variants for details, or use [`kind`](Self::kind), [`stage`](Self::stage) and
/// [`is_retryable`](Self::is_retryable) to decide what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Our configuration is unusable (unknown algorithm name, zero window, ...).
    #[error("invalid transport configuration: {0}")]
    Config(String),

    /// A known_hosts file exists but could not be read. Not skipped: it might hold the
    /// `@revoked` line that matters.
    #[error("cannot read known_hosts file {}: {io}", path.display())]
    KnownHostsRead {
        /// The file.
        path: PathBuf,
        /// The read error.
        #[source]
        io: io::Error,
    },

    /// The host name did not resolve to any address.
    #[error("cannot resolve {host}:{port}: {reason}")]
    Resolve {
        /// The name we tried to resolve.
        host: String,
        /// The port.
        port: u16,
        /// The resolver's answer.
        reason: String,
    },

    /// TCP connect failed on every resolved address; this is the last failure (all of them
    /// are logged at `debug`).
    #[error("TCP connect to {addr} failed: {io}")]
    Connect {
        /// The address of the last attempt.
        addr: SocketAddr,
        /// The connect error.
        #[source]
        io: io::Error,
    },

    /// The server ended the connection before the SSH key exchange began: it closed or
    /// reset it before sending its identification string, or right after it. OpenSSH does
    /// this to new connections beyond `MaxStartups` (`sshd.c` `drop_connection`, which first
    /// writes "Exceeded MaxStartups"; a client that already sent its own identification
    /// usually sees a reset instead); a TCP wrapper (`hosts.deny`) or a fail2ban-style block
    /// looks the same. Worth retrying with a jittered backoff: see
    /// [`is_startup_drop`](Self::is_startup_drop).
    #[error(
        "server closed the connection {} ({cause}){}: likely sshd MaxStartups throttling a \
         burst of new connections, or a TCP wrapper or fail2ban refusing this client",
        if *identification_received { "after its SSH identification, before the key exchange" }
        else { "before sending its SSH identification" },
        if server_text.is_empty() { String::new() } else { format!(", saying {server_text:?}") }
    )]
    ClosedAtStartup {
        /// How the stream ended: EOF (`ConnectionClosed`) or an I/O error such as a reset.
        cause: DisconnectCause,
        /// Whether the server's `SSH-2.0-...` line had arrived.
        identification_received: bool,
        /// Text the server sent before its identification (lines joined by `; `, at most
        /// 256 bytes), e.g. OpenSSH's `Exceeded MaxStartups`; empty if none.
        server_text: String,
    },

    /// A stage did not finish within its configured timeout.
    #[error("{stage} timed out after {after:?}")]
    Timeout {
        /// Which stage.
        stage: Stage,
        /// The timeout that elapsed.
        after: Duration,
    },

    /// The server's host key is not in any known_hosts file (Strict policy), refused inside
    /// the key exchange before authentication.
    #[error("{0}")]
    HostKeyUnknown(Box<HostKeyReport>),

    /// known_hosts or the machines file holds a different key of this type for the host:
    /// possibly a man-in-the-middle, or the host was reinstalled.
    #[error("{0}")]
    HostKeyMismatch(Box<HostKeyReport>),

    /// The server's key is marked `@revoked` for this host.
    #[error("{0}")]
    HostKeyRevoked(Box<HostKeyReport>),

    /// Policy AcceptNew could not append the new key to its file.
    #[error("cannot record new host key in {}: {io}", path.display())]
    HostKeyLearn {
        /// The file.
        path: PathBuf,
        /// The write error.
        #[source]
        io: io::Error,
    },

    /// The server refused every identity we offered.
    #[error(
        "authentication as {user:?} rejected; tried: [{}]; server still allows: [{}]",
        tried.join("; "),
        methods_remaining.join(", ")
    )]
    AuthRejected {
        /// The user name.
        user: String,
        /// What was offered or attempted, in order (fingerprints and sources, plus identities
        /// that could not be used and why).
        tried: Vec<String>,
        /// Methods the server said can continue (`publickey`, `password`, ...).
        methods_remaining: Vec<String>,
    },

    /// A key file could not be loaded (missing, wrong passphrase, unsupported format), and no
    /// other identity got as far as being offered.
    #[error("cannot load key {}: {reason}", path.display())]
    KeyLoad {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// The ssh-agent could not be used, and no other identity got as far as being offered.
    #[error("ssh-agent{}: {reason}", socket.as_ref().map(|p| format!(" at {}", p.display())).unwrap_or_default())]
    Agent {
        /// The agent socket, if one was known.
        socket: Option<PathBuf>,
        /// Why.
        reason: String,
    },

    /// The server refused to open a channel. OpenSSH sends `ConnectFailed` when the
    /// connection already has `MaxSessions` session channels open, so a pool can learn the
    /// per-connection limit from this variant. The connection itself is still usable.
    #[error("server refused to open a channel ({reason}): {description}")]
    ChannelOpenRefused {
        /// The reason code.
        reason: ChannelOpenRefusal,
        /// The server's text (OpenSSH: "open failed"); empty if it could not be matched to
        /// this request.
        description: String,
    },

    /// The server refused the exec request (channel was opened, command was not started).
    #[error("server refused to execute {command:?}")]
    ExecRejected {
        /// The command.
        command: String,
    },

    /// The server closed the channel (its command ended) before `operation` was answered. A
    /// server answers nothing on a channel it has closed (OpenSSH `serverloop.c`
    /// `server_input_channel_req` skips the reply once it sent CHANNEL_CLOSE). The
    /// connection itself is still usable.
    #[error("SSH channel closed by the server before the {operation} request was answered")]
    ChannelClosed {
        /// What was waiting for an answer (`"barrier"`).
        operation: &'static str,
    },

    /// The connection is gone; `cause` is the real reason, captured from russh's session task.
    #[error("SSH connection lost ({stage}): {cause}")]
    Disconnected {
        /// When we noticed.
        stage: Stage,
        /// Why it ended.
        cause: DisconnectCause,
    },

    /// An SSH-level failure: protocol violation, no common algorithm, bad signature.
    #[error("SSH protocol error during {stage}: {message}")]
    Protocol {
        /// When.
        stage: Stage,
        /// What.
        message: String,
    },
}

impl TransportError {
    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransportError::Config(_) | TransportError::KnownHostsRead { .. } => ErrorKind::Config,
            TransportError::Resolve { .. }
            | TransportError::Connect { .. }
            | TransportError::ClosedAtStartup { .. } => ErrorKind::Unreachable,
            TransportError::Timeout { .. } => ErrorKind::Timeout,
            TransportError::HostKeyUnknown(_)
            | TransportError::HostKeyMismatch(_)
            | TransportError::HostKeyRevoked(_)
            | TransportError::HostKeyLearn { .. } => ErrorKind::HostKey,
            TransportError::AuthRejected { .. }
            | TransportError::KeyLoad { .. }
            | TransportError::Agent { .. } => ErrorKind::Auth,
            TransportError::ChannelOpenRefused { .. } => ErrorKind::ChannelOpenRefused,
            TransportError::ExecRejected { .. } => ErrorKind::ExecRejected,
            TransportError::Disconnected { .. } => ErrorKind::Disconnected,
            TransportError::ChannelClosed { .. } => ErrorKind::ChannelClosed,
            TransportError::Protocol { .. } => ErrorKind::Protocol,
        }
    }

    /// The stage at which this error happened.
    pub fn stage(&self) -> Stage {
        match self {
            TransportError::Config(_)
            | TransportError::KnownHostsRead { .. }
            | TransportError::KeyLoad { .. } => Stage::Setup,
            TransportError::Resolve { .. } => Stage::Resolve,
            TransportError::Connect { .. } => Stage::TcpConnect,
            TransportError::ClosedAtStartup { .. } => Stage::Handshake,
            TransportError::Timeout { stage, .. }
            | TransportError::Disconnected { stage, .. }
            | TransportError::Protocol { stage, .. } => *stage,
            TransportError::HostKeyUnknown(_)
            | TransportError::HostKeyMismatch(_)
            | TransportError::HostKeyRevoked(_)
            | TransportError::HostKeyLearn { .. } => Stage::HostKey,
            TransportError::AuthRejected { .. } | TransportError::Agent { .. } => Stage::Auth,
            TransportError::ChannelOpenRefused { .. } => Stage::ChannelOpen,
            TransportError::ExecRejected { .. } => Stage::Exec,
            TransportError::ChannelClosed { .. } => Stage::Connected,
        }
    }

    /// Whether the same operation may succeed if tried again (later, or on another
    /// connection to the same host) without anyone changing configuration.
    ///
    /// Host-key, authentication and configuration errors are not retryable: retrying them
    /// only hammers the server (and, for host keys, hides an attack). Unreachable hosts,
    /// timeouts, lost connections, channels closed under a waiter and channel refusals are.
    pub fn is_retryable(&self) -> bool {
        match self.kind() {
            ErrorKind::Unreachable
            | ErrorKind::Timeout
            | ErrorKind::ChannelOpenRefused
            | ErrorKind::Disconnected
            | ErrorKind::ChannelClosed => true,
            ErrorKind::Config
            | ErrorKind::HostKey
            | ErrorKind::Auth
            | ErrorKind::ExecRejected
            | ErrorKind::Protocol => false,
        }
    }

    /// Whether the server dropped the connection before the key exchange
    /// ([`TransportError::ClosedAtStartup`]): typically sshd `MaxStartups` shedding a burst
    /// of connections, so a new attempt after a short, jittered pause usually succeeds.
    pub fn is_startup_drop(&self) -> bool {
        matches!(self, TransportError::ClosedAtStartup { .. })
    }

    /// The disconnect cause, if this is [`TransportError::Disconnected`].
    pub fn disconnect_cause(&self) -> Option<&DisconnectCause> {
        match self {
            TransportError::Disconnected { cause, .. } => Some(cause),
            _ => None,
        }
    }

    /// The host-key report, if this is a host-key refusal.
    pub fn host_key_report(&self) -> Option<&HostKeyReport> {
        match self {
            TransportError::HostKeyUnknown(r)
            | TransportError::HostKeyMismatch(r)
            | TransportError::HostKeyRevoked(r) => Some(r),
            _ => None,
        }
    }
}

/// Classifies a russh error seen at `stage`.
///
/// `cause` is the connection's recorded end, if known: for "the session task is gone"
/// errors (`SendError`, `Disconnect`, `HUP`, `RecvError`) russh has already thrown the real
/// reason away, and only the captured cause says what happened.
pub(crate) fn classify(
    stage: Stage,
    err: russh::Error,
    cause: Option<DisconnectCause>,
) -> TransportError {
    use russh::Error as E;
    let disconnected = |cause: DisconnectCause| TransportError::Disconnected { stage, cause };
    match err {
        E::ChannelOpenFailure(reason) => TransportError::ChannelOpenRefused {
            reason: ChannelOpenRefusal::from_russh(&reason),
            description: String::new(),
        },
        E::KeepaliveTimeout | E::InactivityTimeout | E::IO(_) => {
            disconnected(cause.unwrap_or_else(|| cause_from_russh(err)))
        }
        E::Disconnect | E::HUP | E::SendError | E::RecvError | E::Join(_) => {
            disconnected(cause.unwrap_or_else(|| DisconnectCause::Unknown(format!("russh: {err}"))))
        }
        E::ConnectionTimeout | E::Elapsed(_) => TransportError::Timeout {
            stage,
            after: Duration::ZERO,
        },
        E::NoCommonAlgo { .. }
        | E::KexInit
        | E::Kex
        | E::UnknownAlgo
        | E::Version
        | E::PacketAuth
        | E::DecryptionError
        | E::WrongServerSig
        | E::StrictKeyExchangeViolation { .. }
        | E::Inconsistent
        | E::PacketSize(_)
        | E::WrongChannel
        | E::UnknownKey => TransportError::Protocol {
            stage,
            message: err.to_string(),
        },
        other => TransportError::Protocol {
            stage,
            message: other.to_string(),
        },
    }
}

/// The disconnect cause a russh error stands for, when it carries one.
pub(crate) fn cause_from_russh(err: russh::Error) -> DisconnectCause {
    use russh::Error as E;
    match err {
        // Interval and count are filled in by the caller, which knows the configuration.
        E::KeepaliveTimeout => DisconnectCause::KeepaliveTimeout {
            interval: Duration::ZERO,
            max_misses: 0,
        },
        E::InactivityTimeout => DisconnectCause::InactivityTimeout,
        E::IO(io) => DisconnectCause::Io {
            kind: io.kind(),
            message: io.to_string(),
        },
        E::Disconnect | E::HUP => DisconnectCause::ConnectionClosed,
        other => DisconnectCause::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_by_kind() {
        let t = TransportError::Timeout {
            stage: Stage::Handshake,
            after: Duration::from_secs(1),
        };
        assert!(t.is_retryable());
        assert_eq!(t.stage(), Stage::Handshake);
        let a = TransportError::AuthRejected {
            user: "root".into(),
            tried: vec!["x".into()],
            methods_remaining: vec!["publickey".into()],
        };
        assert!(!a.is_retryable());
        assert_eq!(a.kind(), ErrorKind::Auth);
        let r = TransportError::ChannelOpenRefused {
            reason: ChannelOpenRefusal::ConnectFailed,
            description: "open failed".into(),
        };
        assert!(r.is_retryable());
        assert_eq!(r.stage(), Stage::ChannelOpen);
        let d = TransportError::ClosedAtStartup {
            cause: DisconnectCause::ConnectionClosed,
            identification_received: false,
            server_text: "Exceeded MaxStartups".into(),
        };
        assert!(d.is_startup_drop() && d.is_retryable());
        assert_eq!(
            (d.kind(), d.stage()),
            (ErrorKind::Unreachable, Stage::Handshake)
        );
        assert!(!t.is_startup_drop());
        let c = TransportError::ChannelClosed {
            operation: "barrier",
        };
        assert!(c.is_retryable() && !c.is_startup_drop());
        assert_eq!(
            (c.kind(), c.stage()),
            (ErrorKind::ChannelClosed, Stage::Connected)
        );
    }

    #[test]
    fn classify_uses_captured_cause() {
        let cause = DisconnectCause::KeepaliveTimeout {
            interval: Duration::from_secs(1),
            max_misses: 2,
        };
        let e = classify(
            Stage::ChannelOpen,
            russh::Error::SendError,
            Some(cause.clone()),
        );
        assert_eq!(e.disconnect_cause(), Some(&cause));
        let e = classify(
            Stage::ChannelOpen,
            russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ConnectFailed),
            None,
        );
        assert!(matches!(
            e,
            TransportError::ChannelOpenRefused {
                reason: ChannelOpenRefusal::ConnectFailed,
                ..
            }
        ));
    }
}
