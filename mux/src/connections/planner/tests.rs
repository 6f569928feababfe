//! The planner under simulated time: scenarios first, then random interleavings of
//! requests, cancellations, connect outcomes (success, failure, start-up drop), refusals,
//! releases, connection deaths and time, against a fake sshd with a `MaxSessions` limit.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;

fn limits() -> ConnectionLimits {
    ConnectionLimits {
        max_channels_per_connection: None,
        max_connections: 8,
        max_parallel_connects: 4,
        initial_backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(5),
    }
}

const PATIENCE: Duration = Duration::from_secs(30);

fn drain(p: &mut Planner) -> Vec<Action> {
    std::iter::from_fn(|| p.poll_action()).collect()
}

fn grants(actions: &[Action]) -> Vec<(WaiterId, ConnId)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Grant { waiter, conn } => Some((*waiter, *conn)),
            _ => None,
        })
        .collect()
}

fn connects(actions: &[Action]) -> Vec<AttemptId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Connect(id) => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn a_burst_waits_for_one_connection_and_shares_it() {
    let t0 = Instant::now();
    let mut p = Planner::new(limits(), 1);
    for w in 0..5 {
        p.request(t0, w, Want::Channel, PATIENCE, None);
    }
    let a = drain(&mut p);
    assert_eq!(
        connects(&a),
        vec![0],
        "one attempt while the limit is unknown: {a:?}"
    );
    let c = p.connected(t0 + Duration::from_millis(80), 0);
    let a = drain(&mut p);
    assert_eq!(grants(&a), (0..5).map(|w| (w, c)).collect::<Vec<_>>());
}

#[test]
fn an_unknown_limit_is_probed_with_a_bounded_number_of_opens() {
    let t0 = Instant::now();
    let mut p = Planner::new(limits(), 1);
    for w in 0..100 {
        p.request(t0, w, Want::Channel, PATIENCE, None);
    }
    drain(&mut p);
    let c = p.connected(t0, 0);
    let g = grants(&drain(&mut p));
    assert_eq!(
        g.len(),
        PROBE_OPENS,
        "no more unanswered opens than sshd's default limit"
    );
    // Each confirmation lets one more open go out.
    p.channel_opened(t0, c);
    assert_eq!(grants(&drain(&mut p)), vec![(PROBE_OPENS as u64, c)]);
}

#[test]
fn a_refusal_teaches_the_limit_and_the_rest_get_new_connections() {
    let t0 = Instant::now();
    let mut p = Planner::new(limits(), 1);
    for w in 0..25 {
        p.request(t0, w, Want::Channel, PATIENCE, None);
    }
    drain(&mut p);
    let c0 = p.connected(t0, 0);
    let seqs: HashMap<WaiterId, u64> = (0..25).map(|w| (w, w + 1)).collect();
    assert_eq!(grants(&drain(&mut p)).len(), PROBE_OPENS);
    let t = t0 + Duration::from_millis(5);
    for _ in 0..4 {
        p.channel_opened(t, c0);
    }
    assert_eq!(
        grants(&drain(&mut p)).len(),
        4,
        "confirmations let more probes out"
    );
    let mut new_connects = Vec::new();
    for w in 4..14 {
        p.channel_refused(t, c0);
        p.request(t, w, Want::Channel, PATIENCE, Some(seqs[&w]));
        new_connects.extend(connects(&drain(&mut p)));
    }
    assert_eq!(p.learned_limit(), Some(4));
    // 21 waiters left (4..25) need six more connections of 4: four at once, and while the
    // refusing connection still had opens in flight, one at a time.
    assert!(
        !new_connects.is_empty() && new_connects.len() <= 4,
        "{new_connects:?}"
    );
    let c1 = p.connected(t, new_connects[0]);
    let a = drain(&mut p);
    let g = grants(&a);
    assert_eq!(g.len(), 4);
    assert!(g.iter().all(|&(_, c)| c == c1));
    assert_eq!(
        g.iter().map(|&(w, _)| w).collect::<Vec<_>>(),
        (4..8).collect::<Vec<_>>(),
        "refused waiters keep their place"
    );
}

#[test]
fn a_waiter_dropped_during_the_connect_does_not_wedge_the_host() {
    // What used to happen: the caller that started the connect was dropped (a timeout around
    // it) and nobody ever connected again.
    let t0 = Instant::now();
    let mut p = Planner::new(limits(), 1);
    p.request(t0, 1, Want::Channel, PATIENCE, None);
    let a = drain(&mut p);
    assert_eq!(connects(&a), vec![0]);
    p.cancel(t0, 1);
    p.request(t0, 2, Want::Channel, PATIENCE, None);
    assert!(
        connects(&drain(&mut p)).is_empty(),
        "the attempt in flight serves it"
    );
    let c = p.connected(t0 + Duration::from_millis(50), 0);
    assert_eq!(grants(&drain(&mut p)), vec![(2, c)]);
}

#[test]
fn start_up_drops_are_retried_with_jitter_while_waiters_wait() {
    let t0 = Instant::now();
    let mut p = Planner::new(limits(), 7);
    p.request(t0, 1, Want::Channel, PATIENCE, None);
    drain(&mut p);
    let mut delays = Vec::new();
    let mut now = t0;
    for attempt in 0..5 {
        p.connect_failed(
            now,
            attempt,
            ConnectFailure {
                throttled: true,
                message: "dropped".into(),
            },
        );
        let a = drain(&mut p);
        assert!(a.is_empty(), "no failure, no immediate retry: {a:?}");
        let at = p.poll_timeout().expect("a retry is scheduled");
        delays.push(at - now);
        now = at;
        p.handle_timeout(now);
        assert_eq!(connects(&drain(&mut p)), vec![attempt + 1]);
    }
    for (k, d) in delays.iter().enumerate() {
        let base = THROTTLE_DELAY * (1 << k);
        assert!(
            *d >= base / 2 && *d <= base,
            "retry {k} after {d:?} (base {base:?})"
        );
    }
    let c = p.connected(now, 5);
    assert_eq!(grants(&drain(&mut p)), vec![(1, c)]);
}

#[test]
fn endless_start_up_drops_become_a_failure() {
    let t0 = Instant::now();
    let mut p = Planner::new(limits(), 7);
    p.request(t0, 1, Want::Channel, PATIENCE, None);
    drain(&mut p);
    let mut now = t0;
    let mut attempt = 0;
    loop {
        p.connect_failed(
            now,
            attempt,
            ConnectFailure {
                throttled: true,
                message: "dropped at start-up".into(),
            },
        );
        let a = drain(&mut p);
        if let Some(Action::Fail { reason, .. }) = a.first() {
            assert!(
                matches!(reason, FailReason::ConnectFailed { .. }),
                "{reason:?}"
            );
            break;
        }
        now = p.poll_timeout().expect("retry");
        p.handle_timeout(now);
        attempt = connects(&drain(&mut p))[0];
        assert!(attempt <= u64::from(MAX_THROTTLED_IN_ROW));
    }
    assert!(
        now - t0 < Duration::from_secs(10),
        "gave up after {:?}",
        now - t0
    );
}

#[test]
fn a_failed_attempt_fails_its_waiters_then_backs_off() {
    let t0 = Instant::now();
    let mut p = Planner::new(limits(), 1);
    p.request(t0, 1, Want::Channel, PATIENCE, None);
    p.request(t0, 2, Want::Channel, PATIENCE, None);
    drain(&mut p);
    p.connect_failed(
        t0,
        0,
        ConnectFailure {
            throttled: false,
            message: "connection refused".into(),
        },
    );
    let a = drain(&mut p);
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|x| matches!(
        x,
        Action::Fail {
            reason: FailReason::ConnectFailed { failures: 1, .. },
            ..
        }
    )));
    p.request(
        t0 + Duration::from_millis(100),
        3,
        Want::Channel,
        PATIENCE,
        None,
    );
    assert!(matches!(
        drain(&mut p)[..],
        [Action::Fail {
            reason: FailReason::BackingOff { .. },
            ..
        }]
    ));
    let later = t0 + limits().initial_backoff;
    p.request(later, 4, Want::Channel, PATIENCE, None);
    assert_eq!(connects(&drain(&mut p)), vec![1]);
}

#[test]
fn patience_measures_silence_not_queueing_time() {
    let mut l = limits();
    l.max_channels_per_connection = Some(1);
    l.max_connections = 1;
    let t0 = Instant::now();
    let mut p = Planner::new(l, 1);
    p.request(t0, 1, Want::Channel, PATIENCE, None);
    drain(&mut p);
    let c = p.connected(t0, 0);
    drain(&mut p);
    p.channel_opened(t0, c);
    p.request(t0, 2, Want::Channel, Duration::from_secs(2), None);
    drain(&mut p);
    // The holder moves bytes for a minute: the queued waiter keeps waiting.
    let mut now = t0;
    for _ in 0..60 {
        now += Duration::from_secs(1);
        p.progress(now);
        p.handle_timeout(now);
        assert!(
            drain(&mut p)
                .iter()
                .all(|a| !matches!(a, Action::Fail { .. }))
        );
    }
    // Then silence: it fails two seconds later, not before.
    p.handle_timeout(now + Duration::from_millis(1999));
    assert!(drain(&mut p).is_empty());
    assert_eq!(p.poll_timeout(), Some(now + Duration::from_secs(2)));
    p.handle_timeout(now + Duration::from_secs(2));
    assert!(matches!(
        drain(&mut p)[..],
        [Action::Fail {
            waiter: 2,
            reason: FailReason::Stalled { .. }
        }]
    ));
}

#[test]
fn connects_are_bounded_in_parallel_and_in_total() {
    let mut l = limits();
    l.max_channels_per_connection = Some(1);
    let t0 = Instant::now();
    let mut p = Planner::new(l, 1);
    for w in 0..20 {
        p.request(t0, w, Want::Channel, PATIENCE, None);
    }
    let first = connects(&drain(&mut p));
    assert_eq!(first.len(), 4, "at most max_parallel_connects at once");
    let mut all = first.clone();
    for a in first {
        p.connected(t0, a);
        all.extend(connects(&drain(&mut p)));
    }
    assert_eq!(all.len(), 8, "at most max_connections");
}

#[test]
fn a_full_host_evicts_one_idle_session_per_change() {
    let mut l = limits();
    l.max_channels_per_connection = Some(1);
    l.max_connections = 1;
    let t0 = Instant::now();
    let mut p = Planner::new(l, 1);
    p.request(t0, 1, Want::Channel, PATIENCE, None);
    drain(&mut p);
    let c = p.connected(t0, 0);
    drain(&mut p);
    p.channel_opened(t0, c);
    p.request(t0, 2, Want::Channel, PATIENCE, None);
    assert_eq!(drain(&mut p), vec![Action::EvictIdle]);
    p.request(t0, 3, Want::Channel, PATIENCE, None);
    assert!(
        drain(&mut p).is_empty(),
        "one eviction until something changes"
    );
    p.channel_released(t0, c, true);
    let a = drain(&mut p);
    assert_eq!(grants(&a), vec![(2, c)]);
    assert_eq!(
        a.last(),
        Some(&Action::EvictIdle),
        "waiter 3 still needs a slot"
    );
}

#[test]
fn a_refusal_right_after_a_release_pauses_instead_of_teaching() {
    let t0 = Instant::now();
    let mut p = Planner::new(limits(), 1);
    for w in 0..3 {
        p.request(t0, w, Want::Channel, PATIENCE, None);
    }
    drain(&mut p);
    let c = p.connected(t0, 0);
    drain(&mut p);
    for _ in 0..3 {
        p.channel_opened(t0, c);
    }
    p.channel_released(t0, c, true);
    p.request(t0, 9, Want::Channel, PATIENCE, None);
    assert_eq!(grants(&drain(&mut p)), vec![(9, c)]);
    let t = t0 + Duration::from_millis(1);
    p.channel_refused(t, c);
    let seq = p.seq_of(9);
    assert_eq!(seq, None, "granted waiters are not queued");
    p.request(t, 9, Want::Channel, PATIENCE, Some(4));
    assert_eq!(p.learned_limit(), None, "blamed on the release race");
    assert!(drain(&mut p).is_empty(), "paused, not reconnecting");
    let resume = p.poll_timeout().expect("pause end");
    assert_eq!(resume, t + REFUSAL_PAUSE);
    p.handle_timeout(resume);
    assert_eq!(grants(&drain(&mut p)), vec![(9, c)]);
}

#[test]
fn the_planner_never_asks_to_be_woken_in_the_past() {
    let t0 = Instant::now();
    let mut p = Planner::new(limits(), 1);
    p.request(t0, 1, Want::Channel, PATIENCE, None);
    drain(&mut p);
    let c = p.connected(t0, 0);
    drain(&mut p);
    p.channel_refused(t0, c);
    p.request(t0, 1, Want::Channel, PATIENCE, Some(1));
    drain(&mut p);
    let at = p.poll_timeout().expect("pause");
    p.handle_timeout(at + Duration::from_secs(1));
    drain(&mut p);
    if let Some(next) = p.poll_timeout() {
        assert!(next > at + Duration::from_secs(1));
    }
}

// ===== random interleavings =====

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Fail,
    Throttle,
}

#[derive(Debug, Clone)]
enum Op {
    Add {
        n: usize,
        tunnel: bool,
        hold_ms: u64,
    },
    Cancel(usize),
    Advance(u64),
    Kill(usize),
    Mode(Mode),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..12, prop::bool::weighted(0.1), 1u64..3_000)
            .prop_map(|(n, tunnel, hold_ms)| Op::Add { n, tunnel, hold_ms }),
        2 => any::<usize>().prop_map(Op::Cancel),
        4 => (0u64..4_000).prop_map(Op::Advance),
        1 => any::<usize>().prop_map(Op::Kill),
        1 => prop_oneof![Just(Mode::Ok), Just(Mode::Fail), Just(Mode::Throttle)].prop_map(Op::Mode),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Queued {
        seq: u64,
    },
    Opening {
        conn: ConnId,
    },
    Holding {
        conn: ConnId,
    },
    Served,
    Failed(FailReason),
    /// Dropped while queued.
    Cancelled,
    /// Dropped while its channel was being opened: the open completes unobserved.
    Abandoned,
}

#[derive(Debug)]
struct Waiter {
    want: Want,
    hold: Duration,
    patience: Duration,
    state: State,
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    ConnectDone(AttemptId),
    ExecDone { waiter: WaiterId, conn: ConnId },
    Release { waiter: WaiterId, conn: ConnId },
}

/// A fake sshd (per-connection `MaxSessions`) and callers, around a planner.
struct Sim {
    p: Planner,
    limits: ConnectionLimits,
    now: Instant,
    server_limit: usize,
    sessions: HashMap<ConnId, usize>,
    events: BTreeMap<(Instant, u64), Ev>,
    event_seq: u64,
    waiters: BTreeMap<WaiterId, Waiter>,
    next_waiter: WaiterId,
    mode: Mode,
    /// Waiters that failed with `Stalled` while the world was healthy (final phase).
    healthy: bool,
    stalled_while_healthy: Vec<WaiterId>,
}

impl Sim {
    fn new(server_limit: usize, max_connections: usize, seed: u64) -> Self {
        let mut l = limits();
        l.max_connections = max_connections;
        Sim {
            p: Planner::new(l.clone(), seed),
            limits: l,
            now: Instant::now(),
            server_limit,
            sessions: HashMap::new(),
            events: BTreeMap::new(),
            event_seq: 0,
            waiters: BTreeMap::new(),
            next_waiter: 0,
            mode: Mode::Ok,
            healthy: false,
            stalled_while_healthy: Vec::new(),
        }
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.event_seq += 1;
        self.events.insert((self.now + after, self.event_seq), ev);
    }

    /// Carries out the planner's decisions, checking them.
    fn apply(&mut self) {
        while let Some(a) = self.p.poll_action() {
            self.check_bounds();
            match a {
                Action::Connect(id) => self.schedule(Duration::from_millis(5), Ev::ConnectDone(id)),
                Action::Grant { waiter, conn } => {
                    let w = self.waiters.get_mut(&waiter).expect("known waiter");
                    assert!(
                        matches!(w.state, State::Queued { .. }),
                        "grant to a waiter in state {:?}",
                        w.state
                    );
                    match w.want {
                        Want::Connection => w.state = State::Served,
                        Want::Channel => {
                            let (open, cap) = self.p.slots(conn).expect("granted on a live conn");
                            assert!(open <= cap, "{open} slots reserved, capacity {cap}");
                            if let Some(l) = self.p.learned_limit() {
                                assert!(open <= l, "{open} slots beyond the learned limit {l}");
                            }
                            w.state = State::Opening { conn };
                            self.schedule(Duration::from_millis(1), Ev::ExecDone { waiter, conn });
                        }
                    }
                }
                Action::Fail { waiter, reason } => {
                    let w = self.waiters.get_mut(&waiter).expect("known waiter");
                    assert!(
                        matches!(w.state, State::Queued { .. }),
                        "failure for a waiter in state {:?}",
                        w.state
                    );
                    if self.healthy && matches!(reason, FailReason::Stalled { .. }) {
                        self.stalled_while_healthy.push(waiter);
                    }
                    w.state = State::Failed(reason);
                }
                Action::EvictIdle => {}
            }
        }
        if let Some(l) = self.p.learned_limit() {
            assert!(
                l <= self.server_limit,
                "learned {l} > MaxSessions {}",
                self.server_limit
            );
        }
        if let Some(t) = self.p.poll_timeout() {
            assert!(t > self.now, "asked to be woken in the past");
        }
    }

    fn check_bounds(&self) {
        let live = self.p.live_connections().count();
        let flying = self.p.attempts_in_flight();
        assert!(live + flying <= self.limits.max_connections);
        assert!(flying <= self.limits.max_parallel_connects);
    }

    fn event(&mut self, ev: Ev) {
        match ev {
            Ev::ConnectDone(id) => match self.mode {
                Mode::Ok => {
                    let c = self.p.connected(self.now, id);
                    self.sessions.insert(c, 0);
                }
                Mode::Fail => self.p.connect_failed(
                    self.now,
                    id,
                    ConnectFailure {
                        throttled: false,
                        message: "refused".into(),
                    },
                ),
                Mode::Throttle => self.p.connect_failed(
                    self.now,
                    id,
                    ConnectFailure {
                        throttled: true,
                        message: "dropped".into(),
                    },
                ),
            },
            Ev::ExecDone { waiter, conn } => {
                let abandoned = self.waiters[&waiter].state == State::Abandoned;
                match self.sessions.get_mut(&conn) {
                    // The connection died meanwhile: the caller retries on a fresh one.
                    None => {
                        if !abandoned {
                            self.requeue(waiter, None);
                        }
                    }
                    Some(n) if *n < self.server_limit => {
                        *n += 1;
                        self.p.channel_opened(self.now, conn);
                        let hold = if abandoned {
                            Duration::from_millis(1)
                        } else {
                            let w = self.waiters.get_mut(&waiter).expect("known");
                            w.state = State::Holding { conn };
                            w.hold
                        };
                        self.schedule(hold, Ev::Release { waiter, conn });
                    }
                    Some(_) => {
                        self.p.channel_refused(self.now, conn);
                        if !abandoned {
                            self.requeue(waiter, None);
                        }
                    }
                }
            }
            Ev::Release { waiter, conn } => {
                if let Some(n) = self.sessions.get_mut(&conn) {
                    *n -= 1;
                    self.p.channel_released(self.now, conn, true);
                }
                let w = self.waiters.get_mut(&waiter).expect("known");
                if matches!(w.state, State::Holding { .. }) {
                    w.state = State::Served;
                }
            }
        }
        self.apply();
    }

    fn requeue(&mut self, waiter: WaiterId, seq: Option<u64>) {
        let (want, patience) = {
            let w = &self.waiters[&waiter];
            (w.want, w.patience)
        };
        let seq = self.p.request(self.now, waiter, want, patience, seq);
        let w = self.waiters.get_mut(&waiter).expect("known");
        w.state = State::Queued { seq };
    }

    fn op(&mut self, op: &Op) {
        match *op {
            Op::Add { n, tunnel, hold_ms } => {
                for _ in 0..n {
                    let id = self.next_waiter;
                    self.next_waiter += 1;
                    self.waiters.insert(
                        id,
                        Waiter {
                            want: if tunnel {
                                Want::Connection
                            } else {
                                Want::Channel
                            },
                            hold: Duration::from_millis(hold_ms),
                            patience: Duration::from_secs(20),
                            state: State::Queued { seq: 0 },
                        },
                    );
                    self.requeue(id, None);
                    self.apply();
                }
            }
            Op::Cancel(i) => {
                let candidates: Vec<WaiterId> = self
                    .waiters
                    .iter()
                    .filter(|(_, w)| {
                        matches!(w.state, State::Queued { .. } | State::Opening { .. })
                    })
                    .map(|(id, _)| *id)
                    .collect();
                if candidates.is_empty() {
                    return;
                }
                let id = candidates[i % candidates.len()];
                let w = self.waiters.get_mut(&id).expect("known");
                if matches!(w.state, State::Queued { .. }) {
                    w.state = State::Cancelled;
                    self.p.cancel(self.now, id);
                } else {
                    w.state = State::Abandoned;
                }
                self.apply();
            }
            Op::Advance(ms) => self.advance(Duration::from_millis(ms)),
            Op::Kill(i) => {
                let live: Vec<ConnId> = self.p.live_connections().collect();
                if live.is_empty() {
                    return;
                }
                let c = live[i % live.len()];
                self.sessions.remove(&c);
                self.p.connection_lost(self.now, c, Some("killed".into()));
                self.apply();
            }
            Op::Mode(m) => self.mode = m,
        }
    }

    fn advance(&mut self, by: Duration) {
        let target = self.now + by;
        let mut guard = 0u32;
        loop {
            guard += 1;
            assert!(
                guard < 1_000_000,
                "the planner keeps waking without progress"
            );
            let next_event = self.events.keys().next().map(|k| k.0);
            let next_timer = self.p.poll_timeout();
            let next = match (next_event, next_timer) {
                (Some(e), Some(t)) => e.min(t),
                (Some(e), None) => e,
                (None, Some(t)) => t,
                (None, None) => break,
            };
            if next > target {
                break;
            }
            if next > self.now {
                // Time passes for the planner as for the driver, which looks at every wake.
                self.now = next;
                self.p.handle_timeout(self.now);
                self.apply();
            }
            if next_event == Some(next) {
                let key = *self.events.keys().next().expect("event");
                let ev = self.events.remove(&key).expect("event");
                self.event(ev);
            }
        }
        self.now = target;
        self.p.handle_timeout(self.now);
        self.apply();
    }

    /// Stops faults and lets everything settle; every waiter must end served or failed.
    fn settle(&mut self) {
        self.mode = Mode::Ok;
        self.healthy = true;
        for _ in 0..600 {
            self.advance(Duration::from_secs(1));
            if self.waiters.values().all(|w| {
                !matches!(
                    w.state,
                    State::Queued { .. } | State::Opening { .. } | State::Holding { .. }
                )
            }) && self.events.is_empty()
            {
                break;
            }
        }
        for (id, w) in &self.waiters {
            assert!(
                !matches!(
                    w.state,
                    State::Queued { .. } | State::Opening { .. } | State::Holding { .. }
                ),
                "waiter {id} never resolved: {w:?}"
            );
        }
        assert!(
            self.stalled_while_healthy.is_empty(),
            "waiters {:?} gave up although the builder was healthy",
            self.stalled_while_healthy
        );
        assert_eq!(self.p.waiting(), 0);
        for c in self.p.live_connections().collect::<Vec<_>>() {
            let (open, _) = self.p.slots(c).expect("live");
            assert_eq!(
                open, 0,
                "connection {c} still holds {open} slots after settling"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_never_wedge_or_exceed_limits(
        server_limit in 1usize..13,
        max_connections in 1usize..6,
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let mut sim = Sim::new(server_limit, max_connections, seed);
        for o in &ops {
            sim.op(o);
        }
        sim.settle();
    }
}
