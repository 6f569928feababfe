//! The handles an application holds: the stdin writer, the stdout reader and the status.
//! Each keeps the channel open (see [`Lease`]) until dropped.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use super::state::{ChannelCore, ChannelStats, ExitStatus, Lease};
use crate::error::{Stage, TransportError};

/// The remote command's stdin. `shutdown()` sends EOF.
///
/// Writes go out in chunks of at most one SSH packet (russh's writer never sends more than
/// the peer's maximum packet size per message), so no single write can straddle a rekey
/// (russh#761). A write to a channel the server has closed fails with `BrokenPipe` instead of
/// waiting for window that will never come.
pub struct ChannelStdin {
    pub(super) inner: Box<dyn AsyncWrite + Send + Sync + Unpin>,
    pub(super) core: Arc<ChannelCore>,
    pub(super) _lease: Arc<Lease>,
}

impl ChannelStdin {
    fn closed_error(&self) -> io::Error {
        let state = self.core.state.borrow().clone();
        match state.lost {
            Some(cause) => io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("SSH connection lost: {cause}"),
            ),
            None => io::Error::new(
                io::ErrorKind::BrokenPipe,
                "SSH channel closed by the server",
            ),
        }
    }
}

impl AsyncWrite for ChannelStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.core.write_closed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(self.closed_error()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.core.count_stdin(n as u64);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.core.writer_waker.register(cx.waker());
                if this.core.write_closed.load(Ordering::SeqCst) {
                    return Poll::Ready(Err(this.closed_error()));
                }
                Poll::Pending
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.core.eof_sent.load(Ordering::SeqCst)
            || self.core.write_closed.load(Ordering::SeqCst)
        {
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Ready(Ok(())) => {
                this.core.eof_sent.store(true, Ordering::SeqCst);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.core.writer_waker.register(cx.waker());
                if this.core.write_closed.load(Ordering::SeqCst) {
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

/// The remote command's stdout (or a forwarded connection's data). Reads never block the
/// connection: data is already buffered by the drain task. End-of-file means the server sent
/// EOF or closed the channel; a lost connection is an error (`ConnectionAborted`) so it is
/// never mistaken for a complete output.
pub struct ChannelStdout {
    pub(super) core: Arc<ChannelCore>,
    pub(super) _lease: Arc<Lease>,
}

impl AsyncRead for ChannelStdout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.core.stdout.poll_read(cx, buf)
    }
}

/// Exit status, stderr tail and statistics of a channel. Cloneable; holding one keeps the
/// channel open (so the exit status can still arrive).
#[derive(Clone)]
pub struct ExecStatus {
    pub(super) core: Arc<ChannelCore>,
    pub(super) _lease: Arc<Lease>,
}

impl ExecStatus {
    /// Waits until the channel is closed and returns how the command ended. The wait is
    /// bounded by the connection: if it dies (keepalive, reset), this returns
    /// [`TransportError::Disconnected`] unless the exit status had already arrived.
    pub async fn exit(&self) -> Result<ExitStatus, TransportError> {
        let mut rx = self.core.state.subscribe();
        let s = match rx.wait_for(|s| s.closed || s.lost.is_some()).await {
            Ok(s) => s.clone(),
            Err(_) => self.core.state.borrow().clone(),
        };
        match (s.exit, s.lost) {
            (Some(exit), _) => Ok(exit),
            (None, Some(cause)) => Err(TransportError::Disconnected {
                stage: Stage::Connected,
                cause,
            }),
            (None, None) => Ok(ExitStatus::ClosedWithoutStatus),
        }
    }

    /// The exit status if it has arrived.
    pub fn try_exit(&self) -> Option<ExitStatus> {
        self.core.state.borrow().exit.clone()
    }

    /// Whether the channel is closed (by either side) or its connection is lost.
    pub fn is_closed(&self) -> bool {
        let s = self.core.state.borrow();
        s.closed || s.lost.is_some()
    }

    /// A future that resolves once the channel is closed (by either side; after the last
    /// handle is dropped, once the drain task has ended it, see the crate docs on closing) or
    /// its connection is lost. Unlike `ExecStatus` itself it does not keep the channel open,
    /// so a pool can drop every handle and still learn when the server's session slot is
    /// free again.
    pub fn closed_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.core.state.subscribe();
        async move {
            // An error means the drain task and every handle are gone: closed too.
            let _ = rx.wait_for(|s| s.closed || s.lost.is_some()).await;
        }
    }

    /// Sends a no-op channel request the server must answer; resolves with its id once the
    /// answer has been handled by the drain task (stdout before it is buffered, stderr before
    /// it is in the tail and, as [`StderrEvent::Barrier(id)`](crate::StderrEvent::Barrier),
    /// in the log queue).
    ///
    /// So after reading a reply on stdout, `barrier()` and then reading the log queue up to
    /// that `Barrier(id)` yields every byte of stderr the server sent before the reply. This
    /// rests on SSH ordering: the server answers a request after everything it sent on the
    /// channel before, and answers requests in order (RFC 4254 §5.4). The request is an
    /// `env` request (`NIXMUX_BARRIER=<id>`), which OpenSSH refuses once the command runs;
    /// a refusal (CHANNEL_FAILURE) completes the barrier like an acceptance. Ids count from 1
    /// per channel; concurrent barriers are answered in the order they were sent.
    ///
    /// Fails with [`TransportError::Disconnected`] if the connection ends first, and with
    /// [`TransportError::ChannelClosed`] if the channel closes first (a server does not
    /// answer on a channel it has closed; the log queue then ends after the last stderr).
    /// The wait is bounded like [`exit`](Self::exit): a dead or frozen peer ends it within
    /// `keepalive_interval * (keepalive_max_misses + 1)`; with keepalives disabled, bound it
    /// yourself. Works without a log queue too (there is just no `Barrier` item).
    pub async fn barrier(&self) -> Result<u64, TransportError> {
        let (reply, answer) = oneshot::channel();
        if self.core.barriers.send(reply).is_err() {
            return Err(self.core.end_error("barrier"));
        }
        // The drain task drops the reply only once it has ended.
        answer
            .await
            .unwrap_or_else(|_| Err(self.core.end_error("barrier")))
    }

    /// The last `stderr_tail_bytes` of stderr.
    pub fn stderr_tail(&self) -> Vec<u8> {
        self.core
            .stderr
            .lock()
            .map(|t| t.buf.iter().copied().collect())
            .unwrap_or_default()
    }

    /// [`stderr_tail`](Self::stderr_tail) as text (invalid UTF-8 replaced).
    pub fn stderr_tail_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr_tail()).into_owned()
    }

    /// Statistics of this channel.
    pub fn stats(&self) -> ChannelStats {
        self.core.stats()
    }
}

impl std::fmt::Debug for ChannelStdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.core.debug_as("ChannelStdin", f)
    }
}

impl std::fmt::Debug for ChannelStdout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.core.debug_as("ChannelStdout", f)
    }
}

impl std::fmt::Debug for ExecStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.core.debug_as("ExecStatus", f)
    }
}
