//! Build logs delivered to the scheduler without ever blocking the transport.
//!
//! Log events come from a session's protocol loop (worker frames) or from a channel's stderr
//! drain task (serve). Both run on paths that also carry other traffic, so they must never
//! wait for a slow consumer: events go into a bounded queue, and when it is full they are
//! dropped and counted. The consumer sees the count ([`LogStream::dropped`]) and can say so.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use nixmux_proto::log::LogEvent;
use tokio::sync::mpsc;

/// The sending side, held by the operation that produces logs.
#[derive(Debug, Clone)]
pub struct LogSender {
    tx: mpsc::Sender<LogEvent>,
    dropped: Arc<AtomicU64>,
    /// The last lines, kept whatever the consumer does (a failed build reports them).
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
    tail_len: usize,
    /// Log activity, for limits nixmux enforces itself (see [`LogWatch`]).
    watch: Option<Arc<LogWatch>>,
}

/// When a build last logged and how much, whatever the consumer does with the lines.
#[derive(Debug)]
pub(crate) struct LogWatch {
    last: Mutex<Instant>,
    bytes: AtomicU64,
}

impl LogWatch {
    fn new() -> Self {
        LogWatch {
            last: Mutex::new(Instant::now()),
            bytes: AtomicU64::new(0),
        }
    }

    fn saw(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Ok(mut l) = self.last.lock() {
            *l = Instant::now();
        }
    }

    /// When the build last logged (or the watch started).
    pub(crate) fn last(&self) -> Instant {
        self.last
            .lock()
            .map(|l| *l)
            .unwrap_or_else(|_| Instant::now())
    }

    /// Log bytes so far (a line counts with its newline).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// The receiving side, given to the scheduler.
#[derive(Debug)]
pub struct LogStream {
    rx: mpsc::Receiver<LogEvent>,
    dropped: Arc<AtomicU64>,
}

/// A log channel holding at most `capacity` undelivered events.
pub fn log_channel(capacity: usize) -> (LogSender, LogStream) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let dropped = Arc::new(AtomicU64::new(0));
    (
        LogSender {
            tx,
            dropped: dropped.clone(),
            tail: None,
            tail_len: 0,
            watch: None,
        },
        LogStream { rx, dropped },
    )
}

impl LogSender {
    /// Delivers `ev` if there is room, else drops and counts it. Never waits.
    pub fn send(&self, ev: LogEvent) {
        if let (Some(w), LogEvent::Line { text, .. }) = (&self.watch, &ev) {
            w.saw(text.len() as u64 + 1);
        }
        if let (Some(tail), LogEvent::Line { text, .. }) = (&self.tail, &ev)
            && let Ok(mut t) = tail.lock()
        {
            if t.len() == self.tail_len {
                t.pop_front();
            }
            t.push_back(text.clone());
        }
        if self.tx.try_send(ev).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `n` events lost before they reached this sender (lines the transport had to
    /// drop).
    pub(crate) fn count_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        if let Some(w) = &self.watch {
            // Lost lines were output all the same; their size is unknown: count one byte.
            w.saw(n);
        }
    }

    /// A sender that discards everything (when the caller does not want logs).
    pub fn discard() -> Self {
        let (tx, _) = mpsc::channel(1);
        LogSender {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
            tail: None,
            tail_len: 0,
            watch: None,
        }
    }

    /// A copy of this sender that also keeps the last `lines` log lines and watches the
    /// log's activity ([`LogSender::watch`]).
    pub(crate) fn with_tail(&self, lines: usize) -> Self {
        LogSender {
            tx: self.tx.clone(),
            dropped: self.dropped.clone(),
            tail: Some(Arc::new(Mutex::new(VecDeque::with_capacity(lines)))),
            tail_len: lines.max(1),
            watch: Some(Arc::new(LogWatch::new())),
        }
    }

    /// The log's activity, for a sender made by [`LogSender::with_tail`].
    pub(crate) fn watch(&self) -> Option<Arc<LogWatch>> {
        self.watch.clone()
    }

    /// The kept lines (see [`LogSender::with_tail`]).
    pub(crate) fn tail(&self) -> Vec<String> {
        self.tail
            .as_ref()
            .and_then(|t| t.lock().ok().map(|t| t.iter().cloned().collect()))
            .unwrap_or_default()
    }

    /// Events dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl LogStream {
    /// The next event; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<LogEvent> {
        self.rx.recv().await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<LogEvent> {
        self.rx.try_recv().ok()
    }

    /// Events dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
