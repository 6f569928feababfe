//! zstd for bulk transfers (issue 11) against real OpenSSH + Nix 2.8 builders: closures
//! pushed and fetched through `zstd` arrive byte for byte with their narHash checked, over
//! both protocols; a builder without zstd falls back silently (and `ping` says so); a
//! corrupted compressed stream fails with a typed error, leaves nothing partial valid and
//! discards the session; on loopback `auto` keeps the protocol path.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{config, instantiate, is_valid, local_store, nar_hash, random_path, rig, sp, verify};
use nixmux::bulk::BulkCompression;
use nixmux::ops::BuildOptions;
use nixmux::proto::store_path::StorePath;
use nixmux::{BuilderConfig, ErrorKind, Pool, Protocol, log_channel};
use nixmux_rig::{PrivateStore, Rig, RigConfig};

/// A text file (compressible) of about `size` bytes added to `store`.
fn text_path(store: &PrivateStore, name: &str, size: usize) -> StorePath {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join(name);
    let mut text = String::new();
    let mut i = 0u64;
    while text.len() < size {
        text.push_str(&format!("line {i}: nixmux sends this through zstd\n"));
        i += 1;
    }
    std::fs::write(&file, text).expect("write");
    sp(&store.add(&file).expect("nix-store --add"))
}

fn zstd_config(rig: &Rig, protocol: Protocol, mode: BulkCompression) -> BuilderConfig {
    let mut cfg = config(rig, 0, protocol);
    cfg.bulk.mode = mode;
    cfg.bulk.min_bytes = 0;
    cfg
}

async fn round_trip(rig: &std::sync::Arc<Rig>, protocol: Protocol) {
    let tag = protocol.scheme();
    let cfg = zstd_config(rig, protocol, BulkCompression::Zstd);
    let report = nixmux::ping::ping(&cfg, 2).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.zstd, Some(true), "{report:?}");
    let bulk = report.bulk_compression.clone().unwrap_or_default();
    assert!(bulk.contains("forced"), "{bulk}");

    let pool = Pool::new();
    let b = pool.add(cfg);
    let local = local_store(rig);
    let client = rig.client_store();
    let builder = rig.builder(0).store();
    let roots: BTreeSet<StorePath> = [
        text_path(client, &format!("text-{tag}"), 6 << 20),
        random_path(client, &format!("random-{tag}"), 3 << 20, 11),
        text_path(client, &format!("empty-{tag}"), 0),
    ]
    .into();
    let pushed = b
        .push_closure(&local, &roots, false, None)
        .await
        .expect("push through zstd");
    assert_eq!(pushed.transferred.len(), 3);
    let stats = b.bulk_stats();
    assert_eq!(stats.pushes, 1, "{stats:?}");
    assert!(
        stats.compressed_bytes < stats.nar_bytes,
        "text compresses: {stats:?}"
    );
    for p in &roots {
        verify(builder, p);
        assert_eq!(nar_hash(builder, p), nar_hash(client, p), "{p}");
    }

    // A build whose output references one of its inputs comes back with it.
    let expr = format!(
        r#"let dep = builtins.toFile "dep-{tag}" "a dependency"; in derivation {{ name = "zstd-out-{tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "PATH=/usr/bin:/bin; mkdir $out; echo ${{dep}} > $out/ref; yes nixmux | head -c 8000000 > $out/text; head -c 2000000 /dev/urandom > $out/random"]; }}"#
    );
    let drv = instantiate(client, &expr);
    let (logs, _stream) = log_channel(100);
    let built = b
        .build(&local, &drv, &BuildOptions::default(), &logs)
        .await
        .expect("build");
    assert!(built.result.status.is_success(), "{:?}", built.result);
    let outs: BTreeSet<StorePath> = built
        .result
        .built_outputs
        .values()
        .map(|o| o.path.clone())
        .collect();
    let fetched = b
        .fetch_outputs(&local, &outs, None)
        .await
        .expect("fetch through zstd");
    assert_eq!(fetched.transferred.len(), 1, "{fetched:?}");
    assert_eq!(b.bulk_stats().fetches, 1, "{:?}", b.bulk_stats());
    for p in &outs {
        verify(client, p);
        assert_eq!(nar_hash(builder, p), nar_hash(client, p), "{p}");
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_round_trips_every_path_over_both_protocols() {
    let rig = rig(RigConfig::with_builders(1));
    round_trip(&rig, Protocol::Serve).await;
    round_trip(&rig, Protocol::Worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_zstd_falls_back_silently_and_ping_says_so() {
    let rig = rig(RigConfig::with_builders(1));
    let mut cfg = zstd_config(&rig, Protocol::Worker, BulkCompression::Zstd);
    cfg.bulk.zstd_program = "/nonexistent/zstd".into();
    let report = nixmux::ping::ping(&cfg, 1).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.zstd, Some(false), "{report:?}");
    let bulk = report.bulk_compression.clone().unwrap_or_default();
    assert!(bulk.contains("no zstd"), "{bulk}");

    let pool = Pool::new();
    let b = pool.add(cfg);
    let local = local_store(&rig);
    let p = random_path(rig.client_store(), "no-zstd", 2 << 20, 5);
    b.push_closure(&local, &[p.clone()].into(), false, None)
        .await
        .expect("push falls back to the protocol");
    verify(rig.builder(0).store(), &p);
    let stats = b.bulk_stats();
    assert_eq!(stats.pushes, 0, "{stats:?}");
    assert_eq!(stats.fallbacks, 1, "{stats:?}");
    assert!(
        stats
            .last_choice
            .as_deref()
            .unwrap_or("")
            .contains("no zstd"),
        "{stats:?}"
    );
    pool.shutdown().await;
}

/// A `zstd` that corrupts one byte of the compressed stream: of its input when
/// decompressing (pushes), of its output when compressing (fetches).
fn corrupting_zstd(dir: &Path) -> String {
    let script = dir.join("zstd");
    std::fs::write(
        &script,
        r#"#!/bin/sh
flip() {
  perl -e 'binmode STDIN; binmode STDOUT; $/ = \65536; $n = 0;
    while (<STDIN>) { if ($n == 0 && length($_) > 300) { substr($_, 300, 1) = chr(ord(substr($_, 300, 1)) ^ 0xff) } $n++; print }'
}
case " $* " in
  *" -d "*) flip | /usr/bin/zstd "$@" ;;
  *) /usr/bin/zstd "$@" | flip ;;
esac
"#,
    )
    .expect("write the wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script.to_str().expect("utf8").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_stream_fails_typed_and_leaves_nothing_partial() {
    let rig = rig(RigConfig::with_builders(1));
    // The builders share the host's filesystem outside /nix: they can run the wrapper.
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = zstd_config(&rig, Protocol::Worker, BulkCompression::Zstd);
    cfg.bulk.zstd_program = corrupting_zstd(tmp.path());
    let pool = Pool::new();
    let b = pool.add(cfg);
    let local = local_store(&rig);
    let client = rig.client_store();
    let builder = rig.builder(0).store();

    // Fetch: random (stored, not compressed, by zstd: only the NAR hash sees the flip) and
    // text (the flip breaks zstd's own decoding).
    for (i, p) in [
        random_path(builder, "corrupt-fetch-random", 3 << 20, 9),
        text_path(builder, "corrupt-fetch-text", 3 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let discarded = b.stats().sessions_discarded;
        let err = b
            .fetch_outputs(&local, &[p.clone()].into(), None)
            .await
            .expect_err("a corrupted stream fails");
        assert_eq!(err.kind(), ErrorKind::Verification, "fetch {i}: {err}");
        assert!(!is_valid(client, &p), "{p} is not valid locally");
        assert!(
            local
                .query_valid_paths(&[p.clone()].into())
                .await
                .expect("query")
                .is_empty()
        );
        assert!(
            b.stats().sessions_discarded > discarded,
            "the session is discarded: {:?}",
            b.stats()
        );
    }

    // Push: the builder's zstd -d reads a corrupted stream.
    let p = text_path(client, "corrupt-push", 3 << 20);
    let discarded = b.stats().sessions_discarded;
    let err = b
        .push_closure(&local, &[p.clone()].into(), false, None)
        .await
        .expect_err("a corrupted push fails");
    assert_eq!(err.kind(), ErrorKind::Verification, "push: {err}");
    assert!(!is_valid(builder, &p), "{p} is not valid on the builder");
    assert!(b.stats().sessions_discarded > discarded, "{:?}", b.stats());
    assert_eq!(b.bulk_stats().pushes, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_keeps_loopback_on_the_protocol() {
    let rig = rig(RigConfig::with_builders(1));
    let cfg = zstd_config(&rig, Protocol::Serve, BulkCompression::Auto);
    let report = nixmux::ping::ping(&cfg, 3).await;
    assert!(report.ok, "{report:?}");
    let bulk = report.bulk_compression.clone().unwrap_or_default();
    assert!(bulk.contains("auto chooses the protocol"), "{bulk}");

    let pool = Pool::new();
    let b = pool.add(cfg);
    let local = local_store(&rig);
    let p = text_path(rig.client_store(), "auto-loopback", 5 << 20);
    b.push_closure(&local, &[p.clone()].into(), false, None)
        .await
        .expect("push");
    verify(rig.builder(0).store(), &p);
    let stats = b.bulk_stats();
    assert_eq!(stats.pushes, 0, "{stats:?}");
    let choice = stats.last_choice.unwrap_or_default();
    assert!(
        choice.starts_with("protocol:") && choice.contains("link at most"),
        "{choice}"
    );
    pool.shutdown().await;
}

#[test]
fn the_store_url_parameter() {
    use nixmux::config::BuilderSpec;
    let spec = |s: &str| BuilderSpec::from_store_url(s, "x86_64-linux");
    assert_eq!(
        spec("ssh://b").expect("parses").bulk_compression,
        BulkCompression::Auto
    );
    let s = spec("ssh-ng://b?bulk-compression=zstd").expect("parses");
    assert_eq!(s.bulk_compression, BulkCompression::Zstd);
    assert!(s.unknown_params.is_empty(), "{:?}", s.unknown_params);
    assert_eq!(
        spec("ssh://b?bulk-compression=no")
            .expect("parses")
            .bulk_compression,
        BulkCompression::Off
    );
    assert!(spec("ssh://b?bulk-compression=xz").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_chooses_zstd_across_a_slow_link() {
    use nixmux_rig::relay::{Link, Relay};
    let rig = rig(RigConfig::with_builders(1));
    // 50 ms: one 2 MiB window per round trip is at most 42 MB/s, far below zstd.
    let relay = Relay::start(rig.builder(0).addr(), Link::new(50.0, 100.0))
        .await
        .expect("relay");
    let mut cfg = common::relayed_config(&rig, 0, Protocol::Worker, &relay);
    cfg.bulk.mode = BulkCompression::Auto;
    let report = nixmux::ping::ping(&cfg, 3).await;
    assert!(report.ok, "{report:?}");
    let bulk = report.bulk_compression.clone().unwrap_or_default();
    assert!(bulk.starts_with("zstd for transfers"), "{bulk}");

    let pool = Pool::new();
    let b = pool.add(cfg);
    let local = local_store(&rig);
    let p = text_path(rig.client_store(), "auto-wan", 5 << 20);
    b.push_closure(&local, &[p.clone()].into(), false, None)
        .await
        .expect("push");
    let builder = rig.builder(0).store();
    verify(builder, &p);
    assert_eq!(nar_hash(builder, &p), nar_hash(rig.client_store(), &p));
    let stats = b.bulk_stats();
    assert_eq!(stats.pushes, 1, "{stats:?}");
    assert!(
        stats.compressed_bytes * 4 < stats.nar_bytes,
        "text compresses: {stats:?}"
    );
    pool.shutdown().await;
}
