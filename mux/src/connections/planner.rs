//! What one host's connection set does next, decided without I/O.
//!
//! The [`Planner`] is a state machine in the manner of quinn-proto's `Connection`: it performs
//! no I/O, reads no clock and holds no lock; time is an input. The driver (`super`) feeds it
//! events through the `handle_*`-style methods below (a caller wants a channel slot, a caller
//! gave up, a connection attempt ended, sshd confirmed or refused a channel, a channel was
//! released, a connection died, bytes moved, time passed) and then drains its decisions with
//! [`Planner::poll_action`] and asks when to wake it next with [`Planner::poll_timeout`].
//! Call order after any event: `poll_action` until `None`, then `poll_timeout`.
//!
//! Because every decision is made here and every effect happens outside, a caller can give up
//! (drop its future) at any await point without leaving anything half-done: the driver turns
//! that into [`Planner::cancel`] or into the release of a slot it was granted.
//!
//! The rules:
//! * **Slots.** sshd limits session channels per connection (`MaxSessions`, 10 by default). A
//!   waiter is granted a reserved slot on the connection with the fewest open; a connection
//!   never gets more reservations than its capacity: the configured cap, the limit learned
//!   on this host, and for a connection that refused a channel the most it ever had
//!   confirmed at once. A refusal right after a channel there closed may be sshd not having
//!   freed that session yet (OpenSSH frees it a moment after its CLOSE): it pauses the
//!   connection briefly instead of teaching a limit.
//! * **Fairness.** Waiters are served strictly in arrival order; a waiter whose open was
//!   refused keeps its place.
//! * **Connections.** A new connection is opened only when the waiting demand exceeds what
//!   live connections and attempts in flight can hold, at most `max_parallel_connects` at
//!   once and `max_connections` in all. When every connection is full and no more may be
//!   opened, one idle session (of any pool on this host) is evicted per change.
//! * **Failures.** A failed attempt backs off exponentially; while no connection is left, the
//!   waiters fail with its error, and new waiters fail at once until the backoff ends. An
//!   attempt the server dropped at start-up (sshd `MaxStartups` throttling a burst) is not a
//!   failure: it is retried after a jittered, growing delay, up to [`MAX_THROTTLED_IN_ROW`]
//!   times in a row.
//! * **Patience measures silence.** A waiter fails ([`FailReason::Stalled`]) only when nothing
//!   happened on the set for its whole patience: no slot freed or granted, no connection
//!   made, no byte moved (the driver reports bytes with [`Planner::progress`]). Queueing
//!   behind long transfers that keep moving is not a reason to give up.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::ConnectionLimits;

/// A caller waiting for a slot (chosen by the driver).
pub(crate) type WaiterId = u64;
/// A live connection (chosen here).
pub(crate) type ConnId = u64;
/// A connection attempt (chosen here).
pub(crate) type AttemptId = u64;

/// A refusal this soon after a channel on the same connection closed may be sshd not having
/// freed that session yet rather than the limit.
pub(crate) const RELEASE_RACE: Duration = Duration::from_millis(500);
/// First pause of a connection after a refusal; doubles with each refusal in a row, up to
/// [`MAX_REFUSAL_PAUSE`]. A refused open is never retried at once: sshd may hold sessions we
/// no longer count (a dropped channel whose command outlived our CLOSE).
pub(crate) const REFUSAL_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause after refusals.
pub(crate) const MAX_REFUSAL_PAUSE: Duration = Duration::from_secs(1);
/// Refusals in a row blamed on the release race before one counts as the limit.
pub(crate) const MAX_RACE_REFUSALS: u32 = 4;
/// Opens left unanswered at once on a connection whose limit is not known yet. sshd's
/// default `MaxSessions` is 10: a burst of a hundred callers then costs at most ten
/// refusals to learn a lower limit, not ninety; a higher limit is found as opens are
/// confirmed.
pub(crate) const PROBE_OPENS: usize = 10;
/// First delay after an attempt the server dropped at start-up; doubles per drop in a row
/// (with full jitter: a random point in the upper half), up to [`MAX_THROTTLE_DELAY`].
pub(crate) const THROTTLE_DELAY: Duration = Duration::from_millis(20);
/// Longest delay between attempts the server keeps dropping.
pub(crate) const MAX_THROTTLE_DELAY: Duration = Duration::from_secs(2);
/// Start-up drops in a row after which the host counts as failing (a burst clears within
/// seconds; a server that drops every connection is refusing us).
pub(crate) const MAX_THROTTLED_IN_ROW: u32 = 8;

/// What a waiter wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// A session channel slot on a connection.
    Channel,
    /// Any live connection, without a slot (a jump host's `direct-tcpip` tunnels do not
    /// count against `MaxSessions`).
    Connection,
}

/// A decision for the driver to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Start connection attempt `id`; report its end with [`Planner::connected`] or
    /// [`Planner::connect_failed`].
    Connect(AttemptId),
    /// `waiter` gets connection `conn`, with a reserved slot when it wanted a channel (to be
    /// given back with [`Planner::channel_opened`] then [`Planner::channel_released`], or with
    /// [`Planner::channel_refused`] / [`Planner::channel_failed`]).
    Grant { waiter: WaiterId, conn: ConnId },
    /// `waiter` gives up.
    Fail {
        waiter: WaiterId,
        reason: FailReason,
    },
    /// Every connection is at its limit and no more may be opened: close one idle session
    /// on this host to free a slot.
    EvictIdle,
}

/// Why a waiter gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FailReason {
    /// Nothing happened on the set for the waiter's whole patience.
    Stalled { patience: Duration },
    /// The connection attempt failed and no connection is left.
    ConnectFailed { failures: u32, last_error: String },
    /// Earlier attempts failed; the next one is not due yet.
    BackingOff {
        retry_in: Duration,
        failures: u32,
        last_error: String,
    },
}

/// How a connection attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectFailure {
    /// The server dropped the connection at start-up (sshd `MaxStartups`): retry soon.
    pub(crate) throttled: bool,
    /// What went wrong, for waiters and health.
    pub(crate) message: String,
}

/// The state of the set as health reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthView {
    pub(crate) live: usize,
    pub(crate) troubled: bool,
    pub(crate) down_since: Option<Instant>,
    pub(crate) last_error: Option<String>,
    pub(crate) channels_open: usize,
    pub(crate) learned_limit: Option<usize>,
    /// When the next connection attempt may start, while backing off after failures.
    pub(crate) retry_at: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Conn {
    id: ConnId,
    /// Slots reserved: channels open or being opened.
    open: usize,
    /// Channels the server confirmed and that were not released.
    confirmed: usize,
    /// Most channels confirmed at once: the server's limit is at least this.
    max_confirmed: usize,
    /// sshd refused a channel here: its limit is `max_confirmed` (read live, because opens
    /// sent before the refused one may be confirmed after it).
    refused: bool,
    last_release: Option<Instant>,
    refusals_in_row: u32,
    race_refusals: u32,
    paused_until: Option<Instant>,
}

impl Conn {
    fn capacity(&self, cap: usize) -> usize {
        if self.refused {
            self.max_confirmed.max(1).min(cap)
        } else {
            cap
        }
    }

    /// Whether another open may go out now: within capacity, and while the limit is
    /// unknown, within [`PROBE_OPENS`] unanswered opens.
    fn has_room(&self, cap: usize, limit_known: bool) -> bool {
        self.open < self.capacity(cap)
            && (limit_known
                || self.refused
                || self.open.saturating_sub(self.confirmed) < PROBE_OPENS)
    }

    fn paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|t| now < t)
    }
}

#[derive(Debug, Clone)]
struct Waiter {
    id: WaiterId,
    want: Want,
    /// Arrival order; kept across a refusal, so the waiter keeps its place.
    seq: u64,
    since: Instant,
    patience: Duration,
}

/// The planner of one host. See the module documentation.
#[derive(Debug)]
pub(crate) struct Planner {
    limits: ConnectionLimits,
    conns: Vec<Conn>,
    attempts: Vec<AttemptId>,
    /// Sorted by `seq`.
    queue: VecDeque<Waiter>,
    actions: VecDeque<Action>,
    next_conn: ConnId,
    next_attempt: AttemptId,
    next_seq: u64,
    learned: Option<usize>,
    /// When something last happened that a queued waiter may be waiting for.
    last_progress: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
    throttled_in_row: u32,
    throttle_until: Option<Instant>,
    last_error: Option<String>,
    down_since: Option<Instant>,
    /// An eviction was asked for and nothing changed since.
    evict_pending: bool,
    /// xorshift64 state for the jitter of start-up retries (seeded by the driver; fixed in
    /// tests).
    rng: u64,
}

impl Planner {
    pub(crate) fn new(limits: ConnectionLimits, seed: u64) -> Self {
        Planner {
            limits,
            conns: Vec::new(),
            attempts: Vec::new(),
            queue: VecDeque::new(),
            actions: VecDeque::new(),
            next_conn: 0,
            next_attempt: 0,
            next_seq: 0,
            learned: None,
            last_progress: None,
            failures: 0,
            retry_at: None,
            throttled_in_row: 0,
            throttle_until: None,
            last_error: None,
            down_since: None,
            evict_pending: false,
            rng: seed | 1,
        }
    }

    // ===== A. getters =====

    /// Channels we allow per connection: the configured cap and the limit learned on this
    /// host (a fresh connection to the same sshd has the same `MaxSessions`).
    pub(crate) fn channel_cap(&self) -> usize {
        self.learned
            .unwrap_or(usize::MAX)
            .min(
                self.limits
                    .max_channels_per_connection
                    .unwrap_or(usize::MAX),
            )
            .max(1)
    }

    /// The limit learned from refusals.
    pub(crate) fn learned_limit(&self) -> Option<usize> {
        self.learned
    }

    #[cfg(test)]
    /// Slots reserved on `conn` and its current capacity (`None`: not a live connection).
    pub(crate) fn slots(&self, conn: ConnId) -> Option<(usize, usize)> {
        let cap = self.channel_cap();
        self.conns
            .iter()
            .find(|c| c.id == conn)
            .map(|c| (c.open, c.capacity(cap)))
    }

    /// Channels the server confirmed on `conn` and that were not released.
    pub(crate) fn confirmed_on(&self, conn: ConnId) -> usize {
        self.conns
            .iter()
            .find(|c| c.id == conn)
            .map_or(0, |c| c.confirmed)
    }

    #[cfg(test)]
    /// Live connections.
    pub(crate) fn live_connections(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.conns.iter().map(|c| c.id)
    }

    #[cfg(test)]
    /// Connection attempts in flight.
    pub(crate) fn attempts_in_flight(&self) -> usize {
        self.attempts.len()
    }

    #[cfg(test)]
    /// Waiters not yet served.
    pub(crate) fn waiting(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn health(&self) -> HealthView {
        HealthView {
            live: self.conns.len(),
            troubled: self.failures > 0 || self.last_error.is_some(),
            down_since: self.down_since,
            last_error: self.last_error.clone(),
            channels_open: self.conns.iter().map(|c| c.open).sum(),
            learned_limit: self.learned,
            retry_at: self.retry_at,
        }
    }

    // ===== B. handlers =====

    /// A caller wants `want`; it waits until granted, or until nothing happened for
    /// `patience`. `seq` is the place in line of a waiter coming back after a refusal (what
    /// this returned when it first asked); `None` queues at the end. Returns the place in line.
    pub(crate) fn request(
        &mut self,
        now: Instant,
        waiter: WaiterId,
        want: Want,
        patience: Duration,
        seq: Option<u64>,
    ) -> u64 {
        let seq = seq.unwrap_or_else(|| {
            self.next_seq += 1;
            self.next_seq
        });
        // A host that is failing answers at once instead of queueing callers behind a
        // backoff they cannot wait out usefully.
        if self.conns.is_empty()
            && self.attempts.is_empty()
            && let Some(at) = self.retry_at.filter(|&at| now < at)
        {
            self.actions.push_back(Action::Fail {
                waiter,
                reason: FailReason::BackingOff {
                    retry_in: at - now,
                    failures: self.failures,
                    last_error: self.last_error.clone().unwrap_or_default(),
                },
            });
            return seq;
        }
        let pos = self.queue.partition_point(|w| w.seq < seq);
        self.queue.insert(
            pos,
            Waiter {
                id: waiter,
                want,
                seq,
                since: now,
                patience,
            },
        );
        self.step(now);
        seq
    }

    /// Reserves a channel slot at once if a live connection has room and nobody is waiting
    /// ahead (queued callers come first): for channels opened ahead of demand (the agent's
    /// spare sessions), which must never cause a new connection or jump the queue. While the
    /// host's limit is unknown, sshd's default `MaxSessions` (10) counts as the limit here.
    pub(crate) fn reserve_if_free(&mut self, now: Instant) -> Option<ConnId> {
        if !self.queue.is_empty() {
            return None;
        }
        let cap = self.channel_cap();
        let cap = if cap == usize::MAX { PROBE_OPENS } else { cap };
        let c = self
            .conns
            .iter_mut()
            .filter(|c| c.has_room(cap, true) && !c.paused(now))
            .min_by_key(|c| c.open)?;
        c.open += 1;
        Some(c.id)
    }

    /// The place in line of a queued waiter.
    #[cfg(test)]
    pub(crate) fn seq_of(&self, waiter: WaiterId) -> Option<u64> {
        self.queue.iter().find(|w| w.id == waiter).map(|w| w.seq)
    }

    /// A waiter gave up before it was granted anything (its future was dropped).
    pub(crate) fn cancel(&mut self, now: Instant, waiter: WaiterId) {
        self.queue.retain(|w| w.id != waiter);
        self.step(now);
    }

    /// Attempt `attempt` connected; returns the new connection's id.
    pub(crate) fn connected(&mut self, now: Instant, attempt: AttemptId) -> ConnId {
        self.attempts.retain(|&a| a != attempt);
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.push(Conn {
            id,
            open: 0,
            confirmed: 0,
            max_confirmed: 0,
            refused: false,
            last_release: None,
            refusals_in_row: 0,
            race_refusals: 0,
            paused_until: None,
        });
        self.failures = 0;
        self.retry_at = None;
        self.throttled_in_row = 0;
        self.throttle_until = None;
        self.down_since = None;
        self.evict_pending = false;
        self.last_progress = Some(now);
        self.step(now);
        id
    }

    /// Attempt `attempt` failed.
    pub(crate) fn connect_failed(
        &mut self,
        now: Instant,
        attempt: AttemptId,
        failure: ConnectFailure,
    ) {
        self.attempts.retain(|&a| a != attempt);
        if failure.throttled && self.throttled_in_row < MAX_THROTTLED_IN_ROW {
            let base = THROTTLE_DELAY
                .saturating_mul(1 << self.throttled_in_row.min(16))
                .min(MAX_THROTTLE_DELAY);
            self.throttled_in_row += 1;
            // Full jitter over the upper half, so that a burst of waiters that were all
            // dropped together does not come back together.
            let delay = base / 2 + base.mul_f64(self.random_fraction() / 2.0);
            self.throttle_until = Some(now + delay);
            self.step(now);
            return;
        }
        self.failures += 1;
        let backoff = self
            .limits
            .initial_backoff
            .saturating_mul(1 << self.failures.min(16).saturating_sub(1))
            .min(self.limits.max_backoff);
        self.retry_at = Some(now + backoff);
        self.last_error = Some(failure.message.clone());
        if self.conns.is_empty() {
            self.down_since.get_or_insert(now);
            if self.attempts.is_empty() {
                // Nobody can be served until the backoff ends: say why now.
                for w in self.queue.drain(..) {
                    self.actions.push_back(Action::Fail {
                        waiter: w.id,
                        reason: FailReason::ConnectFailed {
                            failures: self.failures,
                            last_error: failure.message.clone(),
                        },
                    });
                }
            }
        }
        self.step(now);
    }

    /// sshd confirmed a channel (and the command started) on `conn`.
    pub(crate) fn channel_opened(&mut self, now: Instant, conn: ConnId) {
        let mut learned = None;
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) {
            c.confirmed += 1;
            c.refusals_in_row = 0;
            c.race_refusals = 0;
            c.max_confirmed = c.max_confirmed.max(c.confirmed);
            if c.refused {
                learned = Some(c.max_confirmed);
            }
        }
        if let Some(l) = learned {
            self.raise_learned(l);
        }
        self.last_error = None;
        self.down_since = None;
        self.last_progress = Some(now);
        self.step(now);
    }

    /// sshd refused a channel on `conn`: its slot is free again. The connection pauses
    /// (longer with each refusal in a row). Unless the refusal may be the release race, the
    /// most channels ever confirmed there at once is its limit. Returns false when the
    /// refusal was blamed on the race.
    pub(crate) fn channel_refused(&mut self, now: Instant, conn: ConnId) -> bool {
        let mut learned = None;
        let mut racing = false;
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) {
            c.open = c.open.saturating_sub(1);
            let pause = REFUSAL_PAUSE
                .saturating_mul(1 << c.refusals_in_row.min(16))
                .min(MAX_REFUSAL_PAUSE);
            c.paused_until = Some(now + pause);
            c.refusals_in_row += 1;
            racing = c
                .last_release
                .is_some_and(|t| now.saturating_duration_since(t) < RELEASE_RACE)
                && c.race_refusals < MAX_RACE_REFUSALS;
            if racing {
                c.race_refusals += 1;
            } else {
                c.race_refusals = 0;
                c.refused = true;
                learned = Some(c.max_confirmed.max(1));
            }
        }
        if let Some(l) = learned {
            self.raise_learned(l);
        }
        self.step(now);
        !racing
    }

    /// Opening a channel on `conn` failed otherwise (the connection is alive): its slot is
    /// free again.
    pub(crate) fn channel_failed(&mut self, now: Instant, conn: ConnId) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) {
            c.open = c.open.saturating_sub(1);
        }
        self.evict_pending = false;
        self.step(now);
    }

    /// A slot on `conn` is free again: its channel was closed by the server (or given up),
    /// or a granted slot was never used. `confirmed` says whether it held a confirmed channel.
    pub(crate) fn channel_released(&mut self, now: Instant, conn: ConnId, confirmed: bool) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) {
            c.open = c.open.saturating_sub(1);
            if confirmed {
                c.confirmed = c.confirmed.saturating_sub(1);
                c.last_release = Some(now);
            }
        }
        self.evict_pending = false;
        self.last_progress = Some(now);
        self.step(now);
    }

    /// `conn` ended. `why` is `None` when we ended it ourselves.
    pub(crate) fn connection_lost(&mut self, now: Instant, conn: ConnId, why: Option<String>) {
        let before = self.conns.len();
        self.conns.retain(|c| c.id != conn);
        if self.conns.len() == before {
            return;
        }
        if let Some(why) = why {
            self.last_error = Some(why);
            if self.conns.is_empty() {
                self.down_since.get_or_insert(now);
            }
        }
        self.evict_pending = false;
        self.step(now);
    }

    /// Bytes moved on this host's connections: waiters queued behind busy channels are not
    /// waiting on silence.
    pub(crate) fn progress(&mut self, now: Instant) {
        self.last_progress = Some(now);
    }

    /// Time passed (the instant from [`Planner::poll_timeout`] was reached, or any time).
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.step(now);
    }

    // ===== C. polling =====

    /// The next decision to carry out.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call [`Planner::handle_timeout`] next (`None`: only on events).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for w in &self.queue {
            at(self.deadline(w));
        }
        if self.queue.iter().any(|w| w.want == Want::Channel) {
            for c in &self.conns {
                if let Some(t) = c.paused_until {
                    at(t);
                }
            }
        }
        if !self.queue.is_empty() {
            if let Some(t) = self.retry_at {
                at(t);
            }
            if let Some(t) = self.throttle_until {
                at(t);
            }
        }
        next
    }

    // ===== internals =====

    fn deadline(&self, w: &Waiter) -> Instant {
        let since = self.last_progress.map_or(w.since, |p| p.max(w.since));
        since + w.patience
    }

    fn raise_learned(&mut self, limit: usize) {
        self.learned = Some(self.learned.map_or(limit, |l| l.max(limit)));
    }

    fn random_fraction(&mut self) -> f64 {
        // xorshift64: enough to spread retries; not for anything secret.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Re-decides after any event.
    fn step(&mut self, now: Instant) {
        // Timers that have passed are done with: `poll_timeout` only ever names the future.
        for c in &mut self.conns {
            if c.paused_until.is_some_and(|t| now >= t) {
                c.paused_until = None;
            }
        }
        if self.throttle_until.is_some_and(|t| now >= t) {
            self.throttle_until = None;
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
        }
        self.expire(now);
        self.serve(now);
        self.plan_connections(now);
    }

    /// Fails waiters whose patience ran out.
    fn expire(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.queue.len() {
            if now >= self.deadline(&self.queue[i]) {
                if let Some(w) = self.queue.remove(i) {
                    self.actions.push_back(Action::Fail {
                        waiter: w.id,
                        reason: FailReason::Stalled {
                            patience: w.patience,
                        },
                    });
                }
            } else {
                i += 1;
            }
        }
    }

    /// Grants what can be granted, in arrival order.
    fn serve(&mut self, now: Instant) {
        let cap = self.channel_cap();
        let mut channel_blocked = false;
        let mut i = 0;
        while i < self.queue.len() {
            let want = self.queue[i].want;
            let conn = match want {
                Want::Connection => self.conns.iter().min_by_key(|c| c.open).map(|c| c.id),
                Want::Channel if channel_blocked => None,
                Want::Channel => {
                    let known = cap < usize::MAX;
                    let best = self
                        .conns
                        .iter_mut()
                        .filter(|c| c.has_room(cap, known) && !c.paused(now))
                        .min_by_key(|c| c.open);
                    match best {
                        Some(c) => {
                            c.open += 1;
                            Some(c.id)
                        }
                        None => {
                            // Later waiters want the same: first come, first served.
                            channel_blocked = true;
                            None
                        }
                    }
                }
            };
            match conn {
                Some(conn) => {
                    if let Some(w) = self.queue.remove(i) {
                        self.actions.push_back(Action::Grant { waiter: w.id, conn });
                    }
                }
                None => i += 1,
            }
        }
    }

    /// Starts connection attempts for the demand left after serving, or asks for an
    /// eviction when no more connections may be opened.
    fn plan_connections(&mut self, now: Instant) {
        let channel_demand = self
            .queue
            .iter()
            .filter(|w| w.want == Want::Channel)
            .count();
        let tunnel_demand =
            self.conns.is_empty() && self.queue.iter().any(|w| w.want == Want::Connection);
        if channel_demand == 0 && !tunnel_demand {
            return;
        }
        let cap = self.channel_cap();
        // A connection with room that is only paused after a refusal: sshd holds sessions
        // we no longer count, which ends soon. Wait for that rather than open another.
        if channel_demand > 0
            && self
                .conns
                .iter()
                .any(|c| c.open < c.capacity(cap) && c.paused(now))
        {
            return;
        }
        let due = |t: Option<Instant>| t.is_none_or(|t| now >= t);
        // While a connection that refused still has opens in flight, its limit is only a
        // lower bound (opens sent before the refused one may yet be confirmed, and their
        // answers can be handled after the refusal): connect one at a time until it is
        // known, or a burst would open connections for a limit that was underestimated.
        let learning = self.conns.iter().any(|c| c.refused && c.open > c.confirmed);
        let parallel = if learning {
            1
        } else {
            self.limits.max_parallel_connects.max(1)
        };
        let mut expected = self.attempts.len().saturating_mul(cap);
        let mut needed = channel_demand > expected || (tunnel_demand && self.attempts.is_empty());
        while needed {
            if self.conns.len() + self.attempts.len() >= self.limits.max_connections.max(1)
                || self.attempts.len() >= parallel
                || !due(self.retry_at)
                || !due(self.throttle_until)
            {
                break;
            }
            let id = self.next_attempt;
            self.next_attempt += 1;
            self.attempts.push(id);
            self.actions.push_back(Action::Connect(id));
            expected = expected.saturating_add(cap);
            needed = channel_demand > expected;
        }
        let full = self.conns.len() + self.attempts.len() >= self.limits.max_connections.max(1);
        if channel_demand > 0 && full && self.attempts.is_empty() && !self.evict_pending {
            self.evict_pending = true;
            self.actions.push_back(Action::EvictIdle);
        }
    }
}

#[cfg(test)]
mod tests;
