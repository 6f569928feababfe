//! `nixmux ping` against real OpenSSH + Nix 2.8 builders from the rig: the acceptance
//! criteria of the foundation issue, through the real binary.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nixmux_rig::{Protocol, Rig, RigConfig};

fn nixmux(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nixmux"))
        .env("NIXMUX_NO_STATE", "1")
        .args(args)
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run nixmux")
}

fn rig() -> Rig {
    nixmux_rig::ensure_peers_installed().expect("peers");
    Rig::start(RigConfig::with_builders(1)).expect("rig")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn both_protocols_ping_and_json_reports_versions() {
    let rig = rig();
    let machines = rig.machines();
    let out = nixmux(&[
        "ping",
        "--json",
        "--machines",
        machines.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["ok"], true);
    let builders = doc["builders"].as_array().expect("array");
    assert_eq!(builders.len(), 2);
    let serve = builders
        .iter()
        .find(|b| b["scheme"] == "ssh")
        .expect("ssh:// builder");
    let worker = builders
        .iter()
        .find(|b| b["scheme"] == "ssh-ng")
        .expect("ssh-ng:// builder");
    assert_eq!(serve["protocol_version"], "2.7");
    assert_eq!(worker["protocol_version"], "1.34");
    assert_eq!(worker["remote_nix_version"], "2.8.0");
    assert_eq!(worker["trust"], "unknown", "1.34 has no trust byte");
    // The two pings run at once to the same sshd: whichever authenticates second may find
    // the key already accepted in this process and open its channel with the request
    // ("auth_with_open", one stage for both round trips).
    let stages: Vec<&str> = worker["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter_map(|s| s["stage"].as_str())
        .map(|s| if s == "auth_with_open" { "auth" } else { s })
        .collect();
    assert_eq!(
        stages,
        [
            "resolve",
            "tcp",
            "key_exchange",
            "host_key",
            "auth",
            "exec",
            "handshake"
        ]
    );
    // Both reach OpenSSH: channels hold their writes below a limit (its size follows the
    // round trip, which a loaded machine measures longer).
    for b in [serve, worker] {
        let ahead = b["send_ahead"].as_str().expect("send_ahead reported");
        assert!(ahead.contains("KiB unacknowledged at most"), "{ahead}");
    }
    // The table for people works too.
    let out = nixmux(&["ping", "--machines", machines.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("worker 1.34"));
    assert!(
        text(&out).contains("writes ahead: 256 KiB"),
        "{}",
        text(&out)
    );
}

#[test]
fn mismatched_pinned_host_key_is_refused_before_any_session() {
    let rig = rig();
    let other = rig_key_of_another_builder();
    let b = rig.builder(0);
    let line = format!(
        "{} x86_64-linux {} 1 1 - - {}",
        b.store_url(Protocol::Worker),
        rig.client_key().display(),
        other
    );
    let machines = rig.dir().join("machines-bad");
    std::fs::write(&machines, line).expect("write");
    let sessions_before = b.session_opens();
    let out = nixmux(&["ping", "--machines", machines.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(11), "{}", text(&out));
    assert!(text(&out).contains("DOES NOT MATCH"), "{}", text(&out));
    assert!(text(&out).contains("SHA256:"), "{}", text(&out));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        b.session_opens(),
        sessions_before,
        "no session channel was opened"
    );
    assert_eq!(b.count_log("Accepted publickey"), 0, "refused before auth");
}

/// A valid host key that is not builder 0's: field 8 of a second rig's machines file.
fn rig_key_of_another_builder() -> String {
    let other = Rig::start(RigConfig::with_builders(1)).expect("second rig");
    other.builder(0).host_key_base64().to_owned()
}

#[test]
fn wrong_client_key_gives_the_auth_exit_code() {
    let rig = rig();
    let dir = rig.dir().join("wrong");
    std::fs::create_dir_all(&dir).expect("dir");
    let key = dir.join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let url = format!(
        "{}?ssh-key={}",
        rig.builder(0).store_url(Protocol::Serve),
        key.display()
    );
    let kh = rig.known_hosts();
    let out = nixmux(&["ping", &url, "--known-hosts", kh.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(12), "{}", text(&out));
    assert!(text(&out).contains("authorized_keys"), "{}", text(&out));
}

#[test]
fn missing_remote_program_is_named_not_a_protocol_error() {
    let rig = rig();
    let kh = rig.known_hosts();
    let key = rig.client_key();
    for proto in [Protocol::Serve, Protocol::Worker] {
        let url = format!(
            "{}?remote-program=/opt/nowhere/nix-thing",
            rig.builder(0).store_url(proto)
        );
        let out = nixmux(&[
            "ping",
            &url,
            "-i",
            key.to_str().expect("utf8"),
            "--known-hosts",
            kh.to_str().expect("utf8"),
        ]);
        assert_eq!(out.status.code(), Some(13), "{}", text(&out));
        let t = text(&out);
        assert!(t.contains("command not found on the builder"), "{t}");
        assert!(t.contains("remote-program"), "{t}");
    }
}

#[test]
fn stopped_or_frozen_sshd_fails_within_the_connect_timeout() {
    let rig = rig();
    let b = rig.builder(0);
    let url = b.store_url(Protocol::Worker);
    let kh = rig.known_hosts();
    let key = rig.client_key();
    let args = |t: &'static str| {
        vec![
            "ping".to_owned(),
            url.clone(),
            "-i".into(),
            key.to_str().expect("utf8").into(),
            "--known-hosts".into(),
            kh.to_str().expect("utf8").into(),
            "--connect-timeout".into(),
            t.into(),
        ]
    };
    // Frozen: TCP connects, but no SSH banner ever comes.
    b.freeze().expect("freeze");
    let start = Instant::now();
    let a = args("2");
    let out = nixmux(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let took = start.elapsed();
    b.thaw().expect("thaw");
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    assert!(took < Duration::from_secs(8), "took {took:?}");

    // Stopped: connection refused, at once.
    b.stop_sshd().expect("stop");
    let start = Instant::now();
    let out = nixmux(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(text(&out).contains("refused"), "{}", text(&out));
}

#[test]
fn ssh_config_host_alias_and_proxy_jump_are_honoured() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let rig = Rig::start(RigConfig::with_builders(2)).expect("rig");
    let jump = rig.builder(0);
    let target = rig.builder(1);
    let config = rig.dir().join("jump_ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host far\n  HostName 127.0.0.1\n  Port {}\n  ProxyJump root@127.0.0.1:{}\n\
             Host *\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n",
            target.port(),
            jump.port(),
            rig.client_key().display(),
            rig.known_hosts().display()
        ),
    )
    .expect("write ssh_config");
    let out = nixmux(&[
        "ping",
        "--json",
        "ssh-ng://far",
        "--ssh-config",
        config.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        doc["builders"][0]["endpoint"],
        format!("root@127.0.0.1:{}", target.port())
    );
    // The target was reached through the jump host: a direct-tcpip channel was opened there.
    assert!(
        jump.count_log("ctype direct-tcpip") >= 1,
        "{}",
        jump.sshd_log()
    );
    assert_eq!(jump.count_log("Accepted publickey"), 1);
}

/// `nixmux ping` over both protocols against the rig's second SSH server and second Nix
/// (Dropbear + Nix 2.8, OpenSSH + Nix 2.26, Dropbear + Nix 2.26), with the machines file's
/// host key pins; a pin of another builder's key is refused by Dropbear's builder as by sshd's.
#[test]
fn interop_peers_ping_over_both_protocols_with_pinned_keys() {
    use nixmux_rig::{NixPeer, SshServer};
    nixmux_rig::ensure_peers_installed().expect("peers");
    let pairs = [
        (SshServer::Dropbear, NixPeer::Host),
        (SshServer::OpenSsh, NixPeer::Trixie),
        (SshServer::Dropbear, NixPeer::Trixie),
    ];
    let rigs: Vec<Rig> = pairs
        .iter()
        .map(|&(ssh_server, nix)| {
            Rig::start(RigConfig {
                ssh_server,
                nix,
                ..RigConfig::with_builders(1)
            })
            .expect("rig")
        })
        .collect();
    for (rig, (server, nix)) in rigs.iter().zip(pairs) {
        let machines = rig.machines();
        let out = nixmux(&[
            "ping",
            "--json",
            "--machines",
            machines.to_str().expect("utf8"),
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{server:?} {nix:?}: {}",
            text(&out)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let builders = doc["builders"].as_array().expect("array");
        let find = |scheme: &str| {
            builders
                .iter()
                .find(|b| b["scheme"] == scheme)
                .unwrap_or_else(|| panic!("{scheme} builder in {doc}"))
        };
        assert_eq!(find("ssh")["protocol_version"], "2.7");
        let worker = find("ssh-ng");
        let (version, nix_version) = match nix {
            NixPeer::Host => ("1.34", "2.8."),
            NixPeer::Trixie => ("1.38", "2.26."),
        };
        assert_eq!(worker["protocol_version"], version, "{worker}");
        assert!(
            worker["remote_nix_version"]
                .as_str()
                .is_some_and(|v| v.starts_with(nix_version)),
            "{worker}"
        );
        if nix == NixPeer::Trixie {
            // 1.35+ says whether the daemon trusts us: root on its own store is trusted.
            assert_eq!(worker["trust"], "trusted", "{worker}");
        }
    }
    // Dropbear's builder (rigs[0]) pinned to the key of another builder (rigs[1]).
    let b = rigs[0].builder(0);
    let line = format!(
        "{} x86_64-linux {} 1 1 - - {}",
        b.store_url(Protocol::Serve),
        rigs[0].client_key().display(),
        rigs[1].builder(0).host_key_base64()
    );
    let machines = rigs[0].dir().join("machines-bad");
    std::fs::write(&machines, line).expect("write");
    let out = nixmux(&["ping", "--machines", machines.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(11), "{}", text(&out));
    assert!(text(&out).contains("DOES NOT MATCH"), "{}", text(&out));
    assert_eq!(
        b.count_log(nixmux_rig::dropbear_log_patterns::ACCEPTED),
        2,
        "refused before auth: only the two pings authenticated"
    );
}
