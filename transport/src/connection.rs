//! Connecting, and the shared [`SshConnection`] handle.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use russh::client::{DisconnectReason, Handle, Handler, Msg, Session};
use russh::keys::PublicKeyOrCertificate;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use crate::auth;
use crate::config::{Endpoint, ExecOptions, Identity, TransportConfig};
use crate::error::{
    ChannelOpenRefusal, DisconnectCause, Stage, TransportError, cause_from_russh, classify,
};
use crate::exec::{ChannelParts, ExecChannel, TcpipStream};
use crate::host_key::{HostKeyCheck, HostKeySource, Verifier, fingerprint};
use crate::observer::{ConnectEventKind, ConnectObserver, Stopwatch};
use crate::stream::{MonitoredStream, Startup, StreamEnd, StreamMonitor};

/// How long to wait for the session task to publish its end cause once we know it is ending.
pub(crate) const CAUSE_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the server to acknowledge our DISCONNECT before cutting the stream.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the description of a refused channel open; it is delivered by the
/// session task right after the refusal itself.
const OPEN_FAILURE_GRACE: Duration = Duration::from_millis(200);

// ===== shared connection state =====

/// Counters shared by the connection and its channels.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) channels_open: AtomicU64,
    pub(crate) channels_opened: AtomicU64,
    pub(crate) open_refusals: AtomicU64,
    pub(crate) stdout_buffered: AtomicU64,
    pub(crate) stdout_spilled: AtomicU64,
    pub(crate) stderr_log_dropped_bytes: AtomicU64,
    pub(crate) stderr_log_dropped_lines: AtomicU64,
}

/// What the handler was told when the session ended.
#[derive(Debug)]
enum Reported {
    Peer { reason: String, message: String },
    Error(DisconnectCause),
}

/// State shared by the handler (inside russh's session task), the [`SshConnection`] and
/// every channel's drain task.
#[derive(Debug)]
pub(crate) struct ConnShared {
    pub(crate) monitor: Arc<StreamMonitor>,
    pub(crate) counters: Counters,
    cause: watch::Sender<Option<DisconnectCause>>,
    local: AtomicBool,
    reported: Mutex<Option<Reported>>,
    keepalive: (Duration, usize),
    host_key: OnceLock<HostKeyInfo>,
    negotiated: OnceLock<(String, String)>,
    rejection: Mutex<Option<TransportError>>,
    open_failures: Mutex<VecDeque<(ChannelOpenRefusal, String)>>,
    open_failure_notify: Notify,
}

#[derive(Debug, Clone)]
struct HostKeyInfo {
    algorithm: String,
    fingerprint: String,
    source: HostKeySource,
}

impl ConnShared {
    fn new(monitor: Arc<StreamMonitor>, config: &TransportConfig) -> Self {
        ConnShared {
            monitor,
            counters: Counters::default(),
            cause: watch::Sender::new(None),
            local: AtomicBool::new(false),
            reported: Mutex::new(None),
            keepalive: (
                config.keepalive_interval.unwrap_or_default(),
                config.keepalive_max_misses,
            ),
            host_key: OnceLock::new(),
            negotiated: OnceLock::new(),
            rejection: Mutex::new(None),
            open_failures: Mutex::new(VecDeque::new()),
            open_failure_notify: Notify::new(),
        }
    }

    /// A connection's shared state with nothing behind it, for unit tests of the parts that
    /// only update its counters.
    #[cfg(test)]
    pub(crate) fn detached() -> Arc<Self> {
        Arc::new(Self::new(
            Arc::new(StreamMonitor::default()),
            &TransportConfig::default(),
        ))
    }

    pub(crate) fn cause(&self) -> Option<DisconnectCause> {
        self.cause.borrow().clone()
    }

    /// The end cause, waiting up to `grace` for the session task to publish it (it does so
    /// as it exits, which may be a moment after a channel noticed).
    pub(crate) async fn wait_cause(&self, grace: Duration) -> DisconnectCause {
        let mut rx = self.cause.subscribe();
        match tokio::time::timeout(grace, rx.wait_for(Option::is_some)).await {
            Ok(Ok(c)) => c
                .clone()
                .unwrap_or_else(|| DisconnectCause::Unknown("no cause".into())),
            _ => DisconnectCause::Unknown(
                "the SSH session stopped responding but has not ended yet".into(),
            ),
        }
    }

    fn report(&self, r: Reported) {
        if let Ok(mut g) = self.reported.lock()
            && g.is_none()
        {
            *g = Some(r);
        }
    }

    /// Publishes the end cause. Called when russh's session task drops our handler, i.e.
    /// exactly once, when the session is over for whatever reason (including a panic).
    fn finish(&self) {
        let stream_end = self.monitor.end();
        let from_stream = |end: &Option<StreamEnd>| match end {
            Some(StreamEnd::Eof) => Some(DisconnectCause::ConnectionClosed),
            Some(StreamEnd::Error { kind, message }) => Some(DisconnectCause::Io {
                kind: *kind,
                message: message.clone(),
            }),
            Some(StreamEnd::Killed) => Some(DisconnectCause::Local),
            None => None,
        };
        let reported = self.reported.lock().ok().and_then(|mut g| g.take());
        let cause = if self.local.load(Ordering::SeqCst) {
            DisconnectCause::Local
        } else {
            match reported {
                Some(Reported::Peer { reason, message }) => {
                    DisconnectCause::ClosedByPeer { reason, message }
                }
                Some(Reported::Error(DisconnectCause::KeepaliveTimeout { .. })) => {
                    DisconnectCause::KeepaliveTimeout {
                        interval: self.keepalive.0,
                        max_misses: self.keepalive.1,
                    }
                }
                // russh's generic "disconnected": the stream knows better.
                Some(Reported::Error(
                    c @ (DisconnectCause::ConnectionClosed | DisconnectCause::Unknown(_)),
                )) => from_stream(&stream_end).unwrap_or(c),
                // russh's "early eof" when the socket closed between packets.
                Some(Reported::Error(DisconnectCause::Io { .. }))
                    if stream_end == Some(StreamEnd::Eof) =>
                {
                    DisconnectCause::ConnectionClosed
                }
                Some(Reported::Error(c)) => c,
                None => from_stream(&stream_end)
                    .unwrap_or_else(|| DisconnectCause::Unknown("SSH session task ended".into())),
            }
        };
        tracing::debug!(%cause, "SSH connection ended");
        self.cause.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(cause);
                true
            } else {
                false
            }
        });
    }

    fn push_open_failure(&self, reason: ChannelOpenRefusal, description: String) {
        if let Ok(mut q) = self.open_failures.lock() {
            q.push_back((reason, description));
            // Bounded: entries nobody claimed (e.g. from a timed-out open) must not pile up.
            while q.len() > 16 {
                q.pop_front();
            }
        }
        self.open_failure_notify.notify_waiters();
    }

    /// The server's description of a refused open with this reason. Refusals with the same
    /// reason that race each other may swap descriptions; the texts are the same in practice.
    async fn claim_open_failure(&self, reason: &ChannelOpenRefusal) -> String {
        let take = || -> Option<String> {
            let mut q = self.open_failures.lock().ok()?;
            let pos = q.iter().position(|(r, _)| r == reason)?;
            q.remove(pos).map(|(_, d)| d)
        };
        let deadline = tokio::time::Instant::now() + OPEN_FAILURE_GRACE;
        loop {
            let notified = self.open_failure_notify.notified();
            if let Some(d) = take() {
                return d;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return take().unwrap_or_default();
            }
        }
    }
}

// ===== the russh handler =====

/// Our russh client handler. Lives inside russh's session task; its `Drop` is how we learn
/// that the session is over.
pub(crate) struct ClientHandler {
    shared: Arc<ConnShared>,
    verifier: Arc<Verifier>,
    stopwatch: Stopwatch,
}

/// The handler's error type: russh's own, or "we refused the host key" (details are in
/// [`ConnShared::rejection`], so that they survive russh's error plumbing intact).
#[derive(Debug)]
pub(crate) enum HandlerError {
    Russh(russh::Error),
    HostKeyRejected,
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Russh(e)
    }
}

impl Drop for ClientHandler {
    fn drop(&mut self) {
        self.shared.finish();
    }
}

impl Handler for ClientHandler {
    type Error = HandlerError;

    /// The host-key decision. Runs inside the key exchange: a refused key ends the
    /// connection here, before any authentication is attempted and before any channel.
    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                // We never advertise certificate algorithms, so this is a protocol violation.
                if let Ok(mut r) = self.shared.rejection.lock() {
                    *r = Some(TransportError::Protocol {
                        stage: Stage::HostKey,
                        message: "server presented a host certificate we did not ask for".into(),
                    });
                }
                return Err(HandlerError::HostKeyRejected);
            }
        };
        let algorithm = key.algorithm().to_string();
        let fp = fingerprint(key);
        self.stopwatch.emit(ConnectEventKind::KeyExchangeDone {
            host_key_algorithm: algorithm.clone(),
            fingerprint: fp.clone(),
        });
        match self.verifier.verify(key) {
            Ok(source) => {
                let _ = self.shared.host_key.set(HostKeyInfo {
                    algorithm,
                    fingerprint: fp.clone(),
                    source: source.clone(),
                });
                self.stopwatch.emit(ConnectEventKind::HostKeyVerified {
                    fingerprint: fp,
                    source,
                });
                Ok(true)
            }
            Err(e) => {
                tracing::warn!("refusing host key: {e}");
                if let Ok(mut r) = self.shared.rejection.lock() {
                    *r = Some(e);
                }
                Err(HandlerError::HostKeyRejected)
            }
        }
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &russh::Names,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let kex = names.kex.as_ref().to_string();
        let cipher = names.cipher.as_ref().to_string();
        if self
            .shared
            .negotiated
            .set((kex.clone(), cipher.clone()))
            .is_ok()
        {
            self.stopwatch
                .emit(ConnectEventKind::Negotiated { kex, cipher });
        }
        Ok(())
    }

    async fn channel_open_failure(
        &mut self,
        _channel: russh::ChannelId,
        reason: russh::ChannelOpenFailure,
        description: &str,
        _language: &str,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.shared.push_open_failure(
            ChannelOpenRefusal::from_russh(&reason),
            description.to_string(),
        );
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        match reason {
            DisconnectReason::ReceivedDisconnect(info) => self.shared.report(Reported::Peer {
                reason: format!("{:?}", info.reason_code),
                message: info.message,
            }),
            DisconnectReason::Error(HandlerError::Russh(e)) => {
                self.shared.report(Reported::Error(cause_from_russh(e)));
            }
            DisconnectReason::Error(HandlerError::HostKeyRejected) => {
                self.shared.report(Reported::Error(DisconnectCause::Local));
            }
        }
        Ok(())
    }
}

// ===== connecting =====

/// Connects to `endpoint` over TCP: resolve, TCP connect (each resolved address in turn),
/// SSH handshake with host-key verification, authentication. Every stage has its own
/// timeout from `config` and is reported to `observer` with its duration.
pub async fn connect(
    endpoint: &Endpoint,
    identities: &[Identity],
    host_key_check: &HostKeyCheck,
    config: &TransportConfig,
    observer: impl ConnectObserver + 'static,
) -> Result<SshConnection, TransportError> {
    let stopwatch = Stopwatch::new(Arc::new(observer));
    let prepared = prepare(endpoint, host_key_check, config).await?;

    // `[::1]` as in a store URL: the resolver wants the bare address.
    let host = endpoint
        .host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&endpoint.host);
    let lookup = tokio::time::timeout(
        config.tcp_connect_timeout,
        tokio::net::lookup_host((host, endpoint.port)),
    )
    .await
    .map_err(|_| TransportError::Timeout {
        stage: Stage::Resolve,
        after: config.tcp_connect_timeout,
    })?
    .map_err(|e| TransportError::Resolve {
        host: endpoint.host.clone(),
        port: endpoint.port,
        reason: e.to_string(),
    })?;
    let addrs: Vec<SocketAddr> = lookup.collect();
    if addrs.is_empty() {
        return Err(TransportError::Resolve {
            host: endpoint.host.clone(),
            port: endpoint.port,
            reason: "no addresses".into(),
        });
    }
    stopwatch.emit(ConnectEventKind::Resolved {
        addrs: addrs.clone(),
    });

    let mut last_err = None;
    let mut connected = None;
    for addr in &addrs {
        match tokio::time::timeout(config.tcp_connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                connected = Some((s, *addr));
                break;
            }
            Ok(Err(io)) => {
                tracing::debug!("TCP connect to {addr} failed: {io}");
                last_err = Some(TransportError::Connect { addr: *addr, io });
            }
            Err(_) => {
                tracing::debug!("TCP connect to {addr} timed out");
                last_err = Some(TransportError::Timeout {
                    stage: Stage::TcpConnect,
                    after: config.tcp_connect_timeout,
                });
            }
        }
    }
    let Some((tcp, addr)) = connected else {
        return Err(last_err.unwrap_or_else(|| TransportError::Resolve {
            host: endpoint.host.clone(),
            port: endpoint.port,
            reason: "no addresses".into(),
        }));
    };
    if config.nodelay
        && let Err(e) = tcp.set_nodelay(true)
    {
        tracing::debug!("set_nodelay failed: {e}");
    }
    stopwatch.emit(ConnectEventKind::TcpConnected { addr });
    // sshd leaves Nagle on for non-interactive sessions: when it sends two small packets in
    // a row (e.g. right after authentication, or two small replies), the second waits for
    // our ACK of the first, which Linux delays by up to 40 ms while we have nothing to send.
    // Asking for an immediate ACK after every read avoids that stall (measured: the first
    // channel on a new connection took 45 ms instead of 1 ms). TCP_QUICKACK is not sticky,
    // hence after every read; it costs one setsockopt per read.
    let quickack = std::os::fd::AsFd::as_fd(&tcp)
        .try_clone_to_owned()
        .map(socket2::Socket::from)
        .ok()
        .map(|sock| -> Box<dyn Fn() + Send + Sync> {
            Box::new(move || {
                let _ = sock.set_tcp_quickack(true);
            })
        });
    establish(
        tcp, endpoint, identities, prepared, config, stopwatch, quickack,
    )
    .await
}

/// Like [`connect`], over an already connected byte stream: a `direct-tcpip` channel of
/// another connection (ProxyJump, see [`SshConnection::open_direct_tcpip`]), a ProxyCommand's
/// pipes, a test socket. `endpoint` names the host for the host-key lookup and the user.
/// No `Resolved`/`TcpConnected` events are emitted.
pub async fn connect_over<S>(
    stream: S,
    endpoint: &Endpoint,
    identities: &[Identity],
    host_key_check: &HostKeyCheck,
    config: &TransportConfig,
    observer: impl ConnectObserver + 'static,
) -> Result<SshConnection, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stopwatch = Stopwatch::new(Arc::new(observer));
    let prepared = prepare(endpoint, host_key_check, config).await?;
    establish(
        stream, endpoint, identities, prepared, config, stopwatch, None,
    )
    .await
}

struct Prepared {
    verifier: Arc<Verifier>,
    russh_config: Arc<russh::client::Config>,
}

/// Reads known_hosts files (off the runtime) and builds the russh configuration.
async fn prepare(
    endpoint: &Endpoint,
    check: &HostKeyCheck,
    config: &TransportConfig,
) -> Result<Prepared, TransportError> {
    let check = check.clone();
    let (host, port) = (endpoint.host.clone(), endpoint.port);
    // Local files, but possibly on a network file system: bounded like the handshake.
    let load = tokio::task::spawn_blocking(move || Verifier::load(&check, &host, port));
    let verifier = tokio::time::timeout(config.handshake_timeout, load)
        .await
        .map_err(|_| TransportError::Timeout {
            stage: Stage::Setup,
            after: config.handshake_timeout,
        })?
        .map_err(|e| TransportError::Config(format!("known_hosts loading task failed: {e}")))??;
    let russh_config = config.to_russh(&verifier.known_algorithms())?;
    Ok(Prepared {
        verifier: Arc::new(verifier),
        russh_config: Arc::new(russh_config),
    })
}

async fn establish<S>(
    stream: S,
    endpoint: &Endpoint,
    identities: &[Identity],
    prepared: Prepared,
    config: &TransportConfig,
    stopwatch: Stopwatch,
    after_read: Option<Box<dyn Fn() + Send + Sync>>,
) -> Result<SshConnection, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let monitor = Arc::new(StreamMonitor::default());
    let shared = Arc::new(ConnShared::new(monitor.clone(), config));
    let handler = ClientHandler {
        shared: shared.clone(),
        verifier: prepared.verifier.clone(),
        stopwatch: stopwatch.clone(),
    };
    let stream = MonitoredStream::new(stream, monitor.clone(), after_read);

    let handshake = tokio::time::timeout(
        config.handshake_timeout,
        russh::client::connect_stream(prepared.russh_config, stream, handler),
    )
    .await;
    let mut handle = match handshake {
        Err(_) => {
            monitor.kill();
            return Err(TransportError::Timeout {
                stage: Stage::Handshake,
                after: config.handshake_timeout,
            });
        }
        Ok(Err(e)) => {
            monitor.kill();
            if let Some(rejection) = shared.rejection.lock().ok().and_then(|mut r| r.take()) {
                return Err(rejection);
            }
            return Err(match e {
                HandlerError::Russh(e) => {
                    if let Some(dropped) = startup_drop(&monitor) {
                        return Err(dropped);
                    }
                    let from_stream = match monitor.end() {
                        Some(StreamEnd::Eof) => Some(DisconnectCause::ConnectionClosed),
                        Some(StreamEnd::Error { kind, message }) => {
                            Some(DisconnectCause::Io { kind, message })
                        }
                        _ => None,
                    };
                    classify(Stage::Handshake, e, from_stream)
                }
                HandlerError::HostKeyRejected => TransportError::Protocol {
                    stage: Stage::HostKey,
                    message: "host key refused".into(),
                },
            });
        }
        Ok(Ok(h)) => h,
    };
    let Some(host_key) = shared.host_key.get().cloned() else {
        // russh always asks during the first key exchange; if it ever did not, refuse
        // rather than run unverified.
        monitor.kill();
        return Err(TransportError::Protocol {
            stage: Stage::HostKey,
            message: "handshake finished without a host key check".into(),
        });
    };

    let auth = tokio::time::timeout(
        config.auth_timeout,
        auth::authenticate(&mut handle, &endpoint.user, identities, &shared),
    )
    .await;
    let identity = match auth {
        Err(_) => {
            monitor.kill();
            return Err(TransportError::Timeout {
                stage: Stage::Auth,
                after: config.auth_timeout,
            });
        }
        Ok(Err(e)) => {
            // Dropping the handle ends the session task, which closes the socket.
            drop(handle);
            return Err(e);
        }
        Ok(Ok(identity)) => identity,
    };
    stopwatch.emit(ConnectEventKind::Authenticated {
        user: endpoint.user.clone(),
        identity: identity.clone(),
    });

    Ok(SshConnection {
        inner: Arc::new(ConnInner {
            handle,
            shared,
            endpoint: endpoint.clone(),
            host_key,
            identity,
            config: config.clone(),
        }),
    })
}

/// [`TransportError::ClosedAtStartup`] if the handshake failed because the server ended the
/// stream (EOF or reset) before its first key-exchange packet was complete.
fn startup_drop(monitor: &StreamMonitor) -> Option<TransportError> {
    let cause = match monitor.end()? {
        StreamEnd::Eof => DisconnectCause::ConnectionClosed,
        StreamEnd::Error { kind, message }
            if matches!(
                kind,
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ) =>
        {
            DisconnectCause::Io { kind, message }
        }
        // Our own kill switch, or an error that is not the peer going away.
        StreamEnd::Error { .. } | StreamEnd::Killed => return None,
    };
    let (startup, server_text) = monitor.startup();
    let identification_received = match startup {
        Startup::BeforeIdentification => false,
        Startup::Identified => true,
        Startup::KexStarted => return None,
    };
    Some(TransportError::ClosedAtStartup {
        cause,
        identification_received,
        server_text,
    })
}

// ===== SshConnection =====

/// Statistics of one connection. Byte counts are channel payload as seen by our channel
/// layer; `wire_bytes_*` are encrypted bytes on the underlying stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Channel payload received (stdout, stderr, forwarded data).
    pub bytes_in: u64,
    /// Channel payload sent (stdin, forwarded data).
    pub bytes_out: u64,
    /// Bytes read from the underlying stream (SSH framing, encrypted).
    pub wire_bytes_in: u64,
    /// Bytes written to the underlying stream.
    pub wire_bytes_out: u64,
    /// Channels currently open (not yet closed by either side).
    pub channels_open: u64,
    /// Channels opened since connecting.
    pub channels_opened: u64,
    /// Channel opens the server refused (e.g. sshd `MaxSessions`).
    pub channel_open_refusals: u64,
    /// Unread stdout held in memory, summed over channels.
    pub stdout_buffered_bytes: u64,
    /// Stdout bytes that went to spill files because a reader fell behind.
    pub stdout_spilled_bytes: u64,
    /// Stderr bytes dropped from log queues because their consumer was not keeping up.
    pub stderr_log_dropped_bytes: u64,
    /// Newline bytes among them: log lines whose end a consumer missed.
    pub stderr_log_dropped_lines: u64,
}

pub(crate) struct ConnInner {
    handle: Handle<ClientHandler>,
    pub(crate) shared: Arc<ConnShared>,
    endpoint: Endpoint,
    host_key: HostKeyInfo,
    identity: String,
    pub(crate) config: TransportConfig,
}

/// An authenticated SSH connection. Cheap to clone; all clones share one TCP connection and
/// one russh session.
///
/// Channels opened from it keep working if every `SshConnection` clone is dropped; the
/// connection ends when the last channel closes too, or at [`disconnect`](Self::disconnect).
#[derive(Clone)]
pub struct SshConnection {
    inner: Arc<ConnInner>,
}

impl std::fmt::Debug for SshConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshConnection")
            .field("endpoint", &self.inner.endpoint)
            .field("host_key", &self.inner.host_key.fingerprint)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl SshConnection {
    /// Runs `command` on a new session channel and returns its streams.
    pub async fn exec(&self, command: &str) -> Result<ExecChannel, TransportError> {
        self.exec_with(command, ExecOptions::default()).await
    }

    /// Like [`exec`](Self::exec), with options.
    pub async fn exec_with(
        &self,
        command: &str,
        options: ExecOptions,
    ) -> Result<ExecChannel, TransportError> {
        let channel = self
            .open(Stage::ChannelOpen, self.inner.handle.channel_open_session())
            .await?;
        crate::exec::start_exec(self.inner.clone(), channel, command, options).await
    }

    /// Opens a `direct-tcpip` channel to `host:port` as seen from the server, returning a
    /// byte stream (e.g. for [`connect_over`], which makes a ProxyJump). The server refuses
    /// with [`TransportError::ChannelOpenRefused`] if it cannot connect or forwarding is off.
    pub async fn open_direct_tcpip(
        &self,
        host: &str,
        port: u16,
    ) -> Result<TcpipStream, TransportError> {
        let channel = self
            .open(
                Stage::ChannelOpen,
                self.inner
                    .handle
                    .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0),
            )
            .await?;
        let parts = ChannelParts::spawn(self.inner.clone(), channel);
        Ok(TcpipStream::new(parts))
    }

    async fn open(
        &self,
        stage: Stage,
        open: impl Future<Output = Result<russh::Channel<Msg>, russh::Error>>,
    ) -> Result<russh::Channel<Msg>, TransportError> {
        let shared = &self.inner.shared;
        if let Some(cause) = shared.cause() {
            return Err(TransportError::Disconnected { stage, cause });
        }
        let timeout = self.inner.config.channel_open_timeout;
        // If this times out, a confirmation arriving later opens a channel nobody owns: russh
        // does not tell us its id, so it cannot be closed. In practice a timed-out open means
        // the connection is dead and keepalive will end it.
        match tokio::time::timeout(timeout, open).await {
            Err(_) => Err(TransportError::Timeout {
                stage,
                after: timeout,
            }),
            Ok(Ok(channel)) => {
                shared
                    .counters
                    .channels_opened
                    .fetch_add(1, Ordering::Relaxed);
                shared
                    .counters
                    .channels_open
                    .fetch_add(1, Ordering::Relaxed);
                Ok(channel)
            }
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
                shared
                    .counters
                    .open_refusals
                    .fetch_add(1, Ordering::Relaxed);
                let reason = ChannelOpenRefusal::from_russh(&reason);
                let description = shared.claim_open_failure(&reason).await;
                Err(TransportError::ChannelOpenRefused {
                    reason,
                    description,
                })
            }
            Ok(Err(e)) => Err(self.classify(stage, e).await),
        }
    }

    /// Classifies a russh error, filling in the connection's end cause when the error only
    /// says "the session is gone".
    pub(crate) async fn classify(&self, stage: Stage, e: russh::Error) -> TransportError {
        classify_with(&self.inner.shared, stage, e).await
    }

    /// Whether the connection has ended (or is ending).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.cause().is_some() || self.inner.handle.is_closed()
    }

    /// Why the connection ended, if it has.
    pub fn close_cause(&self) -> Option<DisconnectCause> {
        self.inner.shared.cause()
    }

    /// Resolves when the connection ends, with the real cause (keepalive timeout, reset,
    /// DISCONNECT from the server, ...). Any number of callers may wait; all get the same
    /// cause. Waits as long as the connection lives: wrap it in a timeout if needed.
    pub async fn closed(&self) -> TransportError {
        let mut rx = self.inner.shared.cause.subscribe();
        let cause = match rx.wait_for(Option::is_some).await {
            Ok(c) => c.clone(),
            Err(_) => None,
        };
        TransportError::Disconnected {
            stage: Stage::Connected,
            cause: cause.unwrap_or_else(|| DisconnectCause::Unknown("cause not recorded".into())),
        }
    }

    /// Ends the connection: sends SSH DISCONNECT, waits briefly for the session to finish,
    /// then cuts the stream. Open channels fail with [`DisconnectCause::Local`].
    pub async fn disconnect(&self) {
        let shared = &self.inner.shared;
        shared.local.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(
            DISCONNECT_GRACE,
            self.inner
                .handle
                .disconnect(russh::Disconnect::ByApplication, "nixmux disconnect", ""),
        )
        .await;
        let mut rx = shared.cause.subscribe();
        if tokio::time::timeout(DISCONNECT_GRACE, rx.wait_for(Option::is_some))
            .await
            .is_err()
        {
            shared.monitor.kill();
            let _ = tokio::time::timeout(DISCONNECT_GRACE, rx.wait_for(Option::is_some)).await;
        }
    }

    /// Current statistics.
    pub fn stats(&self) -> ConnectionStats {
        let c = &self.inner.shared.counters;
        let m = &self.inner.shared.monitor;
        ConnectionStats {
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            wire_bytes_in: m.bytes_read.load(Ordering::Relaxed),
            wire_bytes_out: m.bytes_written.load(Ordering::Relaxed),
            channels_open: c.channels_open.load(Ordering::Relaxed),
            channels_opened: c.channels_opened.load(Ordering::Relaxed),
            channel_open_refusals: c.open_refusals.load(Ordering::Relaxed),
            stdout_buffered_bytes: c.stdout_buffered.load(Ordering::Relaxed),
            stdout_spilled_bytes: c.stdout_spilled.load(Ordering::Relaxed),
            stderr_log_dropped_bytes: c.stderr_log_dropped_bytes.load(Ordering::Relaxed),
            stderr_log_dropped_lines: c.stderr_log_dropped_lines.load(Ordering::Relaxed),
        }
    }

    /// SHA-256 fingerprint of the server's host key (`SHA256:...`).
    pub fn host_key_fingerprint(&self) -> &str {
        &self.inner.host_key.fingerprint
    }

    /// Algorithm of the server's host key (`ssh-ed25519`, ...).
    pub fn host_key_algorithm(&self) -> &str {
        &self.inner.host_key.algorithm
    }

    /// What vouched for the host key.
    pub fn host_key_source(&self) -> &HostKeySource {
        &self.inner.host_key.source
    }

    /// The negotiated key exchange and cipher, e.g. `("curve25519-sha256", "aes128-gcm@openssh.com")`.
    pub fn algorithms(&self) -> Option<(&str, &str)> {
        self.inner
            .shared
            .negotiated
            .get()
            .map(|(k, c)| (k.as_str(), c.as_str()))
    }

    /// The identity that authenticated.
    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// The endpoint this connection goes to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }
}

pub(crate) async fn classify_with(
    shared: &ConnShared,
    stage: Stage,
    e: russh::Error,
) -> TransportError {
    let needs_cause = matches!(
        e,
        russh::Error::SendError
            | russh::Error::Disconnect
            | russh::Error::HUP
            | russh::Error::RecvError
            | russh::Error::Join(_)
    );
    let cause = if needs_cause {
        Some(shared.wait_cause(CAUSE_GRACE).await)
    } else {
        shared.cause()
    };
    classify(stage, e, cause)
}
