//! A channel's stderr: the tail kept for diagnostics, and the optional log queue.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::mpsc;

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

/// Stderr chunks for a log consumer, in order, with gaps where the consumer fell behind
/// (see [`ChannelStats::stderr_log_dropped`](crate::ChannelStats::stderr_log_dropped)).
/// Ends when the channel closes.
pub struct StderrLog {
    rx: mpsc::Receiver<Bytes>,
}

impl StderrLog {
    /// A log queue of `capacity` chunks and the sender the drain task fills it through.
    pub(super) fn channel(capacity: usize) -> (mpsc::Sender<Bytes>, StderrLog) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (tx, StderrLog { rx })
    }

    /// The next chunk, or `None` once the channel is closed and everything was received.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }
}

impl std::fmt::Debug for StderrLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StderrLog").finish_non_exhaustive()
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
