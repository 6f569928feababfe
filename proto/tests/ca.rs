//! Content-addressed derivations against what Nix 2.8.0 computed for the same files: the
//! realisation ids `nix realisation info --json` printed, the resolved derivations Nix wrote
//! (`tests/data/ca/`, see `tests/data/PROVENANCE.md`), and the output paths of the
//! input-addressed derivations of `tests/data/drv/` (an input-addressed output path is made
//! from the masked hash modulo, so recomputing it checks the hash).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use nixmux_proto::Limits;
use nixmux_proto::ca::{
    self, CaError, DrvHash, DrvType, as_derivation, downstream_placeholder, drv_output_id,
    drv_type, hash_derivation_modulo, hash_placeholder, make_output_path, resolve,
    static_output_hashes,
};
use nixmux_proto::derivation::Derivation;
use nixmux_proto::store_path::{StoreDir, StorePath};

fn dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(sub)
}

/// Every `.drv` of a data directory, by store path.
fn drvs(sub: &str) -> BTreeMap<StorePath, (Derivation, Vec<u8>)> {
    std::fs::read_dir(dir(sub))
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "drv"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            let bytes = std::fs::read(&p).expect("read");
            let drv =
                Derivation::parse(&bytes, &StoreDir::default(), &Limits::DEFAULT).expect("parse");
            (
                StorePath::from_base_name(&name).expect("name"),
                (drv, bytes),
            )
        })
        .collect()
}

fn sp(base: &str) -> StorePath {
    StorePath::from_base_name(base).expect("store path")
}

/// The unmasked hash modulo of `path` and of all its input derivations (`pathDerivationModulo`).
fn hash_of(
    all: &BTreeMap<StorePath, (Derivation, Vec<u8>)>,
    path: &StorePath,
    memo: &mut BTreeMap<StorePath, DrvHash>,
) -> Option<DrvHash> {
    if let Some(h) = memo.get(path) {
        return Some(h.clone());
    }
    let (drv, _) = all.get(path)?;
    for input in drv.input_drvs.keys() {
        let h = hash_of(all, input, memo)?;
        memo.insert(input.clone(), h);
    }
    hash_derivation_modulo(drv, &StoreDir::default(), false, memo).ok()
}

fn ids(all: &BTreeMap<StorePath, (Derivation, Vec<u8>)>, path: &StorePath) -> Vec<String> {
    let mut memo = BTreeMap::new();
    let (drv, _) = &all[path];
    for input in drv.input_drvs.keys() {
        let h = hash_of(all, input, &mut memo).expect("inputs present");
        memo.insert(input.clone(), h);
    }
    static_output_hashes(drv, &StoreDir::default(), &memo)
        .expect("hashes")
        .iter()
        .map(|(o, h)| drv_output_id(h, o).to_old_string().expect("old form"))
        .collect()
}

const A: &str = "phz6gb3z702vw8mvlf9f4minjikq3f46-ca-a.drv";
const B: &str = "ibj881gvg1v4w22z2vcdp2km3fc6n3ac-ca-b.drv";
const B_RESOLVED: &str = "y64c4fkfnh2ix4wyiwp79akyba1z4qxj-ca-b.drv";
const C: &str = "c473r7n6rpk3c0zkg1p8k26p52y1ywh7-ca-c.drv";
const C_RESOLVED: &str = "x822jxy48pzvnb09jqy3kdj73piv0q3b-ca-c.drv";
const A_OUT: &str = "am5yjypfvcnvhkbk29lmvchax7dd7f23-ca-a";
const B_OUT: &str = "2ll7b4xpid5gif80vrmpsn3j86bvgc9m-ca-b";

#[test]
fn realisation_ids_match_nix() {
    let all = drvs("ca");
    // From `nix realisation info --json` after Nix 2.8.0 built `c` locally.
    let expected = [
        (
            A,
            "sha256:1a1f803a04cf430e15ac9101b4d6b0493143969de089930de9ebe4f19d613df7!out",
        ),
        (
            B,
            "sha256:0c47599ff3e8683c8ee47f70470dbc7caf18bc1c565d31ca9936f2a959568dad!out",
        ),
        (
            B_RESOLVED,
            "sha256:07a939212d29c456f559555d1145d13ef27c315390614b231665a1ae9977f1fd!out",
        ),
        (
            C,
            "sha256:9ca070ff5d6da16d2b6f1ae8ab10602777895fbc8111293fc253980047615665!out",
        ),
        (
            C_RESOLVED,
            "sha256:643d146ad359ac45fdb30f93d43f20f20a9ffa6f0ccfb2eda0fea4cf44dbed25!out",
        ),
    ];
    for (drv, id) in expected {
        assert_eq!(ids(&all, &sp(drv)), vec![id.to_owned()], "{drv}");
    }
}

#[test]
fn types_and_placeholders() {
    let all = drvs("ca");
    let ty = |p: &str| drv_type(&all[&sp(p)].0.outputs).expect("type");
    assert_eq!(ty(A), DrvType::Floating);
    assert_eq!(ty(B), DrvType::Floating);
    assert_eq!(ty(C), DrvType::InputAddressed { deferred: true });
    assert_eq!(ty(C_RESOLVED), DrvType::InputAddressed { deferred: false });
    assert!(!ty(A).needs_resolution(&all[&sp(A)].0), "no inputs");
    assert!(ty(B).needs_resolution(&all[&sp(B)].0));
    assert!(ty(C).needs_resolution(&all[&sp(C)].0));
    // The `out` variable of a floating derivation holds its own placeholder.
    assert_eq!(all[&sp(A)].0.env["out"], hash_placeholder("out"));
    // B's builder arguments hold A's downstream placeholder.
    let ph = downstream_placeholder(&sp(A), "out");
    assert!(all[&sp(B)].0.args[1].contains(&ph), "{ph}");
}

#[test]
fn resolution_matches_the_derivations_nix_wrote() {
    let all = drvs("ca");
    let d = StoreDir::default();
    let cases = [(B, A, A_OUT, B_RESOLVED), (C, B, B_OUT, C_RESOLVED)];
    for (drv, input, out, expected) in cases {
        let map = BTreeMap::from([((sp(input), "out".to_owned()), sp(out))]);
        let resolved = resolve(&all[&sp(drv)].0, &sp(drv), &d, &map).expect("resolves");
        let text = as_derivation(&resolved).to_aterm(&d);
        assert_eq!(
            text.as_bytes(),
            all[&sp(expected)].1.as_slice(),
            "{drv} resolves to {expected}"
        );
    }
    // A missing input output is an error, not a half-resolved derivation.
    let err = resolve(&all[&sp(B)].0, &sp(B), &d, &BTreeMap::new()).expect_err("unresolved");
    assert!(matches!(err, CaError::Unresolved { .. }), "{err}");
}

#[test]
fn input_addressed_output_paths_follow_from_the_hash_modulo() {
    // Every input-addressed derivation of tests/data/drv whose inputs are there too: its output
    // paths are `makeOutputPath` of its masked hash modulo.
    let all = drvs("drv");
    let d = StoreDir::default();
    let mut checked = 0;
    for (path, (drv, _)) in &all {
        if drv_type(&drv.outputs) != Ok(DrvType::InputAddressed { deferred: false }) {
            continue;
        }
        let mut memo = BTreeMap::new();
        let mut complete = true;
        for input in drv.input_drvs.keys() {
            match hash_of(&all, input, &mut memo) {
                Some(h) => {
                    memo.insert(input.clone(), h);
                }
                None => complete = false,
            }
        }
        if !complete {
            continue;
        }
        let hashes = static_output_hashes(drv, &d, &memo).expect("hashes");
        for (name, out) in &drv.outputs {
            let made = make_output_path(&d, name, &hashes[name], ca::drv_name(path)).expect("path");
            assert_eq!(Some(&made), out.path.as_ref(), "{path} output {name}");
        }
        checked += 1;
    }
    // Plain, multi-output, with fixed-output and input-addressed inputs, escapes, ...
    assert!(checked >= 8, "only {checked} derivations checked");
    let inputs: BTreeSet<_> = all
        .values()
        .flat_map(|(d, _)| d.input_drvs.keys())
        .collect();
    assert!(!inputs.is_empty());
}

#[test]
fn impure_derivations_are_refused() {
    let all = drvs("drv");
    let (path, (drv, _)) = all
        .iter()
        .find(|(p, _)| p.name().ends_with("impure.drv"))
        .expect("sample");
    let err = hash_derivation_modulo(drv, &StoreDir::default(), true, &BTreeMap::new())
        .expect_err(&path.to_string());
    assert_eq!(err, CaError::Impure);
}

#[test]
fn query_derivation_output_map_round_trips() {
    use nixmux_proto::ProtocolVersion;
    use nixmux_proto::wire::try_decode;
    use nixmux_proto::worker::{
        Negotiated, Op, Request, read_derivation_output_map, write_derivation_output_map,
    };
    let d = StoreDir::default();
    let n = Negotiated::new(ProtocolVersion::new(1, 34));
    let req = Request::QueryDerivationOutputMap { path: sp(B) };
    n.check_request(&req).expect("op 41 exists at 1.34");
    let mut buf = Vec::new();
    req.write(&mut buf, &d, &n);
    // Op 41, then the path as a string: what RemoteStore::queryPartialDerivationOutputMap sends.
    assert_eq!(buf[..8], 41u64.to_le_bytes());
    let (back, used) = try_decode(&buf, &Limits::DEFAULT, |r| Request::read(r, &d, &n))
        .expect("decodes")
        .expect("complete");
    assert_eq!((back.op(), used), (Op::QueryDerivationOutputMap, buf.len()));
    assert_eq!(back, req);
    // An unknown path is the empty string.
    let map = BTreeMap::from([
        ("out".to_owned(), Some(sp(B_OUT))),
        ("dev".to_owned(), None),
    ]);
    let mut reply = Vec::new();
    write_derivation_output_map(&mut reply, &d, &map);
    let (got, _) = try_decode(&reply, &Limits::DEFAULT, |r| {
        read_derivation_output_map(r, &d)
    })
    .expect("decodes")
    .expect("complete");
    assert_eq!(got, map);
    assert!(
        Negotiated::new(ProtocolVersion::new(1, 21))
            .check_request(&Request::QueryDerivationOutputMap { path: sp(B) })
            .is_err(),
        "not before 1.22"
    );
}
