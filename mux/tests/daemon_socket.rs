//! `ssh-ng://` sessions over channels to the builder's nix-daemon socket, against a real
//! OpenSSH + Nix 2.8 builder from the rig that runs a daemon: they are not sessions for sshd,
//! so `MaxSessions` does not spread them over several connections.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{config, rig, sp};
use nixmux::session::{SessionConfig, WorkerConfig, WorkerSession};
use nixmux::{Pool, Protocol, WorkerRoute};
use nixmux_rig::RigConfig;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

static OPENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static GREETED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const ABSENT: &str = "/nix/store/00000000000000000000000000000000-absent";

/// 200 worker sessions open at once, each with its handshake done and a request answered
/// while all are held, over one connection to a builder whose sshd allows 10 sessions per
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sessions_share_one_connection_through_the_socket() {
    const SESSIONS: usize = 200;
    let rig = rig(RigConfig {
        nix_daemon: true,
        max_sessions: 10,
        ..RigConfig::with_builders(1)
    });
    let mut cfg = config(&rig, 0, Protocol::Worker);
    cfg.pool.max_sessions = SESSIONS;
    let pool = Pool::new();
    let builder = pool.add(cfg);

    // Each task opens its session, then waits until all are open (first barrier), asks its
    // question, and holds the session until the counts below are taken (second barrier).
    let all_open = Arc::new(Barrier::new(SESSIONS + 1));
    let checked = Arc::new(Barrier::new(SESSIONS + 1));
    let mut tasks = JoinSet::new();
    for _ in 0..SESSIONS {
        let (b, all_open, checked) = (builder.clone(), all_open.clone(), checked.clone());
        tasks.spawn(async move {
            let raw = b.open_raw(None).await.expect("a channel to the socket");
            OPENED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut session = WorkerSession::handshake(
                Box::new(raw.stdout),
                Box::new(raw.stdin),
                Default::default(),
                SessionConfig::default(),
                &WorkerConfig::default(),
                &mut |_| {},
            )
            .await
            .expect("worker handshake over the socket");
            GREETED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            all_open.wait().await;
            let probe: BTreeSet<_> = [sp(ABSENT)].into();
            let valid = session
                .query_valid_paths(&probe, false, &mut |_| {})
                .await
                .expect("query");
            assert!(valid.is_empty());
            checked.wait().await;
        });
    }
    tokio::time::timeout(Duration::from_secs(40), all_open.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "all sessions open within 40 s: {} opened, {} greeted, {:?}, {:?}",
                OPENED.load(std::sync::atomic::Ordering::SeqCst),
                GREETED.load(std::sync::atomic::Ordering::SeqCst),
                builder.stats(),
                builder.health()
            )
        });
    let stats = builder.stats();
    let health = builder.health();
    assert_eq!(stats.connections_opened, 1, "{stats:?}");
    assert_eq!(health.connections, 1, "{health:?}");
    assert_eq!(stats.daemon_socket_refusals, 0, "{stats:?}");
    let b = rig.builder(0);
    assert_eq!(b.accepted_connections(), 1, "{}", b.sshd_log());
    assert_eq!(b.session_opens(), 0, "no session channel: {}", b.sshd_log());
    assert_eq!(b.refused_sessions(), 0, "{}", b.sshd_log());
    checked.wait().await;
    while let Some(r) = tasks.join_next().await {
        r.expect("session task");
    }

    // The pooled API takes the same path: its sessions are counted as socket sessions.
    let mut queries = JoinSet::new();
    for _ in 0..50 {
        let b = builder.clone();
        queries.spawn(async move {
            let paths: BTreeSet<_> = [sp(ABSENT)].into();
            b.query_valid_paths(&paths, false).await
        });
    }
    while let Some(q) = queries.join_next().await {
        assert!(q.expect("task").expect("pooled query").is_empty());
    }
    let stats = builder.stats();
    assert!(stats.sessions_created > 0, "{stats:?}");
    assert_eq!(
        stats.sessions_via_socket, stats.sessions_created,
        "{stats:?}"
    );
    assert_eq!(stats.connections_opened, 1, "{stats:?}");
    pool.shutdown().await;
}

/// Without a daemon the first session pays one refused channel, later ones go straight to
/// exec; insisting on the socket is a clear, non-retryable error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_socket_is_remembered_and_exec_takes_over() {
    let rig = rig(RigConfig::with_builders(1));
    let pool = Pool::new();
    let builder = pool.add(config(&rig, 0, Protocol::Worker));
    let none = BTreeSet::new();
    for _ in 0..3 {
        builder
            .query_valid_paths(&none, false)
            .await
            .expect("query");
        builder.close_idle();
    }
    let stats = builder.stats();
    assert_eq!(stats.daemon_socket_refusals, 1, "{stats:?}");
    assert_eq!(stats.sessions_via_socket, 0, "{stats:?}");
    assert_eq!(stats.sessions_created, 3, "{stats:?}");
    assert!(
        stats
            .daemon_socket_refused
            .as_deref()
            .is_some_and(|w| w.contains("/nix/var/nix/daemon-socket/socket")),
        "{stats:?}"
    );

    // A burst on a builder not probed yet pays one refusal, not one per session.
    let mut cfg = config(&rig, 0, Protocol::Worker);
    cfg.name = "burst".into();
    let burst = pool.add(cfg);
    let mut queries = JoinSet::new();
    for _ in 0..8 {
        let b = burst.clone();
        queries.spawn(async move { b.query_valid_paths(&BTreeSet::new(), false).await });
    }
    while let Some(q) = queries.join_next().await {
        q.expect("task").expect("query");
    }
    let stats = burst.stats();
    assert_eq!(stats.daemon_socket_refusals, 1, "{stats:?}");
    assert!(stats.sessions_created > 1, "{stats:?}");

    let mut cfg = config(&rig, 0, Protocol::Worker);
    cfg.name = "forced".into();
    cfg.worker_route = WorkerRoute::Socket;
    let forced = pool.add(cfg);
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        forced.query_valid_paths(&none, false),
    )
    .await
    .expect("no hang")
    .expect_err("no socket");
    assert_eq!(e.kind(), nixmux::ErrorKind::Connect, "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("daemon socket"), "{e}");
    pool.shutdown().await;
}

/// Once the key is known to be accepted, a new connection's first channel (the daemon socket,
/// for `ssh-ng://`) is opened together with authentication. A builder that refuses it (no
/// daemon here) refuses that early open: the session goes over exec, and the refusal is
/// remembered as for a later open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_early_socket_open_falls_back_to_exec() {
    let rig = rig(RigConfig::with_builders(1));
    let none = BTreeSet::new();
    let cfg = config(&rig, 0, Protocol::Worker);
    // The first connection of this process: the key becomes known as accepted.
    let first = nixmux::ping::ping(&cfg, 1).await;
    assert!(first.ok, "{first:?}");
    // A new one opens the socket channel with authentication, which sshd refuses.
    let second = nixmux::ping::ping(&cfg, 1).await;
    assert!(second.ok, "{second:?}");
    assert!(
        second
            .stages
            .iter()
            .any(|s| s.stage == nixmux::ping::PingStage::AuthWithOpen),
        "{:?}",
        second.stages
    );
    assert_eq!(second.session_path.as_deref(), Some("exec"), "{second:?}");
    // The same through a new pool, as a scheduler would.
    let pool = Pool::new();
    let builder = pool.add(cfg);
    tokio::time::timeout(
        Duration::from_secs(30),
        builder.query_valid_paths(&none, false),
    )
    .await
    .expect("no hang")
    .expect("query over exec");
    let stats = builder.stats();
    assert_eq!(stats.daemon_socket_refusals, 1, "{stats:?}");
    assert_eq!(stats.sessions_via_socket, 0, "{stats:?}");
    pool.shutdown().await;
}
