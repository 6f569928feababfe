//! The pool against nixmux-testkit's in-process SSH server, which serves fake Nix peers
//! (serve 2.7 and worker 1.34, as Nix 2.8.0) on exec: fast, without root, sshd or Nix.
//! The rig tests (`pool.rs`, `ops.rs`, ...) are the real thing; these check the pool's
//! own logic, and its behaviour when the server misbehaves, in milliseconds.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nixmux::transport::{
    Endpoint, HostKeyCheck, HostPublicKey, Identity, Stage, TransportConfig, TransportError,
};
use nixmux::{BuilderConfig, ConnectTarget, ErrorKind, Pool, PoolSettings, Protocol};
use nixmux_testkit::fake::{FakeStore, sample, sp};
use nixmux_testkit::keys::{KeyFile, ed25519, machines_field};
use nixmux_testkit::server::{OpenMode, ServerOptions, TestServer};

const TEST_LIMIT: Duration = Duration::from_secs(8);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("the test hung")
}

struct Peer {
    server: TestServer,
    key: KeyFile,
}

async fn peer(tweak: impl FnOnce(&mut ServerOptions)) -> Peer {
    let client = ed25519();
    let key = KeyFile::write(&client, None).expect("key file");
    let mut options = ServerOptions::new(client.public_key().clone());
    let mut store = FakeStore::default();
    let (info, nar) = sample(sp(1, "present"), b"hello", &[]);
    store.add(info, nar);
    options.nix.store = store;
    tweak(&mut options);
    let server = TestServer::start(options).await.expect("server starts");
    Peer { server, key }
}

fn transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.handshake_timeout = Duration::from_secs(2);
    t.auth_timeout = Duration::from_secs(2);
    t.channel_open_timeout = Duration::from_millis(500);
    t.exec_timeout = Duration::from_millis(500);
    t.close_grace = Duration::from_millis(300);
    t
}

fn builder(p: &Peer, protocol: Protocol) -> BuilderConfig {
    let host_key = HostPublicKey::from_machines_field(&machines_field(p.server.host_key()))
        .expect("host key parses");
    let mut cfg = BuilderConfig::new(
        format!("{}://inprocess", protocol.scheme()),
        protocol,
        ConnectTarget {
            endpoint: Endpoint::new("127.0.0.1", p.server.port(), "nix"),
            identities: vec![Identity::key_file(&p.key.path)],
            host_keys: HostKeyCheck::pinned([host_key]),
            transport: transport(),
            jump: None,
            hooks: Default::default(),
        },
    );
    cfg.pool = PoolSettings {
        max_sessions: 8,
        acquire_timeout: Duration::from_secs(3),
        ..PoolSettings::default()
    };
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_protocols_over_one_inprocess_connection() {
    bounded(async {
        let p = peer(|_| {}).await;
        let pool = Pool::new();
        let serve = pool.add(builder(&p, Protocol::Serve));
        let worker = pool.add(builder(&p, Protocol::Worker));
        let si = serve.remote_info().await.expect("serve");
        let wi = worker.remote_info().await.expect("worker");
        assert_eq!(si.version.to_string(), "2.7");
        assert_eq!(wi.version.to_string(), "1.34");
        assert_eq!(wi.nix_version.as_deref(), Some("2.8.0"));
        let asked: BTreeSet<_> = [sp(1, "present"), sp(2, "absent")].into();
        let want: BTreeSet<_> = [sp(1, "present")].into();
        for _ in 0..10 {
            assert_eq!(
                serve.query_valid_paths(&asked, false).await.expect("q"),
                want
            );
            assert_eq!(
                worker.query_valid_paths(&asked, false).await.expect("q"),
                want
            );
        }
        // One connection for both protocols (same host, user and key), sessions reused.
        assert_eq!(p.server.stats().connections.load(Ordering::Relaxed), 1);
        assert_eq!(serve.stats().sessions_created, 1);
        assert_eq!(worker.stats().sessions_created, 1);
        pool.shutdown().await;
    })
    .await
}

/// A burst of concurrent operations: all succeed over one connection with at most
/// `max_sessions` sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_concurrent_operations() {
    bounded(async {
        let p = peer(|_| {}).await;
        let pool = Pool::new();
        let b = pool.add(builder(&p, Protocol::Worker));
        let asked: BTreeSet<_> = [sp(1, "present"), sp(3, "absent")].into();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (b, asked) = (b.clone(), asked.clone());
            tasks.push(tokio::spawn(async move {
                b.query_valid_paths(&asked, false).await
            }));
        }
        for t in tasks {
            let got = t.await.expect("join").expect("query");
            assert_eq!(got, [sp(1, "present")].into());
        }
        let st = b.stats();
        eprintln!("100 operations in {:?}: {st:?}", start.elapsed());
        assert_eq!(st.connections_opened, 1, "{st:?}");
        assert!(st.sessions_created <= 8, "{st:?}");
        assert_eq!(st.acquire_timeouts, 0, "{st:?}");
        pool.shutdown().await;
    })
    .await
}

/// The server stops answering channel opens: an operation fails with a typed timeout
/// within the channel-open timeout (plus the pool's retries), the pool is not wedged, and
/// once the server answers again the next operation succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_confirmed_channel_open_then_recovery() {
    bounded(async {
        let p = peer(|o| o.open_mode = OpenMode::NeverConfirm).await;
        let pool = Pool::new();
        let b = pool.add(builder(&p, Protocol::Serve));
        let start = Instant::now();
        let e = b.remote_info().await.expect_err("no channel can be opened");
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e:?}");
        assert!(
            matches!(
                e.transport_error(),
                Some(TransportError::Timeout {
                    stage: Stage::ChannelOpen,
                    ..
                })
            ),
            "{e:?}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert!(e.is_retryable(), "{e:?}");
        assert!(
            p.server.stats().opens_unanswered.load(Ordering::Relaxed) >= 1,
            "{:?}",
            p.server.stats()
        );
        p.server.set_open_mode(OpenMode::Confirm);
        let info = b
            .remote_info()
            .await
            .expect("works once the server answers");
        assert_eq!(info.version.to_string(), "2.7");
        let asked: BTreeSet<_> = [sp(1, "present")].into();
        assert_eq!(b.query_valid_paths(&asked, false).await.expect("q"), asked);
        pool.shutdown().await;
    })
    .await
}

/// `Debug` of a builder's configuration never prints a key passphrase.
#[tokio::test]
async fn builder_config_debug_has_no_passphrase() {
    let p = peer(|_| {}).await;
    let mut cfg = builder(&p, Protocol::Worker);
    let passphrase = "s3cret-passphrase-do-not-print";
    cfg.target.identities = vec![Identity::KeyFile {
        path: p.key.path.clone(),
        passphrase: Some(passphrase.into()),
    }];
    let shown = format!("{cfg:?} {cfg:#?}");
    assert!(!shown.contains(passphrase), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");
}

/// A machines-file reload: `Pool::replace` puts a new builder in the old one's place; the
/// old one leaves the pool, the new one works on the same (shared) connection, and
/// `Pool::select` only ever offers what is in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_swaps_a_builder_and_select_follows() {
    bounded(async {
        let p = peer(|_| {}).await;
        let pool = Pool::new();
        let mut old_cfg = builder(&p, Protocol::Worker);
        old_cfg.machine.systems = vec!["x86_64-linux".into()];
        let old = pool.add(old_cfg);
        let none = BTreeSet::new();
        old.query_valid_paths(&none, false)
            .await
            .expect("old works");

        let mut new_cfg = builder(&p, Protocol::Worker);
        new_cfg.name = "ssh-ng://inprocess-reloaded".into();
        new_cfg.machine.systems = vec!["aarch64-linux".into()];
        let new = pool.replace(&old, new_cfg).await;
        let names: Vec<String> = pool
            .builders()
            .iter()
            .map(|b| b.name().to_owned())
            .collect();
        assert_eq!(names, ["ssh-ng://inprocess-reloaded"]);
        new.query_valid_paths(&none, false)
            .await
            .expect("new works");
        assert_eq!(new.stats().connections_opened, 1, "one connection, shared");

        let picked = pool
            .select("aarch64-linux", &BTreeSet::new())
            .expect("the new builder takes aarch64-linux");
        assert_eq!(picked.name(), "ssh-ng://inprocess-reloaded");
        let e = pool
            .select("x86_64-linux", &BTreeSet::new())
            .expect_err("nobody builds x86_64-linux any more");
        assert_eq!(e.kind(), ErrorKind::NoSuitableBuilder, "{e}");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("not x86_64-linux"), "{e}");
        pool.shutdown().await;
    })
    .await;
}
