//! `nixmux build` through the real binary, run inside a client store of its own, against a
//! rig builder, over both protocols.

use std::process::Output;

use nixmux_rig::{PrivateStore, Protocol, Rig, RigConfig};

// `tag` makes the derivations differ per protocol: both runs share one builder, and outputs
// already valid there would not be built (or logged) again.
const EXPR: &str = r#"
{ tag }:
let dep = derivation { name = "cli-dep-${tag}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = ["-c" "echo building-dep; echo dep > $out"]; };
in {
  ok = derivation { name = "cli-top-${tag}"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo top-log-line; read x < ${dep}; echo $x top > $out"]; };
  bad = derivation { name = "cli-bad-${tag}"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo about-to-fail; exit 3"]; };
}
"#;

fn instantiate(store: &PrivateStore, attr: &str, tag: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("e.nix");
    std::fs::write(&f, EXPR).expect("write");
    let out = store
        .run(
            "nix-instantiate",
            [
                f.to_str().expect("utf8"),
                "-A",
                attr,
                "--argstr",
                "tag",
                tag,
            ],
        )
        .expect("instantiate");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn build(rig: &Rig, client: &PrivateStore, proto: Protocol, drv: &str) -> Output {
    let url = rig.builder(0).store_url(proto);
    let mut cmd = client.command(
        env!("CARGO_BIN_EXE_nixmux"),
        [
            "build",
            "--machines",
            rig.machines().to_str().expect("utf8"),
            "--builder",
            &url,
            "--local-store",
            "stdio",
            drv,
        ],
    );
    cmd.env_remove("SSH_AUTH_SOCK");
    cmd.output().expect("run nixmux build")
}

#[test]
fn build_copies_builds_streams_and_fetches_on_both_protocols() {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let rig = Rig::start(RigConfig::with_builders(1)).expect("rig");
    for proto in [Protocol::Serve, Protocol::Worker] {
        let client = PrivateStore::temp().expect("client");
        let tag = proto.scheme().replace('-', "");
        let drv = instantiate(&client, "ok", &tag);
        let out = build(&rig, &client, proto, &drv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{proto:?}: {stderr}");
        assert!(stderr.contains("top-log-line"), "log streamed: {stderr}");
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(path.ends_with(&format!("-cli-top-{tag}")), "{path}");
        client
            .run("nix-store", ["--verify-path", &path])
            .expect("output valid locally");

        let bad = instantiate(&client, "bad", &tag);
        let out = build(&rig, &client, proto, &bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(16), "{proto:?}: {stderr}");
        assert!(stderr.contains("about-to-fail"), "log tail shown: {stderr}");
    }
}
