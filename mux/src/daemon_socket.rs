//! `ssh-ng://` sessions over a channel to the builder's `nix-daemon` socket
//! (`direct-streamlocal@openssh.com`, OpenSSH's `PROTOCOL` §2.4), and what a builder's
//! refusal of them teaches.
//!
//! Such a channel starts no process (the daemon is already running and forks a worker per
//! connection, Nix's src/nix-daemon/nix-daemon.cc) and is not a session for sshd, so its
//! `MaxSessions` does not limit it. Not every builder allows it: OpenSSH refuses when
//! stream-local forwarding is off or the key is `restrict`ed / `no-port-forwarding`
//! ("administratively prohibited"), and when nothing listens on the socket ("connect
//! failed"); Dropbear before 2024.84 knows no such channel type. A refusal is remembered per
//! builder, so that [`WorkerRoute::Auto`] pays for the attempt once, and tried again after
//! [`RETRY_REFUSED_AFTER`] (a daemon may have been started since).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nixmux_transport::{
    ChannelOpenRefusal, ExecChannel, ExecOptions, SshConnection, TransportError,
};
use tokio::sync::{Semaphore, oneshot};

use crate::error::{Error, ErrorKind};
use crate::protocol::WorkerRoute;

/// How long a refusal keeps [`WorkerRoute::Auto`] on exec before the socket is tried again.
pub(crate) const RETRY_REFUSED_AFTER: Duration = Duration::from_secs(600);

/// Channel opens to the socket in flight at once, per builder. Each makes sshd `connect()`
/// to the daemon, which takes them off its listen queue one `accept()` at a time; Nix 2.8
/// listens with a backlog of 5 (src/libutil/util.cc `createUnixDomainSocket`; 100 in later
/// versions), and sshd's non-blocking connect fails at once on a full queue. Opens take a
/// fraction of a round trip each, so a few in flight do not slow a burst down.
const OPENS_IN_FLIGHT: usize = 4;

/// How long a burst keeps retrying a socket that has worked before but whose daemon did not
/// take the connection (its listen queue was full): the refusal is then congestion, not
/// configuration.
const BUSY_RETRY_FOR: Duration = Duration::from_secs(5);

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
    /// The socket has taken a connection before.
    worked: AtomicBool,
    gate: Semaphore,
    /// Held by the one session probing a socket not known to work yet.
    probe: tokio::sync::Mutex<()>,
}

impl SocketRoute {
    pub(crate) fn new(route: WorkerRoute, path: String) -> Self {
        SocketRoute {
            route,
            path,
            refused: Mutex::new(None),
            worked: AtomicBool::new(false),
            gate: Semaphore::new(OPENS_IN_FLIGHT),
            probe: tokio::sync::Mutex::new(()),
        }
    }

    /// Opens a channel to the socket on `ssh` (see [`open`]), a few at a time, retrying for a
    /// while when a socket that worked before refuses with "connect failed" (the daemon's
    /// listen queue is full under a burst). `None`: do not use the socket (another session's
    /// probe just found it refused).
    ///
    /// Until the socket has worked once, [`WorkerRoute::Auto`] sends one probe at a time, so
    /// that a burst of sessions to a builder that refuses it pays one refusal, not one each.
    pub(crate) async fn open(
        &self,
        ssh: &SshConnection,
        options: ExecOptions,
    ) -> Result<Option<ExecChannel>, SocketOpenError> {
        let _probe = if self.route == WorkerRoute::Auto && !self.worked.load(Ordering::Relaxed) {
            let probe = self.probe.lock().await;
            (!self.worked.load(Ordering::Relaxed)).then_some(probe)
        } else {
            None
        };
        if !self.should_try(Instant::now()) {
            return Ok(None);
        }
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            let attempt = {
                // Never closed, so acquiring cannot fail; without a permit, open anyway.
                let _permit = self.gate.acquire().await.ok();
                open(ssh.clone(), self.path.clone(), options.clone()).await
            };
            match attempt {
                Ok(ch) => {
                    self.worked.store(true, Ordering::Relaxed);
                    self.accepted();
                    return Ok(Some(ch));
                }
                Err(SocketOpenError::Refused {
                    reason: ChannelOpenRefusal::ConnectFailed,
                    ..
                }) if self.worked.load(Ordering::Relaxed) && started.elapsed() < BUSY_RETRY_FOR => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(SocketOpenError::Refused { reason, why }) => {
                    // Recorded while the probe is still held: a session waiting for it must
                    // find the refusal, not probe again.
                    self.refused(why.clone());
                    return Err(SocketOpenError::Refused { reason, why });
                }
                Err(e) => return Err(e),
            }
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

    /// The builder refused the socket (it is not known to work any more).
    fn refused(&self, why: String) {
        self.worked.store(false, Ordering::Relaxed);
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(Refusal {
                at: Instant::now(),
                why,
            });
        }
    }

    /// The builder accepted it: forget an old refusal.
    fn accepted(&self) {
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
    /// sshd refused the channel; `why` says what may have caused it, for people (sshd
    /// itself only says "open failed"). OpenSSH answers "connect failed" when nothing
    /// listens (or the daemon's queue is full) and "administratively prohibited" when
    /// forwarding is not allowed (serverloop.c `server_request_direct_streamlocal`).
    Refused {
        reason: ChannelOpenRefusal,
        why: String,
    },
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
        Ok(Err(TransportError::ChannelOpenRefused {
            reason,
            description,
        })) => {
            let said = if description.is_empty() {
                reason.to_string()
            } else {
                format!("{reason}: {description}")
            };
            let why = match reason {
                // Dropbear before 2024.84 knows no such channel.
                ChannelOpenRefusal::UnknownChannelType => format!(
                    "the SSH server does not support channels to Unix sockets (direct-streamlocal@openssh.com), so the daemon socket {path} cannot be reached ({said})"
                ),
                ChannelOpenRefusal::ConnectFailed => format!(
                    "sshd could not connect to the daemon socket {path} ({said}): no nix-daemon listens there"
                ),
                _ => format!(
                    "sshd refused a channel to the daemon socket {path} ({said}): stream-local \
                     forwarding is off (AllowStreamLocalForwarding, DisableForwarding), the key is \
                     restricted (restrict, no-port-forwarding), or no nix-daemon listens there"
                ),
            };
            Err(SocketOpenError::Refused { reason, why })
        }
        Ok(Err(e)) => Err(SocketOpenError::Failed(e.into())),
        Err(_) => Err(SocketOpenError::Failed(Error::local(
            ErrorKind::Cancelled,
            "opening a channel to the daemon socket was interrupted",
        ))),
    }
}
