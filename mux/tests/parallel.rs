//! Large transfers over several channels (issue 11, "Bulk transfer") against real OpenSSH +
//! Nix 2.8 builders behind an emulated WAN link: a closure with a dependency chain and
//! fan-out, pushed and fetched on several lanes, arrives byte for byte and every path is
//! valid (Nix registers a path only once its references are: the lanes follow the graph);
//! killing one lane's remote process fails the transfer with a typed error and leaves no
//! partial path valid; on loopback `auto` keeps one lane.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{
    closure, is_valid, local_store, nar_hash, random_path, relayed_config, rig, sp, verify,
};
use nixmux::bulk::BulkCompression;
use nixmux::parallel::ParallelMode;
use nixmux::proto::store_path::StorePath;
use nixmux::{Builder, BuilderConfig, Pool, Protocol};
use nixmux_rig::relay::{Link, Relay};
use nixmux_rig::{PrivateStore, Rig, RigConfig};

/// Builds, in `store`, 24 paths of 1 to 2 MiB of random data: a base, a chain of 8 on it, 14
/// that each reference the base and the chain's second link, and a top that references the
/// fan and the chain's end. Returns the top (whose closure is all 24).
fn build_graph(store: &PrivateStore, tag: &str) -> StorePath {
    let mut e = String::from(
        r#"let mk = name: size: deps: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "PATH=/usr/bin:/bin; mkdir $out; head -c ${toString size} /dev/urandom > $out/data; echo ${toString deps} > $out/refs"]; };"#,
    );
    let size = |i: usize| (1 << 20) + i * 40_000;
    e.push_str(&format!("\n  base = mk \"par-{tag}-base\" {} [];", size(0)));
    let mut prev = "base".to_owned();
    for i in 1..=8 {
        e.push_str(&format!(
            "\n  c{i} = mk \"par-{tag}-c{i}\" {} [{prev}];",
            size(i)
        ));
        prev = format!("c{i}");
    }
    let mut fan = Vec::new();
    for i in 1..=14 {
        e.push_str(&format!(
            "\n  f{i} = mk \"par-{tag}-f{i}\" {} [base c2];",
            size(8 + i)
        ));
        fan.push(format!("f{i}"));
    }
    e.push_str(&format!(
        "\n  top = mk \"par-{tag}-top\" {} [{} c8];\nin top\n",
        size(23),
        fan.join(" ")
    ));
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("graph.nix");
    std::fs::write(&f, e).expect("write expression");
    let out = store
        .run(
            "nix-build",
            [
                "--no-out-link",
                "--max-jobs",
                "4",
                f.to_str().expect("utf8 path"),
            ],
        )
        .expect("nix-build");
    sp(&String::from_utf8_lossy(&out.stdout))
}

struct Setup {
    rig: Arc<Rig>,
    _relay: Relay,
    pool: Pool,
    builder: Builder,
}

async fn setup(protocol: Protocol, link: Link, tune: impl FnOnce(&mut BuilderConfig)) -> Setup {
    let rig = rig(RigConfig::with_builders(1));
    let relay = Relay::start(rig.builder(0).addr(), link)
        .await
        .expect("relay");
    let mut cfg = relayed_config(&rig, 0, protocol, &relay);
    // The zstd channel would take these transfers across this link: keep the protocol path.
    cfg.bulk.mode = BulkCompression::Off;
    cfg.parallel.mode = ParallelMode::Always;
    cfg.parallel.max_extra_lanes = 3;
    tune(&mut cfg);
    let pool = Pool::new();
    let builder = pool.add(cfg);
    Setup {
        rig,
        _relay: relay,
        pool,
        builder,
    }
}

async fn push_and_fetch_a_graph(protocol: Protocol) {
    let s = setup(protocol, Link::new(40.0, 0.0), |_| {}).await;
    let tag = protocol.scheme().replace('-', "");
    let local = local_store(&s.rig);
    let client = s.rig.client_store();
    let remote = s.rig.builder(0).store();

    // Push: built here, sent to the builder.
    let top = build_graph(client, &format!("push{tag}"));
    let paths = closure(client, &top);
    assert_eq!(paths.len(), 24, "{paths:?}");
    let report = s
        .builder
        .push_closure(&local, &BTreeSet::from([top.clone()]), false, None)
        .await
        .expect("parallel push");
    assert_eq!(report.transferred.len(), 24, "{report:?}");
    for p in &paths {
        verify(remote, p);
        assert_eq!(nar_hash(remote, p), nar_hash(client, p), "{p}");
    }
    let par = s.builder.parallel_stats();
    assert_eq!(par.pushes, 1, "{par:?}");
    assert_eq!(par.last_lanes, 4, "{par:?}");
    assert!(par.batches > 4, "{par:?}");
    let stats = s.builder.stats();
    assert!(
        stats.sessions_created >= 2,
        "more than one session: {stats:?}"
    );

    // Fetch: built on the builder, brought here.
    let top = build_graph(remote, &format!("fetch{tag}"));
    let paths = closure(remote, &top);
    assert_eq!(paths.len(), 24, "{paths:?}");
    let report = s
        .builder
        .fetch_outputs(&local, &BTreeSet::from([top.clone()]), None)
        .await
        .expect("parallel fetch");
    assert_eq!(report.transferred.len(), 24, "{report:?}");
    for p in &paths {
        verify(client, p);
        assert_eq!(nar_hash(remote, p), nar_hash(client, p), "{p}");
    }
    let par = s.builder.parallel_stats();
    assert_eq!(par.fetches, 1, "{par:?}");
    assert_eq!(par.last_lanes, 4, "{par:?}");
    // Every lane finished: its session went back to the pool.
    assert_eq!(
        s.builder.stats().sessions_discarded,
        0,
        "{:?}",
        s.builder.stats()
    );
    s.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_goes_both_ways_on_several_lanes_over_ssh() {
    push_and_fetch_a_graph(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_goes_both_ways_on_several_lanes_over_ssh_ng() {
    push_and_fetch_a_graph(Protocol::Worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_killed_mid_push_fails_typed_and_leaves_nothing_partial() {
    // 40 Mbit/s: 36 MiB take about 8 s, time to kill a lane half-way.
    let s = setup(Protocol::Serve, Link::new(40.0, 40.0), |_| {}).await;
    let local = local_store(&s.rig);
    let client = s.rig.client_store();
    let remote = s.rig.builder(0).store();
    let paths: Vec<StorePath> = (0..12)
        .map(|i| random_path(client, &format!("par-kill-{i}"), 3 << 20, 100 + i))
        .collect();
    let roots: BTreeSet<StorePath> = paths.iter().cloned().collect();

    let b = s.builder.clone();
    let push = tokio::spawn(async move { b.push_closure(&local, &roots, false, None).await });
    let rig = s.rig.clone();
    let serving = || {
        common::matching_processes(&rig, 0, &["nix-store --serve"])
            .into_iter()
            .filter(|c| !c.contains("sh -c"))
            .collect::<Vec<_>>()
    };
    let seen = common::wait_until(Duration::from_secs(20), || serving().len() >= 4).await;
    assert!(seen.is_some(), "four lanes start: {:?}", serving());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One lane's remote process dies.
    let victim = s
        .rig
        .builder(0)
        .processes()
        .into_iter()
        .filter(|p| p.cmdline.contains("nix-store --serve") && !p.cmdline.contains("sh -c"))
        .map(|p| p.pid)
        .max()
        .expect("a serving process");
    let killed = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    let err = tokio::time::timeout(Duration::from_secs(40), push)
        .await
        .expect("the push ends")
        .expect("the task")
        .expect_err("a killed lane fails the push");
    eprintln!("push failed as it should: {err} ({:?})", err.kind());
    assert!(
        matches!(
            err.kind(),
            nixmux::ErrorKind::Remote
                | nixmux::ErrorKind::Disconnected
                | nixmux::ErrorKind::Protocol
        ),
        "{err:?}"
    );
    let mut valid = 0;
    for p in &paths {
        if is_valid(remote, p) {
            verify(remote, p);
            assert_eq!(nar_hash(remote, p), nar_hash(client, p), "{p}");
            valid += 1;
        }
    }
    assert!(valid < paths.len(), "the push stopped before the end");
    assert!(
        s.builder.stats().sessions_discarded >= 1,
        "{:?}",
        s.builder.stats()
    );

    // The builder is fine: the next push completes what is missing.
    let local = local_store(&s.rig);
    let roots: BTreeSet<StorePath> = paths.iter().cloned().collect();
    let report = s
        .builder
        .push_closure(&local, &roots, false, None)
        .await
        .expect("the next push");
    // A lane cut off while waiting for an acknowledgement may still have had its last path
    // registered (its whole NAR had arrived) after the check above.
    assert!(
        report.transferred.len() <= paths.len() - valid,
        "{report:?}"
    );
    for p in &paths {
        verify(remote, p);
    }
    s.pool.shutdown().await;
}

/// With no second session to be had (the pool holds one), the lanes counted on get none:
/// the lease's lane sends everything, and the push is not counted as a parallel one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_without_sessions_leave_the_push_to_the_lease() {
    let s = setup(Protocol::Worker, Link::new(40.0, 0.0), |c| {
        c.pool.max_sessions = 1;
    })
    .await;
    let local = local_store(&s.rig);
    let client = s.rig.client_store();
    let top = build_graph(client, "alone");
    let paths = closure(client, &top);
    s.builder
        .push_closure(&local, &BTreeSet::from([top]), false, None)
        .await
        .expect("push");
    for p in &paths {
        verify(s.rig.builder(0).store(), p);
    }
    let par = s.builder.parallel_stats();
    assert_eq!(par.pushes, 0, "{par:?}");
    let choice = par.last_choice.unwrap_or_default();
    assert!(choice.starts_with("4 lanes:"), "{choice}");
    assert_eq!(
        s.builder.stats().sessions_created,
        1,
        "{:?}",
        s.builder.stats()
    );
    s.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_keeps_one_lane_on_loopback() {
    let rig = rig(RigConfig::with_builders(1));
    let mut cfg = common::config(&rig, 0, Protocol::Worker);
    cfg.bulk.mode = BulkCompression::Off;
    assert_eq!(cfg.parallel.mode, ParallelMode::Auto);
    let pool = Pool::new();
    let b = pool.add(cfg);
    let local = local_store(&rig);
    let client = rig.client_store();
    let paths: Vec<StorePath> = (0..6)
        .map(|i| random_path(client, &format!("par-loop-{i}"), 3 << 20, 200 + i))
        .collect();
    let roots: BTreeSet<StorePath> = paths.iter().cloned().collect();
    b.push_closure(&local, &roots, false, None)
        .await
        .expect("push");
    for p in &paths {
        verify(rig.builder(0).store(), p);
    }
    let par = b.parallel_stats();
    assert_eq!(par.pushes, 0, "{par:?}");
    let choice = par.last_choice.unwrap_or_default();
    assert!(
        choice.starts_with("1 lane:") && choice.contains("one channel at most"),
        "{choice}"
    );
    assert_eq!(b.stats().sessions_created, 1, "{:?}", b.stats());
    pool.shutdown().await;
}
