//! `nixmux bench` through the real binary: a tiny run against rig builders it starts itself,
//! the table on stdout, `--json` readable with the documented types, one chart per workload.

use std::process::Command;

use nixmux_benches::report::{Outcome, Report};

/// Runs a quick `nixmux bench` of `workloads` against one rig builder it starts itself,
/// `repeat` samples per side, its JSON report in `dir`; asserts it exits 0. Returns stdout,
/// stderr and the report.
fn quick_bench(dir: &std::path::Path, workloads: &str, repeat: &str) -> (String, String, Report) {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let json = dir.join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_nixmux"))
        .env("NIXMUX_NO_STATE", "1")
        .args(["bench", "--quick", "--builders", "1", "--repeat", repeat])
        .args(["--workload", workloads, "--json"])
        .arg(&json)
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run nixmux");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let report = Report::from_json(&std::fs::read_to_string(&json).expect("json")).expect("schema");
    (stdout, stderr, report)
}

#[test]
fn quick_bench_writes_table_json_and_charts() {
    let dir = tempfile::tempdir().expect("tmp");
    let (stdout, stderr, report) = quick_bench(dir.path(), "cold-session,warm-op", "1");
    assert!(
        stdout.contains("== cold-session") && stdout.contains("== warm-op"),
        "{stdout}"
    );
    assert!(stdout.contains("(ref)") && stdout.contains("×"), "{stdout}");
    assert_eq!(report.workloads.len(), 2);
    let warm = report.workload("warm-op").expect("warm-op");
    let s = warm.cases[0].side("nixmux-ssh-ng").expect("nixmux side");
    assert_eq!(s.outcome, Outcome::Measured);
    assert!(s.per_op.is_some_and(|p| p.n >= 1));
    for w in ["cold-session", "warm-op"] {
        let svg = dir.path().join("bench-charts").join(format!("{w}.svg"));
        assert!(svg.exists(), "{} missing; {stderr}", svg.display());
    }
}

/// The fetch workload on small paths: every side (nixmux over both protocols, `nix copy
/// --from` over both, the raw yardsticks) measures each sample, which needs the client store
/// emptied of the fetched paths before each one (untimed).
#[test]
fn quick_fetch_bench_measures_every_side() {
    let dir = tempfile::tempdir().expect("tmp");
    let (stdout, _, report) = quick_bench(dir.path(), "fetch-large", "2");
    let fetch = report.workload("fetch-large").expect("fetch-large");
    for id in [
        "nixmux-ssh-ng",
        "nixmux-ssh",
        "nix-copy-ssh-ng",
        "nix-copy-ssh",
        "raw-nixmux",
        "raw-openssh",
    ] {
        let s = fetch.cases[0].side(id).expect(id);
        assert_eq!(s.outcome, Outcome::Measured, "{id}: {stdout}");
        assert_eq!(s.failures, 0, "{id}: {stdout}");
    }
}

#[test]
fn bad_arguments_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_nixmux"))
        .env("NIXMUX_NO_STATE", "1")
        .args(["bench", "--workload", "no-such-thing"])
        .output()
        .expect("run nixmux");
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown workload"));
    let out = Command::new(env!("CARGO_BIN_EXE_nixmux"))
        .env("NIXMUX_NO_STATE", "1")
        .args(["bench", "--wan", "fifty"])
        .output()
        .expect("run nixmux");
    assert_ne!(out.status.code(), Some(0));
}
