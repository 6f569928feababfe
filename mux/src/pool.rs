//! Warm protocol sessions of one builder.
//!
//! A session (an exec channel with its handshake done) is used by one operation at a time.
//! `acquire` hands out an idle warm session if there is one, else opens a channel on the
//! builder's shared connection, and takes an idle session instead if one comes back first.
//! The number of sessions per builder is bounded by a FIFO semaphore, so waiters are served
//! in arrival order. A waiter gives up only when nothing has moved on the builder's
//! connections for [`PoolSettings::acquire_timeout`]: waiting behind long transfers that keep
//! moving is queueing, not a failure. A session goes back to the idle list only if its last
//! operation succeeded completely; one whose operation failed, was cancelled half-way (the
//! future dropped), or whose connection died is closed, which makes the remote Nix stop
//! whatever it was doing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nixmux_session::{Activity, Lead, Opening};
use nixmux_transport::{ExecChannel, ExecOptions};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::connections::{ChannelTicket, ConnectionSet, Opened, Slot};
use crate::daemon_socket::{SocketOpenError, SocketRoute};
use crate::error::{Error, ErrorKind, Initiator, Result};
use crate::protocol::{SessionPath, WorkerRoute};
use crate::remote::{self, RemoteSession, SessionSpec};

/// Limits of a session pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most sessions (busy or idle) to the builder.
    pub max_sessions: usize,
    /// Idle sessions older than this are closed.
    pub max_idle: Duration,
    /// How long a caller waits for a session while nothing moves on the builder's
    /// connections (no byte, no session freed or handed out). Opening the channel and the
    /// handshake have their own timeouts (transport `channel_open_timeout` /
    /// `exec_timeout`, session `idle_timeout`).
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_sessions: 16,
            max_idle: Duration::from_secs(300),
            acquire_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct PoolCounters {
    pub(crate) created: AtomicU64,
    pub(crate) discarded: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) acquires: AtomicU64,
    pub(crate) waited: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) wait_micros: AtomicU64,
    /// Sessions created over a channel to the daemon's socket.
    pub(crate) via_socket: AtomicU64,
    /// Channels to the daemon's socket the builder refused.
    pub(crate) socket_refusals: AtomicU64,
    /// Round trips of every session of the builder (each session counts into it).
    pub(crate) round_trips: nixmux_session::RoundTrips,
}

/// The sessions of one builder.
pub(crate) struct SessionPool {
    pub(crate) name: String,
    pub(crate) set: Arc<ConnectionSet>,
    pub(crate) spec: SessionSpec,
    settings: PoolSettings,
    idle: Mutex<Vec<RemoteSession>>,
    /// Signalled when a session goes back to the idle list.
    returned: Notify,
    permits: Arc<Semaphore>,
    pub(crate) counters: PoolCounters,
    /// Whether worker sessions go to the daemon's socket, and what refusals taught.
    pub(crate) socket: SocketRoute,
}

/// The first request of the operation a new session is started for ([`Lead`]), built only
/// if a session is started (an idle one needs none).
pub(crate) type LeadFn<'a> = &'a (dyn Fn() -> Lead + Send + Sync);

/// What a new session's handshake needs from the opening of its channel
/// ([`SessionPool::starting`]).
struct Starting {
    activity: Activity,
    opening: Opening,
}

/// A session checked out of the pool. Dropping it returns the session when it is healthy and
/// its last operation completed ([`PooledSession::succeeded`]); otherwise the session is closed.
pub(crate) struct PooledSession {
    session: Option<RemoteSession>,
    pool: Arc<SessionPool>,
    ok: bool,
    _permit: OwnedSemaphorePermit,
}

impl PooledSession {
    pub(crate) fn get(&mut self) -> &mut RemoteSession {
        // Present from acquire until drop.
        self.session
            .as_mut()
            .expect("a pooled session holds its session until dropped")
    }

    /// The session as it is.
    pub(crate) fn peek(&self) -> &RemoteSession {
        self.session
            .as_ref()
            .expect("a pooled session holds its session until dropped")
    }

    /// Takes another session in place of this one (broken by an earlier operation), keeping
    /// this checkout's place in the builder's session limit; the old one is closed once the
    /// new one is there (if none can be had, the old one stays, and fails what is tried on it).
    pub(crate) async fn renew(&mut self) -> Result<()> {
        let new = self.pool.session_for_permit(None).await?;
        if self.session.replace(new).is_some() {
            self.pool.counters.discarded.fetch_add(1, Ordering::Relaxed);
        }
        self.ok = false;
        Ok(())
    }

    /// An operation starts: until it has [`succeeded`](Self::succeeded), dropping the
    /// session closes it (for sessions held across several operations).
    pub(crate) fn begin(&mut self) {
        self.ok = false;
    }

    /// The operation completed: the session may be reused.
    pub(crate) fn succeeded(&mut self) {
        self.ok = true;
    }
}

impl Drop for PooledSession {
    fn drop(&mut self) {
        let Some(mut s) = self.session.take() else {
            return;
        };
        s.route.set(None);
        if self.ok && s.is_usable() {
            s.last_used = Instant::now();
            if let Ok(mut idle) = self.pool.idle.lock() {
                idle.push(s);
                drop(idle);
                self.pool.returned.notify_waiters();
                return;
            }
        }
        self.pool.counters.discarded.fetch_add(1, Ordering::Relaxed);
        // Dropping closes the channel: the remote process sees EOF / hang-up and stops.
        drop(s);
    }
}

impl SessionPool {
    pub(crate) fn new(
        name: String,
        set: Arc<ConnectionSet>,
        mut spec: SessionSpec,
        settings: PoolSettings,
    ) -> Arc<Self> {
        let socket = SocketRoute::new(spec.route, spec.daemon_socket.clone());
        // A new connection's first channel is this pool's first session, opened with the
        // authentication request when it can be (nixmux_transport::FirstChannel).
        set.expect_first_channel(spec.first_channel());
        let counters = PoolCounters::default();
        spec.session.round_trips = Some(counters.round_trips.clone());
        let pool = Arc::new(SessionPool {
            socket,
            name,
            set,
            spec,
            permits: Arc::new(Semaphore::new(settings.max_sessions.max(1))),
            settings,
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            counters,
        });
        let weak = Arc::downgrade(&pool);
        let evict: Weak<dyn crate::connections::IdleEvict> = weak.clone();
        pool.set.register_evictor(evict);
        spawn_reaper(weak, pool.settings.max_idle);
        pool
    }

    /// A session for one operation. `lead`: the operation's first request, sent with the
    /// handshake if a new session is started for it ([`Lead`]).
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        lead: Option<LeadFn<'_>>,
    ) -> Result<PooledSession> {
        let start = Instant::now();
        self.counters.acquires.fetch_add(1, Ordering::Relaxed);
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.counters.waited.fetch_add(1, Ordering::Relaxed);
                self.wait_for_permit().await?
            }
        };
        self.counters.wait_micros.fetch_add(
            u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let session = self.session_for_permit(lead).await?;
        Ok(PooledSession {
            session: Some(session),
            pool: self.clone(),
            ok: false,
            _permit: permit,
        })
    }

    /// Another session for a caller that already holds one of this builder's sessions, only
    /// if it can be had without waiting: a free place in the session limit, and an idle
    /// session, the daemon's socket, or a channel slot free right now. Waiting for a second
    /// session while holding one could deadlock against other callers doing the same.
    /// `None`: none to be had now.
    pub(crate) async fn try_acquire(self: &Arc<Self>) -> Result<Option<PooledSession>> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return Ok(None);
        };
        self.counters.acquires.fetch_add(1, Ordering::Relaxed);
        let session = match self.take_idle() {
            Some(s) => s,
            None => match self.open_via_socket(None).await? {
                Some(s) => s,
                None => {
                    let Some(slot) = self.set.reserve_if_free() else {
                        return Ok(None);
                    };
                    match self.open_exec(slot, None).await? {
                        Some(s) => s,
                        None => return Ok(None),
                    }
                }
            },
        };
        Ok(Some(PooledSession {
            session: Some(session),
            pool: self.clone(),
            ok: false,
            _permit: permit,
        }))
    }

    /// A session for a caller that holds a permit: an idle one, else a new one, unless an
    /// idle one comes back while we wait for a channel slot.
    async fn session_for_permit(&self, lead: Option<LeadFn<'_>>) -> Result<RemoteSession> {
        if let Some(s) = self.take_idle() {
            return Ok(s);
        }
        if let Some(s) = self.open_via_socket(lead).await? {
            return Ok(s);
        }
        // Open a new session, unless a warm one comes back while we wait for a channel slot:
        // then the reservation is withdrawn (dropping it is safe). Once a slot is ours, the
        // open goes through: a channel opened for nothing would cost the builder a Nix start.
        let mut seq = None;
        loop {
            let reserved = tokio::select! {
                slot = self.set.reserve(self.spec.channel_wait, &mut seq) => slot,
                s = self.next_returned() => return Ok(s),
            };
            let slot = reserved.map_err(|e| e.on(&self.name))?;
            if let Some(s) = self.open_exec(slot, lead).await? {
                return Ok(s);
            }
        }
    }

    /// A new session exec'd on a reserved channel slot, with the handshake's opening sent
    /// along with the exec request. `None`: sshd refused the channel or its connection died
    /// under it ([`Opened::Retry`]).
    async fn open_exec(
        &self,
        slot: Slot,
        lead: Option<LeadFn<'_>>,
    ) -> Result<Option<RemoteSession>> {
        let (start, options) = self.starting(lead);
        let opened = slot
            .open(&self.spec.command, options)
            .await
            .map_err(|e| e.on(&self.name))?;
        let Opened::Ready(channel, ticket) = opened else {
            return Ok(None);
        };
        let s = self
            .start(start, channel, Some(ticket), SessionPath::Exec)
            .await?;
        Ok(Some(s))
    }

    /// A new worker session over a channel to the daemon's socket, when the builder's route
    /// says to try it. `None`: use exec instead ([`WorkerRoute::Auto`] after a refusal).
    ///
    /// No channel slot is reserved: sshd's `MaxSessions` does not count such channels, so
    /// they all go on the host's first live connection; the pool's own `max_sessions` still
    /// bounds them.
    async fn open_via_socket(&self, lead: Option<LeadFn<'_>>) -> Result<Option<RemoteSession>> {
        if !self.socket.should_try(Instant::now()) {
            return Ok(None);
        }
        let (start, options) = self.starting(lead);
        let Some(channel) = self.socket_channel(options).await? else {
            return Ok(None);
        };
        let s = self
            .start(start, channel, None, SessionPath::DaemonSocket)
            .await?;
        self.counters.via_socket.fetch_add(1, Ordering::Relaxed);
        Ok(Some(s))
    }

    /// What a new session's channel is opened with: its opening (with the lead, if any) and
    /// the exec options that send it.
    fn starting(&self, lead: Option<LeadFn<'_>>) -> (Starting, ExecOptions) {
        let activity = Activity::new();
        let hook = self.set.target.hooks.channel.clone();
        let lead = lead.map(|f| f());
        let opening = remote::opening(&self.spec, lead.as_ref());
        let options = remote::exec_options(self.spec.protocol, &activity, hook, Some(&opening));
        (Starting { activity, opening }, options)
    }

    /// The handshake on a channel opened with `start`'s options.
    async fn start(
        &self,
        start: Starting,
        channel: ExecChannel,
        ticket: Option<ChannelTicket>,
        path: SessionPath,
    ) -> Result<RemoteSession> {
        let s = remote::start(
            channel,
            ticket,
            path,
            Some(start.opening),
            &self.spec,
            &self.name,
            start.activity,
        )
        .await?;
        self.counters.created.fetch_add(1, Ordering::Relaxed);
        Ok(s)
    }

    /// A channel to the daemon's socket on the host's first live connection, when the
    /// builder's route says to try it (for pooled and raw sessions alike). `None`: use exec
    /// (the socket is refused, or known to be).
    pub(crate) async fn socket_channel(&self, options: ExecOptions) -> Result<Option<ExecChannel>> {
        if !self.socket.should_try(Instant::now()) {
            return Ok(None);
        }
        let ssh = self
            .set
            .any_connection()
            .await
            .map_err(|e| e.on(&self.name))?;
        match self.socket.open(&ssh, options).await {
            Ok(channel) => Ok(channel),
            Err(SocketOpenError::Refused { why, .. }) => {
                self.refused_socket(why)?;
                Ok(None)
            }
            Err(SocketOpenError::Failed(e)) => Err(e.on(&self.name)),
        }
    }

    /// Counts a refusal of the daemon's socket ([`SocketRoute::open`] has recorded it): an
    /// error when the route insists on the socket, else a note (the caller falls back to
    /// exec).
    fn refused_socket(&self, why: String) -> Result<()> {
        self.set.socket_refused(&self.socket.path);
        self.counters
            .socket_refusals
            .fetch_add(1, Ordering::Relaxed);
        if self.socket.route == WorkerRoute::Socket {
            return Err(Error::remote(ErrorKind::Connect, why)
                .hint("allow stream-local forwarding for this user (sshd AllowStreamLocalForwarding), start nix-daemon on the builder, or drop `daemon-socket=` from the store URL to fall back to `nix-daemon --stdio`")
                .retryable(false)
                .on(&self.name));
        }
        tracing::info!(builder = %self.name, "{why}; using `{}` instead", self.spec.command);
        Ok(())
    }

    /// The next idle session to come back.
    async fn next_returned(&self) -> RemoteSession {
        loop {
            let returned = self.returned.notified();
            if let Some(s) = self.take_idle() {
                return s;
            }
            returned.await;
        }
    }

    /// Waits for a session slot of this builder; gives up only when nothing moved on its
    /// connections for the whole `acquire_timeout`.
    async fn wait_for_permit(&self) -> Result<OwnedSemaphorePermit> {
        let patience = self.settings.acquire_timeout;
        let mut mark = self.set.progress_mark();
        // One acquire for the whole wait: the semaphore is FIFO, and a new acquire after each
        // check would go to the back of the line.
        let acquire = self.permits.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            match tokio::time::timeout(patience, &mut acquire).await {
                Ok(Ok(p)) => return Ok(p),
                Ok(Err(_)) => {
                    return Err(
                        Error::local(ErrorKind::Cancelled, "the pool was closed").on(&self.name)
                    );
                }
                Err(_) => {
                    let now = self.set.progress_mark();
                    if now != mark {
                        mark = now;
                        continue;
                    }
                    self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::new(
                        ErrorKind::PoolExhausted,
                        Initiator::Local,
                        format!(
                            "all {} sessions stayed busy for {patience:?} without moving a byte",
                            self.settings.max_sessions
                        ),
                    )
                    .on(&self.name));
                }
            }
        }
    }

    /// The most recently used healthy idle session (warmest first), closing stale ones.
    fn take_idle(&self) -> Option<RemoteSession> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(s) = idle.pop() {
            if s.last_used.elapsed() > self.settings.max_idle {
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !s.is_usable() {
                self.counters.discarded.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            return Some(s);
        }
        None
    }

    /// Closes idle sessions past `max_idle` or broken.
    fn reap(&self) {
        let expired: Vec<RemoteSession> = match self.idle.lock() {
            Ok(mut idle) => {
                let max = self.settings.max_idle;
                let (keep, drop): (Vec<_>, Vec<_>) = idle
                    .drain(..)
                    .partition(|s| s.last_used.elapsed() <= max && s.is_usable());
                *idle = keep;
                drop
            }
            Err(_) => Vec::new(),
        };
        self.counters
            .expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    pub(crate) fn busy_count(&self) -> usize {
        self.settings
            .max_sessions
            .saturating_sub(self.permits.available_permits())
    }

    /// Closes every idle session.
    pub(crate) fn clear_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

impl crate::connections::IdleEvict for SessionPool {
    fn evict_one(&self) -> bool {
        // The oldest idle session holding a session slot goes first; one over the daemon's
        // socket holds none, so closing it would free nothing.
        match self.idle.lock() {
            Ok(mut idle) => match idle.iter().position(|s| s.ticket.is_some()) {
                Some(i) => {
                    idle.remove(i);
                    true
                }
                None => false,
            },
            _ => false,
        }
    }
}

fn spawn_reaper(pool: Weak<SessionPool>, max_idle: Duration) {
    let every = (max_idle / 2).max(Duration::from_millis(100));
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match pool.upgrade() {
                    Some(p) => p.reap(),
                    None => return,
                }
            }
        });
    }
}
