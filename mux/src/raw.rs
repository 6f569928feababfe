//! Raw sessions: a channel on a builder's pooled connection to the remote Nix (its daemon's
//! socket, or an exec of the remote program), with no handshake done. For callers that speak the protocol themselves: the
//! agent (`nixmux agent`) splices a local Nix's own session onto one, so that an unmodified
//! Nix gets the pooled connection.
//!
//! The channel's slot on the connection (sshd's `MaxSessions`) stays taken until the channel
//! has closed, whoever holds its parts; dropping every part closes it (EOF and SIGTERM to the
//! remote program, see the transport's closing rules).

use bytes::Bytes;
use nixmux_transport::{ChannelStdin, ChannelStdout, ExecOptions, ExecStatus, StderrLog};

use crate::builder::Builder;
use crate::connections::{Opened, Slot};
use crate::error::{Error, ErrorKind, Result};

/// Undelivered stderr kept per raw session before it is dropped (and reported in the log
/// queue): for the serve protocol this is the build log.
const RAW_LOG_QUEUE: usize = 4 << 20;

/// A channel running the builder's remote program (`nix-daemon --stdio` or
/// `nix-store --serve --write`), with nothing sent yet.
#[derive(Debug)]
pub struct RawSession {
    /// The remote program's stdin.
    pub stdin: ChannelStdin,
    /// Its stdout.
    pub stdout: ChannelStdout,
    /// Its stderr, as it arrives (lossy only when the reader falls 4 MiB behind; drops are
    /// reported in the queue).
    pub stderr: StderrLog,
    /// Exit status, stderr tail, statistics.
    pub status: ExecStatus,
}

impl Builder {
    /// Opens a raw session on the builder's pooled connection, waiting for a channel slot
    /// like any session (connecting when needed). `first_input` goes to the remote program's
    /// stdin right behind the exec request, a round trip before the channel is handed out.
    pub async fn open_raw(&self, first_input: Option<Bytes>) -> Result<RawSession> {
        if let Some(raw) = self.open_raw_via_socket(first_input.clone()).await? {
            return Ok(raw);
        }
        let set = &self.inner.set;
        let patience = self.inner.config.pool.acquire_timeout;
        let mut seq = None;
        loop {
            let slot = set
                .reserve(patience, &mut seq)
                .await
                .map_err(|e| e.on(self.name()))?;
            if let Some(raw) = self.open_on(slot, first_input.clone()).await? {
                return Ok(raw);
            }
        }
    }

    /// Opens a raw session now if a live connection has a free slot and nobody is waiting
    /// for one; never opens a connection and never waits for a slot. For sessions started
    /// ahead of demand, which must stay within the builder's session limit. `None`: no room
    /// (or sshd refused the channel).
    pub async fn open_spare_raw(&self, first_input: Option<Bytes>) -> Result<Option<RawSession>> {
        if let Some(raw) = self.open_raw_via_socket(first_input.clone()).await? {
            return Ok(Some(raw));
        }
        match self.inner.set.reserve_if_free() {
            Some(slot) => self.open_on(slot, first_input).await,
            None => Ok(None),
        }
    }

    /// A raw `ssh-ng://` session over a channel to the daemon's socket, when the builder's
    /// route says to try it (it needs no session slot). `None`: use exec.
    async fn open_raw_via_socket(&self, first_input: Option<Bytes>) -> Result<Option<RawSession>> {
        let mut options = ExecOptions::with_stderr_log(RAW_LOG_QUEUE);
        options.observer = self.inner.set.target.hooks.channel.clone();
        options.first_input = first_input;
        // Serve builders' route is always exec: this is `None` for them.
        let Some(mut channel) = self.inner.pool.socket_channel(options).await? else {
            return Ok(None);
        };
        let Some(stderr) = channel.take_stderr_log() else {
            return Err(Error::local(
                ErrorKind::Protocol,
                "a raw session was opened without its stderr queue",
            ));
        };
        let (stdin, stdout, status) = channel.into_parts();
        Ok(Some(RawSession {
            stdin,
            stdout,
            stderr,
            status,
        }))
    }

    async fn open_on(&self, slot: Slot, first_input: Option<Bytes>) -> Result<Option<RawSession>> {
        let mut options = ExecOptions::with_stderr_log(RAW_LOG_QUEUE);
        options.observer = self.inner.set.target.hooks.channel.clone();
        options.first_input = first_input;
        let command = &self.inner.config.remote_command;
        match slot
            .open(command, options)
            .await
            .map_err(|e| e.on(self.name()))?
        {
            Opened::Ready(mut channel, ticket) => {
                let Some(stderr) = channel.take_stderr_log() else {
                    return Err(Error::local(
                        ErrorKind::Protocol,
                        "a raw session was opened without its stderr queue",
                    ));
                };
                let (stdin, stdout, status) = channel.into_parts();
                ticket.release_on_close(status.closed_signal());
                Ok(Some(RawSession {
                    stdin,
                    stdout,
                    stderr,
                    status,
                }))
            }
            Opened::Retry => Ok(None),
        }
    }
}
