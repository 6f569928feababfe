//! Against the shared test rig (nixmux-rig): a real Nix builder behind sshd, with the host
//! key pinned exactly as the rig writes it into a Nix machines file (field 8).

use std::time::Duration;

use nixmux_rig::{Rig, RigConfig};
use nixmux_transport::{
    Endpoint, HostKeyCheck, HostKeySource, HostPublicKey, Identity, NoopObserver, connect,
};

use crate::support::{config, read_all};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rig_builder_pinned_from_machines_field() {
    let rig = tokio::task::spawn_blocking(|| Rig::start(RigConfig::with_builders(1)))
        .await
        .expect("join")
        .expect("rig starts");
    let b = rig.builder(0);
    let endpoint = Endpoint::new("127.0.0.1", b.port(), "root");
    let ids = [Identity::key_file(rig.client_key())];

    let pin = HostPublicKey::from_machines_field(b.host_key_base64()).expect("machines field 8");
    let conn = connect(
        &endpoint,
        &ids,
        &HostKeyCheck::pinned([pin]),
        &config(),
        NoopObserver,
    )
    .await
    .expect("connect with the pinned key");
    assert_eq!(conn.host_key_source(), &HostKeySource::Pinned);
    let mut ch = conn.exec("nix-store --version").await.expect("exec");
    let out =
        String::from_utf8(read_all(ch.stdout(), Duration::from_secs(20)).await).expect("utf8");
    assert!(out.starts_with("nix-store (Nix) "), "{out}");
    assert!(ch.exit().await.expect("exit").success());

    // The rig's known_hosts file works too.
    let conn2 = connect(
        &endpoint,
        &ids,
        &HostKeyCheck::strict([rig.known_hosts()]),
        &config(),
        NoopObserver,
    )
    .await
    .expect("connect with the rig's known_hosts");
    assert_eq!(conn2.host_key_fingerprint(), conn.host_key_fingerprint());
    conn.disconnect().await;
    conn2.disconnect().await;
    tokio::task::spawn_blocking(move || drop(rig))
        .await
        .expect("rig teardown");
}
