//! `ssh-ng://` over a channel to the builder's nix-daemon socket, and the fall-back to
//! `nix-daemon --stdio`, against real OpenSSH + Nix 2.8 builders from the rig: `nixmux ping
//! --json` must report which path it took and why, for a builder that allows the socket,
//! one with `AllowStreamLocalForwarding no`, one whose key is `restrict`ed, and one with no
//! daemon running. Forcing either path with the store URL's `daemon-socket=` is checked too.

use std::process::{Command, Output};

use nixmux_rig::{Protocol, Rig, RigConfig};

fn nixmux(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nixmux"))
        .env("NIXMUX_NO_STATE", "1")
        .args(args)
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run nixmux")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn rig(config: RigConfig) -> Rig {
    nixmux_rig::ensure_peers_installed().expect("peers");
    Rig::start(config).expect("rig")
}

/// The ssh-ng builder's store URL with everything needed to reach it (key, pinned host key),
/// plus `extra` parameters.
fn url(rig: &Rig, extra: &str) -> String {
    let b = rig.builder(0);
    let mut u = format!(
        "{}?ssh-key={}&base64-ssh-public-host-key={}",
        b.store_url(Protocol::Worker),
        rig.client_key().display(),
        b.host_key_base64()
    );
    if !extra.is_empty() {
        u.push('&');
        u.push_str(extra);
    }
    u
}

/// Pings `url` with `--json`; returns the exit code and the builder's report.
fn ping(url: &str) -> (Option<i32>, serde_json::Value, String) {
    let out = nixmux(&["ping", "--json", url]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("json ({e}): {}", text(&out)));
    let report = doc["builders"][0].clone();
    (out.status.code(), report, text(&out))
}

fn stages(report: &serde_json::Value) -> Vec<String> {
    report["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter_map(|s| s["stage"].as_str().map(str::to_owned))
        .collect()
}

/// Checks a ping that fell back to exec because the socket was refused.
fn assert_fell_back(rig: &Rig, why: &str) {
    let (code, r, out) = ping(&url(rig, ""));
    assert_eq!(code, Some(0), "{why}: {out}");
    assert_eq!(r["session_path"], "exec", "{why}: {out}");
    let reason = r["session_path_reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("fell back to exec: sshd")
            && reason.contains("the daemon socket /nix/var/nix/daemon-socket/socket"),
        "{why}: {reason}"
    );
    assert!(stages(&r).contains(&"exec".to_owned()), "{why}: {out}");
    assert_eq!(r["protocol_version"], "1.34", "{why}: {out}");

    // Insisting on the socket fails at that stage, with what to do.
    let (code, r, out) = ping(&url(rig, "daemon-socket=yes"));
    assert_ne!(code, Some(0), "{why}: {out}");
    assert_eq!(r["failure"]["stage"], "daemon_socket", "{why}: {out}");
    assert!(
        r["failure"]["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("AllowStreamLocalForwarding"),
        "{why}: {out}"
    );
}

#[test]
fn a_builder_with_a_running_daemon_is_reached_through_its_socket() {
    let rig = rig(RigConfig {
        nix_daemon: true,
        ..RigConfig::with_builders(1)
    });
    let (code, r, out) = ping(&url(&rig, ""));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(r["session_path"], "socket", "{out}");
    assert_eq!(
        r["session_path_reason"], "the nix-daemon socket /nix/var/nix/daemon-socket/socket",
        "{out}"
    );
    assert_eq!(
        stages(&r),
        [
            "resolve",
            "tcp",
            "key_exchange",
            "host_key",
            "auth",
            "daemon_socket",
            "handshake"
        ],
        "{out}"
    );
    assert_eq!(r["protocol_version"], "1.34", "{out}");
    assert_eq!(r["remote_nix_version"], "2.8.0", "{out}");
    // One session channel only, for ping's `command -v zstd` probe (it reports whether bulk
    // transfers could use zstd); the worker session itself went to the socket.
    assert_eq!(r["zstd"].as_bool().map(|_| ()), Some(()), "{out}");
    assert_eq!(
        rig.builder(0).wait_for_log(
            nixmux_rig::log_patterns::SESSION_OPEN,
            1,
            std::time::Duration::from_secs(5)
        ),
        1,
        "{}",
        rig.builder(0).sshd_log()
    );

    // `daemon-socket=no` forces exec, and says it was configured.
    let (code, r, out) = ping(&url(&rig, "daemon-socket=no"));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(r["session_path"], "exec", "{out}");
    assert!(
        r["session_path_reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("configured"),
        "{out}"
    );
    // So does a remote-program of one's own.
    let (code, r, out) = ping(&url(&rig, "remote-program=nix-daemon%20--debug"));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(r["session_path"], "exec", "{out}");
    // An explicit socket path is used as given.
    let (code, r, out) = ping(&url(
        &rig,
        "daemon-socket=/nix/var/nix/daemon-socket/socket",
    ));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(r["session_path"], "socket", "{out}");
    // The table for people says it too.
    let out = nixmux(&["ping", &url(&rig, "")]);
    assert!(
        text(&out).contains("session: socket (the nix-daemon socket"),
        "{}",
        text(&out)
    );
}

#[test]
fn stream_local_forwarding_off_falls_back_to_exec() {
    let rig = rig(RigConfig {
        nix_daemon: true,
        extra_sshd_config: vec!["AllowStreamLocalForwarding no".to_owned()],
        ..RigConfig::with_builders(1)
    });
    assert_fell_back(&rig, "AllowStreamLocalForwarding no");
}

#[test]
fn a_restricted_key_falls_back_to_exec() {
    let rig = rig(RigConfig {
        nix_daemon: true,
        ..RigConfig::with_builders(1)
    });
    // sshd reads authorized_keys at every login, so restricting the key now takes effect.
    let keys = rig.authorized_keys();
    let line = std::fs::read_to_string(&keys).expect("authorized_keys");
    let restricted: String = line.lines().map(|l| format!("restrict {l}\n")).collect();
    std::fs::write(&keys, restricted).expect("restrict the key");
    assert_fell_back(&rig, "restrict");
}

#[test]
fn no_daemon_falls_back_to_exec() {
    let rig = rig(RigConfig::with_builders(1));
    assert_fell_back(&rig, "no daemon");
    let (_, r, out) = ping(&url(&rig, ""));
    assert!(
        r["session_path_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no nix-daemon listens there"),
        "{out}"
    );
}
