//! Channel behaviour: sshd MaxSessions refusals, CLOSE on drop, draining, stdin, stderr log.

use std::time::{Duration, Instant};

use nixmux_transport::{
    ChannelOpenRefusal, ExecOptions, SshConnection, StderrEvent, StdoutSpill, TransportError,
};
use tokio::io::AsyncWriteExt;

use crate::support::{Sshd, SshdOptions, config, conn_with, read_all};

const T: Duration = Duration::from_secs(30);
const MIB: u64 = 1024 * 1024;

fn sshd_max_sessions(n: u32) -> Sshd {
    Sshd::start_with(SshdOptions {
        max_sessions: n,
        ..Default::default()
    })
}

/// With sshd `MaxSessions 2`, the third concurrent exec is ChannelOpenRefused (ConnectFailed,
/// sshd's description), the connection stays usable, and the slot comes back once a channel
/// is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_refusal_is_distinct() {
    let sshd = sshd_max_sessions(2);
    let conn = conn_with(&sshd, &config()).await;
    let a = conn.exec("cat").await.expect("first");
    let b = conn.exec("cat").await.expect("second");
    let err = conn.exec("cat").await.expect_err("third must be refused");
    println!("{err}");
    match &err {
        TransportError::ChannelOpenRefused {
            reason,
            description,
        } => {
            assert_eq!(reason, &ChannelOpenRefusal::ConnectFailed);
            assert_eq!(description, "open failed");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_retryable());
    let st = conn.stats();
    assert_eq!(st.channel_open_refusals, 1);
    assert_eq!(st.channels_open, 2);
    assert!(!conn.is_closed());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(sshd.count_log("no more sessions"), 1, "{}", sshd.log_text());

    drop(a);
    let c = exec_when_slot_frees(&conn, "echo again").await;
    let mut c = c;
    assert_eq!(read_all(c.stdout(), T).await, b"again\n");
    drop(b);
}

/// Retries an exec for up to 5 s while sshd still counts a just-closed session.
async fn exec_when_slot_frees(conn: &SshConnection, cmd: &str) -> nixmux_transport::ExecChannel {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match conn.exec(cmd).await {
            Ok(c) => return c,
            Err(TransportError::ChannelOpenRefused { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Dropped channels free their sshd session slot. sshd keeps a session until its command
/// has exited, so on drop we send SIGTERM (refused by sshd for root logins, as here) and EOF,
/// wait for the server's CLOSE (it comes once the command has exited), and after
/// `close_grace` close the channel ourselves, which closes the command's pipes.
///
/// With `MaxSessions 2`: 20 channels running a command that stops on stdin EOF (`cat`,
/// like `nix-store --serve`), opened and dropped one after another, almost never see a
/// refusal: when `channels_open` drops, sshd has usually freed the slot (it frees it just
/// after handling our CLOSE reply, so an open right behind that reply can still be refused
/// on a loaded machine; seen once in about ten runs with builds running beside it). A command that ignores stdin but
/// writes dies of SIGPIPE only after our CLOSE, so its slot frees a moment after
/// `channels_open` drops: the next open may need a retry. The control: a command that
/// ignores stdin and never writes (`sleep`) keeps its slot, since root's sessions cannot be
/// signalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_channels_free_their_slot() {
    let sshd = sshd_max_sessions(2);
    let mut cfg = config();
    cfg.close_grace = Duration::from_millis(300);
    let conn = conn_with(&sshd, &cfg).await;
    let t = Instant::now();
    for _ in 0..20 {
        let ch = exec_when_slot_frees(&conn, "cat").await;
        drop(ch);
        wait_channels_open(&conn, 0).await;
    }
    let refusals = conn.stats().channel_open_refusals;
    println!(
        "20 x cat open+drop+closed: {:.2?}, {refusals} refusals",
        t.elapsed()
    );
    assert!(refusals <= 2, "{refusals} of 20 opens refused");
    assert_eq!(sshd.count_log("no more sessions") as u64, refusals);

    let t = Instant::now();
    for _ in 0..6 {
        let ch = exec_when_slot_frees(&conn, "while :; do echo tick; sleep 0.02; done").await;
        drop(ch);
        wait_channels_open(&conn, 0).await;
    }
    println!(
        "6 x writer ignoring stdin: {:.2?}, refusals while a killed writer was exiting: {}",
        t.elapsed(),
        conn.stats().channel_open_refusals
    );
    // Both slots are free again.
    let a = exec_when_slot_frees(&conn, "cat").await;
    let b = exec_when_slot_frees(&conn, "cat").await;
    drop((a, b));
    wait_channels_open(&conn, 0).await;

    // Control: `sleep` keeps its slot after the drop.
    let kept = conn.exec("sleep 600").await.expect("exec");
    drop(kept);
    wait_channels_open(&conn, 0).await;
    let _c = exec_when_slot_frees(&conn, "cat").await;
    let err = conn
        .exec("cat")
        .await
        .expect_err("the other slot is still held by sleep");
    assert!(
        matches!(err, TransportError::ChannelOpenRefused { .. }),
        "{err}"
    );
}

/// Waits (up to 10 s) for the connection's open-channel count to reach `n`.
async fn wait_channels_open(conn: &SshConnection, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while conn.stats().channels_open > n {
        assert!(
            Instant::now() < deadline,
            "channels did not close: {:?}",
            conn.stats()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One channel's stdout is never read while another channel on the same connection moves
/// 64 MiB: the second completes, the first is received in full in the background (spilling
/// to disk above the memory limit), and a stderr log nobody reads drops stderr instead of
/// blocking. Then the first is read back completely and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undrained_stdout_does_not_stall_other_channels() {
    let sshd = Sshd::start();
    let mut cfg = config();
    cfg.stdout_memory_limit = 8 << 20;
    cfg.stdout_spill = StdoutSpill::TempFile(Some(sshd.path().to_path_buf()));
    let conn = conn_with(&sshd, &cfg).await;

    let big = 200 * MIB;
    // Not a constant stream: a counter, so that order is checked when reading back.
    let mut idle = conn
        .exec(&format!("seq 1 100000000 | head -c {big}"))
        .await
        .expect("idle channel");
    let mut noisy = conn
        .exec_with(
            "head -c 32M /dev/zero >&2",
            ExecOptions::with_stderr_log(64 << 10),
        )
        .await
        .expect("stderr flood");
    let _unread_log = noisy.take_stderr_log().expect("log");

    let t = Instant::now();
    let mut busy = conn
        .exec("head -c 64M /dev/zero")
        .await
        .expect("busy channel");
    let got = read_all(busy.stdout(), T).await;
    assert_eq!(got.len() as u64, 64 * MIB);
    println!(
        "64 MiB on a second channel while the first is unread: {:.2?}",
        t.elapsed()
    );

    // The unread channel was drained anyway.
    let deadline = Instant::now() + T;
    while idle.stats().stdout_bytes < big && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = idle.stats();
    println!("unread channel: {st:?}");
    assert_eq!(st.stdout_bytes, big);
    assert!(st.stdout_buffered <= 8 * MIB + 64 * 1024, "{st:?}");
    assert!(st.stdout_spilled_pending > 0, "{st:?}");
    assert!(conn.stats().stdout_spilled_bytes >= st.stdout_spilled_pending);

    assert!(noisy.exit().await.expect("exit").success());
    let nst = noisy.stats();
    assert_eq!(nst.stderr_bytes, 32 * MIB);
    assert!(nst.stderr_log_dropped_bytes > 0, "{nst:?}");
    assert_eq!(noisy.stderr_tail().len(), 64 * 1024);

    let data = read_all(idle.stdout(), T).await;
    assert_eq!(data.len() as u64, big);
    let mut expected = Vec::with_capacity(data.len());
    let mut n = 1u64;
    while (expected.len() as u64) < big {
        expected.extend_from_slice(format!("{n}\n").as_bytes());
        n += 1;
    }
    expected.truncate(data.len());
    assert!(data == expected, "spilled stdout came back out of order");
    assert_eq!(idle.stats().stdout_spilled_pending, 0);
    assert_eq!(conn.stats().stdout_buffered_bytes, 0);
}

/// stdin: `shutdown` sends EOF; a write after the remote closed fails instead of hanging;
/// a stderr log receives every chunk when it keeps up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_eof_broken_pipe_and_stderr_log() {
    let sshd = Sshd::start();
    let conn = conn_with(&sshd, &config()).await;

    let mut wc = conn.exec("wc -c").await.expect("exec");
    let chunk = vec![7u8; 1 << 20];
    wc.stdin().write_all(&chunk).await.expect("write");
    wc.stdin().shutdown().await.expect("eof");
    let out = read_all(wc.stdout(), T).await;
    assert_eq!(String::from_utf8_lossy(&out).trim(), "1048576");
    assert_eq!(wc.stats().stdin_bytes, 1 << 20);

    let mut gone = conn.exec("exit 0").await.expect("exec");
    assert!(gone.exit().await.expect("exit").success());
    let r = tokio::time::timeout(T, async {
        // The window may still accept a first write; keep writing until the close shows.
        loop {
            if let Err(e) = gone.stdin().write_all(&chunk).await {
                return e;
            }
        }
    })
    .await
    .expect("write after close must fail, not hang");
    assert_eq!(r.kind(), std::io::ErrorKind::BrokenPipe);

    let mut logged = conn
        .exec_with(
            "for i in 1 2 3; do echo line$i >&2; sleep 0.05; done",
            ExecOptions::with_stderr_log(16),
        )
        .await
        .expect("exec");
    let mut log = logged.take_stderr_log().expect("log");
    let mut all = Vec::new();
    while let Some(event) = tokio::time::timeout(T, log.recv())
        .await
        .expect("log timed out")
    {
        match event {
            StderrEvent::Data(chunk) => all.extend_from_slice(&chunk),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(all, b"line1\nline2\nline3\n");
    assert!(logged.exit().await.expect("exit").success());
}

/// The premise of the drain tasks, checked against this russh version: with a plain russh
/// connection, one channel nobody reads stalls the next channel completely (not even its
/// open is confirmed). If this starts failing, russh changed its flow control.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premise_plain_russh_stalls_on_an_unread_channel() {
    use std::sync::Arc;
    struct H;
    impl russh::client::Handler for H {
        type Error = russh::Error;
        async fn check_server_key(
            &mut self,
            _k: &russh::keys::PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            Ok(true)
        }
    }
    let sshd = Sshd::start();
    let cfg = Arc::new(russh::client::Config::default());
    let mut h = russh::client::connect(cfg, ("127.0.0.1", sshd.port), H)
        .await
        .expect("connect");
    let key = russh::keys::load_secret_key(&sshd.client_key, None).expect("key");
    let r = h
        .authenticate_publickey(
            "root",
            russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .expect("auth");
    assert!(r.success());
    let idle = h.channel_open_session().await.expect("open");
    idle.exec(true, "head -c 100M /dev/zero")
        .await
        .expect("exec");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut n = 0usize;
    let r = tokio::time::timeout(Duration::from_secs(3), async {
        let mut busy = h.channel_open_session().await.expect("open 2");
        busy.exec(true, "head -c 10M /dev/zero")
            .await
            .expect("exec 2");
        while let Some(m) = busy.wait().await {
            if let russh::ChannelMsg::Data { data } = m {
                n += data.len();
            }
        }
    })
    .await;
    println!(
        "plain russh: second channel got {n} bytes, timed out: {}",
        r.is_err()
    );
    assert!(
        r.is_err() && n == 0,
        "plain russh did not stall (got {n} bytes)"
    );
    drop(idle);
    sshd.kill_sessions();
}

/// `ExecStatus::closed_signal` does not keep the channel open: with every handle dropped it
/// resolves once the drain task has closed the channel (here: `cat` exits on EOF, sshd
/// closes), and the server's only slot (MaxSessions 1) comes back right after (sshd frees
/// the session a moment after its CLOSE, so the next open may still race it). It resolves at
/// once for a channel that is already closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_signal_resolves_after_drop_without_holding_the_channel() {
    let sshd = sshd_max_sessions(1);
    let conn = conn_with(&sshd, &config()).await;
    let ch = conn.exec("cat").await.expect("exec");
    let closed = ch.status().closed_signal();
    let pending =
        tokio::time::timeout(Duration::from_millis(200), ch.status().closed_signal()).await;
    assert!(pending.is_err(), "an open channel is not closed");
    let t = Instant::now();
    drop(ch);
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("resolves once the dropped channel is closed");
    println!("drop -> closed_signal: {:.2?}", t.elapsed());
    let again = exec_when_slot_frees(&conn, "true").await;
    let status = again.status().clone();
    drop(again);
    status.exit().await.expect("exit");
    tokio::time::timeout(Duration::from_secs(1), status.closed_signal())
        .await
        .expect("an already closed channel resolves at once");
}

/// `first_input` reaches the command with the exec request: it is there when the command
/// reads, before anything is written on stdin, and counts in the statistics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_input_goes_with_the_exec_request() {
    let sshd = sshd_max_sessions(10);
    let conn = conn_with(&sshd, &config()).await;
    let mut options = nixmux_transport::ExecOptions::default();
    options.first_input = Some(bytes::Bytes::from_static(b"hello"));
    let mut ch = conn.exec_with("head -c 5", options).await.expect("exec");
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(ch.stdout(), &mut out)
        .await
        .expect("read");
    assert_eq!(out, b"hello");
    assert_eq!(ch.stats().stdin_bytes, 5);
    assert!(ch.exit().await.expect("exit").success());
}
