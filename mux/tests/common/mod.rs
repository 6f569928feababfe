//! Helpers shared by the rig-based pool and fault tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nixmux::local::{LocalStore, LocalStoreAccess};
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::transport::{Endpoint, HostKeyCheck, Identity, TransportConfig};
use nixmux::{BuilderConfig, ConnectTarget, Protocol};
use nixmux_rig::{PrivateStore, Rig, RigConfig};

/// Starts a rig (installing the peers first if needed).
pub fn rig(config: RigConfig) -> Arc<Rig> {
    nixmux_rig::ensure_peers_installed().expect("peers installed");
    Arc::new(Rig::start(config).expect("rig starts"))
}

/// How to reach builder `i` of `rig` directly.
pub fn target(rig: &Rig, i: usize, transport: TransportConfig) -> ConnectTarget {
    ConnectTarget {
        endpoint: Endpoint::new("127.0.0.1", rig.builder(i).port(), "root"),
        identities: vec![Identity::key_file(rig.client_key())],
        host_keys: HostKeyCheck::strict([rig.known_hosts()]),
        transport,
        jump: None,
        hooks: Default::default(),
    }
}

/// A builder configuration for builder `i` with default transport settings.
pub fn config(rig: &Rig, i: usize, protocol: Protocol) -> BuilderConfig {
    BuilderConfig::new(
        format!("{}://builder{i}", protocol.scheme()),
        protocol,
        target(rig, i, TransportConfig::default()),
    )
}

/// The rig's client store as a [`LocalStore`] (`nix-daemon --stdio` in its namespace), pushes
/// reading NARs from its files.
pub fn local_store(rig: &Arc<Rig>) -> LocalStore {
    local_store_via_daemon(rig).with_store_files(Some(rig.client_store().store_dir()))
}

/// [`local_store`] with pushes reading NARs through the daemon (the store's files are not
/// where this process looks: `/nix/store` is the host's).
pub fn local_store_via_daemon(rig: &Arc<Rig>) -> LocalStore {
    let r = rig.clone();
    LocalStore::new(LocalStoreAccess::Command(Arc::new(move || {
        tokio::process::Command::from(r.client_store().command("nix-daemon", ["--stdio"]))
    })))
}

pub fn sp(s: &str) -> StorePath {
    StorePath::parse(&StoreDir::default(), s.trim()).expect("store path")
}

/// A one-derivation Nix expression running `body` with `/bin/sh` (PATH set to /usr/bin:/bin).
/// `body` must not contain double quotes or `${`.
pub fn shell_drv(name: &str, body: &str) -> String {
    format!(
        r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "PATH=/usr/bin:/bin; {body}"]; }}"#
    )
}

/// Instantiates `expr` in `store`; returns the top-level `.drv`.
pub fn instantiate(store: &PrivateStore, expr: &str) -> StorePath {
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("e.nix");
    std::fs::write(&f, expr).expect("write expression");
    let out = store
        .run("nix-instantiate", [f.to_str().expect("utf8 path")])
        .expect("nix-instantiate");
    sp(&String::from_utf8_lossy(&out.stdout))
}

/// Command lines of the builder's processes that match any of `needles`.
pub fn matching_processes(rig: &Rig, i: usize, needles: &[&str]) -> Vec<String> {
    rig.builder(i)
        .processes()
        .into_iter()
        .map(|p| p.cmdline)
        .filter(|c| needles.iter().any(|n| c.contains(n)))
        .collect()
}

/// Polls `f` every 10 ms until it returns true or `timeout` passes; returns the elapsed time
/// when it did.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How to reach builder `i` of `rig` through `relay` (an emulated link in front of its sshd):
/// its host key is pinned, since known_hosts names the builder's own port.
pub fn relayed_config(
    rig: &Rig,
    i: usize,
    protocol: Protocol,
    relay: &nixmux_rig::relay::Relay,
) -> BuilderConfig {
    let key =
        nixmux::transport::HostPublicKey::from_machines_field(rig.builder(i).host_key_base64())
            .expect("the rig's host key parses");
    BuilderConfig::new(
        format!("{}://builder{i}-via-relay", protocol.scheme()),
        protocol,
        ConnectTarget {
            endpoint: Endpoint::new("127.0.0.1", relay.port(), "root"),
            identities: vec![Identity::key_file(rig.client_key())],
            host_keys: HostKeyCheck::pinned([key]),
            transport: TransportConfig::default(),
            jump: None,
            hooks: Default::default(),
        },
    )
}

/// A file of `size` pseudo-random (incompressible) bytes added to `store`; returns its store
/// path. `seed` makes paths of different tests differ.
pub fn random_path(store: &PrivateStore, name: &str, size: usize, seed: u64) -> StorePath {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join(name);
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(&file, &data).expect("write");
    sp(&store.add(&file).expect("nix-store --add"))
}

/// Runs a blocking rig control off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// `p` as an absolute path in the default store directory.
pub fn abs(p: &StorePath) -> String {
    p.to_absolute(&StoreDir::default())
}

/// Panics unless `store`'s Nix verifies `p` (contents against its registered hash).
pub fn verify(store: &PrivateStore, p: &StorePath) {
    store
        .run("nix-store", ["--verify-path", &abs(p)])
        .unwrap_or_else(|e| panic!("{p} verifies: {e}"));
}

/// The narHash `store` has registered for `p`.
pub fn nar_hash(store: &PrivateStore, p: &StorePath) -> String {
    let out = store
        .run("nix-store", ["--query", "--hash", &abs(p)])
        .unwrap_or_else(|e| panic!("hash of {p}: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The closure of `p` in `store` (`nix-store --query --requisites`).
pub fn closure(store: &PrivateStore, p: &StorePath) -> Vec<StorePath> {
    let out = store
        .run("nix-store", ["--query", "--requisites", &abs(p)])
        .expect("requisites");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(sp)
        .collect()
}

/// Whether `p` is valid in `store`.
pub fn is_valid(store: &PrivateStore, p: &StorePath) -> bool {
    store.is_valid(&abs(p)).expect("query validity")
}
