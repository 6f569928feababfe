//! Assembling a channel: the shared core, the handles, and the drain task.

use std::sync::Arc;
use std::time::Duration;

use russh::ChannelWriteHalf;
use russh::client::Msg;
use tokio::sync::{mpsc, oneshot};

use super::drain::{DrainStart, OnDrop, drain};
use super::handles::{ChannelStdin, ChannelStdout, ExecStatus};
use super::state::{ChannelCore, Lease};
use super::stderr::StderrLog;
use crate::handler::ConnInner;
use crate::observer::ChannelObserver;

/// The pieces of a freshly drained channel.
pub(crate) struct ChannelParts {
    pub(super) stdin: ChannelStdin,
    pub(super) stdout: ChannelStdout,
    pub(super) status: ExecStatus,
    pub(super) log: Option<StderrLog>,
    pub(super) write: Option<ChannelWriteHalf<Msg>>,
    start: Option<DrainStart>,
}

impl ChannelParts {
    /// `exec`: an exec request goes out before the drain starts (its answer is the first
    /// CHANNEL_SUCCESS or CHANNEL_FAILURE). `log_max_bytes`: size of the stderr log queue,
    /// if there is one.
    pub(super) fn build(
        conn: Arc<ConnInner>,
        channel: russh::Channel<Msg>,
        exec: bool,
        log_max_bytes: Option<usize>,
        on_drop: OnDrop,
        observer: Option<Arc<dyn ChannelObserver>>,
    ) -> Self {
        let (rx, write) = channel.split();
        let (barrier_tx, barriers) = mpsc::unbounded_channel();
        let core = Arc::new(ChannelCore::new(conn, barrier_tx, observer));
        // Holds its writes below the connection's `TransportConfig::send_ahead` limit.
        let writer = write.make_writer_send_ahead(core.shared().send_ahead_limit_shared());
        let (abandon_tx, abandoned) = oneshot::channel();
        let lease = Arc::new(Lease {
            _abandon: abandon_tx,
        });
        let (log_tx, log) = match log_max_bytes {
            Some(max) => {
                let (tx, log) = StderrLog::channel(max);
                (Some(tx), Some(log))
            }
            None => (None, None),
        };
        ChannelParts {
            stdin: ChannelStdin {
                inner: Box::new(writer),
                core: core.clone(),
                _lease: lease.clone(),
            },
            stdout: ChannelStdout {
                core: core.clone(),
                _lease: lease.clone(),
            },
            status: ExecStatus {
                core,
                _lease: lease,
            },
            log,
            write: Some(write),
            start: Some(DrainStart {
                rx,
                abandoned,
                log: log_tx,
                barriers,
                exec_reply_pending: exec,
                on_drop,
            }),
        }
    }

    pub(super) fn start_drain(&mut self) {
        if let (Some(start), Some(write)) = (self.start.take(), self.write.take()) {
            tokio::spawn(drain(start, write, self.status.core.clone()));
        }
    }

    /// Builds the parts and starts draining at once (direct-tcpip: on drop, EOF and CLOSE
    /// straight away; there is no command to wait for).
    pub(crate) fn spawn(conn: Arc<ConnInner>, channel: russh::Channel<Msg>) -> Self {
        let on_drop = OnDrop {
            terminate: false,
            grace: Duration::ZERO,
        };
        let mut parts = Self::build(conn, channel, false, None, on_drop, None);
        parts.start_drain();
        parts
    }
}
