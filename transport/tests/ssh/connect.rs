//! Connecting, exec basics, authentication, connect failures.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixmux_transport::{
    ConnectEvent, ConnectEventKind, ErrorKind, ExitStatus, HostKeySource, Identity, NoopObserver,
    Stage, TransportError, connect,
};

use crate::support::{Agent, Sshd, config, keygen, read_all};

const T: Duration = Duration::from_secs(20);

/// Connect, run commands, check stdout, stderr tail, exit codes, stats and stage events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_echo_exit_codes_and_stages() {
    let sshd = Sshd::start();
    let events: Arc<Mutex<Vec<ConnectEvent>>> = Arc::default();
    let sink = events.clone();
    let t0 = Instant::now();
    let conn = connect(
        &sshd.endpoint(),
        &sshd.identities(),
        &sshd.host_key_check(),
        &config(),
        move |e: &ConnectEvent| sink.lock().expect("lock").push(e.clone()),
    )
    .await
    .expect("connect");
    let connect_time = t0.elapsed();

    let kinds: Vec<String> = events
        .lock()
        .expect("lock")
        .iter()
        .map(|e| {
            format!("{:?}", e.kind)
                .split([' ', '{'])
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Resolved",
            "TcpConnected",
            "KeyExchangeDone",
            "HostKeyVerified",
            "Negotiated",
            "Authenticated"
        ]
    );
    for e in events.lock().expect("lock").iter() {
        println!("  {:>8.2?} (+{:>8.2?}) {:?}", e.at, e.took, e.kind);
        if let ConnectEventKind::HostKeyVerified { source, .. } = &e.kind {
            assert_eq!(
                source,
                &HostKeySource::KnownHosts {
                    path: sshd.known_hosts.clone(),
                    line: 1
                }
            );
        }
    }
    assert_eq!(
        conn.algorithms(),
        Some(("curve25519-sha256", "aes128-gcm@openssh.com"))
    );
    assert!(conn.host_key_fingerprint().starts_with("SHA256:"));
    assert!(conn.identity().contains("client_ed25519"));

    let t1 = Instant::now();
    let mut ch = conn
        .exec("echo hello; echo to-stderr >&2; exit 3")
        .await
        .expect("exec");
    let extra_channel = t1.elapsed();
    let out = read_all(ch.stdout(), T).await;
    assert_eq!(out, b"hello\n");
    assert_eq!(ch.exit().await.expect("exit"), ExitStatus::Code(3));
    assert_eq!(ch.status().stderr_tail_lossy(), "to-stderr\n");

    let mut ch = conn.exec("echo ok").await.expect("exec");
    assert_eq!(read_all(ch.stdout(), T).await, b"ok\n");
    assert!(ch.exit().await.expect("exit").success());

    let st = conn.stats();
    assert_eq!(st.channels_opened, 2);
    assert_eq!(st.bytes_in, "hello\nto-stderr\nok\n".len() as u64);
    assert!(st.wire_bytes_in > st.bytes_in);
    println!("connect+auth: {connect_time:.2?}, exec on live connection: {extra_channel:.2?}");
    conn.disconnect().await;
    assert!(conn.is_closed());
}

/// A command that does not exist exits 127, and its stderr tail says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_command_is_127_with_stderr() {
    let sshd = Sshd::start();
    let conn = connect(
        &sshd.endpoint(),
        &sshd.identities(),
        &sshd.host_key_check(),
        &config(),
        NoopObserver,
    )
    .await
    .expect("connect");
    let mut ch = conn.exec("no-such-command-nixmux-xyz").await.expect("exec");
    assert!(read_all(ch.stdout(), T).await.is_empty());
    assert_eq!(ch.exit().await.expect("exit"), ExitStatus::Code(127));
    let tail = ch.status().stderr_tail_lossy();
    assert!(tail.contains("not found"), "{tail}");

    // Killed by a signal.
    let ch = conn.exec("kill -TERM $$").await.expect("exec");
    match ch.exit().await.expect("exit") {
        ExitStatus::Signal { name, .. } => assert_eq!(name, "TERM"),
        other => panic!("{other:?}"),
    }
}

/// Only a key the server does not know: AuthRejected naming what was tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_client_key_is_auth_rejected() {
    let sshd = Sshd::start();
    let other = keygen(sshd.path(), "stranger", "ed25519", "");
    let missing = sshd.path().join("does-not-exist");
    let err = connect(
        &sshd.endpoint(),
        &[Identity::key_file(&missing), Identity::key_file(&other)],
        &sshd.host_key_check(),
        &config(),
        NoopObserver,
    )
    .await
    .expect_err("must fail");
    println!("{err}");
    match &err {
        TransportError::AuthRejected {
            user,
            tried,
            methods_remaining,
        } => {
            assert_eq!(user, "root");
            assert_eq!(tried.len(), 2);
            assert!(tried[0].contains("not loaded"), "{tried:?}");
            assert!(
                tried[1].contains("stranger") && tried[1].contains("SHA256:"),
                "{tried:?}"
            );
            assert!(methods_remaining.contains(&"publickey".to_string()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Auth);
    assert!(!err.is_retryable());

    // Nothing could even be offered: the load error itself.
    let err = connect(
        &sshd.endpoint(),
        &[Identity::key_file(&missing)],
        &sshd.host_key_check(),
        &config(),
        NoopObserver,
    )
    .await
    .expect_err("must fail");
    assert!(matches!(err, TransportError::KeyLoad { .. }), "{err}");
}

/// RSA (rsa-sha2 negotiated), ECDSA and a passphrase-protected key all authenticate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_ecdsa_and_encrypted_keys() {
    let sshd = Sshd::start();
    let rsa = keygen(sshd.path(), "id_rsa", "rsa", "");
    let ecdsa = keygen(sshd.path(), "id_ecdsa", "ecdsa", "");
    let enc = keygen(sshd.path(), "id_enc", "ed25519", "correct horse");
    for k in [&rsa, &ecdsa, &enc] {
        sshd.authorize(k);
    }
    let cases = [
        (Identity::key_file(&rsa), "rsa-sha2-512"),
        (Identity::key_file(&ecdsa), "ecdsa-sha2-nistp256"),
        (
            Identity::KeyFile {
                path: enc.clone(),
                passphrase: Some("correct horse".into()),
            },
            "ssh-ed25519",
        ),
    ];
    for (id, alg) in cases {
        let conn = connect(
            &sshd.endpoint(),
            &[id],
            &sshd.host_key_check(),
            &config(),
            NoopObserver,
        )
        .await
        .expect("connect");
        assert!(conn.identity().contains(alg), "{}", conn.identity());
        conn.disconnect().await;
    }
    // Encrypted key without or with the wrong passphrase: a KeyLoad error.
    for pass in [None, Some("wrong".to_string())] {
        let err = connect(
            &sshd.endpoint(),
            &[Identity::KeyFile {
                path: enc.clone(),
                passphrase: pass,
            }],
            &sshd.host_key_check(),
            &config(),
            NoopObserver,
        )
        .await
        .expect_err("must fail");
        println!("{err}");
        assert!(matches!(err, TransportError::KeyLoad { .. }), "{err}");
    }
}

/// Keys from our own ssh-agent (started and killed by the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_auth() {
    let sshd = Sshd::start();
    let agent = Agent::start(sshd.path());
    // A key the server does not know first, then the right one: both are tried.
    let stranger = keygen(sshd.path(), "stranger", "ed25519", "");
    agent.add(&stranger);
    agent.add(&sshd.client_key);
    let conn = connect(
        &sshd.endpoint(),
        &[Identity::Agent {
            socket: Some(agent.socket.clone()),
        }],
        &sshd.host_key_check(),
        &config(),
        NoopObserver,
    )
    .await
    .expect("agent auth");
    assert!(
        conn.identity().starts_with("agent key"),
        "{}",
        conn.identity()
    );
    assert!(
        conn.identity().contains("client_ed25519"),
        "{}",
        conn.identity()
    );
    let mut ch = conn.exec("echo via-agent").await.expect("exec");
    assert_eq!(read_all(ch.stdout(), T).await, b"via-agent\n");

    // An agent socket that does not exist: an Agent error.
    let err = connect(
        &sshd.endpoint(),
        &[Identity::Agent {
            socket: Some(sshd.path().join("nope.sock")),
        }],
        &sshd.host_key_check(),
        &config(),
        NoopObserver,
    )
    .await
    .expect_err("must fail");
    assert!(matches!(err, TransportError::Agent { .. }), "{err}");
}

/// A closed port fails fast with Connect; a listener that never speaks SSH fails at the
/// handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_port_fast_and_blackhole_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = keygen(dir.path(), "k", "ed25519", "");
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let t = Instant::now();
    let err = connect(
        &nixmux_transport::Endpoint::new("127.0.0.1", closed_port, "root"),
        &[Identity::key_file(&key)],
        &nixmux_transport::HostKeyCheck::strict([]),
        &config(),
        NoopObserver,
    )
    .await
    .expect_err("closed");
    let took = t.elapsed();
    println!("closed port: {err} after {took:.2?}");
    assert!(matches!(err, TransportError::Connect { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(took < Duration::from_secs(1));

    // Accepts TCP (the kernel completes the handshake into the backlog) but never sends a
    // banner.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = blackhole.local_addr().expect("addr").port();
    let mut cfg = config();
    cfg.handshake_timeout = Duration::from_millis(1500);
    let t = Instant::now();
    let err = connect(
        &nixmux_transport::Endpoint::new("127.0.0.1", port, "root"),
        &[Identity::key_file(&key)],
        &nixmux_transport::HostKeyCheck::strict([]),
        &cfg,
        NoopObserver,
    )
    .await
    .expect_err("blackhole");
    let took = t.elapsed();
    println!("blackhole: {err} after {took:.2?}");
    assert!(
        matches!(
            err,
            TransportError::Timeout {
                stage: Stage::Handshake,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    drop(blackhole);
}

/// A second SSH connection tunnelled through a direct-tcpip channel of the first
/// (ProxyJump), over `connect_over`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_jump_over_direct_tcpip() {
    let sshd = Sshd::start();
    let jump = connect(
        &sshd.endpoint(),
        &sshd.identities(),
        &sshd.host_key_check(),
        &config(),
        NoopObserver,
    )
    .await
    .expect("jump host");
    let tunnel = jump
        .open_direct_tcpip("127.0.0.1", sshd.port)
        .await
        .expect("direct-tcpip");
    let inner = nixmux_transport::connect_over(
        tunnel,
        &sshd.endpoint(),
        &sshd.identities(),
        &sshd.host_key_check(),
        &config(),
        NoopObserver,
    )
    .await
    .expect("connect through tunnel");
    let mut ch = inner.exec("echo tunnelled").await.expect("exec");
    assert_eq!(read_all(ch.stdout(), T).await, b"tunnelled\n");
    assert!(jump.stats().bytes_in > 0);

    // A target nobody listens on: the jump host refuses the channel.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let err = jump
        .open_direct_tcpip("127.0.0.1", dead)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, TransportError::ChannelOpenRefused { .. }),
        "{err}"
    );
    assert!(!jump.is_closed());
}

/// The first channel on a fresh connection must not pay sshd's Nagle + our delayed ACK
/// (~40 ms, see `connect`): best of three fresh connections under 30 ms. Also prints the
/// cost of further channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_channel_has_no_delayed_ack_stall() {
    let sshd = Sshd::start();
    let mut firsts = Vec::new();
    for _ in 0..3 {
        let conn = connect(
            &sshd.endpoint(),
            &sshd.identities(),
            &sshd.host_key_check(),
            &config(),
            NoopObserver,
        )
        .await
        .expect("connect");
        let mut times = Vec::new();
        for _ in 0..4 {
            let t = Instant::now();
            let mut ch = conn.exec("true").await.expect("exec");
            let reply = t.elapsed();
            let _ = read_all(ch.stdout(), T).await;
            let _ = ch.exit().await;
            times.push((reply, t.elapsed()));
        }
        println!("exec reply / exit per channel: {times:.2?}");
        firsts.push(times[0].0);
        conn.disconnect().await;
    }
    let best = firsts.iter().min().copied().unwrap_or_default();
    assert!(
        best < Duration::from_millis(30),
        "first channel took {firsts:?}"
    );
}
