//! Builder configuration: machines files, store URLs, nix.conf and ssh_config.
//!
//! Data files live in tests/data/config/; `@file` includes in them are relative to the
//! current directory, which is the package root under `cargo test` / nextest.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixmux::Protocol;
use nixmux::config::{
    BuilderSpec, BuildersOrigin, ConfigError, ConfigKind, JumpSpec, LocalEnv, MachineEntry,
    MachineProblem, Machines, NixConfSources, Origin, PinnedHostKey, ProxySetting,
    ResolvedEndpoint, SshCommandLine, SshConfig, StoreKind, StoreUrl, StoreUrlProblem,
    StrictPolicy, builders_setting, effective_store_uri, parse_builders, read_machines_file,
    shell_escape, store_kind,
};

const SYSTEM: &str = "x86_64-linux";
/// `base64 -w0` of an ed25519 `.pub` file (comment `root@builder0`).
const ED25519_B64: &str = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUlWaDlYT2grQ2R3YXVYOHAyaWZPZlBLZ3c3a1dldWVqb2lBZUxPTktNVzUgcm9vdEBidWlsZGVyMAo=";
const ED25519_LINE: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIVh9XOh+CdwauX8p2ifOfPKgw7kWeuejoiAeLONKMW5";
/// `base64 -w0` of an ecdsa `.pub` file with an empty comment.
const ECDSA_B64: &str = "ZWNkc2Etc2hhMi1uaXN0cDI1NiBBQUFBRTJWalpITmhMWE5vWVRJdGJtbHpkSEF5TlRZQUFBQUlibWx6ZEhBeU5UWUFBQUJCQks0TmQ2VmFENGV6WTh5T3RCc3U3T2xhb1ZCUzRJZGMvekw5WXdPRDZQWDBtV3JuNWtjTHFRZFRMSFlzNDBGdytCZUR3UVhnb1NTa3l1Q3ZaYzlkVXQ4PSAK";

fn data(name: &str) -> PathBuf {
    Path::new("tests/data/config").join(name)
}

fn machines(text: &str) -> Machines {
    parse_builders(text, Origin::Text("test builders".into()), SYSTEM).unwrap()
}

fn machines_err(text: &str) -> ConfigError {
    parse_builders(text, Origin::Text("test builders".into()), SYSTEM).unwrap_err()
}

fn builders(m: &Machines) -> Vec<&BuilderSpec> {
    m.builders().collect()
}

fn one(text: &str) -> BuilderSpec {
    let m = machines(text);
    assert_eq!(m.entries.len(), 1, "{text:?} gave {:?}", m.entries);
    builders(&m)[0].clone()
}

fn url(s: &str) -> BuilderSpec {
    BuilderSpec::from_store_url(s, SYSTEM).unwrap()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn env() -> LocalEnv {
    LocalEnv {
        user: "alice".into(),
        home: PathBuf::from("/home/alice"),
        uid: 1000,
        hostname: "client.example.org".into(),
    }
}

fn ssh_config(text: &str) -> SshConfig {
    SshConfig::parse_str(text, Path::new("test_ssh_config"), ConfigKind::User, &env()).unwrap()
}

fn ssh_config_err(text: &str) -> String {
    SshConfig::parse_str(text, Path::new("test_ssh_config"), ConfigKind::User, &env())
        .unwrap_err()
        .to_string()
}

fn resolve(config: &str, store_url: &str) -> ResolvedEndpoint {
    ssh_config(config).resolve(&url(store_url), &env()).unwrap()
}

fn paths(items: &[&str]) -> Vec<PathBuf> {
    items.iter().map(PathBuf::from).collect()
}

// ---------------------------------------------------------------------------------------
// Machines files
// ---------------------------------------------------------------------------------------

#[test]
fn basic_file_every_syntax_rule() {
    let m = read_machines_file(&data("machines-basic"), SYSTEM).unwrap();
    let names: Vec<&str> = m
        .entries
        .iter()
        .map(|e| match e {
            MachineEntry::Ssh(b) => b.name.as_str(),
            MachineEntry::NotSsh(n) => n.name.as_str(),
        })
        .collect();
    assert_eq!(
        names,
        [
            "nix@alpha.example.org",
            "beta.example.org",
            "gamma.example.org",
            "ssh-ng://delta.example.org",
            "epsilon.example.org",
            "ssh://root@[2001:db8::1]:2222",
            "ssh-ng://zeta.example.org?remote-program=/opt/nix/bin/nix-daemon%20--option%20x%20y&remote-store=local%3Froot%3D%2Fsrv%2Fnix",
            "local",
        ]
    );
    let b = builders(&m);

    // Every field set.
    let alpha = b[0];
    assert_eq!(alpha.uri, "ssh://nix@alpha.example.org");
    assert_eq!(alpha.protocol, Protocol::Serve);
    assert_eq!(alpha.user.as_deref(), Some("nix"));
    assert_eq!(alpha.host, "alpha.example.org");
    assert_eq!(alpha.port, None);
    assert_eq!(alpha.systems, ["x86_64-linux", "i686-linux"]);
    assert_eq!(alpha.identity.as_deref(), Some(Path::new("/keys/alpha")));
    assert_eq!(alpha.max_jobs, 8);
    assert_eq!(alpha.speed_factor, 2.0);
    assert_eq!(alpha.supported_features, set(&["big-parallel", "kvm"]));
    assert_eq!(alpha.mandatory_features, set(&["benchmark"]));
    let key = alpha.host_key.as_ref().unwrap();
    assert_eq!(key.openssh_line(), ED25519_LINE);
    assert_eq!(key.comment.as_deref(), Some("root@builder0"));
    let loc = alpha.location.as_ref().unwrap();
    assert_eq!(loc.line, 3);
    assert_eq!(*loc.origin, Origin::File(data("machines-basic")));
    assert_eq!(loc.to_string(), "tests/data/config/machines-basic:3");

    // `-` everywhere (tab-separated): all defaults.
    let beta = b[1];
    assert_eq!(beta.systems, ["aarch64-linux"]);
    assert_eq!(beta.identity, None);
    assert_eq!(beta.max_jobs, 1);
    assert_eq!(beta.speed_factor, 1.0);
    assert!(beta.supported_features.is_empty() && beta.mandatory_features.is_empty());
    assert_eq!(beta.host_key, None);

    // Missing fields: defaults, the local system.
    let gamma = b[2];
    assert_eq!(gamma.systems, [SYSTEM]);
    assert_eq!(gamma.location.as_ref().unwrap().line, 5);
    let delta = b[3];
    assert_eq!(delta.protocol, Protocol::Worker);
    assert_eq!(delta.location.as_ref().unwrap().line, 5);
    assert_eq!(delta.remote_command(), "nix-daemon --stdio");

    // Float speed factor; the indented comment line with `;` produced no entry.
    let epsilon = b[4];
    assert_eq!(epsilon.max_jobs, 3);
    assert_eq!(epsilon.speed_factor, 0.5);
    assert_eq!(epsilon.location.as_ref().unwrap().line, 7);

    // IPv6 with port; speed factor 0 means 1.
    let v6 = b[5];
    assert_eq!(v6.host, "2001:db8::1");
    assert_eq!(v6.port, Some(2222));
    assert_eq!(v6.user.as_deref(), Some("root"));
    assert_eq!(v6.speed_factor, 1.0);

    // Percent-decoded parameters.
    let zeta = b[6];
    assert_eq!(
        zeta.remote_program,
        ["/opt/nix/bin/nix-daemon", "--option", "x", "y"]
    );
    assert_eq!(zeta.remote_store.as_deref(), Some("local?root=/srv/nix"));
    assert_eq!(
        zeta.remote_command(),
        "/opt/nix/bin/nix-daemon --option x y --stdio --store 'local?root=/srv/nix'"
    );
    assert_eq!(zeta.speed_factor, 1.25);

    // `local` is reported, not an error.
    let skipped: Vec<_> = m.not_ssh().collect();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].name, "local");
    assert_eq!(skipped[0].location.line, 10);
    assert!(
        skipped[0].kind.contains("local store"),
        "{}",
        skipped[0].kind
    );
}

#[test]
fn separators_comments_and_blank_entries() {
    let m = machines(
        "\n\n  a.example.org  \n;;; b.example.org ;\n\r\n c.example.org\t\r\n# d.example.org\n",
    );
    let hosts: Vec<&str> = m.builders().map(|b| b.host.as_str()).collect();
    assert_eq!(hosts, ["a.example.org", "b.example.org", "c.example.org"]);
    let lines: Vec<usize> = m
        .builders()
        .map(|b| b.location.as_ref().unwrap().line)
        .collect();
    assert_eq!(lines, [3, 4, 6]);
}

#[test]
fn comment_runs_to_end_of_line_across_semicolons() {
    // Nix >= 2.29 (before, `b` would have been an entry: the text was split at `;` first).
    let m = machines("a.example.org # comment ; b.example.org\n# x ; c.example.org\nd ; e # f ; g");
    let hosts: Vec<&str> = m.builders().map(|b| b.host.as_str()).collect();
    assert_eq!(hosts, ["a.example.org", "d", "e"]);
}

#[test]
fn builders_setting_string_form() {
    // As given to `--builders` or `builders = ...` in nix.conf.
    let m = machines("ssh://mac aarch64-darwin ; ssh://beastie x86_64-freebsd");
    let b = builders(&m);
    assert_eq!(b.len(), 2);
    assert_eq!(
        (b[0].host.as_str(), b[0].systems.as_slice()),
        ("mac", &["aarch64-darwin".to_string()][..])
    );
    assert_eq!(b[1].systems, ["x86_64-freebsd"]);
    assert_eq!(
        b[1].location.as_ref().unwrap().to_string(),
        "test builders, line 1"
    );

    // An error in the setting names the setting.
    let e = machines_err("ok.example.org ; bad.example.org - - lots");
    assert_eq!(
        e.to_string(),
        "test builders, line 1: bad machine specification `bad.example.org - - lots`: field 4 \
         (max jobs) `lots` is not an unsigned integer"
    );
}

#[test]
fn field_defaults_and_lists() {
    let b = one("h");
    assert_eq!(b.uri, "ssh://h");
    assert_eq!(b.systems, [SYSTEM]);
    assert_eq!((b.max_jobs, b.speed_factor), (1, 1.0));
    assert_eq!(b.remote_program, ["nix-store"]);
    assert_eq!(b.remote_store, None);
    assert!(!b.compress);
    assert_eq!(b.max_connections, None);

    // Lists skip empty items, systems keep order without duplicates, features are sets.
    let b = one("h x86_64-linux,,i686-linux,x86_64-linux - 0 - b,a,,a c");
    assert_eq!(b.systems, ["x86_64-linux", "i686-linux"]);
    assert_eq!(b.max_jobs, 0);
    assert_eq!(b.supported_features, set(&["a", "b"]));
    assert_eq!(b.mandatory_features, set(&["c"]));

    // A comma alone is set, but empty: no system at all.
    assert!(one("h ,").systems.is_empty());

    // Fields after the 8th are ignored, as in Nix.
    assert_eq!(one("h - - - - - - - extra words").host, "h");
}

#[test]
fn system_and_feature_matching() {
    let b = one("h x86_64-linux,i686-linux - 1 1 kvm,big-parallel benchmark");
    assert!(b.supports_system("i686-linux"));
    assert!(b.supports_system("builtin"));
    assert!(!b.supports_system("aarch64-linux"));
    // Mandatory features must be required; required ones must be supported or mandatory.
    assert!(b.accepts_features(["benchmark"]));
    assert!(b.accepts_features(["benchmark", "kvm"]));
    assert!(!b.accepts_features([]));
    assert!(!b.accepts_features(["kvm"]));
    assert!(!b.accepts_features(["benchmark", "cuda"]));
    let plain = one("h");
    assert!(plain.accepts_features([]));
    assert!(!plain.accepts_features(["kvm"]));
}

#[test]
fn speed_factor_rules() {
    assert_eq!(one("h - - - 2").speed_factor, 2.0);
    assert_eq!(one("h - - - 1.5").speed_factor, 1.5);
    assert_eq!(one("h - - - 0.0").speed_factor, 1.0);
    assert_eq!(one("h - - - 1e1").speed_factor, 10.0);
    for (bad, negative) in [
        ("-1", true),
        ("-0.5", true),
        ("fast", false),
        ("inf", false),
        ("NaN", false),
        ("1,5", false),
    ] {
        let e = machines_err(&format!("h - - - {bad}"));
        let ConfigError::Machine {
            problem, location, ..
        } = &e
        else {
            panic!("{e}")
        };
        assert_eq!(location.line, 1);
        match (negative, problem) {
            (true, MachineProblem::NegativeSpeedFactor(v))
            | (false, MachineProblem::BadSpeedFactor(v)) => {
                assert_eq!(v, bad)
            }
            _ => panic!("{bad}: {problem:?}"),
        }
    }
}

#[test]
fn max_jobs_errors() {
    for bad in ["-1", "1.5", "many", "4294967296"] {
        let e = machines_err(&format!("# first line\nh - - {bad}"));
        assert!(
            matches!(&e, ConfigError::Machine { problem: MachineProblem::BadMaxJobs(v), location, .. } if v == bad && location.line == 2),
            "{e}"
        );
    }
    assert_eq!(one("h - - +4").max_jobs, 4);
}

#[test]
fn host_key_field_must_decode() {
    // Not base64: an error naming the file and line.
    let e = read_machines_file(&data("machines-bad-base64"), SYSTEM).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(
            "tests/data/config/machines-bad-base64:3: bad machine specification `bad.example.org"
        ),
        "{msg}"
    );
    assert!(msg.contains("not valid base64"), "{msg}");
    assert!(matches!(
        e,
        ConfigError::Machine {
            problem: MachineProblem::BadHostKeyBase64 { .. },
            ..
        }
    ));

    // Base64, but not of a public key line.
    let e = machines_err(&format!("h - - - - - - {}", "aGVsbG8gd29ybGQ="));
    assert!(
        matches!(
            &e,
            ConfigError::Machine {
                problem: MachineProblem::BadHostKeyLine { .. },
                ..
            }
        ),
        "{e}"
    );

    // The common mistake: base64 of a known_hosts line.
    let known_hosts_line = format!("builder0 {ED25519_LINE}");
    let e = machines_err(&format!("h - - - - - - {}", b64(&known_hosts_line)));
    assert!(
        e.to_string().contains("looks like a known_hosts line"),
        "{e}"
    );

    // Lenient like Nix: padding optional, anything after `=` ignored.
    let trimmed = ED25519_B64.trim_end_matches('=');
    assert_eq!(
        one(&format!("h - - - - - - {trimmed}"))
            .host_key
            .unwrap()
            .openssh_line(),
        ED25519_LINE
    );
    let k = one(&format!("h - - - - - - {ECDSA_B64}")).host_key.unwrap();
    assert_eq!(k.algorithm, "ecdsa-sha2-nistp256");
    assert_eq!(k.comment, None);
    assert_eq!(&k.key_blob()[4..23], b"ecdsa-sha2-nistp256");

    // A non-SSH entry only needs a decodable field (Nix checks nothing else).
    let m = machines("local - - - - - - aGVsbG8=");
    assert_eq!(m.not_ssh().count(), 1);
    assert!(
        machines_err("local - - - - - - *")
            .to_string()
            .contains("not valid base64")
    );
}

#[test]
fn pinned_key_from_openssh_line() {
    let k = PinnedHostKey::from_openssh_line(&format!("\n{ED25519_LINE} a comment\n")).unwrap();
    assert_eq!(k.algorithm, "ssh-ed25519");
    assert_eq!(k.comment.as_deref(), Some("a comment"));
    // The blob must hold the named algorithm.
    let wrong = ED25519_LINE.replace("ssh-ed25519", "ssh-rsa");
    assert!(PinnedHostKey::from_openssh_line(&wrong).is_err());
    assert!(PinnedHostKey::from_openssh_line("ssh-ed25519").is_err());
    assert!(PinnedHostKey::from_openssh_line("").is_err());
}

#[test]
fn includes_missing_and_nested() {
    let m = read_machines_file(&data("machines-include-a"), SYSTEM).unwrap();
    let hosts: Vec<&str> = m.builders().map(|b| b.host.as_str()).collect();
    assert_eq!(
        hosts,
        [
            "first.example.org",
            "second.example.org",
            "last.example.org",
            "third.example.org",
            "fourth.example.org"
        ]
    );
    let second = builders(&m)[1];
    assert_eq!(
        second.location.as_ref().unwrap().to_string(),
        "tests/data/config/machines-include-b:1"
    );
    // The missing include is skipped and reported.
    assert_eq!(m.missing_includes.len(), 1);
    let (loc, path) = &m.missing_includes[0];
    assert_eq!(loc.to_string(), "tests/data/config/machines-include-a:4");
    assert_eq!(path, &data("does-not-exist"));

    // Through the setting: `@file` as Nix's default `@/etc/nix/machines`.
    let m = machines("@tests/data/config/machines-include-b ; @tests/data/config/nope");
    assert_eq!(builders(&m)[0].host, "second.example.org");
    assert_eq!(m.missing_includes.len(), 1);

    // An explicitly named file must exist.
    let e = read_machines_file(&data("nope"), SYSTEM).unwrap_err();
    assert!(matches!(e, ConfigError::Read { location: None, .. }), "{e}");
}

#[test]
fn include_loop_and_unreadable_include() {
    let e = read_machines_file(&data("machines-loop-a"), SYSTEM).unwrap_err();
    assert!(matches!(e, ConfigError::IncludeLoop { .. }), "{e}");
    assert!(
        e.to_string().contains("machines-loop-b:2: include loop"),
        "{e}"
    );

    // A directory is not ENOENT: an error, as in Nix.
    let e = machines_err("@tests/data/config");
    assert!(
        matches!(&e, ConfigError::Read { location: Some(l), .. } if l.line == 1),
        "{e}"
    );
}

#[test]
fn real_world_lines() {
    let m = read_machines_file(&data("machines-real-world"), SYSTEM).unwrap();
    let b = builders(&m);
    let nixbuild = b[0];
    assert_eq!(nixbuild.uri, "ssh://eu.nixbuild.net");
    assert_eq!(nixbuild.protocol, Protocol::Serve);
    assert_eq!(nixbuild.systems, ["x86_64-linux"]);
    assert_eq!(nixbuild.identity, None);
    assert_eq!(nixbuild.max_jobs, 100);
    assert_eq!(
        nixbuild.supported_features,
        set(&["benchmark", "big-parallel"])
    );
    assert_eq!(nixbuild.remote_command(), "nix-store --serve --write");

    let mac = b[1];
    assert_eq!(mac.protocol, Protocol::Worker);
    assert_eq!(mac.user.as_deref(), Some("builder"));
    assert_eq!(mac.systems, ["aarch64-darwin", "x86_64-darwin"]);
    assert_eq!(
        mac.identity.as_deref(),
        Some(Path::new("/etc/nix/builder_ed25519"))
    );

    let arm = b[2];
    assert_eq!(arm.mandatory_features, set(&["gccarch-armv8-a"]));
    assert_eq!(arm.speed_factor, 4.0);
}

#[test]
fn rig_machines_file() {
    // The format rig/src/builder.rs writes.
    let m = read_machines_file(&data("machines-rig"), SYSTEM).unwrap();
    let b = builders(&m);
    assert_eq!(b.len(), 2);
    for (spec, protocol, command) in [
        (b[0], Protocol::Serve, "nix-store --serve --write"),
        (b[1], Protocol::Worker, "nix-daemon --stdio"),
    ] {
        assert_eq!(spec.protocol, protocol);
        assert_eq!(spec.user.as_deref(), Some("root"));
        assert_eq!(spec.host, "127.0.0.1");
        assert_eq!(spec.port, Some(40001));
        assert_eq!(
            spec.identity.as_deref(),
            Some(Path::new("/tmp/rig/client_key"))
        );
        assert_eq!(spec.max_jobs, 4);
        assert_eq!(spec.host_key.as_ref().unwrap().openssh_line(), ED25519_LINE);
        assert_eq!(spec.remote_command(), command);
    }
}

#[test]
fn non_ssh_entries_are_reported() {
    let m = machines(
        "local\nauto\ndaemon\nauto?root=/x\n?root=/x\nunix:///run/nix/socket\n/srv/store\n\
         file:///srv/cache\nhttps://cache.example.org\nlocal?root=/r x86_64-linux\n\
         mounted-ssh-ng://h\nssh://real",
    );
    assert_eq!(m.builders().count(), 1);
    let kinds: Vec<&str> = m.not_ssh().map(|n| n.kind.as_str()).collect();
    assert_eq!(kinds.len(), 11, "{kinds:?}");
    assert!(kinds[0].contains("local"));
    assert!(kinds[2].contains("daemon"));
    assert!(kinds[5].contains("unix://"));
    assert!(kinds[6].contains("/srv/store"));
    assert!(kinds[8].contains("https://"));
    assert!(kinds[10].contains("mounted-ssh-ng"));

    // As a bare URL (e.g. `nixmux ping daemon`): a typed error.
    let e = BuilderSpec::from_store_url("daemon", SYSTEM).unwrap_err();
    assert!(
        matches!(&e, ConfigError::NotSsh { uri, .. } if uri == "daemon"),
        "{e}"
    );
    assert!(e.to_string().contains("not an SSH builder"));
}

#[test]
fn ssh_prefix_rule() {
    assert_eq!(effective_store_uri("nix@host"), "ssh://nix@host");
    assert_eq!(effective_store_uri("host:2222"), "ssh://host:2222");
    assert_eq!(
        effective_store_uri("host?remote-store=x"),
        "ssh://host?remote-store=x"
    );
    for kept in [
        "ssh-ng://h",
        "local",
        "auto",
        "daemon",
        "local?a=b",
        "auto?a=b",
        "daemon?a=b",
        "?a=b",
        "/path",
        "a/b",
    ] {
        assert_eq!(effective_store_uri(kept), kept);
    }
    assert_eq!(store_kind("ssh://h"), StoreKind::Ssh(Protocol::Serve));
    assert_eq!(store_kind("ssh-ng://h"), StoreKind::Ssh(Protocol::Worker));
    assert!(matches!(store_kind("s3://bucket"), StoreKind::Other(_)));
}

// ---------------------------------------------------------------------------------------
// Store URLs
// ---------------------------------------------------------------------------------------

#[test]
fn store_url_forms() {
    let u = StoreUrl::parse("ssh://nix@h.example.org:2222?ssh-key=/k&compress=true").unwrap();
    assert_eq!(u.protocol, Protocol::Serve);
    assert_eq!(u.user.as_deref(), Some("nix"));
    assert_eq!(u.host, "h.example.org");
    assert_eq!(u.port, Some(2222));
    assert_eq!(u.params.get("ssh-key").map(String::as_str), Some("/k"));

    // Bare forms mean ssh://.
    let u = StoreUrl::parse("root@10.1.2.3:22").unwrap();
    assert_eq!(
        (u.protocol, u.host.as_str(), u.port),
        (Protocol::Serve, "10.1.2.3", Some(22))
    );
    assert_eq!(StoreUrl::parse("h").unwrap().user, None);

    // IPv6: bracketed with port and zone; unbracketed (Nix's back-compat shim, no port).
    let u = StoreUrl::parse("ssh-ng://[::1]:2222").unwrap();
    assert_eq!((u.host.as_str(), u.port), ("::1", Some(2222)));
    let u = StoreUrl::parse("ssh://root@[fe80::1%25eth0]").unwrap();
    assert_eq!((u.host.as_str(), u.port), ("fe80::1%eth0", None));
    let u = StoreUrl::parse("ssh://root@fe80::1%eth0").unwrap();
    assert_eq!((u.host.as_str(), u.port), ("fe80::1%eth0", None));
    let u = StoreUrl::parse("ssh://2001:db8::7").unwrap();
    assert_eq!(u.host, "2001:db8::7");

    // Percent-decoding of user, host, parameter names and values; `+` stays.
    let u = StoreUrl::parse("ssh://us%65r%40corp@h%2Dx?remote%2Dstore=a+b%20c").unwrap();
    assert_eq!(u.user.as_deref(), Some("user@corp"));
    assert_eq!(u.host, "h-x");
    assert_eq!(
        u.params.get("remote-store").map(String::as_str),
        Some("a+b c")
    );

    // First occurrence wins; parts without `=` are ignored; empty parts skipped.
    let u = StoreUrl::parse("ssh://h?a=1&a=2&&flag&b=").unwrap();
    assert_eq!(u.params.get("a").map(String::as_str), Some("1"));
    assert_eq!(u.params.get("b").map(String::as_str), Some(""));
    assert_eq!(u.ignored_query_parts, ["flag"]);

    // An empty port is no port (boost.url).
    assert_eq!(StoreUrl::parse("ssh://h:").unwrap().port, None);
}

#[test]
fn store_url_errors() {
    let problem = |s: &str| StoreUrl::parse(s).unwrap_err().problem;
    assert_eq!(problem("ssh://"), StoreUrlProblem::EmptyHost);
    assert_eq!(problem("ssh://@h"), StoreUrlProblem::EmptyUser);
    assert!(matches!(
        problem("ssh://-oProxyCommand=x"),
        StoreUrlProblem::LeadingDash { .. }
    ));
    assert!(matches!(
        problem("ssh://-u@h"),
        StoreUrlProblem::LeadingDash { .. }
    ));
    assert_eq!(problem("ssh://u:pw@h"), StoreUrlProblem::Password);
    assert_eq!(problem("ssh://a@b@h"), StoreUrlProblem::ManyAts);
    assert_eq!(problem("ssh://h:0"), StoreUrlProblem::BadPort("0".into()));
    assert_eq!(
        problem("ssh://h:65536"),
        StoreUrlProblem::BadPort("65536".into())
    );
    assert_eq!(
        problem("ssh://h:ssh"),
        StoreUrlProblem::BadPort("ssh".into())
    );
    assert_eq!(
        problem("ssh://h/nix/store"),
        StoreUrlProblem::UnexpectedPath("/nix/store".into())
    );
    assert_eq!(
        problem("ssh://h#frag"),
        StoreUrlProblem::Fragment("frag".into())
    );
    assert!(matches!(
        problem("ssh://h?a=%zz"),
        StoreUrlProblem::BadPercentEncoding(_)
    ));
    assert!(matches!(
        problem("ssh://h?a=%4"),
        StoreUrlProblem::BadPercentEncoding(_)
    ));
    assert!(matches!(problem("ssh://[::1"), StoreUrlProblem::BadIpv6(_)));
    assert!(matches!(
        problem("ssh://[not:v6]:22"),
        StoreUrlProblem::BadIpv6(_)
    ));
    assert!(matches!(
        problem("ssh://1:2:3"),
        StoreUrlProblem::BadIpv6(_)
    ));
    assert!(matches!(
        problem("ssh://h<x"),
        StoreUrlProblem::BadHostChar('<')
    ));
    assert!(matches!(problem("http://h"), StoreUrlProblem::NotSsh(_)));
    let e = StoreUrl::parse("ssh://h:0").unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid store URL `ssh://h:0`: port `0` is invalid (expected 1..65535)"
    );

    // In a machines file the error carries the location.
    let e = machines_err("\n\nssh://h:99999 x86_64-linux");
    assert!(
        matches!(&e, ConfigError::Machine { location, problem: MachineProblem::StoreUrl(StoreUrlProblem::BadPort(_)), .. } if location.line == 3),
        "{e}"
    );
}

#[test]
fn store_url_display_round_trips() {
    for s in [
        "ssh://h",
        "ssh-ng://nix@h:2222",
        "ssh://root@[::1]:22",
        "ssh://u%40x@h?remote-program=a%20b&ssh-key=/k",
    ] {
        let u = StoreUrl::parse(s).unwrap();
        assert_eq!(StoreUrl::parse(&u.to_string()).unwrap(), u, "{s} -> {u}");
    }
    assert_eq!(
        StoreUrl::parse("ssh-ng://nix@h:2222").unwrap().to_string(),
        "ssh-ng://nix@h:2222"
    );
}

#[test]
fn url_parameters() {
    let b = url(
        "ssh://h?compress=yes&max-connections=4&priority=10&trusted=1&frobnicate=x&remote-store=",
    );
    assert!(b.compress);
    assert_eq!(b.max_connections, Some(4));
    assert_eq!(b.remote_store, None);
    assert_eq!(
        b.ignored_params.keys().collect::<Vec<_>>(),
        ["priority", "trusted"]
    );
    assert_eq!(
        b.unknown_params.get("frobnicate").map(String::as_str),
        Some("x")
    );
    assert_eq!(b.location, None);
    // Nix clamps max-connections to at least 1.
    assert_eq!(url("ssh://h?max-connections=0").max_connections, Some(1));
    assert!(!url("ssh://h?compress=0").compress);

    for (bad, name) in [
        ("ssh://h?compress=maybe", "compress"),
        ("ssh://h?max-connections=lots", "max-connections"),
        ("ssh://h?remote-program=%20", "remote-program"),
        (
            "ssh://h?base64-ssh-public-host-key=!!",
            "base64-ssh-public-host-key",
        ),
    ] {
        let e = BuilderSpec::from_store_url(bad, SYSTEM).unwrap_err();
        assert!(matches!(&e, ConfigError::Builder { .. }), "{e}");
        assert!(e.to_string().contains(name), "{e}");
    }

    // Parameters set the same things the fields do.
    let b = url(&format!(
        "ssh-ng://h?ssh-key=/k&base64-ssh-public-host-key={ED25519_B64}"
    ));
    assert_eq!(b.identity.as_deref(), Some(Path::new("/k")));
    assert_eq!(b.host_key.unwrap().openssh_line(), ED25519_LINE);
}

#[test]
fn machine_fields_win_over_url_parameters() {
    // Nix: 2.8's openStore inserts URL params into the machine's (no overwrite); >= 2.2x's
    // completeStoreReference assigns the machine's over the URL's. Either way: fields win.
    let line = format!(
        "ssh://h?ssh-key=/from-url&base64-ssh-public-host-key={ED25519_B64} - /from-field - - - - {ECDSA_B64}"
    );
    let b = one(&line);
    assert_eq!(b.identity.as_deref(), Some(Path::new("/from-field")));
    assert_eq!(b.host_key.unwrap().algorithm, "ecdsa-sha2-nistp256");

    // An unset field leaves the parameter in force.
    let line =
        format!("ssh://h?ssh-key=/from-url&base64-ssh-public-host-key={ED25519_B64} - - - - - - -");
    let b = one(&line);
    assert_eq!(b.identity.as_deref(), Some(Path::new("/from-url")));
    assert_eq!(b.host_key.unwrap().algorithm, "ssh-ed25519");

    // A field overrides even an invalid parameter, which is then never looked at.
    let b = one(&format!(
        "ssh://h?base64-ssh-public-host-key=!! - - - - - - {ED25519_B64}"
    ));
    assert!(b.host_key.is_some());
}

#[test]
fn remote_command_every_combination() {
    let cases = [
        ("ssh://h", "nix-store --serve --write"),
        ("ssh-ng://h", "nix-daemon --stdio"),
        (
            "ssh://h?remote-program=/run/current-system/sw/bin/nix-store",
            "/run/current-system/sw/bin/nix-store --serve --write",
        ),
        (
            "ssh-ng://h?remote-program=/nix/var/nix/profiles/default/bin/nix-daemon",
            "/nix/var/nix/profiles/default/bin/nix-daemon --stdio",
        ),
        // Word lists (Nix >= 2.2x): extra arguments before the protocol flags.
        (
            "ssh://h?remote-program=nix-store%20--option%20sandbox%20false",
            "nix-store --option sandbox false --serve --write",
        ),
        (
            "ssh-ng://h?remote-program=%09nix-daemon%20%20--debug%0A",
            "nix-daemon --debug --stdio",
        ),
        // remote-store is shell-escaped (Nix 2.8 shellEscape: always single quotes).
        (
            "ssh://h?remote-store=local",
            "nix-store --serve --write --store 'local'",
        ),
        (
            "ssh-ng://h?remote-store=local%3Froot%3D%2Ftmp%2Fx",
            "nix-daemon --stdio --store 'local?root=/tmp/x'",
        ),
        (
            "ssh://h?remote-store=%2Fdir%20with%20space%2Fit's",
            "nix-store --serve --write --store '/dir with space/it'\\''s'",
        ),
        (
            "ssh-ng://h?remote-program=sudo%20nix-daemon&remote-store=daemon",
            "sudo nix-daemon --stdio --store 'daemon'",
        ),
    ];
    for (u, want) in cases {
        assert_eq!(url(u).remote_command(), want, "{u}");
    }
    assert_eq!(shell_escape(""), "''");
    assert_eq!(shell_escape("a'b"), "'a'\\''b'");
}

// ---------------------------------------------------------------------------------------
// nix.conf: where the `builders` setting comes from
// ---------------------------------------------------------------------------------------

fn sources() -> NixConfSources {
    NixConfSources {
        conf_dir: data("nixconf/etc"),
        user_conf_files: Vec::new(),
        nix_config: None,
        remote_systems: None,
    }
}

#[test]
fn builders_default_and_nix_conf() {
    // No nix.conf: the default `@<conf_dir>/machines`.
    let s = builders_setting(&NixConfSources {
        conf_dir: PathBuf::from("/nonexistent/nix"),
        ..sources()
    })
    .unwrap();
    assert_eq!(s.value, "@/nonexistent/nix/machines");
    assert_eq!(s.origin, BuildersOrigin::Default);
    assert!(s.machines(SYSTEM).unwrap().entries.is_empty());

    // nix.conf sets it, then `include extra.conf` (relative to nix.conf) sets it again;
    // `!include` of a missing file is fine. Words are joined by single spaces.
    let s = builders_setting(&sources()).unwrap();
    assert_eq!(s.value, "ssh://from-include x86_64-linux ; ssh-ng://second");
    let BuildersOrigin::Line(loc) = &s.origin else {
        panic!("{s:?}")
    };
    assert_eq!(
        loc.to_string(),
        "tests/data/config/nixconf/etc/extra.conf:2"
    );
    let m = s.machines(SYSTEM).unwrap();
    assert_eq!(builders(&m).len(), 2);
    assert!(
        builders(&m)[0]
            .location
            .as_ref()
            .unwrap()
            .to_string()
            .contains("extra.conf:2")
    );
}

#[test]
fn builders_user_files_env_and_errors() {
    // A user file overrides the system one (files are applied in reverse order, so the first
    // listed wins).
    let s = builders_setting(&NixConfSources {
        user_conf_files: vec![
            data("nixconf/user/nix.conf"),
            data("nixconf/etc/extra.conf"),
        ],
        ..sources()
    })
    .unwrap();
    assert_eq!(s.value, "@tests/data/config/machines-include-b");
    assert_eq!(
        builders(&s.machines(SYSTEM).unwrap())[0].host,
        "second.example.org"
    );

    // NIX_CONFIG wins over everything.
    let s = builders_setting(&NixConfSources {
        user_conf_files: vec![data("nixconf/user/nix.conf")],
        nix_config: Some("max-jobs = 1\nbuilders = ssh://env-builder\n".into()),
        ..sources()
    })
    .unwrap();
    assert_eq!(s.value, "ssh://env-builder");
    let BuildersOrigin::Line(loc) = &s.origin else {
        panic!("{s:?}")
    };
    assert_eq!(loc.to_string(), "NIX_CONFIG, line 2");

    // NIX_REMOTE_SYSTEMS replaces the default only.
    let s = builders_setting(&NixConfSources {
        conf_dir: PathBuf::from("/nonexistent"),
        remote_systems: Some("/a:/b".into()),
        ..sources()
    })
    .unwrap();
    assert_eq!(
        (s.value.as_str(), &s.origin),
        ("@/a @/b", &BuildersOrigin::RemoteSystemsEnv)
    );

    // An illegal line is an error with its location, as Nix refuses to start.
    let e = builders_setting(&NixConfSources {
        nix_config: Some("include tests/data/config/nixconf/etc/bad.conf".into()),
        ..sources()
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "tests/data/config/nixconf/etc/bad.conf:2: illegal configuration line `this line is illegal`"
    );
    // A missing `include` (not `!include`) is an error too.
    let e = builders_setting(&NixConfSources {
        nix_config: Some("include /nonexistent.conf".into()),
        ..sources()
    })
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("NIX_CONFIG, line 1: included file /nonexistent.conf not found"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// ssh_config
// ---------------------------------------------------------------------------------------

#[test]
fn defaults_without_ssh_config() {
    let ep = SshConfig::empty()
        .resolve(&url("ssh://Builder.Example.ORG"), &env())
        .unwrap();
    assert_eq!(ep.host_alias, "Builder.Example.ORG");
    assert_eq!(ep.host, "builder.example.org", "ssh lower-cases host names");
    assert_eq!(ep.port, 22);
    assert_eq!(ep.user, "alice");
    assert!(ep.identities_are_defaults);
    assert_eq!(
        ep.identities,
        paths(&[
            "/home/alice/.ssh/id_rsa",
            "/home/alice/.ssh/id_ecdsa",
            "/home/alice/.ssh/id_ecdsa_sk",
            "/home/alice/.ssh/id_ed25519",
            "/home/alice/.ssh/id_ed25519_sk",
        ])
    );
    assert!(!ep.identities_only);
    assert_eq!(
        ep.known_hosts_files,
        paths(&[
            "/home/alice/.ssh/known_hosts",
            "/home/alice/.ssh/known_hosts2",
            "/etc/ssh/ssh_known_hosts",
            "/etc/ssh/ssh_known_hosts2",
        ])
    );
    assert_eq!(
        ep.learn_known_hosts_file,
        Some(PathBuf::from("/home/alice/.ssh/known_hosts"))
    );
    assert_eq!(ep.strict, StrictPolicy::Ask);
    assert!(ep.proxy_jump.is_empty());
    assert_eq!(ep.connect_timeout, None);
    assert_eq!((ep.keepalive.interval, ep.keepalive.count_max), (None, 3));
    assert_eq!(ep.host_key_name(), "builder.example.org");
    assert!(ep.warnings.is_empty());
}

#[test]
fn first_obtained_value_wins() {
    let config = "\
        # global defaults first would win over everything; here they come last\n\
        Host builder1\n\
        \x20 HostName 10.0.0.1\n\
        \x20 User builder\n\
        \x20 Port 2201\n\
        \x20 IdentityFile ~/.ssh/builder1\n\
        Host builder*\n\
        \x20 HostName ignored.example.org\n\
        \x20 User ignored\n\
        \x20 IdentityFile ~/.ssh/builders\n\
        \x20 ConnectTimeout 7\n\
        Host *\n\
        \x20 Port 2999\n\
        \x20 User everyone\n\
        \x20 IdentitiesOnly yes\n\
        \x20 ServerAliveInterval 1m\n\
        \x20 ServerAliveCountMax 5\n";
    let ep = resolve(config, "ssh://builder1");
    assert_eq!(ep.host, "10.0.0.1");
    assert_eq!(ep.user, "builder");
    assert_eq!(ep.port, 2201);
    // IdentityFile accumulates, in order.
    assert_eq!(
        ep.identities,
        paths(&["/home/alice/.ssh/builder1", "/home/alice/.ssh/builders"])
    );
    assert!(!ep.identities_are_defaults);
    assert!(ep.identities_only);
    assert_eq!(ep.connect_timeout, Some(Duration::from_secs(7)));
    assert_eq!(ep.keepalive.interval, Some(Duration::from_secs(60)));
    assert_eq!(ep.keepalive.count_max, 5);

    let ep = resolve(config, "ssh://other");
    assert_eq!(
        (ep.host.as_str(), ep.user.as_str(), ep.port),
        ("other", "everyone", 2999)
    );
    assert!(ep.identities_are_defaults);
}

#[test]
fn explicit_machine_values_win_over_ssh_config() {
    let config = "Host b\n  User fromconfig\n  Port 2200\n  IdentityFile ~/.ssh/cfg\n  HostName real.example.org\n  UserKnownHostsFile ~/.ssh/kh_b\n  StrictHostKeyChecking no\n";
    // URL user and port win; the machines key (`-i`) comes before IdentityFile.
    let spec = one("ssh://nix@b:2222 - /keys/machine");
    let ep = ssh_config(config).resolve(&spec, &env()).unwrap();
    assert_eq!((ep.user.as_str(), ep.port), ("nix", 2222));
    assert_eq!(ep.host, "real.example.org");
    assert_eq!(
        ep.identities,
        paths(&["/keys/machine", "/home/alice/.ssh/cfg"])
    );
    assert_eq!(ep.strict, StrictPolicy::No);
    assert!(ep.strict.is_insecure());

    // Without explicit values ssh_config applies.
    let ep = resolve(config, "ssh://b");
    assert_eq!((ep.user.as_str(), ep.port), ("fromconfig", 2200));
    assert_eq!(
        ep.known_hosts_files[0],
        PathBuf::from("/home/alice/.ssh/kh_b")
    );

    // A pinned host key replaces the user known_hosts files (Nix's -oUserKnownHostsFile) and
    // forces strict checking.
    let spec = one(&format!("ssh://b - - - - - - {ED25519_B64}"));
    let ep = ssh_config(config).resolve(&spec, &env()).unwrap();
    assert_eq!(
        ep.pinned_host_key.as_ref().unwrap().openssh_line(),
        ED25519_LINE
    );
    assert_eq!(
        ep.known_hosts_files,
        paths(&["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"])
    );
    assert_eq!(ep.learn_known_hosts_file, None);
    assert_eq!(ep.strict, StrictPolicy::Yes);
}

#[test]
fn host_patterns_negation_and_wildcards() {
    let config = "\
        Host *.internal !bastion.internal\n  User internal\n\
        Host build? web\n  Port 2022\n\
        Host !nothing-else-here\n  ConnectTimeout 3\n\
        Host *\n  User default\n";
    assert_eq!(resolve(config, "ssh://db.internal").user, "internal");
    // The negated pattern excludes the block even though `*.internal` matches.
    assert_eq!(resolve(config, "ssh://bastion.internal").user, "default");
    assert_eq!(resolve(config, "ssh://build1").port, 2022);
    assert_eq!(resolve(config, "ssh://web").port, 2022);
    assert_eq!(resolve(config, "ssh://build12").port, 22);
    // A block with only a negated pattern never matches (nothing positive matched).
    assert_eq!(resolve(config, "ssh://anything").connect_timeout, None);
    // Patterns are matched against the name as written, case-sensitively.
    assert_eq!(resolve(config, "ssh://DB.internal").user, "internal");
    assert_eq!(resolve(config, "ssh://db.INTERNAL").user, "default");
}

#[test]
fn hostname_tokens_and_identity_expansion() {
    let config = "\
        Host b*\n\
        \x20 HostName %h.example.org\n\
        \x20 User remote\n\
        \x20 IdentityFile ~/.ssh/%h_%r_%u_%p\n\
        \x20 IdentityFile %d/keys/%n-%i-%l-%L-%%\n\
        \x20 IdentityFile none\n\
        \x20 UserKnownHostsFile ~/.ssh/kh1 %d/kh-%k\n\
        \x20 GlobalKnownHostsFile none\n";
    let ep = resolve(config, "ssh://b1:2200");
    assert_eq!(ep.host, "b1.example.org");
    assert_eq!(
        ep.identities,
        paths(&[
            "/home/alice/.ssh/b1.example.org_remote_alice_2200",
            "/home/alice/keys/b1-1000-client.example.org-client-%",
        ])
    );
    // `IdentityFile none` still counts as configured: no defaults.
    assert!(!ep.identities_are_defaults);
    assert_eq!(
        ep.known_hosts_files,
        paths(&["/home/alice/.ssh/kh1", "/home/alice/kh-b1"])
    );

    // Unknown tokens are errors naming the line, as in ssh.
    let e = ssh_config("Host *\n  IdentityFile ~/.ssh/%Q\n")
        .resolve(&url("ssh://h"), &env())
        .unwrap_err();
    assert!(
        e.to_string().contains("test_ssh_config:2: IdentityFile"),
        "{e}"
    );
    let e = ssh_config("HostName %p.x\n")
        .resolve(&url("ssh://h"), &env())
        .unwrap_err();
    assert!(matches!(e, ConfigError::Resolve { .. }), "{e}");
}

#[test]
fn known_hosts_alias_and_strict_values() {
    let ep = resolve(
        "HostKeyAlias Builder0\nUserKnownHostsFile none\n",
        "ssh://127.0.0.1",
    );
    assert_eq!(ep.host_key_alias.as_deref(), Some("builder0"));
    assert_eq!(ep.host_key_name(), "builder0");
    assert_eq!(
        ep.known_hosts_files,
        paths(&["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"])
    );
    assert_eq!(ep.learn_known_hosts_file, None);

    for (v, want) in [
        ("yes", StrictPolicy::Yes),
        ("true", StrictPolicy::Yes),
        ("accept-new", StrictPolicy::AcceptNew),
        ("ask", StrictPolicy::Ask),
        ("no", StrictPolicy::No),
        ("off", StrictPolicy::No),
        ("false", StrictPolicy::No),
        ("NO", StrictPolicy::No),
    ] {
        assert_eq!(
            resolve(&format!("StrictHostKeyChecking {v}"), "ssh://h").strict,
            want,
            "{v}"
        );
    }
    assert!(ssh_config_err("StrictHostKeyChecking sometimes").contains("test_ssh_config:1"));
    // Multiple files on one line; `none` must be alone.
    let ep = resolve("UserKnownHostsFile /a \"/b c\"\n", "ssh://h");
    assert_eq!(&ep.known_hosts_files[..2], &paths(&["/a", "/b c"])[..]);
    assert!(ssh_config_err("UserKnownHostsFile /a none").contains("must appear alone"));
}

#[test]
fn proxy_jump_chains() {
    let config = "\
        Host target\n  ProxyJump jumpuser@jump1:2201,[2001:db8::5]:2202,ssh://j3\n\
        Host jump1\n  HostName jump1.example.org\n  User ignored-because-explicit\n  IdentityFile ~/.ssh/jump1\n  ProxyJump outer\n\
        Host 2001:db8::5\n  User v6user\n  ProxyJump ignored-because-not-first\n\
        Host outer\n  HostName outer.example.org\n  Port 443\n\
        Host direct\n  ProxyJump none\n  ProxyJump ignored\n\
        Host *\n  User default\n";
    let ep = resolve(config, "ssh://target");
    let hops: Vec<String> = ep.proxy_jump.iter().map(|j| j.spec.to_string()).collect();
    // jump1's own ProxyJump is followed (it is started without -J); the others' are not.
    assert_eq!(
        hops,
        ["outer", "jumpuser@jump1:2201", "[2001:db8::5]:2202", "j3"]
    );
    let [outer, jump1, v6, j3] = &ep.proxy_jump[..] else {
        panic!()
    };
    assert_eq!(
        (
            outer.endpoint.host.as_str(),
            outer.endpoint.port,
            outer.endpoint.user.as_str()
        ),
        ("outer.example.org", 443, "default")
    );
    assert_eq!(
        (
            jump1.endpoint.host.as_str(),
            jump1.endpoint.port,
            jump1.endpoint.user.as_str()
        ),
        ("jump1.example.org", 2201, "jumpuser")
    );
    assert_eq!(
        jump1.endpoint.identities,
        paths(&["/home/alice/.ssh/jump1"])
    );
    assert_eq!(
        (
            v6.endpoint.host.as_str(),
            v6.endpoint.port,
            v6.endpoint.user.as_str()
        ),
        ("2001:db8::5", 2202, "v6user")
    );
    assert_eq!((j3.endpoint.host.as_str(), j3.endpoint.port), ("j3", 22));
    assert!(
        ep.proxy_jump
            .iter()
            .all(|j| j.endpoint.proxy_jump.is_empty())
    );
    // The target itself.
    assert_eq!((ep.host.as_str(), ep.user.as_str()), ("target", "default"));

    // `ProxyJump none` takes the slot: a later ProxyJump is ignored.
    assert!(resolve(config, "ssh://direct").proxy_jump.is_empty());
    // Explicit URL values do not touch the jump hosts.
    let ep = resolve(config, "ssh://root@target:2222");
    assert_eq!(ep.proxy_jump[1].endpoint.user, "jumpuser");
    assert_eq!((ep.user.as_str(), ep.port), ("root", 2222));
}

#[test]
fn proxy_command_and_loops() {
    // ProxyCommand first: unsupported, a clear error naming the line.
    let e = ssh_config("Host h\n  ProxyCommand nc %h %p\n  ProxyJump j\n")
        .resolve(&url("ssh://h"), &env())
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("test_ssh_config:2: ProxyCommand `nc %h %p` is not supported"),
        "{e}"
    );
    // ProxyJump first: ProxyCommand is ignored.
    let ep = resolve(
        "Host h\n  ProxyJump j\n  ProxyCommand nc %h %p\n",
        "ssh://h",
    );
    assert_eq!(ep.proxy_jump.len(), 1);
    // `ProxyJump none` leaves ProxyCommand's slot open (OpenSSH keeps two slots)...
    assert!(
        ssh_config("ProxyJump none\nProxyCommand nc %h %p\n")
            .resolve(&url("ssh://h"), &env())
            .is_err()
    );
    // ...and `ProxyCommand none` means direct.
    assert!(
        resolve("ProxyCommand none\nProxyJump j\n", "ssh://h")
            .proxy_jump
            .is_empty()
    );

    // Jump hosts that jump through each other.
    let e = ssh_config("Host a\n  ProxyJump b\nHost b\n  ProxyJump a\nHost t\n  ProxyJump a\n")
        .resolve(&url("ssh://t"), &env())
        .unwrap_err();
    assert!(e.to_string().contains("does it loop"), "{e}");

    // Syntax errors.
    assert!(ssh_config_err("ProxyJump a,,b").contains("Invalid ProxyJump"));
    assert!(ssh_config_err("ProxyJump h:0").contains("bad port"));
    assert_eq!(
        JumpSpec::parse(" u@h:2 ").unwrap(),
        JumpSpec {
            user: Some("u".into()),
            host: "h".into(),
            port: Some(2)
        }
    );
    assert_eq!(JumpSpec::parse("ssh://[::1]").unwrap().host, "::1");
    assert!(JumpSpec::parse("@h").is_err());
}

#[test]
fn line_syntax() {
    let config = "\
        \t# comment\n\
        HOST=h\n\
        \x20 hostname = H.Example.Org # trailing comment\n\
        \x20 user=\"a user\"\n\
        \x20 PORT  2200\n\
        \x20 IdentityFile \"/path with/spaces\"\n\
        \x20 IdentityFile /path\\ escaped\n\
        \x20 UnknownKeyword whatever\n\
        \x20 ConnectTimeout none\n\
        \x20 ConnectTimeout 1m30s\n\
        \x20 ServerAliveInterval 0\n\r\n";
    let ep = resolve(config, "ssh://h");
    assert_eq!(ep.host, "h.example.org");
    assert_eq!(ep.user, "a user");
    assert_eq!(ep.port, 2200);
    assert_eq!(
        ep.identities,
        paths(&["/path with/spaces", "/path escaped"])
    );
    // `none` sets nothing, so the later value applies (OpenSSH stores -1, i.e. unset).
    assert_eq!(ep.connect_timeout, Some(Duration::from_secs(90)));
    // ServerAliveInterval 0 disables keepalives.
    assert_eq!(ep.keepalive.interval, None);

    for (bad, what) in [
        ("Port 0", "Bad port"),
        ("Port ssh-alt", "Bad port"),
        ("User", "no argument"),
        ("User a b", "extra arguments"),
        ("HostName \"unterminated", "invalid quotes"),
        ("IdentitiesOnly maybe", "IdentitiesOnly"),
        ("ConnectTimeout 5x", "invalid time"),
        ("ServerAliveCountMax -1", "ServerAliveCountMax"),
    ] {
        let e = ssh_config_err(&format!("Host h\n{bad}\n"));
        assert!(e.starts_with("test_ssh_config:2: "), "{bad}: {e}");
        assert!(e.contains(what), "{bad}: {e}");
    }
}

#[test]
fn match_blocks_are_skipped_with_a_warning() {
    let config = "\
        Match host h exec \"true\"\n  User from-match\n\
        Match all\n  Port 2200\n\
        Host h\n  User from-host\n";
    let ep = resolve(config, "ssh://h");
    assert_eq!(ep.user, "from-host");
    assert_eq!(ep.port, 2200);
    assert_eq!(ep.warnings.len(), 1);
    assert!(
        ep.warnings[0].starts_with("test_ssh_config:1: `Match host h exec true` is not supported"),
        "{:?}",
        ep.warnings
    );
}

fn fixture_env() -> LocalEnv {
    LocalEnv {
        home: data("home"),
        ..env()
    }
}

#[test]
fn include_globs_and_block_state() {
    let env = fixture_env();
    let config = SshConfig::load_file(&data("home/.ssh/config"), &env).unwrap();

    // `Include config.d/*.conf` is relative to ~/.ssh, sorted, without dot files or other
    // suffixes; the first file's HostName wins, the second still adds Port.
    let ep = config.resolve(&url("ssh://globbed"), &env).unwrap();
    assert_eq!(ep.host, "first.example.org");
    assert_eq!(ep.port, 2020);
    assert_eq!(ep.user, "alice");
    assert_eq!(ep.keepalive.interval, Some(Duration::from_secs(15)));

    // An Include inside a `Host builder1` block: its lines apply to builder1 until its own
    // `Host` line switches blocks; after it the including block continues (Port 2201).
    let ep = config.resolve(&url("ssh://builder1"), &env).unwrap();
    assert_eq!(
        (ep.host.as_str(), ep.port, ep.user.as_str()),
        ("10.0.0.1", 2201, "alice")
    );

    // For any other host the include contributes nothing, even its own `Host` blocks.
    let ep = config
        .resolve(&url("ssh://other-in-include"), &env)
        .unwrap();
    assert_eq!(ep.user, "alice");

    let ep = config.resolve(&url("ssh://jumpbox"), &env).unwrap();
    assert_eq!(ep.user, "jumper");

    // load_default reads ~/.ssh/config (and /etc/ssh/ssh_config, if present, after it).
    let config = SshConfig::load_default(&env).unwrap();
    assert_eq!(
        config.resolve(&url("ssh://builder1"), &env).unwrap().port,
        2201
    );

    // -F with a missing file is an error; a missing default file is not.
    assert!(SshConfig::load_file(&data("home/.ssh/nope"), &env).is_err());
    let nohome = LocalEnv {
        home: PathBuf::from("/nonexistent"),
        ..env
    };
    assert!(SshConfig::load_default(&nohome).is_ok());
}

#[test]
fn include_errors() {
    let e = SshConfig::parse_str(
        "Include ~/.ssh/x\n",
        Path::new("/etc/ssh/ssh_config"),
        ConfigKind::System,
        &env(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("/etc/ssh/ssh_config:1: bad include path"),
        "{e}"
    );
    // A file including itself.
    let env = fixture_env();
    let e = SshConfig::parse_str(
        "Include ~/.ssh/config\nInclude config\n",
        Path::new("x"),
        ConfigKind::User,
        &env,
    );
    // ~/.ssh/config does not include itself, so this is fine...
    assert!(e.is_ok());
    // ...but a loop is reported.
    let home = std::env::temp_dir().join(format!("nixmux-config-test-{}", std::process::id()));
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(home.join(".ssh/loop"), "Include loop\n").unwrap();
    let loop_env = LocalEnv {
        home: home.clone(),
        ..env
    };
    let e = SshConfig::load_file(&home.join(".ssh/loop"), &loop_env);
    std::fs::remove_dir_all(&home).unwrap();
    assert!(matches!(e, Err(ConfigError::IncludeLoop { .. })), "{e:?}");
}

#[test]
fn rig_ssh_config_for_unmodified_nix() {
    // What rig/src/rig.rs writes for `NIX_SSHOPTS="-F <rig>/ssh_config"`, with the matching
    // machines-ssh-config line.
    let config = "\
        # nixmux-rig: OpenSSH client config for the builders; use with `ssh -F <this file>`.\n\
        \n\
        Host builder0\n\
        \x20 HostName 127.0.0.1\n\
        \x20 Port 40001\n\
        \x20 User root\n\
        \x20 IdentityFile /tmp/rig/client_key\n\
        \x20 IdentitiesOnly yes\n\
        \x20 UserKnownHostsFile /tmp/rig/known_hosts\n\
        \x20 GlobalKnownHostsFile /dev/null\n\
        \x20 HostKeyAlias builder0\n\
        \x20 StrictHostKeyChecking yes\n\
        \x20 UpdateHostKeys no\n\
        \x20 BatchMode yes\n";
    let spec = one(&format!(
        "ssh-ng://root@builder0 x86_64-linux /tmp/rig/client_key 4 1 - - {ED25519_B64}"
    ));
    let ep = ssh_config(config).resolve(&spec, &env()).unwrap();
    assert_eq!(
        (ep.host.as_str(), ep.port, ep.user.as_str()),
        ("127.0.0.1", 40001, "root")
    );
    assert_eq!(ep.identities, paths(&["/tmp/rig/client_key"]));
    assert!(ep.identities_only);
    assert_eq!(ep.host_key_name(), "builder0");
    // The pin replaces UserKnownHostsFile, as Nix's -oUserKnownHostsFile does.
    assert_eq!(ep.known_hosts_files, paths(&["/dev/null"]));
    assert_eq!(ep.strict, StrictPolicy::Yes);

    // Without the pin, the rig's known_hosts is used.
    let spec = url("ssh-ng://root@builder0");
    let ep = ssh_config(config).resolve(&spec, &env()).unwrap();
    assert_eq!(
        ep.known_hosts_files,
        paths(&["/tmp/rig/known_hosts", "/dev/null"])
    );
    assert!(ssh_config(config).host_options("builder0").proxy.is_none());
}

#[test]
fn host_options_are_plain_data() {
    let o = ssh_config("Host a\n  ProxyJump x,y\n  HostName b\n").host_options("a");
    assert_eq!(o.hostname.as_ref().unwrap().value, "b");
    assert_eq!(o.hostname.as_ref().unwrap().location.line, 3);
    assert!(matches!(&o.proxy.as_ref().unwrap().value, ProxySetting::Jump(c) if c.len() == 2));
    assert_eq!(
        ssh_config("Host a\n  User u\n").host_options("b"),
        Default::default()
    );
}

// ---------------------------------------------------------------------------------------

fn b64(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let n = chunk.iter().fold(0u32, |a, b| a << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

#[test]
fn nix_sshopts_command_line() {
    let cmd = SshCommandLine::from_nix_sshopts(
        "-F tests/data/config/rig-ssh-config -oUser=optuser -p2300 -i '/k with space' -xaC \
         -J j1 -v -L 1:h:2 -o 'StrictHostKeyChecking accept-new'",
    )
    .unwrap();
    assert_eq!(cmd.config_file, Some(data("rig-ssh-config")));
    assert_eq!(
        cmd.options,
        [
            "User=optuser",
            "Port \"2300\"",
            "IdentityFile \"/k with space\"",
            "Compression yes",
            "ProxyJump j1",
            "StrictHostKeyChecking accept-new",
        ]
    );
    assert_eq!(cmd.ignored, ["-x", "-a", "-v", "-L 1:h:2"]);

    // Options win over the -F file; explicit URL / machines values win over both.
    let config = SshConfig::load(&cmd, &env()).unwrap();
    let ep = config.resolve(&url("ssh-ng://builder0"), &env()).unwrap();
    assert_eq!(
        (ep.host.as_str(), ep.port, ep.user.as_str()),
        ("127.0.0.1", 2300, "optuser")
    );
    assert_eq!(
        ep.identities,
        paths(&["/k with space", "/tmp/rig/client_key"])
    );
    assert_eq!(ep.strict, StrictPolicy::AcceptNew);
    assert!(ep.compress);
    let hops: Vec<String> = ep.proxy_jump.iter().map(|j| j.spec.to_string()).collect();
    assert_eq!(hops, ["j1"]);
    // The outer ssh's -o/-l/-p/-i do not reach the ssh run for the hop (only -F does).
    assert_eq!(
        (
            ep.proxy_jump[0].endpoint.user.as_str(),
            ep.proxy_jump[0].endpoint.port
        ),
        ("alice", 22)
    );
    let spec = one("ssh-ng://root@builder0:40002 - /machine/key");
    let ep = config.resolve(&spec, &env()).unwrap();
    assert_eq!((ep.port, ep.user.as_str()), (40002, "root"));
    assert_eq!(ep.identities[0], PathBuf::from("/machine/key"));

    // Without options the file's values apply; `-F none` reads nothing.
    let cmd = SshCommandLine::from_nix_sshopts("-F tests/data/config/rig-ssh-config").unwrap();
    let ep = SshConfig::load(&cmd, &env())
        .unwrap()
        .resolve(&url("ssh://builder0"), &env())
        .unwrap();
    assert_eq!(
        (ep.port, ep.user.as_str(), ep.strict),
        (40001, "root", StrictPolicy::Yes)
    );
    assert_eq!(ep.proxy_jump[0].spec.host, "file-jump");
    let none = SshCommandLine::from_nix_sshopts("-F none -l bob").unwrap();
    let ep = SshConfig::load(&none, &env())
        .unwrap()
        .resolve(&url("ssh://builder0"), &env())
        .unwrap();
    assert_eq!(
        (ep.host.as_str(), ep.port, ep.user.as_str()),
        ("builder0", 22, "bob")
    );

    // Errors.
    for (bad, what) in [
        ("-p", "needs an argument"),
        ("host", "unexpected argument"),
        ("-o 'unterminated", "unterminated quote"),
    ] {
        let e = SshCommandLine::from_nix_sshopts(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{bad}: {e}");
    }
    let host_opt = SshCommandLine::from_nix_sshopts("-oHost=x").unwrap();
    let e = SshConfig::load(&host_opt, &env()).unwrap_err().to_string();
    assert!(e.contains("not supported as a command-line option"), "{e}");
    let bad_port = SshCommandLine::from_nix_sshopts("-p 0").unwrap();
    assert!(
        SshConfig::load(&bad_port, &env())
            .unwrap_err()
            .to_string()
            .contains("Bad port")
    );
    assert_eq!(
        SshCommandLine::from_nix_sshopts("").unwrap(),
        SshCommandLine::default()
    );
}

#[test]
fn local_env_of_this_process() {
    let e = LocalEnv::current().unwrap();
    assert!(!e.user.is_empty());
    assert!(e.home.is_absolute(), "{e:?}");
    assert!(!e.hostname.is_empty());
}
