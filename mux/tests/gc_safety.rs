//! A builder that garbage-collects continuously while a scheduler pushes inputs, builds and
//! fetches outputs through a [`nixmux::Lease`]: the lease's temporary roots keep what the job
//! needs alive (serve `QueryValidPaths` with `lock`, worker `AddTempRoot`, and the roots the
//! builder's Nix takes for what it adds and builds), over both protocols, against a real
//! OpenSSH + Nix 2.8 builder.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{config, local_store, rig, sp};
use nixmux::ops::BuildOptions;
use nixmux::proto::build_result::BuildStatus;
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::{Pool, Protocol, log_channel};
use nixmux_rig::{PrivateStore, RigConfig};

/// A chain of `n` derivations, each reading the one before and a source file of its own;
/// returns the `.drv` paths, dependencies first.
fn chain(store: &PrivateStore, tag: &str, n: usize) -> Vec<StorePath> {
    let mut expr = String::from("let\n");
    for i in 0..n {
        let prev = if i == 0 {
            String::new()
        } else {
            format!("cat ${{d{}}} >> $out; ", i - 1)
        };
        expr.push_str(&format!(
            "  src{i} = builtins.toFile \"gc-{tag}-src{i}\" \"source {i} of {tag}\";\n  d{i} = derivation {{ name = \"gc-{tag}-{i}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [\"-c\" \"PATH=/usr/bin:/bin; {prev}cat ${{src{i}}} >> $out; head -c 300000 /dev/urandom >> $out\"]; }};\n"
        ));
    }
    expr.push_str(&format!("in d{}\n", n - 1));
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("chain.nix");
    std::fs::write(&f, expr).expect("write");
    let out = store
        .run("nix-instantiate", [f.to_str().expect("utf8")])
        .expect("instantiate");
    let top = sp(&String::from_utf8_lossy(&out.stdout));
    let q = store
        .run("nix-store", ["-qR", &top.to_absolute(&StoreDir::default())])
        .expect("closure");
    // `nix-store -qR` prints dependencies first.
    String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(sp)
        .filter(StorePath::is_derivation)
        .collect()
}

async fn builds_under_gc(protocol: Protocol) {
    let rig = rig(RigConfig::with_builders(1));
    let local = local_store(&rig);
    let tag = protocol.scheme().replace('-', "");
    let drvs = chain(rig.client_store(), &tag, 5);

    // The builder collects garbage non-stop until the job is done.
    let stop = Arc::new(AtomicBool::new(false));
    let collections = Arc::new(AtomicUsize::new(0));
    let gc = {
        let (rig, stop, collections) = (rig.clone(), stop.clone(), collections.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                rig.builder(0)
                    .store()
                    .run("nix-store", ["--gc"])
                    .expect("nix-store --gc on the builder");
                collections.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let pool = Pool::new();
    let b = pool.add(config(&rig, 0, protocol));
    let mut lease = b.lease().await.expect("lease");
    for drv in &drvs {
        let (logs, _stream) = log_channel(100);
        let built = lease
            .build(&local, drv, &BuildOptions::default(), &logs, None)
            .await
            .unwrap_or_else(|e| panic!("building {drv} while the builder collects garbage: {e}"));
        assert_eq!(
            built.result.status,
            BuildStatus::Built,
            "{drv}: {:?}",
            built.result
        );
        let outs: BTreeSet<StorePath> = built
            .result
            .built_outputs
            .values()
            .map(|o| o.path.clone())
            .collect();
        // Let the collector run between the build and the fetch.
        let seen = collections.load(Ordering::Relaxed);
        while collections.load(Ordering::Relaxed) < seen + 1 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        lease
            .fetch_outputs(&local, &outs, None)
            .await
            .unwrap_or_else(|e| panic!("fetching {outs:?} after a collection: {e}"));
        for o in &outs {
            rig.client_store()
                .run(
                    "nix-store",
                    ["--verify-path", &o.to_absolute(&StoreDir::default())],
                )
                .expect("fetched output verifies");
        }
    }
    drop(lease);
    stop.store(true, Ordering::Relaxed);
    gc.join().expect("gc thread");
    assert!(collections.load(Ordering::Relaxed) >= drvs.len());
    // Once the lease is gone, nothing protects the job's paths on the builder any more.
    rig.builder(0)
        .store()
        .run("nix-store", ["--gc"])
        .expect("final collection");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_keeps_inputs_and_outputs_alive_while_the_builder_collects_garbage_over_ssh() {
    builds_under_gc(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_keeps_inputs_and_outputs_alive_while_the_builder_collects_garbage_over_ssh_ng() {
    builds_under_gc(Protocol::Worker).await;
}

/// The mechanism itself, deterministically: a path the lease found present survives a
/// collection while the lease lives, and goes with the next collection once its session has
/// ended.
async fn protection_lasts_as_long_as_the_session(protocol: Protocol) {
    let rig = rig(RigConfig::with_builders(1));
    let local = local_store(&rig);
    let path = common::random_path(rig.client_store(), "gc-protected", 64 << 10, 11);
    let paths: BTreeSet<StorePath> = [path.clone()].into();
    let abs = path.to_absolute(&StoreDir::default());
    let valid_on_builder = || {
        rig.builder(0)
            .store()
            .is_valid(&abs)
            .expect("query builder")
    };

    // Put it there with a pool of its own, then end that pool's sessions: nothing roots it.
    {
        let pool = Pool::new();
        let b = pool.add(config(&rig, 0, protocol));
        b.push_closure(&local, &paths, false, None)
            .await
            .expect("push");
        pool.shutdown().await;
    }
    assert!(valid_on_builder());

    let pool = Pool::new();
    let b = pool.add(config(&rig, 0, protocol));
    let mut lease = b.lease().await.expect("lease");
    assert_eq!(
        lease.query_valid_paths(&paths, false).await.expect("query"),
        paths
    );
    rig.builder(0)
        .store()
        .run("nix-store", ["--gc"])
        .expect("collect");
    assert!(valid_on_builder(), "collected while the lease held it");

    // The lease ends and its session with it (closed, not kept idle).
    drop(lease);
    pool.shutdown().await;
    let mut gone = false;
    for _ in 0..50 {
        rig.builder(0)
            .store()
            .run("nix-store", ["--gc"])
            .expect("collect");
        if !valid_on_builder() {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(gone, "still protected after the lease's session ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protection_lasts_as_long_as_the_lease_over_ssh() {
    protection_lasts_as_long_as_the_session(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protection_lasts_as_long_as_the_lease_over_ssh_ng() {
    protection_lasts_as_long_as_the_session(Protocol::Worker).await;
}
