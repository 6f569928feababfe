//! # nixmux-session: one Nix protocol conversation over a byte pipe
//!
//! A session is one running `nix-store --serve --write` ([`ServeSession`]) or
//! `nix-daemon --stdio` ([`WorkerSession`]), reached through any `AsyncRead` + `AsyncWrite`
//! pair: an SSH channel, a child process's pipes ([`process`]), a Unix socket. The codecs come
//! from `nixmux-proto`; this crate only moves bytes, enforces timeouts and tracks whether the
//! session can still be trusted.
//!
//! ## Rules every operation follows
//! * One operation at a time (`&mut self`). An operation that fails fatally, or whose future
//!   is dropped before it finishes, leaves the session *poisoned*: [`ServeSession::is_usable`]
//!   and [`WorkerSession::is_usable`] turn false and every later call fails with
//!   [`SessionError::Poisoned`]. A pool must then discard it (closing the pipe makes the remote
//!   Nix stop whatever it was doing).
//! * Timeouts measure silence, not duration ([`Activity`]): a wait on the peer fails once no
//!   byte has moved in either direction for [`SessionConfig::idle_timeout`]
//!   ([`SessionConfig::build_idle_timeout`] while waiting for a build, which may be silent for
//!   hours). A transfer that keeps moving never times out, however long it takes.
//! * NARs stream through in bounded chunks, never held whole, and are hashed on the way.
//! * Worker log frames go to a callback that must not block.

mod activity;
mod conn;
mod error;
mod lead;
pub mod process;
mod serve;
mod worker;

pub use activity::{Activity, PauseGuard, within_idle};
pub use conn::{
    BoxReader, BoxWriter, NarHashing, NarSummary, RemoteDiagnostics, RoundTrips, SessionConfig,
};
pub use error::SessionError;
pub use lead::{Lead, Opening};
pub use serve::{NarsError, ServeSession, Upload};
pub use worker::{LogFn, WorkerConfig, WorkerSession};
