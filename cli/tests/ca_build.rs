//! `nixmux build` of a graph of floating content-addressed derivations (real OpenSSH + Nix
//! 2.8 with `ca-derivations` on both sides): every derivation builds remotely, the root's
//! realised output is printed, and a second run finds everything realised and builds nothing.

use std::process::Output;

use nixmux_rig::{PrivateStore, Protocol, Rig, RigConfig};

const CA_CONF: &str = "experimental-features = nix-command ca-derivations";

/// `a` and `b` floating content-addressed (`b` uses `a`), `c` input-addressed on top of `b`
/// (its output path is deferred until `b` is realised).
const EXPR: &str = r#"
let
  mk = extra: name: deps: derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = ["-c" "echo cli ${name} ${toString deps} > $out"];
  } // extra);
  ca = mk { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
  a = ca "cli-ca-a" [];
  b = ca "cli-ca-b" [a];
in mk {} "cli-ca-c" [b]
"#;

fn build(client: &PrivateStore, machines: &std::path::Path, drv: &str) -> Output {
    let mut cmd = client.command(
        env!("CARGO_BIN_EXE_nixmux"),
        [
            "build",
            "--machines",
            machines.to_str().expect("utf8"),
            "--local-store",
            "stdio",
            drv,
        ],
    );
    cmd.env("NIX_CONFIG", CA_CONF).env_remove("SSH_AUTH_SOCK");
    cmd.output().expect("run nixmux build")
}

#[test]
fn a_content_addressed_graph_builds_once_and_prints_its_realised_output() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let rig = Rig::start(RigConfig {
        extra_nix_conf: vec![CA_CONF.to_owned()],
        ..RigConfig::with_builders(1)
    })
    .expect("rig");
    let b = rig.builder(0);
    let tmp = tempfile::tempdir().expect("tmp");
    let machines = tmp.path().join("machines");
    std::fs::write(
        &machines,
        format!(
            "{} {}-linux {} 4 1 - - {}\n",
            b.store_url(Protocol::Worker),
            std::env::consts::ARCH,
            rig.client_key().display(),
            b.host_key_base64()
        ),
    )
    .expect("machines");
    let client = PrivateStore::temp().expect("client");
    let file = tmp.path().join("ca.nix");
    std::fs::write(&file, EXPR).expect("write");
    let out = client
        .command("nix-instantiate", [file.to_str().expect("utf8")])
        .env("NIX_CONFIG", CA_CONF)
        .output()
        .expect("nix-instantiate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drv = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    let out = build(&client, &machines, &drv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("built ")).count(),
        3,
        "{stderr}"
    );
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        printed.ends_with("-cli-ca-c"),
        "the realised output: {printed:?}\n{stderr}"
    );
    let text = std::fs::read_to_string(
        client
            .store_dir()
            .join(printed.trim_start_matches("/nix/store/")),
    )
    .expect("the output is here");
    assert!(text.contains("cli cli-ca-c /nix/store/"), "{text}");

    // Everything is realised now: nothing to build, the same output printed.
    let again = build(&client, &machines, &drv);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("0 derivation(s) to build"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), printed);
}
