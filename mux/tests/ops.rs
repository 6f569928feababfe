//! The unified operations against real OpenSSH + Nix 2.8 builders, once per protocol: the
//! same test code must give the same outcome over ssh:// and ssh-ng://.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use nixmux::local::{LocalStore, LocalStoreAccess};
use nixmux::ops::BuildOptions;
use nixmux::proto::build_result::BuildStatus;
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::transport::{Endpoint, HostKeyCheck, Identity, TransportConfig};
use nixmux::{Builder, BuilderConfig, ConnectTarget, Pool, Protocol, log_channel};
use nixmux_rig::{PrivateStore, Rig, RigConfig};

struct Setup {
    rig: Rig,
    client: Arc<PrivateStore>,
    local: LocalStore,
    pool: Pool,
}

fn setup() -> Setup {
    setup_with(RigConfig::with_builders(1))
}

fn setup_with(config: RigConfig) -> Setup {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let rig = Rig::start(config).expect("rig");
    let client = Arc::new(PrivateStore::temp().expect("client store"));
    let c = client.clone();
    let local = LocalStore::new(LocalStoreAccess::Command(Arc::new(move || {
        tokio::process::Command::from(c.command("nix-daemon", ["--stdio"]))
    })))
    .with_store_files(Some(client.store_dir()));
    Setup {
        rig,
        client,
        local,
        pool: Pool::new(),
    }
}

fn builder(s: &Setup, protocol: Protocol) -> Builder {
    builder_as(s, protocol, "root")
}

fn builder_as(s: &Setup, protocol: Protocol, user: &str) -> Builder {
    let target = ConnectTarget {
        endpoint: Endpoint::new("127.0.0.1", s.rig.builder(0).port(), user),
        identities: vec![Identity::key_file(s.rig.client_key())],
        host_keys: HostKeyCheck::strict([s.rig.known_hosts()]),
        transport: TransportConfig::default(),
        jump: None,
        hooks: Default::default(),
    };
    s.pool.add(BuilderConfig::new(
        format!("{}://{user}@builder0", protocol.scheme()),
        protocol,
        target,
    ))
}

fn sp(s: &str) -> StorePath {
    StorePath::parse(&StoreDir::default(), s.trim()).expect("store path")
}

/// Instantiates `expr` in the client store; returns the `.drv` paths of its closure,
/// dependencies first, and the top-level one.
fn instantiate(store: &PrivateStore, expr: &str) -> (Vec<StorePath>, StorePath) {
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("e.nix");
    std::fs::write(&f, expr).expect("write");
    let out = store
        .run("nix-instantiate", [f.to_str().expect("utf8")])
        .expect("instantiate");
    let top = sp(&String::from_utf8_lossy(&out.stdout));
    let q = store
        .run("nix-store", ["-qR", &top.to_absolute(&StoreDir::default())])
        .expect("closure");
    let drvs = String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(sp)
        .filter(StorePath::is_derivation)
        .collect();
    (drvs, top)
}

fn drv_outputs(store: &PrivateStore, drv: &StorePath) -> BTreeSet<StorePath> {
    let out = store
        .run(
            "nix-store",
            ["-q", "--outputs", &drv.to_absolute(&StoreDir::default())],
        )
        .expect("outputs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(sp)
        .collect()
}

/// Eleven derivations (six leaves, a 50 MiB random output, three middles, the top) and an
/// input source (`builtins.toFile`): twelve paths. Shared with cli/tests/agent.rs.
const GRAPH: &str = include_str!("data/graph.nix");

async fn build_graph(protocol: Protocol) {
    let s = setup();
    let b = builder(&s, protocol);
    let (drvs, top) = instantiate(&s.client, GRAPH);
    assert!(drvs.len() >= 10, "{} derivations", drvs.len());
    let (logs, mut stream) = log_channel(10_000);
    for drv in &drvs {
        let outcome = b
            .build(&s.local, drv, &BuildOptions::default(), &logs)
            .await
            .unwrap_or_else(|e| panic!("building {drv}: {e}"));
        assert_eq!(
            outcome.result.status,
            BuildStatus::Built,
            "{drv}: {:?}",
            outcome
        );
        let outputs: BTreeSet<StorePath> = outcome
            .result
            .built_outputs
            .values()
            .map(|o| o.path.clone())
            .collect();
        assert_eq!(outputs, drv_outputs(&s.client, drv));
        b.fetch_outputs(&s.local, &outputs, None)
            .await
            .unwrap_or_else(|e| panic!("fetching {drv}: {e}"));
    }
    for out in drv_outputs(&s.client, &top) {
        let p = out.to_absolute(&StoreDir::default());
        s.client
            .run("nix-store", ["--verify-path", &p])
            .expect("outputs valid and hashes right");
    }
    // For the record (not asserted): how many log events the graph produced.
    let mut n = 0;
    while stream.try_recv().is_some() {
        n += 1;
    }
    eprintln!(
        "{protocol:?}: {} drvs, {n} log events, {:?}",
        drvs.len(),
        b.stats()
    );
    s.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_builds_remotely_over_ssh() {
    build_graph(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_builds_remotely_over_ssh_ng() {
    build_graph(Protocol::Worker).await;
}

async fn failures(protocol: Protocol) {
    let s = setup();
    let b = builder(&s, protocol);
    let (logs, _stream) = log_channel(1000);
    let one = |body: &str, name: &str| {
        format!(
            r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "PATH=/usr/bin:/bin; {body}"]; }}"#
        )
    };
    let (_, fail) = instantiate(
        &s.client,
        &one("echo this build fails >&2; exit 1", "fails"),
    );
    let o = b
        .build(&s.local, &fail, &BuildOptions::default(), &logs)
        .await
        .expect("a failed build is a result");
    assert_eq!(o.result.status, BuildStatus::PermanentFailure, "{o:?}");
    assert!(
        o.log_tail.iter().any(|l| l.contains("this build fails")),
        "{:?}",
        o.log_tail
    );

    let (_, slow) = instantiate(&s.client, &one("sleep 30; echo > $out", "silent"));
    let o = b
        .build(
            &s.local,
            &slow,
            &BuildOptions {
                max_silent_time: Some(Duration::from_secs(1)),
                ..BuildOptions::default()
            },
            &logs,
        )
        .await
        .expect("result");
    assert_eq!(o.result.status, BuildStatus::TimedOut, "{o:?}");

    let (_, slow2) = instantiate(
        &s.client,
        &one(
            "while true; do echo tick; sleep 0.2; done",
            "chatty-forever",
        ),
    );
    let o = b
        .build(
            &s.local,
            &slow2,
            &BuildOptions {
                timeout: Some(Duration::from_secs(2)),
                ..BuildOptions::default()
            },
            &logs,
        )
        .await
        .expect("result");
    assert_eq!(o.result.status, BuildStatus::TimedOut, "{o:?}");

    let (_, chatty) = instantiate(
        &s.client,
        &one("yes | head -c 200000; echo > $out", "too-chatty"),
    );
    let o = b
        .build(
            &s.local,
            &chatty,
            &BuildOptions {
                max_log_size: Some(10_000),
                ..BuildOptions::default()
            },
            &logs,
        )
        .await
        .expect("result");
    assert_eq!(o.result.status, BuildStatus::LogLimitExceeded, "{o:?}");
    s.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_timeouts_and_log_limits_over_ssh() {
    failures(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_timeouts_and_log_limits_over_ssh_ng() {
    failures(Protocol::Worker).await;
}

/// A builder whose SSH user is not root: its commands go through the builder's nix-daemon,
/// which does not trust it.
fn untrusted_setup(extra_nix_conf: &[&str]) -> Setup {
    setup_with(RigConfig {
        untrusted_user: Some("nixuser".into()),
        extra_nix_conf: extra_nix_conf.iter().map(|s| s.to_string()).collect(),
        ..RigConfig::with_builders(1)
    })
}

fn untrusted_builder(s: &Setup, protocol: Protocol) -> Builder {
    builder_as(s, protocol, "nixuser")
}

const WITH_INPUT: &str = r#"
let src = builtins.toFile "untrusted-src" "input\n";
    dep = derivation { name = "untrusted-dep"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo dep > $out"]; };
in derivation { name = "untrusted-top"; system = builtins.currentSystem; builder = "/bin/sh";
  args = ["-c" "PATH=/usr/bin:/bin; read x < ${src}; echo $x > $out; cat ${dep} >> $out"]; }
"#;

async fn untrusted(protocol: Protocol) {
    // A builder that accepts unsigned paths (require-sigs = false) but, as Nix always does,
    // refuses input-addressed builds from untrusted users: the build must still work, by path.
    let s = untrusted_setup(&["require-sigs = false"]);
    let b = untrusted_builder(&s, protocol);
    let (drvs, top) = instantiate(&s.client, WITH_INPUT);
    let (logs, _stream) = log_channel(1000);
    for drv in &drvs {
        let o = b
            .build(&s.local, drv, &BuildOptions::default(), &logs)
            .await
            .unwrap_or_else(|e| panic!("{protocol:?} {drv}: {e}"));
        assert!(o.result.status.is_success(), "{o:?}");
        assert_eq!(o.strategy, nixmux::ops::BuildStrategy::BuildPaths);
        let outs: BTreeSet<StorePath> = o
            .result
            .built_outputs
            .values()
            .map(|x| x.path.clone())
            .collect();
        assert_eq!(outs, drv_outputs(&s.client, drv));
        b.fetch_outputs(&s.local, &outs, None).await.expect("fetch");
    }
    for out in drv_outputs(&s.client, &top) {
        s.client
            .run(
                "nix-store",
                ["--verify-path", &out.to_absolute(&StoreDir::default())],
            )
            .expect("valid locally");
    }
    s.pool.shutdown().await;

    // A builder with Nix's default require-sigs: unsigned inputs are refused; the error is
    // typed and names the fix, the same on both protocols.
    let s = untrusted_setup(&[]);
    let b = untrusted_builder(&s, protocol);
    let (drvs, top) = instantiate(&s.client, WITH_INPUT);
    // The inputs exist locally (built here), so the push of the input closure is what fails.
    for d in drvs.iter().filter(|d| **d != top) {
        s.client
            .run("nix-store", ["-r", &d.to_absolute(&StoreDir::default())])
            .expect("local build of the input");
    }
    let e = b
        .build(&s.local, &top, &BuildOptions::default(), &logs)
        .await
        .expect_err("unsigned inputs must be refused");
    assert_eq!(e.kind(), nixmux::ErrorKind::NotTrusted, "{e}");
    assert_eq!(e.initiator(), nixmux::Initiator::Builder);
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("trusted-users"), "{e}");
    s.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_user_same_outcome_over_ssh() {
    untrusted(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_user_same_outcome_over_ssh_ng() {
    untrusted(Protocol::Worker).await;
}

/// Whether `path` is valid in the builder's store.
fn valid_on_builder(rig: &Rig, path: &StorePath) -> bool {
    rig.builder(0)
        .store()
        .is_valid(&path.to_absolute(&StoreDir::default()))
        .expect("check validity on the builder")
}

/// Adds a file of `mib` MiB of random bytes to `store`.
fn add_big_file(store: &PrivateStore, mib: usize, name: &str) -> StorePath {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join(name);
    let st = std::process::Command::new("head")
        .args(["-c", &format!("{mib}M"), "/dev/urandom"])
        .stdout(std::fs::File::create(&f).expect("create"))
        .status()
        .expect("head");
    assert!(st.success());
    sp(&store.add(&f).expect("nix-store --add"))
}

async fn kill_mid_transfer(protocol: Protocol) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let s = setup();
    let b = builder(&s, protocol);
    let big = add_big_file(&s.client, 64, "big-push");
    let roots: BTreeSet<StorePath> = [big.clone()].into();

    // Push, and kill the builder's sessions once some bytes went through.
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let progress: nixmux::ops::ProgressFn =
        Arc::new(move |p| d.store(p.bytes_done, Ordering::Relaxed));
    let push = {
        let b = b.clone();
        let roots = roots.clone();
        let local = &s.local;
        async move { b.push_closure(local, &roots, false, Some(progress)).await }
    };
    let killer = async {
        while done.load(Ordering::Relaxed) < 4 << 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.rig.builder(0).kill_sessions().expect("kill sessions");
    };
    let (r, ()) = tokio::join!(push, killer);
    let e = r.expect_err("the push must fail when the connection dies");
    assert!(e.is_retryable(), "{e}");
    assert!(
        !valid_on_builder(&s.rig, &big),
        "a half-pushed path must not be valid on the builder"
    );
    // A retry reconnects by itself and completes.
    b.push_closure(&s.local, &roots, false, None)
        .await
        .expect("retry succeeds");
    assert!(valid_on_builder(&s.rig, &big));
    s.rig
        .builder(0)
        .store()
        .run(
            "nix-store",
            ["--verify-path", &big.to_absolute(&StoreDir::default())],
        )
        .expect("verified on the builder");

    // The same for a fetch: a big output built on the builder, fetched, cut half-way.
    let (_, drv) = instantiate(
        &s.client,
        r#"derivation { name = "big-output"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "PATH=/usr/bin:/bin; head -c 64M /dev/urandom > $out"]; }"#,
    );
    let (logs, _st) = log_channel(100);
    let o = b
        .build(&s.local, &drv, &BuildOptions::default(), &logs)
        .await
        .expect("build");
    let outs: BTreeSet<StorePath> = o
        .result
        .built_outputs
        .values()
        .map(|x| x.path.clone())
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let progress: nixmux::ops::ProgressFn =
        Arc::new(move |p| d.store(p.bytes_done, Ordering::Relaxed));
    let fetch = {
        let b = b.clone();
        let outs = outs.clone();
        let local = &s.local;
        async move { b.fetch_outputs(local, &outs, Some(progress)).await }
    };
    let killer = async {
        while done.load(Ordering::Relaxed) < 4 << 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.rig.builder(0).kill_sessions().expect("kill sessions");
    };
    let (r, ()) = tokio::join!(fetch, killer);
    let e = r.expect_err("the fetch must fail when the connection dies");
    assert!(e.is_retryable(), "{e}");
    for p in &outs {
        assert!(
            !s.client
                .is_valid(&p.to_absolute(&StoreDir::default()))
                .expect("check"),
            "a half-fetched path must not be valid locally"
        );
    }
    b.fetch_outputs(&s.local, &outs, None)
        .await
        .expect("retry succeeds");
    for p in &outs {
        s.client
            .run(
                "nix-store",
                ["--verify-path", &p.to_absolute(&StoreDir::default())],
            )
            .expect("verified locally");
    }
    s.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_mid_transfer_leaves_nothing_partial_over_ssh() {
    kill_mid_transfer(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_mid_transfer_leaves_nothing_partial_over_ssh_ng() {
    kill_mid_transfer(Protocol::Worker).await;
}

async fn chatty_build_does_not_stall_others(protocol: Protocol) {
    let s = setup();
    let b = builder(&s, protocol);
    let (_, chatty) = instantiate(
        &s.client,
        r#"derivation { name = "chatty"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "PATH=/usr/bin:/bin; seq 1 100000 | sed 's/^/log line /'; echo > $out"]; }"#,
    );
    let (_, quick) = instantiate(
        &s.client,
        r#"derivation { name = "quick"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo quick > $out"]; }"#,
    );
    // Nobody reads this log: the queue fills after 64 events and the rest is dropped.
    let (chatty_logs, unread) = log_channel(64);
    let (quick_logs, _q) = log_channel(1000);
    let chatty_run = {
        let b = b.clone();
        let local = &s.local;
        let logs = chatty_logs.clone();
        async move {
            b.build(local, &chatty, &BuildOptions::default(), &logs)
                .await
        }
    };
    let quick_run = {
        let b = b.clone();
        let local = &s.local;
        async move {
            // Start once the chatty build is under way.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = std::time::Instant::now();
            let r = b
                .build(local, &quick, &BuildOptions::default(), &quick_logs)
                .await;
            (r, t.elapsed())
        }
    };
    let (c, (q, took)) = tokio::join!(chatty_run, quick_run);
    let c = c.expect("chatty build");
    let q = q.expect("quick build");
    assert!(c.result.status.is_success(), "{c:?}");
    assert!(q.result.status.is_success(), "{q:?}");
    assert!(
        unread.dropped() > 0,
        "the unread log dropped events instead of blocking"
    );
    assert!(took < Duration::from_secs(20), "quick build took {took:?}");
    eprintln!(
        "{protocol:?}: quick build beside a 100 000-line build took {took:?}; {} log events dropped",
        unread.dropped()
    );
    s.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chatty_build_does_not_stall_other_builds_over_ssh() {
    chatty_build_does_not_stall_others(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chatty_build_does_not_stall_other_builds_over_ssh_ng() {
    chatty_build_does_not_stall_others(Protocol::Worker).await;
}
