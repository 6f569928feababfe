//! A channel's stderr: the tail kept for diagnostics, and the optional log queue.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

/// The last `cap` bytes of stderr: what explains a remote process that died.
pub(super) struct TailRing {
    pub(super) buf: VecDeque<u8>,
    cap: usize,
}

impl TailRing {
    pub(super) fn new(cap: usize) -> Self {
        TailRing {
            buf: VecDeque::new(),
            cap,
        }
    }

    pub(super) fn push(&mut self, data: &[u8]) {
        if self.cap == 0 {
            return;
        }
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend(&data[data.len() - self.cap..]);
            return;
        }
        self.buf.extend(data);
        let excess = self.buf.len().saturating_sub(self.cap);
        self.buf.drain(..excess);
    }
}

/// One item of a channel's stderr log queue, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrEvent {
    /// Stderr bytes, as they arrived.
    Data(Bytes),
    /// The queue was full: this much stderr was discarded here (`lines` = newline bytes in it).
    Dropped {
        /// Bytes discarded.
        bytes: u64,
        /// Newline bytes among them: how many line ends the consumer missed.
        lines: u64,
    },
    /// The server answered barrier request `id` (see [`ExecStatus::barrier`](crate::ExecStatus::barrier)):
    /// everything it sent on this channel before that answer precedes this item.
    Barrier(u64),
}

/// The queue between a channel's drain task and its log consumer.
struct LogQueue {
    items: VecDeque<StderrEvent>,
    /// Bytes in `StderrEvent::Data` items.
    data_bytes: usize,
    max_bytes: usize,
    /// The channel has ended: nothing more will be queued.
    closed: bool,
    /// The consumer is gone: nothing more is worth queueing.
    consumer_gone: bool,
}

struct LogShared {
    queue: Mutex<LogQueue>,
    /// Signalled after each new item, and at the end.
    arrived: Notify,
}

impl LogShared {
    fn lock(&self) -> MutexGuard<'_, LogQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The drain task's end of the log queue. It never waits: stderr that does not fit is
/// counted in a `Dropped` item instead. Dropping it ends the queue.
pub(super) struct LogSender {
    shared: Arc<LogShared>,
}

/// What became of offered stderr.
pub(super) enum Offered {
    Queued,
    Dropped {
        bytes: u64,
        lines: u64,
    },
    /// The consumer is gone; stop offering.
    ConsumerGone,
}

impl LogSender {
    /// Queues a chunk if the undelivered data stays within the byte limit (or the queue holds
    /// no data at all, so that a chunk larger than the limit still gets through), else
    /// records it as dropped. Consecutive drops add up in one `Dropped` item while it is the
    /// newest item, so a consumer that is far behind costs one item, not one per chunk.
    pub(super) fn data(&self, data: Bytes) -> Offered {
        let mut q = self.shared.lock();
        if q.consumer_gone {
            return Offered::ConsumerGone;
        }
        let len = data.len();
        if q.data_bytes == 0 || q.data_bytes + len <= q.max_bytes {
            q.data_bytes += len;
            q.items.push_back(StderrEvent::Data(data));
            drop(q);
            self.shared.arrived.notify_one();
            return Offered::Queued;
        }
        let bytes = len as u64;
        let lines = data.iter().filter(|&&b| b == b'\n').count() as u64;
        match q.items.back_mut() {
            Some(StderrEvent::Dropped { bytes: b, lines: l }) => {
                *b += bytes;
                *l += lines;
            }
            _ => {
                q.items.push_back(StderrEvent::Dropped { bytes, lines });
                drop(q);
                self.shared.arrived.notify_one();
            }
        }
        Offered::Dropped { bytes, lines }
    }

    /// Queues a barrier marker, whatever the queue holds. False if the consumer is gone.
    pub(super) fn barrier(&self, id: u64) -> bool {
        let mut q = self.shared.lock();
        if q.consumer_gone {
            return false;
        }
        q.items.push_back(StderrEvent::Barrier(id));
        drop(q);
        self.shared.arrived.notify_one();
        true
    }
}

impl Drop for LogSender {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.arrived.notify_one();
    }
}

/// A channel's stderr for a log consumer: [`StderrEvent`]s in arrival order. The queue holds
/// at most [`ExecOptions::stderr_log_max_bytes`](crate::ExecOptions::stderr_log_max_bytes)
/// of undelivered stderr (or one chunk, if a single chunk is larger); what does not fit is
/// discarded and reported in place as [`StderrEvent::Dropped`] (and counted in
/// [`ChannelStats`](crate::ChannelStats)), because the drain task never waits for the
/// consumer. `Dropped` and `Barrier` items are never discarded. Ends when the channel
/// closes; dropping it stops the queueing.
pub struct StderrLog {
    shared: Arc<LogShared>,
}

impl StderrLog {
    /// A log queue holding at most `max_bytes` of undelivered stderr, and the drain task's
    /// end of it.
    pub(super) fn channel(max_bytes: usize) -> (LogSender, StderrLog) {
        let shared = Arc::new(LogShared {
            queue: Mutex::new(LogQueue {
                items: VecDeque::new(),
                data_bytes: 0,
                max_bytes,
                closed: false,
                consumer_gone: false,
            }),
            arrived: Notify::new(),
        });
        (
            LogSender {
                shared: shared.clone(),
            },
            StderrLog { shared },
        )
    }

    /// The next item, or `None` once the channel is closed and every item was received.
    pub async fn recv(&mut self) -> Option<StderrEvent> {
        loop {
            {
                let mut q = self.shared.lock();
                if let Some(item) = q.items.pop_front() {
                    if let StderrEvent::Data(d) = &item {
                        q.data_bytes -= d.len();
                    }
                    return Some(item);
                }
                if q.closed {
                    return None;
                }
            }
            // The drain task signals with `notify_one`, which is kept for a consumer that
            // is not waiting yet, so nothing queued after the check above is missed.
            self.shared.arrived.notified().await;
        }
    }
}

impl Drop for StderrLog {
    fn drop(&mut self) {
        let mut q = self.shared.lock();
        q.consumer_gone = true;
        q.items.clear();
        q.data_bytes = 0;
    }
}

impl std::fmt::Debug for StderrLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = self.shared.lock();
        f.debug_struct("StderrLog")
            .field("queued", &q.items.len())
            .field("queued_bytes", &q.data_bytes)
            .field("closed", &q.closed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_ring_keeps_last_bytes() {
        let mut t = TailRing::new(5);
        t.push(b"abc");
        t.push(b"defg");
        assert_eq!(t.buf.iter().copied().collect::<Vec<_>>(), b"cdefg");
        t.push(b"0123456789");
        assert_eq!(t.buf.iter().copied().collect::<Vec<_>>(), b"56789");
    }
}

#[cfg(test)]
mod log_tests {
    use super::*;

    fn data(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    async fn next(log: &mut StderrLog) -> Option<StderrEvent> {
        tokio::time::timeout(std::time::Duration::from_secs(5), log.recv())
            .await
            .expect("log queue stalled")
    }

    /// Data beyond the byte limit is dropped and reported in place, consecutive drops in one
    /// item; barriers and drop reports are queued even when the queue is full; the queue
    /// ends after everything was received.
    #[tokio::test]
    async fn drops_are_counted_in_place_and_markers_never_dropped() {
        let (tx, mut log) = StderrLog::channel(10);
        assert!(matches!(tx.data(data("a\nbc\n")), Offered::Queued));
        assert!(matches!(tx.data(data("defg")), Offered::Queued));
        assert!(matches!(
            tx.data(data("x\ny\n")),
            Offered::Dropped { bytes: 4, lines: 2 }
        ));
        assert!(matches!(
            tx.data(data("z\n")),
            Offered::Dropped { bytes: 2, lines: 1 }
        ));
        assert!(tx.barrier(1));
        assert!(matches!(
            tx.data(data("wv")),
            Offered::Dropped { bytes: 2, lines: 0 }
        ));
        assert!(tx.barrier(2));
        assert_eq!(
            next(&mut log).await,
            Some(StderrEvent::Data(data("a\nbc\n")))
        );
        // Room again: data is queued behind the markers.
        assert!(matches!(tx.data(data("012345")), Offered::Queued));
        drop(tx);
        let rest = [
            StderrEvent::Data(data("defg")),
            StderrEvent::Dropped { bytes: 6, lines: 3 },
            StderrEvent::Barrier(1),
            StderrEvent::Dropped { bytes: 2, lines: 0 },
            StderrEvent::Barrier(2),
            StderrEvent::Data(data("012345")),
        ];
        for want in rest {
            assert_eq!(next(&mut log).await, Some(want));
        }
        assert_eq!(next(&mut log).await, None);
    }

    /// A chunk larger than the whole limit still gets through when the queue holds no data.
    #[tokio::test]
    async fn oversized_chunk_passes_an_empty_queue() {
        let (tx, mut log) = StderrLog::channel(4);
        assert!(matches!(tx.data(data("0123456789")), Offered::Queued));
        assert!(matches!(tx.data(data("a")), Offered::Dropped { .. }));
        assert_eq!(
            next(&mut log).await,
            Some(StderrEvent::Data(data("0123456789")))
        );
        assert!(matches!(tx.data(data("b")), Offered::Queued));
    }

    /// A consumer waiting in `recv` is woken by new items and by the end.
    #[tokio::test]
    async fn waiting_consumer_is_woken() {
        let (tx, mut log) = StderrLog::channel(100);
        let consumer = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(ev) = next(&mut log).await {
                got.push(ev);
            }
            got
        });
        tokio::task::yield_now().await;
        assert!(matches!(tx.data(data("one")), Offered::Queued));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(tx.barrier(7));
        drop(tx);
        let got = consumer.await.expect("consumer");
        assert_eq!(
            got,
            [StderrEvent::Data(data("one")), StderrEvent::Barrier(7)]
        );
    }

    /// Once the consumer is gone, nothing is queued (or counted as dropped) any more.
    #[tokio::test]
    async fn gone_consumer_stops_queueing() {
        let (tx, log) = StderrLog::channel(100);
        assert!(matches!(tx.data(data("kept")), Offered::Queued));
        drop(log);
        assert!(matches!(tx.data(data("more")), Offered::ConsumerGone));
        assert!(!tx.barrier(1));
        assert!(tx.shared.lock().items.is_empty());
    }
}
