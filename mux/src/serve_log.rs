//! The serve protocol's build log: the channel's stderr, split into lines and handed to
//! whichever operation is running on the session.
//!
//! The log and the protocol's replies travel separately (stderr and stdout of the remote
//! `nix-store --serve`), so a build's reply can be read before the last lines of its log have
//! been delivered. [`LogRoute::settle`] closes that gap without guessing: it asks the server
//! for an SSH round trip on the channel ([`ExecStatus::barrier`]); the answer comes after
//! everything the server had sent before it, and the pump has delivered the log up to the
//! barrier's marker when [`LogRoute::settle`] returns.
//!
//! Lines the transport had to drop (the pump fell behind) are counted in the operation's
//! [`LogSender`], never passed on as fragments.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixmux_proto::log::{LineSplitter, LogEvent};
use nixmux_session::{Activity, within_idle};
use nixmux_transport::{ExecStatus, StderrEvent, StderrLog};
use tokio::sync::watch;

use crate::logs::LogSender;

/// Longest silence on the session while waiting for the server to answer the barrier and
/// for the pump to reach it. The answer comes behind every stderr byte sent before it, which
/// on a slow link may take a while to arrive: those bytes (and anything else the server
/// sends) count as progress. A server silent this long is dead or frozen, which the
/// session's next wait and the transport's keepalive report; the log is then complete as far
/// as it got.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// How far the pump got.
#[derive(Debug, Clone, Copy, Default)]
struct Pumped {
    /// The last barrier marker delivered.
    barrier: u64,
    /// The log queue ended (the channel closed): everything was delivered.
    done: bool,
}

/// Where a serve session's stderr lines go. Stderr is also proof of life: the session's clock
/// is touched with every chunk, so that a build that logs is never taken for a silent one.
pub(crate) struct LogRoute {
    current: Mutex<Option<LogSender>>,
    activity: Activity,
    pumped: watch::Sender<Pumped>,
}

impl LogRoute {
    /// A route touching `activity` (the session's clock).
    pub(crate) fn new(activity: Activity) -> Arc<Self> {
        Arc::new(LogRoute {
            current: Mutex::new(None),
            activity,
            pumped: watch::Sender::new(Pumped::default()),
        })
    }

    /// Sends the lines that arrive from now on to `s` (`None`: nowhere).
    pub(crate) fn set(&self, s: Option<LogSender>) {
        if let Ok(mut c) = self.current.lock() {
            *c = s;
        }
    }

    fn send(&self, ev: LogEvent) {
        if let Ok(c) = self.current.lock()
            && let Some(s) = c.as_ref()
        {
            s.send(ev);
        }
    }

    fn dropped(&self, lines: u64) {
        if let Ok(c) = self.current.lock()
            && let Some(s) = c.as_ref()
        {
            s.count_dropped(lines);
        }
    }

    /// Returns once every stderr byte the server sent before now has been delivered (or
    /// counted as dropped): the end-of-stream barrier described in the module docs. Without a
    /// pump (worker sessions) it returns at once.
    pub(crate) async fn settle(&self, status: &ExecStatus) {
        let mut pumped = self.pumped.subscribe();
        if pumped.borrow().done {
            return;
        }
        let answered = within_idle(
            &self.activity,
            Some(SETTLE_WAIT),
            "log barrier",
            status.barrier(),
        );
        let target = match answered.await {
            Ok(Ok(id)) => Some(id),
            // The channel closed (a serve server that failed exits): the queue ends after
            // its last byte, so wait for the end instead.
            Ok(Err(e)) => {
                tracing::debug!("log barrier: {e}; waiting for the end of the log");
                None
            }
            Err(_) => {
                tracing::debug!("log barrier unanswered, the session silent for {SETTLE_WAIT:?}");
                return;
            }
        };
        let reached = pumped.wait_for(|p| p.done || target.is_some_and(|t| p.barrier >= t));
        if within_idle(&self.activity, Some(SETTLE_WAIT), "log pump", reached)
            .await
            .is_err()
        {
            tracing::debug!("the log pump did not reach the barrier, silent for {SETTLE_WAIT:?}");
        }
    }

    /// Starts the task that splits `log` into lines for this route; `max_line` bounds a line.
    pub(crate) fn pump(
        self: &Arc<Self>,
        mut log: StderrLog,
        max_line: usize,
    ) -> tokio::task::JoinHandle<()> {
        let route = self.clone();
        tokio::spawn(async move {
            let mut split = LineSplitter::new(max_line);
            let line = |text| LogEvent::Line {
                activity: None,
                text,
            };
            while let Some(ev) = log.recv().await {
                match ev {
                    StderrEvent::Data(chunk) => {
                        route.activity.touch();
                        for l in split.feed(&chunk) {
                            route.send(line(l));
                        }
                    }
                    StderrEvent::Dropped { lines, .. } => {
                        route.activity.touch();
                        // The line in progress and the one the next bytes belong to are cut
                        // too: counted, never delivered as fragments.
                        split.gap();
                        route.dropped(lines + 1);
                    }
                    StderrEvent::Barrier(id) => {
                        route.pumped.send_modify(|p| p.barrier = p.barrier.max(id));
                    }
                }
            }
            if let Some(l) = split.finish() {
                route.send(line(l));
            }
            route.pumped.send_modify(|p| p.done = true);
        })
    }
}
