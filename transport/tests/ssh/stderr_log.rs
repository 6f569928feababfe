//! The stderr log queue and `ExecStatus::barrier`: everything the server sent on stderr
//! before a reply on stdout can be collected for certain, a consumer that falls behind
//! loses stderr only in counted, reported places, and a barrier never hangs.

use std::time::{Duration, Instant};

use nixmux_transport::{
    DisconnectCause, ExecChannel, ExecOptions, NoopObserver, StderrEvent, StderrLog,
    TransportError, connect,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Dropbear, Sshd, config, conn_with};

const T: Duration = Duration::from_secs(30);

/// Reads stdout up to and including the next newline (the commands here write one line and
/// then wait for us).
async fn read_line(ch: &mut ExecChannel) -> String {
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    while !line.ends_with(b"\n") {
        let n = tokio::time::timeout(T, ch.stdout().read(&mut buf))
            .await
            .expect("stdout stalled")
            .expect("read stdout");
        assert!(
            n > 0,
            "stdout ended early: {:?}",
            String::from_utf8_lossy(&line)
        );
        line.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(line).expect("utf8")
}

/// The serve-protocol pattern in a shell: `rounds` times, `lines` lines of log on stderr
/// (`log<round>.<i>`), then a reply on stdout (`reply<round>`), then wait for a line on stdin.
fn rounds_command(rounds: u64, lines: usize) -> String {
    format!(
        "for r in $(seq 1 {rounds}); do \
         for i in $(seq 1 {lines}); do echo log$r.$i >&2; done; \
         echo reply$r; read go || exit 1; done; cat >/dev/null"
    )
}

/// The stderr of round `round` of [`rounds_command`].
fn round_log(round: u64, lines: usize) -> String {
    (1..=lines).map(|i| format!("log{round}.{i}\n")).collect()
}

/// What the log queue held up to `Barrier(id)`.
#[derive(Default, Debug)]
struct Collected {
    data: Vec<u8>,
    dropped_bytes: u64,
    dropped_lines: u64,
    dropped_items: usize,
}

async fn collect_until_barrier(log: &mut StderrLog, id: u64) -> Collected {
    let mut got = Collected::default();
    loop {
        let event = tokio::time::timeout(T, log.recv())
            .await
            .expect("log queue stalled")
            .expect("log queue ended before the barrier");
        match event {
            StderrEvent::Data(d) => got.data.extend_from_slice(&d),
            StderrEvent::Dropped { bytes, lines } => {
                got.dropped_bytes += bytes;
                got.dropped_lines += lines;
                got.dropped_items += 1;
            }
            StderrEvent::Barrier(b) if b == id => return got,
            StderrEvent::Barrier(b) => panic!("barrier {b} while waiting for {id}"),
        }
    }
}

/// The serve-protocol pattern: a command logs many stderr lines, then replies on stdout.
/// After reading the reply, `barrier()` and the log queue up to its `Barrier` item hold
/// every line, complete and in order, in every round of every channel. Without the barrier
/// the reply often overtakes the end of the log (sshd reads the command's stdout and stderr
/// pipes separately); how often is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_delivers_all_stderr_sent_before_the_reply() {
    let sshd = Sshd::start();
    let conn = conn_with(&sshd, &config()).await;
    const LINES: usize = 2000;
    const ROUNDS: u64 = 4;
    let mut overtaken = 0;
    let t = Instant::now();
    for channel in 0..5 {
        let mut ch = conn
            .exec_with(
                &rounds_command(ROUNDS, LINES),
                ExecOptions::with_stderr_log(1 << 20),
            )
            .await
            .expect("exec");
        let mut log = ch.take_stderr_log().expect("log queue");
        let mut sent_before = 0u64;
        for round in 1..=ROUNDS {
            assert_eq!(read_line(&mut ch).await, format!("reply{round}\n"));
            let expected = round_log(round, LINES);
            if ch.stats().stderr_bytes < sent_before + expected.len() as u64 {
                overtaken += 1;
            }
            sent_before += expected.len() as u64;
            let id = ch.status().barrier().await.expect("barrier");
            assert_eq!(id, round, "barrier ids count from 1 per channel");
            let got = collect_until_barrier(&mut log, id).await;
            assert_eq!(
                got.dropped_items, 0,
                "channel {channel} round {round}: {got:?}"
            );
            assert!(
                got.data == expected.as_bytes(),
                "channel {channel} round {round}: {} of {} bytes, last line {:?}",
                got.data.len(),
                expected.len(),
                String::from_utf8_lossy(&got.data)
                    .lines()
                    .last()
                    .unwrap_or_default()
            );
            ch.stdin().write_all(b"go\n").await.expect("next round");
        }
        ch.stdin().shutdown().await.expect("eof");
        assert!(ch.exit().await.expect("exit").success());
        // Nothing after the last barrier but the end of the queue.
        assert_eq!(
            tokio::time::timeout(T, log.recv()).await.expect("log end"),
            None
        );
    }
    println!(
        "{} rounds in {:.2?}; the reply overtook the end of the log in {overtaken}",
        5 * ROUNDS,
        t.elapsed()
    );
}

/// A log queue of 64 bytes that nobody reads while 20 000 lines of stderr arrive: the
/// channel is not held up (its reply arrives), the queue holds `Dropped` items accounting
/// for exactly what it lacks, in bytes and in lines, and barriers still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_log_queue_counts_exactly_what_it_drops() {
    let sshd = Sshd::start();
    let conn = conn_with(&sshd, &config()).await;
    const LINES: u64 = 20_000;
    let sent: u64 = (1..=LINES).map(|i| format!("log{i}\n").len() as u64).sum();
    let mut ch = conn
        .exec_with(
            &format!("seq -f 'log%g' 1 {LINES} >&2; echo reply; cat >/dev/null"),
            ExecOptions::with_stderr_log(64),
        )
        .await
        .expect("exec");
    let mut log = ch.take_stderr_log().expect("log queue");
    assert_eq!(read_line(&mut ch).await, "reply\n");
    let first = ch
        .status()
        .barrier()
        .await
        .expect("barrier while the queue is full");
    assert_eq!(ch.stats().stderr_bytes, sent);

    let got = collect_until_barrier(&mut log, first).await;
    let delivered_lines = got.data.iter().filter(|&&b| b == b'\n').count() as u64;
    println!(
        "delivered {} bytes, dropped {} bytes ({} lines) in {} items",
        got.data.len(),
        got.dropped_bytes,
        got.dropped_lines,
        got.dropped_items
    );
    assert!(got.dropped_bytes > 0);
    assert_eq!(got.data.len() as u64 + got.dropped_bytes, sent);
    assert_eq!(delivered_lines + got.dropped_lines, LINES);
    let st = ch.stats();
    assert_eq!(st.stderr_log_dropped_bytes, got.dropped_bytes);
    assert_eq!(st.stderr_log_dropped_lines, got.dropped_lines);
    let cst = conn.stats();
    assert_eq!(cst.stderr_log_dropped_bytes, got.dropped_bytes);
    assert_eq!(cst.stderr_log_dropped_lines, got.dropped_lines);

    // A later barrier, on a queue that has room again, arrives with nothing before it.
    let second = ch.status().barrier().await.expect("second barrier");
    assert_eq!(second, first + 1);
    assert_eq!(
        tokio::time::timeout(T, log.recv()).await.expect("log"),
        Some(StderrEvent::Barrier(second))
    );
    ch.stdin().shutdown().await.expect("eof");
    assert!(ch.exit().await.expect("exit").success());
    assert_eq!(
        tokio::time::timeout(T, log.recv()).await.expect("log end"),
        None
    );
}

/// A barrier does not need a log queue, and after the channel has closed it fails with
/// ChannelClosed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_without_log_and_on_a_closed_channel() {
    let sshd = Sshd::start();
    let conn = conn_with(&sshd, &config()).await;
    let mut ch = conn
        .exec("echo reply; echo note >&2; cat >/dev/null")
        .await
        .expect("exec");
    assert_eq!(read_line(&mut ch).await, "reply\n");
    assert_eq!(ch.status().barrier().await.expect("barrier"), 1);
    ch.stdin().shutdown().await.expect("eof");
    assert!(ch.exit().await.expect("exit").success());
    let t = Instant::now();
    let err = ch.status().barrier().await.expect_err("closed channel");
    assert!(t.elapsed() < Duration::from_secs(1));
    println!("{err}");
    assert!(
        matches!(
            err,
            TransportError::ChannelClosed {
                operation: "barrier"
            }
        ),
        "{err:?}"
    );
}

/// The connection dies under a waiting barrier (every sshd process frozen): keepalive ends
/// the connection and the barrier fails with its cause instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_fails_when_the_connection_dies() {
    let sshd = Sshd::start();
    let mut cfg = config();
    cfg.keepalive_interval = Some(Duration::from_secs(1));
    cfg.keepalive_max_misses = 2;
    let conn = conn_with(&sshd, &cfg).await;
    let mut ch = conn
        .exec_with("echo ready; cat", ExecOptions::with_stderr_log(1 << 10))
        .await
        .expect("exec");
    let mut log = ch.take_stderr_log().expect("log queue");
    assert_eq!(read_line(&mut ch).await, "ready\n");
    sshd.freeze();
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(15), ch.status().barrier())
        .await
        .expect("barrier must not hang");
    println!(
        "barrier on a frozen server: {res:?} after {:.2?}",
        t.elapsed()
    );
    match res {
        Err(TransportError::Disconnected { cause, .. }) => {
            assert!(
                matches!(cause, DisconnectCause::KeepaliveTimeout { .. }),
                "{cause}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The log queue ends without a barrier item; a new barrier fails at once.
    assert_eq!(
        tokio::time::timeout(T, log.recv()).await.expect("log end"),
        None
    );
    let t = Instant::now();
    assert!(matches!(
        ch.status().barrier().await,
        Err(TransportError::Disconnected { .. })
    ));
    assert!(t.elapsed() < Duration::from_secs(1));
    sshd.thaw();
}

/// The barrier against Dropbear, which answers the `env` request too (with CHANNEL_FAILURE
/// here, as OpenSSH does). Ignored by default: it needs
/// `dropbear-bin` and `unshare`; run it with
/// `cargo nextest run -p nixmux-transport --run-ignored only dropbear`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Dropbear (apt-get install dropbear-bin)"]
async fn barrier_against_dropbear() {
    let Some(server) = tokio::task::spawn_blocking(Dropbear::start)
        .await
        .expect("join")
    else {
        panic!("Dropbear is not installed (apt-get install dropbear-bin)");
    };
    let conn = connect(
        &server.endpoint(),
        &server.identities(),
        &server.host_key_check(),
        &config(),
        NoopObserver,
    )
    .await
    .expect("connect to Dropbear");
    const LINES: usize = 2000;
    const ROUNDS: u64 = 3;
    let mut ch = conn
        .exec_with(
            &rounds_command(ROUNDS, LINES),
            ExecOptions::with_stderr_log(1 << 20),
        )
        .await
        .expect("exec");
    let mut log = ch.take_stderr_log().expect("log queue");
    for round in 1..=ROUNDS {
        assert_eq!(read_line(&mut ch).await, format!("reply{round}\n"));
        let id = ch.status().barrier().await.expect("barrier");
        assert_eq!(id, round);
        let expected = round_log(round, LINES);
        let got = collect_until_barrier(&mut log, id).await;
        assert!(got.data == expected.as_bytes(), "round {round}: {got:?}");
        ch.stdin().write_all(b"go\n").await.expect("next round");
    }
    ch.stdin().shutdown().await.expect("eof");
    assert!(ch.exit().await.expect("exit").success());
    conn.disconnect().await;
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .expect("teardown");
}
