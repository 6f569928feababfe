//! The unread stdout of one channel: in memory up to a limit, then in a spill file.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use tokio::io::ReadBuf;

use crate::config::StdoutSpill;
use crate::error::DisconnectCause;

enum Segment {
    Mem(Bytes),
    File { off: u64, len: u64 },
}

/// How the stream of stdout ends, once every buffered byte has been read.
pub(super) enum Finish {
    Eof,
    Lost(DisconnectCause),
}

/// The unread stdout of one channel: an ordered queue of in-memory chunks and ranges of a
/// spill file.
pub(super) struct StdoutBuf {
    segments: VecDeque<Segment>,
    pub(super) mem_bytes: usize,
    mem_limit: usize,
    spill: StdoutSpill,
    spill_broken: bool,
    file: Option<File>,
    file_write_off: u64,
    pub(super) file_pending: u64,
    pub(super) spilled_total: u64,
    finish: Option<Finish>,
    waker: Option<Waker>,
}

impl StdoutBuf {
    pub(super) fn new(mem_limit: usize, spill: StdoutSpill) -> Self {
        StdoutBuf {
            segments: VecDeque::new(),
            mem_bytes: 0,
            mem_limit,
            spill,
            spill_broken: false,
            file: None,
            file_write_off: 0,
            file_pending: 0,
            spilled_total: 0,
            finish: None,
            waker: None,
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Appends; returns `(bytes kept in memory, bytes spilled)` for the counters.
    ///
    /// Spill writes are synchronous `pwrite`s of at most one SSH packet into an unlinked
    /// file, i.e. page-cache copies; they happen only while the reader is behind by more
    /// than the memory limit.
    pub(super) fn push(&mut self, data: Bytes) -> (usize, usize) {
        let len = data.len();
        if self.mem_bytes + len > self.mem_limit
            && !self.spill_broken
            && let StdoutSpill::TempFile(dir) = &self.spill
        {
            match self.spill_write(&data, dir.clone()) {
                Ok(()) => {
                    self.wake();
                    return (0, len);
                }
                Err(e) => {
                    tracing::warn!(
                        "stdout spill file failed, keeping unread output in memory: {e}"
                    );
                    self.spill_broken = true;
                }
            }
        }
        self.mem_bytes += len;
        self.segments.push_back(Segment::Mem(data));
        self.wake();
        (len, 0)
    }

    fn spill_write(&mut self, data: &[u8], dir: Option<PathBuf>) -> io::Result<()> {
        if self.file.is_none() {
            let f = match dir {
                Some(d) => tempfile::tempfile_in(d)?,
                None => tempfile::tempfile()?,
            };
            self.file = Some(f);
        }
        let off = self.file_write_off;
        if let Some(f) = &self.file {
            f.write_all_at(data, off)?;
        }
        let len = data.len() as u64;
        self.file_write_off += len;
        self.file_pending += len;
        self.spilled_total += len;
        match self.segments.back_mut() {
            Some(Segment::File { off: o, len: l }) if *o + *l == off => *l += len,
            _ => self.segments.push_back(Segment::File { off, len }),
        }
        Ok(())
    }

    pub(super) fn finish(&mut self, f: Finish) {
        if self.finish.is_none() {
            self.finish = Some(f);
        }
        self.wake();
    }

    /// Copies as much as fits. Returns bytes copied from memory (for the gauge).
    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> (Poll<io::Result<()>>, usize) {
        let mut from_mem = 0usize;
        let mut copied = 0usize;
        while buf.remaining() > 0 {
            match self.segments.front_mut() {
                None => break,
                Some(Segment::Mem(b)) => {
                    let n = b.len().min(buf.remaining());
                    buf.put_slice(&b[..n]);
                    b.advance(n);
                    from_mem += n;
                    copied += n;
                    self.mem_bytes -= n;
                    if b.is_empty() {
                        self.segments.pop_front();
                    }
                }
                // Hand out what came from memory first, so that a failing file read never
                // swallows bytes already copied.
                Some(Segment::File { .. }) if copied > 0 => break,
                Some(Segment::File { off, len }) => {
                    let want = usize::try_from(*len)
                        .unwrap_or(usize::MAX)
                        .min(buf.remaining());
                    let Some(file) = &self.file else {
                        return (
                            Poll::Ready(Err(io::Error::other("spill file missing"))),
                            from_mem,
                        );
                    };
                    let dst = buf.initialize_unfilled_to(want);
                    if let Err(e) = file.read_exact_at(dst, *off) {
                        return (
                            Poll::Ready(Err(io::Error::new(
                                e.kind(),
                                format!("reading stdout spill file: {e}"),
                            ))),
                            from_mem,
                        );
                    }
                    buf.advance(want);
                    copied += want;
                    *off += want as u64;
                    *len -= want as u64;
                    self.file_pending -= want as u64;
                    if *len == 0 {
                        self.segments.pop_front();
                    }
                    if self.file_pending == 0 {
                        // All spilled data consumed: start the file over.
                        self.file_write_off = 0;
                        if let Some(f) = &self.file
                            && let Err(e) = f.set_len(0)
                        {
                            tracing::debug!("truncating stdout spill file: {e}");
                        }
                    }
                }
            }
        }
        if copied > 0 {
            return (Poll::Ready(Ok(())), from_mem);
        }
        match &self.finish {
            Some(Finish::Eof) => (Poll::Ready(Ok(())), 0),
            Some(Finish::Lost(cause)) => (
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("SSH connection lost before end of output: {cause}"),
                ))),
                0,
            ),
            None => {
                self.waker = Some(cx.waker().clone());
                (Poll::Pending, 0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(buf: &mut StdoutBuf, chunk: usize) -> Vec<u8> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        loop {
            let mut space = vec![0u8; chunk];
            let mut rb = ReadBuf::new(&mut space);
            match buf.poll_read(&mut cx, &mut rb).0 {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return out,
                Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => return out,
            }
        }
    }

    #[test]
    fn spill_keeps_order_and_bounds_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = StdoutBuf::new(10, StdoutSpill::TempFile(Some(dir.path().to_path_buf())));
        let mut expected = Vec::new();
        let mut spilled = 0;
        for i in 0u8..20 {
            let chunk: Vec<u8> = (0..7).map(|j| i.wrapping_mul(7).wrapping_add(j)).collect();
            expected.extend_from_slice(&chunk);
            let (_, s) = b.push(Bytes::from(chunk));
            spilled += s;
            assert!(b.mem_bytes <= 10);
        }
        assert!(spilled > 0);
        // Read part, push more (goes after the spilled data), then read the rest.
        let first = read_all(&mut b, 3).len();
        assert_eq!(first, expected.len());
        b.push(Bytes::from_static(b"tail"));
        expected.extend_from_slice(b"tail");
        b.finish(Finish::Eof);
        let mut again = StdoutBuf::new(10, StdoutSpill::TempFile(Some(dir.path().to_path_buf())));
        let mut all = Vec::new();
        for (i, c) in expected.chunks(5).enumerate() {
            again.push(Bytes::copy_from_slice(c));
            if i % 3 == 0 {
                all.extend(read_all(&mut again, 4));
            }
        }
        again.finish(Finish::Eof);
        all.extend(read_all(&mut again, 64));
        assert_eq!(all, expected);
        assert_eq!(again.file_pending, 0);
    }

    #[test]
    fn without_spill_memory_grows_but_is_counted() {
        let mut b = StdoutBuf::new(4, StdoutSpill::Disabled);
        assert_eq!(b.push(Bytes::from_static(b"0123456789")), (10, 0));
        assert_eq!(b.mem_bytes, 10);
        b.finish(Finish::Eof);
        assert_eq!(read_all(&mut b, 3), b"0123456789");
    }
}
