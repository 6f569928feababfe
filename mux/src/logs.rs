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
    /// The whole log, kept to store in the local store when the build ends.
    record: Option<Arc<LogRecord>>,
}

/// The whole log of one build, kept so that it can be stored where `nix log` finds it.
///
/// Bounded: the first half of `cap` bytes is kept as the head and the last half as a tail of
/// whole lines; what falls between is counted and named in the stored log. A failing build's
/// cause is usually at the end, its setup at the start.
#[derive(Debug)]
pub(crate) struct LogRecord {
    cap: usize,
    inner: Mutex<RecordInner>,
}

#[derive(Debug, Default)]
struct RecordInner {
    head: Vec<u8>,
    tail: VecDeque<String>,
    tail_bytes: usize,
    omitted: u64,
    lines: u64,
    /// Lines lost before they reached us (the transport had to drop them).
    lost: u64,
}

impl LogRecord {
    pub(crate) fn new(cap: usize) -> Self {
        LogRecord {
            cap: cap.max(2),
            inner: Mutex::new(RecordInner::default()),
        }
    }

    fn push(&self, line: &str) {
        let Ok(mut r) = self.inner.lock() else {
            return;
        };
        let half = self.cap / 2;
        let size = line.len() + 1;
        r.lines += 1;
        if r.tail.is_empty() && r.head.len() + size <= half {
            r.head.extend_from_slice(line.as_bytes());
            r.head.push(b'\n');
            return;
        }
        r.tail.push_back(line.to_owned());
        r.tail_bytes += size;
        while r.tail_bytes > half {
            let Some(old) = r.tail.pop_front() else {
                break;
            };
            r.tail_bytes -= old.len() + 1;
            r.omitted += old.len() as u64 + 1;
        }
    }

    fn lost(&self, n: u64) {
        if let Ok(mut r) = self.inner.lock() {
            r.lost += n;
        }
    }

    /// The log as stored: head, a note on what was left out, tail, and a note on lines lost
    /// before they reached us. `None` when the build logged nothing (storing an empty log
    /// would hide an older one of the same derivation).
    pub(crate) fn contents(&self) -> Option<Vec<u8>> {
        let r = self.inner.lock().ok()?;
        let lost = r.lost;
        if r.lines == 0 && lost == 0 {
            return None;
        }
        let mut out = Vec::with_capacity(r.head.len() + r.tail_bytes + 128);
        out.extend_from_slice(&r.head);
        if r.omitted > 0 {
            out.extend_from_slice(
                format!(
                    "[nixmux: {} bytes of log left out here; the log exceeded {} bytes]\n",
                    r.omitted, self.cap
                )
                .as_bytes(),
            );
        }
        for l in &r.tail {
            out.extend_from_slice(l.as_bytes());
            out.push(b'\n');
        }
        if lost > 0 {
            out.extend_from_slice(
                format!("[nixmux: {lost} log lines were lost before they reached nixmux]\n")
                    .as_bytes(),
            );
        }
        Some(out)
    }
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
            record: None,
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
        if let (Some(record), LogEvent::Line { text, .. }) = (&self.record, &ev) {
            record.push(text);
        }
        if self.tx.try_send(ev).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `n` events lost before they reached this sender (lines the transport had to
    /// drop).
    pub(crate) fn count_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        if let Some(r) = &self.record {
            r.lost(n);
        }
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
            record: None,
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
            record: None,
        }
    }

    /// This sender, also keeping the whole log (up to `cap` bytes, see [`LogRecord`]).
    pub(crate) fn recording(mut self, cap: usize) -> Self {
        self.record = Some(Arc::new(LogRecord::new(cap)));
        self
    }

    /// The kept log (see [`LogSender::recording`]).
    pub(crate) fn record(&self) -> Option<&LogRecord> {
        self.record.as_deref()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> LogEvent {
        LogEvent::Line {
            text: s.to_owned(),
            activity: None,
        }
    }

    #[test]
    fn a_recorded_log_keeps_head_and_tail_and_says_what_it_left_out() {
        let (tx, _rx) = log_channel(1);
        let tx = tx.with_tail(3).recording(40);
        assert_eq!(tx.record().and_then(LogRecord::contents), None);
        for i in 0..20 {
            tx.send(line(&format!("line {i:02}")));
        }
        tx.count_dropped(2);
        let text = String::from_utf8(tx.record().and_then(LogRecord::contents).expect("log"))
            .expect("utf8");
        // 20 bytes of head (two 8-byte lines fit), 20 of tail, the rest counted.
        assert!(
            text.starts_with("line 00\nline 01\n[nixmux: 128 bytes"),
            "{text}"
        );
        assert!(
            text.contains("line 18\nline 19\n[nixmux: 2 log lines were lost"),
            "{text}"
        );
    }

    #[test]
    fn a_small_log_is_kept_whole() {
        let (tx, _rx) = log_channel(1);
        let tx = tx.with_tail(3).recording(1 << 20);
        tx.send(line("one"));
        tx.send(line("two"));
        let text = tx.record().and_then(LogRecord::contents).expect("log");
        assert_eq!(text, b"one\ntwo\n");
    }
}
