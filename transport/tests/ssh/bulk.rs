//! More than 1 GiB each way through one channel against OpenSSH: crosses russh's 1 GiB
//! rekey in both directions (russh#761: writes straddling a rekey broke OpenSSH interop).

use std::time::{Duration, Instant};

use nixmux_transport::{NoopObserver, connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Sshd, config};

const TOTAL: u64 = 1200 * 1024 * 1024;

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_one_gib_each_direction() {
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
    let (kex, cipher) = conn
        .algorithms()
        .map(|(k, c)| (k.to_string(), c.to_string()))
        .expect("negotiated");

    // Remote to local.
    let mut down = conn
        .exec(&format!("head -c {TOTAL} /dev/zero"))
        .await
        .expect("exec");
    let t = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), down.stdout().read(&mut buf))
            .await
            .expect("download stalled")
            .expect("read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let down_time = t.elapsed();
    assert_eq!(got, TOTAL);
    assert!(down.exit().await.expect("exit").success());
    let peak_buffer = conn.stats().stdout_spilled_bytes;

    // Local to remote, counted by the remote side.
    let mut up = conn.exec("wc -c").await.expect("exec");
    let chunk = vec![0u8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < TOTAL {
        tokio::time::timeout(Duration::from_secs(30), up.stdin().write_all(&chunk))
            .await
            .expect("upload stalled")
            .expect("write");
        sent += chunk.len() as u64;
    }
    up.stdin().shutdown().await.expect("eof");
    let mut out = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        up.stdout().read_to_string(&mut out),
    )
    .await
    .expect("wc output")
    .expect("read");
    let up_time = t.elapsed();
    assert_eq!(out.trim(), TOTAL.to_string());
    assert!(up.exit().await.expect("exit").success());

    let st = conn.stats();
    assert!(
        st.wire_bytes_in > TOTAL && st.wire_bytes_out > TOTAL,
        "{st:?}"
    );
    assert!(!conn.is_closed());
    // The connection still works after both rekeys.
    let mut ch = conn.exec("echo still-alive").await.expect("exec");
    let mut s = String::new();
    ch.stdout().read_to_string(&mut s).await.expect("read");
    assert_eq!(s, "still-alive\n");
    println!(
        "{kex} / {cipher}: {} MiB remote->local in {down_time:.2?} ({:.0} MiB/s, spilled {peak_buffer} B), local->remote in {up_time:.2?} ({:.0} MiB/s)",
        TOTAL >> 20,
        mib_s(TOTAL, down_time),
        mib_s(TOTAL, up_time)
    );
}

/// Several channels streaming at once while russh rekeys after 1 GiB received: russh
/// tolerates at most 2 × window of channel data arriving between its KEXINIT and the peer's,
/// summed over channels. Four channels × 300 MiB at full speed cross that rekey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_channels_across_rekey() {
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
    let per: u64 = 300 * 1024 * 1024;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = conn.clone();
        tasks.push(tokio::spawn(async move {
            let mut ch = c
                .exec(&format!("head -c {per} /dev/zero"))
                .await
                .expect("exec");
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            loop {
                let n = tokio::time::timeout(Duration::from_secs(60), ch.stdout().read(&mut buf))
                    .await
                    .expect("stalled")
                    .expect("read");
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            got
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join"), per);
    }
    let took = t.elapsed();
    assert!(!conn.is_closed(), "{:?}", conn.close_cause());
    println!(
        "4 x 300 MiB in parallel: {took:.2?} ({:.0} MiB/s)",
        mib_s(4 * per, took)
    );
}
