//! The pipe a pushed NAR takes from the side that reads it (the local store's files or its
//! daemon) to the session that uploads it: chunks handed over whole, bounded in number, so the
//! bytes are copied once on the way (into the upload's frame), not into and out of a byte
//! buffer in between. Dropping either end ends the other's wait: the reader sees the end of
//! the NAR (early, if the writer failed), the writer a broken pipe.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc::{self, OwnedPermit, Sender};

/// Chunks in flight in one pipe.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Largest chunk made from bytes written through [`AsyncWrite`].
const WRITE_CHUNK: usize = 256 << 10;

/// A pipe: its writing and reading ends.
pub(crate) fn nar_pipe() -> (ChunkWriter, ChunkReader) {
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    (
        ChunkWriter {
            tx: Some(tx),
            reserving: None,
        },
        ChunkReader {
            rx,
            current: Bytes::new(),
        },
    )
}

type Reserving =
    Pin<Box<dyn Future<Output = Result<OwnedPermit<Bytes>, mpsc::error::SendError<()>>> + Send>>;

/// The writing end: whole chunks ([`ChunkWriter::sender`]), or bytes through `AsyncWrite`,
/// copied into chunks. The NAR ends when it is dropped or shut down.
pub(crate) struct ChunkWriter {
    tx: Option<Sender<Bytes>>,
    /// A slot being waited for by `poll_write`.
    reserving: Option<Reserving>,
}

impl ChunkWriter {
    /// A sender of whole chunks into this pipe (`None` once shut down).
    pub(crate) fn sender(&self) -> Option<Sender<Bytes>> {
        self.tx.clone()
    }
}

fn broken_pipe() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the upload stopped reading this NAR",
    )
}

impl AsyncWrite for ChunkWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.reserving.is_none() {
            let tx = self.tx.clone().ok_or_else(broken_pipe)?;
            self.reserving = Some(Box::pin(tx.reserve_owned()));
        }
        let Some(reserving) = self.reserving.as_mut() else {
            return Poll::Ready(Err(broken_pipe()));
        };
        let permit = ready!(reserving.as_mut().poll(cx));
        self.reserving = None;
        let permit = permit.map_err(|_| broken_pipe())?;
        let n = data.len().min(WRITE_CHUNK);
        permit.send(Bytes::copy_from_slice(&data[..n]));
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tx = None;
        self.reserving = None;
        Poll::Ready(Ok(()))
    }
}

/// The reading end: the NAR's bytes in order, then end of file once the writer is gone.
pub(crate) struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    /// What is left of the chunk being read.
    current: Bytes,
}

impl AsyncRead for ChunkReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.current.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(chunk) => self.current = chunk,
                // The writer is gone: end of file.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.current.len().min(buf.remaining());
        buf.put_slice(&self.current[..n]);
        self.current.advance(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn chunks_and_written_bytes_arrive_in_order_then_the_end() {
        let (mut w, mut r) = nar_pipe();
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            r.read_to_end(&mut all).await.map(|_| all)
        });
        let tx = w.sender().expect("succeeds");
        tx.send(Bytes::from_static(b"abc")).await.expect("succeeds");
        drop(tx);
        let big = vec![9u8; 3 * WRITE_CHUNK + 1];
        w.write_all(&big).await.expect("succeeds");
        w.shutdown().await.expect("succeeds");
        drop(w);
        let all = reader.await.expect("succeeds").expect("succeeds");
        assert_eq!(&all[..3], b"abc");
        assert_eq!(&all[3..], &big[..]);
    }

    #[tokio::test]
    async fn a_reader_gone_breaks_the_writer() {
        let (mut w, r) = nar_pipe();
        drop(r);
        let e = w.write_all(b"x").await.expect_err("fails");
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
        assert!(
            w.sender()
                .expect("succeeds")
                .send(Bytes::new())
                .await
                .is_err()
        );
    }
}
