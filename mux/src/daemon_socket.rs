//! `ssh-ng://` sessions over a channel to the builder's `nix-daemon` socket
//! (`direct-streamlocal@openssh.com`, OpenSSH's `PROTOCOL` §2.4), and what a builder's
//! refusal of them teaches.
//!
//! Such a channel starts no process (the daemon is already running and forks a worker per
//! connection, Nix's src/nix-daemon/nix-daemon.cc) and is not a session for sshd, so its
//! `MaxSessions` does not limit it. Not every builder allows it: OpenSSH refuses when
//! stream-local forwarding is off or the key is `restrict`ed / `no-port-forwarding`, and when
//! nothing listens on the socket, all with one reason code. A refusal is remembered per
//! builder, so that [`WorkerRoute::Auto`] pays for the attempt once, and tried again after
//! [`RETRY_REFUSED_AFTER`] (a daemon may have been started since).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use nixmux_transport::{ExecChannel, ExecOptions, SshConnection, TransportError};
use tokio::sync::oneshot;

use crate::error::{Error, ErrorKind};
use crate::protocol::WorkerRoute;

/// How long a refusal keeps [`WorkerRoute::Auto`] on exec before the socket is tried again.
pub(crate) const RETRY_REFUSED_AFTER: Duration = Duration::from_secs(600);

/// Why the builder would not give us its daemon's socket.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub(crate) at: Instant,
    pub(crate) why: String,
}

/// What a builder's pool knows about reaching its daemon's socket.
#[derive(Debug)]
pub(crate) struct SocketRoute {
    pub(crate) route: WorkerRoute,
    pub(crate) path: String,
    refused: Mutex<Option<Refusal>>,
}

impl SocketRoute {
    pub(crate) fn new(route: WorkerRoute, path: String) -> Self {
        SocketRoute {
            route,
            path,
            refused: Mutex::new(None),
        }
    }

    /// Whether the next session should try the socket.
    pub(crate) fn should_try(&self, now: Instant) -> bool {
        match self.route {
            WorkerRoute::Exec => false,
            WorkerRoute::Socket => true,
            WorkerRoute::Auto => self
                .last_refusal()
                .is_none_or(|r| now.duration_since(r.at) >= RETRY_REFUSED_AFTER),
        }
    }

    /// The builder refused the socket.
    pub(crate) fn refused(&self, why: String) {
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(Refusal {
                at: Instant::now(),
                why,
            });
        }
    }

    /// The builder accepted it: forget an old refusal.
    pub(crate) fn accepted(&self) {
        if let Ok(mut r) = self.refused.lock() {
            *r = None;
        }
    }

    /// The last refusal, if the socket is not known to work since.
    pub(crate) fn last_refusal(&self) -> Option<Refusal> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }
}

/// How opening a channel to the socket failed.
#[derive(Debug)]
pub(crate) enum SocketOpenError {
    /// sshd refused the channel; the text says why it may have, for people (sshd itself
    /// only says "open failed").
    Refused(String),
    /// Anything else (the connection died, a timeout): the usual error.
    Failed(Error),
}

/// Opens a channel to the socket at `path` on `ssh`, in a task of its own: if this future is
/// dropped, a channel the server confirms later is still closed (the transport closes it when
/// its handles are dropped), so the daemon's worker for it ends.
pub(crate) async fn open(
    ssh: SshConnection,
    path: String,
    options: ExecOptions,
) -> Result<ExecChannel, SocketOpenError> {
    let (tx, rx) = oneshot::channel();
    let task_path = path.clone();
    tokio::spawn(async move {
        let r = ssh.open_streamlocal(&task_path, options).await;
        // A receiver that is gone drops the channel, which closes it.
        let _ = tx.send(r);
    });
    match rx.await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e @ TransportError::ChannelOpenRefused { .. })) => {
            Err(SocketOpenError::Refused(format!(
                "sshd refused a channel to the daemon socket {path} ({e}): stream-local \
                 forwarding is off (AllowStreamLocalForwarding, DisableForwarding), the key is \
                 restricted (restrict, no-port-forwarding), or no nix-daemon listens there"
            )))
        }
        Ok(Err(e)) => Err(SocketOpenError::Failed(e.into())),
        Err(_) => Err(SocketOpenError::Failed(Error::local(
            ErrorKind::Cancelled,
            "opening a channel to the daemon socket was interrupted",
        ))),
    }
}
