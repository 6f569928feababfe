//! `nixmux build` scheduling a graph across three rig builders (real OpenSSH + Nix 2.8) that
//! differ in supported and mandatory features and max-jobs: every derivation goes to a
//! builder that may take it, inputs first, logs to files; a derivation nobody can take fails
//! at once with the no-builder exit code. Each build's whole log ends up where `nix log`
//! finds it.

use std::process::Output;

use nixmux_rig::{PrivateStore, Protocol, Rig, RigConfig};

/// Twelve derivations: `plain-*` anywhere, `kvm-*` require `kvm` (only builder 1 has it),
/// `bench-*` require `benchmark` (builder 2 takes nothing else); `top` needs them all.
const EXPR: &str = r#"
let
  mk = name: features: deps: derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = ["-c" "echo building ${name}; cat ${toString deps} /dev/null > $out; echo ${name} >> $out"];
  } // (if features == [] then {} else { requiredSystemFeatures = features; }));
  plain = map (i: mk "graph-plain-${toString i}" [] []) [1 2 3 4 5];
  kvm = map (i: mk "graph-kvm-${toString i}" ["kvm"] [(builtins.elemAt plain 0)]) [1 2 3];
  bench = map (i: mk "graph-bench-${toString i}" ["benchmark"] []) [1 2];
  mid = mk "graph-mid" [] (kvm ++ bench);
in {
  top = mk "graph-top" [] ([mid] ++ plain);
  impossible = mk "graph-impossible" ["no-such-feature"] [];
}
"#;

fn instantiate(store: &PrivateStore, attr: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("graph.nix");
    std::fs::write(&f, EXPR).expect("write");
    let out = store
        .run("nix-instantiate", [f.to_str().expect("utf8"), "-A", attr])
        .expect("instantiate");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn build(
    client: &PrivateStore,
    machines: &std::path::Path,
    logs: &std::path::Path,
    drv: &str,
) -> Output {
    let mut cmd = client.command(
        env!("CARGO_BIN_EXE_nixmux"),
        [
            "build",
            "--machines",
            machines.to_str().expect("utf8"),
            "--local-store",
            "stdio",
            "--log-dir",
            logs.to_str().expect("utf8"),
            drv,
        ],
    );
    cmd.env_remove("SSH_AUTH_SOCK");
    cmd.output().expect("run nixmux build")
}

#[test]
fn a_graph_is_scheduled_across_builders_by_features() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let rig = Rig::start(RigConfig {
        // The builders' own Nix must accept the features the machines file promises.
        extra_nix_conf: vec!["system-features = kvm benchmark".to_owned()],
        ..RigConfig::with_builders(3)
    })
    .expect("rig");
    let system = format!("{}-linux", std::env::consts::ARCH);
    let line = |i: usize, jobs: u32, supported: &str, mandatory: &str| {
        let b = rig.builder(i);
        format!(
            "{} {system} {} {jobs} 1 {supported} {mandatory} {}\n",
            b.store_url(if i == 1 {
                Protocol::Serve
            } else {
                Protocol::Worker
            }),
            rig.client_key().display(),
            b.host_key_base64()
        )
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let machines = tmp.path().join("machines");
    std::fs::write(
        &machines,
        format!(
            "{}{}{}",
            line(0, 2, "-", "-"),
            line(1, 1, "kvm", "-"),
            line(2, 4, "benchmark", "benchmark")
        ),
    )
    .expect("machines");
    let logs = tmp.path().join("logs");

    let client = PrivateStore::temp().expect("client");
    let top = instantiate(&client, "top");
    let out = build(&client, &machines, &logs, &top);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // Every derivation built, each where it may run.
    let port = |i: usize| format!("root@127.0.0.1:{}", rig.builder(i).port());
    let built: Vec<&str> = stderr.lines().filter(|l| l.starts_with("built ")).collect();
    assert_eq!(built.len(), 12, "{stderr}");
    for l in &built {
        if l.contains("-graph-kvm-") {
            assert!(l.contains(&port(1)), "kvm only on builder 1: {l}");
        } else if l.contains("-graph-bench-") {
            assert!(l.contains(&port(2)), "benchmark only on builder 2: {l}");
        } else {
            assert!(!l.contains(&port(2)), "builder 2 takes only benchmark: {l}");
        }
    }
    // Both plain builders got work.
    assert!(built.iter().any(|l| l.contains(&port(0))), "{stderr}");
    // One log file per build, with the build's output in it.
    let files: Vec<_> = std::fs::read_dir(&logs).expect("log dir").collect();
    assert_eq!(files.len(), 12, "{stderr}");
    let top_log = logs.join(format!("{}.log", top.trim_start_matches("/nix/store/")));
    let text = std::fs::read_to_string(&top_log).expect("top's log");
    assert!(text.contains("building graph-top"), "{text}");
    // The whole log is in the local store too, where `nix log` finds it: for builds over
    // ssh-ng:// (top, on builder 0) and over ssh:// (the kvm ones, on builder 1).
    let kvm = built
        .iter()
        .find(|l| l.contains("-graph-kvm-"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|base| format!("/nix/store/{base}"))
        .expect("a kvm build");
    for (drv, want) in [(&top, "building graph-top"), (&kvm, "building graph-kvm-")] {
        let out = client
            .run(
                "nix",
                ["--extra-experimental-features", "nix-command", "log", drv],
            )
            .expect("nix log");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(want), "nix log {drv}: {text}");
    }
    // The outputs are here.
    let printed = String::from_utf8_lossy(&out.stdout);
    let output = printed
        .lines()
        .next()
        .expect("an output path")
        .trim()
        .to_owned();
    client
        .run("nix-store", ["--verify-path", &output])
        .expect("the top output verifies locally");

    // Nobody can take it: fails at once, with why, and the no-builder exit code.
    let impossible = instantiate(&client, "impossible");
    let started = std::time::Instant::now();
    let out = build(&client, &machines, &logs, &impossible);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no builder can build"), "{stderr}");
    assert!(stderr.contains("no-such-feature"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}
