//! A wrapper around the byte stream russh runs on.
//!
//! It does three things russh cannot do for us:
//! * records the first I/O error or end-of-file, so a reset connection is reported as a reset
//!   even when russh's own error path loses it (its session task returns early if shutting
//!   down the socket fails, without telling the handler why);
//! * counts encrypted bytes on the wire;
//! * swallows errors from shutting down a dead socket, for the same reason;
//! * has a kill switch: russh's session task is spawned inside `connect_stream` and its join
//!   handle is not reachable, so a handshake that times out would otherwise leave that task
//!   reading a silent socket forever. Killing the stream makes every read and write fail,
//!   which ends the task.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the stream saw first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    Eof,
    Error {
        kind: io::ErrorKind,
        message: String,
    },
    Killed,
}

#[derive(Debug, Default)]
pub(crate) struct StreamMonitor {
    killed: AtomicBool,
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    end: Mutex<Option<StreamEnd>>,
}

impl StreamMonitor {
    /// Makes every further read and write fail, and wakes whoever is waiting on them.
    pub(crate) fn kill(&self) {
        self.record(StreamEnd::Killed);
        self.killed.store(true, Ordering::SeqCst);
        self.read_waker.wake();
        self.write_waker.wake();
    }

    pub(crate) fn end(&self) -> Option<StreamEnd> {
        self.end.lock().map(|g| g.clone()).unwrap_or(None)
    }

    fn record(&self, end: StreamEnd) {
        if let Ok(mut g) = self.end.lock()
            && g.is_none()
        {
            *g = Some(end);
        }
    }

    fn record_err(&self, e: &io::Error) {
        self.record(StreamEnd::Error {
            kind: e.kind(),
            message: e.to_string(),
        });
    }

    fn killed_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connection aborted by nixmux",
        )
    }

    fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

pub(crate) struct MonitoredStream<S> {
    inner: S,
    mon: std::sync::Arc<StreamMonitor>,
    /// Called after every read that returned data (TCP_QUICKACK, see `connect`).
    after_read: Option<Box<dyn Fn() + Send + Sync>>,
}

impl<S> MonitoredStream<S> {
    pub(crate) fn new(
        inner: S,
        mon: std::sync::Arc<StreamMonitor>,
        after_read: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> Self {
        MonitoredStream {
            inner,
            mon,
            after_read,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MonitoredStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.mon.is_killed() {
            return Poll::Ready(Err(StreamMonitor::killed_error()));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n == 0 && buf.remaining() > 0 {
                    this.mon.record(StreamEnd::Eof);
                } else if let Some(f) = &this.after_read {
                    f();
                }
                this.mon.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.mon.record_err(&e);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                this.mon.read_waker.register(cx.waker());
                if this.mon.is_killed() {
                    return Poll::Ready(Err(StreamMonitor::killed_error()));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MonitoredStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.mon.is_killed() {
            return Poll::Ready(Err(StreamMonitor::killed_error()));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.mon
                    .bytes_written
                    .fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => {
                this.mon.record_err(&e);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                this.mon.write_waker.register(cx.waker());
                if this.mon.is_killed() {
                    return Poll::Ready(Err(StreamMonitor::killed_error()));
                }
                Poll::Pending
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.mon.is_killed() {
            return Poll::Ready(Err(StreamMonitor::killed_error()));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(Err(e)) => {
                this.mon.record_err(&e);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                this.mon.write_waker.register(cx.waker());
                if this.mon.is_killed() {
                    return Poll::Ready(Err(StreamMonitor::killed_error()));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.mon.is_killed() {
            // Nothing to shut down gracefully any more; let russh finish.
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            // Shutting down a socket the peer already reset fails (ENOTCONN). russh's session
            // task returns that error *instead of* telling the handler why the session
            // ended, so it is swallowed here: the real cause matters, this one does not.
            Poll::Ready(Err(e)) => {
                tracing::debug!("ignoring shutdown error on a finished SSH stream: {e}");
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}
