//! The agent: a Unix socket in front of one nixmux [`Pool`], splicing each client's
//! session (a local Nix talking to what it thinks is its remote program) onto a channel of
//! the builder's pooled SSH connection.
//!
//! * Every client's uid is checked (`SO_PEERCRED`) against the allow-list before anything
//!   else; a refused client gets a clear message and nothing reaches a builder.
//! * The machines file is reloaded on SIGHUP and when it changes; only changed lines are
//!   replaced, and sessions in flight keep what they hold.
//! * SIGTERM (or SIGINT) stops accepting and lets running sessions finish, up to the drain
//!   timeout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use nixmux::Pool;
use nixmux::config::local_env;
use nixmux::setup::Overrides;
use nixmux::transport::{ExitStatus, StderrEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::builders::{self, Entry, Key, MachinesSource, ReloadReport};
use crate::greeting;
use crate::spares::Spares;
use crate::status::{BuilderStatus, StatusReport};
use crate::wire::{Frame, Hello, MAX_HELLO, Request, SessionProtocol};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The socket to listen on.
    pub socket: PathBuf,
    /// Its permission bits (default 0600: only the agent's user can even connect).
    pub socket_mode: u32,
    /// Uids allowed to start sessions (and see the status).
    pub allowed_uids: Vec<u32>,
    /// Where the builders come from.
    pub machines: MachinesSource,
    /// Keys, known_hosts and timeouts for builders that do not name their own.
    pub overrides: Overrides,
    /// ssh_config file (default: ~/.ssh/config, then /etc/ssh/ssh_config).
    pub ssh_config: Option<PathBuf>,
    /// Remote programs kept started per builder.
    pub spares: usize,
    /// Spares unused this long are closed.
    pub spare_idle: Duration,
    /// After SIGTERM, how long running sessions may take to finish.
    pub drain_timeout: Duration,
    /// Serve Prometheus metrics on this address.
    pub metrics: Option<SocketAddr>,
    /// How often the machines file is checked for changes.
    pub reload_check: Duration,
}

impl AgentConfig {
    /// Defaults for `socket` and `machines`: mode 0600, this process's uid and root allowed,
    /// 2 spares per builder closed after 5 minutes unused, 60 s to drain, checks every 2 s.
    pub fn new(socket: PathBuf, machines: MachinesSource) -> Self {
        let me = local_env::effective_uid().unwrap_or(0);
        let mut allowed = vec![0, me];
        allowed.dedup();
        AgentConfig {
            socket,
            socket_mode: 0o600,
            allowed_uids: allowed,
            machines,
            overrides: Overrides::default(),
            ssh_config: None,
            spares: 2,
            spare_idle: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(60),
            metrics: None,
            reload_check: Duration::from_secs(2),
        }
    }
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket could not be set up.
    #[error("socket {}: {source}", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Another agent is listening on the socket.
    #[error("another nixmux agent is already listening on {}", .0.display())]
    AlreadyRunning(PathBuf),
    /// The builders could not be loaded at start.
    #[error("{0}")]
    Machines(String),
    /// The metrics address could not be bound.
    #[error("metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
}

struct Agent {
    config: AgentConfig,
    pool: Pool,
    builders: RwLock<BTreeMap<Key, Arc<Entry>>>,
    started: Instant,
    clients_refused: AtomicU64,
    sessions_total: AtomicU64,
    sessions_active: AtomicU64,
    /// Signalled when a session ends (for the drain).
    session_ended: Notify,
    reloads: AtomicU64,
    last_reload_error: RwLock<Option<String>>,
    /// The machines file's (mtime, length) at the last load.
    loaded_stamp: RwLock<Option<(SystemTime, u64)>>,
}

fn stamp(source: &MachinesSource) -> Option<(SystemTime, u64)> {
    match source {
        MachinesSource::File(p) => std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len()))),
        MachinesSource::LocalNix => None,
    }
}

impl Agent {
    fn entries(&self) -> Vec<Arc<Entry>> {
        self.builders
            .read()
            .map(|b| b.values().cloned().collect())
            .unwrap_or_default()
    }

    fn entry(&self, key: &Key) -> Option<Arc<Entry>> {
        self.builders.read().ok().and_then(|b| b.get(key).cloned())
    }

    /// Loads the builders (again): adds new lines, replaces changed ones, drops removed ones.
    async fn reload(self: &Arc<Self>) -> Result<ReloadReport, String> {
        let source = self.config.machines.clone();
        let overrides = self.config.overrides.clone();
        let ssh_config = self.config.ssh_config.clone();
        let new_stamp = stamp(&source);
        let (resolved, skipped) = tokio::task::spawn_blocking(move || {
            builders::resolve(&source, &overrides, ssh_config.as_deref())
        })
        .await
        .map_err(|e| format!("loading the builders: {e}"))??;
        for s in &skipped {
            tracing::warn!("skipping {s}");
        }
        let (add, drop, report) = {
            let current = self.builders.read().map_err(|_| "poisoned lock")?;
            builders::diff(&current, resolved)
        };
        let mut gone = Vec::new();
        let mut fresh = Vec::new();
        {
            let mut current = self.builders.write().map_err(|_| "poisoned lock")?;
            for key in drop {
                if let Some(e) = current.remove(&key) {
                    gone.push(e);
                }
            }
            for r in add {
                let builder = self.pool.add(r.config);
                let e = Arc::new(Entry {
                    name: r.name,
                    protocol: r.protocol,
                    uri: r.uri,
                    fingerprint: r.fingerprint,
                    builder,
                    spares: Spares::new(r.protocol, self.config.spares, self.config.spare_idle),
                    sessions_active: AtomicU64::new(0),
                    sessions_total: AtomicU64::new(0),
                    session_failures: AtomicU64::new(0),
                    bytes_up: AtomicU64::new(0),
                    bytes_down: AtomicU64::new(0),
                });
                current.insert((e.name.clone(), e.protocol), e.clone());
                fresh.push(e);
            }
        }
        if let Ok(mut s) = self.loaded_stamp.write() {
            *s = new_stamp;
        }
        // Lines that went away: their spares close; sessions running on them keep their
        // channel (and the builder they hold) until they end.
        for e in gone {
            e.spares.close();
            self.pool.remove(&e.builder).await;
        }
        for e in fresh {
            e.refill_spares(true);
        }
        Ok(report)
    }

    fn status(&self) -> StatusReport {
        let builders = self
            .entries()
            .iter()
            .map(|e| {
                let h = e.builder.health();
                let st = e.builder.stats();
                BuilderStatus {
                    name: e.name.clone(),
                    protocol: e.protocol.scheme().into(),
                    uri: e.uri.clone(),
                    health: format!("{:?}", h.state).to_lowercase(),
                    last_error: h.last_error,
                    connections: h.connections,
                    channels_open: h.channels_open,
                    learned_channel_limit: h.learned_channel_limit,
                    connections_opened: st.connections_opened,
                    startup_drops: st.startup_drops,
                    sessions_active: e.sessions_active.load(Ordering::Relaxed),
                    sessions_total: e.sessions_total.load(Ordering::Relaxed),
                    session_failures: e.session_failures.load(Ordering::Relaxed),
                    spare_hits: e.spares.hits.load(Ordering::Relaxed),
                    spare_misses: e.spares.misses.load(Ordering::Relaxed),
                    hello_hits: e.spares.hello_hits.load(Ordering::Relaxed),
                    hello_misses: e.spares.hello_misses.load(Ordering::Relaxed),
                    spares_ready: e.spares.ready(),
                    bytes_to_builder: e.bytes_up.load(Ordering::Relaxed),
                    bytes_from_builder: e.bytes_down.load(Ordering::Relaxed),
                }
            })
            .collect();
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            socket: self.config.socket.display().to_string(),
            machines: self.config.machines.to_string(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            clients_refused: self.clients_refused.load(Ordering::Relaxed),
            sessions_active: self.sessions_active.load(Ordering::Relaxed),
            sessions_total: self.sessions_total.load(Ordering::Relaxed),
            reloads: self.reloads.load(Ordering::Relaxed),
            last_reload_error: self.last_reload_error.read().ok().and_then(|e| e.clone()),
            builders,
        }
    }
}

/// Binds the socket: refuses to take over one another agent is listening on, removes a
/// stale one, and sets its mode.
fn bind(path: &Path, mode: u32) -> Result<UnixListener, AgentError> {
    let err = |source| AgentError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AgentError::AlreadyRunning(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// Runs the agent until SIGTERM or SIGINT (then drains), reloading on SIGHUP.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let listener = bind(&config.socket, config.socket_mode)?;
    let metrics = match config.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let agent = Arc::new(Agent {
        pool: Pool::new(),
        builders: RwLock::new(BTreeMap::new()),
        started: Instant::now(),
        clients_refused: AtomicU64::new(0),
        sessions_total: AtomicU64::new(0),
        sessions_active: AtomicU64::new(0),
        session_ended: Notify::new(),
        reloads: AtomicU64::new(0),
        last_reload_error: RwLock::new(None),
        loaded_stamp: RwLock::new(None),
        config,
    });
    let report = agent.reload().await.map_err(AgentError::Machines)?;
    tracing::info!(
        socket = %agent.config.socket.display(),
        "nixmux agent ready: {} builders from {}",
        report.added.len(),
        agent.config.machines
    );
    if let Some(m) = metrics {
        tokio::spawn(serve_metrics(m, agent.clone()));
    }
    tokio::spawn(housekeeping(agent.clone()));

    let signal = |k| tokio::signal::unix::signal(k);
    use tokio::signal::unix::SignalKind;
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return Err(AgentError::Socket {
                path: agent.config.socket.clone(),
                source: e,
            });
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_client(agent.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!("accepting a client: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = hup.recv() => reload_now(&agent, "SIGHUP").await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&agent.config.socket);
    drain(&agent).await;
    for e in agent.entries() {
        e.spares.close();
    }
    agent.pool.shutdown().await;
    Ok(())
}

/// After SIGTERM: waits for running sessions to end, up to the drain timeout.
async fn drain(agent: &Agent) {
    let deadline = tokio::time::Instant::now() + agent.config.drain_timeout;
    loop {
        let ended = agent.session_ended.notified();
        let active = agent.sessions_active.load(Ordering::Relaxed);
        if active == 0 {
            return;
        }
        tracing::info!("stopping: waiting for {active} running sessions");
        if tokio::time::timeout_at(deadline, ended).await.is_err() {
            tracing::warn!(
                "stopping with {} sessions still running after {:?}",
                agent.sessions_active.load(Ordering::Relaxed),
                agent.config.drain_timeout
            );
            return;
        }
    }
}

async fn reload_now(agent: &Arc<Agent>, why: &str) {
    agent.reloads.fetch_add(1, Ordering::Relaxed);
    match agent.reload().await {
        Ok(r) => {
            tracing::info!("reloaded builders ({why}): {r}");
            if let Ok(mut e) = agent.last_reload_error.write() {
                *e = None;
            }
        }
        Err(e) => {
            tracing::error!("reloading builders ({why}) failed, keeping the current ones: {e}");
            if let Ok(mut le) = agent.last_reload_error.write() {
                *le = Some(e);
            }
        }
    }
}

/// Reloads when the machines file changes; closes spares that sat unused too long.
async fn housekeeping(agent: Arc<Agent>) {
    let every = agent.config.reload_check.max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamp(&agent.config.machines);
        let before = agent.loaded_stamp.read().ok().and_then(|s| *s);
        if now.is_some() && now != before {
            reload_now(&agent, "the machines file changed").await;
        }
        for e in agent.entries() {
            e.spares.reap();
        }
    }
}

/// Sends `frames` and closes.
async fn answer(mut w: OwnedWriteHalf, frames: &[Frame]) {
    let mut buf = BytesMut::new();
    for f in frames {
        f.encode(&mut buf);
    }
    let _ = w.write_all(&buf).await;
    let _ = w.shutdown().await;
}

/// Ends a session the agent cannot serve: `msg` for the person reading Nix's output, and
/// the exit code `ssh` uses for its own failures.
async fn fail_session(w: OwnedWriteHalf, msg: String) {
    answer(
        w,
        &[
            Frame::Error(msg),
            Frame::Exit(crate::client::EXIT_AGENT_FAILED),
        ],
    )
    .await;
}

fn describe_uid(uid: u32) -> String {
    match local_env::user_name(uid) {
        Some(n) => format!("uid {uid} ({n})"),
        None => format!("uid {uid}"),
    }
}

async fn serve_client(agent: Arc<Agent>, stream: UnixStream) {
    let cred = stream.peer_cred();
    let (mut r, w) = stream.into_split();
    let uid = match cred {
        Ok(c) => c.uid(),
        Err(e) => {
            tracing::warn!("refusing a client whose credentials cannot be read: {e}");
            return;
        }
    };
    if !agent.config.allowed_uids.contains(&uid) {
        agent.clients_refused.fetch_add(1, Ordering::Relaxed);
        let who = describe_uid(uid);
        tracing::warn!("refused a client: {who} is not allowed");
        let allowed: Vec<String> = agent
            .config
            .allowed_uids
            .iter()
            .map(|u| describe_uid(*u))
            .collect();
        let msg = format!(
            "nixmux agent: {who} is not allowed to use this agent (allowed: {}); the agent's --allow option adds users",
            allowed.join(", ")
        );
        answer(w, &[Frame::Error(msg)]).await;
        return;
    }
    let mut buf = BytesMut::with_capacity(MAX_HELLO);
    let hello = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(h) = Hello::decode(&mut buf).map_err(|e| e.to_string())? {
                return Ok(h);
            }
            let n = r
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("reading the hello: {e}"))?;
            if n == 0 {
                return Err("the client left before saying what it wants".to_owned());
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no hello within 10 s".to_owned()));
    let hello = match hello {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!("dropping a client: {e}");
            answer(w, &[Frame::Error(format!("nixmux agent: {e}"))]).await;
            return;
        }
    };
    match hello.request {
        Request::Status => {
            let json = serde_json::to_vec(&agent.status()).unwrap_or_default();
            answer(w, &[Frame::Status(json.into())]).await;
        }
        Request::Session { builder, protocol } => {
            let key = (builder, protocol);
            let Some(entry) = agent.entry(&key) else {
                let known: Vec<String> = agent
                    .entries()
                    .iter()
                    .filter(|e| e.protocol == protocol)
                    .map(|e| e.name.clone())
                    .collect();
                let msg = format!(
                    "nixmux agent: no {}:// builder named {:?} (known: {}); regenerate the machines file with `nixmux agent machines`",
                    protocol.scheme(),
                    key.0,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                );
                fail_session(w, msg).await;
                return;
            };
            // `buf` may already hold the first bytes of the client's input.
            let early = buf.split().freeze();
            session(&agent, &entry, r, w, early).await;
        }
    }
}

/// How long a client may take to send its part of the handshake (a few dozen bytes on a
/// local socket, sent at once by Nix).
const CLIENT_GREETING_WAIT: Duration = Duration::from_secs(30);

/// Reads from the client (after what is already in `buf`) until `done` finds what it needs
/// in `buf`, within [`CLIENT_GREETING_WAIT`].
async fn read_greeting<T>(
    from_client: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    mut done: impl FnMut(&[u8]) -> Option<T>,
) -> Result<T, String> {
    let read = async {
        loop {
            if let Some(t) = done(buf) {
                return Ok::<T, std::io::Error>(t);
            }
            if from_client.read_buf(buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    };
    match tokio::time::timeout(CLIENT_GREETING_WAIT, read).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err("the client ended before finishing its greeting".into())
        }
        Ok(Err(e)) => Err(format!("reading the client's greeting: {e}")),
        Err(_) => Err(format!(
            "the client did not finish its greeting within {CLIENT_GREETING_WAIT:?}"
        )),
    }
}

/// Reads the client's first 8 bytes (some may be in `early`): they must be the protocol's
/// client magic. Returns what came after them.
async fn client_magic(
    from_client: &mut OwnedReadHalf,
    early: Bytes,
    protocol: SessionProtocol,
) -> Result<Bytes, String> {
    let mut buf = BytesMut::from(&early[..]);
    read_greeting(from_client, &mut buf, |b| (b.len() >= 8).then_some(())).await?;
    if buf[..8] != greeting::client_magic(protocol) {
        return Err(format!(
            "the client did not start with the {} protocol's magic number",
            protocol.name()
        ));
    }
    Ok(buf.split_off(8).freeze())
}

/// Counts a session as running for as long as it lives.
struct Running<'a> {
    agent: &'a Agent,
    entry: &'a Entry,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.entry.sessions_active.fetch_sub(1, Ordering::Relaxed);
        self.agent.sessions_active.fetch_sub(1, Ordering::Relaxed);
        self.agent.session_ended.notify_waiters();
        // A build slot is free again: the next session may find a spare there.
        self.entry.refill_spares(false);
    }
}

/// What a spare did ahead of its session: the client's side of it is done here.
struct Handoff {
    /// The server's answer to the magic, replayed to the client.
    answer: greeting::Answer,
    /// The client's second message the spare sent ahead, if any.
    sent_hello: Option<Bytes>,
}

impl Handoff {
    /// Answers the client's magic from the record; for the worker protocol, also reads the
    /// client's second message, which must be the one sent ahead (the daemon's answer is
    /// then on its way) or is learned for the next spares. Returns the session to splice and
    /// the client's input that is still to be forwarded.
    async fn finish(
        self,
        entry: &Entry,
        raw: nixmux::RawSession,
        from_client: &mut OwnedReadHalf,
        to_client: &mut OwnedWriteHalf,
        early: Bytes,
    ) -> Result<(nixmux::RawSession, Bytes), String> {
        let rest = client_magic(from_client, early, entry.protocol).await?;
        let mut out = BytesMut::new();
        Frame::encode_data(&self.answer, false, &mut out);
        to_client
            .write_all(&out)
            .await
            .map_err(|e| format!("the client went away: {e}"))?;
        if entry.protocol != SessionProtocol::Worker {
            return Ok((raw, rest));
        }
        let (input, end) = client_hello(from_client, rest, &self.answer).await?;
        let hello = end.map(|n| input.slice(..n));
        match (&self.sent_hello, &hello) {
            (Some(sent), Some(h)) if sent == h => {
                entry.spares.hello_hits.fetch_add(1, Ordering::Relaxed);
                Ok((raw, input.slice(sent.len()..)))
            }
            (None, _) => {
                entry.spares.learn(hello);
                Ok((raw, input))
            }
            (Some(_), _) => {
                // The daemon of this spare read another second message than the client's:
                // it cannot serve this client. A fresh one gets the client's own bytes.
                entry.spares.hello_misses.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(builder = %entry.name, "the client sent another second message than the spare");
                entry.spares.learn(hello);
                drop(raw);
                let fresh = entry.spares.fresh(&entry.builder, &self.answer).await?;
                Ok((fresh, input))
            }
        }
    }
}

/// Reads the worker client's second message (some may be in `early`). Returns everything
/// read, and where the message ends in it (`None`: a version whose message is not learned;
/// then only the version word has been read for sure).
async fn client_hello(
    from_client: &mut OwnedReadHalf,
    early: Bytes,
    answer: &greeting::Answer,
) -> Result<(Bytes, Option<usize>), String> {
    let mut buf = BytesMut::from(&early[..]);
    let end = read_greeting(
        from_client,
        &mut buf,
        |b| match greeting::worker_hello_end(answer, b) {
            greeting::HelloEnd::At(n) => Some(Some(n)),
            greeting::HelloEnd::Unsupported => Some(None),
            greeting::HelloEnd::NeedMore => None,
        },
    )
    .await?;
    Ok((buf.freeze(), end))
}

async fn session(
    agent: &Agent,
    entry: &Entry,
    mut from_client: OwnedReadHalf,
    mut to_client: OwnedWriteHalf,
    early: Bytes,
) {
    agent.sessions_total.fetch_add(1, Ordering::Relaxed);
    agent.sessions_active.fetch_add(1, Ordering::Relaxed);
    entry.sessions_total.fetch_add(1, Ordering::Relaxed);
    entry.sessions_active.fetch_add(1, Ordering::Relaxed);
    let _running = Running { agent, entry };
    let started = Instant::now();
    let (raw, spare) = match entry.spares.take() {
        Some(s) => (
            s.session,
            Some(Handoff {
                answer: s.greeting,
                sent_hello: s.sent_hello,
            }),
        ),
        None => match entry.builder.open_raw(None).await {
            Ok(s) => (s, None),
            Err(e) => {
                entry.session_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(builder = %entry.name, "cannot start a session: {e}");
                let msg = format!("nixmux agent: cannot start a session on {}: {e}", entry.uri);
                fail_session(to_client, msg).await;
                return;
            }
        },
    };
    tracing::debug!(builder = %entry.name, spare = spare.is_some(), "session started");
    // The refill starts a remote Nix, which costs the builder (and, on one machine, the
    // client) CPU just when this session's handshake is under way: it waits for the
    // session's first answer (or 50 ms), so it does not slow the session it replaces.
    let refill = Notify::new();
    let refill_after = async {
        let _ = tokio::time::timeout(Duration::from_millis(50), refill.notified()).await;
        entry.refill_spares(false);
    };
    // A spare has done part of the handshake already: finish the client's side of it here.
    let (raw, early) = match spare {
        None => (raw, early),
        Some(handoff) => {
            match handoff
                .finish(entry, raw, &mut from_client, &mut to_client, early)
                .await
            {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::warn!(builder = %entry.name, "dropping a session: {e}");
                    let msg = format!("nixmux agent: {e}");
                    fail_session(to_client, msg).await;
                    return;
                }
            }
        }
    };
    let nixmux::RawSession {
        mut stdin,
        mut stdout,
        mut stderr,
        status,
    } = raw;

    // Client to builder: its input, then EOF when it half-closes (end of input).
    let up = async {
        if !early.is_empty() {
            stdin.write_all(&early).await?;
            entry
                .bytes_up
                .fetch_add(early.len() as u64, Ordering::Relaxed);
        }
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = from_client.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            stdin.write_all(&buf[..n]).await?;
            entry.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
        }
        stdin.shutdown().await
    };
    // Builder to client: stdout and stderr as they come, then the exit code.
    let down = async {
        let mut buf = vec![0u8; 64 << 10];
        let mut out = BytesMut::new();
        let (mut stdout_open, mut stderr_open) = (true, true);
        while stdout_open || stderr_open {
            tokio::select! {
                n = stdout.read(&mut buf), if stdout_open => match n? {
                    0 => stdout_open = false,
                    n => {
                        entry.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                        Frame::encode_data(&buf[..n], false, &mut out);
                        refill.notify_one();
                    }
                },
                ev = stderr.recv(), if stderr_open => match ev {
                    None => stderr_open = false,
                    Some(StderrEvent::Data(b)) => Frame::encode_data(&b, true, &mut out),
                    Some(StderrEvent::Dropped { bytes, lines }) => {
                        let note = format!("nixmux agent: {lines} lines ({bytes} bytes) of the builder's stderr were dropped: the reader fell behind\n");
                        Frame::encode_data(note.as_bytes(), true, &mut out);
                    }
                    Some(StderrEvent::Barrier(_)) => {}
                },
            }
            if !out.is_empty() {
                to_client.write_all(&out).await?;
                out.clear();
            }
        }
        let code = match status.exit().await {
            Ok(ExitStatus::Code(c)) => i32::try_from(c).unwrap_or(crate::client::EXIT_AGENT_FAILED),
            // As ssh does: 255, and nothing on stderr (Nix 2.8's `nix-daemon --stdio`
            // sometimes dies of SIGSEGV on EOF after a complete session; a note for every
            // one of those would only be noise in Nix's output).
            Ok(other) => {
                tracing::debug!(builder = %entry.name, "the remote program {other}");
                crate::client::EXIT_AGENT_FAILED
            }
            Err(e) => {
                let note = format!("nixmux agent: lost the builder: {e}\n");
                Frame::encode_data(note.as_bytes(), true, &mut out);
                crate::client::EXIT_AGENT_FAILED
            }
        };
        Frame::Exit(code).encode(&mut out);
        to_client.write_all(&out).await?;
        to_client.shutdown().await
    };
    // The session ends when the builder side is done (exit code sent) or the client is
    // gone (a write to it fails). Input ending is normal and only half of it.
    tokio::pin!(down);
    let work = async {
        tokio::select! {
        r = &mut down => {
            if let Err(e) = r {
                tracing::debug!(builder = %entry.name, "session ended by the client: {e}");
            }
        }
        r = up => {
            if let Err(e) = r {
                tracing::debug!(builder = %entry.name, "client input ended: {e}");
            }
            if let Err(e) = down.await {
                tracing::debug!(builder = %entry.name, "session ended by the client: {e}");
            }
        }
        }
    };
    tokio::join!(work, refill_after);
    tracing::debug!(builder = %entry.name, "session ended after {:?}", started.elapsed());
}

/// A minimal HTTP responder for Prometheus: any request gets the metrics. Hand-written
/// because it answers one fixed document on loopback; a web framework would be most of the
/// agent's size.
async fn serve_metrics(listener: tokio::net::TcpListener, agent: Arc<Agent>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let body = agent.status().prometheus();
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
