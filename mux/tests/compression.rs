//! SSH zlib compression (the `compress` store parameter, Nix's `ssh -C`) against a real
//! OpenSSH + Nix 2.8 builder: negotiated, and every path pushed and fetched arrives byte for
//! byte (narHash checked on arrival, `nix-store --verify-path` on both sides), over both
//! protocols.

mod common;

use std::collections::BTreeSet;

use common::{config, instantiate, local_store, random_path, rig, shell_drv, sp, verify};
use nixmux::ops::BuildOptions;
use nixmux::proto::store_path::StorePath;
use nixmux::{Pool, Protocol, log_channel};
use nixmux_rig::{PrivateStore, Rig, RigConfig};

/// A text file (compressible) of about `size` bytes added to `store`.
fn text_path(store: &PrivateStore, name: &str, size: usize) -> StorePath {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join(name);
    let mut text = String::new();
    let mut i = 0u64;
    while text.len() < size {
        text.push_str(&format!(
            "line {i}: the quick brown fox jumps over the lazy dog\n"
        ));
        i += 1;
    }
    std::fs::write(&file, text).expect("write");
    sp(&store.add(&file).expect("nix-store --add"))
}

async fn round_trip(rig: &std::sync::Arc<Rig>, protocol: Protocol) {
    let mut cfg = config(rig, 0, protocol);
    cfg.target.transport.compression = true;
    let report = nixmux::ping::ping(&cfg, 1).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.compression.as_deref(), Some("zlib@openssh.com"));

    let pool = Pool::new();
    let b = pool.add(cfg);
    let local = local_store(rig);
    let client = rig.client_store();
    let tag = protocol.scheme();
    let roots: BTreeSet<StorePath> = [
        text_path(client, &format!("text-{tag}"), 6 << 20),
        random_path(client, &format!("random-{tag}"), 3 << 20, 7),
        text_path(client, &format!("empty-{tag}"), 0),
    ]
    .into();
    b.push_closure(&local, &roots, false, None)
        .await
        .expect("push with compression");
    for p in &roots {
        verify(rig.builder(0).store(), p);
    }

    // Outputs made on the builder come back the same way.
    let drv = instantiate(
        client,
        &shell_drv(
            &format!("compressible-{tag}"),
            "mkdir $out; yes nixmux | head -c 8000000 > $out/text; head -c 2000000 /dev/urandom > $out/random",
        ),
    );
    let (logs, _stream) = log_channel(100);
    let built = b
        .build(&local, &drv, &BuildOptions::default(), &logs)
        .await
        .expect("build");
    let outs: BTreeSet<StorePath> = built
        .result
        .built_outputs
        .values()
        .map(|o| o.path.clone())
        .collect();
    assert!(!outs.is_empty());
    b.fetch_outputs(&local, &outs, None)
        .await
        .expect("fetch with compression");
    for p in &outs {
        verify(client, p);
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zlib_round_trips_every_path_over_both_protocols() {
    let rig = rig(RigConfig::with_builders(1));
    round_trip(&rig, Protocol::Serve).await;
    round_trip(&rig, Protocol::Worker).await;
}
