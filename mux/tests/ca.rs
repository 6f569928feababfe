//! Floating content-addressed derivations built on real OpenSSH + Nix 2.8 builders with
//! `ca-derivations` (issue 12): nixmux resolves them through the local store's realisations,
//! builds the resolved derivation remotely, copies the outputs back and registers the
//! realisations Nix itself would, so a later local `nix-build` finds everything built. Without
//! the feature on either side the build fails with a typed error, and nixmux never sends the
//! `QueryRealisation` a Nix 2.8 without it aborts on.

use std::collections::BTreeMap;
use std::sync::Arc;

use nixmux::local::{LocalStore, LocalStoreAccess};
use nixmux::ops::BuildOptions;
use nixmux::proto::build_result::BuildStatus;
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::transport::{Endpoint, HostKeyCheck, Identity, TransportConfig};
use nixmux::{Builder, BuilderConfig, ConnectTarget, ErrorKind, Pool, Protocol, log_channel};
use nixmux_rig::{PrivateStore, Rig, RigConfig};

const CA_CONF: &str = "experimental-features = nix-command ca-derivations";

/// `a` and `b` floating content-addressed (`b` uses `a`), `c` input-addressed but using `b`
/// (so its output path is deferred until resolution). `salt` keeps runs apart.
fn expr(salt: &str) -> String {
    format!(
        r#"
let
  mk = extra: name: deps: derivation ({{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = ["-c" "echo {salt} ${{name}} ${{toString deps}} > $out"];
  }} // extra);
  ca = mk {{ __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; }};
  a = ca "ca-a" [];
  b = ca "ca-b" [a];
  c = mk {{}} "ca-c" [b];
in {{ inherit a b c; }}
"#
    )
}

fn sp(s: &str) -> StorePath {
    StorePath::parse(&StoreDir::default(), s.trim()).expect("store path")
}

fn write_expr(dir: &std::path::Path, salt: &str) -> String {
    let f = dir.join(format!("{salt}.nix"));
    std::fs::write(&f, expr(salt)).expect("write");
    f.to_str().expect("utf8").to_owned()
}

/// The `.drv` of each attribute, instantiated in `store` (with `ca-derivations` given to the
/// evaluator through `NIX_CONFIG`, whatever the store's own configuration).
fn instantiate(store: &PrivateStore, file: &str) -> BTreeMap<&'static str, StorePath> {
    ["a", "b", "c"]
        .into_iter()
        .map(|attr| {
            let out = store
                .command("nix-instantiate", [file, "-A", attr])
                .env("NIX_CONFIG", CA_CONF)
                .output()
                .expect("nix-instantiate");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            (attr, sp(&String::from_utf8_lossy(&out.stdout)))
        })
        .collect()
}

fn local(store: &Arc<PrivateStore>) -> LocalStore {
    let c = store.clone();
    LocalStore::new(LocalStoreAccess::Command(Arc::new(move || {
        tokio::process::Command::from(c.command("nix-daemon", ["--stdio"]))
    })))
}

fn builder(pool: &Pool, rig: &Rig, protocol: Protocol) -> Builder {
    let target = ConnectTarget {
        endpoint: Endpoint::new("127.0.0.1", rig.builder(0).port(), "root"),
        identities: vec![Identity::key_file(rig.client_key())],
        host_keys: HostKeyCheck::strict([rig.known_hosts()]),
        transport: TransportConfig::default(),
        jump: None,
        hooks: Default::default(),
    };
    pool.add(BuilderConfig::new(
        format!("{}://builder0", protocol.scheme()),
        protocol,
        target,
    ))
}

/// `nix realisation info --json` of `drv` in `store`: id → output path.
fn realisations(store: &PrivateStore, drv: &StorePath) -> BTreeMap<String, String> {
    let out = store
        .run(
            "nix",
            [
                "realisation",
                "info",
                "--json",
                &drv.to_absolute(&StoreDir::default()),
            ],
        )
        .expect("nix realisation info");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["id"].as_str().expect("id").to_owned(),
                r["outPath"].as_str().expect("outPath").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floating_ca_graph_builds_remotely_and_is_realised_locally() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let rig = Rig::start(RigConfig {
        extra_nix_conf: vec![CA_CONF.to_owned()],
        ..RigConfig::with_builders(1)
    })
    .expect("rig");
    let client = Arc::new(PrivateStore::temp_with_config(&[CA_CONF]).expect("client store"));
    let local = local(&client);
    let pool = Pool::new();
    let tmp = tempfile::tempdir().expect("tmp");
    for protocol in [Protocol::Worker, Protocol::Serve] {
        let b = builder(&pool, &rig, protocol);
        let file = write_expr(tmp.path(), protocol.scheme());
        let drvs = instantiate(&client, &file);
        let (logs, _stream) = log_channel(1000);
        let mut outs = BTreeMap::new();
        for attr in ["a", "b", "c"] {
            let drv = &drvs[attr];
            let outcome = b
                .build(&local, drv, &BuildOptions::default(), &logs)
                .await
                .unwrap_or_else(|e| panic!("{protocol:?}: building {attr} ({drv}): {e}"));
            assert_eq!(
                outcome.result.status,
                BuildStatus::Built,
                "{protocol:?} {attr}: {outcome:?}"
            );
            let out = outcome.result.built_outputs["out"].path.clone();
            // Copied back by the build itself, and realised locally.
            let p = out.to_absolute(&StoreDir::default());
            assert!(
                client.is_valid(&p).expect("query"),
                "{protocol:?} {attr}: {p} valid"
            );
            let real = realisations(&client, drv);
            assert_eq!(
                real.values().collect::<Vec<_>>(),
                vec![&out.to_string()],
                "{protocol:?} {attr}: {real:?}"
            );
            eprintln!("{protocol:?}: {attr} ({drv}) -> {out}, realisations {real:?}");
            outs.insert(attr, out);
        }
        // The output contents show the placeholders were resolved to the real paths.
        let c = std::fs::read_to_string(client.store_dir().join(outs["c"].to_string()))
            .expect("read c");
        assert!(
            c.contains(&outs["b"].to_absolute(&StoreDir::default())),
            "{c}"
        );
        // A local Nix finds everything built: with no build slots at all (`-j0`) it would fail
        // if it had to build anything.
        let out = client
            .run("nix-build", [&file, "-A", "c", "--no-out-link", "-j0"])
            .expect("nix-build finds c realised");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            outs["c"].to_absolute(&StoreDir::default())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_ca_support_is_a_typed_error() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    // Builders without ca-derivations.
    let rig = Rig::start(RigConfig::with_builders(1)).expect("rig");
    let pool = Pool::new();
    let tmp = tempfile::tempdir().expect("tmp");
    let (logs, _stream) = log_channel(1000);
    for protocol in [Protocol::Worker, Protocol::Serve] {
        let b = builder(&pool, &rig, protocol);
        let file = write_expr(tmp.path(), protocol.scheme());

        // The local store has the feature, the builder not.
        let client = Arc::new(PrivateStore::temp_with_config(&[CA_CONF]).expect("client"));
        let drvs = instantiate(&client, &file);
        let e = b
            .build(&local(&client), &drvs["a"], &BuildOptions::default(), &logs)
            .await
            .expect_err("the builder lacks ca-derivations");
        eprintln!("{protocol:?}, builder without ca-derivations: {e}");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{protocol:?}: {e}");
        assert!(e.message().contains("builder"), "{e}");
        // The builder is still usable afterwards.
        let mut lease = b.lease().await.expect("builder still answers");
        lease
            .query_valid_paths(&Default::default(), false)
            .await
            .expect("builder still answers");
        drop(lease);

        // The local store lacks the feature (the derivations were instantiated with it).
        let plain = Arc::new(PrivateStore::temp().expect("client"));
        let drvs = instantiate(&plain, &file);
        for attr in ["a", "b"] {
            let e = b
                .build(&local(&plain), &drvs[attr], &BuildOptions::default(), &logs)
                .await
                .expect_err("the local store lacks ca-derivations");
            eprintln!("{protocol:?}, local store without ca-derivations, {attr}: {e}");
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{protocol:?} {attr}: {e}");
            assert!(e.message().contains("local store"), "{e}");
        }
    }
}
