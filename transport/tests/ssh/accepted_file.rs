//! [`TransportConfig::accepted_keys_file`]: what one process learned about accepted keys, a
//! new process starts with. Counted through the rig's WAN relay like `round_trips.rs`.
//!
//! A new process is simulated by a copy of the file under another path: the memory of
//! accepted keys is one per file and process, loaded from the file when a connection first
//! names it, so a path this test process never used before is loaded fresh, exactly as a new
//! process would load the original.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nixmux_transport::{FirstChannel, Identity, TransportConfig, TransportError};

use crate::round_trips::{
    Relayed, assert_rtts, connect_with_open_behind_auth, echo_ok, exec_rtts, opening,
    relayed_dropbear,
};
use crate::support::{Agent, Sshd, keygen, pub_line};

/// Opens a session first, remembering accepted keys in `file`.
fn remembering(file: &Path) -> TransportConfig {
    let mut c = opening(FirstChannel::Session);
    c.accepted_keys_file = Some(file.to_path_buf());
    c
}

/// The entry lines of the file (without the header).
fn entries(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).expect("accepted-keys file");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("nixmux-accepted-keys v1"), "{text}");
    lines.map(str::to_owned).collect()
}

/// A copy of `file` under a name this process has not used: what a new process would load.
fn fresh_copy(file: &Path, name: &str) -> PathBuf {
    let to = file.with_file_name(name);
    std::fs::copy(file, &to).expect("copy");
    to
}

/// OpenSSH: the first process records the key; a new one opens its first channel with the
/// signed request (one round trip for both). After the key was removed from
/// authorized_keys, a new process pays the refusal once (sshd drops the early open), the
/// entry is dropped from the file, and the next new process does not send the open early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_starts_with_the_accepted_keys() {
    let sshd = Sshd::start();
    let relayed = Relayed::new(sshd.port, &sshd.host_pub).await;
    let ours = Identity::key_file(&sshd.client_key);
    let file = sshd.path().join("state/nixmux/accepted-keys");

    // Process A: nothing known, the open waits for authentication; the key is recorded.
    let (conn, n) = relayed
        .connect(std::slice::from_ref(&ours), &remembering(&file))
        .await
        .expect("connect");
    assert_rtts("A: auth, key not yet accepted", n, 1);
    assert!(!conn.first_channel_pipelined());
    assert_rtts("A: open + exec", exec_rtts(&conn).await, 2);
    conn.disconnect().await;
    let recorded = entries(&file);
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let port = relayed.endpoint().port;
    assert!(
        recorded[0].starts_with(&format!("127.0.0.1 {port} root SHA256:")),
        "{recorded:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Process B: starts with A's file, so the open rides with the signed request.
    let b = fresh_copy(&file, "accepted-keys.b");
    let ours_only = std::slice::from_ref(&ours);
    let conn = connect_with_open_behind_auth(&relayed, ours_only, &remembering(&b), "B").await;
    conn.disconnect().await;
    assert_eq!(entries(&b), recorded, "nothing new to write");

    // Without the file, this process's own memory knows nothing of that endpoint.
    let (conn, _) = relayed
        .connect(std::slice::from_ref(&ours), &opening(FirstChannel::Session))
        .await
        .expect("connect");
    assert!(!conn.first_channel_pipelined());
    conn.disconnect().await;

    // The key is no longer authorized. Process C (A's file): the early open goes behind the
    // refused request and is dropped by sshd, the backup key succeeds, the stale entry goes.
    let backup = keygen(sshd.path(), "backup", "ed25519", "");
    std::fs::write(
        sshd.path().join("authorized_keys"),
        format!("{}\n", pub_line(&backup)),
    )
    .expect("authorized_keys");
    let c = fresh_copy(&file, "accepted-keys.c");
    let ids = [ours.clone(), Identity::key_file(&backup)];
    let (conn, n) = relayed
        .connect(&ids, &remembering(&c))
        .await
        .expect("connect");
    assert_rtts("C: stale key with the open, then the backup key", n, 2);
    assert!(conn.identity().contains("backup"), "{}", conn.identity());
    assert!(!conn.first_channel_pipelined());
    echo_ok(&conn).await;
    conn.disconnect().await;
    let after = entries(&c);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(
        after, recorded,
        "the stale entry was replaced by the backup key's"
    );
    assert_eq!(sshd.count_log("dispatch_protocol_error: type 90"), 1);

    // Process D (C's file), only the stale key: a clean rejection, and no early open sent.
    let d = fresh_copy(&c, "accepted-keys.d");
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        relayed.connect(std::slice::from_ref(&ours), &remembering(&d)),
    )
    .await
    .expect("no hang");
    match r {
        Err(TransportError::AuthRejected { tried, .. }) => {
            assert_eq!(tried.len(), 1, "{tried:?}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a refused key authenticated"),
    }
    assert_eq!(sshd.count_log("dispatch_protocol_error: type 90"), 1);
    assert_eq!(entries(&d), after);
}

/// An agent key is queried first by a process that knows nothing (two round trips), and
/// signed at once, with the open behind it, by a new process that starts with the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keys_are_signed_at_once_by_a_new_process() {
    let sshd = Sshd::start();
    let agent = Agent::start(sshd.path());
    agent.add(&sshd.client_key);
    let relayed = Relayed::new(sshd.port, &sshd.host_pub).await;
    let ids = [Identity::Agent {
        socket: Some(agent.socket.clone()),
    }];
    let file = sshd.path().join("accepted-keys");

    let (conn, n) = relayed
        .connect(&ids, &remembering(&file))
        .await
        .expect("connect");
    assert_rtts("agent key, nothing known: query, then signed", n, 2);
    conn.disconnect().await;

    let fresh = fresh_copy(&file, "accepted-keys.new");
    let conn = connect_with_open_behind_auth(
        &relayed,
        &ids,
        &remembering(&fresh),
        "agent key known from the file (signed at once)",
    )
    .await;
    conn.disconnect().await;
}

/// Dropbear ends the connection over an early open behind a refused request: a new process
/// with a stale entry connects once more without it, and drops the entry from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropbear_stale_entry_is_dropped() {
    let Some((server, relayed)) = relayed_dropbear().await else {
        println!("dropbear not installed: skipped");
        return;
    };
    let ours = Identity::key_file(&server.client_key);
    let file = server.dir.path().join("accepted-keys");
    let (conn, _) = relayed
        .connect(std::slice::from_ref(&ours), &remembering(&file))
        .await
        .expect("connect");
    conn.disconnect().await;
    assert_eq!(entries(&file).len(), 1);

    let backup = keygen(server.dir.path(), "backup", "ed25519", "");
    std::fs::write(
        server.dir.path().join("home/.ssh/authorized_keys"),
        format!("{}\n", pub_line(&backup)),
    )
    .expect("authorized_keys");
    let stale = fresh_copy(&file, "accepted-keys.stale");
    let ids = [ours, Identity::key_file(&backup)];
    let (conn, _) = tokio::time::timeout(
        Duration::from_secs(30),
        relayed.connect(&ids, &remembering(&stale)),
    )
    .await
    .expect("no hang")
    .expect("connect");
    assert!(conn.identity().contains("backup"), "{}", conn.identity());
    echo_ok(&conn).await;
    conn.disconnect().await;
    let after = entries(&stale);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, entries(&file), "the stale entry was replaced");
}
