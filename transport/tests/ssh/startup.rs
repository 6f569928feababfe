//! Connections the server drops before the key exchange (sshd `MaxStartups`, TCP wrappers)
//! are reported as `ClosedAtStartup`, distinct and retryable.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nixmux_transport::{
    DisconnectCause, ErrorKind, HostKeyCheck, Identity, NoopObserver, Stage, TransportError,
    connect, connect_over,
};

use crate::support::{Sshd, SshdOptions, config, keygen, try_connect};

/// With `MaxStartups 1:100:1` and one unauthenticated connection held open, sshd drops
/// every further connection right after accepting it: each connect fails with
/// ClosedAtStartup (never a generic handshake error), and succeeds again once the held
/// connection is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_startups_drop_is_closed_at_startup() {
    let sshd = Sshd::start_with(SshdOptions {
        max_startups: "1:100:1".into(),
        ..Default::default()
    });
    let holder = tokio::task::spawn_blocking({
        let port = sshd.port;
        move || hold_startup_slot(port)
    })
    .await
    .expect("join");

    for attempt in 0..5 {
        let err = try_connect(&sshd, &config())
            .await
            .expect_err("sshd must drop the connection");
        println!("attempt {attempt}: {err}");
        match &err {
            TransportError::ClosedAtStartup {
                identification_received,
                ..
            } => assert!(!identification_received),
            other => panic!("{other:?}"),
        }
        assert!(err.is_startup_drop());
        assert!(err.is_retryable());
        assert_eq!(err.kind(), ErrorKind::Unreachable);
        assert_eq!(err.stage(), Stage::Handshake);
        assert!(err.to_string().contains("MaxStartups"), "{err}");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        sshd.count_log("past MaxStartups") >= 5,
        "{}",
        sshd.log_text()
    );

    // Once the slot is free, a retry gets through (sshd learns that the held connection is
    // gone a moment after it closes).
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(5);
    let conn = loop {
        match try_connect(&sshd, &config()).await {
            Ok(c) => break c,
            Err(e) if e.is_startup_drop() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    conn.disconnect().await;
}

/// Opens a TCP connection that sshd counts as an unauthenticated startup: it got sshd's
/// banner and sends nothing. Retried while sshd still counts its own readiness probe.
fn hold_startup_slot(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut banner = [0u8; 4];
        if s.read_exact(&mut banner).is_ok() && &banner == b"SSH-" {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "sshd never accepted a first connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a fake server does with each connection.
#[derive(Clone, Copy)]
enum Fake {
    /// Accepts and closes at once.
    Close,
    /// Accepts, lets the client's identification arrive and closes without reading it,
    /// which makes the kernel reset the connection.
    Reset,
    /// Reads the client's identification, sends text, closes.
    Text(&'static [u8]),
    /// Reads the client's identification, sends its own, closes.
    Identify,
    /// Sends its identification and a complete (meaningless) first packet, then closes.
    FirstPacket,
}

/// A listener that treats `n` connections as `fake` says.
fn fake_server(fake: Fake, n: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut s, _)) = l.accept() else { return };
            let read_client_id = |s: &TcpStream| {
                let mut line = String::new();
                let _ = BufReader::new(s).read_line(&mut line);
            };
            let _ = match fake {
                Fake::Close => Ok(()),
                Fake::Reset => {
                    std::thread::sleep(Duration::from_millis(200));
                    Ok(())
                }
                Fake::Text(t) => {
                    read_client_id(&s);
                    s.write_all(t)
                }
                Fake::Identify => {
                    read_client_id(&s);
                    s.write_all(b"SSH-2.0-fake\r\n")
                }
                Fake::FirstPacket => {
                    read_client_id(&s);
                    // packet_length 12: padding length 10, SSH_MSG_KEXINIT, 10 bytes padding.
                    let mut p = b"SSH-2.0-fake\r\n\0\0\0\x0c\x0a\x14".to_vec();
                    p.extend_from_slice(&[0u8; 10]);
                    s.write_all(&p)
                }
            };
            drop(s);
        }
    });
    port
}

async fn connect_to(port: u16) -> TransportError {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = keygen(dir.path(), "k", "ed25519", "");
    connect(
        &nixmux_transport::Endpoint::new("127.0.0.1", port, "root"),
        &[Identity::key_file(&key)],
        &HostKeyCheck::strict([]),
        &config(),
        NoopObserver,
    )
    .await
    .expect_err("the fake server never completes a handshake")
}

/// A listener that accepts and closes at once (a TCP wrapper, a fail2ban-style block), one
/// that resets, one that says something first, and one that closes after its
/// identification: all ClosedAtStartup, also over `connect_over`. One that got as far as a
/// key-exchange packet is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_closing_before_key_exchange() {
    let err = connect_to(fake_server(Fake::Close, 1)).await;
    println!("accept+close: {err}");
    assert!(err.is_startup_drop(), "{err:?}");

    let err = connect_to(fake_server(Fake::Reset, 1)).await;
    println!("accept+reset: {err}");
    match &err {
        TransportError::ClosedAtStartup {
            cause: DisconnectCause::Io { kind, .. },
            ..
        } => assert_eq!(*kind, std::io::ErrorKind::ConnectionReset),
        other => panic!("{other:?}"),
    }

    let err = connect_to(fake_server(Fake::Text(b"Exceeded MaxStartups\r\n"), 1)).await;
    println!("text+close: {err}");
    match &err {
        TransportError::ClosedAtStartup {
            identification_received: false,
            server_text,
            ..
        } => assert_eq!(server_text, "Exceeded MaxStartups"),
        other => panic!("{other:?}"),
    }

    let err = connect_to(fake_server(Fake::Identify, 1)).await;
    println!("identification+close: {err}");
    assert!(
        matches!(
            err,
            TransportError::ClosedAtStartup {
                identification_received: true,
                ..
            }
        ),
        "{err:?}"
    );

    let err = connect_to(fake_server(Fake::FirstPacket, 1)).await;
    println!("first packet+close: {err}");
    assert!(!err.is_startup_drop(), "{err:?}");

    let port = fake_server(Fake::Close, 1);
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = keygen(dir.path(), "k", "ed25519", "");
    let err = connect_over(
        stream,
        &nixmux_transport::Endpoint::new("127.0.0.1", port, "root"),
        &[Identity::key_file(&key)],
        &HostKeyCheck::strict([]),
        &config(),
        NoopObserver,
    )
    .await
    .expect_err("closed");
    println!("connect_over, accept+close: {err}");
    assert!(err.is_startup_drop(), "{err:?}");
}
