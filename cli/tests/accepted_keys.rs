//! The accepted-keys file between `nixmux` runs: a second run's first connection to each
//! builder opens its channel with the authentication request ("auth_with_open"), because the
//! first run remembered that the builder accepts the key.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use nixmux_rig::{Rig, RigConfig};

fn ping(machines: &Path, state: &Path, no_state: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixmux"));
    cmd.args(["ping", "--json", "--machines"])
        .arg(machines)
        .env_remove("SSH_AUTH_SOCK")
        .env("XDG_STATE_HOME", state);
    if no_state {
        cmd.env("NIXMUX_NO_STATE", "1");
    } else {
        cmd.env_remove("NIXMUX_NO_STATE");
    }
    cmd.output().expect("run nixmux")
}

/// Each builder's stage names, in order.
fn stages(out: &Output) -> Vec<Vec<String>> {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    doc["builders"]
        .as_array()
        .expect("builders")
        .iter()
        .map(|b| {
            b["stages"]
                .as_array()
                .expect("stages")
                .iter()
                .filter_map(|s| s["stage"].as_str().map(str::to_owned))
                .collect()
        })
        .collect()
}

#[test]
fn second_run_opens_its_channels_with_authentication() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let rig = Rig::start(RigConfig::with_builders(1)).expect("rig");
    let machines = rig.machines();
    let state = tempfile::tempdir().expect("tempdir");
    let file = state.path().join("nixmux/accepted-keys");

    // Turned off: nothing written.
    stages(&ping(&machines, state.path(), true));
    assert!(!file.exists(), "NIXMUX_NO_STATE=1 wrote {}", file.display());

    // First run: remembers (both builders are the same sshd and key: one entry).
    stages(&ping(&machines, state.path(), false));
    let text = std::fs::read_to_string(&file).expect("accepted-keys file");
    assert!(text.starts_with("nixmux-accepted-keys v1\n"), "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(file.parent().expect("dir")), 0o700);

    // Second run: a new process, yet every builder's channel rode with authentication.
    let second = stages(&ping(&machines, state.path(), false));
    assert_eq!(second.len(), 2);
    for s in &second {
        assert!(s.iter().any(|s| s == "auth_with_open"), "{s:?}");
        assert!(!s.iter().any(|s| s == "auth"), "{s:?}");
    }
    assert_eq!(std::fs::read_to_string(&file).expect("file"), text);
}
