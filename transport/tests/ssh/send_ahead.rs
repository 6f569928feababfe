//! The send-ahead limit against OpenSSH: a channel whose command does not read yet takes
//! no more than the limit (plus what the command's pipe holds), where without the limit it
//! takes sshd's whole window; and everything still arrives once the command reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nixmux_transport::{NoopObserver, SendAhead, SshConnection, connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Sshd, config};

const TOTAL: usize = 4 << 20;
const KIB: u64 = 1024;

async fn connect_with(sshd: &Sshd, send_ahead: Option<SendAhead>) -> SshConnection {
    let mut cfg = config();
    cfg.send_ahead = send_ahead;
    connect(
        &sshd.endpoint(),
        &sshd.identities(),
        &sshd.host_key_check(),
        &cfg,
        NoopObserver,
    )
    .await
    .expect("connect")
}

/// Writes `TOTAL` bytes to a command that sleeps 1.5 s before reading them: returns
/// how much the channel had taken after 0.9 s, and the command's count of what arrived.
async fn taken_before_the_reader_starts(conn: &SshConnection) -> (u64, String) {
    let ch = conn.exec("sleep 1.5; wc -c").await.expect("exec");
    let taken = Arc::new(AtomicU64::new(0));
    let (mut stdin, mut stdout, status) = ch.into_parts();
    let counter = taken.clone();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        let mut left = TOTAL;
        while left > 0 {
            let n = stdin
                .write(&chunk[..left.min(chunk.len())])
                .await
                .expect("write");
            left -= n;
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        stdin.shutdown().await.expect("eof");
    });
    tokio::time::sleep(Duration::from_millis(900)).await;
    let early = taken.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer finished once the command read")
        .expect("writer task");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_to_string(&mut out))
        .await
        .expect("output in time")
        .expect("read");
    assert!(status.exit().await.expect("exit").success());
    assert!(started.elapsed() < Duration::from_secs(30));
    (early, out.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_channels_hold_writes_below_the_limit_and_still_deliver_everything() {
    let sshd = Sshd::start();
    // A slow link rate keeps the limit at its floor whatever round trip a loaded machine
    // measures (the floor holds from the first write on, before the measurement too).
    let mut send_ahead = SendAhead::default();
    send_ahead.link_rate = 1e6;
    let limited = connect_with(&sshd, Some(send_ahead)).await;
    assert_eq!(limited.stats().send_ahead_limit, Some(256 * 1024));
    let (early, count) = taken_before_the_reader_starts(&limited).await;
    assert_eq!(count, TOTAL.to_string());
    // 256 KiB unacknowledged, plus what sshd wrote into the command's pipe and counts as
    // consumed (about 430 KiB in all, here); far from the window.
    assert!(
        early <= 1024 * KIB,
        "a non-reading command took {early} bytes with the limit"
    );
    let stats = limited.stats();
    let rtt = stats.round_trip.expect("round trip measured by now");
    assert!(
        rtt < Duration::from_millis(500),
        "loopback round trip {rtt:?}"
    );

    // The yardstick: without the limit, the channel takes sshd's whole 2 MiB window.
    let unlimited = connect_with(&sshd, None).await;
    assert_eq!(unlimited.stats().send_ahead_limit, None);
    let (early, count) = taken_before_the_reader_starts(&unlimited).await;
    assert_eq!(count, TOTAL.to_string());
    assert!(
        early >= 1536 * KIB,
        "without the limit a non-reading command took only {early} bytes"
    );
}
