//! An in-process SSH server (russh's server side) on `127.0.0.1:0`: it authenticates one
//! client key, serves the fake Nix peers of [`crate::fake`] on `nix-store --serve --write`
//! and `nix-daemon --stdio`, runs a handful of scripted commands ([`commands`]), and can
//! misbehave at the connection level ([`OpenMode`], [`ServerOptions::window_size`],
//! [`ServerOptions::huge_window_adjust`], [`ServerOptions::rekey`]).
//!
//! What russh's server API cannot express is listed in the crate docs; byte-level faults
//! below SSH (a cut stream, a slow identification) are in [`crate::tcp`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nixmux_proto::ProtocolVersion;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::fake::{FakeStore, ServeFake, WorkerFake};

/// Scripted commands the server runs on `exec` besides the Nix programs. Each one is a way
/// for a command's output to be well-formed or not.
pub mod commands {
    /// `echo TEXT`: TEXT and a newline, EOF, exit status 0, close.
    pub const ECHO: &str = "echo";
    /// `cat`: stdin back on stdout until EOF, then exit status 0 and close.
    pub const CAT: &str = "cat";
    /// `exit N`: exit status N, close.
    pub const EXIT: &str = "exit";
    /// `blob N`: N bytes (a repeating pattern, see [`crate::server::blob_byte`]), EOF,
    /// exit status 0, close.
    pub const BLOB: &str = "blob";
    /// `endless`: data as fast as the window allows, forever.
    pub const ENDLESS: &str = "endless";
    /// `data-after-eof`: `before\n`, EOF, `after-eof\n`, exit status 0, close.
    pub const DATA_AFTER_EOF: &str = "data-after-eof";
    /// `data-after-close`: `before\n`, exit status 0, close, then `after-close\n` (which
    /// russh's server drops: the channel is gone from its table).
    pub const DATA_AFTER_CLOSE: &str = "data-after-close";
    /// `exit-twice`: `x`, exit status 1, exit status 2, EOF, close.
    pub const EXIT_TWICE: &str = "exit-twice";
    /// `exit-before-data`: exit status 3, then `late\n`, EOF, close.
    pub const EXIT_BEFORE_DATA: &str = "exit-before-data";
    /// `exit-no-close`: `done\n`, EOF, exit status 0, and the channel is never closed.
    pub const EXIT_NO_CLOSE: &str = "exit-no-close";
    /// `silent`: accepted, then nothing at all until the client closes the channel.
    pub const SILENT: &str = "silent";
}

/// The byte at offset `i` of `blob N` output.
pub fn blob_byte(i: u64) -> u8 {
    // Deterministic and not periodic at any power of two a packet or buffer size could hit.
    (i.wrapping_mul(31).wrapping_add(i / 251) % 251) as u8
}

/// How the server answers `session` channel opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpenMode {
    /// Confirm them.
    #[default]
    Confirm,
    /// Never answer: neither confirmation nor failure (the open stays pending while the
    /// rest of the connection works: keepalives, other channels).
    NeverConfirm,
    /// Refuse with `SSH_OPEN_CONNECT_FAILED`, as sshd at `MaxSessions`.
    Refuse,
}

/// The fake Nix peers the server runs on `nix-store --serve --write` and
/// `nix-daemon --stdio`, sharing one store.
#[derive(Debug, Clone)]
pub struct NixPeers {
    /// Serve protocol version announced.
    pub serve_version: ProtocolVersion,
    /// Worker protocol version announced.
    pub worker_version: ProtocolVersion,
    /// The store every session starts from; paths a session adds are merged back when it
    /// ends.
    pub store: FakeStore,
}

impl Default for NixPeers {
    /// What Nix 2.8.0 announces: serve 2.7, worker 1.34.
    fn default() -> Self {
        NixPeers {
            serve_version: ProtocolVersion::new(2, 7),
            worker_version: ProtocolVersion::new(1, 34),
            store: FakeStore::default(),
        }
    }
}

/// Configuration of a [`TestServer`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The only client key accepted (public key authentication only).
    pub client_key: PublicKey,
    /// The host key; a fresh Ed25519 key if `None`.
    pub host_key: Option<PrivateKey>,
    /// The server's receive window per channel (how much stdin the client may send before
    /// an adjustment). `0` makes a channel on which the client can never send anything: the
    /// server never adjusts a window nothing was sent into.
    pub window_size: u32,
    /// After the first window adjustment of a channel, ask for a target window of
    /// `u32::MAX`: the next adjustments are about 4 GiB each.
    pub huge_window_adjust: bool,
    /// Server-initiated key re-exchange limits (`None`: russh's defaults, 1 GiB / 1 h).
    /// A tiny time limit makes a rekey storm.
    pub rekey: Option<russh::Limits>,
    /// How channel opens are answered at start (changeable with
    /// [`TestServer::set_open_mode`]).
    pub open_mode: OpenMode,
    /// The Nix peers.
    pub nix: NixPeers,
}

impl ServerOptions {
    /// A well-behaved server accepting `client_key`.
    pub fn new(client_key: PublicKey) -> Self {
        ServerOptions {
            client_key,
            host_key: None,
            window_size: 2 * 1024 * 1024,
            huge_window_adjust: false,
            rekey: None,
            open_mode: OpenMode::Confirm,
            nix: NixPeers::default(),
        }
    }
}

/// Counters of what the server saw.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// TCP connections accepted.
    pub connections: AtomicU64,
    /// Successful authentications.
    pub authenticated: AtomicU64,
    /// Session channel opens received (answered or not).
    pub channel_opens: AtomicU64,
    /// Opens left unanswered ([`OpenMode::NeverConfirm`]).
    pub opens_unanswered: AtomicU64,
    /// Exec requests accepted.
    pub execs: AtomicU64,
    /// Window adjustments after which the server asked for a `u32::MAX` target
    /// ([`ServerOptions::huge_window_adjust`]): each is followed by a ~4 GiB adjustment at
    /// the next data packet.
    pub huge_window_targets: AtomicU64,
}

struct State {
    client_key: PublicKey,
    open_mode: Mutex<OpenMode>,
    /// Unanswered opens: kept alive, since dropping one makes russh refuse it.
    parked: Mutex<Vec<ChannelOpenHandle>>,
    nix: Mutex<NixPeers>,
    huge_window_adjust: bool,
    stats: ServerStats,
    commands: Mutex<Vec<String>>,
}

/// A running in-process SSH server. Stops accepting when dropped; connections already
/// accepted end when their client goes away.
pub struct TestServer {
    addr: SocketAddr,
    host_key: PublicKey,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .field("stats", &self.state.stats)
            .finish()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TestServer {
    /// Starts a server on `127.0.0.1:0`.
    pub async fn start(options: ServerOptions) -> std::io::Result<TestServer> {
        let host_key = options
            .host_key
            .clone()
            .unwrap_or_else(crate::keys::ed25519);
        let host_public = host_key.public_key().clone();
        let mut config = russh::server::Config {
            // Only public keys: nothing else is configured, and the client never tries more.
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            // russh delays rejections to hide timing; a test server has nothing to hide and
            // tests must be fast.
            auth_rejection_time: Duration::from_millis(1),
            auth_rejection_time_initial: Some(Duration::from_millis(1)),
            keys: vec![host_key],
            window_size: options.window_size,
            inactivity_timeout: None,
            keepalive_interval: None,
            nodelay: true,
            ..Default::default()
        };
        if let Some(limits) = options.rekey.clone() {
            config.limits = limits;
        }
        let config = Arc::new(config);
        let state = Arc::new(State {
            client_key: options.client_key,
            open_mode: Mutex::new(options.open_mode),
            parked: Mutex::new(Vec::new()),
            nix: Mutex::new(options.nix),
            huge_window_adjust: options.huge_window_adjust,
            stats: ServerStats::default(),
            commands: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accept_state = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                accept_state
                    .stats
                    .connections
                    .fetch_add(1, Ordering::Relaxed);
                let handler = ConnHandler {
                    state: accept_state.clone(),
                    channels: HashMap::new(),
                    adjusted: HashMap::new(),
                };
                let config = config.clone();
                tokio::spawn(async move {
                    match russh::server::run_stream(config, tcp, handler).await {
                        Ok(session) => {
                            if let Err(e) = session.await {
                                tracing::debug!("test server session ended: {e}");
                            }
                        }
                        Err(e) => tracing::debug!("test server handshake failed: {e}"),
                    }
                });
            }
        });
        Ok(TestServer {
            addr,
            host_key: host_public,
            state,
            accept,
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The server's host public key.
    pub fn host_key(&self) -> &PublicKey {
        &self.host_key
    }

    /// Changes how later channel opens are answered. Opens already left unanswered stay so.
    pub fn set_open_mode(&self, mode: OpenMode) {
        if let Ok(mut m) = self.state.open_mode.lock() {
            *m = mode;
        }
    }

    /// Counters.
    pub fn stats(&self) -> &ServerStats {
        &self.state.stats
    }

    /// Every command line executed so far, in order.
    pub fn commands(&self) -> Vec<String> {
        self.state
            .commands
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// The fake Nix peers' shared store (a copy).
    pub fn store(&self) -> FakeStore {
        self.state
            .nix
            .lock()
            .map(|n| n.store.clone())
            .unwrap_or_default()
    }

    /// Replaces the fake Nix peers' shared store.
    pub fn set_store(&self, store: FakeStore) {
        if let Ok(mut n) = self.state.nix.lock() {
            n.store = store;
        }
    }
}

/// One connection's russh handler.
struct ConnHandler {
    state: Arc<State>,
    /// Confirmed channels waiting for their exec request.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// Channels whose window was adjusted once (for `huge_window_adjust`).
    adjusted: HashMap<ChannelId, ()>,
}

impl Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(
            if offer.public_key.key_data() == self.state.client_key.key_data() {
                Auth::Accept
            } else {
                Auth::reject()
            },
        )
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if key.public_key.key_data() == self.state.client_key.key_data() {
            self.state
                .stats
                .authenticated
                .fetch_add(1, Ordering::Relaxed);
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.state
            .stats
            .channel_opens
            .fetch_add(1, Ordering::Relaxed);
        let mode = self.state.open_mode.lock().map(|m| *m).unwrap_or_default();
        match mode {
            OpenMode::Confirm => {
                self.channels.insert(channel.id(), channel);
                reply.accept().await;
            }
            OpenMode::NeverConfirm => {
                self.state
                    .stats
                    .opens_unanswered
                    .fetch_add(1, Ordering::Relaxed);
                if let Ok(mut p) = self.state.parked.lock() {
                    p.push(reply);
                }
            }
            OpenMode::Refuse => {
                reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(channel) = self.channels.remove(&id) else {
            session.channel_failure(id)?;
            return Ok(());
        };
        let command = String::from_utf8_lossy(data).into_owned();
        self.state.stats.execs.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.state.commands.lock() {
            c.push(command.clone());
        }
        session.channel_success(id)?;
        tokio::spawn(run_command(self.state.clone(), command, channel));
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        self.adjusted.remove(&channel);
        Ok(())
    }

    fn adjust_window(&mut self, channel: ChannelId, current: u32) -> u32 {
        if !self.state.huge_window_adjust {
            return current;
        }
        // russh has just sent `target - remaining` and asks for the next target: from now on
        // every adjustment tops the client's window up to 4 GiB (RFC 4254 §5.2 allows
        // windows up to 2^32 - 1; the sum must not wrap on the client).
        self.adjusted.insert(channel, ());
        self.state
            .stats
            .huge_window_targets
            .fetch_add(1, Ordering::Relaxed);
        u32::MAX
    }
}

/// Runs one exec'd command on its channel.
async fn run_command(state: Arc<State>, command: String, mut channel: Channel<Msg>) {
    let (program, arg) = match command.split_once(' ') {
        Some((p, a)) => (p, a.trim()),
        None => (command.as_str(), ""),
    };
    let result: Result<(), russh::Error> = async {
        if command.ends_with("--serve --write") || command.ends_with("--stdio") {
            return run_nix_peer(&state, &command, channel).await;
        }
        match program {
            commands::ECHO => {
                channel.data_bytes(format!("{arg}\n")).await?;
                finish(&channel, 0).await
            }
            commands::CAT => {
                while let Some(msg) = channel.wait().await {
                    match msg {
                        ChannelMsg::Data { data } => channel.data_bytes(data).await?,
                        ChannelMsg::Eof => break,
                        _ => {}
                    }
                }
                finish(&channel, 0).await
            }
            commands::EXIT => finish(&channel, arg.parse().unwrap_or(1)).await,
            commands::BLOB => {
                let total: u64 = arg.parse().unwrap_or(0);
                let mut sent = 0u64;
                while sent < total {
                    let n = (total - sent).min(32 * 1024);
                    let chunk: Vec<u8> = (sent..sent + n).map(blob_byte).collect();
                    channel.data_bytes(chunk).await?;
                    sent += n;
                }
                finish(&channel, 0).await
            }
            commands::ENDLESS => {
                let chunk = Bytes::from(vec![b'y'; 32 * 1024]);
                loop {
                    channel.data_bytes(chunk.clone()).await?;
                }
            }
            commands::DATA_AFTER_EOF => {
                channel.data_bytes(&b"before\n"[..]).await?;
                channel.eof().await?;
                channel.data_bytes(&b"after-eof\n"[..]).await?;
                channel.exit_status(0).await?;
                channel.close().await
            }
            commands::DATA_AFTER_CLOSE => {
                channel.data_bytes(&b"before\n"[..]).await?;
                channel.exit_status(0).await?;
                channel.close().await?;
                // russh drops data for a channel it has closed; sent anyway in case that
                // changes.
                let _ = channel.data_bytes(&b"after-close\n"[..]).await;
                Ok(())
            }
            commands::EXIT_TWICE => {
                channel.data_bytes(&b"x"[..]).await?;
                channel.exit_status(1).await?;
                channel.exit_status(2).await?;
                channel.eof().await?;
                channel.close().await
            }
            commands::EXIT_BEFORE_DATA => {
                channel.exit_status(3).await?;
                channel.data_bytes(&b"late\n"[..]).await?;
                channel.eof().await?;
                channel.close().await
            }
            commands::EXIT_NO_CLOSE => {
                channel.data_bytes(&b"done\n"[..]).await?;
                channel.eof().await?;
                channel.exit_status(0).await?;
                // Keep the channel (and so the server's side of it) until the client closes.
                while channel.wait().await.is_some() {}
                Ok(())
            }
            commands::SILENT => {
                while channel.wait().await.is_some() {}
                Ok(())
            }
            _ => {
                channel
                    .extended_data_bytes(1, format!("{program}: command not found\n"))
                    .await?;
                finish(&channel, 127).await
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!("test server command {command:?} ended: {e}");
    }
}

async fn finish(channel: &Channel<Msg>, status: u32) -> Result<(), russh::Error> {
    channel.eof().await?;
    channel.exit_status(status).await?;
    channel.close().await
}

/// Bridges the channel to a fake Nix peer over an in-memory pipe.
async fn run_nix_peer(
    state: &State,
    command: &str,
    mut channel: Channel<Msg>,
) -> Result<(), russh::Error> {
    let peers = state.nix.lock().map(|n| n.clone()).unwrap_or_default();
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    let serve = command.ends_with("--serve --write");
    let report = if serve {
        let mut fake = ServeFake::new(peers.serve_version);
        fake.store = peers.store;
        tokio::spawn(async move { fake.spawn(theirs).await.ok().map(|r| r.store) })
    } else {
        let mut fake = WorkerFake::new(peers.worker_version);
        fake.store = peers.store;
        tokio::spawn(async move { fake.spawn(theirs).await.ok().map(|r| r.store) })
    };
    let (mut rd, mut wr) = tokio::io::split(ours);
    let mut buf = vec![0u8; 64 << 10];
    let mut client_open = true;
    loop {
        tokio::select! {
            msg = channel.wait(), if client_open => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if wr.write_all(&data).await.is_err() {
                        client_open = false;
                    }
                }
                Some(ChannelMsg::Eof) => {
                    let _ = wr.shutdown().await;
                    client_open = false;
                }
                // The client closed the channel: the fake sees EOF and ends.
                None | Some(ChannelMsg::Close) => {
                    let _ = wr.shutdown().await;
                    client_open = false;
                }
                Some(_) => {}
            },
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => channel.data_bytes(buf[..n].to_vec()).await?,
            },
        }
    }
    drop(wr);
    if let Ok(Some(store)) = report.await
        && let Ok(mut n) = state.nix.lock()
    {
        // Sessions run concurrently: merge what this one added rather than overwrite.
        for (path, item) in store.paths {
            n.store.paths.entry(path).or_insert(item);
        }
    }
    finish(&channel, 0).await
}
