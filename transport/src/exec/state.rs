//! What a channel's drain task and its handles share: the buffers, the recorded outcome and
//! the counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::task::AtomicWaker;
use tokio::sync::{mpsc, oneshot, watch};

use super::stderr::TailRing;
use super::stdout::Stdout;
use crate::error::{DisconnectCause, Stage, TransportError};
use crate::handler::ConnInner;
use crate::observer::ChannelObserver;
use crate::shared::ConnShared;

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code (127: command not found, under a POSIX shell).
    Code(u32),
    /// It was killed by a signal.
    Signal {
        /// Signal name without `SIG` (`KILL`, `TERM`, `SEGV`, ...).
        name: String,
        /// Whether it dumped core.
        core_dumped: bool,
        /// The server's message, often empty.
        message: String,
    },
    /// The channel closed without an exit status (the server or the connection went away,
    /// or this is not an exec channel).
    ClosedWithoutStatus,
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal {
                name,
                core_dumped,
                message,
            } => {
                write!(f, "killed by SIG{name}")?;
                if *core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            ExitStatus::ClosedWithoutStatus => f.write_str("closed without exit status"),
        }
    }
}

/// Per-channel statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelStats {
    /// Stdout bytes received.
    pub stdout_bytes: u64,
    /// Stderr bytes received.
    pub stderr_bytes: u64,
    /// Stdin bytes sent.
    pub stdin_bytes: u64,
    /// Unread stdout in memory now (not counting spill writes still queued and ranges read
    /// back from the spill file, which are bounded separately and counted as spilled).
    pub stdout_buffered: u64,
    /// Unread stdout in the spill file now, including writes still queued for it.
    pub stdout_spilled_pending: u64,
    /// Stdout bytes that ever went to the spill file (a failed write is not counted: its
    /// bytes stay in memory).
    pub stdout_spilled_total: u64,
    /// Stderr bytes the log consumer missed because its queue was full.
    pub stderr_log_dropped_bytes: u64,
    /// Newline bytes among them: log lines whose end the consumer missed.
    pub stderr_log_dropped_lines: u64,
}

/// What the drain task has learnt about the channel, watched by the handles.
#[derive(Debug, Clone, Default)]
pub(super) struct ChanState {
    pub(super) exec_reply: Option<bool>,
    pub(super) exit: Option<ExitStatus>,
    pub(super) closed: bool,
    pub(super) lost: Option<DisconnectCause>,
}

/// Where the drain task sends the outcome of one barrier request: its id once the server's
/// answer has been handled.
pub(super) type BarrierReply = oneshot::Sender<Result<u64, TransportError>>;

pub(crate) struct ChannelCore {
    pub(super) conn: Arc<ConnInner>,
    /// Barrier requests for the drain task, which owns the channel's write half.
    pub(super) barriers: mpsc::UnboundedSender<BarrierReply>,
    pub(super) stdout: Arc<Stdout>,
    pub(super) stderr: Mutex<TailRing>,
    pub(super) state: watch::Sender<ChanState>,
    /// Set once nothing more can be written: closed by either side or connection lost.
    pub(super) write_closed: AtomicBool,
    pub(super) writer_waker: AtomicWaker,
    pub(super) eof_sent: AtomicBool,
    pub(super) stdout_bytes: AtomicU64,
    pub(super) stderr_bytes: AtomicU64,
    pub(super) stdin_bytes: AtomicU64,
    pub(super) stderr_log_dropped_bytes: AtomicU64,
    pub(super) stderr_log_dropped_lines: AtomicU64,
    /// Told of everything the server sends on the channel.
    pub(super) observer: Option<Arc<dyn ChannelObserver>>,
}

impl ChannelCore {
    pub(super) fn new(
        conn: Arc<ConnInner>,
        barriers: mpsc::UnboundedSender<BarrierReply>,
        observer: Option<Arc<dyn ChannelObserver>>,
    ) -> Self {
        let cfg = &conn.config;
        ChannelCore {
            barriers,
            stdout: Stdout::new(
                cfg.stdout_memory_limit,
                cfg.stdout_spill.clone(),
                conn.shared.clone(),
            ),
            stderr: Mutex::new(TailRing::new(cfg.stderr_tail_bytes)),
            state: watch::Sender::new(ChanState::default()),
            write_closed: AtomicBool::new(false),
            writer_waker: AtomicWaker::new(),
            eof_sent: AtomicBool::new(false),
            stdout_bytes: AtomicU64::new(0),
            stderr_bytes: AtomicU64::new(0),
            stdin_bytes: AtomicU64::new(0),
            stderr_log_dropped_bytes: AtomicU64::new(0),
            stderr_log_dropped_lines: AtomicU64::new(0),
            observer,
            conn,
        }
    }

    pub(super) fn shared(&self) -> &ConnShared {
        &self.conn.shared
    }

    /// Counts `n` bytes sent on the command's stdin (the channel's and the connection's
    /// totals).
    pub(super) fn count_stdin(&self, n: u64) {
        self.stdin_bytes.fetch_add(n, Ordering::Relaxed);
        self.shared()
            .counters
            .bytes_out
            .fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn stats(&self) -> ChannelStats {
        let (buffered, pending, spilled) = self.stdout.counts();
        ChannelStats {
            stdout_bytes: self.stdout_bytes.load(Ordering::Relaxed),
            stderr_bytes: self.stderr_bytes.load(Ordering::Relaxed),
            stdin_bytes: self.stdin_bytes.load(Ordering::Relaxed),
            stdout_buffered: buffered,
            stdout_spilled_pending: pending,
            stdout_spilled_total: spilled,
            stderr_log_dropped_bytes: self.stderr_log_dropped_bytes.load(Ordering::Relaxed),
            stderr_log_dropped_lines: self.stderr_log_dropped_lines.load(Ordering::Relaxed),
        }
    }

    /// Why a request on this channel can no longer be answered: the connection is lost, or
    /// else the channel is closed.
    pub(super) fn end_error(&self, operation: &'static str) -> TransportError {
        match self.state.borrow().lost.clone() {
            Some(cause) => TransportError::Disconnected {
                stage: Stage::Connected,
                cause,
            },
            None => TransportError::ChannelClosed { operation },
        }
    }

    pub(super) fn close_for_write(&self) {
        self.write_closed.store(true, Ordering::SeqCst);
        self.writer_waker.wake();
    }

    /// The `Debug` output shared by every handle of the channel.
    pub(super) fn debug_as(&self, name: &str, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.borrow().clone();
        f.debug_struct(name)
            .field("exit", &state.exit)
            .field("closed", &state.closed)
            .field("lost", &state.lost)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for ChannelCore {
    fn drop(&mut self) {
        // Nobody can read the rest: stop the spill worker, free the file and give back this
        // channel's share of the connection's buffered-bytes gauge.
        self.stdout.shutdown();
    }
}

/// Dropping the last clone tells the drain task that nobody uses the channel any more.
pub(super) struct Lease {
    pub(super) _abandon: oneshot::Sender<()>,
}
