//! Build slots: a builder with `max_jobs` 2 never runs more than two of nixmux's builds at
//! once (its process list and nixmux's own count agree), and the rest queue without failing,
//! against a real OpenSSH + Nix 2.8 builder.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{config, instantiate, local_store, matching_processes, rig, shell_drv};
use nixmux::ops::BuildOptions;
use nixmux::proto::build_result::BuildStatus;
use nixmux::{Pool, Protocol, log_channel};
use nixmux_rig::RigConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_never_exceed_max_jobs() {
    const BUILDS: usize = 5;
    let rig = rig(RigConfig::with_builders(1));
    let local = Arc::new(local_store(&rig));
    let mut cfg = config(&rig, 0, Protocol::Worker);
    cfg.machine.max_jobs = 2;
    let pool = Pool::new();
    let b = pool.add(cfg);
    let drvs: Vec<_> = (0..BUILDS)
        .map(|i| {
            instantiate(
                rig.client_store(),
                &shell_drv(&format!("slot-{i}"), "sleep 1.5; echo done > $out"),
            )
        })
        .collect();

    // Watch the builder and nixmux while the builds run.
    let done = Arc::new(AtomicBool::new(false));
    let most_on_builder = Arc::new(AtomicUsize::new(0));
    let most_running = Arc::new(AtomicUsize::new(0));
    let most_waiting = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (rig, b, done) = (rig.clone(), b.clone(), done.clone());
        let (on_builder, running, waiting) = (
            most_on_builder.clone(),
            most_running.clone(),
            most_waiting.clone(),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let r = rig.clone();
                let sleeping = tokio::task::spawn_blocking(move || {
                    // The `sleep` itself, not the builder shell whose command line names it.
                    matching_processes(&r, 0, &["sleep 1.5"])
                        .iter()
                        .filter(|c| c.trim_start().starts_with("sleep"))
                        .count()
                })
                .await
                .unwrap_or(0);
                on_builder.fetch_max(sleeping, Ordering::Relaxed);
                let st = b.stats();
                running.fetch_max(
                    usize::try_from(st.builds_running).unwrap_or(usize::MAX),
                    Ordering::Relaxed,
                );
                waiting.fetch_max(
                    usize::try_from(st.builds_waiting).unwrap_or(usize::MAX),
                    Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let mut builds = tokio::task::JoinSet::new();
    for drv in drvs {
        let (b, local) = (b.clone(), local.clone());
        builds.spawn(async move {
            let (logs, _stream) = log_channel(100);
            b.build(&local, &drv, &BuildOptions::default(), &logs).await
        });
    }
    while let Some(r) = builds.join_next().await {
        let outcome = r.expect("task").expect("build");
        assert_eq!(
            outcome.result.status,
            BuildStatus::Built,
            "{:?}",
            outcome.result
        );
    }
    done.store(true, Ordering::Relaxed);
    watcher.await.expect("watcher");

    let (on_builder, running, waiting) = (
        most_on_builder.load(Ordering::Relaxed),
        most_running.load(Ordering::Relaxed),
        most_waiting.load(Ordering::Relaxed),
    );
    assert!(
        on_builder <= 2,
        "{on_builder} builds at once on the builder"
    );
    assert!(on_builder >= 1, "the watcher never saw a build");
    assert!(running <= 2, "{running} builds running at once");
    assert!(waiting >= 1, "no build ever waited for a slot");
    let st = b.stats();
    assert_eq!(
        (st.builds_running, st.builds_waiting, st.build_slots),
        (0, 0, 2)
    );
    pool.shutdown().await;
}

/// A build that gives up while it waits for a slot (its future dropped: a deadline, a
/// cancelled job) leaves the builder's load as it was: `Pool::select` reads waiting builds as
/// load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_a_slot_given_up_leaves_no_load_behind() {
    let rig = rig(RigConfig::with_builders(1));
    let mut cfg = config(&rig, 0, Protocol::Worker);
    cfg.machine.max_jobs = 1;
    let pool = Pool::new();
    let b = pool.add(cfg);
    let held = b.build_slot().await.expect("the only slot");
    let gave_up = tokio::time::timeout(Duration::from_millis(100), b.build_slot()).await;
    assert!(
        gave_up.is_err(),
        "the slot is taken: the second caller waits"
    );
    let st = b.stats();
    assert_eq!((st.builds_running, st.builds_waiting), (1, 0), "{st:?}");
    drop(held);
    let st = b.stats();
    assert_eq!((st.builds_running, st.builds_waiting), (0, 0), "{st:?}");
    pool.shutdown().await;
}
