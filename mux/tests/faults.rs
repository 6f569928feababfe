//! Faults against real OpenSSH + Nix 2.8 builders from the rig: cancelled builds, killed and
//! frozen builders, a log consumer that stops reading.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixmux::ops::{BuildOptions, BuildOutcome};
use nixmux::{
    Builder, ErrorKind, HealthState, LogSender, Pool, PoolSettings, Protocol, log_channel,
};
use nixmux_rig::{Rig, RigConfig};
use tokio::task::JoinHandle;

use common::*;

/// Keepalive used where a test needs a dead peer noticed quickly: 1 s x 2 misses, so a
/// frozen builder is detected within 1 s x (2 + 1) = 3 s.
const KEEPALIVE: Duration = Duration::from_secs(1);
const MISSES: usize = 2;
/// What scheduling on this shared 2-core machine may add to a detection time.
const SLACK: Duration = Duration::from_millis(1500);

/// interval x (max misses + 1): the longest a dead peer may go unnoticed.
fn keepalive_bound() -> Duration {
    KEEPALIVE * (u32::try_from(MISSES).expect("small") + 1)
}

fn short_keepalive(cfg: &mut nixmux::BuilderConfig) {
    cfg.target.transport.keepalive_interval = Some(KEEPALIVE);
    cfg.target.transport.keepalive_max_misses = MISSES;
}

/// Starts a build of a derivation running `body` (which must contain `marker`, a string no
/// other process of the builder has in its command line) in a task, and returns once the
/// builder runs it.
async fn start_build(
    rig: &Arc<Rig>,
    b: &Builder,
    marker: &str,
    body: &str,
    logs: LogSender,
) -> JoinHandle<nixmux::Result<BuildOutcome>> {
    let drv = instantiate(rig.client_store(), &shell_drv("long", body));
    let task = {
        let b = b.clone();
        let local = local_store(rig);
        tokio::spawn(async move { b.build(&local, &drv, &BuildOptions::default(), &logs).await })
    };
    let up = wait_until(Duration::from_secs(30), || {
        task.is_finished() || !matching_processes(rig, 0, &[marker]).is_empty()
    })
    .await;
    assert!(
        !task.is_finished(),
        "the build ended early: {:?}",
        task.await
    );
    assert!(
        up.is_some(),
        "the build never started: {:#?}",
        rig.builder(0).processes()
    );
    task
}

/// A build that sleeps until cancelled.
async fn start_sleeper(
    rig: &Arc<Rig>,
    b: &Builder,
    marker: &str,
) -> JoinHandle<nixmux::Result<BuildOutcome>> {
    let body = format!("echo started; {marker}; echo > $out");
    start_build(rig, b, marker, &body, LogSender::discard()).await
}

/// Dropping a build's future mid-build: the remote Nix process (`nix-store --serve` or
/// `nix-daemon --stdio`) and the build it runs (`sh`, `sleep`) are gone within 1 s, and with
/// a pool of one session a new operation starts at once (the slot is free again).
async fn drop_mid_build(protocol: Protocol) {
    let rig = rig(RigConfig::with_builders(1));
    let pool = Pool::new();
    let mut cfg = config(&rig, 0, protocol);
    cfg.pool = PoolSettings {
        max_sessions: 1,
        acquire_timeout: Duration::from_secs(20),
        ..PoolSettings::default()
    };
    let b = pool.add(cfg);
    let marker = format!("sleep 7{}", protocol as u8);
    let nix = match protocol {
        Protocol::Serve => "nix-store --serve",
        Protocol::Worker => "nix-daemon --stdio",
    };
    let task = start_sleeper(&rig, &b, &marker).await;
    let before = matching_processes(&rig, 0, &[nix, &marker]);
    assert!(before.iter().any(|c| c.contains(nix)), "{before:#?}");
    assert!(before.iter().any(|c| c.contains(&marker)), "{before:#?}");

    task.abort();
    let t = Instant::now();
    let joined = task.await;
    assert!(joined.is_err_and(|e| e.is_cancelled()));
    let gone = wait_until(Duration::from_secs(10), || {
        matching_processes(&rig, 0, &[nix, &marker]).is_empty()
    })
    .await;
    let left = matching_processes(&rig, 0, &[nix, &marker]);
    eprintln!("{protocol:?}: remote processes gone {gone:?} after the drop (before: {before:?})");
    let gone = gone.unwrap_or_else(|| panic!("still running after 10 s: {left:#?}"));
    assert!(gone <= Duration::from_secs(1), "took {gone:?}");

    // The only session slot is free: the next operation does not wait for anything.
    let t2 = Instant::now();
    let info = tokio::time::timeout(Duration::from_secs(10), b.remote_info())
        .await
        .expect("the slot is free again")
        .expect("next operation");
    assert_eq!(info.protocol, protocol);
    eprintln!(
        "{protocol:?}: next operation took {:?} ({:?} after the drop)",
        t2.elapsed(),
        t.elapsed()
    );
    let st = b.stats();
    assert_eq!(st.sessions_discarded, 1, "{st:?}");
    assert_eq!(st.acquire_timeouts, 0, "{st:?}");
    assert_eq!(st.connections_opened, 1, "{st:?}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_build_stops_remote_process_over_ssh() {
    drop_mid_build(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_build_stops_remote_process_over_ssh_ng() {
    drop_mid_build(Protocol::Worker).await;
}

/// Killing the builder's sshd (listener and sessions) during a build: the build fails at
/// once with a retryable Disconnected error and health says Down with the cause. Once sshd
/// is back, the next operation reconnects by itself. Backoff: the first attempt after the
/// connection died goes out at once; after it failed, the next operation fails fast without
/// an attempt until the backoff has passed.
async fn kill_sshd_mid_build(protocol: Protocol) {
    let rig = rig(RigConfig::with_builders(1));
    let pool = Pool::new();
    let mut cfg = config(&rig, 0, protocol);
    short_keepalive(&mut cfg);
    let backoff = Duration::from_millis(400);
    cfg.connections.initial_backoff = backoff;
    let b = pool.add(cfg);
    let marker = format!("sleep 8{}", protocol as u8);
    let task = start_sleeper(&rig, &b, &marker).await;

    let r = rig.clone();
    blocking(move || r.builder(0).stop_sshd().expect("stop sshd")).await;
    let t = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the build fails within the keepalive bound")
        .expect("join")
        .expect_err("the build cannot succeed");
    let took = t.elapsed();
    eprintln!("{protocol:?}: failed {took:?} after sshd was killed: {err}");
    assert!(took <= keepalive_bound() + SLACK, "{took:?}");
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        matches!(err.kind(), ErrorKind::Disconnected | ErrorKind::Connect),
        "{err:?}"
    );
    let h = b.health();
    assert_eq!(h.state, HealthState::Down, "{h:?}");
    assert!(
        h.last_error.as_deref().is_some_and(|e| e.contains("lost")),
        "{h:?}"
    );
    assert_eq!(b.stats().connections_lost, 1);

    // Back up: the next operation reconnects by itself.
    let r = rig.clone();
    blocking(move || r.builder(0).start_sshd().expect("start sshd")).await;
    let info = b.remote_info().await.expect("reconnects by itself");
    assert_eq!(info.protocol, protocol);
    let st = b.stats();
    assert_eq!(st.connections_opened, 2, "{st:?}");
    assert_eq!(st.connect_failures, 0, "{st:?}");
    assert_eq!(b.health().state, HealthState::Up);

    // Down again, with nothing running: the first attempt is immediate (a TCP refusal, not
    // a backoff), the next operation fails fast without an attempt, and after the backoff
    // the next one tries again.
    let r = rig.clone();
    blocking(move || r.builder(0).stop_sshd().expect("stop sshd")).await;
    let e1 = b.remote_info().await.expect_err("sshd is down");
    assert_eq!(e1.kind(), ErrorKind::Connect, "{e1:?}");
    assert!(e1.is_retryable());
    assert!(!e1.message().contains("not reconnecting yet"), "{e1}");
    assert_eq!(b.stats().connect_failures, 1);
    let t = Instant::now();
    let e2 = b.remote_info().await.expect_err("backing off");
    assert!(e2.message().contains("not reconnecting yet"), "{e2}");
    assert!(e2.is_retryable());
    assert!(t.elapsed() < backoff, "fails fast: {:?}", t.elapsed());
    assert_eq!(
        b.stats().connect_failures,
        1,
        "no attempt during the backoff"
    );
    tokio::time::sleep(backoff).await;
    let e3 = b.remote_info().await.expect_err("still down");
    assert!(!e3.message().contains("not reconnecting yet"), "{e3}");
    assert_eq!(b.stats().connect_failures, 2);
    let h = b.health();
    assert_eq!(h.state, HealthState::Down, "{h:?}");
    assert!(h.last_error.is_some(), "{h:?}");

    // The second backoff is twice the first; after it, the restarted builder is used again.
    let r = rig.clone();
    blocking(move || r.builder(0).start_sshd().expect("start sshd")).await;
    tokio::time::sleep(backoff * 2).await;
    b.remote_info().await.expect("reconnects after the backoff");
    assert_eq!(b.stats().connections_opened, 3);
    assert_eq!(b.health().state, HealthState::Up);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sshd_fails_retryably_and_reconnects_over_ssh() {
    kill_sshd_mid_build(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sshd_fails_retryably_and_reconnects_over_ssh_ng() {
    kill_sshd_mid_build(Protocol::Worker).await;
}

/// Freezing the builder (SIGSTOP to all its processes) during a build: keepalive notices
/// within interval x (max misses + 1), the build fails with a retryable error naming the
/// cause, the session is discarded, and health is Down with that cause. After thawing, the
/// next operation reconnects.
async fn freeze_mid_build(protocol: Protocol) {
    let rig = rig(RigConfig::with_builders(1));
    let pool = Pool::new();
    let mut cfg = config(&rig, 0, protocol);
    short_keepalive(&mut cfg);
    let b = pool.add(cfg);
    let marker = format!("sleep 9{}", protocol as u8);
    let task = start_sleeper(&rig, &b, &marker).await;

    let r = rig.clone();
    blocking(move || r.builder(0).freeze().expect("freeze")).await;
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(20), task).await;
    let took = t.elapsed();
    // The connection's watcher records the loss on its own task: the operation's error can
    // reach us a moment before it, on a loaded machine.
    wait_until(Duration::from_secs(2), || {
        b.health().state == HealthState::Down
    })
    .await;
    let health = b.health();
    let r = rig.clone();
    blocking(move || r.builder(0).thaw().expect("thaw")).await;

    let err = res
        .expect("keepalive ends the build")
        .expect("join")
        .expect_err("the build cannot succeed");
    eprintln!("{protocol:?}: frozen builder detected after {took:?}: {err}");
    let bound = keepalive_bound();
    assert!(took <= bound + SLACK, "{took:?} > {bound:?}");
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err:?}");
    assert!(err.message().contains("keepalive"), "{err}");
    assert_eq!(health.state, HealthState::Down, "{health:?}");
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("keepalive")),
        "{health:?}"
    );
    assert!(health.down_since.is_some());
    let st = b.stats();
    assert_eq!(st.sessions_discarded, 1, "{st:?}");
    assert_eq!(st.idle_sessions, 0, "{st:?}");

    b.remote_info().await.expect("reconnects after the thaw");
    let st = b.stats();
    assert_eq!(st.connections_opened, 2, "{st:?}");
    assert_eq!(b.health().state, HealthState::Up);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_builder_detected_by_keepalive_over_ssh() {
    freeze_mid_build(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_builder_detected_by_keepalive_over_ssh_ng() {
    freeze_mid_build(Protocol::Worker).await;
}

/// Size of the path fetched by the head-of-line test.
const HOL_MIB: usize = 256;

/// Head-of-line blocking: a build prints log lines non-stop into a log channel nobody
/// reads while another session on the same connection fetches a large NAR. The fetch must
/// complete and the log events must be dropped and counted, not waited for. The timings
/// (median of `NIXMUX_HOL_RUNS` rounds, default 1; a round is the fetch alone, then beside
/// the chatty build with its log unread, and when measuring (more than one round) also
/// beside it with its log read, as a control) are printed for docs/benchmarks.md, not
/// asserted.
async fn head_of_line(protocol: Protocol) {
    let runs: usize = std::env::var("NIXMUX_HOL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let rig = rig(RigConfig::with_builders(1));
    let pool = Pool::new();
    let b = pool.add(config(&rig, 0, protocol));

    // A path on the builder only: random data, so nothing compresses it away.
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("hol-payload");
    let r = rig.clone();
    let f = file.clone();
    let path = blocking(move || {
        let status = std::process::Command::new("head")
            .args(["-c", &format!("{}", HOL_MIB << 20), "/dev/urandom"])
            .stdout(std::fs::File::create(&f).expect("create payload"))
            .status()
            .expect("head");
        assert!(status.success());
        r.builder(0).store().add(&f).expect("nix-store --add")
    })
    .await;
    drop(tmp);
    let path = sp(&path);
    let paths: BTreeSet<_> = [path.clone()].into();

    let fetch = |label: &'static str| {
        let b = b.clone();
        let paths = paths.clone();
        let rig = rig.clone();
        let abs = path.to_absolute(&nixmux::proto::store_path::StoreDir::default());
        async move {
            let local = local_store(&rig);
            let t = Instant::now();
            let report = tokio::time::timeout(
                Duration::from_secs(300),
                b.fetch_outputs(&local, &paths, None),
            )
            .await
            .unwrap_or_else(|_| panic!("{label}: the fetch stalled"))
            .unwrap_or_else(|e| panic!("{label}: {e}"));
            let took = t.elapsed();
            assert_eq!(report.transferred.len(), 1, "{label}: {report:?}");
            // Fetch it again next time. The local `nix-daemon --stdio` that added it holds a
            // temporary GC root on it until it has exited.
            drop(local);
            blocking(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match rig.client_store().run("nix-store", ["--delete", &abs]) {
                        Ok(_) => break,
                        Err(e) if Instant::now() >= deadline => {
                            panic!("delete the fetched path: {e}")
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
            .await;
            took
        }
    };

    let marker = format!("chatty-{}", protocol as u8);
    // About 10 000 lines of 60 bytes a second: far more events than a 16-event queue
    // holds, without taking much CPU on this 2-core machine (which would slow the transfer
    // for reasons other than head-of-line blocking).
    let body = format!(
        "while :; do yes {marker}-line-of-build-log-output-padding-padding-padding | head -n 500; sleep 0.05; done"
    );
    if runs > 1 {
        // Warm-up for measurements (first-use costs of the stores, page cache), not counted.
        fetch("warm-up").await;
    }
    let mut plain = Vec::new();
    let mut read = Vec::new();
    let mut unread = Vec::new();
    let mut dropped = 0;
    for _ in 0..runs {
        plain.push(fetch("alone").await);

        // Control, when measuring: the same chatty build with a consumer that keeps up.
        // What it costs the fetch is the log traffic itself (CPU on both ends, sshd's
        // single process per connection), not blocking.
        if runs > 1 {
            let (logs, mut stream) = log_channel(16);
            let reader = tokio::spawn(async move {
                let mut n = 0u64;
                while stream.recv().await.is_some() {
                    n += 1;
                }
                n
            });
            let build = start_build(&rig, &b, &marker, &body, logs).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            read.push(fetch("beside the chatty build, log read").await);
            build.abort();
            let _ = build.await;
            let events = tokio::time::timeout(Duration::from_secs(10), reader)
                .await
                .expect("the log ends with the build")
                .expect("join");
            assert!(events > 0);
        }

        // The case under test: nobody reads the log.
        let (logs, stream) = log_channel(16);
        let build = start_build(&rig, &b, &marker, &body, logs).await;
        // Let the unread queue fill first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        unread.push(fetch("beside the chatty build, log unread").await);
        dropped = stream.dropped();
        build.abort();
        let _ = build.await;
        assert!(dropped > 0, "the unread log dropped nothing");
        drop(stream);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (p, u) = (median(&mut plain), median(&mut unread));
    let mib_s = |d: Duration| HOL_MIB as f64 / d.as_secs_f64();
    let pct = |a: Duration, b: Duration| (a.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0;
    eprintln!(
        "HOL {protocol:?}: {HOL_MIB} MiB fetch, median of {runs}: alone {p:.2?} ({:.0} MiB/s); beside a chatty build with its log unread {u:.2?} ({:.0} MiB/s, {:+.1}%). Last run dropped {dropped} log events. Alone {plain:.2?}; unread {unread:.2?}",
        mib_s(p),
        mib_s(u),
        pct(u, p),
    );
    if !read.is_empty() {
        let r = median(&mut read);
        eprintln!(
            "HOL {protocol:?}: beside the chatty build with its log read {r:.2?} ({:.0} MiB/s, {:+.1}% vs alone); unread vs read {:+.1}%. Read {read:.2?}",
            mib_s(r),
            pct(r, p),
            pct(u, r),
        );
    }
    // Same connection throughout.
    let st = b.stats();
    assert_eq!(st.connections_opened, 1, "{st:?}");
    assert_eq!(rig.builder(0).accepted_connections(), 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_build_log_does_not_block_a_parallel_fetch_over_ssh() {
    head_of_line(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_build_log_does_not_block_a_parallel_fetch_over_ssh_ng() {
    head_of_line(Protocol::Worker).await;
}

/// Flips one byte of the file that is store path `p` in `store` (its NAR no longer matches
/// the store's record; its size does).
fn corrupt_file(store: &nixmux_rig::PrivateStore, p: &nixmux::proto::store_path::StorePath) {
    use std::os::unix::fs::PermissionsExt;
    let file = store.store_dir().join(p.to_string());
    let mut bytes = std::fs::read(&file).expect("read the stored file");
    bytes[100] ^= 0xff;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::write(&file, &bytes).expect("corrupt it");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).expect("chmod");
}

/// A builder whose store was corrupted on disk sends NARs that do not match its records.
/// Fetches do not hash them here: the local store hashes each one before registering it.
/// Both routes into it (a built output as `AddToStoreNar`, a plain source by content) must
/// fail the fetch as the builder's verification error, register nothing under the fetched
/// path, and leave the pool usable.
async fn corrupted_builder_store(protocol: Protocol) {
    let rig = rig(RigConfig::with_builders(1));
    let local = local_store(&rig);
    let pool = Pool::new();
    let b = pool.add(config(&rig, 0, protocol));
    let builder = rig.builder(0).store();
    let source = random_path(builder, "corrupt-source", 300_000, 17);
    let drv = instantiate(
        builder,
        &format!(
            r#"derivation {{ name = "corrupt-output-{}"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "/usr/bin/head -c 300000 /dev/urandom > $out"]; }}"#,
            protocol.scheme()
        ),
    );
    let out = builder
        .run("nix-store", ["--realise", &abs(&drv)])
        .expect("build on the builder");
    let output = sp(String::from_utf8_lossy(&out.stdout).trim());
    for p in [&source, &output] {
        corrupt_file(builder, p);
        let err = b
            .fetch_outputs(&local, &[p.clone()].into(), None)
            .await
            .expect_err("a NAR that does not match its record");
        assert_eq!(
            err.kind(),
            ErrorKind::Verification,
            "{protocol:?} {p}: {err}"
        );
        assert_eq!(
            err.initiator(),
            nixmux::Initiator::Builder,
            "{protocol:?} {p}: {err}"
        );
        assert!(
            err.to_string()
                .contains("does not match the builder's metadata"),
            "{protocol:?} {p}: {err}"
        );
        assert!(!is_valid(rig.client_store(), p), "{p} is not valid locally");
    }
    // The same builder still serves what is intact.
    let intact = random_path(builder, "intact-source", 300_000, 18);
    b.fetch_outputs(&local, &[intact.clone()].into(), None)
        .await
        .expect("an intact path");
    assert!(is_valid(rig.client_store(), &intact));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_builder_store_fails_fetches_as_the_builders_fault_over_ssh() {
    corrupted_builder_store(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_builder_store_fails_fetches_as_the_builders_fault_over_ssh_ng() {
    corrupted_builder_store(Protocol::Worker).await;
}
