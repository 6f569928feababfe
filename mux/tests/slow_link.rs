//! Timeouts measure silence, not duration, against real OpenSSH + Nix 2.8 builders behind an
//! emulated link: a transfer that keeps moving succeeds however long it takes; one whose
//! builder stops answering fails soon after the last byte moved, with a typed, retryable
//! error, and the next operation succeeds once the builder is back. These cover the protocol
//! sessions' transfers; the zstd bulk channel on a slow link is covered in `zstd_bulk.rs`.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nixmux::local::LocalStore;
use nixmux::proto::store_path::StorePath;
use nixmux::{Builder, BuilderConfig, ErrorKind, Pool, Protocol};
use nixmux_rig::relay::{Link, Relay};
use nixmux_rig::{Rig, RigConfig};

use common::*;

const IDLE: Duration = Duration::from_secs(2);
const MIB: usize = 1 << 20;

struct Setup {
    rig: Arc<Rig>,
    _relay: Relay,
    pool: Pool,
    builder: Builder,
    local: LocalStore,
}

async fn setup(protocol: Protocol, link: Link, tune: impl FnOnce(&mut BuilderConfig)) -> Setup {
    let rig = rig(RigConfig::with_builders(1));
    let relay = Relay::start(rig.builder(0).addr(), link)
        .await
        .expect("relay");
    let mut cfg = relayed_config(&rig, 0, protocol, &relay);
    // On this link `auto` would move large transfers to the zstd channel: keep them on the
    // protocol session, the path every builder without zstd takes.
    cfg.bulk.mode = nixmux::bulk::BulkCompression::Off;
    tune(&mut cfg);
    let pool = Pool::new();
    let builder = pool.add(cfg);
    let local = local_store(&rig);
    Setup {
        rig,
        _relay: relay,
        pool,
        builder,
        local,
    }
}

/// What a transfer did, and how long it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let r = f.await;
    (r, t.elapsed())
}

/// 12 MiB through an 8 Mbit/s link takes about 12 s, six times the 2 s idle timeout.
///
/// Why not slower: while uploading, what shows the peer is alive is its SSH window
/// adjustments (and our writes they unblock). OpenSSH's sshd grants a 2 MiB window and
/// adjusts it once 1 MiB is consumed (`channel_check_window` in OpenSSH's `channels.c`), so an
/// upload shows progress once per MiB: the idle timeout must exceed 1 MiB / link rate
/// (1 s at 8 Mbit/s; with the default 60 s, any link above 140 kbit/s).
async fn slow_transfer_outlives_the_idle_timeout(protocol: Protocol, push: bool) {
    let s = setup(protocol, Link::new(20.0, 8.0), |c| {
        c.session.idle_timeout = IDLE
    })
    .await;
    let size = 12 * MIB;
    let (r, took) = if push {
        let p = random_path(s.rig.client_store(), "slow-push", size, 11);
        let r = timed(
            s.builder
                .push_closure(&s.local, &BTreeSet::from([p.clone()]), false, None),
        )
        .await;
        let remote = s.rig.builder(0).store().is_valid(&abs(&p)).expect("query");
        assert!(remote || r.0.is_err(), "pushed path valid on the builder");
        (r.0.map(|rep| rep.bytes), r.1)
    } else {
        let p = random_path(s.rig.builder(0).store(), "slow-fetch", size, 12);
        let r = timed(
            s.builder
                .fetch_outputs(&s.local, &BTreeSet::from([p.clone()]), None),
        )
        .await;
        if r.0.is_ok() {
            assert!(s.rig.client_store().is_valid(&abs(&p)).expect("query"));
        }
        (r.0.map(|rep| rep.bytes), r.1)
    };
    let bytes = r.unwrap_or_else(|e| panic!("transfer failed after {took:?}: {e}"));
    eprintln!("{bytes} NAR bytes in {took:?} with a {IDLE:?} idle timeout");
    assert!(bytes >= size as u64);
    assert!(
        took >= Duration::from_secs(10),
        "throttled to at least 10 s: {took:?}"
    );
    s.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_push_outlives_the_idle_timeout_over_ssh() {
    slow_transfer_outlives_the_idle_timeout(Protocol::Serve, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_push_outlives_the_idle_timeout_over_ssh_ng() {
    slow_transfer_outlives_the_idle_timeout(Protocol::Worker, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_fetch_outlives_the_idle_timeout_over_ssh() {
    slow_transfer_outlives_the_idle_timeout(Protocol::Serve, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_fetch_outlives_the_idle_timeout_over_ssh_ng() {
    slow_transfer_outlives_the_idle_timeout(Protocol::Worker, false).await;
}

/// Records when the builder's byte counters last changed.
fn watch_progress(b: &Builder) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>, Instant) {
    let origin = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (b, l) = (b.clone(), last.clone());
    let task = tokio::spawn(async move {
        let mut seen = (0, 0);
        loop {
            let st = b.stats();
            let now = (st.bytes_in, st.bytes_out);
            if now != seen {
                seen = now;
                l.store(
                    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (last, task, origin)
}

/// A builder frozen (SIGSTOP: sshd and Nix) in the middle of a 40 MiB transfer over a
/// 40 Mbit/s link: the operation fails about `IDLE` after the last byte moved.
async fn frozen_builder_fails_within_the_idle_timeout(protocol: Protocol, push: bool) {
    let s = setup(protocol, Link::new(2.0, 40.0), |c| {
        c.session.idle_timeout = IDLE
    })
    .await;
    let size = 40 * MIB;
    let path: StorePath = if push {
        random_path(s.rig.client_store(), "frozen-push", size, 21)
    } else {
        random_path(s.rig.builder(0).store(), "frozen-fetch", size, 22)
    };
    let (last_progress, watcher, origin) = watch_progress(&s.builder);
    let op = {
        let (b, local, p) = (s.builder.clone(), local_store(&s.rig), path.clone());
        tokio::spawn(async move {
            let paths = BTreeSet::from([p]);
            let r = if push {
                b.push_closure(&local, &paths, false, None).await
            } else {
                b.fetch_outputs(&local, &paths, None).await
            };
            (r, Instant::now())
        })
    };
    // Let a few MiB go through, then freeze the builder.
    let moving = wait_until(Duration::from_secs(30), || {
        let st = s.builder.stats();
        st.bytes_in + st.bytes_out > 4 * MIB as u64
    })
    .await;
    assert!(moving.is_some(), "the transfer started");
    let rig = s.rig.clone();
    blocking(move || rig.builder(0).freeze().expect("freeze")).await;
    let (r, failed_at) = tokio::time::timeout(Duration::from_secs(60), op)
        .await
        .expect("the operation ends on its own")
        .expect("join");
    watcher.abort();
    let e = match r {
        Ok(rep) => panic!("a transfer to a frozen builder succeeded: {rep:?}"),
        Err(e) => e,
    };
    let silent = failed_at.saturating_duration_since(
        origin + Duration::from_millis(last_progress.load(Ordering::Relaxed)),
    );
    eprintln!("failed {silent:?} after the last byte moved: {e}");
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert!(silent >= IDLE - Duration::from_millis(100), "{silent:?}");
    assert!(silent <= IDLE + Duration::from_millis(1500), "{silent:?}");

    // With the builder back, the same transfer goes through and nothing leaked.
    let rig = s.rig.clone();
    blocking(move || rig.builder(0).thaw().expect("thaw")).await;
    let paths = BTreeSet::from([path.clone()]);
    let again = if push {
        s.builder.push_closure(&s.local, &paths, false, None).await
    } else {
        s.builder.fetch_outputs(&s.local, &paths, None).await
    };
    again.expect("the retry succeeds");
    s.builder.close_idle();
    let settled = wait_until(Duration::from_secs(20), || {
        s.builder.health().channels_open == 0
            && matching_processes(&s.rig, 0, &["nix-daemon --stdio", "nix-store --serve"])
                .is_empty()
    })
    .await;
    assert!(
        settled.is_some(),
        "channels {} and remote processes {:?} left",
        s.builder.health().channels_open,
        matching_processes(&s.rig, 0, &["nix-daemon --stdio", "nix-store --serve"])
    );
    s.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_builder_fails_a_push_within_the_idle_timeout_over_ssh() {
    frozen_builder_fails_within_the_idle_timeout(Protocol::Serve, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_builder_fails_a_push_within_the_idle_timeout_over_ssh_ng() {
    frozen_builder_fails_within_the_idle_timeout(Protocol::Worker, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_builder_fails_a_fetch_within_the_idle_timeout_over_ssh() {
    frozen_builder_fails_within_the_idle_timeout(Protocol::Serve, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_builder_fails_a_fetch_within_the_idle_timeout_over_ssh_ng() {
    frozen_builder_fails_within_the_idle_timeout(Protocol::Worker, false).await;
}

/// The case users hit: 150 MiB over 16 Mbit/s (about 80 s each way) with default settings,
/// pushed and then fetched back into a fresh client store.
async fn large_path_over_a_slow_link(protocol: Protocol) {
    let mut s = setup(protocol, Link::new(20.0, 16.0), |_| {}).await;
    let size = 150 * MIB;
    // A path of its own per protocol: the two tests run at once, and Nix's garbage collector
    // counts a path open by any process on the machine (the other test's, in its own mount
    // namespace, sees the same `/nix/store/...` name) as alive, which would fail the delete.
    let (name, seed) = match protocol {
        Protocol::Serve => ("big-serve", 31),
        Protocol::Worker => ("big-worker", 32),
    };
    let p = random_path(s.rig.client_store(), name, size, seed);
    let paths = BTreeSet::from([p.clone()]);
    let (r, took) = timed(s.builder.push_closure(&s.local, &paths, false, None)).await;
    let rep = r.unwrap_or_else(|e| panic!("push failed after {took:?}: {e}"));
    eprintln!("pushed {} bytes in {took:?}", rep.bytes);
    assert!(s.rig.builder(0).store().is_valid(&abs(&p)).expect("query"));

    // Fetch it back into the client store, from which it is deleted first. The local
    // `nix-daemon --stdio` that read it may hold a temporary GC root on it until it has
    // exited: a fresh local store session, and a few tries.
    s.local = local_store(&s.rig);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = s
        .rig
        .client_store()
        .run("nix-store", ["--delete", &abs(&p)])
    {
        assert!(Instant::now() < deadline, "delete locally: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (r, took) = timed(s.builder.fetch_outputs(&s.local, &paths, None)).await;
    let rep = r.unwrap_or_else(|e| panic!("fetch failed after {took:?}: {e}"));
    eprintln!("fetched {} bytes in {took:?}", rep.bytes);
    assert!(s.rig.client_store().is_valid(&abs(&p)).expect("query"));
    s.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_path_over_a_16_mbit_link_over_ssh() {
    large_path_over_a_slow_link(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_path_over_a_16_mbit_link_over_ssh_ng() {
    large_path_over_a_slow_link(Protocol::Worker).await;
}

/// The overall deadline (off by default) is the one bound that does cut a transfer still
/// moving: set to 2 s, a 12 s push fails at 2 s, as the caller's error (TimedOut, caller),
/// and the builder is left with nothing half-imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_deadline_cuts_even_a_moving_transfer() {
    let s = setup(Protocol::Worker, Link::new(20.0, 8.0), |c| {
        c.operation_deadline = Some(Duration::from_secs(2));
    })
    .await;
    let p = random_path(s.rig.client_store(), "deadline", 12 * MIB, 51);
    let (r, took) =
        timed(
            s.builder
                .push_closure(&s.local, &BTreeSet::from([p.clone()]), false, None),
        )
        .await;
    let e = r.expect_err("the deadline ends it");
    eprintln!("after {took:?}: {e}");
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    assert_eq!(e.initiator(), nixmux::Initiator::Caller);
    assert!(e.message().contains("deadline"), "{e}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let valid = wait_until(Duration::from_secs(10), || {
        matching_processes(&s.rig, 0, &["nix-daemon --stdio"]).is_empty()
    })
    .await;
    assert!(valid.is_some(), "the remote import stopped");
    assert!(!s.rig.builder(0).store().is_valid(&abs(&p)).expect("query"));
    s.pool.shutdown().await;
}
