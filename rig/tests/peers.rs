//! The second SSH server (Dropbear) and the second Nix (trixie's 2.26) as rig builders: each
//! combination starts, answers through the real OpenSSH client with the pinned host key, runs
//! the chosen Nix against the builder's own store, restarts, and leaves nothing behind in the
//! cached trixie root.

use std::path::Path;

use nixmux_rig::{NixPeer, Rig, RigConfig, SshServer, dropbear_log_patterns, trixie_root};

fn config(ssh_server: SshServer, nix: NixPeer) -> RigConfig {
    RigConfig {
        ssh_server,
        nix,
        ..RigConfig::with_builders(1)
    }
}

fn ssh_ok(rig: &Rig, command: &str) -> String {
    let out = rig.ssh(0, command).output().expect("ssh runs");
    assert!(
        out.status.success(),
        "{command}: {}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        rig.builder(0).sshd_log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Entries of the cached root's `/nix` (as the host sees it).
fn root_nix_entries() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(trixie_root().join("nix"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn exercise(ssh_server: SshServer, nix: NixPeer) {
    let before = root_nix_entries();
    let rig = Rig::start(config(ssh_server, nix)).expect("rig starts");
    let b = rig.builder(0);
    let want = match nix {
        NixPeer::Host => "(Nix) 2.8.",
        NixPeer::Trixie => "(Nix) 2.26.",
    };
    assert!(ssh_ok(&rig, "nix-store --version").contains(want));
    // The session's store is the builder's: a path added remotely appears in it.
    let added = ssh_ok(
        &rig,
        "echo interop > /tmp/f && nix-store --add /tmp/f && rm /tmp/f",
    );
    let added = added.trim();
    assert!(b.store().is_valid(added).expect("check"), "{added}");
    let name = Path::new(added).file_name().expect("name");
    assert!(b.store().store_dir().join(name).exists());
    if ssh_server == SshServer::Dropbear {
        assert_eq!(b.count_log(dropbear_log_patterns::ACCEPTED), 2);
    }
    // Restart on the same port with the same key.
    b.stop_sshd().expect("stop");
    b.start_sshd().expect("start again");
    assert!(ssh_ok(&rig, "nix-store --version").contains(want));
    let dir = rig.dir().to_owned();
    drop(rig);
    assert!(!dir.exists());
    assert_eq!(root_nix_entries(), before, "the cached root's /nix changed");
}

#[test]
fn dropbear_with_host_nix() {
    exercise(SshServer::Dropbear, NixPeer::Host);
}

#[test]
fn openssh_with_trixie_nix() {
    exercise(SshServer::OpenSsh, NixPeer::Trixie);
}

#[test]
fn dropbear_with_trixie_nix() {
    exercise(SshServer::Dropbear, NixPeer::Trixie);
}

#[test]
fn trixie_refuses_an_untrusted_user() {
    let e = Rig::start(RigConfig {
        untrusted_user: Some("nixuser".into()),
        ..config(SshServer::OpenSsh, NixPeer::Trixie)
    })
    .expect_err("chroot needs root");
    assert!(e.to_string().contains("untrusted_user"), "{e}");
}
