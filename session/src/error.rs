//! Errors of a protocol session.

use std::time::Duration;

use nixmux_proto::worker::RemoteError;
use nixmux_proto::{Incompatible, ProtoError};

/// Why an operation on a session failed.
///
/// [`SessionError::is_fatal`] tells whether the session can still be used: only a
/// [`SessionError::Remote`] error (the worker protocol's per-operation `STDERR_ERROR`), an
/// [`SessionError::Unsupported`] operation and an [`SessionError::UploadMismatch`] (an
/// answered upload) leave it usable; everything else means the byte stream is no longer in a
/// known state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The remote closed the stream in the middle of `during`. For the serve protocol this is
    /// how every server-side error looks; `explanation` then holds the remote's stderr tail and
    /// exit status when known.
    #[error("the remote closed the connection during {during}{}", explanation.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    Closed {
        /// What we were doing.
        during: &'static str,
        /// The remote's own words (stderr tail, exit status), if any.
        explanation: Option<String>,
    },
    /// The peer sent something we cannot parse or must not accept.
    #[error("protocol error during {during}: {source}")]
    Protocol {
        /// What we were doing.
        during: &'static str,
        /// The violation.
        #[source]
        source: ProtoError,
    },
    /// The remote Nix refused or failed the operation (worker `STDERR_ERROR`). The session
    /// stays usable.
    #[error("the builder's Nix reported: {}", .0.plain_message().trim_end())]
    Remote(RemoteError),
    /// This session's negotiated version lacks the operation. The session stays usable.
    #[error("{0}")]
    Unsupported(Incompatible),
    /// Nothing arrived for `after`.
    #[error("timed out after {after:?} during {during}")]
    Timeout {
        /// What we were doing.
        during: &'static str,
        /// The limit.
        after: Duration,
    },
    /// Reading or writing the byte pipe failed locally.
    #[error("I/O error during {during}: {source}")]
    Io {
        /// What we were doing.
        during: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The local sink a NAR was streamed into failed; the rest of the NAR was not read, so the
    /// session is out of sync.
    #[error("writing the NAR locally failed: {0}")]
    Sink(#[source] std::io::Error),
    /// The local source of an upload failed or ended early.
    #[error("reading the NAR to upload failed: {0}")]
    Source(#[source] std::io::Error),
    /// A downloaded NAR did not match the metadata the remote gave.
    #[error("NAR of {path} does not match its metadata: {detail}")]
    NarMismatch {
        /// The path.
        path: String,
        /// What differed.
        detail: String,
    },
    /// The builder made another path of an uploaded NAR than its record said (a path sent by
    /// content, whose address the builder computes): the NAR was not what the local record
    /// claims. Every answer was read, so the session stays usable.
    #[error("the receiving store made another path of the NAR uploaded for {path}: {detail}")]
    UploadMismatch {
        /// The path named in the upload.
        path: String,
        /// What the builder made of it.
        detail: String,
    },
    /// The daemon ended an upload before all data was sent, without saying why.
    #[error("the builder stopped reading the upload before it was complete")]
    RemoteStopped,
    /// An earlier operation failed or was cancelled half-way; the session must be discarded.
    #[error("the session is unusable after an earlier failure or cancellation")]
    Poisoned,
}

impl SessionError {
    /// Whether the session must be discarded after this error.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            SessionError::Remote(_)
                | SessionError::Unsupported(_)
                | SessionError::UploadMismatch { .. }
        )
    }
}
