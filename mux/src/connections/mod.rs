//! The shared SSH connections of one host.
//!
//! All sessions to a host share one authenticated connection, opened lazily on the first
//! channel request; more are opened only when sshd refuses a channel (`MaxSessions`). Every
//! decision (which connection gets the next channel, when to connect, when to give up, what
//! sshd's limit is) is made by the pure [`planner::Planner`]; this module carries the
//! decisions out and feeds the outcomes back:
//!
//! * one **driver task per host** runs the connection attempts and the planner's timers, so
//!   an attempt never belongs to a caller whose future may be dropped half-way; its outcome
//!   reaches every waiter through the planner;
//! * a caller waiting for a slot holds a guard that tells the planner when it is dropped;
//! * a granted slot is a [`ChannelTicket`], given back when dropped;
//! * the channel open and exec run in a task of their own, so that a caller dropped during
//!   them never leaves behind a channel the server confirms later: the task closes it and
//!   gives the slot back once the server has let go of it.
//!
//! The lock around the planner is never held across an await.
//!
//! A connection that dies is noticed at once by a watcher task (and recorded for health);
//! the next request opens a fresh one at once. Failed attempts back off exponentially; a
//! connection sshd drops at start-up (`MaxStartups` throttling a burst) is retried after a
//! short jittered delay.

mod planner;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nixmux_transport::{
    DisconnectCause, ExecChannel, ExecOptions, FirstChannel, SshConnection, TransportError,
};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinSet;

use crate::error::{Error, ErrorKind, Initiator, Result};
use crate::stats::{Health, HealthState};
use crate::target::{ConnectHook, ConnectTarget};
use planner::{Action, AttemptId, ConnId, ConnectFailure, FailReason, Planner, WaiterId, Want};

/// Limits of a connection set.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Most session channels per connection we ever open, whatever sshd would allow
    /// (`None`: up to what sshd allows). sshd's default `MaxSessions` is 10.
    pub max_channels_per_connection: Option<usize>,
    /// Most connections to one host.
    pub max_connections: usize,
    /// Most connection attempts in flight at once to one host. sshd's `MaxStartups`
    /// (default `10:30:100`) starts dropping unauthenticated connections beyond 10.
    pub max_parallel_connects: usize,
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
            max_parallel_connects: 4,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// How long a dropped channel's slot stays reserved beyond the transport's `close_grace`
/// when the channel does not report closed (the transport then still has SIGKILL and CLOSE
/// to send, each with its own timeout; a dead connection ends the wait at once).
const RELEASE_SLACK: Duration = Duration::from_secs(15);

/// Counters of a connection set, readable without the lock.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections_opened: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    /// Attempts the server dropped at start-up (sshd `MaxStartups`), retried.
    pub(crate) startup_drops: AtomicU64,
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
    /// Slots granted and slots given back: a change means the queue moved.
    pub(crate) slot_events: AtomicU64,
}

/// Something holding idle channels on a connection set that it can give up on request
/// (the session pools of the builders sharing the set).
pub(crate) trait IdleEvict: Send + Sync {
    /// Closes one idle session; false when there was none.
    fn evict_one(&self) -> bool;
}

/// What a waiter is handed.
enum Granted {
    /// A reserved channel slot on a connection.
    Slot(ChannelTicket, SshConnection),
    /// A connection (for tunnels; no slot).
    Connection(SshConnection),
    /// It gave up.
    Failed(Error),
}

/// Everything behind the lock.
struct Inner {
    planner: Planner,
    ssh: HashMap<ConnId, SshConnection>,
    waiters: HashMap<WaiterId, (oneshot::Sender<Granted>, Want)>,
    next_waiter: WaiterId,
    /// Attempts the planner asked for that the driver has not started yet.
    to_start: Vec<AttemptId>,
    /// The error of the last failed attempt, handed to the waiters it fails.
    last_connect_error: Option<Error>,
    /// Payload bytes of connections no longer live, so that totals never go down.
    closed_bytes: (u64, u64),
    /// Bytes (and slot events) seen at the driver's last look, to report progress.
    last_progress_mark: u64,
    /// The instant the driver's timer is set for; an earlier one needs a wake-up.
    driver_timer: Option<Instant>,
    driver_started: bool,
}

/// Work to do once the lock is released (never while holding it: dropping a ticket or an
/// idle session takes the lock again).
#[derive(Default)]
struct AfterUnlock {
    drop_later: Vec<Granted>,
    evict: bool,
    wake_driver: bool,
}

/// The connections to one host.
pub(crate) struct ConnectionSet {
    pub(crate) target: ConnectTarget,
    limits: ConnectionLimits,
    /// This set, for the tickets it hands out.
    this: Weak<ConnectionSet>,
    inner: Mutex<Inner>,
    /// Wakes the driver task (an attempt to start, a timer to re-arm). Shared with the
    /// driver, which holds the set itself only weakly.
    wake: Arc<Notify>,
    pub(crate) counters: Counters,
    /// Other hosts' sets, for ProxyJump.
    registry: Weak<Registry>,
    /// Pools with idle sessions on these connections.
    evictors: Mutex<Vec<Weak<dyn IdleEvict>>>,
    /// Dropped with the set: tells the driver and the connection watchers to stop.
    alive: watch::Sender<()>,
    /// The channel a new connection will most likely open first, opened ahead of
    /// authentication (`TransportConfig::first_channel`); set by the pools on this set.
    first_channel: Mutex<Option<FirstChannel>>,
}

/// A reserved channel slot on one connection. Dropping it gives the slot back.
pub(crate) struct ChannelTicket {
    set: Arc<ConnectionSet>,
    conn: ConnId,
    confirmed: bool,
    /// The planner already took the slot back (refusal, failed open).
    settled: bool,
}

impl std::fmt::Debug for ChannelTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelTicket(conn {})", self.conn)
    }
}

impl ChannelTicket {
    /// Whether that connection is still alive.
    pub(crate) fn connection_alive(&self) -> bool {
        self.set.is_alive(self.conn)
    }

    /// The server confirmed the channel.
    fn confirm(&mut self) {
        self.confirmed = true;
        let conn = self.conn;
        let set = self.set.clone();
        set.update(|inner, now| {
            inner.planner.channel_opened(now, conn);
            set.counters
                .peak_channels
                .fetch_max(inner.planner.confirmed_on(conn), Ordering::Relaxed);
        });
        self.set
            .counters
            .channels_opened
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The server refused the channel: the planner takes the slot back and learns from it.
    fn refuse(mut self) {
        self.settled = true;
        let conn = self.conn;
        let set = self.set.clone();
        set.counters
            .channel_refusals
            .fetch_add(1, Ordering::Relaxed);
        set.update(|inner, now| {
            if !inner.planner.channel_refused(now, conn) {
                set.counters.race_refusals.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// Opening failed on a live connection: the slot is free again.
    fn fail(mut self) {
        self.settled = true;
        let conn = self.conn;
        self.set
            .update(|inner, now| inner.planner.channel_failed(now, conn));
    }

    /// Frees the slot once its channel has closed, however long it stays open: for channels
    /// handed out whole (raw sessions), whose handles may go anywhere. The wait is bounded
    /// by the connection, whose end closes every channel.
    pub(crate) fn release_on_close(self, closed: impl Future<Output = ()> + Send + 'static) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                closed.await;
                drop(self);
            });
        }
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
        if self.settled {
            return;
        }
        let (conn, confirmed) = (self.conn, self.confirmed);
        self.set
            .update(|inner, now| inner.planner.channel_released(now, conn, confirmed));
    }
}

/// Tells the planner when a waiter's future is dropped before it was served.
struct WaitGuard<'a> {
    set: &'a ConnectionSet,
    id: WaiterId,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let id = self.id;
        self.set.update(|inner, now| {
            if inner.waiters.remove(&id).is_some() {
                inner.planner.cancel(now, id);
            }
        });
    }
}

/// A reserved slot on a live connection, not used yet. Dropping it gives the slot back.
pub(crate) struct Slot {
    ticket: ChannelTicket,
    ssh: SshConnection,
}

/// How opening a channel on a slot ended.
pub(crate) enum Opened {
    /// The channel is open and the command runs.
    Ready(ExecChannel, ChannelTicket),
    /// sshd refused the channel (`MaxSessions`, or a session not freed yet), or the
    /// connection died under it: reserve again (keeping the place in line).
    Retry,
}

/// The open in its own task, with what it learned.
enum OpenOutcome {
    Ready(ExecChannel, ChannelTicket),
    Retry,
    Failed(Error),
}

impl Slot {
    /// Opens a session channel on the slot's connection and runs `command` there.
    ///
    /// The open and the exec run in a task of their own that owns the slot: if this future
    /// is dropped, a channel the server confirms later is still closed and its slot given
    /// back once the server has let go of it.
    pub(crate) async fn open(self, command: &str, options: ExecOptions) -> Result<Opened> {
        let (tx, rx) = oneshot::channel();
        let command = command.to_owned();
        tokio::spawn(async move {
            let outcome = open_on(self.ssh, &command, options, self.ticket).await;
            if let Err(OpenOutcome::Ready(ch, ticket)) = tx.send(outcome) {
                // Nobody wants it any more.
                let closed = ch.status().closed_signal();
                drop(ch);
                ticket.release_when_closed(closed);
            }
        });
        match rx.await {
            Ok(OpenOutcome::Ready(ch, ticket)) => Ok(Opened::Ready(ch, ticket)),
            Ok(OpenOutcome::Retry) => Ok(Opened::Retry),
            Ok(OpenOutcome::Failed(e)) => Err(e),
            Err(_) => Err(Error::local(
                ErrorKind::Cancelled,
                "opening the channel was interrupted",
            )),
        }
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding this lock cannot leave the planner inconsistent in a way that
    // matters more than stopping the whole pool would; keep going with what is there.
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    fn new(target: ConnectTarget, limits: ConnectionLimits, registry: Weak<Registry>) -> Arc<Self> {
        // Seeds the jitter of start-up retries: sets (and processes) started together must
        // not retry together.
        static SETS: AtomicU64 = AtomicU64::new(0);
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seed = u64::from(clock)
            ^ u64::from(std::process::id()).rotate_left(32)
            ^ SETS
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Arc::new_cyclic(|this| ConnectionSet {
            target,
            this: this.clone(),
            inner: Mutex::new(Inner {
                planner: Planner::new(limits.clone(), seed),
                ssh: HashMap::new(),
                waiters: HashMap::new(),
                next_waiter: 0,
                to_start: Vec::new(),
                last_connect_error: None,
                closed_bytes: (0, 0),
                last_progress_mark: 0,
                driver_timer: None,
                driver_started: false,
            }),
            limits,
            wake: Arc::new(Notify::new()),
            counters: Counters::default(),
            registry,
            evictors: Mutex::new(Vec::new()),
            alive: watch::Sender::new(()),
            first_channel: Mutex::new(None),
        })
    }

    /// Feeds one event to the planner under the lock, carries out what can be carried out
    /// there (grants and failures go to their waiters), and the rest once unlocked.
    fn update<T>(&self, event: impl FnOnce(&mut Inner, Instant) -> T) -> T {
        let mut after = AfterUnlock::default();
        let out = {
            let mut inner = lock(&self.inner);
            let out = event(&mut inner, Instant::now());
            self.apply(&mut inner, &mut after);
            out
        };
        drop(after.drop_later);
        if after.evict && self.evict_idle() {
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        if after.wake_driver {
            self.wake.notify_one();
        }
        out
    }

    /// Carries out the planner's decisions (under the lock).
    fn apply(&self, inner: &mut Inner, after: &mut AfterUnlock) {
        while let Some(action) = inner.planner.poll_action() {
            match action {
                Action::Connect(id) => {
                    inner.to_start.push(id);
                    after.wake_driver = true;
                }
                Action::Grant { waiter, conn } => {
                    let Some((tx, want)) = inner.waiters.remove(&waiter) else {
                        continue;
                    };
                    let Some(ssh) = inner.ssh.get(&conn).cloned() else {
                        // Cannot happen: the planner grants live connections only.
                        continue;
                    };
                    self.counters.slot_events.fetch_add(1, Ordering::Relaxed);
                    let granted = match (want, self.this.upgrade()) {
                        (Want::Channel, Some(set)) => Granted::Slot(
                            ChannelTicket {
                                set,
                                conn,
                                confirmed: false,
                                settled: false,
                            },
                            ssh,
                        ),
                        (Want::Channel, None) => {
                            // Only while the set itself is being dropped.
                            inner.planner.channel_failed(Instant::now(), conn);
                            Granted::Failed(Error::local(
                                ErrorKind::Cancelled,
                                "the pool is shutting down",
                            ))
                        }
                        (Want::Connection, _) => Granted::Connection(ssh),
                    };
                    // A waiter that is gone gives the slot straight back (once unlocked).
                    if let Err(g) = tx.send(granted) {
                        after.drop_later.push(g);
                    }
                }
                Action::Fail { waiter, reason } => {
                    let Some((tx, want)) = inner.waiters.remove(&waiter) else {
                        continue;
                    };
                    let e = self.failure(inner, want, reason);
                    let _ = tx.send(Granted::Failed(e));
                }
                Action::EvictIdle => after.evict = true,
            }
        }
        if let Some(l) = inner.planner.learned_limit() {
            self.counters.learned_limit.fetch_max(l, Ordering::Relaxed);
        }
        // The driver sleeps until its timer; an earlier deadline needs it awake.
        let next = inner.planner.poll_timeout();
        if next.is_some_and(|t| inner.driver_timer.is_none_or(|armed| t < armed)) {
            after.wake_driver = true;
        }
    }

    /// The error a waiter gets for `reason`.
    fn failure(&self, inner: &Inner, want: Want, reason: FailReason) -> Error {
        match reason {
            FailReason::Stalled { patience } => match want {
                Want::Channel => Error::new(
                    ErrorKind::PoolExhausted,
                    Initiator::Local,
                    format!(
                        "no channel became free within {patience:?} in which nothing moved on this host (all connections are at their session limit)"
                    ),
                ),
                Want::Connection => Error::remote(
                    ErrorKind::TimedOut,
                    format!("no connection to the jump host within {patience:?}"),
                ),
            },
            FailReason::ConnectFailed {
                failures,
                last_error,
            } => inner.last_connect_error.clone().unwrap_or_else(|| {
                Error::new(
                    ErrorKind::Connect,
                    Initiator::Builder,
                    format!("{failures} connection attempts failed: {last_error}"),
                )
                .retryable(true)
            }),
            FailReason::BackingOff {
                retry_in,
                failures,
                last_error,
            } => Error::new(
                ErrorKind::Connect,
                Initiator::Builder,
                format!(
                    "not reconnecting yet after {failures} failed attempts (next in {retry_in:.1?}): {last_error}"
                ),
            )
            .retryable(true),
        }
    }

    /// A pool on this set opens `first` as a new connection's first channel. A channel to the
    /// daemon's socket wins over a session: opened ahead and not taken (another pool's session
    /// came first), it costs nothing, while an unused session would hold one of sshd's
    /// `MaxSessions` until closed.
    pub(crate) fn expect_first_channel(&self, first: FirstChannel) {
        if let Ok(mut f) = self.first_channel.lock()
            && !matches!(*f, Some(FirstChannel::Streamlocal(_)))
        {
            *f = Some(first);
        }
    }

    /// The daemon's socket at `path` was refused: new connections open a session first.
    pub(crate) fn socket_refused(&self, path: &str) {
        if let Ok(mut f) = self.first_channel.lock()
            && matches!(&*f, Some(FirstChannel::Streamlocal(p)) if p == path)
        {
            *f = Some(FirstChannel::Session);
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

    fn is_alive(&self, conn: ConnId) -> bool {
        lock(&self.inner)
            .ssh
            .get(&conn)
            .is_some_and(|s| !s.is_closed())
    }

    /// Waits until the planner grants `want` (or gives up). `seq` keeps the caller's place in
    /// line across refusals.
    async fn wait_for(
        self: &Arc<Self>,
        want: Want,
        patience: Duration,
        seq: &mut Option<u64>,
    ) -> Result<Granted> {
        self.ensure_driver();
        let (tx, rx) = oneshot::channel();
        let id = self.update(|inner, now| {
            let id = inner.next_waiter;
            inner.next_waiter += 1;
            inner.waiters.insert(id, (tx, want));
            *seq = Some(inner.planner.request(now, id, want, patience, *seq));
            id
        });
        let mut guard = WaitGuard {
            set: self,
            id,
            armed: true,
        };
        let r = rx.await;
        guard.armed = false;
        r.map_err(|_| Error::local(ErrorKind::Cancelled, "the pool is shutting down"))
    }

    /// Reserves a session-channel slot on a connection with room, connecting when needed.
    /// Waits while every connection is full, until nothing has moved on this host for
    /// `patience`. `seq` keeps the caller's place in line when it comes back after a
    /// refused open ([`Opened::Retry`]). Dropping the future withdraws the request.
    pub(crate) async fn reserve(
        self: &Arc<Self>,
        patience: Duration,
        seq: &mut Option<u64>,
    ) -> Result<Slot> {
        match self.wait_for(Want::Channel, patience, seq).await? {
            Granted::Slot(ticket, ssh) => Ok(Slot { ticket, ssh }),
            Granted::Failed(e) => Err(e),
            Granted::Connection(_) => Err(Error::local(
                ErrorKind::Protocol,
                "a channel slot was asked for, a bare connection granted",
            )),
        }
    }
    /// A slot on a live connection with room, now, if there is one and nobody is queued
    /// ahead: never a new connection, never a wait (for channels opened ahead of demand).
    pub(crate) fn reserve_if_free(self: &Arc<Self>) -> Option<Slot> {
        let (conn, ssh) = self.update(|inner, now| {
            let conn = inner.planner.reserve_if_free(now)?;
            match inner.ssh.get(&conn) {
                Some(ssh) => Some((conn, ssh.clone())),
                None => {
                    // Cannot happen (the planner only knows live connections); undo.
                    inner.planner.channel_failed(now, conn);
                    None
                }
            }
        })?;
        self.counters.slot_events.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            ticket: ChannelTicket {
                set: self.clone(),
                conn,
                confirmed: false,
                settled: false,
            },
            ssh,
        })
    }

    /// A live connection, opening one if there is none (for ProxyJump hops, whose
    /// `direct-tcpip` channels are not session channels and do not count against sshd's
    /// `MaxSessions`).
    pub(crate) async fn any_connection(self: &Arc<Self>) -> Result<SshConnection> {
        let patience = self.target.connect_budget();
        match self.wait_for(Want::Connection, patience, &mut None).await? {
            Granted::Connection(ssh) | Granted::Slot(_, ssh) => Ok(ssh),
            Granted::Failed(e) => Err(e),
        }
    }

    /// Starts the driver task once (it needs a runtime, which callers of async methods have).
    fn ensure_driver(self: &Arc<Self>) {
        {
            let mut inner = lock(&self.inner);
            if inner.driver_started {
                return;
            }
            inner.driver_started = true;
        }
        tokio::spawn(drive(
            Arc::downgrade(self),
            self.wake.clone(),
            self.alive.subscribe(),
        ));
    }

    /// One look by the driver: reports progress, lets time pass for the planner, and returns
    /// the attempts to start and when to look again.
    fn tick(&self) -> (Vec<AttemptId>, Option<Instant>) {
        let mark = self.progress_mark();
        self.update(|inner, now| {
            if mark != inner.last_progress_mark {
                inner.last_progress_mark = mark;
                inner.planner.progress(now);
            }
            inner.planner.handle_timeout(now);
        });
        let mut inner = lock(&self.inner);
        let next = inner.planner.poll_timeout();
        inner.driver_timer = next;
        (std::mem::take(&mut inner.to_start), next)
    }

    /// Changes whenever bytes move on a live connection or a slot is granted or given back.
    pub(crate) fn progress_mark(&self) -> u64 {
        let (i, o) = self.bytes();
        i.wrapping_add(o)
            .wrapping_add(self.counters.slot_events.load(Ordering::Relaxed))
    }

    /// Records the end of a connection attempt.
    fn attempt_done(self: &Arc<Self>, attempt: AttemptId, r: Result<SshConnection>) {
        match r {
            Ok(ssh) => {
                self.counters
                    .connections_opened
                    .fetch_add(1, Ordering::Relaxed);
                let id = self.update(|inner, now| {
                    let id = inner.planner.connected(now, attempt);
                    inner.ssh.insert(id, ssh.clone());
                    id
                });
                self.watch(id, ssh);
            }
            Err(e) => {
                let throttled = e
                    .transport_error()
                    .is_some_and(TransportError::is_startup_drop);
                if throttled {
                    self.counters.startup_drops.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(host = %self.target.endpoint.host, "connection dropped at start-up, retrying: {e}");
                } else {
                    self.counters
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
                let failure = ConnectFailure {
                    throttled,
                    message: e.to_string(),
                };
                self.update(|inner, now| {
                    inner.last_connect_error = Some(e);
                    inner.planner.connect_failed(now, attempt, failure);
                });
            }
        }
    }

    /// Watches a new connection so that its end is noticed (and recorded for health) when it
    /// happens, not only when someone next asks for a channel. The watcher lets go of the
    /// connection when the set is dropped.
    fn watch(self: &Arc<Self>, id: ConnId, ssh: SshConnection) {
        let set = Arc::downgrade(self);
        let mut alive = self.alive.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = ssh.closed() => {
                    if let Some(set) = set.upgrade() {
                        set.forget(id, &ssh);
                    }
                }
                // Only ever an error: the set (the sender) is gone.
                _ = alive.changed() => {}
            }
        });
    }

    /// Drops connection `id`, which has ended, keeping its byte counts.
    fn forget(&self, id: ConnId, ssh: &SshConnection) {
        let why = loss_description(ssh);
        if why.is_some() {
            self.counters
                .connections_lost
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(host = %self.target.endpoint.host, "{}", why.as_deref().unwrap_or(""));
        }
        self.update(|inner, now| {
            if let Some(gone) = inner.ssh.remove(&id) {
                let b = gone.stats();
                inner.closed_bytes.0 += b.bytes_in;
                inner.closed_bytes.1 += b.bytes_out;
            }
            inner.planner.connection_lost(now, id, why);
        });
    }

    /// Health of the host as seen from its connections: Up while connected with nothing
    /// wrong since the last successful channel open; Degraded while connected but a
    /// connection attempt failed or a connection was lost since; Down when no connection is
    /// left after a failure or a loss; Idle before the first connection.
    pub(crate) fn health(&self) -> Health {
        let h = lock(&self.inner).planner.health();
        let state = match (h.live, h.down_since) {
            (n, _) if n > 0 && !h.troubled => HealthState::Up,
            (n, _) if n > 0 => HealthState::Degraded,
            (_, Some(_)) => HealthState::Down,
            _ => HealthState::Idle,
        };
        Health {
            state,
            down_since: h.down_since,
            last_error: h.last_error,
            connections: h.live,
            channels_open: h.channels_open,
            learned_channel_limit: h.learned_limit,
            retry_in: h
                .retry_at
                .map(|t| t.saturating_duration_since(Instant::now())),
        }
    }

    /// Payload bytes in and out over every connection this set ever had.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        let inner = lock(&self.inner);
        inner.ssh.values().fold(inner.closed_bytes, |(i, o), c| {
            let s = c.stats();
            (i + s.bytes_in, o + s.bytes_out)
        })
    }

    /// Closes every connection (pool shutdown).
    pub(crate) async fn disconnect_all(&self) {
        let conns: Vec<SshConnection> = self.update(|inner, now| {
            let ids: Vec<ConnId> = inner.ssh.keys().copied().collect();
            let mut out = Vec::new();
            for id in ids {
                if let Some(c) = inner.ssh.remove(&id) {
                    let b = c.stats();
                    inner.closed_bytes.0 += b.bytes_in;
                    inner.closed_bytes.1 += b.bytes_out;
                    inner.planner.connection_lost(now, id, None);
                    out.push(c);
                }
            }
            out
        });
        for c in conns {
            c.disconnect().await;
        }
    }
}

/// Opens a channel on a granted slot and runs `command` there; owns the ticket throughout,
/// so that the slot's fate is settled here whatever the caller does meanwhile.
async fn open_on(
    ssh: SshConnection,
    command: &str,
    options: ExecOptions,
    mut ticket: ChannelTicket,
) -> OpenOutcome {
    match ssh.exec_with(command, options).await {
        Ok(ch) => {
            ticket.confirm();
            OpenOutcome::Ready(ch, ticket)
        }
        Err(TransportError::ChannelOpenRefused { .. }) => {
            ticket.refuse();
            OpenOutcome::Retry
        }
        Err(_) if ssh.is_closed() => {
            // The watcher records the loss; the slot went with the connection.
            drop(ticket);
            OpenOutcome::Retry
        }
        Err(e) => {
            ticket.fail();
            OpenOutcome::Failed(e.into())
        }
    }
}

/// The driver of one host: runs connection attempts and the planner's timers. It holds the
/// set only weakly, and ends when the set is dropped.
async fn drive(set: Weak<ConnectionSet>, wake: Arc<Notify>, mut alive: watch::Receiver<()>) {
    let mut attempts: JoinSet<Result<SshConnection>> = JoinSet::new();
    let mut running: HashMap<tokio::task::Id, AttemptId> = HashMap::new();
    loop {
        let Some(s) = set.upgrade() else { return };
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let (start, next) = s.tick();
        for id in start {
            let mut target = s.target.clone();
            if target.transport.first_channel.is_none() {
                target.transport.first_channel =
                    s.first_channel.lock().ok().and_then(|f| f.clone());
            }
            let registry = s.registry.clone();
            let limits = s.limits.clone();
            let task = attempts.spawn(async move { connect_one(&target, &registry, limits).await });
            running.insert(task.id(), id);
        }
        drop(s);
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut woken => {}
            Some(joined) = attempts.join_next_with_id(), if !attempts.is_empty() => {
                let Some(s) = set.upgrade() else { return };
                let (task, r) = match joined {
                    Ok((task, r)) => (task, r),
                    // A panicked attempt still ends, as a failure, so that nobody waits on it.
                    Err(e) => (
                        e.id(),
                        Err(Error::local(
                            ErrorKind::Connect,
                            format!("the connection attempt failed unexpectedly: {e}"),
                        )),
                    ),
                };
                if let Some(id) = running.remove(&task) {
                    s.attempt_done(id, r);
                }
            }
            _ = sleep => {}
            // Only ever an error: the set is gone.
            _ = alive.changed() => return,
        }
    }
}

/// One connection attempt to `target`, through its jump host's own pooled connection when it
/// has one.
async fn connect_one(
    target: &ConnectTarget,
    registry: &Weak<Registry>,
    limits: ConnectionLimits,
) -> Result<SshConnection> {
    // Every stage has its own timeout in the transport; this only guards against a stage
    // that forgets one.
    let bound = target.connect_budget() + Duration::from_secs(5);
    let attempt = async {
        let r = match &target.jump {
            None => {
                target
                    .connect(ConnectHook(target.hooks.connect.clone()))
                    .await
            }
            Some(jump) => {
                let registry = registry
                    .upgrade()
                    .ok_or_else(|| Error::local(ErrorKind::Config, "the pool is shutting down"))?;
                let hop = registry.get((**jump).clone(), limits);
                // Boxed: a jump host may itself be reached through another jump host.
                let ssh = Box::pin(hop.any_connection()).await?;
                let stream = ssh
                    .open_direct_tcpip(&target.endpoint.host, target.endpoint.port)
                    .await?;
                target
                    .connect_over(stream, ConnectHook(target.hooks.connect.clone()))
                    .await
            }
        };
        r.map_err(Error::from)
    };
    match tokio::time::timeout(bound, attempt).await {
        Ok(r) => r,
        Err(_) => Err(Error::remote(
            ErrorKind::TimedOut,
            format!("connecting took longer than {bound:?}"),
        )),
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
            .or_insert_with(|| ConnectionSet::new(target, limits, weak))
            .clone()
    }

    /// Forgets the sets nothing else holds (no builder, no session, no ticket) and that are
    /// no other set's jump host; returns them to be disconnected.
    pub(crate) fn prune_unused(&self) -> Vec<Arc<ConnectionSet>> {
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        let mut hops = std::collections::HashSet::new();
        for s in sets.values() {
            let mut jump = s.target.jump.as_deref();
            while let Some(j) = jump {
                hops.insert(j.connection_key());
                jump = j.jump.as_deref();
            }
        }
        let unused: Vec<String> = sets
            .iter()
            .filter(|(k, s)| Arc::strong_count(s) == 1 && !hops.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        unused.iter().filter_map(|k| sets.remove(k)).collect()
    }

    pub(crate) fn all(&self) -> Vec<Arc<ConnectionSet>> {
        self.sets
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }
}
