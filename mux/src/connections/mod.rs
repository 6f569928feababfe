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
//! A refusal can also be a race rather than the limit: sshd frees a session a moment after it
//! closed the channel, so an open sent right after a channel closed may be refused although
//! the limit was not reached. Such a refusal pauses that connection briefly instead of
//! teaching a limit, and nothing spins on refusals.
//!
//! A channel's slot is held until the server has really let go of the channel (see
//! [`ChannelTicket::release_when_closed`]), not merely until we dropped it: a dropped channel
//! whose remote command is still stopping still counts against `MaxSessions`.
//!
//! A connection that dies is dropped from the set (a watcher task notices at once and records
//! why, for health); the next request opens a fresh one at once. Failed connection *attempts*
//! back off exponentially, so a builder that is down costs one quick failure per backoff
//! period instead of a connection storm (sshd's `MaxStartups` throttles bursts of new
//! connections).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nixmux_transport::{
    DisconnectCause, ExecChannel, ExecOptions, NoopObserver, SshConnection, TransportError,
};
use tokio::sync::{Notify, watch};

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

/// A refusal this soon after a channel on the same connection closed may be sshd not having
/// freed that session yet (it does so a moment after its CLOSE) rather than the limit.
const RELEASE_RACE: Duration = Duration::from_millis(500);
/// First pause of a connection after a refusal; it doubles with each refusal in a row, up to
/// `MAX_REFUSAL_PAUSE`. Nothing ever retries a refused open at once: sshd may hold
/// sessions we no longer count (a dropped channel whose command outlived our CLOSE).
const REFUSAL_PAUSE: Duration = Duration::from_millis(10);
const MAX_REFUSAL_PAUSE: Duration = Duration::from_secs(1);
/// Refusals in a row that are blamed on the race before one counts as the limit.
const MAX_RACE_REFUSALS: u32 = 4;
/// How long a dropped channel's slot stays reserved beyond the transport's `close_grace`
/// when the channel does not report closed (the transport then still has SIGKILL and CLOSE
/// to send, each with its own timeout; a dead connection ends the wait at once).
const RELEASE_SLACK: Duration = Duration::from_secs(15);

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
    /// When a channel here was last released (closed by the server or given up).
    last_release: Option<Instant>,
    /// Refusals in a row (since the last confirmed open).
    refusals_in_row: u32,
    /// Of those, refusals blamed on sshd not having freed a just-closed session yet.
    race_refusals: u32,
    /// No new channel here before this (after a refusal).
    paused_until: Option<Instant>,
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
            last_release: None,
            refusals_in_row: 0,
            race_refusals: 0,
            paused_until: None,
        }
    }

    fn capacity(&self, cap: usize) -> usize {
        if self.refused {
            self.max_confirmed.max(1).min(cap)
        } else {
            cap
        }
    }

    fn paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|t| now < t)
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
    /// Payload bytes of connections no longer in `conns`, so that totals never go down.
    closed_bytes: (u64, u64),
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
    /// Connections that ended other than by our own disconnect.
    pub(crate) connections_lost: AtomicU64,
    /// Most channels confirmed at once on any one connection.
    pub(crate) peak_channels: AtomicUsize,
    /// Channel refusals blamed on sshd not having freed a just-closed session yet.
    pub(crate) race_refusals: AtomicU64,
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
    /// Dropped with the set: tells connection watchers to let go of their connection.
    _alive: watch::Sender<()>,
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

    /// Frees the slot once `closed` resolves: for a channel whose handles are being dropped,
    /// the transport's close notification, which comes once the server has closed the
    /// channel (sshd does so when the remote command has exited, which is when its session
    /// slot is free) or the transport gave up waiting. Freeing it at drop time instead would
    /// let the next open race a session sshd still holds. Bounded, so that a slot cannot be
    /// lost for good; without a runtime the slot is freed at once.
    pub(crate) fn release_when_closed(self, closed: impl Future<Output = ()> + Send + 'static) {
        let bound = self.set.target.transport.close_grace + RELEASE_SLACK;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if tokio::time::timeout(bound, closed).await.is_err() {
                    tracing::debug!(
                        host = %self.set.target.endpoint.host,
                        "a dropped channel did not report closed within {bound:?}; freeing its slot"
                    );
                }
                drop(self);
            });
        }
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
                c.last_release = Some(Instant::now());
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
    /// A connection with room is paused after a refusal: wait until then (or a change).
    WaitUntil(Instant),
    /// Every connection is full and no more may be opened.
    Full,
}

/// What ended a connection, for health; `None` for our own disconnect.
fn loss_description(ssh: &SshConnection) -> Option<String> {
    match ssh.close_cause() {
        Some(DisconnectCause::Local) => None,
        Some(cause) => Some(format!("connection lost: {cause}")),
        None => Some("connection lost".to_owned()),
    }
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
            _alive: watch::Sender::new(()),
        }
    }

    /// Removes connections that have ended, keeping their byte counts and, unless we ended
    /// them ourselves, recording the loss for health (the host is down once none is left).
    fn prune(&self, st: &mut State) {
        if !st.conns.iter().any(|c| c.ssh.is_closed()) {
            return;
        }
        let (gone, live): (Vec<Conn>, Vec<Conn>) =
            st.conns.drain(..).partition(|c| c.ssh.is_closed());
        st.conns = live;
        for c in gone {
            let b = c.ssh.stats();
            st.closed_bytes.0 += b.bytes_in;
            st.closed_bytes.1 += b.bytes_out;
            if let Some(why) = loss_description(&c.ssh) {
                tracing::info!(host = %self.target.endpoint.host, "{why}");
                self.counters
                    .connections_lost
                    .fetch_add(1, Ordering::Relaxed);
                st.last_error = Some(why);
                if st.conns.is_empty() {
                    st.down_since.get_or_insert_with(Instant::now);
                }
            }
        }
    }

    /// Watches a new connection so that its end is noticed (and recorded for health) when it
    /// happens, not only when someone next asks for a channel. The watcher lets go of the
    /// connection when the set is dropped.
    fn watch(self: &Arc<Self>, ssh: SshConnection) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let set = Arc::downgrade(self);
        let mut alive = self._alive.subscribe();
        rt.spawn(async move {
            tokio::select! {
                _ = ssh.closed() => {
                    drop(ssh);
                    if let Some(set) = set.upgrade() {
                        set.prune(&mut lock(&set.state));
                        set.changed.notify_waiters();
                    }
                }
                // Only ever an error: the set (the sender) is gone.
                _ = alive.changed() => {}
            }
        });
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
        self.prune(&mut st);
        let cap = self.channel_cap();
        let now = Instant::now();
        if let Some(c) = st
            .conns
            .iter_mut()
            .filter(|c| c.open < c.capacity(cap) && !c.paused(now))
            .min_by_key(|c| c.open)
        {
            c.open += 1;
            return Ok(Plan::Use(c.id, c.ssh.clone()));
        }
        if st.connecting {
            return Ok(Plan::WaitForConnect);
        }
        // A connection paused after a refusal although it has room by what we know: sshd
        // holds sessions we no longer count, which ends soon. Wait for that rather than
        // open another connection.
        if let Some(until) = st
            .conns
            .iter()
            .filter(|c| c.open < c.capacity(cap))
            .filter_map(|c| c.paused_until)
            .min()
        {
            return Ok(Plan::WaitUntil(until));
        }
        if st.conns.len() >= self.limits.max_connections {
            return Ok(Plan::Full);
        }
        if let Some(e) = Self::backing_off(&st) {
            return Err(e);
        }
        st.connecting = true;
        Ok(Plan::Connect)
    }

    /// The error for a connection attempt during the backoff after failed attempts. Only
    /// failed attempts start a backoff: after a connection died, the first attempt goes out
    /// at once.
    fn backing_off(st: &State) -> Option<Error> {
        let at = st.retry_at?;
        if Instant::now() >= at {
            return None;
        }
        let last = st.last_error.clone().unwrap_or_default();
        Some(
            Error::new(
                ErrorKind::Connect,
                Initiator::Builder,
                format!(
                    "not reconnecting yet after {} failed attempts: {last}",
                    st.failures
                ),
            )
            .retryable(true),
        )
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
        let exhausted = || {
            Error::new(
                ErrorKind::PoolExhausted,
                Initiator::Local,
                format!(
                    "no channel became free within {wait:?} (all connections are at their session limit)"
                ),
            )
        };
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
                            self.refused(id);
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
                Plan::WaitUntil(until) => {
                    let until = tokio::time::Instant::from_std(until).min(deadline);
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(until) => {}
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(exhausted());
                    }
                }
                Plan::Full | Plan::WaitForConnect => {
                    // Idle sessions of other builders on the same host hold slots we need.
                    // The evicted session's slot comes back only once the server has closed
                    // it, which is a change we wait for like any other: so at most one
                    // eviction per wake-up.
                    if matches!(plan, Plan::Full) && self.evict_idle() {
                        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    }
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(exhausted());
                    }
                }
            }
        }
    }

    /// Records the outcome of a connection attempt (success adds the connection).
    fn record_connect(self: &Arc<Self>, ok: Option<&SshConnection>, err: Option<&Error>) {
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
                self.watch(ssh.clone());
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
                if st.conns.is_empty() {
                    st.down_since.get_or_insert_with(Instant::now);
                }
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
            c.refusals_in_row = 0;
            c.race_refusals = 0;
            c.max_confirmed = c.max_confirmed.max(c.confirmed);
            self.counters
                .peak_channels
                .fetch_max(c.confirmed, Ordering::Relaxed);
            if c.refused {
                self.raise_learned(c.max_confirmed);
            }
        }
    }

    /// sshd refused a channel on connection `id`. The connection pauses (longer with each
    /// refusal in a row), so that a refusal is never retried at once. Right after a channel
    /// there closed, the refusal may be sshd not having freed that session yet: then nothing
    /// is learned. Otherwise, or after several such refusals in a row, the most it ever
    /// confirmed at once there is its limit (`MaxSessions`).
    fn refused(&self, id: u64) {
        let mut st = lock(&self.state);
        let Some(c) = st.conns.iter_mut().find(|c| c.id == id) else {
            return;
        };
        let now = Instant::now();
        let pause = REFUSAL_PAUSE
            .saturating_mul(1 << c.refusals_in_row.min(16))
            .min(MAX_REFUSAL_PAUSE);
        c.paused_until = Some(now + pause);
        c.refusals_in_row += 1;
        let racing = c
            .last_release
            .is_some_and(|t| now.saturating_duration_since(t) < RELEASE_RACE);
        if racing && c.race_refusals < MAX_RACE_REFUSALS {
            c.race_refusals += 1;
            self.counters.race_refusals.fetch_add(1, Ordering::Relaxed);
            return;
        }
        c.race_refusals = 0;
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

    /// The host-wide learned limit is the largest any refused connection showed.
    fn raise_learned(&self, limit: usize) {
        self.counters
            .learned_limit
            .fetch_max(limit, Ordering::Relaxed);
    }

    /// Drops connection `id`, which has ended.
    fn forget(&self, id: u64) {
        {
            let mut st = lock(&self.state);
            self.prune(&mut st);
            st.conns.retain(|c| c.id != id);
        }
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
            None => t.connect(NoopObserver).await,
            Some(jump) => {
                // Through the jump host's own pooled connection, shared by every builder
                // behind it.
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
                t.connect_over(stream, NoopObserver).await
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
                self.prune(&mut st);
                if let Some(c) = st.conns.first() {
                    return Ok(c.ssh.clone());
                }
                if st.connecting {
                    // Someone else is connecting: wait for them.
                    true
                } else if let Some(e) = Self::backing_off(&st) {
                    return Err(e);
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

    /// Health of the host as seen from its connections: Up while connected with nothing
    /// wrong since the last successful channel open; Degraded while connected but a
    /// connection attempt failed or a connection was lost since; Down when no connection is
    /// left after a failure or a loss; Idle before the first connection.
    pub(crate) fn health(&self) -> Health {
        let mut st = lock(&self.state);
        self.prune(&mut st);
        let live = st.conns.len();
        let troubled = st.failures > 0 || st.last_error.is_some();
        let state = match (live, st.down_since) {
            (n, _) if n > 0 && !troubled => HealthState::Up,
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

    /// Payload bytes in and out over every connection this set ever had.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        let st = lock(&self.state);
        st.conns.iter().fold(st.closed_bytes, |(i, o), c| {
            let s = c.ssh.stats();
            (i + s.bytes_in, o + s.bytes_out)
        })
    }

    /// Closes every connection (pool shutdown).
    pub(crate) async fn disconnect_all(&self) {
        let conns: Vec<SshConnection> = {
            let mut st = lock(&self.state);
            let conns: Vec<SshConnection> = st.conns.drain(..).map(|c| c.ssh).collect();
            for c in &conns {
                let b = c.stats();
                st.closed_bytes.0 += b.bytes_in;
                st.closed_bytes.1 += b.bytes_out;
            }
            conns
        };
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
