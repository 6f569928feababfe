//! Representative cases of the ops and pool suites (`ops.rs`, `pool.rs`, `faults.rs`) against
//! the second SSH server and the second Nix of the rig: Dropbear 2022.83 (24 KiB receive
//! window, its own channel limit, no streamlocal forwarding) and Debian trixie's Nix 2.26
//! (worker protocol 1.38 with feature exchange), in the three pairings other than the default
//! OpenSSH + Nix 2.8 that the other suites use.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nixmux::ops::BuildOptions;
use nixmux::proto::build_result::BuildStatus;
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::{ErrorKind, HealthState, Pool, Protocol, log_channel};
use nixmux_rig::{NixPeer, RigConfig, SshServer, dropbear_log_patterns, log_patterns};

use common::*;

fn peers(ssh_server: SshServer, nix: NixPeer) -> RigConfig {
    RigConfig {
        ssh_server,
        nix,
        ..RigConfig::with_builders(1)
    }
}

/// Authenticated connections so far, from whichever server's log.
fn accepted(rig: &nixmux_rig::Rig, ssh_server: SshServer) -> usize {
    rig.builder(0).count_log(match ssh_server {
        SshServer::OpenSsh => log_patterns::ACCEPTED,
        SshServer::Dropbear => dropbear_log_patterns::ACCEPTED,
    })
}

/// A derivation that logs, takes an input source, and writes an incompressible 3 MB output
/// (fetched back through the server's send window).
const BUILD: &str = r#"
let src = builtins.toFile "interop-src" "input from the client\n";
in derivation { name = "NAME"; system = builtins.currentSystem; builder = "/bin/sh";
  args = ["-c" "PATH=/usr/bin:/bin; echo building-interop-output; read x < ${src}; echo $x;
    mkdir $out; head -c 3000000 /dev/urandom > $out/blob; cp ${src} $out/src"]; }
"#;

/// Ops on both protocols, concurrency over one connection, reconnection after the server was
/// killed: the representative cases, against one pairing.
async fn suite(ssh_server: SshServer, nix: NixPeer) {
    let t = Instant::now();
    let rig = rig(peers(ssh_server, nix));
    let local = local_store(&rig);
    let pool = Pool::new();
    let (worker_version, nix_version) = match nix {
        NixPeer::Host => ("1.34", "2.8."),
        NixPeer::Trixie => ("1.38", "2.26."),
    };
    let mut builders = Vec::new();
    for (i, protocol) in [Protocol::Serve, Protocol::Worker].into_iter().enumerate() {
        let b = pool.add(config(&rig, 0, protocol));
        // Ping: the handshake, versions (1.38's feature exchange included).
        let info = b.remote_info().await.expect("handshake");
        match protocol {
            Protocol::Serve => assert_eq!(info.version.to_string(), "2.7"),
            Protocol::Worker => {
                assert_eq!(info.version.to_string(), worker_version);
                assert!(
                    info.nix_version
                        .as_deref()
                        .is_some_and(|v| v.starts_with(nix_version)),
                    "{info:?}"
                );
            }
        }

        // Push a closure bigger than many of Dropbear's 24 KiB windows, then query it. The
        // path is a plain source (`nix-store --add`): over ssh-ng it goes by content
        // (`AddToStore`), which each Nix must answer with the same record.
        let big = random_path(
            rig.client_store(),
            "interop-push",
            6 << 20,
            40 + 2 * i as u64,
        );
        let roots: BTreeSet<StorePath> = [big.clone()].into();
        let report = b
            .push_closure(&local, &roots, false, None)
            .await
            .unwrap_or_else(|e| panic!("{protocol:?}: push: {e}"));
        assert_eq!(report.transferred, vec![big.clone()], "{report:?}");
        assert_eq!(
            b.query_valid_paths(&roots, false).await.expect("query"),
            roots
        );
        let infos = b.query_path_infos(&roots).await.expect("infos");
        assert_eq!(infos.len(), 1);
        assert!(infos[0].nar_size > 6 << 20, "{:?}", infos[0]);
        let here = rig
            .client_store()
            .run(
                "nix-store",
                ["-q", "--hash", &big.to_absolute(&StoreDir::default())],
            )
            .expect("local hash");
        assert_eq!(
            infos[0].nar_hash.to_nix32_prefixed(),
            String::from_utf8_lossy(&here.stdout).trim(),
            "{protocol:?}"
        );
        assert!(
            infos[0]
                .ca
                .as_deref()
                .is_some_and(|ca| ca.starts_with("fixed:r:sha256:")),
            "{protocol:?}: {:?}",
            infos[0]
        );
        assert!(
            rig.builder(0)
                .store()
                .is_valid(&big.to_absolute(&StoreDir::default()))
                .expect("check")
        );

        // A remote build with its log, then its outputs back.
        let expr = BUILD.replace("NAME", &format!("interop-out-{}", protocol.scheme()));
        let drv = instantiate(rig.client_store(), &expr);
        let (logs, _stream) = log_channel(1000);
        let o = b
            .build(&local, &drv, &BuildOptions::default(), &logs)
            .await
            .unwrap_or_else(|e| panic!("{protocol:?}: build: {e}"));
        assert_eq!(o.result.status, BuildStatus::Built, "{o:?}");
        assert!(
            o.log_tail
                .iter()
                .any(|l| l.contains("building-interop-output")),
            "{protocol:?}: {:?}",
            o.log_tail
        );
        assert!(
            o.log_tail
                .iter()
                .any(|l| l.contains("input from the client")),
            "{:?}",
            o.log_tail
        );
        let outputs: BTreeSet<StorePath> = o
            .result
            .built_outputs
            .values()
            .map(|x| x.path.clone())
            .collect();
        assert_eq!(outputs.len(), 1);
        b.fetch_outputs(&local, &outputs, None)
            .await
            .unwrap_or_else(|e| panic!("{protocol:?}: fetch: {e}"));
        for out in &outputs {
            rig.client_store()
                .run(
                    "nix-store",
                    ["--verify-path", &out.to_absolute(&StoreDir::default())],
                )
                .expect("fetched output valid, hash right");
        }
        if nix == NixPeer::Trixie {
            // Build options reach Nix 2.26 (root is trusted): the same outcomes as ops.rs
            // checks against Nix 2.8.
            for (name, body, options, want) in [
                (
                    "silent",
                    "sleep 30; echo > $out",
                    BuildOptions {
                        max_silent_time: Some(Duration::from_secs(1)),
                        ..BuildOptions::default()
                    },
                    BuildStatus::TimedOut,
                ),
                (
                    "chatty",
                    "yes | head -c 200000; echo > $out",
                    BuildOptions {
                        max_log_size: Some(10_000),
                        ..BuildOptions::default()
                    },
                    BuildStatus::LogLimitExceeded,
                ),
            ] {
                let drv = instantiate(
                    rig.client_store(),
                    &shell_drv(&format!("options-{name}-{}", protocol.scheme()), body),
                );
                let o = b
                    .build(&local, &drv, &options, &logs)
                    .await
                    .unwrap_or_else(|e| panic!("{protocol:?} {name}: {e}"));
                assert_eq!(o.result.status, want, "{protocol:?} {name}: {o:?}");
            }
        }
        builders.push(b);
    }
    let conns = accepted(&rig, ssh_server);
    assert_eq!(conns, 1, "both protocols over one connection");

    // Concurrent operations of both protocols over that one connection (8 sessions at most:
    // within OpenSSH's MaxSessions 10).
    let none = BTreeSet::new();
    let mut tasks = Vec::new();
    for k in 0..8 {
        let b = builders[k % 2].clone();
        let none = none.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                b.query_valid_paths(&none, false).await?;
            }
            b.remote_info().await.map(drop)
        }));
    }
    for task in tasks {
        task.await.expect("join").expect("concurrent operation");
    }
    for b in &builders {
        let st = b.stats();
        assert_eq!(st.connections_opened, 1, "{st:?}");
        assert_eq!(st.channel_refusals, 0, "{st:?}");
    }
    assert_eq!(accepted(&rig, ssh_server), 1);

    // The server killed (listener and sessions): a retryable error, then a reconnection once
    // it is back.
    let r = rig.clone();
    blocking(move || r.builder(0).stop_sshd().expect("stop server")).await;
    let e = builders[1]
        .query_valid_paths(&none, false)
        .await
        .expect_err("the server is gone");
    assert!(e.is_retryable(), "{e:?}");
    assert!(
        matches!(e.kind(), ErrorKind::Disconnected | ErrorKind::Connect),
        "{e:?}"
    );
    let r = rig.clone();
    blocking(move || r.builder(0).start_sshd().expect("start server")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for b in &builders {
        // Within the reconnection backoff an operation fails fast; retry until it is over.
        loop {
            match b.remote_info().await {
                Ok(_) => break,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no reconnection: {e}"),
            }
        }
        assert_eq!(b.health().state, HealthState::Up);
    }
    assert_eq!(accepted(&rig, ssh_server), 2, "one new connection");
    for b in &builders {
        eprintln!("{ssh_server:?} + {nix:?}: {}: {:?}", b.name(), b.stats());
    }
    pool.shutdown().await;
    eprintln!("{ssh_server:?} + {nix:?}: {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropbear_with_nix_2_8() {
    suite(SshServer::Dropbear, NixPeer::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_with_nix_2_26() {
    suite(SshServer::OpenSsh, NixPeer::Trixie).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropbear_with_nix_2_26() {
    suite(SshServer::Dropbear, NixPeer::Trixie).await;
}

/// Dropbear has no MaxSessions: its only per-connection bound is the compile-time
/// `MAX_CHANNELS` (`sysoptions.h`; 1000 in 2022.83), far above what a pool opens. So
/// many more concurrent sessions than OpenSSH's default 10 share one connection: no refusal,
/// no learned limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropbear_takes_many_sessions_on_one_connection() {
    let rig = rig(peers(SshServer::Dropbear, NixPeer::Host));
    let pool = Pool::new();
    let mut cfg = config(&rig, 0, Protocol::Serve);
    // Every session holds its channel for a while, so that all are open at once.
    cfg.remote_command = "sleep 1; exec nix-store --serve --write".to_owned();
    cfg.pool.max_sessions = 40;
    cfg.connections.max_connections = 1;
    let b = pool.add(cfg);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move { b.remote_info().await }));
    }
    for task in tasks {
        task.await.expect("join").expect("every session opens");
    }
    let st = b.stats();
    let h = b.health();
    eprintln!("{:?}\n{st:?}\n{h:?}", t.elapsed());
    assert_eq!(st.connections_opened, 1, "{st:?}");
    assert_eq!(st.peak_channels_per_connection, 40, "{st:?}");
    assert_eq!(st.channel_refusals, 0, "{st:?}");
    assert_eq!(h.learned_channel_limit, None, "{h:?}");
    pool.shutdown().await;
}

/// Build options for an untrusted user (the rig's non-root account, `require-sigs = false`):
/// its `nix-store --serve` and `nix-daemon --stdio` build through the builder's nix-daemon,
/// which applies only the options that reach it. What reaches it (Nix 2.8 here; Nix 2.26 the
/// same, checked by hand; docs/interop.md, "Limitation: build options for untrusted users"):
/// * `ssh-ng://`: `max-silent-time` and `build-timeout` are enforced; `max-log-size` is not:
///   the daemon ignores it from untrusted clients (a restricted setting, `daemon.cc`,
///   `ClientSettings::apply`).
/// * `ssh://`: none is enforced. `nix-store --serve` sets them in its own process only
///   ("FIXME: changing options here doesn't work if we're building through the daemon",
///   `nix-store.cc`, `opServe`): the daemon connection it opened for an earlier command of
///   the session keeps the options it had then.
///
/// The test pins this (with builds short enough to end anyway), so that a Nix that changes it
/// shows up here. The session is warmed first: it is what nixmux's pool does anyway.
async fn untrusted_build_options(protocol: Protocol) {
    let rig = rig(RigConfig {
        untrusted_user: Some("nixuser".into()),
        extra_nix_conf: vec!["require-sigs = false".into()],
        ..RigConfig::with_builders(1)
    });
    let local = local_store(&rig);
    let pool = Pool::new();
    let mut cfg = config(&rig, 0, protocol);
    cfg.target.endpoint =
        nixmux::transport::Endpoint::new("127.0.0.1", rig.builder(0).port(), "nixuser");
    cfg.pool.max_sessions = 1;
    let b = pool.add(cfg);
    b.query_valid_paths(&BTreeSet::new(), false)
        .await
        .expect("warm session");
    let (logs, _stream) = log_channel(1000);
    // The builder's Nix applies none of them for an untrusted ssh:// login, nor
    // max-log-size for an untrusted ssh-ng:// one (docs/interop.md); nixmux enforces them
    // itself then, a moment after the builder should have.
    let cases = [
        (
            "silent",
            "sleep 4; echo > $out",
            BuildOptions {
                max_silent_time: Some(Duration::from_secs(1)),
                ..BuildOptions::default()
            },
            BuildStatus::TimedOut,
        ),
        (
            "ticking",
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13; do echo tick; sleep 0.3; done; echo > $out",
            BuildOptions {
                timeout: Some(Duration::from_secs(1)),
                ..BuildOptions::default()
            },
            BuildStatus::TimedOut,
        ),
        (
            "chatty",
            "yes | head -c 200000; echo > $out",
            BuildOptions {
                max_log_size: Some(10_000),
                ..BuildOptions::default()
            },
            BuildStatus::LogLimitExceeded,
        ),
    ];
    for (name, body, options, want) in cases {
        let drv = instantiate(
            rig.client_store(),
            &shell_drv(&format!("untrusted-{name}-{}", protocol.scheme()), body),
        );
        let t = Instant::now();
        let o = b
            .build(&local, &drv, &options, &logs)
            .await
            .unwrap_or_else(|e| panic!("{protocol:?} {name}: {e}"));
        eprintln!(
            "{protocol:?} {name}: {:?} after {:?}",
            o.result.status,
            t.elapsed()
        );
        assert_eq!(o.result.status, want, "{protocol:?} {name}: {o:?}");
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_build_options_over_ssh_are_enforced_by_nixmux() {
    untrusted_build_options(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_build_options_over_ssh_ng_log_size_by_nixmux() {
    untrusted_build_options(Protocol::Worker).await;
}
