//! Findings of the fuzz campaign (docs/fuzzing.md), one test each. The raw input of each is
//! also kept in `fuzz/regressions/<target>/`, which `scripts/fuzz-build` replays through the
//! fuzz target's own checks; here the failing property is spelled out on the decoder itself.

use nixmux_proto::derived_path::{DerivedPath, OutputsSpec};
use nixmux_proto::serve::Request;
use nixmux_proto::store_path::{StoreDir, StorePath};
use nixmux_proto::wire::{WireReader, WireWrite};
use nixmux_proto::{Limits, ProtocolVersion};

const L: Limits = Limits::DEFAULT;

fn serve_request(bytes: &[u8], v: ProtocolVersion) -> (Request, usize) {
    let d = StoreDir::default();
    let mut r = WireReader::new(bytes, &L);
    let req = Request::read(&mut r, &d, v).expect("a whole, valid request");
    (req, r.position())
}

/// `serve_requests` (`fuzz/regressions/serve_requests/legacy-bang-non-drv`): in the legacy
/// `StorePathWithOutputs` form, `path!` with no output named was read as "every output of
/// `path`" even though `path` is not a `.drv`. That value re-encodes as the bare path, which
/// reads back as an opaque path: a `BuildPaths` request changed meaning on a round trip. Nix
/// 2.8 reads `path!` like the bare path (`parsePathWithOutputs` gives an empty output set,
/// `StorePathWithOutputs::toDerivedPath` makes that opaque unless the path is a `.drv`).
#[test]
fn legacy_bang_without_outputs_is_the_bare_path() {
    let d = StoreDir::default();
    let plain = "/nix/store/0xs5r8701k91sgcb65bmsjljz8rx1brb-cap-";
    let drv = "/nix/store/0xs5r8701k91sgcb65bmsjljz8rx1brb-cap.drv";
    let plain_path = StorePath::parse(&d, plain).expect("a store path");
    let drv_path = StorePath::parse(&d, drv).expect("a store path");

    let legacy = |s: &str| DerivedPath::parse(&d, s, true, "t").expect("parses");
    assert_eq!(
        legacy(&format!("{plain}!")),
        DerivedPath::Opaque(plain_path.clone())
    );
    assert_eq!(
        legacy(&format!("{drv}!")),
        DerivedPath::all_outputs(drv_path)
    );
    // Named outputs still make a built path, `.drv` or not (Nix allows both).
    assert_eq!(
        legacy(&format!("{plain}!out")),
        DerivedPath::Built {
            drv: plain_path.clone(),
            outputs: OutputsSpec::Names(["out".to_owned()].into()),
        }
    );
    // The worker form from 1.30 keeps `path!` as every output; it prints back as `path!*`.
    let worker = DerivedPath::parse(&d, &format!("{plain}!"), false, "t").expect("parses");
    assert_eq!(worker, DerivedPath::all_outputs(plain_path));
    assert_eq!(
        DerivedPath::parse(&d, &worker.to_wire(&d), false, "t").expect("parses"),
        worker
    );

    // The request the fuzzer built (serve 2.4, `BuildPaths` of `plain!`) now round-trips.
    let v = ProtocolVersion::new(2, 4);
    let mut bytes = Vec::new();
    bytes.put_word(6); // cmdBuildPaths
    bytes.put_str_list([format!("{plain}!")]);
    for _ in 0..5 {
        bytes.put_word(0); // maxSilentTime, buildTimeout, maxLogSize, nrRepeats, enforceDeterminism
    }
    let (req, used) = serve_request(&bytes, v);
    assert_eq!(used, bytes.len());
    let mut again = Vec::new();
    req.write(&mut again, &d, v);
    assert_eq!(serve_request(&again, v), (req, again.len()));
}

/// `serve_requests` (`fuzz/regressions/serve_requests/legacy-star-non-drv`), the same bug from
/// the encoder's side: `path!*` reads as every output of `path`, but for a `path` that is not a
/// `.drv` the legacy encoder wrote the bare path, which reads back as an opaque path. It now
/// keeps the `!*`; a bare `.drv` still means every output.
#[test]
fn legacy_every_output_of_a_non_drv_keeps_the_star() {
    let d = StoreDir::default();
    let plain = "/nix/store/0xs5r8701k91sgcb65bmsjljz8rx1brb-c7dr";
    let drv = "/nix/store/0xs5r8701k91sgcb65bmsjljz8rx1brb-c7dr.drv";
    let all_plain = DerivedPath::all_outputs(StorePath::parse(&d, plain).expect("a store path"));
    let all_drv = DerivedPath::all_outputs(StorePath::parse(&d, drv).expect("a store path"));

    assert_eq!(
        DerivedPath::parse(&d, &format!("{plain}!*"), true, "t").expect("parses"),
        all_plain
    );
    assert_eq!(all_plain.to_legacy_wire(&d), format!("{plain}!*"));
    assert_eq!(all_drv.to_legacy_wire(&d), drv);
    for p in [all_plain, all_drv] {
        assert_eq!(
            DerivedPath::parse(&d, &p.to_legacy_wire(&d), true, "t").expect("parses"),
            p
        );
    }

    // The request the fuzzer built: serve 2.4, `BuildPaths` of `plain!*`.
    let v = ProtocolVersion::new(2, 4);
    let mut bytes = Vec::new();
    bytes.put_word(6); // cmdBuildPaths
    bytes.put_str_list([format!("{plain}!*")]);
    for _ in 0..5 {
        bytes.put_word(0); // maxSilentTime, buildTimeout, maxLogSize, nrRepeats, enforceDeterminism
    }
    let (req, used) = serve_request(&bytes, v);
    assert_eq!(used, bytes.len());
    let mut again = Vec::new();
    req.write(&mut again, &d, v);
    assert_eq!(serve_request(&again, v), (req, again.len()));
}
