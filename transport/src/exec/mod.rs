//! Channels whose incoming messages are always drained.
//!
//! russh delivers a channel's messages through a bounded queue that its single session task
//! fills; when a queue is full the session task waits, and with it every other channel of the
//! connection. So every channel here gets a drain task that reads that queue promptly, no
//! matter what the application does:
//!
//! * stdout (and forwarded data) go to a per-channel byte queue the reader consumes; above
//!   [`TransportConfig::stdout_memory_limit`](crate::TransportConfig::stdout_memory_limit)
//!   unread bytes, new data goes to an unlinked temporary file (if enabled) and is read back
//!   from there in order;
//! * stderr goes to a tail ring buffer (the last N KiB, what explains a dead remote
//!   process) and, optionally, to a log queue bounded in bytes that, when the consumer is
//!   behind, drops stderr and says so in place (bytes and lines);
//! * window adjustments, exit status, EOF and close are recorded;
//! * answers to our channel requests complete, in order, the exec request and then barrier
//!   requests ([`ExecStatus::barrier`]), which mark in the log queue the point up to which
//!   everything the server sent has been handled.
//!
//! When the [`ExecChannel`] and every part taken from it are dropped, the drain task sends
//! CHANNEL_CLOSE (a dropped russh `Channel` does not, leaking an sshd session slot until the
//! connection ends) and exits.
//!
//! Layout: [`stdout`] holds the stdout buffer and its spill file, [`stderr`] the tail and
//! the log queue, [`state`] what the drain task and the handles share, [`drain`] the drain
//! task (and what happens when a channel is abandoned), [`handles`] the stdin writer, stdout
//! reader and status handle, [`parts`] the assembly of all of these.

mod drain;
mod handles;
mod parts;
mod state;
mod stderr;
mod stdout;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use russh::client::Msg;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use self::handles::{ChannelStdin, ChannelStdout, ExecStatus};
pub(crate) use self::parts::ChannelParts;
pub use self::state::{ChannelStats, ExitStatus};
pub use self::stderr::{StderrEvent, StderrLog};

use self::drain::OnDrop;
use self::state::ChanState;
use crate::config::ExecOptions;
use crate::error::{Stage, TransportError};
use crate::handler::ConnInner;
use crate::shared::classify_with;

/// Sends the exec request, starts draining, and waits for the server's answer.
pub(crate) async fn start_exec(
    conn: Arc<ConnInner>,
    channel: russh::Channel<Msg>,
    command: &str,
    options: ExecOptions,
) -> Result<ExecChannel, TransportError> {
    let exec_timeout = conn.config.exec_timeout;
    let shared = conn.shared.clone();
    let on_drop = OnDrop {
        terminate: options.terminate_on_drop,
        grace: conn.config.close_grace,
    };
    if let Some(o) = &options.observer {
        o.opened();
    }
    let mut parts = ChannelParts::build(
        conn,
        channel,
        true,
        options.stderr_log_max_bytes,
        on_drop,
        options.observer.clone(),
    );
    // The request goes out before the drain task starts; the answer waits in russh's
    // channel queue until it does.
    let first_input = options.first_input.clone();
    let sent = match &parts.write {
        Some(w) => {
            tokio::time::timeout(exec_timeout, async {
                w.exec(true, command).await?;
                // Right behind the request, without waiting for its answer (RFC 4254
                // allows data once the channel is open; the server queues it for the
                // command, or drops it if the exec fails).
                if let Some(first) = first_input {
                    let n = first.len() as u64;
                    w.data_bytes(first).await?;
                    parts.status.core.count_stdin(n);
                }
                Ok::<(), russh::Error>(())
            })
            .await
        }
        None => Ok(Ok(())),
    };
    parts.start_drain();
    match sent {
        Err(_) => {
            return Err(TransportError::Timeout {
                stage: Stage::Exec,
                after: exec_timeout,
            });
        }
        Ok(Err(e)) => return Err(classify_with(&shared, Stage::Exec, e).await),
        Ok(Ok(())) => {}
    }
    let mut state = parts.status.core.state.subscribe();
    let answered = tokio::time::timeout(
        exec_timeout,
        state.wait_for(|s| s.exec_reply.is_some() || s.closed || s.lost.is_some()),
    )
    .await;
    let s = match answered {
        Err(_) => {
            return Err(TransportError::Timeout {
                stage: Stage::Exec,
                after: exec_timeout,
            });
        }
        Ok(Err(_)) => ChanState::default(),
        Ok(Ok(s)) => s.clone(),
    };
    match (s.exec_reply, s.lost) {
        (Some(true), _) => {
            if let Some(o) = &options.observer {
                o.exec_accepted();
            }
            Ok(ExecChannel {
                stdin: parts.stdin,
                stdout: parts.stdout,
                status: parts.status,
                log: parts.log,
            })
        }
        (_, Some(cause)) => Err(TransportError::Disconnected {
            stage: Stage::Exec,
            cause,
        }),
        _ => Err(TransportError::ExecRejected {
            command: command.to_string(),
        }),
    }
}

/// Drains a forwarded channel (no exec request) and hands it out as an [`ExecChannel`]
/// (see [`SshConnection::open_streamlocal`](crate::SshConnection::open_streamlocal)):
/// `first_input` goes out before it is handed over, and a stderr log queue, if asked for,
/// stays empty.
pub(crate) async fn start_stream(
    conn: Arc<ConnInner>,
    channel: russh::Channel<Msg>,
    options: ExecOptions,
) -> Result<ExecChannel, TransportError> {
    let timeout = conn.config.exec_timeout;
    let shared = conn.shared.clone();
    if let Some(o) = &options.observer {
        o.opened();
    }
    let mut parts = ChannelParts::build(
        conn,
        channel,
        false,
        options.stderr_log_max_bytes,
        // Nothing to signal: EOF and CLOSE at once, as for a direct-tcpip stream.
        OnDrop {
            terminate: false,
            grace: std::time::Duration::ZERO,
        },
        options.observer,
    );
    let sent = match (&parts.write, options.first_input) {
        (Some(w), Some(first)) => {
            let n = first.len() as u64;
            let r = tokio::time::timeout(timeout, w.data_bytes(first)).await;
            if matches!(r, Ok(Ok(()))) {
                parts.status.core.count_stdin(n);
            }
            Some(r)
        }
        _ => None,
    };
    parts.start_drain();
    match sent {
        Some(Err(_)) => Err(TransportError::Timeout {
            stage: Stage::Exec,
            after: timeout,
        }),
        Some(Ok(Err(e))) => Err(classify_with(&shared, Stage::Exec, e).await),
        _ => Ok(ExecChannel {
            stdin: parts.stdin,
            stdout: parts.stdout,
            status: parts.status,
            log: parts.log,
        }),
    }
}

/// A running remote command (or a forwarded socket, see
/// [`SshConnection::open_streamlocal`](crate::SshConnection::open_streamlocal)): stdin, stdout,
/// stderr tail and exit status.
///
/// It is itself an `AsyncRead` (stdout) + `AsyncWrite` (stdin), so it can be handed to a
/// protocol driver as one byte stream. The channel is closed (CHANNEL_CLOSE sent) when this
/// and every part taken from it are dropped.
pub struct ExecChannel {
    stdin: ChannelStdin,
    stdout: ChannelStdout,
    status: ExecStatus,
    log: Option<StderrLog>,
}

impl ExecChannel {
    /// The stdin writer.
    pub fn stdin(&mut self) -> &mut ChannelStdin {
        &mut self.stdin
    }

    /// The stdout reader.
    pub fn stdout(&mut self) -> &mut ChannelStdout {
        &mut self.stdout
    }

    /// Exit status, stderr and statistics.
    pub fn status(&self) -> &ExecStatus {
        &self.status
    }

    /// Shorthand for `status().exit()`.
    pub async fn exit(&self) -> Result<ExitStatus, TransportError> {
        self.status.exit().await
    }

    /// Shorthand for `status().stderr_tail()`.
    pub fn stderr_tail(&self) -> Vec<u8> {
        self.status.stderr_tail()
    }

    /// Shorthand for `status().stats()`.
    pub fn stats(&self) -> ChannelStats {
        self.status.stats()
    }

    /// The stderr log queue, if [`ExecOptions::stderr_log_max_bytes`] was set (once).
    pub fn take_stderr_log(&mut self) -> Option<StderrLog> {
        self.log.take()
    }

    /// Splits into independently owned parts (e.g. a writer task and a reader task).
    pub fn into_parts(self) -> (ChannelStdin, ChannelStdout, ExecStatus) {
        (self.stdin, self.stdout, self.status)
    }
}

impl AsyncRead for ExecChannel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for ExecChannel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

/// A `direct-tcpip` channel as a byte stream, drained like an exec channel. Usable as the
/// stream of [`crate::connect_over`].
pub struct TcpipStream {
    stdin: ChannelStdin,
    stdout: ChannelStdout,
    status: ExecStatus,
}

impl TcpipStream {
    pub(crate) fn new(parts: ChannelParts) -> Self {
        TcpipStream {
            stdin: parts.stdin,
            stdout: parts.stdout,
            status: parts.status,
        }
    }

    /// Statistics of the channel.
    pub fn stats(&self) -> ChannelStats {
        self.status.stats()
    }
}

impl AsyncRead for TcpipStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for TcpipStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for ExecChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.status.core.debug_as("ExecChannel", f)
    }
}

impl std::fmt::Debug for TcpipStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.status.core.debug_as("TcpipStream", f)
    }
}
