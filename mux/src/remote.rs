//! One protocol session on a builder: an exec channel running `nix-store --serve --write` or
//! `nix-daemon --stdio`, with the handshake done.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixmux_proto::store_path::StoreDir;
use nixmux_session::{
    Activity, Lead, Opening, RemoteDiagnostics, ServeSession, SessionConfig, SessionError,
    WorkerConfig, WorkerSession,
};
use nixmux_transport::{
    ChannelObserver, ExecChannel, ExecOptions, ExecStatus, ExitStatus, FirstChannel,
};

use crate::connections::ChannelTicket;
use crate::conversation::Conversation;
use crate::error::{Error, ErrorKind, Result, from_session};
use crate::protocol::{Protocol, SessionPath, WorkerRoute};
use crate::serve_log::LogRoute;

/// How to start and greet one kind of session.
#[derive(Debug, Clone)]
pub(crate) struct SessionSpec {
    pub(crate) protocol: Protocol,
    /// The remote command line (`nix-daemon --stdio`, with `remote-program` / `--store`).
    pub(crate) command: String,
    /// Whether worker sessions go to the daemon's socket (always `Exec` for serve).
    pub(crate) route: WorkerRoute,
    /// The daemon's socket on the builder.
    pub(crate) daemon_socket: String,
    pub(crate) session: SessionConfig,
    pub(crate) worker: WorkerConfig,
    pub(crate) store_dir: StoreDir,
    /// Longest wait for a channel slot.
    pub(crate) channel_wait: Duration,
}

impl SessionSpec {
    /// The channel a session of this spec opens first: a channel to the daemon's socket
    /// unless the route says exec, else a session channel. A new connection opens it with
    /// the authentication request when it can (`nixmux_transport::FirstChannel`).
    pub(crate) fn first_channel(&self) -> FirstChannel {
        if self.route == WorkerRoute::Exec {
            FirstChannel::Session
        } else {
            FirstChannel::Streamlocal(self.daemon_socket.clone())
        }
    }
}

/// A live session.
pub(crate) struct RemoteSession {
    pub(crate) conv: Conversation,
    pub(crate) status: ExecStatus,
    /// The pool's slot on its connection (`None` for sessions outside a pool, e.g. ping).
    pub(crate) ticket: Option<ChannelTicket>,
    pub(crate) route: Arc<LogRoute>,
    pub(crate) last_used: Instant,
    pump: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RemoteSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSession")
            .field("conv", &self.conv)
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        if let Some(p) = self.pump.take() {
            p.abort();
        }
        // Dropping the channel's handles (right after this) makes the transport stop the
        // remote command and close the channel; sshd's slot is free only once that is done.
        if let Some(ticket) = self.ticket.take() {
            ticket.release_when_closed(self.status.closed_signal());
        }
    }
}

impl RemoteSession {
    /// Whether it can take another operation.
    pub(crate) fn is_usable(&self) -> bool {
        self.conv.is_usable()
            && !self.status.is_closed()
            && self
                .ticket
                .as_ref()
                .is_none_or(ChannelTicket::connection_alive)
    }
}

/// Explains a remote death from the channel: exit status and stderr tail.
struct ChannelDiagnostics(ExecStatus);

impl RemoteDiagnostics for ChannelDiagnostics {
    fn explain(&self) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
        Box::pin(async move {
            let exit = tokio::time::timeout(Duration::from_secs(1), self.0.exit())
                .await
                .ok()
                .and_then(|r| r.ok());
            let tail = self.0.stderr_tail_lossy();
            let tail = last_lines(&tail, 15);
            match (tail.is_empty(), exit) {
                (true, None) => None,
                (true, Some(e)) => Some(format!("remote command ended: {e}")),
                (false, None) => Some(tail),
                (false, Some(e)) => Some(format!("{tail} (remote command ended: {e})")),
            }
        })
    }
}

/// Explains a remote death on a channel to the daemon's socket: there is no exit status or
/// stderr, only the fact that the daemon (or sshd) closed it.
struct SocketDiagnostics(String);

impl RemoteDiagnostics for SocketDiagnostics {
    fn explain(&self) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
        Box::pin(async move {
            Some(format!(
                "the nix-daemon behind {} closed the connection (its log on the builder says why)",
                self.0
            ))
        })
    }
}

/// The last `n` non-empty lines of `s`.
pub(crate) fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Whether the remote shell could not find the command (POSIX: exit 127).
fn command_missing(status: &ExecStatus) -> bool {
    let tail = status.stderr_tail_lossy();
    matches!(status.try_exit(), Some(ExitStatus::Code(127)))
        || tail.contains("command not found")
        || (tail.contains("No such file or directory") && tail.contains("exec"))
}

/// Undelivered serve build log kept per session before lines are dropped (and counted): a
/// few seconds of a very chatty build.
const SERVE_LOG_QUEUE: usize = 1 << 20;

/// Touches a session's clock whenever the server sends anything on its channel, so that an
/// upload whose data the server is consuming (window adjustments) is not taken for silence;
/// and passes the channel's events on to the target's hook, if any.
struct PeerHeard {
    activity: Activity,
    hook: Option<Arc<dyn ChannelObserver>>,
}

impl ChannelObserver for PeerHeard {
    fn opened(&self) {
        if let Some(h) = &self.hook {
            h.opened();
        }
    }

    fn exec_accepted(&self) {
        if let Some(h) = &self.hook {
            h.exec_accepted();
        }
    }

    fn heard(&self) {
        self.activity.touch();
        if let Some(h) = &self.hook {
            h.heard();
        }
    }
}

/// Exec options for a session channel of `protocol` whose session will use `activity`;
/// `hook` is the target's channel hook ([`crate::StageHooks::channel`]); `opening` goes out
/// with the open ([`opening`]).
pub(crate) fn exec_options(
    protocol: Protocol,
    activity: &Activity,
    hook: Option<Arc<dyn ChannelObserver>>,
    opening: Option<&Opening>,
) -> ExecOptions {
    let mut options = match protocol {
        // The serve protocol's stderr is the build log: give it a queue of its own.
        Protocol::Serve => ExecOptions::with_stderr_log(SERVE_LOG_QUEUE),
        Protocol::Worker => ExecOptions::default(),
    };
    options.first_input = opening.map(Opening::bytes);
    options.observed(Arc::new(PeerHeard {
        activity: activity.clone(),
        hook,
    }))
}

/// The first bytes of `spec`'s handshake, sent ahead with the channel's exec request (or
/// right behind a socket channel's confirmation) through [`ExecOptions::first_input`]: the
/// remote program finds them waiting when it starts, which saves the round trip of waiting
/// for the exec's answer before saying hello.
///
/// `lead` is the first operation's request ([`Lead`]): the serve protocol sends it in the
/// opening, the worker protocol once the daemon's version is known (in [`start`]).
pub(crate) fn opening(spec: &SessionSpec, lead: Option<&Lead>) -> Opening {
    match spec.protocol {
        Protocol::Serve => ServeSession::opening(&spec.store_dir, lead),
        Protocol::Worker => WorkerSession::opening(&spec.store_dir, &spec.worker, lead),
    }
}

/// Performs the handshake of `spec` on a freshly opened channel, opened with
/// [`exec_options`] for `activity`; `sent` is the [`opening`] if it went out with the open.
pub(crate) async fn start(
    mut channel: ExecChannel,
    ticket: Option<ChannelTicket>,
    path: SessionPath,
    sent: Option<Opening>,
    spec: &SessionSpec,
    builder: &str,
    activity: Activity,
) -> Result<RemoteSession> {
    let log = channel.take_stderr_log();
    let (stdin, stdout, status) = channel.into_parts();
    // Until the session exists, the slot goes back once the channel has closed, whether the
    // handshake fails or this future is dropped half-way.
    let mut unstarted = UnstartedSlot {
        ticket,
        closed: Some(Box::pin(status.closed_signal())),
    };
    let mut config = spec.session.clone();
    config.diagnostics = Some(match path {
        SessionPath::Exec => Arc::new(ChannelDiagnostics(status.clone())),
        SessionPath::DaemonSocket => Arc::new(SocketDiagnostics(spec.daemon_socket.clone())),
    });
    config.activity = Some(activity.clone());
    let route = LogRoute::new(activity);
    let max_line = usize::try_from(spec.session.limits.max_log_line).unwrap_or(64 << 10);
    let pump = log.map(|log| route.pump(log, max_line));
    let reader = Box::new(stdout);
    let writer = Box::new(stdin);
    let dir = spec.store_dir.clone();
    let log = &mut |ev| tracing::debug!(?ev, "log during handshake");
    let conv = match (spec.protocol, sent) {
        (Protocol::Serve, None) => ServeSession::handshake(reader, writer, dir, config)
            .await
            .map(Conversation::Serve),
        (Protocol::Serve, Some(o)) => ServeSession::handshake_after(o, reader, writer, dir, config)
            .await
            .map(Conversation::Serve),
        (Protocol::Worker, None) => {
            WorkerSession::handshake(reader, writer, dir, config, &spec.worker, log)
                .await
                .map(Conversation::Worker)
        }
        (Protocol::Worker, Some(o)) => {
            WorkerSession::handshake_after(o, reader, writer, dir, config, &spec.worker, log)
                .await
                .map(Conversation::Worker)
        }
    };
    let conv = match conv {
        Ok(c) => c,
        Err(e) => return Err(handshake_error(e, &status, spec, builder).await),
    };
    let now = Instant::now();
    Ok(RemoteSession {
        conv,
        status,
        ticket: unstarted.ticket.take(),
        route,
        last_used: now,
        pump,
    })
}

/// A slot whose session is not started yet (see [`start`]).
struct UnstartedSlot {
    ticket: Option<ChannelTicket>,
    closed: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Drop for UnstartedSlot {
    fn drop(&mut self) {
        if let (Some(ticket), Some(closed)) = (self.ticket.take(), self.closed.take()) {
            ticket.release_when_closed(closed);
        }
    }
}

/// Turns a failed handshake into the most useful error: a missing remote command, text
/// printed by the remote shell, or what the session saw.
async fn handshake_error(
    e: SessionError,
    status: &ExecStatus,
    spec: &SessionSpec,
    builder: &str,
) -> Error {
    if matches!(e, SessionError::Closed { .. }) {
        // Let the exit status arrive.
        let _ = tokio::time::timeout(Duration::from_secs(1), status.exit()).await;
        if command_missing(status) {
            let program = spec
                .command
                .split_whitespace()
                .next()
                .unwrap_or("the remote program");
            return Error::remote(
                ErrorKind::RemoteCommandMissing,
                format!(
                    "command not found on the builder: `{program}` ({})",
                    last_lines(&status.stderr_tail_lossy(), 3)
                ),
            )
            .hint(
                "install Nix on the builder, or point the store URL's `remote-program` parameter at it (e.g. ?remote-program=/nix/var/nix/profiles/default/bin/nix-daemon)",
            )
            .on(builder)
            .retryable(false)
            .caused_by(e);
        }
    }
    if let SessionError::Protocol {
        source:
            nixmux_proto::ProtoError::Misbehaved(nixmux_proto::Misbehaved::WrongMagic { got, .. }),
        ..
    } = &e
    {
        let bytes = got.to_le_bytes();
        if bytes
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
        {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            return Error::remote(
                ErrorKind::Protocol,
                format!(
                    "the builder printed text ({text:?}...) before `{}` started speaking the protocol",
                    spec.command
                ),
            )
            .hint("the remote user's shell start-up files (e.g. ~/.bashrc) or a ForceCommand print to stdout; make them silent for non-interactive shells")
            .on(builder)
            .retryable(false)
            .caused_by(e);
        }
    }
    from_session(e).on(builder)
}
