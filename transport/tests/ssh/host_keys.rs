//! Host-key verification against a real sshd.

use std::process::Command;

use nixmux_transport::{
    Endpoint, HostKeyCheck, HostKeyPolicy, HostKeyProblem, HostKeySource, HostPublicKey,
    KeyLocation, NoopObserver, SshConnection, TransportError, connect,
};

use crate::support::{Sshd, config, keygen, pub_line, run};

async fn try_connect(sshd: &Sshd, check: &HostKeyCheck) -> Result<SshConnection, TransportError> {
    connect(
        &sshd.endpoint(),
        &sshd.identities(),
        check,
        &config(),
        NoopObserver,
    )
    .await
}

/// sshd log lines (after byte offset `since`) that would mean authentication or a session
/// happened.
fn assert_no_auth_in_log(sshd: &Sshd, since: usize) {
    // Give sshd a moment to log the closed connection.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = sshd.log_text().get(since..).unwrap_or_default().to_string();
    for needle in [
        "Accepted publickey",
        "Failed publickey",
        "userauth-request",
        "session_new",
        "server_input_channel_open",
    ] {
        assert!(!log.contains(needle), "sshd log shows {needle:?}:\n{log}");
    }
    assert!(
        log.contains("[preauth]"),
        "expected a preauth disconnect in:\n{log}"
    );
}

/// Unknown host: refused inside the key exchange, before auth and before any channel;
/// the error carries the lookup name, fingerprint and the line that would accept the key,
/// and that line does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_refused_before_auth() {
    let sshd = Sshd::start();
    let empty = sshd.path().join("empty_known_hosts");
    let other = keygen(sshd.path(), "other_host", "ed25519", "");
    // A key for another host, and a plain `127.0.0.1` entry (port 22 form) with the right
    // key: neither may match `[127.0.0.1]:PORT`.
    std::fs::write(
        &empty,
        format!(
            "otherhost {}\n127.0.0.1 {}\n",
            pub_line(&other),
            sshd.host_pub
        ),
    )
    .expect("write");
    let mark = sshd.log_text().len();
    let err = try_connect(&sshd, &HostKeyCheck::strict([empty.clone()]))
        .await
        .expect_err("must refuse");
    println!("{err}");
    let r = err.host_key_report().expect("host key error").clone();
    assert!(matches!(err, TransportError::HostKeyUnknown(_)));
    assert_eq!(r.problem, HostKeyProblem::Unknown);
    assert_eq!(r.lookup, format!("[127.0.0.1]:{}", sshd.port));
    assert_eq!(r.algorithm, "ssh-ed25519");
    assert_eq!(
        r.known_hosts_line,
        format!("[127.0.0.1]:{} {}", sshd.port, sshd.host_pub)
    );
    let expected_fp = HostPublicKey::from_openssh(&sshd.host_pub)
        .expect("key")
        .fingerprint();
    assert_eq!(r.fingerprint, expected_fp);
    assert_eq!(r.searched, vec![empty.clone()]);
    assert!(!err.is_retryable());
    assert_no_auth_in_log(&sshd, mark);

    // The suggested line is exactly what is needed.
    std::fs::write(&empty, format!("{}\n", r.known_hosts_line)).expect("write");
    let conn = try_connect(&sshd, &HostKeyCheck::strict([empty]))
        .await
        .expect("now known");
    assert_eq!(conn.host_key_fingerprint(), expected_fp);
}

/// A pinned key (machines-file field 8) that is not the server's: mismatch naming the pin.
/// The right pin (base64 of the .pub line, as Nix writes it) is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_key_mismatch_and_match() {
    let sshd = Sshd::start();
    let other = keygen(sshd.path(), "other_host", "ed25519", "");
    let wrong = HostPublicKey::from_openssh(&pub_line(&other)).expect("key");
    let mark = sshd.log_text().len();
    let err = try_connect(&sshd, &HostKeyCheck::pinned([wrong.clone()]))
        .await
        .expect_err("must refuse");
    println!("{err}");
    let r = err.host_key_report().expect("report");
    assert!(matches!(err, TransportError::HostKeyMismatch(_)));
    assert_eq!(
        r.expected,
        vec![KeyLocation::Pinned {
            algorithm: "ssh-ed25519".into(),
            fingerprint: wrong.fingerprint()
        }]
    );
    assert!(err.to_string().contains("pinned in the machines file"));
    assert_no_auth_in_log(&sshd, mark);

    let field = {
        let out = Command::new("base64")
            .arg("-w0")
            .arg(sshd.path().join("host_ed25519.pub"))
            .output()
            .expect("base64");
        String::from_utf8(out.stdout).expect("utf8")
    };
    let pin = HostPublicKey::from_machines_field(&field).expect("machines field");
    let conn = try_connect(&sshd, &HostKeyCheck::pinned([pin]))
        .await
        .expect("pinned ok");
    assert_eq!(conn.host_key_source(), &HostKeySource::Pinned);
}

/// A known_hosts file hashed by `ssh-keygen -H` is matched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_known_hosts_accepted() {
    let sshd = Sshd::start();
    let kh = sshd.path().join("hashed_known_hosts");
    std::fs::copy(&sshd.known_hosts, &kh).expect("copy");
    run(Command::new("ssh-keygen")
        .arg("-q")
        .arg("-H")
        .arg("-f")
        .arg(&kh));
    let text = std::fs::read_to_string(&kh).expect("read");
    assert!(text.starts_with("|1|"), "{text}");
    assert!(!text.contains("127.0.0.1"));
    let conn = try_connect(&sshd, &HostKeyCheck::strict([kh.clone()]))
        .await
        .expect("hashed ok");
    assert_eq!(
        conn.host_key_source(),
        &HostKeySource::KnownHosts { path: kh, line: 1 }
    );
}

/// `[host]:port` matching by name and by wildcard pattern, and a changed key for a known
/// host (another line of the same type) is a mismatch with file:line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_port_patterns_and_mismatch() {
    let sshd = Sshd::start();
    let kh = sshd.path().join("kh");
    // Connect by name: the lookup is `[localhost]:PORT`.
    std::fs::write(
        &kh,
        format!("[LocalHost]:{} {}\n", sshd.port, sshd.host_pub),
    )
    .expect("write");
    let by_name = Endpoint::new("localhost", sshd.port, "root");
    let conn = connect(
        &by_name,
        &sshd.identities(),
        &HostKeyCheck::strict([kh.clone()]),
        &config(),
        NoopObserver,
    )
    .await
    .expect("by name");
    drop(conn);
    std::fs::write(
        &kh,
        format!(
            "# pattern\n[127.0.0.*]:{},!evil {}\n",
            sshd.port, sshd.host_pub
        ),
    )
    .expect("write");
    try_connect(&sshd, &HostKeyCheck::strict([kh.clone()]))
        .await
        .expect("by pattern");

    let other = keygen(sshd.path(), "other_host", "ed25519", "");
    std::fs::write(
        &kh,
        format!("\n[127.0.0.1]:{} {}\n", sshd.port, pub_line(&other)),
    )
    .expect("write");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mark = sshd.log_text().len();
    let err = try_connect(&sshd, &HostKeyCheck::strict([kh.clone()]))
        .await
        .expect_err("mismatch");
    println!("{err}");
    let r = err.host_key_report().expect("report");
    assert!(matches!(err, TransportError::HostKeyMismatch(_)));
    match &r.expected[0] {
        KeyLocation::KnownHosts { path, line, .. } => {
            assert_eq!(path, &kh);
            assert_eq!(*line, 2);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(&format!("{}:2", kh.display())));
    assert_no_auth_in_log(&sshd, mark);
}

/// AcceptNew learns an unknown host once (then it is known), `@revoked` refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_new_and_revoked() {
    let sshd = Sshd::start();
    let kh = sshd.path().join("learned_known_hosts");
    let check = HostKeyCheck::accept_new([kh.clone()], kh.clone());
    assert!(matches!(check.policy, HostKeyPolicy::AcceptNew { .. }));
    let conn = try_connect(&sshd, &check).await.expect("learn");
    assert!(matches!(
        conn.host_key_source(),
        HostKeySource::Learned { .. }
    ));
    assert_eq!(
        std::fs::read_to_string(&kh).expect("read"),
        format!("[127.0.0.1]:{} {}\n", sshd.port, sshd.host_pub)
    );
    let conn = try_connect(&sshd, &HostKeyCheck::strict([kh.clone()]))
        .await
        .expect("strict after learning");
    assert!(matches!(
        conn.host_key_source(),
        HostKeySource::KnownHosts { line: 1, .. }
    ));

    let revoked = sshd.path().join("revoked");
    std::fs::write(&revoked, format!("@revoked * {}\n", sshd.host_pub)).expect("write");
    let err = try_connect(&sshd, &HostKeyCheck::strict([kh, revoked]))
        .await
        .expect_err("revoked");
    println!("{err}");
    assert!(matches!(err, TransportError::HostKeyRevoked(_)));

    // insecure_accept_any is reported as such.
    let conn = try_connect(&sshd, &HostKeyCheck::insecure_accept_any())
        .await
        .expect("insecure");
    assert_eq!(conn.host_key_source(), &HostKeySource::InsecureAcceptAny);
}
