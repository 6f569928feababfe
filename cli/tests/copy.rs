//! `nixmux copy --to` and `--from` through the real binary, each run inside a client store of
//! its own, against a rig builder: a 200-path closure goes there and back over both
//! protocols, and arrives valid (`nix-store --verify-path`), in a fixed few protocol round
//! trips whatever the number of paths; pushed NARs come from the store's files, or from its
//! daemon with `--local-store-files none`.

use std::process::Output;

use nixmux_rig::{PrivateStore, Protocol, Rig, RigConfig};

fn copy(rig: &Rig, client: &PrivateStore, flag: &str, proto: Protocol, paths: &[String]) -> Output {
    copy_with(rig, client, flag, proto, paths, &[])
}

fn copy_with(
    rig: &Rig,
    client: &PrivateStore,
    flag: &str,
    proto: Protocol,
    paths: &[String],
    extra: &[&str],
) -> Output {
    let url = rig.builder(0).store_url(proto);
    let machines = rig.machines();
    let mut args = vec![
        "copy",
        flag,
        &url,
        "--machines",
        machines.to_str().expect("utf8"),
        "--local-store",
        "stdio",
        "--json",
    ];
    args.extend_from_slice(extra);
    args.extend(paths.iter().map(String::as_str));
    let mut cmd = client.command(env!("CARGO_BIN_EXE_nixmux"), args);
    cmd.env_remove("SSH_AUTH_SOCK");
    cmd.output().expect("run nixmux copy")
}

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "json ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// 200 small files of distinct content in `store`; returns their store paths.
fn two_hundred_paths(store: &PrivateStore, tag: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tmp");
    let files: Vec<String> = (0..200)
        .map(|i| {
            let f = dir.path().join(format!("copy-{tag}-{i:03}"));
            std::fs::write(&f, format!("{tag} {i} {}", "x".repeat(i * 37))).expect("write");
            f.to_str().expect("utf8").to_owned()
        })
        .collect();
    let mut args = vec!["--add".to_owned()];
    args.extend(files);
    let out = store.run("nix-store", &args).expect("nix-store --add");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn verify(store: &PrivateStore, paths: &[String], what: &str) {
    let mut args = vec!["--verify-path".to_owned()];
    args.extend(paths.iter().cloned());
    store
        .run("nix-store", &args)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[test]
fn a_200_path_closure_goes_there_and_back_over_both_protocols() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let rig = Rig::start(RigConfig::with_builders(1)).expect("rig");
    for proto in [Protocol::Serve, Protocol::Worker] {
        let tag = proto.scheme().replace('-', "");
        let source = PrivateStore::temp().expect("client");
        let paths = two_hundred_paths(&source, &tag);
        assert_eq!(paths.len(), 200);

        // The NARs come from the store's files (nixmux runs in the client store's namespace,
        // where they are at /nix/store) or, with `--local-store-files none`, from its daemon.
        let (extra, from_files): (&[&str], u64) = match proto {
            Protocol::Serve => (&[], 200),
            Protocol::Worker => (&["--local-store-files", "none"], 0),
        };
        let out = copy_with(&rig, &source, "--to", proto, &paths, extra);
        let r = report(&out);
        assert_eq!(out.status.code(), Some(0), "{r}");
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["direction"], "to");
        assert_eq!(r["nars_from_files"], from_files, "{r}");
        assert_eq!(r["closure"], 200, "{r}");
        assert_eq!(r["transferred"].as_array().map(Vec::len), Some(200), "{r}");
        // A fixed few round trips for 200 paths (handshake included), not one per path.
        assert!(r["round_trips"].as_u64().is_some_and(|n| n <= 6), "{r}");
        verify(
            rig.builder(0).store(),
            &paths,
            "pushed paths on the builder",
        );

        // Again: everything is there already.
        let r = report(&copy(&rig, &source, "--to", proto, &paths));
        assert_eq!(r["already_present"], 200, "{r}");

        let dest = PrivateStore::temp().expect("second client");
        let out = copy(&rig, &dest, "--from", proto, &paths);
        let r = report(&out);
        assert_eq!(out.status.code(), Some(0), "{r}");
        assert_eq!(r["direction"], "from");
        assert_eq!(r["transferred"].as_array().map(Vec::len), Some(200), "{r}");
        assert!(r["round_trips"].as_u64().is_some_and(|n| n <= 6), "{r}");
        verify(&dest, &paths, "fetched paths locally");
    }

    // A path the builder lacks: a typed failure with its exit code, and a report that says so.
    let empty = PrivateStore::temp().expect("client");
    let missing = "/nix/store/00000000000000000000000000000000-not-there".to_owned();
    let out = copy(&rig, &empty, "--from", Protocol::Worker, &[missing]);
    let r = report(&out);
    assert_ne!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
}
