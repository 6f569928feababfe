//! zstd on our side: measuring its speed, a compressing `AsyncWrite`, and decompressing the
//! builder's stream with a bounded window.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::AsyncWrite;
use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};

use super::{CHUNK, LEVEL, Stall};

/// zstd's compression speed on this machine at [`LEVEL`] (input bytes per second), measured
/// once per process on 4 MiB of text-like data.
pub async fn zstd_speed() -> f64 {
    static SPEED: OnceLock<f64> = OnceLock::new();
    if let Some(s) = SPEED.get() {
        return *s;
    }
    let measured = tokio::task::spawn_blocking(|| {
        let sample = sample_data(4 << 20);
        let t = Instant::now();
        let _ = zstd::bulk::compress(&sample, LEVEL);
        sample.len() as f64 / t.elapsed().as_secs_f64().max(1e-6)
    })
    .await
    .unwrap_or(300e6);
    *SPEED.get_or_init(|| measured)
}

/// Words from a small vocabulary with numbers: compresses about like source code and logs.
fn sample_data(len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "store",
        "path",
        "derivation",
        "output",
        "the",
        "nix",
        "build",
        "/lib/",
        "0x1f",
        "return",
        "struct",
        "{\n",
        "}\n",
        "include",
        "error",
        "  ",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[usize::try_from(x % 16).unwrap_or(0)];
        out.extend_from_slice(w.as_bytes());
        if x & 0x30 == 0 {
            out.extend_from_slice(format!("{}", x % 10_000).as_bytes());
        }
        out.push(b' ');
    }
    out.truncate(len);
    out
}

/// An `AsyncWrite` that zstd-compresses into another one.
pub(super) struct ZstdSink<W> {
    inner: W,
    enc: Encoder<'static>,
    out: Vec<u8>,
    pos: usize,
    /// Uncompressed bytes taken.
    pub(super) raw: u64,
    /// Compressed bytes written to `inner`.
    pub(super) compressed: u64,
    finished: bool,
    /// Writing to `inner` failed (the builder went away).
    pub(super) failed: bool,
    stall: Arc<Stall>,
}

impl<W: AsyncWrite + Unpin> ZstdSink<W> {
    pub(super) fn new(inner: W, stall: Arc<Stall>) -> std::io::Result<Self> {
        let mut enc = Encoder::new(LEVEL)?;
        // A checksum per frame: a stream corrupted in transit fails at the far end even if
        // every block still decodes.
        enc.set_parameter(zstd::stream::raw::CParameter::ChecksumFlag(true))?;
        Ok(ZstdSink {
            inner,
            enc,
            out: Vec::with_capacity(CHUNK * 2),
            pos: 0,
            raw: 0,
            compressed: 0,
            finished: false,
            failed: false,
            stall,
        })
    }

    /// Writes out what is pending.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.pos < self.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.pos..]) {
                Poll::Ready(Ok(0)) => {
                    self.failed = true;
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.stall.set(false);
                    self.pos += n;
                    self.compressed += n as u64;
                }
                Poll::Ready(Err(e)) => {
                    self.failed = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    self.stall.set(true);
                    return Poll::Pending;
                }
            }
        }
        self.out.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Runs `step` (flush or finish) until zstd has nothing more to emit, writing as it goes.
    fn poll_emit(&mut self, cx: &mut Context<'_>, finish: bool) -> Poll<std::io::Result<()>> {
        loop {
            if self.poll_drain(cx)?.is_pending() {
                return Poll::Pending;
            }
            if finish && self.finished {
                return Poll::Ready(Ok(()));
            }
            self.out.resize(CHUNK * 2, 0);
            let mut ob = OutBuffer::around(&mut self.out[..]);
            let left = if finish {
                self.enc.finish(&mut ob, true)?
            } else {
                self.enc.flush(&mut ob)?
            };
            let n = ob.pos();
            self.out.truncate(n);
            if left == 0 {
                if finish {
                    self.finished = true;
                }
                if self.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ZstdSink<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.out.resize(CHUNK * 2, 0);
        let mut ib = InBuffer::around(buf);
        let mut ob = OutBuffer::around(&mut this.out[..]);
        this.enc.run(&mut ib, &mut ob)?;
        let (used, n) = (ib.pos(), ob.pos());
        this.out.truncate(n);
        this.raw += used as u64;
        // Start sending right away; what does not fit now goes out on the next call.
        let _ = this.poll_drain(cx)?;
        Poll::Ready(Ok(used))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // A flush of the NAR writer is not a reason to end a zstd block: the far side does
        // not read before its buffer is full anyway.
        self.poll_drain(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.poll_emit(cx, true)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[test]
    fn compressing_sink_round_trips() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let data = sample_data(3 << 20);
            let mut out = Vec::new();
            let stall = Arc::new(Stall::default());
            let mut sink = ZstdSink::new(&mut out, stall).expect("encoder");
            for chunk in data.chunks(10_000) {
                sink.write_all(chunk).await.expect("write");
            }
            sink.shutdown().await.expect("finish");
            let compressed = sink.compressed;
            drop(sink);
            assert_eq!(compressed, out.len() as u64);
            assert!(out.len() < data.len() / 2);
            assert_eq!(zstd::decode_all(&out[..]).expect("decodes"), data);
        });
    }
}
