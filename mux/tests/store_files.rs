//! Pushes that read NARs straight from the local store's files (`LocalStore::with_store_files`)
//! against real OpenSSH + Nix 2.8 builders: a tree with every kind of node arrives as Nix
//! serialises it (the builder's Nix checks every NAR's hash before registering it), over both
//! protocols; files that are not the daemon's fail the push with a local verification error,
//! register nothing, and the daemon serves every push after it; a path missing from the files
//! is served by the daemon.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{
    closure, is_valid, local_store, local_store_via_daemon, nar_hash, random_path, rig, sp,
};
use nixmux::proto::store_path::StorePath;
use nixmux::{ErrorKind, Initiator, Pool, Protocol};
use nixmux_rig::{PrivateStore, RigConfig};

/// Builds, in `store`, a directory with an executable, a symlink, an empty file, a nested
/// directory and a 3 MiB file of random bytes, and a second path referring to it.
fn build_tree(store: &PrivateStore) -> StorePath {
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("tree.nix");
    std::fs::write(
        &f,
        r#"let tree = derivation { name = "files-tree"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "PATH=/usr/bin:/bin; mkdir -p $out/bin $out/share/deeper; printf '#!/bin/sh\necho hi\n' > $out/bin/hi; chmod +x $out/bin/hi; ln -s bin/hi $out/link; : > $out/share/empty; head -c 3145739 /dev/urandom > $out/share/deeper/data; echo B > $out/B"]; };
in derivation { name = "files-top"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo ${tree} > $out"]; }"#,
    )
    .expect("write expression");
    let out = store
        .run(
            "nix-build",
            ["--no-out-link", f.to_str().expect("utf8 path")],
        )
        .expect("nix-build");
    sp(String::from_utf8_lossy(&out.stdout).trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_read_nars_from_the_store_files_over_both_protocols() {
    let rig = rig(RigConfig::with_builders(2));
    let client = rig.client_store();
    let top = build_tree(client);
    let paths = closure(client, &top);
    assert_eq!(paths.len(), 2);
    let local = local_store(&rig);
    let pool = Pool::new();
    for (i, protocol) in [(0, Protocol::Serve), (1, Protocol::Worker)] {
        let b = pool.add(common::config(&rig, i, protocol));
        let r = b
            .push_closure(&local, &BTreeSet::from([top.clone()]), false, None)
            .await
            .unwrap_or_else(|e| panic!("push over {protocol:?}: {e}"));
        assert_eq!(r.transferred.len(), 2, "{protocol:?}");
        for p in &paths {
            let theirs = rig.builder(i).store();
            common::verify(theirs, p);
            assert_eq!(
                nar_hash(theirs, p),
                nar_hash(client, p),
                "{p} over {protocol:?}"
            );
        }
    }
    assert_eq!(
        local.nars_read_from_files(),
        4,
        "both pushes read both NARs from the files, not through the daemon"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_not_the_daemons_fail_one_push_then_the_daemon_serves() {
    let rig = rig(RigConfig::with_builders(1));
    let client = rig.client_store();
    let size = 300_000;
    let first = random_path(client, "files-first", size, 11);
    let second = random_path(client, "files-second", size, 12);
    let missing = random_path(client, "files-missing", size, 13);
    // A directory that has the first two paths, with other bytes of the same size: the NARs
    // are as large as the daemon recorded, only their hashes differ.
    let elsewhere = tempfile::tempdir().expect("tmp");
    for p in [&first, &second] {
        std::fs::write(elsewhere.path().join(p.to_string()), vec![0x5a; size]).expect("write");
    }
    let local =
        Arc::new(local_store_via_daemon(&rig).with_store_files(Some(elsewhere.path().into())));
    let pool = Pool::new();
    let b = pool.add(common::config(&rig, 0, Protocol::Worker));
    let theirs = rig.builder(0).store();

    // A path missing there is served by the daemon, and does not disqualify the files.
    b.push_closure(&local, &BTreeSet::from([missing.clone()]), false, None)
        .await
        .expect("a path missing from the files is pushed through the daemon");
    assert!(is_valid(theirs, &missing));

    let e = b
        .push_closure(&local, &BTreeSet::from([first.clone()]), false, None)
        .await
        .expect_err("files that do not match fail the push");
    assert_eq!(e.kind(), ErrorKind::Verification, "{e}");
    assert_eq!(e.initiator(), Initiator::Local, "{e}");
    assert!(!is_valid(theirs, &first), "nothing is registered");

    for p in [&first, &second] {
        b.push_closure(&local, &BTreeSet::from([p.clone()]), false, None)
            .await
            .unwrap_or_else(|e| panic!("{p} through the daemon: {e}"));
        common::verify(theirs, p);
        assert_eq!(nar_hash(theirs, p), nar_hash(client, p));
    }
    assert_eq!(local.nars_read_from_files(), 0);
    pool.shutdown().await;
}
