//! The CLI reads Lix's TOML machines files: `nixmux agent machines` only parses the file and
//! prints the machines file for Nix, so no builder is needed.

use std::process::{Command, Output};

fn agent_machines(file: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nixmux"))
        .env("NIXMUX_NO_STATE", "1")
        .args([
            "agent",
            "machines",
            "--program",
            "/usr/bin/nixmux",
            "--machines",
        ])
        .arg(file)
        .output()
        .expect("run nixmux")
}

#[test]
fn agent_machines_reads_a_toml_machines_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("machines.toml");
    std::fs::write(
        &file,
        r#"version = 1

[machines.andesite]
uri = "ssh-ng://nix@andesite.example.org"
system-types = ["x86_64-linux", "i686-linux"]
jobs = 4
speed-factor = 2.5
supported-features = ["kvm"]
mandatory-features = ["big"]

[machines.off]
uri = "ssh://off.example.org"
enable = false

[machines.cache]
uri = "file:///tmp/cache"
"#,
    )
    .expect("write");
    let out = agent_machines(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        [
            "ssh-ng://localhost?remote-program=/usr/bin/nixmux%20connect%20nix@andesite.example.org \
          x86_64-linux,i686-linux - 4 2.5 kvm big -"
        ],
        "{stdout}"
    );
    assert!(stderr.contains("skipping cache"), "{stderr}");

    // A bad value: exit code 2 (configuration) and a message naming the key and line.
    std::fs::write(&file, "[machines.a]\nuri = \"ssh://a\"\njobs = -1\n").expect("write");
    let out = agent_machines(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("machines.toml:3: TOML machines file (Lix format): `machines.a.jobs`"),
        "{stderr}"
    );
}
