//! The unread stdout of one channel: in memory up to a limit, then in a spill file.
//!
//! The drain task appends ([`Stdout::push`]) and the application's reader consumes
//! ([`Stdout::poll_read`]); neither touches the spill file. Every file operation (create,
//! write, read back, truncate) is queued to a spill worker on tokio's blocking pool, which
//! runs them strictly in queue order, so a range is always read back after it was written.
//! The worker exists only while it has work: it is started by the first queued operation
//! and ends when the queue is empty (or the channel is gone).
//!
//! Memory of one channel is bounded by
//! [`TransportConfig::stdout_memory_limit`](crate::TransportConfig::stdout_memory_limit)
//! (unread chunks kept in memory) + [`WRITES_IN_FLIGHT_MAX`] (chunks queued for the spill
//! file but not yet written; beyond that the drain task waits for the disk, as it waited for
//! a synchronous write before) + [`REFILL_MAX`] (spilled bytes read back for the reader).
//! If the spill file fails, output stays in memory, unbounded (logged once).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use tokio::io::ReadBuf;
use tokio::sync::Notify;

use crate::config::StdoutSpill;
use crate::error::DisconnectCause;
use crate::shared::ConnShared;

/// Largest range of the spill file read back for the reader at once.
pub(super) const REFILL_MAX: usize = 1 << 20;
/// Bytes queued for the spill file and not yet written, at most (one chunk more if a single
/// chunk is larger).
pub(super) const WRITES_IN_FLIGHT_MAX: usize = 4 << 20;

/// How the stream of stdout ends, once every buffered byte has been read.
pub(super) enum Finish {
    Eof,
    Lost(DisconnectCause),
}

/// A channel's stdout buffer, shared by the drain task, the reader and the spill worker.
pub(super) struct Stdout {
    buf: Mutex<StdoutBuf>,
    /// Signalled by the spill worker each time a queued write is done.
    write_done: Notify,
    /// Where the spill worker runs (the channel's runtime, whoever polls the reader).
    runtime: tokio::runtime::Handle,
}

enum Segment {
    Mem(Bytes),
    File { off: u64, len: u64 },
}

enum SpillOp {
    /// Creates the file first if there is none yet.
    Write {
        off: u64,
        data: Bytes,
    },
    Read {
        ticket: u64,
        off: u64,
        len: usize,
    },
    Truncate,
}

/// The reader's read-back from the spill file.
enum Refill {
    Idle,
    /// A `SpillOp::Read` with this ticket is queued; a stale ticket's result is discarded.
    Requested {
        ticket: u64,
    },
    /// Bytes of the file starting at `off`, for the segment that starts there.
    Ready {
        off: u64,
        data: Bytes,
    },
}

/// Per-buffer sizes, constants outside tests.
#[derive(Debug, Clone, Copy)]
struct Limits {
    memory: usize,
    writes_in_flight: usize,
    refill: usize,
}

/// The unread stdout of one channel: an ordered queue of in-memory chunks and ranges of a
/// spill file.
struct StdoutBuf {
    segments: VecDeque<Segment>,
    limits: Limits,
    /// Bytes in `Segment::Mem`.
    mem_bytes: usize,
    spill: StdoutSpill,
    spill_broken: bool,
    file: Option<Arc<File>>,
    file_write_off: u64,
    /// Unread bytes in `Segment::File` (written, being written, or read back but not yet
    /// consumed).
    file_pending: u64,
    spilled_total: u64,
    /// Bytes of queued `SpillOp::Write`s.
    writes_in_flight: usize,
    ops: VecDeque<SpillOp>,
    worker_running: bool,
    refill: Refill,
    next_ticket: u64,
    /// A failed read-back: the output has a hole, so every later read fails too.
    read_failed: Option<(io::ErrorKind, String)>,
    finish: Option<Finish>,
    reader: Option<Waker>,
    /// Nobody can read any more: no more file work, nothing kept.
    shut: bool,
    conn: Arc<ConnShared>,
}

/// What `try_push` did.
enum Pushed {
    Done {
        start_worker: bool,
    },
    /// The spill queue is full; here is the chunk back.
    WaitForDisk(Bytes),
}

impl Stdout {
    pub(super) fn new(mem_limit: usize, spill: StdoutSpill, conn: Arc<ConnShared>) -> Arc<Self> {
        Self::with_limits(
            Limits {
                memory: mem_limit,
                writes_in_flight: WRITES_IN_FLIGHT_MAX,
                refill: REFILL_MAX,
            },
            spill,
            conn,
        )
    }

    fn with_limits(limits: Limits, spill: StdoutSpill, conn: Arc<ConnShared>) -> Arc<Self> {
        Arc::new(Stdout {
            buf: Mutex::new(StdoutBuf {
                segments: VecDeque::new(),
                limits,
                mem_bytes: 0,
                spill,
                spill_broken: false,
                file: None,
                file_write_off: 0,
                file_pending: 0,
                spilled_total: 0,
                writes_in_flight: 0,
                ops: VecDeque::new(),
                worker_running: false,
                refill: Refill::Idle,
                next_ticket: 0,
                read_failed: None,
                finish: None,
                reader: None,
                shut: false,
                conn,
            }),
            write_done: Notify::new(),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// The buffer, also after a panic while it was locked (a bug: nothing locked here is
    /// meant to panic), so that such a bug does not also turn into lost output.
    fn lock(&self) -> MutexGuard<'_, StdoutBuf> {
        self.buf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `(in memory, in the spill file, ever spilled)` for the channel's statistics.
    pub(super) fn counts(&self) -> (u64, u64, u64) {
        let b = self.lock();
        (b.mem_bytes as u64, b.file_pending, b.spilled_total)
    }

    /// Appends a chunk: to memory while the reader is behind by less than the memory limit,
    /// else to the spill file. Waits only when spill writes are queued beyond
    /// [`WRITES_IN_FLIGHT_MAX`], i.e. the disk is slower than the network.
    pub(super) async fn push(self: &Arc<Self>, mut data: Bytes) {
        loop {
            let pushed = self.lock().try_push(data);
            match pushed {
                Pushed::Done { start_worker } => {
                    if start_worker {
                        self.start_worker();
                    }
                    return;
                }
                Pushed::WaitForDisk(back) => {
                    data = back;
                    self.write_done.notified().await;
                }
            }
        }
    }

    pub(super) fn finish(&self, f: Finish) {
        let reader = {
            let mut b = self.lock();
            if b.finish.is_none() {
                b.finish = Some(f);
            }
            b.reader.take()
        };
        wake(reader);
    }

    /// Copies as much as is in memory, up to the next range that is still in the spill file.
    /// A range in the file is requested from the spill worker, and the reader is woken when
    /// it is in memory.
    pub(super) fn poll_read(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (poll, start_worker) = self.lock().poll_read(cx, buf);
        if start_worker {
            self.start_worker();
        }
        poll
    }

    /// Nobody will read any more (the channel is gone): drops queued file work, the file and
    /// every buffered byte. A spill worker in the middle of an operation finishes it and ends.
    pub(super) fn shutdown(&self) {
        let mut b = self.lock();
        b.shut = true;
        b.ops.clear();
        b.file = None;
        b.release();
    }

    fn start_worker(self: &Arc<Self>) {
        let this = self.clone();
        // The handle is dropped: the worker reports through the buffer, and ends by itself.
        drop(self.runtime.spawn_blocking(move || this.run_worker()));
    }

    /// Runs queued file operations in order until there are none.
    fn run_worker(&self) {
        loop {
            let (op, file, create_in) = {
                let mut b = self.lock();
                let op = if b.shut { None } else { b.ops.pop_front() };
                let Some(op) = op else {
                    b.worker_running = false;
                    return;
                };
                if let SpillOp::Read { ticket, .. } = &op
                    && !matches!(b.refill, Refill::Requested { ticket: t } if t == *ticket)
                {
                    // Cancelled by a failed write; the reader asked again.
                    continue;
                }
                let create_in = match &b.file {
                    None => Some(b.spill.clone()),
                    Some(_) => None,
                };
                (op, b.file.clone(), create_in)
            };
            match op {
                SpillOp::Write { off, data } => {
                    let written = spill_file(file, create_in).and_then(|(f, created)| {
                        f.write_all_at(&data, off)?;
                        Ok((f, created))
                    });
                    let mut b = self.lock();
                    let mut reader = None;
                    if !b.shut {
                        b.writes_in_flight -= data.len();
                        match written {
                            Ok((f, true)) => b.file = Some(f),
                            Ok((_, false)) => {}
                            Err(e) => {
                                b.write_failed(off, data, &e);
                                // It may be waiting for a read-back that was just cancelled.
                                reader = b.reader.take();
                            }
                        }
                    }
                    drop(b);
                    self.write_done.notify_one();
                    wake(reader);
                }
                SpillOp::Read { ticket, off, len } => {
                    let read = match file {
                        Some(f) => {
                            let mut space = vec![0u8; len];
                            f.read_exact_at(&mut space, off)
                                .map(|()| Bytes::from(space))
                        }
                        None => Err(io::Error::other("the spill file is gone")),
                    };
                    let mut b = self.lock();
                    if matches!(b.refill, Refill::Requested { ticket: t } if t == ticket) {
                        match read {
                            Ok(data) => b.refill = Refill::Ready { off, data },
                            Err(e) => {
                                b.refill = Refill::Idle;
                                b.read_failed = Some((
                                    e.kind(),
                                    format!("reading back stdout from its spill file: {e}"),
                                ));
                            }
                        }
                    }
                    let reader = b.reader.take();
                    drop(b);
                    wake(reader);
                }
                SpillOp::Truncate => {
                    if let Some(f) = file
                        && let Err(e) = f.set_len(0)
                    {
                        tracing::debug!("truncating stdout spill file: {e}");
                    }
                }
            }
        }
    }
}

/// The spill file, created (unlinked) according to `create_in` if there is none yet; `true`
/// if it was created here.
fn spill_file(
    file: Option<Arc<File>>,
    create_in: Option<StdoutSpill>,
) -> io::Result<(Arc<File>, bool)> {
    if let Some(f) = file {
        return Ok((f, false));
    }
    let f = match create_in {
        Some(StdoutSpill::TempFile(Some(dir))) => tempfile::tempfile_in(dir)?,
        Some(StdoutSpill::TempFile(None)) => tempfile::tempfile()?,
        Some(StdoutSpill::Disabled) | None => {
            return Err(io::Error::other("spilling is disabled"));
        }
    };
    Ok((Arc::new(f), true))
}

fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

impl StdoutBuf {
    fn mem_add(&mut self, n: usize) {
        self.mem_bytes += n;
        let c = &self.conn.counters;
        c.stdout_buffered.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn mem_sub(&mut self, n: usize) {
        self.mem_bytes -= n;
        let c = &self.conn.counters;
        c.stdout_buffered.fetch_sub(n as u64, Ordering::Relaxed);
    }

    /// Queues a file operation; true if the worker must be started for it.
    fn enqueue(&mut self, op: SpillOp) -> bool {
        self.ops.push_back(op);
        !std::mem::replace(&mut self.worker_running, true)
    }

    fn try_push(&mut self, data: Bytes) -> Pushed {
        let len = data.len();
        let spill = self.mem_bytes + len > self.limits.memory
            && !self.spill_broken
            && !self.shut
            && matches!(self.spill, StdoutSpill::TempFile(_));
        if !spill {
            self.mem_add(len);
            self.segments.push_back(Segment::Mem(data));
            wake(self.reader.take());
            return Pushed::Done {
                start_worker: false,
            };
        }
        if self.writes_in_flight > 0 && self.writes_in_flight + len > self.limits.writes_in_flight {
            return Pushed::WaitForDisk(data);
        }
        let off = self.file_write_off;
        let n = len as u64;
        self.file_write_off += n;
        self.file_pending += n;
        self.spilled_total += n;
        self.writes_in_flight += len;
        self.conn
            .counters
            .stdout_spilled
            .fetch_add(n, Ordering::Relaxed);
        match self.segments.back_mut() {
            Some(Segment::File { off: o, len: l }) if *o + *l == off => *l += n,
            _ => self.segments.push_back(Segment::File { off, len: n }),
        }
        let start_worker = self.enqueue(SpillOp::Write { off, data });
        wake(self.reader.take());
        Pushed::Done { start_worker }
    }

    /// A queued write failed: its bytes go back into memory at their place in the output,
    /// and nothing more is spilled.
    fn write_failed(&mut self, off: u64, data: Bytes, e: &io::Error) {
        if !self.spill_broken {
            tracing::warn!("stdout spill file failed, keeping unread output in memory: {e}");
            self.spill_broken = true;
        }
        let mem = data.len();
        let n = mem as u64;
        let end = off + n;
        // The range lies inside one file segment: a failed range has not been read back
        // (reads are queued behind the writes of their range), so nothing of it was consumed.
        let Some(i) = self.segments.iter().position(
            |s| matches!(s, Segment::File { off: o, len: l } if *o <= off && end <= *o + *l),
        ) else {
            tracing::error!("stdout spill: failed write at {off}+{n} matches no segment");
            return;
        };
        let Some(Segment::File {
            off: seg_off,
            len: seg_len,
        }) = self.segments.remove(i)
        else {
            return;
        };
        let mut parts = Vec::with_capacity(3);
        if seg_off < off {
            parts.push(Segment::File {
                off: seg_off,
                len: off - seg_off,
            });
        }
        parts.push(Segment::Mem(data));
        if end < seg_off + seg_len {
            parts.push(Segment::File {
                off: end,
                len: seg_off + seg_len - end,
            });
        }
        for (k, p) in parts.into_iter().enumerate() {
            self.segments.insert(i + k, p);
        }
        self.file_pending -= n;
        self.spilled_total -= n;
        self.conn
            .counters
            .stdout_spilled
            .fetch_sub(n, Ordering::Relaxed);
        self.mem_add(mem);
        // A queued read-back may cover the range that is now in memory: cancel it, the
        // reader asks again for what is still in the file.
        if let Refill::Requested { .. } = self.refill {
            self.refill = Refill::Idle;
        }
    }

    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> (Poll<io::Result<()>>, bool) {
        if let Some((kind, msg)) = &self.read_failed {
            return (Poll::Ready(Err(io::Error::new(*kind, msg.clone()))), false);
        }
        let mut start_worker = false;
        let mut copied = 0usize;
        while buf.remaining() > 0 {
            match self.segments.front_mut() {
                None => break,
                Some(Segment::Mem(b)) => {
                    let n = b.len().min(buf.remaining());
                    buf.put_slice(&b[..n]);
                    b.advance(n);
                    if b.is_empty() {
                        self.segments.pop_front();
                    }
                    self.mem_sub(n);
                    copied += n;
                }
                Some(Segment::File { off, len }) => {
                    let (seg_off, seg_len) = (*off, *len);
                    let ready = match &mut self.refill {
                        Refill::Ready { off: r, data } if *r == seg_off && !data.is_empty() => {
                            let n = data
                                .len()
                                .min(buf.remaining())
                                .min(usize::try_from(seg_len).unwrap_or(usize::MAX));
                            buf.put_slice(&data[..n]);
                            data.advance(n);
                            *r += n as u64;
                            Some((n, data.is_empty()))
                        }
                        _ => None,
                    };
                    match ready {
                        Some((n, used_up)) => {
                            if used_up {
                                self.refill = Refill::Idle;
                            }
                            start_worker |= self.consume_file(n as u64);
                            copied += n;
                        }
                        None if matches!(self.refill, Refill::Requested { .. }) => break,
                        None => {
                            // Idle, or left over from a range that is no longer at the front.
                            let ticket = self.next_ticket;
                            self.next_ticket += 1;
                            let len = usize::try_from(seg_len)
                                .unwrap_or(usize::MAX)
                                .min(self.limits.refill);
                            self.refill = Refill::Requested { ticket };
                            start_worker |= self.enqueue(SpillOp::Read {
                                ticket,
                                off: seg_off,
                                len,
                            });
                            break;
                        }
                    }
                }
            }
        }
        if copied > 0 {
            return (Poll::Ready(Ok(())), start_worker);
        }
        if !self.segments.is_empty() {
            // Waiting for a read-back.
            self.reader = Some(cx.waker().clone());
            return (Poll::Pending, start_worker);
        }
        let poll = match &self.finish {
            Some(Finish::Eof) => Poll::Ready(Ok(())),
            Some(Finish::Lost(cause)) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("SSH connection lost before end of output: {cause}"),
            ))),
            None => {
                self.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        };
        (poll, start_worker)
    }

    /// `n` bytes at the front of the first (file) segment were handed to the reader. True if
    /// the spill worker must be started (to truncate the file).
    fn consume_file(&mut self, n: u64) -> bool {
        if let Some(Segment::File { off, len }) = self.segments.front_mut() {
            *off += n;
            *len -= n;
            if *len == 0 {
                self.segments.pop_front();
            }
        }
        self.file_pending -= n;
        if self.file_pending == 0 && self.file.is_some() {
            // All spilled data consumed (none is being written either: bytes in flight are
            // pending too): start the file over. Writes queued from now on come after the
            // truncation.
            self.file_write_off = 0;
            return self.enqueue(SpillOp::Truncate);
        }
        false
    }

    /// Gives back this buffer's share of the connection's buffered-bytes gauge.
    fn release(&mut self) {
        let n = self.mem_bytes;
        self.mem_sub(n);
        self.segments.clear();
        self.refill = Refill::Idle;
    }
}

impl Drop for StdoutBuf {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(memory: usize, writes_in_flight: usize, refill: usize) -> Limits {
        Limits {
            memory,
            writes_in_flight,
            refill,
        }
    }

    fn spill_in(dir: &tempfile::TempDir) -> StdoutSpill {
        StdoutSpill::TempFile(Some(dir.path().to_path_buf()))
    }

    /// One `poll_read` into a buffer of `max` bytes, waiting as the channel reader would.
    async fn read_some(out: &Arc<Stdout>, max: usize) -> io::Result<Vec<u8>> {
        let mut space = vec![0u8; max];
        let n = futures::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut space);
            out.poll_read(cx, &mut rb)
                .map(|r| r.map(|()| rb.filled().len()))
        })
        .await?;
        space.truncate(n);
        Ok(space)
    }

    /// Reads until end-of-file.
    async fn read_to_end(out: &Arc<Stdout>, chunk: usize) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let got =
                tokio::time::timeout(std::time::Duration::from_secs(10), read_some(out, chunk))
                    .await
                    .expect("read stalled")
                    .expect("read");
            if got.is_empty() {
                return all;
            }
            all.extend_from_slice(&got);
        }
    }

    /// Waits until the spill worker has run everything queued.
    async fn settle(out: &Arc<Stdout>) {
        for _ in 0..1000 {
            if !out.lock().worker_running {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        panic!("spill worker did not finish");
    }

    /// A byte pattern that shows any reordering or loss: position `i` holds a hash of `i`.
    fn pattern(from: usize, len: usize) -> Vec<u8> {
        (from..from + len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spill_keeps_order_and_bounds_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = ConnShared::detached();
        let out = Stdout::with_limits(limits(10, 64, 6), spill_in(&dir), conn.clone());
        let expected = pattern(0, 140);
        for chunk in expected.chunks(7) {
            out.push(Bytes::copy_from_slice(chunk)).await;
            let b = out.lock();
            assert!(b.mem_bytes <= 10, "{} in memory", b.mem_bytes);
            assert!(b.writes_in_flight <= 64);
        }
        let (mem, pending, spilled) = out.counts();
        assert_eq!(mem + pending, 140);
        assert_eq!(spilled, pending);
        assert!(spilled > 0);
        assert_eq!(
            conn.counters.stdout_spilled.load(Ordering::Relaxed),
            spilled
        );
        assert_eq!(conn.counters.stdout_buffered.load(Ordering::Relaxed), mem);

        // A short read hands out only what is in memory before the first spilled range, and
        // requests that range; refills are at most 6 bytes.
        out.push(Bytes::from_static(b"tail")).await;
        out.finish(Finish::Eof);
        let spilled = out.counts().2;
        let mut all = Vec::new();
        loop {
            let got = read_some(&out, 3).await.expect("read");
            if got.is_empty() {
                break;
            }
            assert!(out.lock().mem_bytes <= 10);
            if let Refill::Ready { data, .. } = &out.lock().refill {
                assert!(data.len() <= 6);
            }
            all.extend_from_slice(&got);
        }
        let mut want = expected.clone();
        want.extend_from_slice(b"tail");
        assert_eq!(all, want);
        assert_eq!(out.counts(), (0, 0, spilled));
        assert_eq!(conn.counters.stdout_buffered.load(Ordering::Relaxed), 0);
        // Everything spilled was consumed: the file was started over.
        settle(&out).await;
        let b = out.lock();
        assert_eq!(b.file_write_off, 0);
        assert_eq!(
            b.file.as_ref().map(|f| f.metadata().expect("stat").len()),
            Some(0)
        );
    }

    /// The reader runs concurrently with a writer that spills, with both queues tiny, so that
    /// reads are requested for ranges whose writes are still queued, the reader waits for
    /// read-backs and the drain side waits for the disk. Every byte arrives, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_interleaved_with_spill_writes_keep_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = ConnShared::detached();
        let out = Stdout::with_limits(limits(1000, 3000, 700), spill_in(&dir), conn.clone());
        let total = 400_000;
        let writer = {
            let out = out.clone();
            tokio::spawn(async move {
                let mut at = 0;
                let mut size = 1;
                while at < total {
                    let len = size.min(total - at);
                    out.push(Bytes::from(pattern(at, len))).await;
                    {
                        let b = out.lock();
                        assert!(b.mem_bytes <= 1000);
                        assert!(b.writes_in_flight <= 3000);
                    }
                    at += len;
                    size = size * 7 % 2039 + 1;
                    if size % 5 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                out.finish(Finish::Eof);
            })
        };
        let mut got = Vec::new();
        let mut size = 1;
        loop {
            let part =
                tokio::time::timeout(std::time::Duration::from_secs(20), read_some(&out, size))
                    .await
                    .expect("reader stalled")
                    .expect("read");
            if part.is_empty() {
                break;
            }
            got.extend_from_slice(&part);
            size = size * 5 % 1531 + 1;
        }
        writer.await.expect("writer");
        assert_eq!(got.len(), total);
        assert!(got == pattern(0, total), "bytes out of order");
        let (mem, pending, spilled) = out.counts();
        assert_eq!((mem, pending), (0, 0));
        assert!(spilled > 0, "nothing was spilled");
        assert_eq!(conn.counters.stdout_buffered.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_spill_memory_grows_but_is_counted() {
        let conn = ConnShared::detached();
        let out = Stdout::with_limits(limits(4, 64, 64), StdoutSpill::Disabled, conn.clone());
        out.push(Bytes::from_static(b"0123456789")).await;
        assert_eq!(out.counts(), (10, 0, 0));
        assert_eq!(conn.counters.stdout_buffered.load(Ordering::Relaxed), 10);
        out.finish(Finish::Eof);
        assert_eq!(read_to_end(&out, 3).await, b"0123456789");
        assert_eq!(conn.counters.stdout_buffered.load(Ordering::Relaxed), 0);
    }

    /// The spill file cannot be created: what was queued for it comes back into memory at
    /// its place, later output stays in memory, and nothing counts as spilled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spill_failure_falls_back_to_memory_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = StdoutSpill::TempFile(Some(dir.path().join("no-such-dir")));
        let conn = ConnShared::detached();
        let out = Stdout::with_limits(limits(10, 1000, 64), missing, conn.clone());
        let expected = pattern(0, 200);
        for chunk in expected.chunks(9) {
            out.push(Bytes::copy_from_slice(chunk)).await;
        }
        settle(&out).await;
        assert!(out.lock().spill_broken);
        assert_eq!(out.counts(), (200, 0, 0));
        assert_eq!(conn.counters.stdout_spilled.load(Ordering::Relaxed), 0);
        assert_eq!(conn.counters.stdout_buffered.load(Ordering::Relaxed), 200);
        out.finish(Finish::Eof);
        assert_eq!(read_to_end(&out, 16).await, expected);
    }

    /// A spilled range that cannot be read back is an error for the reader, now and on every
    /// later read, never a silent gap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spill_read_error_reaches_the_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = ConnShared::detached();
        let out = Stdout::with_limits(limits(4, 1000, 64), spill_in(&dir), conn);
        out.push(Bytes::from_static(b"mem")).await;
        out.push(Bytes::from_static(b"spilled")).await;
        out.finish(Finish::Eof);
        settle(&out).await;
        // Something else truncates the file behind our back.
        let file = out.lock().file.clone().expect("spill file");
        file.set_len(0).expect("truncate");
        assert_eq!(read_some(&out, 64).await.expect("memory part"), b"mem");
        let e = read_some(&out, 64)
            .await
            .expect_err("the spilled part is gone");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("spill file"), "{e}");
        assert!(read_some(&out, 64).await.is_err(), "the error sticks");
    }

    /// When the channel goes away, queued file work is dropped, the worker ends and the file
    /// is closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_stops_the_worker_and_frees_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = ConnShared::detached();
        let out = Stdout::with_limits(limits(16, 1 << 20, 64), spill_in(&dir), conn.clone());
        for chunk in pattern(0, 100_000).chunks(1000) {
            out.push(Bytes::copy_from_slice(chunk)).await;
        }
        settle(&out).await;
        let file = out.lock().file.clone().expect("spill file");
        assert_eq!(Arc::strong_count(&file), 2);
        out.shutdown();
        settle(&out).await;
        assert_eq!(Arc::strong_count(&file), 1, "the buffer let go of the file");
        assert_eq!(out.counts().0, 0);
        assert_eq!(conn.counters.stdout_buffered.load(Ordering::Relaxed), 0);
        // Reading a shut buffer finds nothing and does not start the worker again.
        out.finish(Finish::Eof);
        assert!(read_some(&out, 64).await.expect("eof").is_empty());
        assert!(!out.lock().worker_running);
    }
}
