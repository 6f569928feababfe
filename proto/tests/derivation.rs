//! `.drv` files written by Nix 2.8.0's `nix-instantiate` (`tests/data/drv/`, see
//! `tests/data/PROVENANCE.md`) and the `BasicDerivation`s in the recorded build-hook
//! conversations (`tests/data/transcripts/nix-2.8.0/build-hook-ssh*/`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use nixmux_proto::derivation::{BasicDerivation, Derivation, DerivationOutput};
use nixmux_proto::store_path::{StoreDir, StorePath};
use nixmux_proto::wire::{WireWrite, try_decode, try_decode_hint};
use nixmux_proto::{Limits, ProtoError};
use proptest::prelude::*;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/drv")
}

fn drv_files() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(data_dir())
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "drv"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read"))
        })
        .collect();
    out.sort();
    out
}

fn load(suffix: &str) -> Derivation {
    let (_, bytes) = drv_files()
        .into_iter()
        .find(|(n, _)| n.ends_with(suffix))
        .expect("sample exists");
    Derivation::parse(&bytes, &StoreDir::default(), &Limits::DEFAULT).expect("parses")
}

fn sp(path: &str) -> StorePath {
    StorePath::parse(&StoreDir::default(), path).expect("valid store path")
}

#[test]
fn real_drv_files_round_trip_byte_identically() {
    let files = drv_files();
    assert_eq!(files.len(), 14);
    let dir = StoreDir::default();
    for (name, bytes) in files {
        // The file name is a valid store path name for a derivation.
        assert!(
            StorePath::from_base_name(&name)
                .expect("name")
                .is_derivation()
        );
        let drv = Derivation::parse(&bytes, &dir, &Limits::DEFAULT).expect(&name);
        assert_eq!(drv.to_aterm(&dir).as_bytes(), &bytes[..], "{name}");
        assert_eq!(
            drv.env.get("system").map(String::as_str),
            drv_platform(&drv)
        );
    }
}

fn drv_platform(drv: &Derivation) -> Option<&str> {
    // Structured-attrs derivations keep `system` inside `__json`.
    if drv.env.contains_key("__json") {
        None
    } else {
        Some(&drv.platform)
    }
}

#[test]
fn escapes_decode_to_the_nix_values() {
    let d = load("-escapes.drv");
    let env = |k: &str| d.env.get(k).map(String::as_str).expect(k);
    // The values exactly as written in tests/data/drv/drvs.nix.
    assert_eq!(env("quoted"), "she said \"hi\" and left");
    assert_eq!(
        env("multiline"),
        "line one\n  indented \"two\"\nback\\slash \\\\ double\n$dollar ${interp}\n"
    );
    assert_eq!(env("backslashes"), "\\ \\\\ \\n \\\" end\\");
    assert_eq!(env("controls"), "tab\tcr\rnl\nend");
    assert_eq!(env("unicode"), "ünïcödé ✓ 日本");
    assert_eq!(env("weird key\"\\"), "v");
    assert_eq!(env("empty"), "");
    assert_eq!(
        d.args,
        [
            "-c",
            "printf '%s\\n' \"$quoted\" > $out",
            "tab\there",
            "back\\slash",
            "cr\rlf\n"
        ]
    );
    assert!(d.input_drvs.is_empty() && d.input_srcs.is_empty());
}

#[test]
fn output_kinds() {
    let out = |d: &Derivation, n: &str| d.outputs.get(n).cloned().expect(n);

    let plain = load("-plain.drv");
    assert_eq!(plain.outputs.len(), 1);
    let o = out(&plain, "out");
    assert_eq!(
        o.path,
        Some(sp("/nix/store/91dkhdfrdzngb4m62zak427y2vpamanj-plain"))
    );
    assert_eq!((o.hash_algo.as_str(), o.hash.as_str()), ("", ""));
    assert!(!o.is_fixed());
    assert_eq!(plain.platform, "x86_64-linux");
    assert_eq!(plain.builder, "/bin/sh");

    let multi = load("-multi-out.drv");
    assert_eq!(
        multi.outputs.keys().collect::<Vec<_>>(),
        ["dev", "doc", "out"]
    );

    let flat = out(&load("-fixed-flat.drv"), "out");
    assert_eq!(flat.hash_algo, "sha256");
    assert_eq!(
        flat.hash,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert!(flat.is_fixed() && flat.path.is_some());

    // An SRI sha512 outputHash is stored as base16, with the "r:" method prefix.
    let rec = out(&load("-fixed-recursive.drv"), "out");
    assert_eq!(rec.hash_algo, "r:sha512");
    assert_eq!(rec.hash.len(), 128);

    assert_eq!(out(&load("-fixed-sha1.drv"), "out").hash_algo, "sha1");

    // Floating content-addressed: no path, an algorithm, no hash.
    let ca = out(&load("-floating-ca.drv"), "out");
    assert_eq!(
        ca,
        DerivationOutput {
            path: None,
            hash_algo: "r:sha256".into(),
            hash: String::new()
        }
    );
    assert!(!ca.is_fixed());

    let impure = out(&load("-impure.drv"), "out");
    assert_eq!(
        (
            &impure.path,
            impure.hash_algo.as_str(),
            impure.hash.as_str()
        ),
        (&None, "r:sha256", "impure")
    );
    assert!(!impure.is_fixed());
}

#[test]
fn inputs() {
    let d = load("-with-inputs.drv");
    let drvs: BTreeMap<StorePath, BTreeSet<String>> = [
        (
            sp("/nix/store/1lxzq45w6f4vz7wm77xkg9yiyxn0bx22-fixed-flat.drv"),
            ["out".to_owned()].into(),
        ),
        (
            sp("/nix/store/7zpb3g412b5laymhmin2vs03bsary11q-multi-out.drv"),
            ["dev".to_owned(), "out".to_owned()].into(),
        ),
        (
            sp("/nix/store/v17r5l1xbgiqdravaj0dra2js09d47h6-plain.drv"),
            ["out".to_owned()].into(),
        ),
    ]
    .into();
    assert_eq!(d.input_drvs, drvs);
    assert_eq!(
        d.input_srcs,
        [
            sp("/nix/store/lzqhjlq4wwd225ymyaz72xv38nz6vc2d-inline.txt"),
            sp("/nix/store/x0fn5n2pmr7zdxddpc45yicm1brk8rqr-src.txt"),
        ]
        .into()
    );
}

#[test]
fn other_store_dirs() {
    let (_, bytes) = drv_files()
        .into_iter()
        .find(|(n, _)| n.ends_with("-with-inputs.drv"))
        .expect("sample");
    let other = StoreDir::new("/gnu/store").expect("dir");
    assert!(Derivation::parse(&bytes, &other, &Limits::DEFAULT).is_err());
    let text = String::from_utf8(bytes).expect("utf8");
    let moved = text.replace("/nix/store/", "/gnu/store/");
    let d = Derivation::parse(moved.as_bytes(), &other, &Limits::DEFAULT).expect("parses");
    assert_eq!(d.to_aterm(&other), moved);
}

/// Locates `u64 command`, `str drvPath` in a recorded stream and returns the bytes after it.
fn after_build_derivation<'a>(stream: &'a [u8], command: u64, drv_path: &str) -> &'a [u8] {
    let mut needle = Vec::new();
    needle.put_word(command);
    needle.put_str(drv_path);
    let at = stream
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .expect("BuildDerivation request in the transcript");
    &stream[at + needle.len()..]
}

fn transcript(rel: &str) -> Option<Vec<u8>> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/transcripts/nix-2.8.0")
        .join(rel);
    Some(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

#[test]
fn transcripts_basic_derivations_round_trip() {
    let dir = StoreDir::default();
    let hook_one_drv = "/nix/store/akxqjz16gb1x3djqjinqdsz6jlkqfcn2-hook-one.drv";
    let hook_two_drv = "/nix/store/8hbpqnh0lyz7bvx6kk3bdi6hhi4l0a3s-hook-two.drv";
    let hook_src = sp("/nix/store/da3jygvvij1ybx9bjg7h0g0l8b9izvgw-hook-src");
    let hook_one_out = sp("/nix/store/ypxlbr0bv36m48fikx589dha0znvg6b0-hook-one");
    // (transcript, command, drv path, the drv file, the input closure the hook computed).
    let cases = [
        // serve protocol, command 8 BuildDerivation
        (
            "build-hook-ssh/build1-client-to-server.bin",
            8,
            hook_two_drv,
            "-hook-two.drv",
            BTreeSet::from([hook_src.clone(), hook_one_out.clone()]),
        ),
        // worker protocol, op 36 BuildDerivation
        (
            "build-hook-ssh-ng/build1-client-to-server.bin",
            36,
            hook_one_drv,
            "-hook-one.drv",
            BTreeSet::from([hook_src.clone()]),
        ),
        (
            "build-hook-ssh-ng/build2-client-to-server.bin",
            36,
            hook_two_drv,
            "-hook-two.drv",
            BTreeSet::from([hook_src.clone(), hook_one_out.clone()]),
        ),
    ];
    let mut seen = 0;
    for (file, command, drv_path, drv_file, closure) in cases {
        let Some(stream) = transcript(file) else {
            continue;
        };
        seen += 1;
        let rest = after_build_derivation(&stream, command, drv_path);
        let (basic, used) = try_decode(rest, &Limits::DEFAULT, |r| BasicDerivation::read(r, &dir))
            .expect("decodes")
            .expect("complete");
        let mut encoded = Vec::new();
        basic.write(&mut encoded, &dir);
        assert_eq!(encoded, &rest[..used], "{file}: re-encoding differs");

        // What we would send for the same derivation, from the .drv file Nix wrote locally.
        let ours = load(drv_file).to_basic(closure);
        assert_eq!(ours, basic, "{file}");
        let mut ours_bytes = Vec::new();
        ours.write(&mut ours_bytes, &dir);
        assert_eq!(ours_bytes, &rest[..used]);

        // Every truncation is "need more bytes", never an error.
        for cut in 0..used {
            let r = try_decode_hint(&rest[..cut], &Limits::DEFAULT, |r| {
                BasicDerivation::read(r, &dir)
            });
            assert!(
                matches!(r, Ok(Err(n)) if n > 0),
                "{file} cut at {cut}: {r:?}"
            );
        }
    }
    if seen > 0 {
        assert_eq!(seen, 3);
    }
}

#[test]
fn to_basic_keeps_sources_and_drops_input_drvs() {
    let d = load("-with-inputs.drv");
    let dep = sp("/nix/store/91dkhdfrdzngb4m62zak427y2vpamanj-plain");
    let b = d.to_basic(BTreeSet::from([dep.clone()]));
    assert!(b.input_srcs.contains(&dep));
    assert!(d.input_srcs.iter().all(|s| b.input_srcs.contains(s)));
    assert_eq!(b.input_srcs.len(), 3);
    assert_eq!(
        (&b.outputs, &b.platform, &b.builder, &b.args, &b.env),
        (&d.outputs, &d.platform, &d.builder, &d.args, &d.env)
    );
}

fn parse_err(s: &str) -> ProtoError {
    Derivation::parse(s.as_bytes(), &StoreDir::default(), &Limits::DEFAULT)
        .expect_err("must be rejected")
}

#[test]
fn malformed_drvs_are_errors() {
    let good = r#"Derive([("out","/nix/store/91dkhdfrdzngb4m62zak427y2vpamanj-plain","","")],[],[],"x86_64-linux","/bin/sh",["-c","x"],[("a","1"),("b","2")])"#;
    Derivation::parse(good.as_bytes(), &StoreDir::default(), &Limits::DEFAULT).expect("valid");
    // Every strict prefix is an error (a .drv is read whole), never a panic.
    for cut in 0..good.len() {
        parse_err(&good[..cut]);
    }
    for bad in [
        // whitespace
        good.replace("],[", "], ["),
        // trailing bytes
        format!("{good}\n"),
        // duplicate env key / output
        good.replace(r#"("b","2")"#, r#"("a","2")"#),
        good.replace(
            r#"("out","/nix/store/91dkhdfrdzngb4m62zak427y2vpamanj-plain","","")"#,
            r#"("out","","",""),("out","","","")"#,
        ),
        // not a store path / not in this store
        good.replace(
            "/nix/store/91dkhdfrdzngb4m62zak427y2vpamanj-plain",
            "/tmp/x",
        ),
        good.replace(
            "/nix/store/91dkhdfrdzngb4m62zak427y2vpamanj-plain",
            "/nix/store/91dkhdfrdzngb4m62zak427y2vpamanje-plain",
        ),
        // lists without commas, or with a leading comma (Nix 2.8.0 accepts both)
        good.replace(r#"["-c","x"]"#, r#"["-c""x"]"#),
        good.replace(r#"["-c","x"]"#, r#"[,"-c","x"]"#),
        good.replace(r#"["-c","x"]"#, r#"["-c","x",]"#),
        // wrong head
        good.replace("Derive(", "Derivation("),
        // missing field
        good.replace(r#""x86_64-linux","/bin/sh","#, r#""x86_64-linux","#),
    ] {
        parse_err(&bad);
    }
    // Not UTF-8.
    let mut bytes = good.as_bytes().to_vec();
    let at = good.find("x86_64").expect("platform");
    bytes[at] = 0xff;
    assert!(Derivation::parse(&bytes, &StoreDir::default(), &Limits::DEFAULT).is_err());

    // Limits: strings and lists.
    let tight = Limits {
        max_string: 5,
        ..Limits::DEFAULT
    };
    assert!(Derivation::parse(good.as_bytes(), &StoreDir::default(), &tight).is_err());
    let tight = Limits {
        max_list: 1,
        ..Limits::DEFAULT
    };
    let e = Derivation::parse(good.as_bytes(), &StoreDir::default(), &tight).expect_err("list");
    assert!(e.to_string().contains("exceeds the limit"), "{e}");
}

#[test]
fn unknown_escapes_decode_like_nix() {
    // Nix's parseString maps \x to x for any other x.
    let s = r#"Derive([],[],[],"p","a\qb\"c",[],[])"#;
    let d = Derivation::parse(s.as_bytes(), &StoreDir::default(), &Limits::DEFAULT).expect("ok");
    assert_eq!(d.builder, "aqb\"c");
    // Printed back in Nix's canonical spelling.
    assert_eq!(
        d.to_aterm(&StoreDir::default()),
        r#"Derive([],[],[],"p","aqb\"c",[],[])"#
    );
}

#[test]
fn wire_rejections() {
    let dir = StoreDir::default();
    let mut basic = load("-hook-one.drv").to_basic(BTreeSet::new());
    basic.outputs.clear();
    let mut no_outputs = Vec::new();
    basic.write(&mut no_outputs, &dir);
    // Duplicate output name: nOutputs 2, the same name twice, then the rest.
    let mut dup = Vec::new();
    dup.put_word(2);
    for _ in 0..2 {
        dup.put_str("out");
        dup.put_str("");
        dup.put_str("");
        dup.put_str("");
    }
    dup.extend_from_slice(&no_outputs[8..]);
    let mut single = Vec::new();
    single.put_word(1);
    for f in ["out", "", "", ""] {
        single.put_str(f);
    }
    single.extend_from_slice(&no_outputs[8..]);
    try_decode(&single, &Limits::DEFAULT, |r| {
        BasicDerivation::read(r, &dir)
    })
    .expect("one output is fine")
    .expect("complete");
    assert!(try_decode(&dup, &Limits::DEFAULT, |r| BasicDerivation::read(r, &dir)).is_err());
    // A count of 2^63 is refused before allocation.
    let mut huge = Vec::new();
    huge.put_word(1 << 63);
    assert!(try_decode(&huge, &Limits::DEFAULT, |r| BasicDerivation::read(r, &dir)).is_err());
}

fn arb_store_path() -> impl Strategy<Value = StorePath> {
    ("[0-9a-dfgh-np-sv-z]{32}", "[a-zA-Z0-9+._?=-]{0,20}")
        .prop_map(|(h, n)| StorePath::from_base_name(&format!("{h}-x{n}")).expect("valid"))
}

/// Text for fields Nix prints unescaped: no `"` or `\`.
fn plain_text() -> impl Strategy<Value = String> {
    "[^\"\\\\]{0,12}"
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,16}",
        prop::collection::vec(
            prop::sample::select(vec![
                '"', '\\', '\n', '\r', '\t', 'a', 'é', '(', ')', ',', '[', ']'
            ]),
            0..12
        )
        .prop_map(|v| v.into_iter().collect()),
    ]
}

fn arb_output() -> impl Strategy<Value = DerivationOutput> {
    (
        prop::option::of(arb_store_path()),
        plain_text(),
        plain_text(),
    )
        .prop_map(|(path, hash_algo, hash)| DerivationOutput {
            path,
            hash_algo,
            hash,
        })
}

fn arb_derivation() -> impl Strategy<Value = Derivation> {
    (
        prop::collection::btree_map(plain_text(), arb_output(), 0..4),
        prop::collection::btree_map(
            arb_store_path(),
            prop::collection::btree_set(plain_text(), 0..3),
            0..3,
        ),
        prop::collection::btree_set(arb_store_path(), 0..3),
        plain_text(),
        any_text(),
        prop::collection::vec(any_text(), 0..4),
        prop::collection::btree_map(any_text(), any_text(), 0..5),
    )
        .prop_map(
            |(outputs, input_drvs, input_srcs, platform, builder, args, env)| Derivation {
                outputs,
                input_drvs,
                input_srcs,
                platform,
                builder,
                args,
                env,
            },
        )
}

proptest! {
    #[test]
    fn aterm_round_trip(d in arb_derivation()) {
        let dir = StoreDir::default();
        let text = d.to_aterm(&dir);
        let back = Derivation::parse(text.as_bytes(), &dir, &Limits::DEFAULT).expect("parses");
        prop_assert_eq!(&back, &d);
        prop_assert_eq!(back.to_aterm(&dir), text);
    }

    #[test]
    fn wire_round_trip(d in arb_derivation(), closure in prop::collection::btree_set(arb_store_path(), 0..4)) {
        let dir = StoreDir::default();
        let basic = d.to_basic(closure);
        let mut bytes = Vec::new();
        basic.write(&mut bytes, &dir);
        let (back, used) = try_decode(&bytes, &Limits::DEFAULT, |r| BasicDerivation::read(r, &dir))
            .expect("decodes")
            .expect("complete");
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&back, &basic);
        // Any truncation asks for more bytes.
        let cut = bytes.len() / 2;
        prop_assert_eq!(try_decode(&bytes[..cut], &Limits::DEFAULT, |r| BasicDerivation::read(r, &dir)), Ok(None));
    }

    #[test]
    fn aterm_mutations_never_panic(
        d in arb_derivation(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = d.to_aterm(&StoreDir::default()).into_bytes();
        for (at, b) in &edits {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = *b;
            }
        }
        let _ = Derivation::parse(&bytes, &StoreDir::default(), &Limits::DEFAULT);
    }
}

/// Fields Nix prints without escapes (output names, paths, hash algorithms and hashes, input
/// derivation outputs, the platform) must not hold escape sequences: `to_aterm` prints them
/// raw, so `"` or `\` there used to print text that no longer parsed (found by the
/// `derivation` fuzz target). Escapes stay fine where Nix escapes (builder, args, env).
#[test]
fn escapes_in_raw_fields_are_refused() {
    let good = r#"Derive([("out","/nix/store/91dkhdfrdzngb4m62zak427y2vpamanj-plain","sha256","ab")],[("/nix/store/91dkhdfrdzngb4m62zak427y2vpamanj-plain.drv",["out"])],[],"x86_64-linux","/bin/\"sh\"",["-c","a\tb\\"],[("k\n","v\"")])"#;
    let d = Derivation::parse(good.as_bytes(), &StoreDir::default(), &Limits::DEFAULT)
        .expect("escapes where Nix escapes");
    assert_eq!(d.to_aterm(&StoreDir::default()), good);
    for (from, to) in [
        (r#"("out","/nix"#, r#"("o\"ut","/nix"#),
        (r#""sha256","ab""#, r#""sha\256","ab""#),
        (r#""sha256","ab""#, r#""sha256","a\":[\"b""#),
        (r#"["out"]"#, r#"["o\nut"]"#),
        (r#""x86_64-linux""#, r#""x86_64\-linux""#),
    ] {
        let bad = good.replacen(from, to, 1);
        assert_ne!(bad, good);
        let e = parse_err(&bad);
        assert!(e.to_string().contains("unescaped"), "{bad}: {e}");
    }
}
