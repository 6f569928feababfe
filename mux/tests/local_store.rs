//! The local store's sessions and derivation cache against a real Nix 2.8 store (a private
//! store, each session a `nix-daemon --stdio` in its namespace).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nixmux::local::{LocalStore, LocalStoreAccess};
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux_rig::PrivateStore;

/// A local store on `client` that counts the `nix-daemon --stdio` processes it starts.
fn counting_store(client: &Arc<PrivateStore>) -> (LocalStore, Arc<AtomicUsize>) {
    let starts = Arc::new(AtomicUsize::new(0));
    let (c, n) = (client.clone(), starts.clone());
    let local = LocalStore::new(LocalStoreAccess::Command(Arc::new(move || {
        n.fetch_add(1, Ordering::SeqCst);
        tokio::process::Command::from(c.command("nix-daemon", ["--stdio"]))
    })));
    (local, starts)
}

fn instantiate(store: &PrivateStore) -> StorePath {
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("e.nix");
    std::fs::write(
        &f,
        r#"derivation { name = "cached"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo > $out"]; }"#,
    )
    .expect("write expression");
    let out = store
        .run("nix-instantiate", [f.to_str().expect("utf8 path")])
        .expect("nix-instantiate");
    StorePath::parse(
        &StoreDir::default(),
        String::from_utf8_lossy(&out.stdout).trim(),
    )
    .expect("store path")
}

/// Sixteen callers at once (a wave of builds ending together) share a few sessions instead of
/// starting a `nix-daemon` each: short operations come back long before another would start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_callers_shares_a_few_sessions() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let client = Arc::new(PrivateStore::temp().expect("client store"));
    let drv = instantiate(&client);
    let (local, starts) = counting_store(&client);
    let local = Arc::new(local);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let (local, drv) = (local.clone(), drv.clone());
        tasks.spawn(async move {
            let paths = BTreeSet::from([drv.clone()]);
            let valid = local.query_valid_paths(&paths).await.expect("query");
            assert_eq!(valid, paths, "caller {i}");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task");
    }
    let n = starts.load(Ordering::SeqCst);
    println!("{n} nix-daemon processes started for 16 queries");
    // Four start at once (the sharing threshold), a few more if callers race past the count.
    assert!(
        (1..=8).contains(&n),
        "{n} nix-daemon processes for 16 queries"
    );
}

/// A `.drv` is read from the store once: its path is the hash of its text, so the parsed copy
/// stays right. Shown by deleting it from the store: the store that read it still has it, a
/// fresh one does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derivation_is_read_once() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let client = Arc::new(PrivateStore::temp().expect("client store"));
    let drv = instantiate(&client);
    let (local, _) = counting_store(&client);
    let first = local.read_derivation(&drv).await.expect("read");
    client
        .run(
            "nix-store",
            ["--delete", &drv.to_absolute(&StoreDir::default())],
        )
        .expect("delete the .drv");
    let again = local.read_derivation(&drv).await.expect("cached read");
    assert_eq!(first, again);
    let (fresh, _) = counting_store(&client);
    assert!(
        fresh.read_derivation(&drv).await.is_err(),
        "the .drv is gone from the store"
    );
}
