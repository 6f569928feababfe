//! Connection death: keepalive against a frozen server, killed server, peer DISCONNECT,
//! local disconnect. The real cause must reach every waiter and every channel.

use std::io::ErrorKind as IoKind;
use std::time::{Duration, Instant};

use nixmux_transport::{DisconnectCause, NoopObserver, Stage, TransportError, connect};
use tokio::io::AsyncReadExt;

use crate::support::{Sshd, SshdOptions, config, conn_with};

/// SIGSTOP every sshd process of the connection: keepalives go unanswered and the
/// connection is declared dead within interval × (max + 1), with cause KeepaliveTimeout
/// delivered to `closed()` waiters, to `exit()` and to a stdout reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_detects_frozen_server() {
    let sshd = Sshd::start();
    let mut cfg = config();
    let interval = Duration::from_secs(1);
    cfg.keepalive_interval = Some(interval);
    cfg.keepalive_max_misses = 2;
    let conn = conn_with(&sshd, &cfg).await;
    let mut ch = conn.exec("cat").await.expect("exec");
    let waiter = {
        let c = conn.clone();
        tokio::spawn(async move { c.closed().await })
    };

    sshd.freeze();
    let t = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(15), conn.closed())
        .await
        .expect("keepalive must notice within 15 s");
    let took = t.elapsed();
    println!("frozen server detected after {took:.2?}: {err}");
    let bound = interval * 3;
    assert!(
        took <= bound + Duration::from_millis(700),
        "{took:?} > {bound:?}"
    );
    assert_eq!(
        err.disconnect_cause(),
        Some(&DisconnectCause::KeepaliveTimeout {
            interval,
            max_misses: 2
        })
    );
    assert!(err.is_retryable());
    // The other waiter got the same cause.
    let other = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("waiter")
        .expect("join");
    assert_eq!(other.disconnect_cause(), err.disconnect_cause());
    assert!(conn.is_closed());

    // The channel learns the same.
    let exit = tokio::time::timeout(Duration::from_secs(10), ch.exit())
        .await
        .expect("exit must resolve");
    match exit {
        Err(TransportError::Disconnected { cause, .. }) => {
            assert!(matches!(cause, DisconnectCause::KeepaliveTimeout { .. }));
        }
        other => panic!("{other:?}"),
    }
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), ch.stdout().read(&mut buf))
        .await
        .expect("read resolves");
    let e = read.expect_err("a lost connection is not EOF");
    assert_eq!(e.kind(), IoKind::ConnectionAborted);
    assert!(e.to_string().contains("keepalive"), "{e}");

    // New channels fail at once with the cause.
    let t = Instant::now();
    let e = conn.exec("true").await.expect_err("dead");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(
            e,
            TransportError::Disconnected {
                stage: Stage::ChannelOpen,
                ..
            }
        ),
        "{e}"
    );
    sshd.thaw();
}

/// The server's processes die (kill -9): EOF on the socket, reported as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_reports_connection_closed() {
    let sshd = Sshd::start();
    let conn = conn_with(&sshd, &config()).await;
    let ch = conn.exec("sleep 600").await.expect("exec");
    sshd.kill_sessions();
    let err = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("noticed");
    println!("killed server: {err}");
    assert!(
        matches!(
            err.disconnect_cause(),
            Some(DisconnectCause::ConnectionClosed | DisconnectCause::Io { .. })
        ),
        "{err}"
    );
    let exit = tokio::time::timeout(Duration::from_secs(10), ch.exit())
        .await
        .expect("exit");
    assert!(
        matches!(exit, Err(TransportError::Disconnected { .. })),
        "{exit:?}"
    );
}

/// sshd ends an unused connection (OpenSSH 9.2 `UnusedConnectionTimeout`) by exiting, no
/// SSH DISCONNECT: reported as the connection closed by the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_exit_is_connection_closed() {
    let sshd = Sshd::start_with(SshdOptions {
        extra_config: vec!["UnusedConnectionTimeout 1s".into()],
        ..Default::default()
    });
    let conn = conn_with(&sshd, &config()).await;
    let err = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("server closes the unused connection");
    println!("unused connection: {err}");
    assert_eq!(
        err.disconnect_cause(),
        Some(&DisconnectCause::ConnectionClosed)
    );
}

/// sshd sends an SSH DISCONNECT after `MaxAuthTries` failures: the server's reason is
/// reported with the rejected identities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_disconnect_reason_reported() {
    let sshd = Sshd::start_with(SshdOptions {
        extra_config: vec!["MaxAuthTries 1".into()],
        ..Default::default()
    });
    let a = crate::support::keygen(sshd.path(), "a", "ed25519", "");
    let b = crate::support::keygen(sshd.path(), "b", "ed25519", "");
    let err = connect(
        &sshd.endpoint(),
        &[
            nixmux_transport::Identity::key_file(&a),
            nixmux_transport::Identity::key_file(&b),
            nixmux_transport::Identity::key_file(&sshd.client_key),
        ],
        &sshd.host_key_check(),
        &config(),
        NoopObserver,
    )
    .await
    .expect_err("too many failures");
    println!("{err}");
    match &err {
        TransportError::AuthRejected { tried, .. } => {
            let last = tried.last().expect("tried");
            assert!(
                last.contains("Too many authentication failures"),
                "{tried:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// `disconnect()` ends the connection with cause Local, for every clone and channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_disconnect() {
    let sshd = Sshd::start();
    let conn = conn_with(&sshd, &config()).await;
    let ch = conn.exec("cat").await.expect("exec");
    let clone = conn.clone();
    let t = Instant::now();
    conn.disconnect().await;
    println!("disconnect took {:.2?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3));
    let err = tokio::time::timeout(Duration::from_secs(5), clone.closed())
        .await
        .expect("closed");
    assert_eq!(err.disconnect_cause(), Some(&DisconnectCause::Local));
    let exit = tokio::time::timeout(Duration::from_secs(10), ch.exit())
        .await
        .expect("exit");
    match exit {
        Err(TransportError::Disconnected { cause, .. }) => {
            assert_eq!(cause, DisconnectCause::Local)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(conn.stats().channels_open, 0);
}
