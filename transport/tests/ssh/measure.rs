//! Figures, not assertions (ignored by default; run in release):
//! `cargo nextest run --release -p nixmux-transport --run-ignored only measure --no-capture`
//!
//! Connect time, extra-channel time, and 1 GiB each way for each cipher, next to the
//! OpenSSH client against the same sshd in the same minutes (the machine is shared, so only
//! side-by-side numbers mean much); and eight upload channels on one connection through a
//! long emulated link, the ceiling of a parallel closure push.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixmux_transport::SshConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Sshd, config, conn_with as conn};

const GIB: u64 = 1 << 30;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

async fn down(c: &SshConnection, bytes: u64) -> Duration {
    let mut ch = c
        .exec(&format!("head -c {bytes} /dev/zero"))
        .await
        .expect("exec");
    let mut buf = vec![0u8; 256 * 1024];
    let t = Instant::now();
    let mut got = 0;
    loop {
        let n = ch.stdout().read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, bytes);
    t.elapsed()
}

async fn up(c: &SshConnection, bytes: u64) -> Duration {
    let mut ch = c.exec("wc -c").await.expect("exec");
    let chunk = vec![0u8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        ch.stdin().write_all(&chunk).await.expect("write");
        sent += chunk.len() as u64;
    }
    ch.stdin().shutdown().await.expect("eof");
    let mut out = String::new();
    ch.stdout().read_to_string(&mut out).await.expect("read");
    assert_eq!(out.trim(), bytes.to_string());
    t.elapsed()
}

fn openssh(sshd: &Sshd, cipher: &str, remote: &str, stdin_bytes: Option<u64>) -> Duration {
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "KexAlgorithms=curve25519-sha256",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
    .args(["-c", cipher, "-i"])
    .arg(&sshd.client_key)
    .args(["-p", &sshd.port.to_string(), "root@127.0.0.1", remote])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let t = Instant::now();
    match stdin_bytes {
        None => {
            let st = cmd.stdin(Stdio::null()).status().expect("ssh");
            assert!(st.success());
        }
        Some(n) => {
            let mut child = cmd.stdin(Stdio::piped()).spawn().expect("ssh");
            let mut stdin = child.stdin.take().expect("stdin");
            let chunk = vec![0u8; 256 * 1024];
            let mut sent = 0;
            while sent < n {
                std::io::Write::write_all(&mut stdin, &chunk).expect("write");
                sent += chunk.len() as u64;
            }
            drop(stdin);
            assert!(child.wait().expect("wait").success());
        }
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly in release"]
async fn measure_against_openssh() {
    let sshd = Sshd::start();
    let cfg = config();

    let mut connects = Vec::new();
    let mut first = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let c = conn(&sshd, &cfg).await;
        connects.push(t.elapsed());
        let t = Instant::now();
        let ch = c.exec("true").await.expect("exec");
        ch.exit().await.expect("exit");
        first.push(t.elapsed());
        c.disconnect().await;
    }
    let c = conn(&sshd, &cfg).await;
    let mut extra = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let ch = c.exec("true").await.expect("exec");
        ch.exit().await.expect("exit");
        extra.push(t.elapsed());
    }
    let mut ssh_true = Vec::new();
    for _ in 0..7 {
        ssh_true.push(openssh(&sshd, "aes128-gcm@openssh.com", "true", None));
    }
    println!(
        "connect+auth median {:.1?}; first exec of `true` to exit {:.1?}; further channels {:.2?}; OpenSSH `ssh host true` {:.1?}",
        median(connects),
        median(first),
        median(extra),
        median(ssh_true)
    );

    for cipher in ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"] {
        let mut cfg = config();
        cfg.preferred_ciphers = vec![cipher.to_string()];
        let c = conn(&sshd, &cfg).await;
        let d = down(&c, GIB).await;
        let u = up(&c, GIB).await;
        let od = openssh(&sshd, cipher, &format!("head -c {GIB} /dev/zero"), None);
        let ou = openssh(&sshd, cipher, "cat >/dev/null", Some(GIB));
        println!(
            "{cipher}: nixmux down {:.0} MiB/s, up {:.0} MiB/s; OpenSSH client down {:.0} MiB/s, up {:.0} MiB/s (whole process)",
            mib_s(GIB, d),
            mib_s(GIB, u),
            mib_s(GIB, od),
            mib_s(GIB, ou)
        );
    }
}

/// What the parallel lanes of a closure push can reach at best: 8 upload channels (`cat >
/// /dev/null`, 96 MiB each) on one connection through a 100 ms / 1 Gbit/s relay, next to
/// the same straight to sshd. Each channel alone is held to sshd's 2 MiB window per round
/// trip (about 20 MB/s); the link is the limit for 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_upload_channels_through_a_long_link() {
    use nixmux_rig::relay::{Link, Relay};
    const PER_CHANNEL: u64 = 96 << 20;
    const CHANNELS: u64 = 8;
    let sshd = Sshd::start();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], sshd.port));
    let relay = Relay::start(addr, Link::new(100.0, 1000.0))
        .await
        .expect("relay");
    let key = nixmux_transport::HostPublicKey::from_openssh(&sshd.host_pub).expect("host key");
    let check = nixmux_transport::HostKeyCheck::pinned([key]);
    for (label, endpoint) in [
        ("straight to sshd", sshd.endpoint()),
        (
            "through the relay (100 ms, 1 Gbit/s)",
            nixmux_transport::Endpoint::new("127.0.0.1", relay.port(), "root"),
        ),
    ] {
        let c = nixmux_transport::connect(
            &endpoint,
            &sshd.identities(),
            &check,
            &config(),
            nixmux_transport::NoopObserver,
        )
        .await
        .expect("connect");
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..CHANNELS {
            let c = c.clone();
            tasks.spawn(async move { up(&c, PER_CHANNEL).await });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("channel");
        }
        let took = t.elapsed();
        println!(
            "{CHANNELS} channels × {} MiB up, one connection, {label}: {:.1} MiB/s",
            PER_CHANNEL >> 20,
            mib_s(CHANNELS * PER_CHANNEL, took)
        );
        c.disconnect().await;
    }
}
