//! No secret reaches the logs: a connection, an exec and authentication with a
//! passphrase-encrypted key (and a failed attempt with a wrong passphrase) run under a
//! subscriber capturing everything at TRACE, from our crates and from russh (which logs
//! through `log`). The capture must hold neither the passphrase nor the private key in any
//! of its encodings. `Debug` of the configuration types must not print them either.
//!
//! One test per binary: the capture is process-wide (key loading and signing may run on
//! blocking-pool threads, which a thread-scoped subscriber would miss).

use std::time::Duration;

use data_encoding::{BASE64, BASE64_NOPAD, HEXLOWER, HEXUPPER};
use nixmux_testkit::keys::{KeyFile, ed25519, machines_field};
use nixmux_testkit::logcap::capture_globally;
use nixmux_testkit::server::{ServerOptions, TestServer};
use nixmux_transport::{
    Endpoint, ExitStatus, HostKeyCheck, HostPublicKey, Identity, NoopObserver, TransportConfig,
    TransportError, connect,
};
use tokio::io::AsyncReadExt;

const PASSPHRASE: &str = "tr0ub4dor&3-correct-horse-battery";

/// Every form in which the key or the passphrase could leak.
fn secret_needles(key: &russh::keys::PrivateKey, file: &KeyFile) -> Vec<(String, String)> {
    let mut needles = vec![("passphrase".to_string(), PASSPHRASE.to_string())];
    for (what, pem) in [
        ("unencrypted PEM", &file.plain_pem),
        ("key file", &file.contents),
    ] {
        let body: Vec<&str> = pem
            .lines()
            .filter(|l| !l.starts_with("-----") && !l.is_empty())
            .collect();
        needles.push((format!("{what} (joined base64)"), body.concat()));
        for (i, line) in body.iter().enumerate() {
            // The first line of every OpenSSH private key starts with the same public
            // header (`openssh-key-v1`, cipher and KDF names); only check lines long enough
            // to be key-specific, from the second on.
            if i > 0 && line.len() >= 24 {
                needles.push((format!("{what} line {i}"), line.to_string()));
            }
        }
    }
    let seed = key
        .key_data()
        .ed25519()
        .map(|k| k.private.to_bytes().to_vec())
        .expect("an Ed25519 key");
    needles.push(("seed (hex)".into(), HEXLOWER.encode(&seed)));
    needles.push(("seed (HEX)".into(), HEXUPPER.encode(&seed)));
    needles.push(("seed (base64)".into(), BASE64_NOPAD.encode(&seed)));
    needles.push(("seed (base64, padded)".into(), BASE64.encode(&seed)));
    // `Debug` of a byte array: `[12, 34, ...]`, first 8 bytes.
    let dbg = format!("{:?}", &seed[..8]);
    needles.push((
        "seed (Debug bytes)".into(),
        dbg.trim_end_matches(']').to_string(),
    ));
    needles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_trace_logs_or_debug_output() {
    let logs = capture_globally().expect("first global subscriber of this test binary");
    let key = ed25519();
    let file = KeyFile::write(&key, Some(PASSPHRASE)).expect("key file");
    assert!(file.contents.contains("BEGIN OPENSSH PRIVATE KEY"));
    assert_ne!(file.contents, file.plain_pem, "the file is encrypted");
    let server = TestServer::start(ServerOptions::new(key.public_key().clone()))
        .await
        .expect("server");
    let host_keys = HostKeyCheck::pinned([HostPublicKey::from_machines_field(&machines_field(
        server.host_key(),
    ))
    .expect("host key")]);
    let endpoint = Endpoint::new("127.0.0.1", server.port(), "nix");
    let mut config = TransportConfig::default();
    config.handshake_timeout = Duration::from_secs(3);
    config.auth_timeout = Duration::from_secs(3);

    let run = async {
        // A wrong passphrase first: its error must not echo what was tried.
        let wrong = Identity::KeyFile {
            path: file.path.clone(),
            passphrase: Some(format!("{PASSPHRASE}-wrong")),
        };
        let e = connect(&endpoint, &[wrong], &host_keys, &config, NoopObserver)
            .await
            .expect_err("wrong passphrase");
        assert!(
            matches!(
                e,
                TransportError::KeyLoad { .. } | TransportError::AuthRejected { .. }
            ),
            "{e:?}"
        );
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(PASSPHRASE), "{shown}");

        let right = Identity::KeyFile {
            path: file.path.clone(),
            passphrase: Some(PASSPHRASE.into()),
        };
        let conn = connect(&endpoint, &[right], &host_keys, &config, NoopObserver)
            .await
            .expect("connects with the passphrase");
        let mut ch = conn.exec("echo secret-free").await.expect("exec");
        let mut out = String::new();
        ch.stdout().read_to_string(&mut out).await.expect("stdout");
        assert_eq!(out, "secret-free\n");
        assert_eq!(ch.exit().await.expect("exit"), ExitStatus::Code(0));
        conn.disconnect().await;
    };
    tokio::time::timeout(Duration::from_secs(8), run)
        .await
        .expect("no hang");

    let text = logs.text();
    // The capture really saw everything: russh's own TRACE/DEBUG lines and ours.
    assert!(text.contains("russh"), "russh's logs were not captured");
    assert!(text.contains("TRACE"), "TRACE level was not captured");
    assert!(text.lines().count() > 50, "suspiciously few log lines");
    for (what, needle) in secret_needles(&key, &file) {
        assert!(
            !text.contains(&needle),
            "the {what} appears in the logs: {needle:?}"
        );
    }

    // Debug of the configuration types.
    let id = Identity::KeyFile {
        path: file.path.clone(),
        passphrase: Some(PASSPHRASE.into()),
    };
    let shown = format!("{id:?} {id:#?}");
    assert!(!shown.contains(PASSPHRASE), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");
    let shown = format!("{config:?} {config:#?} {host_keys:?} {endpoint:?}");
    for (what, needle) in secret_needles(&key, &file) {
        assert!(
            !shown.contains(&needle),
            "the {what} appears in Debug: {shown}"
        );
    }
}
