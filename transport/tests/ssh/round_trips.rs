//! Round trips of a new connection, counted through an emulated WAN link (the rig's relay)
//! with a long round trip: each stage then takes a whole number of round trips plus a little
//! local work, so dividing its duration by the round trip counts them.
//!
//! What is checked: authentication takes one round trip for an accepted key file (the
//! `ssh-userauth` service request, the signed request, their answers), one more for each
//! identity the server refuses first, and an agent key is queried first (one more) unless the
//! same endpoint accepted it before in this process. `fast_auth = false` gives back the
//! three round trips of the usual sequence.
//!
//! The first channel ([`TransportConfig::first_channel`]) rides with the authentication
//! request once the endpoint has accepted the key in this process: authentication and the
//! open then take one round trip together, against OpenSSH (whose privilege separation hands
//! the already-read open to the post-authentication process) and Dropbear alike. A key that
//! is refused after all: OpenSSH drops the early open (`SSH_MSG_UNIMPLEMENTED`) and the open
//! goes out again after the next identity succeeds; Dropbear ends the connection ("before
//! userauth"), and a new connection without the early open takes over.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixmux_rig::relay::{Link, Relay};
use nixmux_transport::{
    ConnectEvent, ConnectEventKind, Endpoint, ExecOptions, FirstChannel, HostKeyCheck,
    HostPublicKey, Identity, SshConnection, TransportConfig, TransportError, connect,
};

use crate::support::{Agent, Dropbear, Sshd, config, keygen, pub_line, read_all};

/// Long enough that local work (sshd's privilege separation, signatures, an ssh-agent, a
/// loaded CI machine) stays well under half of it.
const RTT_MS: f64 = 250.0;

pub(crate) struct Relayed {
    relay: Relay,
    host_key: HostKeyCheck,
}

impl Relayed {
    pub(crate) async fn new(target: u16, host_pub: &str) -> Relayed {
        let addr: SocketAddr = ([127, 0, 0, 1], target).into();
        let relay = Relay::start(addr, Link::new(RTT_MS, 0.0))
            .await
            .expect("relay");
        let key = HostPublicKey::from_openssh(host_pub).expect("host key");
        Relayed {
            relay,
            host_key: HostKeyCheck::pinned([key]),
        }
    }

    pub(crate) fn endpoint(&self) -> Endpoint {
        Endpoint::new("127.0.0.1", self.relay.port(), "root")
    }

    /// Connects; returns the connection and the authentication stage in round trips.
    pub(crate) async fn connect(
        &self,
        identities: &[Identity],
        cfg: &TransportConfig,
    ) -> Result<(SshConnection, f64), TransportError> {
        let events: Arc<Mutex<Vec<ConnectEvent>>> = Arc::default();
        let sink = events.clone();
        let conn = connect(
            &self.endpoint(),
            identities,
            &self.host_key,
            cfg,
            move |e: &ConnectEvent| sink.lock().expect("events").push(e.clone()),
        )
        .await?;
        let events = events.lock().expect("events");
        let auth = events
            .iter()
            .find(|e| matches!(e.kind, ConnectEventKind::Authenticated { .. }))
            .expect("an Authenticated event")
            .took;
        Ok((conn, rtts(auth)))
    }
}

/// The connection works after a pipelined authentication.
/// A Dropbear server behind the WAN relay (its host key pinned); `None` if Dropbear is not
/// installed.
pub(crate) async fn relayed_dropbear() -> Option<(Dropbear, Relayed)> {
    let server = tokio::task::spawn_blocking(Dropbear::start)
        .await
        .expect("join")?;
    let host_pub = std::fs::read_to_string(&server.known_hosts)
        .expect("known_hosts")
        .split_whitespace()
        .skip(1)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let relayed = Relayed::new(server.port, &host_pub).await;
    Some((server, relayed))
}

pub(crate) async fn echo_ok(conn: &SshConnection) {
    let mut ch = conn.exec("echo ok").await.expect("exec");
    assert_eq!(
        read_all(ch.stdout(), Duration::from_secs(10)).await,
        b"ok\n"
    );
}

fn rtts(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3 / RTT_MS
}

/// `n` round trips, give or take local work.
pub(crate) fn assert_rtts(what: &str, measured: f64, n: u32) {
    let n = f64::from(n);
    println!("{what}: {measured:.2} round trips (expected {n})");
    assert!(
        measured > n - 0.3 && measured < n + 0.6,
        "{what}: {measured:.2} round trips, expected {n}"
    );
}

/// One round trip for an accepted key file (three without `fast_auth`), and one more per
/// refused identity before it: a refused signed request falls through to the next identity
/// like a refused query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_auth_round_trips() {
    let sshd = Sshd::start();
    let stranger = keygen(sshd.path(), "stranger", "ed25519", "");
    let rsa = keygen(sshd.path(), "id_rsa", "rsa", "");
    sshd.authorize(&rsa);
    let relayed = Relayed::new(sshd.port, &sshd.host_pub).await;

    let (conn, n) = relayed
        .connect(&sshd.identities(), &config())
        .await
        .expect("connect");
    assert_rtts("accepted key file", n, 1);
    echo_ok(&conn).await;
    conn.disconnect().await;

    let ids = [Identity::key_file(&stranger), Identity::key_file(&rsa)];
    let (conn, n) = relayed.connect(&ids, &config()).await.expect("connect");
    assert_rtts("refused key file, then an RSA one", n, 2);
    assert!(conn.identity().contains("id_rsa"), "{}", conn.identity());
    assert!(
        conn.identity().contains("rsa-sha2-512"),
        "{}",
        conn.identity()
    );
    conn.disconnect().await;

    // Only refused keys: rejected, naming both, after one round trip each.
    let other = keygen(sshd.path(), "other", "ecdsa", "");
    let ids = [Identity::key_file(&stranger), Identity::key_file(&other)];
    match relayed.connect(&ids, &config()).await {
        Err(TransportError::AuthRejected { tried, .. }) => {
            assert_eq!(tried.len(), 2, "{tried:?}");
            assert!(tried.iter().all(|t| t.ends_with(": rejected")), "{tried:?}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("refused keys authenticated"),
    }

    // An encrypted key: decrypted while the key exchange is on the wire, so still one round
    // trip (bcrypt-pbkdf would otherwise add its own time to the stage).
    let enc = keygen(sshd.path(), "id_enc", "ed25519", "correct horse");
    sshd.authorize(&enc);
    let ids = [Identity::KeyFile {
        path: enc.clone(),
        passphrase: Some("correct horse".into()),
    }];
    let (conn, n) = relayed.connect(&ids, &config()).await.expect("connect");
    assert_rtts("encrypted key file", n, 1);
    conn.disconnect().await;

    let mut slow = config();
    slow.fast_auth = false;
    let (conn, n) = relayed
        .connect(&sshd.identities(), &slow)
        .await
        .expect("connect");
    assert_rtts("accepted key file without fast_auth", n, 3);
    conn.disconnect().await;
}

/// Agent keys are queried first (the agent may ask its user to confirm each signature), so
/// the first connection pays the query; once the endpoint accepted a key, later connections
/// sign with it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_auth_round_trips() {
    let sshd = Sshd::start();
    let agent = Agent::start(sshd.path());
    let stranger = keygen(sshd.path(), "stranger", "ed25519", "");
    agent.add(&stranger);
    agent.add(&sshd.client_key);
    let relayed = Relayed::new(sshd.port, &sshd.host_pub).await;
    let ids = [Identity::Agent {
        socket: Some(agent.socket.clone()),
    }];

    // Stranger queried and refused (with the service request), ours queried, then signed.
    let (conn, n) = relayed.connect(&ids, &config()).await.expect("connect");
    assert_rtts("agent, first connection", n, 3);
    assert!(
        conn.identity().contains("client_ed25519"),
        "{}",
        conn.identity()
    );
    conn.disconnect().await;

    // Stranger queried and refused, ours signed at once.
    let (conn, n) = relayed.connect(&ids, &config()).await.expect("connect");
    assert_rtts("agent, known key", n, 2);
    assert!(
        conn.identity().contains("client_ed25519"),
        "{}",
        conn.identity()
    );
    echo_ok(&conn).await;
    conn.disconnect().await;

    // The server stops accepting the agent key: its signed request is refused, the next
    // identity is tried, and the key is queried first again afterwards.
    let backup = keygen(sshd.path(), "backup", "ed25519", "");
    std::fs::write(
        sshd.path().join("authorized_keys"),
        format!("{}\n", pub_line(&backup)),
    )
    .expect("authorized_keys");
    let ids = [
        Identity::Agent {
            socket: Some(agent.socket.clone()),
        },
        Identity::key_file(&backup),
    ];
    for what in ["agent key refused, signed", "agent key refused, queried"] {
        let (conn, n) = relayed.connect(&ids, &config()).await.expect("connect");
        // Stranger queried, our agent key signed or queried, the backup key signed: one
        // round trip each.
        assert_rtts(what, n, 3);
        assert!(conn.identity().contains("backup"), "{}", conn.identity());
        conn.disconnect().await;
    }
}

/// Dropbear takes the pipelined service and signed requests too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropbear_takes_fast_auth() {
    let Some((server, relayed)) = relayed_dropbear().await else {
        println!("dropbear not installed: skipped");
        return;
    };
    let stranger = keygen(server.dir.path(), "stranger", "ed25519", "");
    let ids = [
        Identity::key_file(&stranger),
        Identity::key_file(&server.client_key),
    ];
    let (conn, n) = relayed.connect(&ids, &config()).await.expect("connect");
    assert_rtts("dropbear: refused key file, then ours", n, 2);
    echo_ok(&conn).await;
    conn.disconnect().await;
}

/// A config whose connections open `first` ahead.
pub(crate) fn opening(first: FirstChannel) -> TransportConfig {
    let mut c = config();
    c.first_channel = Some(first);
    c
}

/// Round trips of `echo ok` on a new channel (open + exec request), checking its output.
pub(crate) async fn exec_rtts(conn: &SshConnection) -> f64 {
    let t = std::time::Instant::now();
    let mut ch = conn.exec("echo ok").await.expect("exec");
    let took = t.elapsed();
    assert_eq!(
        read_all(ch.stdout(), Duration::from_secs(10)).await,
        b"ok\n"
    );
    rtts(took)
}

/// Connects expecting the first channel's open to have gone behind the signed request:
/// authentication and the open take one round trip together, and the exec on that channel
/// one more (`what` names the case in the output). Returns the connection.
pub(crate) async fn connect_with_open_behind_auth(
    relayed: &Relayed,
    identities: &[Identity],
    cfg: &TransportConfig,
    what: &str,
) -> SshConnection {
    let (conn, n) = relayed.connect(identities, cfg).await.expect("connect");
    assert_rtts(&format!("{what}: auth with the open behind it"), n, 1);
    assert!(conn.first_channel_pipelined(), "{what}");
    assert_rtts(
        &format!("{what}: exec on the channel opened with auth"),
        exec_rtts(&conn).await,
        1,
    );
    conn
}

/// Authentication and the first channel's open in one round trip once the key is known, for
/// a session channel and a channel to a Unix socket; another kind of first open closes the
/// early one unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_channel_rides_with_auth() {
    let sshd = Sshd::start();
    let relayed = Relayed::new(sshd.port, &sshd.host_pub).await;
    let ids = sshd.identities();
    let session = opening(FirstChannel::Session);

    // Not known yet: the open waits for authentication (held by the session, then one round
    // trip of its own), so the exec takes two.
    let (conn, n) = relayed.connect(&ids, &session).await.expect("connect");
    assert_rtts("auth, key not yet accepted here", n, 1);
    assert!(!conn.first_channel_pipelined());
    assert_rtts("open + exec", exec_rtts(&conn).await, 2);
    conn.disconnect().await;

    // Known: the open went with the signed request, so only the exec request is left. sshd's
    // privilege separation carried the open, read with the request, over to the
    // post-authentication process: otherwise it would never be confirmed.
    let conn = connect_with_open_behind_auth(&relayed, &ids, &session, "known key").await;
    // Later channels are opened as usual.
    assert_rtts("a second open + exec", exec_rtts(&conn).await, 2);
    conn.disconnect().await;

    // A channel to a Unix socket (the daemon socket of ssh-ng): confirmed with the
    // authentication, so it is there at once.
    let path = sshd.path().join("echo.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let echo = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let socket = opening(FirstChannel::Streamlocal(path.display().to_string()));
    let (conn, n) = relayed.connect(&ids, &socket).await.expect("connect");
    assert_rtts("auth with a socket channel behind it", n, 1);
    assert!(conn.first_channel_pipelined());
    let t = std::time::Instant::now();
    let mut opts = ExecOptions::default();
    opts.first_input = Some(bytes::Bytes::from_static(b"ping"));
    let mut ch = conn
        .open_streamlocal(&path.display().to_string(), opts)
        .await
        .expect("open_streamlocal");
    let open = rtts(t.elapsed());
    println!("socket channel opened with auth: {open:.2} round trips after it");
    assert!(open < 0.3, "{open:.2} round trips");
    let mut buf = [0u8; 4];
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_exact(ch.stdout(), &mut buf),
    )
    .await
    .expect("echo in time")
    .expect("echo");
    assert_eq!(&buf, b"ping");
    drop(ch);
    conn.disconnect().await;

    // The early open is a session, the first open a socket channel: the socket channel is
    // opened as usual, the session closed unused, and exec works on a channel of its own.
    let (conn, _) = relayed.connect(&ids, &session).await.expect("connect");
    assert!(conn.first_channel_pipelined());
    let ch = conn
        .open_streamlocal(&path.display().to_string(), ExecOptions::default())
        .await
        .expect("open_streamlocal");
    drop(ch);
    assert_rtts(
        "open + exec after an unused early open",
        exec_rtts(&conn).await,
        2,
    );
    conn.disconnect().await;
    echo.abort();
}

/// OpenSSH refuses the key the early open went behind: sshd answers the open with
/// `SSH_MSG_UNIMPLEMENTED` (it is still in userauth), the next identity succeeds and the open
/// goes out again; with no other identity, a clean rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_open_behind_refused_key_openssh() {
    let sshd = Sshd::start();
    let relayed = Relayed::new(sshd.port, &sshd.host_pub).await;
    let session = opening(FirstChannel::Session);
    let backup = keygen(sshd.path(), "backup", "ed25519", "");
    let ours = Identity::key_file(&sshd.client_key);
    let remember = || async {
        std::fs::write(
            sshd.path().join("authorized_keys"),
            format!("{}\n", pub_line(&sshd.client_key)),
        )
        .expect("authorized_keys");
        let (conn, _) = relayed
            .connect(std::slice::from_ref(&ours), &session)
            .await
            .expect("connect");
        conn.disconnect().await;
        std::fs::write(
            sshd.path().join("authorized_keys"),
            format!("{}\n", pub_line(&backup)),
        )
        .expect("authorized_keys");
    };

    remember().await;
    let ids = [ours.clone(), Identity::key_file(&backup)];
    let (conn, n) = relayed.connect(&ids, &session).await.expect("connect");
    assert_rtts("refused key with the open, then the backup key", n, 2);
    assert!(conn.identity().contains("backup"), "{}", conn.identity());
    assert!(!conn.first_channel_pipelined());
    assert_rtts("open again + exec", exec_rtts(&conn).await, 2);
    conn.disconnect().await;
    let log = sshd.log_text();
    assert!(
        log.contains("dispatch_protocol_error: type 90"),
        "sshd did not answer the early open as unexpected: {log}"
    );

    remember().await;
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        relayed.connect(std::slice::from_ref(&ours), &session),
    )
    .await
    .expect("no hang");
    match r {
        Err(TransportError::AuthRejected { tried, .. }) => {
            assert_eq!(tried.len(), 1, "{tried:?}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a refused key authenticated"),
    }
}

/// Dropbear takes the early open behind an accepted key, and ends the connection over it
/// behind a refused one ("Received message 90 before userauth"): a new connection without
/// the early open tries the identities again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropbear_early_open() {
    let Some((server, relayed)) = relayed_dropbear().await else {
        println!("dropbear not installed: skipped");
        return;
    };
    let session = opening(FirstChannel::Session);
    let ours = Identity::key_file(&server.client_key);
    let authorized = server.dir.path().join("home/.ssh/authorized_keys");
    let backup = keygen(server.dir.path(), "backup", "ed25519", "");

    let (conn, _) = relayed
        .connect(std::slice::from_ref(&ours), &session)
        .await
        .expect("connect");
    assert!(!conn.first_channel_pipelined());
    conn.disconnect().await;
    let ours_only = std::slice::from_ref(&ours);
    let conn = connect_with_open_behind_auth(&relayed, ours_only, &session, "dropbear").await;
    conn.disconnect().await;

    // Refused after all: Dropbear hangs up over the open; a second connection, without it.
    std::fs::write(&authorized, format!("{}\n", pub_line(&backup))).expect("authorized_keys");
    let ids = [ours.clone(), Identity::key_file(&backup)];
    let (conn, _) = tokio::time::timeout(Duration::from_secs(30), relayed.connect(&ids, &session))
        .await
        .expect("no hang")
        .expect("connect");
    assert!(conn.identity().contains("backup"), "{}", conn.identity());
    assert!(!conn.first_channel_pipelined());
    echo_ok(&conn).await;
    conn.disconnect().await;
    let log = std::fs::read_to_string(server.dir.path().join("dropbear.log")).unwrap_or_default();
    assert!(log.contains("before userauth"), "{log}");

    // Only the refused key: a clean rejection, no hang.
    std::fs::write(&authorized, format!("{}\n", pub_line(&server.client_key)))
        .expect("authorized_keys");
    let (conn, _) = relayed
        .connect(std::slice::from_ref(&ours), &session)
        .await
        .expect("connect");
    conn.disconnect().await;
    std::fs::write(&authorized, format!("{}\n", pub_line(&backup))).expect("authorized_keys");
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        relayed.connect(std::slice::from_ref(&ours), &session),
    )
    .await
    .expect("no hang");
    match r {
        Err(TransportError::AuthRejected { .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a refused key authenticated"),
    }
}

/// With delayed compression (`zlib@openssh.com`, which sshd turns on for what follows the
/// successful request) the early open waits for the success instead: not pipelined, but it
/// works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_channel_waits_under_delayed_compression() {
    let sshd = Sshd::start();
    let relayed = Relayed::new(sshd.port, &sshd.host_pub).await;
    let mut cfg = opening(FirstChannel::Session);
    cfg.compression = true;
    for _ in 0..2 {
        let (conn, n) = relayed
            .connect(&sshd.identities(), &cfg)
            .await
            .expect("connect");
        assert_eq!(conn.compression(), Some("zlib@openssh.com"));
        assert_rtts("auth under delayed compression", n, 1);
        assert!(!conn.first_channel_pipelined());
        assert_rtts("open + exec", exec_rtts(&conn).await, 2);
        conn.disconnect().await;
    }
}
