//! The pool against real OpenSSH + Nix 2.8 builders from the rig.

use std::collections::BTreeSet;
use std::time::Duration;

use nixmux::transport::{Endpoint, HostKeyCheck, Identity, TransportConfig};
use nixmux::{BuilderConfig, ConnectTarget, Pool, PoolSettings, Protocol};
use nixmux_rig::{Rig, RigConfig};

fn target(rig: &Rig, i: usize) -> ConnectTarget {
    ConnectTarget {
        endpoint: Endpoint::new("127.0.0.1", rig.builder(i).port(), "root"),
        identities: vec![Identity::key_file(rig.client_key())],
        host_keys: HostKeyCheck::strict([rig.known_hosts()]),
        transport: TransportConfig::default(),
        jump: None,
    }
}

fn rig(config: RigConfig) -> Rig {
    nixmux_rig::ensure_peers_installed().expect("peers");
    Rig::start(config).expect("rig")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_protocols_share_one_connection() {
    let rig = rig(RigConfig::with_builders(1));
    let pool = Pool::new();
    let serve = pool.add(BuilderConfig::new(
        "b0-ssh",
        Protocol::Serve,
        target(&rig, 0),
    ));
    let worker = pool.add(BuilderConfig::new(
        "b0-ssh-ng",
        Protocol::Worker,
        target(&rig, 0),
    ));
    let si = serve.remote_info().await.expect("serve");
    let wi = worker.remote_info().await.expect("worker");
    assert_eq!(si.version.to_string(), "2.7");
    assert_eq!(wi.version.to_string(), "1.34");
    assert_eq!(wi.nix_version.as_deref(), Some("2.8.0"));
    let none: BTreeSet<_> = BTreeSet::new();
    for _ in 0..20 {
        serve.query_valid_paths(&none, false).await.expect("q");
        worker.query_valid_paths(&none, false).await.expect("q");
    }
    assert_eq!(rig.builder(0).accepted_connections(), 1);
    // One session per protocol, reused.
    assert_eq!(serve.stats().sessions_created, 1);
    assert_eq!(worker.stats().sessions_created, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_operations_with_max_sessions_2() {
    let rig = rig(RigConfig {
        max_sessions: 2,
        ..RigConfig::with_builders(1)
    });
    let pool = Pool::new();
    let mut cfg = BuilderConfig::new("b0", Protocol::Worker, target(&rig, 0));
    cfg.pool = PoolSettings {
        max_sessions: 8,
        acquire_timeout: Duration::from_secs(60),
        ..PoolSettings::default()
    };
    let b = pool.add(cfg);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            b.query_valid_paths(&BTreeSet::new(), false).await
        }));
    }
    for t in tasks {
        t.await
            .expect("join")
            .expect("no open failure reaches the caller");
    }
    let h = b.health();
    assert_eq!(h.learned_channel_limit, Some(2), "{h:?}");
    let st = b.stats();
    assert!(st.sessions_created <= 8, "{st:?}");
    eprintln!("{st:?}\n{h:?}");
    pool.shutdown().await;
}
