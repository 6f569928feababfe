//! State shared by a connection's parts: the russh handler (inside russh's session task),
//! the [`crate::SshConnection`] handle and every channel's drain task. A leaf of the
//! connection modules: the handler, the channels and the connection import it, it imports
//! none of them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::config::{SendAhead, TransportConfig};
use crate::error::{ChannelOpenRefusal, DisconnectCause, Stage, TransportError, classify};
use crate::host_key::HostKeySource;
use crate::stream::{StreamEnd, StreamMonitor};

/// How long to wait for the session task to publish its end cause once we know it is ending.
pub(crate) const CAUSE_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the description of a refused channel open; it is delivered by the
/// session task right after the refusal itself.
const OPEN_FAILURE_GRACE: Duration = Duration::from_millis(200);

/// Counters shared by the connection and its channels.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) channels_open: AtomicU64,
    pub(crate) channels_opened: AtomicU64,
    pub(crate) open_refusals: AtomicU64,
    pub(crate) stdout_buffered: AtomicU64,
    pub(crate) stdout_spilled: AtomicU64,
    pub(crate) stderr_log_dropped_bytes: AtomicU64,
    pub(crate) stderr_log_dropped_lines: AtomicU64,
}

/// What the handler was told when the session ended.
#[derive(Debug)]
pub(crate) enum Reported {
    Peer { reason: String, message: String },
    Error(DisconnectCause),
}

/// State shared by the handler (inside russh's session task), the [`SshConnection`] and
/// every channel's drain task.
#[derive(Debug)]
pub(crate) struct ConnShared {
    pub(crate) monitor: Arc<StreamMonitor>,
    pub(crate) counters: Counters,
    pub(crate) cause: watch::Sender<Option<DisconnectCause>>,
    pub(crate) local: AtomicBool,
    pub(crate) reported: Mutex<Option<Reported>>,
    pub(crate) keepalive: (Duration, usize),
    pub(crate) host_key: OnceLock<HostKeyInfo>,
    pub(crate) negotiated: OnceLock<(String, String)>,
    /// The compression we send with, once negotiated (`none`, `zlib`, `zlib@openssh.com`).
    pub(crate) compression: OnceLock<&'static str>,
    pub(crate) rejection: Mutex<Option<TransportError>>,
    pub(crate) open_failures: Mutex<VecDeque<(ChannelOpenRefusal, String)>>,
    pub(crate) open_failure_notify: Notify,
    /// The server announced itself as OpenSSH (`SSH-2.0-OpenSSH_...`).
    openssh_server: AtomicBool,
    /// The shortest round trip measured on the connection, in nanoseconds (0: none yet).
    round_trip_ns: AtomicU64,
    send_ahead: Option<SendAhead>,
    /// The limit on a channel's unacknowledged data (0: none), derived from the three fields
    /// above whenever one changes; every channel's writer reads it at each write.
    send_ahead_limit: Arc<AtomicU32>,
}

#[derive(Debug, Clone)]
pub(crate) struct HostKeyInfo {
    pub(crate) algorithm: String,
    pub(crate) fingerprint: String,
    pub(crate) source: HostKeySource,
}

impl ConnShared {
    pub(crate) fn new(monitor: Arc<StreamMonitor>, config: &TransportConfig) -> Self {
        ConnShared {
            monitor,
            counters: Counters::default(),
            cause: watch::Sender::new(None),
            local: AtomicBool::new(false),
            reported: Mutex::new(None),
            keepalive: (
                config.keepalive_interval.unwrap_or_default(),
                config.keepalive_max_misses,
            ),
            host_key: OnceLock::new(),
            negotiated: OnceLock::new(),
            compression: OnceLock::new(),
            rejection: Mutex::new(None),
            open_failures: Mutex::new(VecDeque::new()),
            open_failure_notify: Notify::new(),
            openssh_server: AtomicBool::new(false),
            round_trip_ns: AtomicU64::new(0),
            send_ahead: config.send_ahead,
            send_ahead_limit: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Records that the server is OpenSSH (from its identification string, at the key
    /// exchange; again at each rekey, which changes nothing).
    pub(crate) fn note_openssh_server(&self) {
        if !self.openssh_server.swap(true, Ordering::Relaxed) {
            self.update_send_ahead_limit();
        }
    }

    /// Records a round trip measured on the connection; the shortest one is kept.
    pub(crate) fn note_round_trip(&self, rtt: Duration) {
        let ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX).max(1);
        let shorter = self
            .round_trip_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (old == 0 || ns < old).then_some(ns)
            })
            .is_ok();
        if shorter {
            self.update_send_ahead_limit();
        }
    }

    /// The shortest round trip measured so far.
    pub(crate) fn round_trip(&self) -> Option<Duration> {
        match self.round_trip_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// Whether the connection's channels are to hold their writes below
    /// [`TransportConfig::send_ahead`]'s limit: configured, and the server is OpenSSH (whose
    /// buffering the limit spares and whose window adjustments it relies on).
    pub(crate) fn wants_send_ahead(&self) -> bool {
        self.send_ahead.is_some() && self.openssh_server.load(Ordering::Relaxed)
    }

    /// The limit on a channel's unacknowledged data now (0: none): see [`SendAhead`].
    pub(crate) fn send_ahead_limit(&self) -> u32 {
        self.send_ahead_limit.load(Ordering::Relaxed)
    }

    /// The limit as channel writers read it (see [`ConnShared::send_ahead_limit`]).
    pub(crate) fn send_ahead_limit_shared(&self) -> Arc<AtomicU32> {
        self.send_ahead_limit.clone()
    }

    /// Derives the limit from what is known now. Until the first round trip is measured,
    /// the floor: sshd's buffer grows once per channel, to the largest backlog it ever
    /// holds, so the limit must hold from the first write. Its two callers do not run at
    /// the same time: the server is known as OpenSSH at the first key exchange, before the
    /// connection exists, and round trips are measured one after the other by one task.
    fn update_send_ahead_limit(&self) {
        let limit = match self.send_ahead {
            Some(s) if self.openssh_server.load(Ordering::Relaxed) => {
                self.round_trip().map_or(s.floor, |rtt| s.limit(rtt))
            }
            _ => 0,
        };
        self.send_ahead_limit.store(limit, Ordering::Relaxed);
    }

    /// A connection's shared state with nothing behind it, for unit tests of the parts that
    /// only update its counters.
    #[cfg(test)]
    pub(crate) fn detached() -> Arc<Self> {
        Arc::new(Self::new(
            Arc::new(StreamMonitor::default()),
            &TransportConfig::default(),
        ))
    }

    pub(crate) fn cause(&self) -> Option<DisconnectCause> {
        self.cause.borrow().clone()
    }

    /// The end cause, waiting up to `grace` for the session task to publish it (it does so
    /// as it exits, which may be a moment after a channel noticed).
    pub(crate) async fn wait_cause(&self, grace: Duration) -> DisconnectCause {
        let mut rx = self.cause.subscribe();
        match tokio::time::timeout(grace, rx.wait_for(Option::is_some)).await {
            Ok(Ok(c)) => c
                .clone()
                .unwrap_or_else(|| DisconnectCause::Unknown("no cause".into())),
            _ => DisconnectCause::Unknown(
                "the SSH session stopped responding but has not ended yet".into(),
            ),
        }
    }

    pub(crate) fn report(&self, r: Reported) {
        if let Ok(mut g) = self.reported.lock()
            && g.is_none()
        {
            *g = Some(r);
        }
    }

    /// Publishes the end cause. Called when russh's session task drops our handler, i.e.
    /// exactly once, when the session is over for whatever reason (including a panic).
    pub(crate) fn finish(&self) {
        let stream_end = self.monitor.end();
        let from_stream = |end: &Option<StreamEnd>| match end {
            Some(StreamEnd::Eof) => Some(DisconnectCause::ConnectionClosed),
            Some(StreamEnd::Error { kind, message }) => Some(DisconnectCause::Io {
                kind: *kind,
                message: message.clone(),
            }),
            Some(StreamEnd::Killed) => Some(DisconnectCause::Local),
            None => None,
        };
        let reported = self.reported.lock().ok().and_then(|mut g| g.take());
        let cause = if self.local.load(Ordering::SeqCst) {
            DisconnectCause::Local
        } else {
            match reported {
                Some(Reported::Peer { reason, message }) => {
                    DisconnectCause::ClosedByPeer { reason, message }
                }
                Some(Reported::Error(DisconnectCause::KeepaliveTimeout { .. })) => {
                    DisconnectCause::KeepaliveTimeout {
                        interval: self.keepalive.0,
                        max_misses: self.keepalive.1,
                    }
                }
                // russh's generic "disconnected": the stream knows better.
                Some(Reported::Error(
                    c @ (DisconnectCause::ConnectionClosed | DisconnectCause::Unknown(_)),
                )) => from_stream(&stream_end).unwrap_or(c),
                // russh's "early eof" when the socket closed between packets.
                Some(Reported::Error(DisconnectCause::Io { .. }))
                    if stream_end == Some(StreamEnd::Eof) =>
                {
                    DisconnectCause::ConnectionClosed
                }
                Some(Reported::Error(c)) => c,
                None => from_stream(&stream_end)
                    .unwrap_or_else(|| DisconnectCause::Unknown("SSH session task ended".into())),
            }
        };
        tracing::debug!(%cause, "SSH connection ended");
        self.cause.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(cause);
                true
            } else {
                false
            }
        });
    }

    pub(crate) fn push_open_failure(&self, reason: ChannelOpenRefusal, description: String) {
        if let Ok(mut q) = self.open_failures.lock() {
            q.push_back((reason, description));
            // Bounded: entries nobody claimed (e.g. from a timed-out open) must not pile up.
            while q.len() > 16 {
                q.pop_front();
            }
        }
        self.open_failure_notify.notify_waiters();
    }

    /// The server's description of a refused open with this reason. Refusals with the same
    /// reason that race each other may swap descriptions; the texts are the same in practice.
    pub(crate) async fn claim_open_failure(&self, reason: &ChannelOpenRefusal) -> String {
        let take = || -> Option<String> {
            let mut q = self.open_failures.lock().ok()?;
            let pos = q.iter().position(|(r, _)| r == reason)?;
            q.remove(pos).map(|(_, d)| d)
        };
        let deadline = tokio::time::Instant::now() + OPEN_FAILURE_GRACE;
        loop {
            let notified = self.open_failure_notify.notified();
            if let Some(d) = take() {
                return d;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return take().unwrap_or_default();
            }
        }
    }
}

pub(crate) async fn classify_with(
    shared: &ConnShared,
    stage: Stage,
    e: russh::Error,
) -> TransportError {
    let needs_cause = matches!(
        e,
        russh::Error::SendError
            | russh::Error::Disconnect
            | russh::Error::HUP
            | russh::Error::RecvError
            | russh::Error::Join(_)
    );
    let cause = if needs_cause {
        Some(shared.wait_cause(CAUSE_GRACE).await)
    } else {
        shared.cause()
    };
    classify(stage, e, cause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_ahead_applies_to_openssh_only_and_follows_the_shortest_round_trip() {
        let shared = ConnShared::detached();
        shared.note_round_trip(Duration::from_millis(10));
        // Not (yet) known as OpenSSH: no limit.
        assert_eq!(shared.send_ahead_limit(), 0);
        shared.note_openssh_server();
        assert_eq!(shared.send_ahead_limit(), 2_500_000);
        // A longer round trip does not replace a shorter one.
        shared.note_round_trip(Duration::from_millis(50));
        assert_eq!(shared.round_trip(), Some(Duration::from_millis(10)));
        shared.note_round_trip(Duration::from_micros(200));
        assert_eq!(shared.send_ahead_limit(), 256 * 1024);

        // Before any measurement, the floor.
        let fresh = ConnShared::detached();
        fresh.note_openssh_server();
        assert_eq!(fresh.round_trip(), None);
        assert_eq!(fresh.send_ahead_limit(), 256 * 1024);

        // Configured off.
        let config = TransportConfig {
            send_ahead: None,
            ..TransportConfig::default()
        };
        let off = ConnShared::new(Arc::new(StreamMonitor::default()), &config);
        off.note_openssh_server();
        off.note_round_trip(Duration::from_micros(200));
        assert_eq!(off.send_ahead_limit(), 0);
    }
}
