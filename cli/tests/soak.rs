//! The soak through the real binary, CI-sized: 60 s of mixed operations on two rig builders
//! over both protocols with a fault every 8 s (each kind comes round), then the checks of
//! issue 13. The JSON report must parse with the documented types and say it passed; the
//! chart must be there.

use std::process::Command;

use nixmux_benches::soak::SoakReport;

#[test]
fn soak_60s_with_faults_passes_its_checks() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let dir = tempfile::tempdir().expect("tmp");
    let json = dir.path().join("soak.json");
    let out = Command::new(env!("CARGO_BIN_EXE_nixmux"))
        .env("NIXMUX_NO_STATE", "1")
        .args(["bench", "--workload", "soak", "--duration", "60s", "--json"])
        .arg(&json)
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run nixmux");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no report ({e}):\n{stdout}\n{stderr}"));
    let report = SoakReport::from_json(&text).expect("schema");
    assert!(report.passed, "{stdout}\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    // Both protocols, every operation kind, every fault kind ran.
    for k in ["query", "push", "build", "fetch"] {
        assert!(
            report.operations.get(k).is_some_and(|o| o.ok > 0),
            "no successful {k}: {stdout}"
        );
    }
    assert!(
        ["cancel-push", "cancel-build", "cancel-fetch"]
            .iter()
            .any(|k| report.operations.get(*k).is_some_and(|o| o.started > 0)),
        "{stdout}"
    );
    for k in ["kill-sessions", "kill-sshd", "freeze", "restart"] {
        assert!(
            report.faults.iter().any(|f| f.kind == k),
            "no {k} fault: {:?}",
            report.faults
        );
    }
    assert!(report.samples.len() >= 50, "{}", report.samples.len());
    assert!(report.pool.sessions_created >= 50, "{:?}", report.pool);
    assert!(stdout.contains("soak PASSED"), "{stdout}");
    let svg = std::fs::read_to_string(dir.path().join("soak.svg")).expect("chart");
    assert!(svg.starts_with("<svg") && svg.contains("RSS"), "{svg:.200}");
}

#[test]
fn soak_arguments_are_checked() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nixmux"))
            .env("NIXMUX_NO_STATE", "1")
            .args(args)
            .output()
            .expect("run nixmux")
    };
    let out = run(&["bench", "--workload", "soak,query"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("alone"));
    let out = run(&["bench", "--workload", "query", "--duration", "10s"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["bench", "--workload", "soak", "--duration", "ten"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["bench", "--workload", "soak", "--fault-every", "0s"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["bench", "--workload", "soak", "--wan", "50:100"]);
    assert_eq!(out.status.code(), Some(2));
}
