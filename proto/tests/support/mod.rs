//! Strategies and the table of every decoder, shared by the property-test binaries. Not every
//! binary uses every item.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nixmux_proto::build_result::{
    BuildResult, BuildStatus, BuiltOutput, OutputsEncoding, ResultLayout,
};
use nixmux_proto::derivation::{BasicDerivation, Derivation, DerivationOutput};
use nixmux_proto::derived_path::{DerivedPath, OutputsSpec};
use nixmux_proto::hash::Hash;
use nixmux_proto::nar::NarParser;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve::{self, BuildOptions, ExportTrailer};
use nixmux_proto::store_path::{StoreDir, StorePath};
use nixmux_proto::wire::{ReadError, ReadResult, WireReader};
use nixmux_proto::worker::{
    self, ActivityResult, BuildMode, ClientOptions, DrvOutputId, FEATURE_REALISATION_WITH_PATH,
    Field, Missing, Negotiated, Realisation, RemoteError, StartActivity, StderrMsg,
};
use nixmux_proto::{Limits, ProtocolVersion};
use proptest::prelude::*;

pub fn dir() -> StoreDir {
    StoreDir::default()
}

// ===== strategies =====

pub fn arb_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9+_?=][a-zA-Z0-9+._?=-]{0,20}"
}

pub fn arb_store_path() -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), arb_name()).prop_map(|(h, n)| StorePath::new(h, n).expect("valid name"))
}

pub fn arb_drv_path() -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), arb_name())
        .prop_map(|(h, n)| StorePath::new(h, format!("{n}.drv")).expect("valid name"))
}

pub fn arb_paths(max: usize) -> impl Strategy<Value = BTreeSet<StorePath>> {
    prop::collection::btree_set(arb_store_path(), 0..max)
}

/// Any UTF-8 text (wire strings are bytes; these decoders read UTF-8 or lossy text).
pub fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        any::<String>().prop_map(|s| s.chars().take(30).collect()),
    ]
}

pub fn arb_hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash::sha256_from_bytes)
}

pub fn arb_sigs() -> impl Strategy<Value = BTreeSet<String>> {
    prop::collection::btree_set("[a-z.-]{1,12}:[A-Za-z0-9+/]{8,20}={0,2}", 0..3)
}

pub fn arb_ca() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        "(text|fixed|fixed:r):sha256:[0-9a-z]{52}".prop_map(Some),
    ]
}

pub fn arb_path_info() -> impl Strategy<Value = PathInfo> {
    (
        arb_store_path(),
        prop::option::of(arb_drv_path()),
        arb_hash(),
        arb_paths(4),
        0..=i64::MAX,
        any::<u64>(),
        any::<bool>(),
        arb_sigs(),
        arb_ca(),
    )
        .prop_map(
            |(
                path,
                deriver,
                nar_hash,
                references,
                registration_time,
                nar_size,
                ultimate,
                sigs,
                ca,
            )| {
                PathInfo {
                    path,
                    deriver,
                    nar_hash,
                    references,
                    registration_time,
                    nar_size,
                    ultimate,
                    sigs,
                    ca,
                }
            },
        )
}

pub fn arb_output_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,7}"
}

pub fn arb_derived_path() -> impl Strategy<Value = DerivedPath> {
    prop_oneof![
        arb_store_path().prop_map(DerivedPath::Opaque),
        (
            arb_drv_path(),
            prop_oneof![
                Just(OutputsSpec::All),
                prop::collection::btree_set(arb_output_name(), 1..4).prop_map(OutputsSpec::Names),
            ]
        )
            .prop_map(|(drv, outputs)| DerivedPath::Built { drv, outputs }),
    ]
}

/// Derived paths the legacy `StorePathWithOutputs` form can carry (not an opaque `.drv`).
pub fn arb_legacy_derived_path() -> impl Strategy<Value = DerivedPath> {
    arb_derived_path().prop_filter(
        "an opaque .drv has no legacy form",
        |p| !matches!(p, DerivedPath::Opaque(p) if p.is_derivation()),
    )
}

pub fn arb_status() -> impl Strategy<Value = BuildStatus> {
    prop_oneof![0u64..=14, 15u64..1000, any::<u64>()].prop_map(BuildStatus::from_code)
}

pub fn arb_duration() -> impl Strategy<Value = Option<Duration>> {
    prop::option::of((0..=i64::MAX as u64).prop_map(Duration::from_micros))
}

/// A build result as it travels with `layout`, with outputs in the form that encoding keeps.
pub fn arb_build_result(layout: ResultLayout) -> impl Strategy<Value = BuildResult> {
    let outputs = prop::collection::btree_map(
        arb_output_name(),
        (
            arb_store_path(),
            arb_sigs(),
            "[0-9a-f]{64}",
            prop::collection::btree_map("sha256:[0-9a-f]{8}![a-z]{1,4}", arb_store_path(), 0..2),
        ),
        0..3,
    );
    (
        arb_status(),
        arb_text(),
        any::<u64>(),
        any::<bool>(),
        0..=i64::MAX,
        0..=i64::MAX,
        arb_duration(),
        arb_duration(),
        outputs,
    )
        .prop_map(
            move |(status, error_msg, times_built, nondet, start, stop, cu, cs, outs)| {
                let mut r = BuildResult::failure(status, error_msg);
                if layout.times {
                    r.times_built = times_built;
                    r.is_non_deterministic = nondet;
                    r.start_time = start;
                    r.stop_time = stop;
                }
                if layout.cpu {
                    r.cpu_user = cu;
                    r.cpu_system = cs;
                }
                r.built_outputs = outs
                    .into_iter()
                    .filter_map(|(name, (path, signatures, hash, deps))| {
                        let o = match layout.outputs {
                            OutputsEncoding::Absent => return None,
                            OutputsEncoding::RealisationJson => BuiltOutput {
                                path,
                                signatures,
                                id: Some(format!("sha256:{hash}!{name}")),
                                dependent_realisations: deps
                                    .into_iter()
                                    .map(|(k, p)| (k, p.to_string()))
                                    .collect(),
                            },
                            OutputsEncoding::NameToPath => BuiltOutput {
                                path,
                                signatures,
                                id: None,
                                dependent_realisations: BTreeMap::new(),
                            },
                        };
                        Some((name, o))
                    })
                    .collect();
                r
            },
        )
}

pub fn arb_layout() -> impl Strategy<Value = ResultLayout> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![
            OutputsEncoding::Absent,
            OutputsEncoding::RealisationJson,
            OutputsEncoding::NameToPath,
        ]),
    )
        .prop_map(|(times, cpu, outputs)| ResultLayout {
            times,
            cpu,
            outputs,
        })
}

pub fn arb_basic_derivation() -> impl Strategy<Value = BasicDerivation> {
    let output = (
        prop::option::of(arb_store_path()),
        prop::sample::select(vec!["", "sha256", "r:sha256", "text:sha256"]),
        prop_oneof![
            Just(String::new()),
            "[0-9a-f]{64}",
            Just("impure".to_owned())
        ],
    )
        .prop_map(|(path, algo, hash)| DerivationOutput {
            path,
            hash_algo: algo.to_owned(),
            hash,
        });
    (
        prop::collection::btree_map(arb_output_name(), output, 0..3),
        arb_paths(3),
        arb_text(),
        arb_text(),
        prop::collection::vec(arb_text(), 0..3),
        prop::collection::btree_map(arb_text(), arb_text(), 0..4),
    )
        .prop_map(
            |(outputs, input_srcs, platform, builder, args, env)| BasicDerivation {
                outputs,
                input_srcs,
                platform,
                builder,
                args,
                env,
            },
        )
}

pub fn arb_build_options() -> impl Strategy<Value = BuildOptions> {
    (
        0..=u64::from(u32::MAX),
        0..=u64::from(u32::MAX),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(max_silent_time, build_timeout, max_log_size, keep_failed)| BuildOptions {
                max_silent_time,
                build_timeout,
                max_log_size,
                keep_failed,
            },
        )
}

pub fn arb_client_options() -> impl Strategy<Value = ClientOptions> {
    (
        any::<[bool; 4]>(),
        any::<[u64; 4]>(),
        any::<bool>(),
        prop::collection::btree_map("[a-z-]{1,20}", arb_text(), 0..4),
    )
        .prop_map(|(b, n, use_substitutes, overrides)| ClientOptions {
            keep_failed: b[0],
            keep_going: b[1],
            try_fallback: b[2],
            verbosity: n[0],
            max_build_jobs: n[1],
            max_silent_time: n[2],
            verbose_build: b[3],
            build_cores: n[3],
            use_substitutes,
            overrides,
        })
}

pub fn arb_mode() -> impl Strategy<Value = BuildMode> {
    prop::sample::select(vec![BuildMode::Normal, BuildMode::Repair, BuildMode::Check])
}

pub fn arb_old_id() -> impl Strategy<Value = DrvOutputId> {
    ("[0-9a-f]{64}", arb_output_name()).prop_map(|(h, output)| DrvOutputId::HashModulo {
        drv_hash: format!("sha256:{h}"),
        output,
    })
}

pub fn arb_path_id() -> impl Strategy<Value = DrvOutputId> {
    (arb_drv_path(), arb_output_name())
        .prop_map(|(drv_path, output)| DrvOutputId::Path { drv_path, output })
}

pub fn arb_realisation(
    id: impl Strategy<Value = DrvOutputId>,
) -> impl Strategy<Value = Realisation> {
    (id, arb_store_path(), arb_sigs()).prop_map(|(id, out_path, signatures)| Realisation {
        id,
        out_path,
        signatures,
    })
}

pub fn arb_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        any::<u64>().prop_map(Field::Int),
        arb_text().prop_map(Field::Str)
    ]
}

pub fn arb_stderr(v: ProtocolVersion) -> impl Strategy<Value = StderrMsg> {
    let structured = v.at_least(1, 26);
    let error = (
        any::<u64>(),
        arb_text(),
        any::<u64>(),
        prop::collection::vec(arb_text(), 0..3),
    )
        .prop_map(move |(level, message, status, traces)| {
            StderrMsg::Error(if structured {
                RemoteError {
                    level,
                    message,
                    exit_status: None,
                    traces,
                }
            } else {
                RemoteError {
                    level: 0,
                    message,
                    exit_status: Some(status),
                    traces: Vec::new(),
                }
            })
        });
    prop_oneof![
        arb_text().prop_map(StderrMsg::Next),
        any::<u64>().prop_map(StderrMsg::Read),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(StderrMsg::Write),
        Just(StderrMsg::Last),
        error,
        (
            any::<[u64; 4]>(),
            arb_text(),
            prop::collection::vec(arb_field(), 0..5)
        )
            .prop_map(|(n, text, fields)| StderrMsg::StartActivity(StartActivity {
                id: n[0],
                level: n[1],
                kind: n[2],
                text,
                fields,
                parent: n[3],
            })),
        any::<u64>().prop_map(StderrMsg::StopActivity),
        (any::<[u64; 2]>(), prop::collection::vec(arb_field(), 0..5)).prop_map(|(n, fields)| {
            StderrMsg::Result(ActivityResult {
                id: n[0],
                kind: n[1],
                fields,
            })
        }),
    ]
}

pub fn arb_missing() -> impl Strategy<Value = Missing> {
    (
        arb_paths(3),
        arb_paths(3),
        arb_paths(3),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(will_build, will_substitute, unknown, download_size, nar_size)| Missing {
                will_build,
                will_substitute,
                unknown,
                download_size,
                nar_size,
            },
        )
}

pub fn arb_export_trailer() -> impl Strategy<Value = ExportTrailer> {
    (
        arb_store_path(),
        arb_paths(4),
        prop::option::of(arb_drv_path()),
    )
        .prop_map(|(path, references, deriver)| ExportTrailer {
            path,
            references,
            deriver,
        })
}

/// Worker versions worth testing: every gate from the oldest we accept, and 1.38 with the
/// feature.
pub fn worker_versions() -> Vec<Negotiated> {
    let mut out: Vec<Negotiated> = [
        21u8, 22, 23, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38,
    ]
    .into_iter()
    .map(|m| Negotiated::new(ProtocolVersion::new(1, m)))
    .collect();
    let mut f = Negotiated::new(ProtocolVersion::new(1, 38));
    f.features.insert(FEATURE_REALISATION_WITH_PATH.to_owned());
    out.push(f);
    out
}

pub fn arb_negotiated() -> impl Strategy<Value = Negotiated> {
    prop::sample::select(worker_versions())
}

pub fn arb_serve_version() -> impl Strategy<Value = ProtocolVersion> {
    (0u8..=8).prop_map(|m| ProtocolVersion::new(2, m))
}

// ===== every decoder =====

/// Runs `decode` on `data`, forcing the whole result to be built (and dropped).
pub fn run<T>(
    data: &[u8],
    limits: &Limits,
    decode: impl FnOnce(&mut WireReader<'_>) -> ReadResult<T>,
) -> ReadResult<T> {
    let mut r = WireReader::new(data, limits);
    decode(&mut r)
}

/// Outcome of one decoder on one input, without the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Value,
    Incomplete,
    Error(nixmux_proto::ProtoError),
}

fn outcome<T>(r: ReadResult<T>) -> Outcome {
    match r {
        Ok(v) => {
            drop(v);
            Outcome::Value
        }
        Err(ReadError::Incomplete { needed }) => {
            assert!(
                needed > 0,
                "an incomplete read must ask for at least one byte"
            );
            Outcome::Incomplete
        }
        Err(ReadError::Proto(e)) => Outcome::Error(e),
    }
}

/// Every decoder of the crate (both protocols, both sides) over `data`, at worker version `n`
/// and serve version `sv`. Returns each decoder's name and outcome.
pub fn decode_everything(
    data: &[u8],
    limits: &Limits,
    n: &Negotiated,
    sv: ProtocolVersion,
) -> Vec<(&'static str, Outcome)> {
    let d = dir();
    let v = n.version;
    let p = StorePath::new([0; 20], "p").expect("valid");
    let id = DrvOutputId::HashModulo {
        drv_hash: "sha256:00".into(),
        output: "out".into(),
    };
    let mut out = Vec::new();
    macro_rules! dec {
        ($name:expr, $f:expr) => {
            out.push(($name, outcome(run(data, limits, $f))));
        };
    }
    // serve, server side
    dec!("serve::read_client_hello", serve::read_client_hello);
    dec!("serve::Request::read", |r| serve::Request::read(r, &d, sv));
    dec!("serve::BuildOptions::read", |r| BuildOptions::read(r, sv));
    dec!("serve::read_export_item", serve::read_export_item);
    dec!(
        "serve::read_export_trailer",
        |r| serve::read_export_trailer(r, &d)
    );
    // serve, client side
    dec!("serve::read_server_hello", |r| serve::read_server_hello(
        r,
        serve::OUR_VERSION
    ));
    dec!("serve::read_path_set", |r| serve::read_path_set(r, &d));
    dec!("serve::read_path_infos", |r| serve::read_path_infos(r, &d));
    dec!("serve::read_ack", |r| serve::read_ack(r, "ack"));
    dec!(
        "serve::read_build_paths_reply",
        serve::read_build_paths_reply
    );
    dec!("serve::read_build_result", |r| serve::read_build_result(
        r, &d, sv
    ));
    // worker, server side
    dec!("worker::read_client_hello", worker::read_client_hello);
    dec!("worker::read_features", worker::read_features);
    dec!("worker::read_client_tail", |r| worker::read_client_tail(
        r, v
    ));
    dec!("worker::Request::read", |r| worker::Request::read(r, &d, n));
    dec!("worker::ClientOptions::read", |r| ClientOptions::read(r, v));
    dec!("worker::read_frame_header", worker::read_frame_header);
    dec!("worker::read_multiple_entry", |r| {
        worker::read_multiple_entry(r, &d)
    });
    // worker, client side
    dec!("worker::read_server_hello", |r| worker::read_server_hello(
        r,
        worker::OUR_VERSION
    ));
    dec!("worker::read_daemon_info", |r| worker::read_daemon_info(
        r, v
    ));
    dec!("worker::StderrMsg::read", |r| StderrMsg::read(r, v));
    dec!("worker::read_ack", |r| worker::read_ack(r, "ack"));
    dec!("worker::read_query_path_info", |r| {
        worker::read_query_path_info(r, &d, n, &p)
    });
    dec!("worker::read_opt_path", |r| worker::read_opt_path(r, &d));
    dec!("worker::read_path_set", |r| worker::read_path_set(r, &d));
    dec!("worker::read_missing", |r| worker::read_missing(r, &d));
    dec!("worker::read_build_result", |r| worker::read_build_result(
        r, &d, n
    ));
    dec!("worker::read_keyed_build_results", |r| {
        worker::read_keyed_build_results(r, &d, n)
    });
    dec!("worker::read_realisation", |r| worker::read_realisation(
        r, &d, n, &id
    ));
    // values
    dec!("PathInfo::read_worker_keyed", |r| {
        PathInfo::read_worker_keyed(r, &d, v)
    });
    dec!("PathInfo::read_serve_record", |r| {
        PathInfo::read_serve_record(r, &d, p.clone())
    });
    dec!("BasicDerivation::read", |r| BasicDerivation::read(r, &d));
    for layout in [
        ResultLayout {
            times: true,
            cpu: true,
            outputs: OutputsEncoding::RealisationJson,
        },
        ResultLayout {
            times: false,
            cpu: false,
            outputs: OutputsEncoding::NameToPath,
        },
    ] {
        dec!("BuildResult::read", |r| BuildResult::read(r, &d, layout));
    }
    // self-delimiting and whole-buffer parsers
    let mut nar = NarParser::new(*limits);
    out.push((
        "NarParser::feed",
        match nar.feed(data) {
            Ok(_) if nar.is_done() => Outcome::Value,
            Ok(_) => Outcome::Incomplete,
            Err(e) => Outcome::Error(e),
        },
    ));
    out.push((
        "Derivation::parse",
        match Derivation::parse(data, &d, limits) {
            Ok(_) => Outcome::Value,
            Err(e) => Outcome::Error(e),
        },
    ));
    out
}

/// Small limits, so that "too long" is reachable with short inputs.
pub const SMALL: Limits = Limits {
    max_string: 200,
    max_log_line: 200,
    max_list: 8,
    max_nar_name: 32,
    max_nar_target: 64,
    max_nar_depth: 4,
    max_nar_file: 1024,
    max_frame: 512,
    max_fields: 4,
};

/// Inputs built from words that matter to the decoders (magics, codes, small counts, huge
/// lengths) and short strings, which reach far deeper than uniform random bytes.
pub fn arb_wire_input() -> impl Strategy<Value = Vec<u8>> {
    let word = prop_oneof![
        4 => 0u64..16,
        1 => prop::sample::select(vec![
            0x390c_9deb_u64, 0x5452_eecb, 0x207, 0x6e69_7863, 0x6478_696f, 0x122, 0x126,
            0x6f6c_6d67, 0x6461_7461, 0x6461_7416, 0x616c_7473, 0x6378_7470, 0x5354_5254,
            0x5354_4f50, 0x5253_4c54, 0x4558_494e, 19, 26, 31, 36, 38, 39, 42, 43, 44, 46,
            100, 101, 104, 105, 1 << 20, 1 << 40, 1 << 63, u64::MAX,
        ]),
        1 => any::<u64>(),
    ]
    .prop_map(|w| w.to_le_bytes().to_vec());
    let string = prop_oneof![
        prop::sample::select(vec![
            "",
            "(",
            ")",
            "type",
            "regular",
            "directory",
            "symlink",
            "entry",
            "name",
            "node",
            "contents",
            "executable",
            "target",
            "nix-archive-1",
            "out",
            "Error",
            "*",
            "/nix/store/00000000000000000000000000000000-p",
            "/nix/store/00000000000000000000000000000000-p.drv",
            "/nix/store/00000000000000000000000000000000-p.drv!out",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000!out",
            "0000000000000000000000000000000000000000000000000000000000000000",
            "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            r#"{"id":"sha256:00!out","outPath":"00000000000000000000000000000000-p"}"#,
        ])
        .prop_map(str::to_owned),
        "[ -~]{0,12}",
    ]
    .prop_map(|s| {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b.resize(b.len() + (8 - s.len() % 8) % 8, 0);
        b
    });
    prop::collection::vec(prop_oneof![3 => word, 2 => string], 0..24)
        .prop_map(|parts| parts.concat())
}
