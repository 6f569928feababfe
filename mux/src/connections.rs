//! The shared SSH connections of one host.
//!
//! All sessions to a host share one authenticated connection; it is opened lazily, on the
//! first channel request, and never checked out exclusively. sshd limits how many session
//! channels one connection may have (`MaxSessions`, 10 by default). When it refuses a
//! channel, the number that was open at that moment is the limit: it is remembered for this
//! host, no more channels are opened on that connection beyond it, and a second connection is
//! opened only then. A configured cap on channels per connection applies too, as does a cap
//! on connections.
//!
//! A connection that dies is dropped from the set; the next request opens a fresh one at once.
//! Failed connection *attempts* back off exponentially, so a builder that is down costs one
//! quick failure per backoff period instead of a connection storm (sshd's `MaxStartups`
//! throttles bursts of new connections).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nixmux_transport::{
    ExecChannel, ExecOptions, NoopObserver, SshConnection, TransportError, connect, connect_over,
};
use tokio::sync::Notify;

use crate::error::{Error, ErrorKind, Initiator, Result};
use crate::stats::{Health, HealthState};
use crate::target::ConnectTarget;

/// Limits of a connection set.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Most session channels per connection we ever open, whatever sshd would allow
    /// (`None`: up to what sshd allows). sshd's default `MaxSessions` is 10.
    pub max_channels_per_connection: Option<usize>,
    /// Most connections to one host.
    pub max_connections: usize,
    /// First delay after a failed connection attempt; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest delay between connection attempts.
    pub max_backoff: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_channels_per_connection: None,
            max_connections: 8,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
        }
    }
}

struct Conn {
    id: u64,
    ssh: SshConnection,
    /// Channels open or being opened on it.
    open: usize,
    /// Channels the server confirmed and we have not closed.
    confirmed: usize,
    /// Most channels the server ever had confirmed at once: the server allowed that many,
    /// so its limit is at least this.
    max_confirmed: usize,
    /// sshd refused a channel here: its limit is `max_confirmed`. This is read live rather
    /// than frozen at the refusal, because opens sent before the refused one may be
    /// confirmed only after we see the refusal.
    refused: bool,
}

impl Conn {
    fn new(id: u64, ssh: SshConnection) -> Self {
        Conn {
            id,
            ssh,
            open: 0,
            confirmed: 0,
            max_confirmed: 0,
            refused: false,
        }
    }

    fn capacity(&self, cap: usize) -> usize {
        if self.refused {
            self.max_confirmed.max(1).min(cap)
        } else {
            cap
        }
    }
}

#[derive(Default)]
struct State {
    conns: Vec<Conn>,
    /// A connection attempt is under way: others wait for it rather than start their own.
    connecting: bool,
    next_id: u64,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    down_since: Option<Instant>,
}

/// Counters of a connection set.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections_opened: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) channels_opened: AtomicU64,
    pub(crate) channel_refusals: AtomicU64,
    pub(crate) learned_limit: AtomicUsize,
    pub(crate) evictions: AtomicU64,
}

/// Something holding idle channels on a connection set that it can give up on request
/// (the session pools of the builders sharing the set).
pub(crate) trait IdleEvict: Send + Sync {
    /// Closes one idle session; false when there was none.
    fn evict_one(&self) -> bool;
}

/// The connections to one host.
pub(crate) struct ConnectionSet {
    pub(crate) target: ConnectTarget,
    limits: ConnectionLimits,
    state: Mutex<State>,
    changed: Notify,
    pub(crate) counters: Counters,
    /// Other hosts' sets, for ProxyJump.
    registry: Weak<Registry>,
    /// Pools with idle sessions on these connections.
    evictors: Mutex<Vec<Weak<dyn IdleEvict>>>,
}

/// A reserved channel slot on one connection. Dropping it frees the slot.
pub(crate) struct ChannelTicket {
    set: Arc<ConnectionSet>,
    conn_id: u64,
    confirmed: bool,
}

impl std::fmt::Debug for ChannelTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelTicket(conn {})", self.conn_id)
    }
}

impl ChannelTicket {
    /// Whether that connection is still alive.
    pub(crate) fn connection_alive(&self) -> bool {
        self.set.is_alive(self.conn_id)
    }
}

impl Drop for ChannelTicket {
    fn drop(&mut self) {
        if let Ok(mut st) = self.set.state.lock()
            && let Some(c) = st.conns.iter_mut().find(|c| c.id == self.conn_id)
        {
            c.open = c.open.saturating_sub(1);
            if self.confirmed {
                c.confirmed = c.confirmed.saturating_sub(1);
            }
        }
        self.set.changed.notify_waiters();
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding this lock cannot leave the state inconsistent in a way that
    // matters more than stopping the whole pool would; keep going with what is there.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Plan {
    /// A slot was reserved on this connection.
    Use(u64, SshConnection),
    /// We are the one to open a new connection.
    Connect,
    /// Someone else is opening a connection: wait for it.
    WaitForConnect,
    /// Every connection is full and no more may be opened.
    Full,
}

impl ConnectionSet {
    fn new(target: ConnectTarget, limits: ConnectionLimits, registry: Weak<Registry>) -> Self {
        ConnectionSet {
            target,
            limits,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            counters: Counters::default(),
            registry,
            evictors: Mutex::new(Vec::new()),
        }
    }

    /// Registers a pool whose idle sessions may be closed to make room.
    pub(crate) fn register_evictor(&self, e: Weak<dyn IdleEvict>) {
        if let Ok(mut v) = self.evictors.lock() {
            v.retain(|w| w.strong_count() > 0);
            v.push(e);
        }
    }

    /// Closes one idle session of any pool on this set, to free a channel slot.
    fn evict_idle(&self) -> bool {
        let pools: Vec<Arc<dyn IdleEvict>> = match self.evictors.lock() {
            Ok(v) => v.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => return false,
        };
        pools.iter().any(|p| p.evict_one())
    }

    fn is_alive(&self, id: u64) -> bool {
        lock(&self.state)
            .conns
            .iter()
            .any(|c| c.id == id && !c.ssh.is_closed())
    }

    /// Channels we allow per connection: the configured cap, and the limit learned from
    /// refusals on this host's other connections (a fresh connection to the same sshd has the
    /// same `MaxSessions`).
    fn channel_cap(&self) -> usize {
        let learned = self.counters.learned_limit.load(Ordering::Relaxed);
        let learned = if learned == 0 { usize::MAX } else { learned };
        learned.min(
            self.limits
                .max_channels_per_connection
                .unwrap_or(usize::MAX),
        )
    }

    /// Decides what to do next under the lock, reserving a slot when one is free.
    fn plan(&self) -> std::result::Result<Plan, Error> {
        let mut st = lock(&self.state);
        st.conns.retain(|c| !c.ssh.is_closed());
        let cap = self.channel_cap();
        if let Some(c) = st
            .conns
            .iter_mut()
            .filter(|c| c.open < c.capacity(cap))
            .min_by_key(|c| c.open)
        {
            c.open += 1;
            return Ok(Plan::Use(c.id, c.ssh.clone()));
        }
        if st.connecting {
            return Ok(Plan::WaitForConnect);
        }
        if st.conns.len() >= self.limits.max_connections {
            return Ok(Plan::Full);
        }
        if let Some(at) = st.retry_at
            && Instant::now() < at
        {
            let last = st.last_error.clone().unwrap_or_default();
            return Err(Error::new(
                ErrorKind::Connect,
                Initiator::Builder,
                format!(
                    "not reconnecting yet after {} failed attempts: {last}",
                    st.failures
                ),
            )
            .retryable(true));
        }
        st.connecting = true;
        Ok(Plan::Connect)
    }

    /// Opens a session channel running `command`, on a connection with room, connecting
    /// when needed. Waits (up to `wait`) when every connection is full and no more may be
    /// opened.
    pub(crate) async fn open_channel(
        self: &Arc<Self>,
        command: &str,
        options: ExecOptions,
        wait: Duration,
    ) -> Result<(ExecChannel, ChannelTicket)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            let plan = self.plan()?;
            match plan {
                Plan::Use(id, ssh) => {
                    let mut ticket = ChannelTicket {
                        set: self.clone(),
                        conn_id: id,
                        confirmed: false,
                    };
                    match ssh.exec_with(command, options.clone()).await {
                        Ok(ch) => {
                            self.counters
                                .channels_opened
                                .fetch_add(1, Ordering::Relaxed);
                            self.confirm(id);
                            ticket.confirmed = true;
                            self.mark_up();
                            return Ok((ch, ticket));
                        }
                        Err(TransportError::ChannelOpenRefused { .. }) => {
                            self.counters
                                .channel_refusals
                                .fetch_add(1, Ordering::Relaxed);
                            self.learn_limit(id);
                            drop(ticket);
                            continue;
                        }
                        Err(e) => {
                            if ssh.is_closed() {
                                // The connection died under us: retry on a fresh one.
                                drop(ticket);
                                self.forget(id);
                                continue;
                            }
                            return Err(e.into());
                        }
                    }
                }
                Plan::Connect => {
                    let r = self.connect_one().await;
                    self.record_connect(r.as_ref().ok(), r.as_ref().err());
                    r?;
                }
                Plan::Full | Plan::WaitForConnect => {
                    // Idle sessions of other builders on the same host hold slots we need.
                    if matches!(plan, Plan::Full) && self.evict_idle() {
                        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(Error::new(
                            ErrorKind::PoolExhausted,
                            Initiator::Local,
                            format!(
                                "no channel became free within {wait:?} (all connections are at their session limit)"
                            ),
                        ));
                    }
                }
            }
        }
    }

    /// Records the outcome of a connection attempt (success adds the connection).
    fn record_connect(&self, ok: Option<&SshConnection>, err: Option<&Error>) {
        {
            let mut st = lock(&self.state);
            st.connecting = false;
            if let Some(ssh) = ok {
                let id = st.next_id;
                st.next_id += 1;
                st.conns.push(Conn::new(id, ssh.clone()));
                st.failures = 0;
                st.retry_at = None;
                st.down_since = None;
                self.counters
                    .connections_opened
                    .fetch_add(1, Ordering::Relaxed);
            }
            if let Some(e) = err {
                st.failures += 1;
                let backoff = self
                    .limits
                    .initial_backoff
                    .saturating_mul(1 << st.failures.min(16).saturating_sub(1))
                    .min(self.limits.max_backoff);
                st.retry_at = Some(Instant::now() + backoff);
                st.last_error = Some(e.to_string());
                st.down_since.get_or_insert_with(Instant::now);
                self.counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.changed.notify_waiters();
    }

    /// The server confirmed a channel on connection `id`.
    fn confirm(&self, id: u64) {
        let mut st = lock(&self.state);
        if let Some(c) = st.conns.iter_mut().find(|c| c.id == id) {
            c.confirmed += 1;
            c.max_confirmed = c.max_confirmed.max(c.confirmed);
            if c.refused {
                self.raise_learned(c.max_confirmed);
            }
        }
    }

    /// sshd refused a channel on connection `id`: the most it ever confirmed at once there is
    /// its limit (`MaxSessions`).
    fn learn_limit(&self, id: u64) {
        let mut st = lock(&self.state);
        if let Some(c) = st.conns.iter_mut().find(|c| c.id == id) {
            let first = !c.refused;
            c.refused = true;
            let limit = c.max_confirmed.max(1);
            self.raise_learned(limit);
            if first {
                tracing::info!(
                    host = %self.target.endpoint.host,
                    limit,
                    "sshd refused a session channel; using its per-connection limit"
                );
            }
        }
    }

    /// The host-wide learned limit is the largest any refused connection showed.
    fn raise_learned(&self, limit: usize) {
        self.counters
            .learned_limit
            .fetch_max(limit, Ordering::Relaxed);
    }

    fn forget(&self, id: u64) {
        lock(&self.state).conns.retain(|c| c.id != id);
        self.changed.notify_waiters();
    }

    fn mark_up(&self) {
        let mut st = lock(&self.state);
        st.down_since = None;
        st.last_error = None;
    }

    async fn connect_one(&self) -> Result<SshConnection> {
        let t = &self.target;
        let r = match &t.jump {
            None => {
                connect(
                    &t.endpoint,
                    &t.identities,
                    &t.host_keys,
                    &t.transport,
                    NoopObserver,
                )
                .await
            }
            Some(jump) => {
                let registry = self
                    .registry
                    .upgrade()
                    .ok_or_else(|| Error::local(ErrorKind::Config, "the pool is shutting down"))?;
                let hop = registry.get((**jump).clone(), self.limits.clone());
                // Boxed: a jump host may itself be reached through another jump host.
                let ssh = Box::pin(hop.any_connection()).await?;
                let stream = ssh
                    .open_direct_tcpip(&t.endpoint.host, t.endpoint.port)
                    .await?;
                connect_over(
                    stream,
                    &t.endpoint,
                    &t.identities,
                    &t.host_keys,
                    &t.transport,
                    NoopObserver,
                )
                .await
            }
        };
        r.map_err(Error::from)
    }

    /// A live connection, opening one if there is none (for ProxyJump hops, whose
    /// `direct-tcpip` channels are not session channels and do not count against sshd's
    /// `MaxSessions`).
    pub(crate) async fn any_connection(self: &Arc<Self>) -> Result<SshConnection> {
        loop {
            let notified = self.changed.notified();
            let wait = {
                let mut st = lock(&self.state);
                st.conns.retain(|c| !c.ssh.is_closed());
                if let Some(c) = st.conns.first() {
                    return Ok(c.ssh.clone());
                }
                if st.connecting {
                    // Someone else is connecting: wait for them.
                    true
                } else {
                    st.connecting = true;
                    false
                }
            };
            if wait {
                let budget = self.target.connect_budget();
                if tokio::time::timeout(budget, notified).await.is_err() {
                    return Err(Error::remote(
                        ErrorKind::TimedOut,
                        "timed out waiting for the jump host connection",
                    ));
                }
                continue;
            }
            let r = self.connect_one().await;
            self.record_connect(r.as_ref().ok(), r.as_ref().err());
            return r;
        }
    }

    /// Health of the host as seen from its connections.
    pub(crate) fn health(&self) -> Health {
        let st = lock(&self.state);
        let live = st.conns.iter().filter(|c| !c.ssh.is_closed()).count();
        let state = match (live, st.down_since) {
            (n, _) if n > 0 && st.failures == 0 => HealthState::Up,
            (n, _) if n > 0 => HealthState::Degraded,
            (_, Some(_)) => HealthState::Down,
            _ => HealthState::Idle,
        };
        Health {
            state,
            down_since: st.down_since,
            last_error: st.last_error.clone(),
            connections: live,
            channels_open: st.conns.iter().map(|c| c.open).sum(),
            learned_channel_limit: match self.counters.learned_limit.load(Ordering::Relaxed) {
                0 => None,
                n => Some(n),
            },
        }
    }

    /// Sums of byte counters over live connections.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        let st = lock(&self.state);
        st.conns.iter().fold((0, 0), |(i, o), c| {
            let s = c.ssh.stats();
            (i + s.bytes_in, o + s.bytes_out)
        })
    }

    /// Closes every connection (pool shutdown).
    pub(crate) async fn disconnect_all(&self) {
        let conns: Vec<SshConnection> = lock(&self.state).conns.drain(..).map(|c| c.ssh).collect();
        for c in conns {
            c.disconnect().await;
        }
    }
}

/// All connection sets of a pool, by connection key, so that builders reaching the same host
/// (and jump hosts) share connections.
#[derive(Default)]
pub(crate) struct Registry {
    sets: Mutex<HashMap<String, Arc<ConnectionSet>>>,
    this: Mutex<Weak<Registry>>,
}

impl Registry {
    pub(crate) fn new() -> Arc<Self> {
        let r = Arc::new(Registry::default());
        if let Ok(mut w) = r.this.lock() {
            *w = Arc::downgrade(&r);
        }
        r
    }

    /// The set for `target`, created on first use.
    pub(crate) fn get(
        &self,
        target: ConnectTarget,
        limits: ConnectionLimits,
    ) -> Arc<ConnectionSet> {
        let key = target.connection_key();
        let weak = self.this.lock().map(|w| w.clone()).unwrap_or_default();
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        sets.entry(key)
            .or_insert_with(|| Arc::new(ConnectionSet::new(target, limits, weak)))
            .clone()
    }

    pub(crate) fn all(&self) -> Vec<Arc<ConnectionSet>> {
        self.sets
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }
}
