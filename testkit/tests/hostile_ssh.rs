//! nixmux-transport against hostile SSH servers, all in-process (no root, no sshd): every
//! misbehaviour ends in a typed [`TransportError`] (or a clean EOF / exit status where that
//! is the right answer), with bounded memory, no panic and no hang. Each test body runs
//! under [`bounded`], so a hang fails the test instead of blocking the suite.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixmux_testkit::keys::{KeyFile, ed25519, machines_field};
use nixmux_testkit::logcap::ScopedCapture;
use nixmux_testkit::server::{OpenMode, ServerOptions, TestServer, blob_byte, commands};
use nixmux_testkit::tcp::{CutProxy, Trickle};
use nixmux_transport::{
    ConnectEvent, ConnectEventKind, DisconnectCause, Endpoint, ErrorKind, ExitStatus, HostKeyCheck,
    HostPublicKey, Identity, NoopObserver, SshConnection, Stage, StdoutSpill, TransportConfig,
    TransportError, connect,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every test must finish well within this; a hang is a failure, not a stuck suite.
const TEST_LIMIT: Duration = Duration::from_secs(8);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("the test hung: no typed error within the limit")
}

/// Short timeouts everywhere, so that every failure mode shows up in well under a second
/// or two.
fn config() -> TransportConfig {
    let mut c = TransportConfig::default();
    c.tcp_connect_timeout = Duration::from_secs(2);
    c.handshake_timeout = Duration::from_secs(1);
    c.auth_timeout = Duration::from_secs(2);
    c.channel_open_timeout = Duration::from_millis(500);
    c.exec_timeout = Duration::from_millis(500);
    c.keepalive_interval = Some(Duration::from_millis(300));
    c.keepalive_max_misses = 2;
    c.close_grace = Duration::from_millis(300);
    c
}

struct Peer {
    server: TestServer,
    key: KeyFile,
}

async fn peer(tweak: impl FnOnce(&mut ServerOptions)) -> Peer {
    let client = ed25519();
    let key = KeyFile::write(&client, None).expect("key file");
    let mut options = ServerOptions::new(client.public_key().clone());
    tweak(&mut options);
    let server = TestServer::start(options).await.expect("server starts");
    Peer { server, key }
}

fn pinned(server: &TestServer) -> HostKeyCheck {
    HostKeyCheck::pinned([
        HostPublicKey::from_machines_field(&machines_field(server.host_key())).expect("host key"),
    ])
}

async fn connect_to(
    peer: &Peer,
    port: u16,
    config: &TransportConfig,
) -> Result<SshConnection, TransportError> {
    connect(
        &Endpoint::new("127.0.0.1", port, "nix"),
        &[Identity::key_file(&peer.key.path)],
        &pinned(&peer.server),
        config,
        NoopObserver,
    )
    .await
}

async fn conn(peer: &Peer) -> SshConnection {
    connect_to(peer, peer.server.port(), &config())
        .await
        .expect("connects")
}

/// Runs `command`, reads all of stdout, returns it with the exit status.
async fn run(conn: &SshConnection, command: &str) -> (Vec<u8>, ExitStatus) {
    let mut ch = conn.exec(command).await.expect("exec");
    let mut out = Vec::new();
    ch.stdout().read_to_end(&mut out).await.expect("stdout");
    let exit = ch.exit().await.expect("exit status");
    (out, exit)
}

/// Polls `f` every 10 ms until true or `limit` passes.
async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

// ===== baseline =====

#[tokio::test]
async fn well_behaved_server_baseline() {
    bounded(async {
        let p = peer(|_| {}).await;
        let c = conn(&p).await;
        assert_eq!(
            run(&c, "echo hello").await,
            (b"hello\n".to_vec(), ExitStatus::Code(0))
        );
        let (out, exit) = run(&c, "blob 1000000").await;
        assert_eq!(exit, ExitStatus::Code(0));
        assert_eq!(out.len(), 1_000_000);
        assert!(
            out.iter()
                .enumerate()
                .all(|(i, b)| *b == blob_byte(i as u64))
        );
        assert_eq!(run(&c, "exit 7").await.1, ExitStatus::Code(7));
        let mut ch = c.exec("nope").await.expect("exec");
        let mut out = Vec::new();
        ch.stdout().read_to_end(&mut out).await.expect("stdout");
        assert_eq!(ch.exit().await.expect("exit"), ExitStatus::Code(127));
        assert!(String::from_utf8_lossy(&ch.stderr_tail()).contains("command not found"));
        c.disconnect().await;
    })
    .await
}

#[tokio::test]
async fn wrong_client_key_and_wrong_host_key_are_refused() {
    bounded(async {
        let p = peer(|_| {}).await;
        let stranger = KeyFile::write(&ed25519(), None).expect("key file");
        let e = connect(
            &Endpoint::new("127.0.0.1", p.server.port(), "nix"),
            &[Identity::key_file(&stranger.path)],
            &pinned(&p.server),
            &config(),
            NoopObserver,
        )
        .await
        .expect_err("a key the server does not know");
        assert!(matches!(e, TransportError::AuthRejected { .. }), "{e:?}");

        let other_host = ed25519();
        let e = connect(
            &Endpoint::new("127.0.0.1", p.server.port(), "nix"),
            &[Identity::key_file(&p.key.path)],
            &HostKeyCheck::pinned([HostPublicKey::from_machines_field(&machines_field(
                other_host.public_key(),
            ))
            .expect("key")]),
            &config(),
            NoopObserver,
        )
        .await
        .expect_err("a host key we did not pin");
        assert_eq!(e.kind(), ErrorKind::HostKey, "{e:?}");
        assert_eq!(p.server.stats().authenticated.load(Ordering::Relaxed), 0);
    })
    .await
}

// ===== channel opens =====

/// The server never answers a channel open (no confirmation, no failure) while the rest of
/// the connection keeps working: a typed timeout at the channel-open stage, and once the
/// server confirms opens again the same connection serves the next exec.
#[tokio::test]
async fn channel_open_never_confirmed_is_a_typed_timeout() {
    bounded(async {
        let p = peer(|o| o.open_mode = OpenMode::NeverConfirm).await;
        let c = conn(&p).await;
        let start = Instant::now();
        let e = c.exec("echo x").await.expect_err("no confirmation");
        assert!(
            matches!(
                e,
                TransportError::Timeout {
                    stage: Stage::ChannelOpen,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.is_retryable());
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(!c.is_closed());
        p.server.set_open_mode(OpenMode::Confirm);
        assert_eq!(
            run(&c, "echo again").await,
            (b"again\n".to_vec(), ExitStatus::Code(0))
        );
        p.server.set_open_mode(OpenMode::Refuse);
        let e = c.exec("echo x").await.expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::ChannelOpenRefused, "{e:?}");
        c.disconnect().await;
    })
    .await
}

// ===== windows =====

/// A zero receive window that is never adjusted: the client can never send stdin. Output
/// and exit status still arrive; a stdin write waits (a live peer that does not read is not
/// a timeout at this layer); dropping the channel ends it within the close grace, and the
/// connection stays usable.
#[tokio::test]
async fn zero_window_blocks_only_stdin() {
    bounded(async {
        let p = peer(|o| o.window_size = 0).await;
        let c = conn(&p).await;
        assert_eq!(
            run(&c, "echo hi").await,
            (b"hi\n".to_vec(), ExitStatus::Code(0))
        );
        let mut ch = c.exec("cat").await.expect("exec");
        let write = tokio::time::timeout(Duration::from_millis(300), async {
            ch.stdin().write_all(b"x").await?;
            ch.stdin().flush().await
        })
        .await;
        assert!(
            write.is_err(),
            "a zero window cannot take a byte: {write:?}"
        );
        assert_eq!(ch.stats().stdin_bytes, 0);
        drop(ch);
        assert!(
            eventually(Duration::from_secs(3), || c.stats().channels_open == 0).await,
            "{:?}",
            c.stats()
        );
        assert_eq!(run(&c, "echo still").await.1, ExitStatus::Code(0));
        c.disconnect().await;
    })
    .await
}

/// Window adjustments of about 4 GiB each (the server asks for a target window of
/// `u32::MAX`): the client's window saturates instead of overflowing, and data flows.
#[tokio::test]
async fn huge_window_adjustments_are_harmless() {
    bounded(async {
        let p = peer(|o| {
            o.window_size = 64 * 1024;
            o.huge_window_adjust = true;
        })
        .await;
        let c = conn(&p).await;
        let ch = c.exec("cat").await.expect("exec");
        let data: Vec<u8> = (0..4u64 << 20).map(blob_byte).collect();
        let (mut stdin, mut stdout, status) = ch.into_parts();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                stdin.write_all(&data).await.expect("stdin");
                stdin.shutdown().await.expect("eof");
            })
        };
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).await.expect("stdout");
        writer.await.expect("writer");
        assert_eq!(out.len(), data.len());
        assert!(out == data);
        assert_eq!(status.exit().await.expect("exit"), ExitStatus::Code(0));
        assert!(
            p.server.stats().huge_window_targets.load(Ordering::Relaxed) >= 2,
            "{:?}",
            p.server.stats()
        );
        c.disconnect().await;
    })
    .await
}

// ===== output =====

/// Endless output nobody reads: memory stays at the configured limit (the rest goes to the
/// spill file), other channels keep working, and dropping the channel ends it.
#[tokio::test]
async fn endless_data_keeps_memory_bounded() {
    bounded(async {
        let p = peer(|_| {}).await;
        let spill = tempfile::tempdir().expect("tmp");
        let mut cfg = config();
        cfg.stdout_memory_limit = 1 << 20;
        cfg.stdout_spill = StdoutSpill::TempFile(Some(spill.path().to_path_buf()));
        let c = connect_to(&p, p.server.port(), &cfg)
            .await
            .expect("connects");
        let mut ch = c.exec("endless").await.expect("exec");
        let mut peak = 0;
        let got_far = eventually(Duration::from_secs(4), || {
            let s = c.stats();
            peak = peak.max(s.stdout_buffered_bytes);
            s.stdout_spilled_bytes >= 32 << 20
        })
        .await;
        assert!(got_far, "{:?}", c.stats());
        // The limit, plus at most one in-flight chunk being handed over.
        assert!(
            peak <= (1 << 20) + (256 << 10),
            "peak {peak}: {:?}",
            c.stats()
        );
        // Another channel on the same connection is not held up.
        assert_eq!(run(&c, "echo side").await.1, ExitStatus::Code(0));
        let mut head = vec![0u8; 1000];
        ch.stdout().read_exact(&mut head).await.expect("read");
        assert!(head.iter().all(|b| *b == b'y'));
        drop(ch);
        assert!(
            eventually(Duration::from_secs(3), || c.stats().channels_open == 0).await,
            "{:?}",
            c.stats()
        );
        c.disconnect().await;
    })
    .await
}

/// Data after the server's EOF: RFC 4254 §5.3 says no more data may follow. russh hands it
/// over anyway; what the reader sees is pinned here, and the exit status is unaffected.
#[tokio::test]
async fn data_after_eof() {
    bounded(async {
        let p = peer(|_| {}).await;
        let c = conn(&p).await;
        let (out, exit) = run(&c, commands::DATA_AFTER_EOF).await;
        assert_eq!(exit, ExitStatus::Code(0));
        // Pinned: russh (and so our drain) passes the late data on.
        assert_eq!(String::from_utf8_lossy(&out), "before\nafter-eof\n");
        c.disconnect().await;
    })
    .await
}

/// Data after CLOSE (russh's server drops it, so this pins the clean case: the channel
/// ends at the CLOSE with what came before, and the connection goes on).
#[tokio::test]
async fn data_after_close_from_russh() {
    bounded(async {
        let p = peer(|_| {}).await;
        let c = conn(&p).await;
        assert_eq!(
            run(&c, commands::DATA_AFTER_CLOSE).await,
            (b"before\n".to_vec(), ExitStatus::Code(0))
        );
        assert_eq!(run(&c, "echo next").await.1, ExitStatus::Code(0));
        c.disconnect().await;
    })
    .await
}

/// Two exit statuses on one channel.
#[tokio::test]
async fn exit_status_twice() {
    bounded(async {
        let p = peer(|_| {}).await;
        let c = conn(&p).await;
        let (out, exit) = run(&c, commands::EXIT_TWICE).await;
        assert_eq!(out, b"x");
        // Pinned: the last one wins.
        assert_eq!(exit, ExitStatus::Code(2));
        c.disconnect().await;
    })
    .await
}

/// The exit status before any output: the output still arrives in full.
#[tokio::test]
async fn exit_status_before_data() {
    bounded(async {
        let p = peer(|_| {}).await;
        let c = conn(&p).await;
        assert_eq!(
            run(&c, commands::EXIT_BEFORE_DATA).await,
            (b"late\n".to_vec(), ExitStatus::Code(3))
        );
        c.disconnect().await;
    })
    .await
}

/// An exit status, EOF, and then the channel is never closed (RFC 4254 §5.3 only says the
/// server SHOULD close it). The status is visible at once (`try_exit`); `exit()` returns
/// once the transport, after its close grace, has closed the channel itself; the connection
/// goes on.
#[tokio::test]
async fn exit_status_without_close() {
    bounded(async {
        let p = peer(|_| {}).await;
        let c = conn(&p).await;
        let mut ch = c.exec(commands::EXIT_NO_CLOSE).await.expect("exec");
        let mut out = Vec::new();
        ch.stdout().read_to_end(&mut out).await.expect("stdout");
        assert_eq!(out, b"done\n");
        assert!(
            eventually(Duration::from_secs(2), || ch.status().try_exit().is_some()).await,
            "exit status never seen"
        );
        assert_eq!(ch.status().try_exit(), Some(ExitStatus::Code(0)));
        let exit = tokio::time::timeout(Duration::from_secs(5), ch.exit())
            .await
            .expect("exit() returns without the server's CLOSE");
        assert_eq!(exit.expect("exit"), ExitStatus::Code(0));
        drop(ch);
        assert!(
            eventually(Duration::from_secs(3), || c.stats().channels_open == 0).await,
            "{:?}",
            c.stats()
        );
        assert_eq!(run(&c, "echo next").await.1, ExitStatus::Code(0));
        c.disconnect().await;
    })
    .await
}

// ===== key exchange =====

/// A rekey storm: the server starts a new key exchange every few milliseconds. Data keeps
/// its integrity, many channels come and go, and the host-key check runs exactly once.
///
/// That pins a known limit of nixmux-transport: in russh 0.65.1 the client's rekey branch
/// (`client/mod.rs`, "This is a rekey") calls only `Handler::kex_done`, never
/// `check_server_key`; the exchange-hash signature is verified against whatever key that
/// exchange carries (`client/kex.rs`), which is not compared with the first one. If this
/// count changes, russh started checking at rekeys: update the "Known limits".
#[tokio::test]
async fn rekey_storm() {
    // This test's runtime is current-thread: russh's session task logs on this thread.
    let logs = ScopedCapture::start();
    bounded(async {
        let p = peer(|o| {
            o.rekey = Some(russh::Limits::new(
                256 * 1024,
                1 << 30,
                Duration::from_millis(5),
            ))
        })
        .await;
        let events: Arc<Mutex<Vec<ConnectEvent>>> = Arc::default();
        let sink = events.clone();
        let c = connect(
            &Endpoint::new("127.0.0.1", p.server.port(), "nix"),
            &[Identity::key_file(&p.key.path)],
            &pinned(&p.server),
            &config(),
            move |e: &ConnectEvent| {
                if let Ok(mut v) = sink.lock() {
                    v.push(e.clone());
                }
            },
        )
        .await
        .expect("connects");
        let (out, exit) = run(&c, "blob 8000000").await;
        assert_eq!(exit, ExitStatus::Code(0));
        assert_eq!(out.len(), 8_000_000);
        assert!(
            out.iter()
                .enumerate()
                .all(|(i, b)| *b == blob_byte(i as u64))
        );
        for i in 0..20 {
            assert_eq!(
                run(&c, &format!("echo {i}")).await,
                (format!("{i}\n").into_bytes(), ExitStatus::Code(0))
            );
        }
        assert!(!c.is_closed());
        let events = events.lock().expect("events").clone();
        let checks = events
            .iter()
            .filter(|e| matches!(e.kind, ConnectEventKind::KeyExchangeDone { .. }))
            .count();
        assert_eq!(
            checks, 1,
            "host key checks during a rekey storm: {events:?}"
        );
        c.disconnect().await;
    })
    .await;
    // russh's client logs this at every key exchange the server starts.
    let rekeys = logs
        .buffer
        .text()
        .matches("server has initiated re-key")
        .count();
    assert!(rekeys >= 10, "only {rekeys} server-initiated rekeys");
    eprintln!("{rekeys} server-initiated rekeys");
}

/// A server that sends its identification one byte at a time and never finishes it.
#[tokio::test]
async fn slowloris_identification_times_out() {
    bounded(async {
        let p = peer(|_| {}).await;
        let t = Trickle::start(Trickle::endless_identification(), Duration::from_millis(20))
            .await
            .expect("trickle");
        let start = Instant::now();
        let e = connect_to(&p, t.addr().port(), &config())
            .await
            .expect_err("never identifies");
        assert!(
            matches!(
                e,
                TransportError::Timeout {
                    stage: Stage::Handshake,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    })
    .await
}

/// A server that identifies, then trickles its KEXINIT one byte at a time.
#[tokio::test]
async fn slowloris_kexinit_times_out() {
    bounded(async {
        let p = peer(|_| {}).await;
        let mut prefix = b"SSH-2.0-trickle\r\n".to_vec();
        // A KEXINIT header announcing a 64 KiB packet that never completes.
        prefix.extend_from_slice(&[0, 1, 0, 0, 4, 20]);
        prefix.resize(prefix.len() + 65_530, 0);
        let t = Trickle::start(prefix, Duration::from_millis(20))
            .await
            .expect("trickle");
        let e = connect_to(&p, t.addr().port(), &config())
            .await
            .expect_err("never finishes its KEXINIT");
        assert!(
            matches!(
                e,
                TransportError::Timeout {
                    stage: Stage::Handshake,
                    ..
                }
            ),
            "{e:?}"
        );
    })
    .await
}

// ===== cut streams =====

/// The server's stream ends in the middle of its KEXINIT packet.
#[tokio::test]
async fn disconnect_mid_kexinit() {
    bounded(async {
        let p = peer(|_| {}).await;
        let proxy = CutProxy::start(p.server.addr()).await.expect("proxy");
        // russh's identification line is `SSH-2.0-russh_0.65.1\r\n` (22 bytes); 40 bytes
        // is in the middle of the KEXINIT that follows it.
        proxy.cut_after(40);
        let e = connect_to(&p, proxy.addr().port(), &config())
            .await
            .expect_err("cut");
        assert!(
            matches!(
                e,
                TransportError::ClosedAtStartup {
                    identification_received: true,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.is_startup_drop());
    })
    .await
}

/// The server's stream ends in the middle of an encrypted packet while a channel streams:
/// the channel, its exit status and the connection all report the loss, typed.
#[tokio::test]
async fn disconnect_mid_packet() {
    bounded(async {
        let p = peer(|_| {}).await;
        let proxy = CutProxy::start(p.server.addr()).await.expect("proxy");
        let c = connect_to(&p, proxy.addr().port(), &config())
            .await
            .expect("connects");
        let mut ch = c.exec("endless").await.expect("exec");
        let mut buf = vec![0u8; 100_000];
        ch.stdout().read_exact(&mut buf).await.expect("some data");
        // Packets are ~32 KiB: 1001 bytes further is inside one.
        proxy.cut_after(proxy.server_bytes() + 1001);
        let mut sink = vec![0u8; 1 << 16];
        let read_end = loop {
            match ch.stdout().read(&mut sink).await {
                Ok(0) => break Ok(()),
                Ok(_) => continue,
                Err(e) => break Err(e),
            }
        };
        // A cut stream must never look like the clean end of the output.
        let err = read_end.expect_err("a cut stream is not EOF");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
        let e = ch
            .exit()
            .await
            .expect_err("no exit status: the connection died");
        assert!(
            matches!(
                e,
                TransportError::Disconnected {
                    cause: DisconnectCause::ConnectionClosed,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = c.closed().await;
        assert_eq!(e.kind(), ErrorKind::Disconnected, "{e:?}");
        let e = c.exec("echo x").await.expect_err("connection is gone");
        assert_eq!(e.kind(), ErrorKind::Disconnected, "{e:?}");
    })
    .await
}
