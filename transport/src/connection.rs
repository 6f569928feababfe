//! Connecting, and the shared [`SshConnection`] handle.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use russh::client::Msg;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::auth;
use crate::config::{Endpoint, ExecOptions, FirstChannel, Identity, TransportConfig};
use crate::error::{ChannelOpenRefusal, DisconnectCause, Stage, TransportError, classify};
use crate::exec::{ChannelParts, ExecChannel, TcpipStream};
use crate::handler::{ClientHandler, ConnInner, HandlerError};
use crate::host_key::{HostKeyCheck, HostKeySource, Verifier};
use crate::observer::{ConnectEventKind, ConnectObserver, Stopwatch};
use crate::shared::{ConnShared, classify_with};
use crate::stream::{MonitoredStream, Startup, StreamEnd, StreamMonitor};

/// How long to wait for the server to acknowledge our DISCONNECT before cutting the stream.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

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

    let mut first_channel = config.first_channel.as_ref();
    loop {
        let (tcp, quickack) = tcp_connect(endpoint, &addrs, config, &stopwatch).await?;
        let r = establish(
            tcp,
            endpoint,
            identities,
            prepared.clone(),
            config,
            stopwatch.clone(),
            quickack,
            first_channel,
        )
        .await;
        match r {
            Err(Failed {
                error,
                ahead_refused: true,
            }) if first_channel.is_some() => {
                // The server ended the connection over the channel open sent behind a
                // request it refused (Dropbear: "before userauth", process-packet.c): once
                // more, without it. The key is no longer remembered as accepted.
                tracing::debug!("retrying without the early channel open: {error}");
                first_channel = None;
            }
            r => return r.map_err(|f| f.error),
        }
    }
}

/// An after-read hook (TCP_QUICKACK), if the socket allows.
type AfterRead = Option<Box<dyn Fn() + Send + Sync>>;

/// TCP connect to each of `addrs` in turn.
async fn tcp_connect(
    endpoint: &Endpoint,
    addrs: &[SocketAddr],
    config: &TransportConfig,
    stopwatch: &Stopwatch,
) -> Result<(TcpStream, AfterRead), TransportError> {
    let mut last_err = None;
    let mut connected = None;
    for addr in addrs {
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
    Ok((tcp, quickack))
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
        stream,
        endpoint,
        identities,
        prepared,
        config,
        stopwatch,
        None,
        config.first_channel.as_ref(),
    )
    .await
    .map_err(|f| f.error)
}

/// A failed [`establish`].
struct Failed {
    error: TransportError,
    /// The server refused the request the first channel's open went behind, and the
    /// connection is gone: a new one without the early open may succeed.
    ahead_refused: bool,
}

impl From<TransportError> for Failed {
    fn from(error: TransportError) -> Self {
        Failed {
            error,
            ahead_refused: false,
        }
    }
}

#[derive(Clone)]
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

#[allow(clippy::too_many_arguments)]
async fn establish<S>(
    stream: S,
    endpoint: &Endpoint,
    identities: &[Identity],
    prepared: Prepared,
    config: &TransportConfig,
    stopwatch: Stopwatch,
    after_read: AfterRead,
    first_channel: Option<&FirstChannel>,
) -> Result<SshConnection, Failed>
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
    let preloaded = auth::preload(identities, config.accepted_keys_file.as_deref());

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
            }
            .into());
        }
        Ok(Err(e)) => {
            monitor.kill();
            if let Some(rejection) = shared.rejection.lock().ok().and_then(|mut r| r.take()) {
                return Err(rejection.into());
            }
            return Err(match e {
                HandlerError::Russh(e) => {
                    if let Some(dropped) = startup_drop(&monitor) {
                        return Err(dropped.into());
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
            }
            .into());
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
        }
        .into());
    };

    let mut ahead = auth::Ahead {
        open: first_channel.cloned(),
        ..auth::Ahead::default()
    };
    let auth = tokio::time::timeout(
        config.auth_timeout,
        auth::authenticate(
            &mut handle,
            endpoint,
            identities,
            &shared,
            config.fast_auth,
            preloaded,
            &mut ahead,
        ),
    )
    .await;
    let identity = match auth {
        Err(_) => {
            monitor.kill();
            return Err(TransportError::Timeout {
                stage: Stage::Auth,
                after: config.auth_timeout,
            }
            .into());
        }
        Ok(Err(mut error)) => {
            let ahead_refused = ahead.refused && handle.is_closed();
            if ahead_refused && let TransportError::AuthRejected { tried, .. } = &mut error {
                tried.push(
                    "the server ended the connection over the channel open sent behind the refused request; the next connection does not send it early".into(),
                );
            }
            // Dropping the handle ends the session task, which closes the socket.
            drop(handle);
            return Err(Failed {
                error,
                ahead_refused,
            });
        }
        Ok(Ok(identity)) => identity,
    };
    // Delayed compression (zlib@openssh.com) makes russh hold the open until authenticated.
    let first_channel_pipelined = ahead.pending.is_some()
        && ahead.rode_with_success
        && shared.compression.get().copied() != Some("zlib@openssh.com");
    let ahead = match (ahead.open, ahead.pending) {
        (Some(open), Some(pending)) => Some((open, pending)),
        _ => None,
    };
    stopwatch.emit(ConnectEventKind::Authenticated {
        user: endpoint.user.clone(),
        identity: identity.clone(),
    });

    let inner = Arc::new(ConnInner {
        handle,
        shared,
        endpoint: endpoint.clone(),
        host_key,
        identity,
        config: config.clone(),
        ahead: std::sync::Mutex::new(ahead),
        first_channel_pipelined,
    });
    if inner.shared.wants_send_ahead() {
        tokio::spawn(measure_round_trips(Arc::downgrade(&inner)));
    }
    Ok(SshConnection { inner })
}

/// The pauses before each round-trip probe, after authentication: one at once, then more in
/// case the first answers waited behind the server's work on the first channel (a fork, a
/// daemon's handshake) or behind a transfer. The shortest answer counts.
const ROUND_TRIP_PROBES: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_secs(2),
];

/// How long a probe's answer may take before the probes stop (a server that does not
/// answer `keepalive@openssh.com` leaves the round trip unknown; keepalive, not this,
/// notices a dead one).
const ROUND_TRIP_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Measures the connection's round trip with `keepalive@openssh.com` requests, which an
/// OpenSSH server answers at once (REQUEST_FAILURE, `server_input_global_request` in
/// `serverloop.c`), for [`crate::SendAhead`]. Holds the connection only while a probe is
/// out.
async fn measure_round_trips(conn: std::sync::Weak<ConnInner>) {
    for pause in ROUND_TRIP_PROBES {
        tokio::time::sleep(pause).await;
        let Some(inner) = conn.upgrade() else { return };
        if inner.shared.cause().is_some() {
            return;
        }
        let started = std::time::Instant::now();
        match tokio::time::timeout(ROUND_TRIP_PROBE_TIMEOUT, inner.handle.send_ping()).await {
            // russh also returns Ok when the connection ended before the answer.
            Ok(Ok(())) if inner.shared.cause().is_none() => {
                let rtt = started.elapsed();
                inner.shared.note_round_trip(rtt);
                tracing::debug!(
                    ?rtt,
                    send_ahead = inner.shared.send_ahead_limit(),
                    "round trip measured"
                );
            }
            _ => return,
        }
    }
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
    /// The shortest round trip measured on the connection (OpenSSH servers only, see
    /// [`TransportConfig::send_ahead`](crate::TransportConfig::send_ahead)).
    pub round_trip: Option<Duration>,
    /// The limit on a channel's unacknowledged data now, if there is one.
    pub send_ahead_limit: Option<u32>,
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
            .open(
                Stage::ChannelOpen,
                Some(FirstChannel::Session),
                self.inner.handle.channel_open_session(),
            )
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
                None,
                self.inner
                    .handle
                    .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0),
            )
            .await?;
        let parts = ChannelParts::spawn(self.inner.clone(), channel);
        Ok(TcpipStream::new(parts))
    }

    /// Opens a `direct-streamlocal@openssh.com` channel to the Unix socket at `path` on the
    /// server (OpenSSH's `ssh -L local:/remote/socket`), drained like an exec channel and
    /// returned as one: its stdout is what the socket's peer writes, its stdin what we write;
    /// stderr stays empty and it ends without an exit status
    /// ([`ExitStatus::ClosedWithoutStatus`](crate::ExitStatus::ClosedWithoutStatus)).
    ///
    /// Such a channel is a forwarding, not a session: sshd's `MaxSessions` does not count it,
    /// and no process is started for it (a daemon already listening on the socket answers).
    /// sshd refuses it ([`TransportError::ChannelOpenRefused`]) when stream-local forwarding
    /// is off (`AllowStreamLocalForwarding no`, `DisableForwarding yes`), when the key is
    /// `restrict`ed or `no-port-forwarding`, and when nothing listens on `path`; OpenSSH
    /// gives the same reason code for all of these (`channel_connect_to_path` failing in
    /// `serverloop.c`). Of `options`, the observer, `first_input` (sent right after the
    /// open is confirmed) and `stderr_log_max_bytes` (the queue stays empty) apply; on drop
    /// the channel is sent EOF and closed at once (there is no command to signal).
    pub async fn open_streamlocal(
        &self,
        path: &str,
        options: ExecOptions,
    ) -> Result<ExecChannel, TransportError> {
        let channel = self
            .open(
                Stage::ChannelOpen,
                Some(FirstChannel::Streamlocal(path.to_owned())),
                self.inner.handle.channel_open_direct_streamlocal(path),
            )
            .await?;
        crate::exec::start_stream(self.inner.clone(), channel, options).await
    }

    /// Opens a channel: `open` (not polled if unused), or the channel opened ahead if it is
    /// the one wanted (`want`).
    async fn open(
        &self,
        stage: Stage,
        want: Option<FirstChannel>,
        open: impl Future<Output = Result<russh::Channel<Msg>, russh::Error>>,
    ) -> Result<russh::Channel<Msg>, TransportError> {
        match self.take_ahead(want.as_ref()) {
            Some(pending) => self.finish_open(stage, pending.confirmed()).await,
            None => self.finish_open(stage, open).await,
        }
    }

    /// The channel opened ahead ([`TransportConfig::first_channel`]) if it is `want`; the
    /// first open of any other kind closes it unused (as soon as the server confirms it),
    /// so that it does not hold a session of the server's `MaxSessions`.
    fn take_ahead(&self, want: Option<&FirstChannel>) -> Option<russh::client::PendingChannel> {
        let (open, pending) = self.inner.ahead.lock().ok()?.take()?;
        if want == Some(&open) {
            return Some(pending);
        }
        tokio::spawn(async move {
            if let Ok(channel) = pending.confirmed().await {
                let _ = channel.close().await;
            }
        });
        None
    }

    async fn finish_open(
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
            round_trip: self.inner.shared.round_trip(),
            send_ahead_limit: Some(self.inner.shared.send_ahead_limit()).filter(|&l| l > 0),
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

    /// The negotiated compression of what we send (`none`, `zlib@openssh.com`, `zlib`);
    /// see [`TransportConfig::compression`].
    pub fn compression(&self) -> Option<&str> {
        self.inner.shared.compression.get().copied()
    }

    /// Whether the first channel's open went out right behind the authentication request
    /// ([`TransportConfig::first_channel`]): its round trip was then part of authentication's.
    pub fn first_channel_pipelined(&self) -> bool {
        self.inner.first_channel_pipelined
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
