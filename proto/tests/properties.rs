//! Encode-then-decode is the identity, for every message type of both protocols at every
//! version that gates a field (within what the version can carry: fields a version lacks are
//! checked to come back as their defaults). Each decode must consume exactly the encoded bytes,
//! and cutting the encoding short must say "need more bytes" with an honest hint.

mod support;

use std::collections::BTreeSet;

use nixmux_proto::build_result::{BuildResult, OutputsEncoding, ResultLayout};
use nixmux_proto::derived_path::DerivedPath;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve::{self, ExportItem};
use nixmux_proto::store_path::{put_store_path_set, read_store_path_set};
use nixmux_proto::wire::{ReadError, ReadResult, WireReader};
use nixmux_proto::worker::{self, BuildMode, DaemonInfo, Negotiated, StderrMsg, Trust};
use nixmux_proto::{Limits, ProtocolVersion};
use proptest::prelude::*;
use support::*;

const L: Limits = Limits::DEFAULT;

/// Decodes `bytes` completely with `decode`, then checks a spread of strict prefixes.
fn decode_exact<T: std::fmt::Debug>(
    bytes: &[u8],
    decode: impl Fn(&mut WireReader<'_>) -> ReadResult<T>,
) -> T {
    let mut r = WireReader::new(bytes, &L);
    let v = decode(&mut r).unwrap_or_else(|e| panic!("decode failed: {e:?}"));
    assert_eq!(r.position(), bytes.len(), "decoder left bytes: {v:?}");
    // At most ~24 cuts per message keeps the tests fast; always include the edges.
    let step = (bytes.len() / 24).max(1);
    let cuts = (0..bytes.len())
        .step_by(step)
        .chain([bytes.len().saturating_sub(1)]);
    for cut in cuts.filter(|&c| c < bytes.len()) {
        let mut r = WireReader::new(&bytes[..cut], &L);
        match decode(&mut r) {
            Err(ReadError::Incomplete { needed }) => {
                assert!(needed > 0 && cut + needed <= bytes.len(), "cut {cut}");
            }
            other => panic!("prefix of {} bytes of {}: {other:?}", cut, bytes.len()),
        }
    }
    v
}

fn enc(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    f(&mut out);
    out
}

/// What a path info keeps in the worker encoding at `v` (all of it from 1.16).
fn worker_view(info: &PathInfo, v: ProtocolVersion) -> PathInfo {
    if v.at_least(1, 16) {
        info.clone()
    } else {
        PathInfo {
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
            ..info.clone()
        }
    }
}

/// What a serve `QueryPathInfos` record keeps.
fn serve_view(info: &PathInfo) -> PathInfo {
    PathInfo {
        registration_time: 0,
        ultimate: false,
        ..info.clone()
    }
}

/// What a worker request keeps at `n`.
fn worker_request_view(req: &worker::Request, n: &Negotiated) -> worker::Request {
    use worker::Request as R;
    match req.clone() {
        R::QueryValidPaths { paths, substitute } => R::QueryValidPaths {
            paths,
            substitute: substitute && n.version.at_least(1, 27),
        },
        R::BuildPaths { targets, mode } => R::BuildPaths {
            targets,
            mode: if n.version.at_least(1, 15) {
                mode
            } else {
                BuildMode::Normal
            },
        },
        R::SetOptions(mut o) => {
            if !n.version.at_least(1, 12) {
                o.overrides.clear();
            }
            R::SetOptions(o)
        }
        R::RegisterDrvOutput(mut real) => {
            if !n.version.at_least(1, 31) && n.features.is_empty() {
                real.signatures.clear();
            }
            R::RegisterDrvOutput(real)
        }
        other => other,
    }
}

fn arb_worker_request(n: Negotiated) -> impl Strategy<Value = worker::Request> {
    use worker::Request as R;
    let legacy = !n.version.at_least(1, 30);
    let with_path = n.features.contains(worker::FEATURE_REALISATION_WITH_PATH);
    let targets = move || {
        if legacy {
            prop::collection::vec(arb_legacy_derived_path(), 0..4).boxed()
        } else {
            prop::collection::vec(arb_derived_path(), 0..4).boxed()
        }
    };
    let id = move || {
        if with_path {
            arb_path_id().boxed()
        } else {
            arb_old_id().boxed()
        }
    };
    prop_oneof![
        arb_store_path().prop_map(|path| R::IsValidPath { path }),
        arb_store_path().prop_map(|path| R::EnsurePath { path }),
        arb_store_path().prop_map(|path| R::AddTempRoot { path }),
        arb_client_options().prop_map(R::SetOptions),
        arb_store_path().prop_map(|path| R::QueryPathInfo { path }),
        "[0-9a-z]{32}".prop_map(|hash_part| R::QueryPathFromHashPart { hash_part }),
        (arb_paths(4), any::<bool>())
            .prop_map(|(paths, substitute)| R::QueryValidPaths { paths, substitute }),
        (arb_drv_path(), arb_basic_derivation(), arb_mode()).prop_map(|(drv_path, drv, mode)| {
            R::BuildDerivation {
                drv_path,
                drv,
                mode,
            }
        }),
        (arb_store_path(), arb_sigs()).prop_map(|(path, sigs)| R::AddSignatures { path, sigs }),
        arb_store_path().prop_map(|path| R::NarFromPath { path }),
        (arb_path_info(), any::<bool>(), any::<bool>()).prop_map(
            |(info, repair, dont_check_sigs)| R::AddToStoreNar {
                info,
                repair,
                dont_check_sigs,
            }
        ),
        (
            "[a-z]{1,8}",
            "fixed:r:sha256|fixed:sha256|text:sha256",
            arb_paths(3),
            any::<bool>()
        )
            .prop_map(|(name, method, references, repair)| R::AddToStore {
                name,
                method,
                references,
                repair,
            }),
        targets().prop_map(|targets| R::QueryMissing { targets }),
        arb_realisation(id()).prop_map(R::RegisterDrvOutput),
        id().prop_map(R::QueryRealisation),
        (any::<bool>(), any::<bool>()).prop_map(|(repair, dont_check_sigs)| {
            R::AddMultipleToStore {
                repair,
                dont_check_sigs,
            }
        }),
        (targets(), arb_mode()).prop_map(|(targets, mode)| R::BuildPaths { targets, mode }),
        (targets(), arb_mode())
            .prop_map(|(targets, mode)| R::BuildPathsWithResults { targets, mode }),
    ]
}

fn arb_serve_request() -> impl Strategy<Value = serve::Request> {
    use serve::Request as R;
    prop_oneof![
        (any::<bool>(), any::<bool>(), arb_paths(4)).prop_map(|(lock, substitute, paths)| {
            R::QueryValidPaths {
                lock,
                substitute,
                paths,
            }
        }),
        arb_paths(4).prop_map(|paths| R::QueryPathInfos { paths }),
        arb_store_path().prop_map(|path| R::DumpStorePath { path }),
        Just(R::ImportPaths),
        arb_paths(4).prop_map(|paths| R::ExportPaths { paths }),
        (
            prop::collection::vec(arb_legacy_derived_path(), 0..4),
            arb_build_options()
        )
            .prop_map(|(paths, options)| R::BuildPaths { paths, options }),
        (any::<bool>(), arb_paths(4)).prop_map(|(include_outputs, paths)| R::QueryClosure {
            include_outputs,
            paths
        }),
        (arb_drv_path(), arb_basic_derivation(), arb_build_options()).prop_map(
            |(drv_path, drv, options)| R::BuildDerivation {
                drv_path,
                drv,
                options
            }
        ),
        arb_path_info().prop_map(|info| R::AddToStoreNar { info }),
    ]
}

/// What a serve request keeps at `v` (options fields are gated).
fn serve_request_view(req: &serve::Request, v: ProtocolVersion) -> serve::Request {
    use serve::Request as R;
    let opts = |o: &serve::BuildOptions| serve::BuildOptions {
        max_log_size: if v.at_least(2, 2) { o.max_log_size } else { 0 },
        keep_failed: o.keep_failed && v.at_least(2, 7),
        ..*o
    };
    match req.clone() {
        R::BuildPaths { paths, options } => R::BuildPaths {
            paths,
            options: opts(&options),
        },
        R::BuildDerivation {
            drv_path,
            drv,
            options,
        } => R::BuildDerivation {
            drv_path,
            drv,
            options: opts(&options),
        },
        other => other,
    }
}

proptest! {
    #[test]
    fn worker_requests_round_trip(
        (n, req) in arb_negotiated().prop_flat_map(|n| (Just(n.clone()), arb_worker_request(n)))
    ) {
        prop_assume!(n.check_request(&req).is_ok());
        let bytes = enc(|o| req.write(o, &dir(), &n));
        let back = decode_exact(&bytes, |r| worker::Request::read(r, &dir(), &n));
        prop_assert_eq!(back, worker_request_view(&req, &n));
    }

    #[test]
    fn serve_requests_round_trip(
        v in arb_serve_version(), req in arb_serve_request()
    ) {
        let bytes = enc(|o| req.write(o, &dir(), v));
        let back = decode_exact(&bytes, |r| serve::Request::read(r, &dir(), v));
        prop_assert_eq!(back, serve_request_view(&req, v));
    }

    #[test]
    fn stderr_messages_round_trip(
        (v, msg) in prop::sample::select(vec![20u8, 21, 25, 26, 34, 38])
            .prop_map(|m| ProtocolVersion::new(1, m))
            .prop_flat_map(|v| (Just(v), arb_stderr(v)))
    ) {
        let bytes = enc(|o| msg.write(o, v));
        let back = decode_exact(&bytes, |r| StderrMsg::read(r, v));
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn path_infos_round_trip_in_every_encoding(
        info in arb_path_info(),
        minor in prop::sample::select(vec![15u8, 16, 17, 21, 34, 38]),
    ) {
        let v = ProtocolVersion::new(1, minor);
        let n = Negotiated::new(v);
        let d = dir();
        // Worker, keyed and unkeyed.
        let bytes = enc(|o| info.put_worker_keyed(o, &d, v));
        let back = decode_exact(&bytes, |r| PathInfo::read_worker_keyed(r, &d, v));
        prop_assert_eq!(back, worker_view(&info, v));
        // QueryPathInfo reply (valid flag from 1.17) and its "not valid" form.
        let bytes = enc(|o| worker::write_query_path_info(o, &d, &n, Some(&info)));
        let back = decode_exact(&bytes, |r| worker::read_query_path_info(r, &d, &n, &info.path));
        prop_assert_eq!(back, Some(worker_view(&info, v)));
        if minor >= 17 {
            let bytes = enc(|o| worker::write_query_path_info(o, &d, &n, None));
            prop_assert_eq!(decode_exact(&bytes, |r| worker::read_query_path_info(r, &d, &n, &info.path)), None);
        }
        // AddMultipleToStore entries are always at 1.16.
        let bytes = enc(|o| worker::write_multiple_entry(o, &d, &info));
        prop_assert_eq!(decode_exact(&bytes, |r| worker::read_multiple_entry(r, &d)), info.clone());
        // Serve QueryPathInfos records (a list ended by an empty path).
        let bytes = enc(|o| serve::write_path_infos(o, &d, std::slice::from_ref(&info)));
        let back = decode_exact(&bytes, |r| serve::read_path_infos(r, &d));
        prop_assert_eq!(back, vec![serve_view(&info)]);
    }

    #[test]
    fn build_results_round_trip_in_every_layout(
        (layout, res) in arb_layout().prop_flat_map(|l| (Just(l), arb_build_result(l)))
    ) {
        let bytes = enc(|o| res.write(o, &dir(), layout));
        let back = decode_exact(&bytes, |r| BuildResult::read(r, &dir(), layout));
        prop_assert_eq!(back, res);
    }

    #[test]
    fn serve_build_results_at_every_version(
        (v, res) in arb_serve_version()
            .prop_flat_map(|v| (Just(v), arb_build_result(serve::result_layout(v))))
    ) {
        let bytes = enc(|o| res.write(o, &dir(), serve::result_layout(v)));
        let back = decode_exact(&bytes, |r| serve::read_build_result(r, &dir(), v));
        prop_assert_eq!(back, res);
    }

    #[test]
    fn keyed_build_results_round_trip(
        (n, results) in arb_negotiated()
            .prop_filter("the op needs 1.34", |n| n.version.at_least(1, 34))
            .prop_flat_map(|n| {
                let layout = ResultLayout { times: true, ..n.result_layout() };
                (Just(n), prop::collection::vec((arb_derived_path(), arb_build_result(layout)), 0..3))
            })
    ) {
        let bytes = enc(|o| worker::write_keyed_build_results(o, &dir(), &n, &results));
        let back = decode_exact(&bytes, |r| worker::read_keyed_build_results(r, &dir(), &n));
        prop_assert_eq!(back, results);
    }

    #[test]
    fn worker_build_result_layout_per_version(
        (n, res) in arb_negotiated()
            .prop_flat_map(|n| (Just(n.clone()), arb_build_result(n.result_layout())))
    ) {
        let layout = n.result_layout();
        // The gates of the reference: times from 1.29, CPU from 1.37, outputs from 1.28.
        prop_assert_eq!(layout.times, n.version.at_least(1, 29));
        prop_assert_eq!(layout.cpu, n.version.at_least(1, 37));
        prop_assert_eq!(layout.outputs == OutputsEncoding::Absent, !n.version.at_least(1, 28));
        let bytes = enc(|o| res.write(o, &dir(), layout));
        prop_assert_eq!(decode_exact(&bytes, |r| worker::read_build_result(r, &dir(), &n)), res);
    }

    #[test]
    fn client_options_round_trip(o in arb_client_options(), minor in 10u8..=38) {
        let v = ProtocolVersion::new(1, minor);
        let bytes = enc(|out| o.write(out, v));
        let back = decode_exact(&bytes, |r| worker::ClientOptions::read(r, v));
        let mut want = o.clone();
        if minor < 12 {
            want.overrides.clear();
        }
        prop_assert_eq!(back, want);
    }

    #[test]
    fn derived_paths_round_trip(p in arb_derived_path(), lp in arb_legacy_derived_path()) {
        let d = dir();
        prop_assert_eq!(DerivedPath::parse(&d, &p.to_wire(&d), false, "t").expect("parses"), p);
        prop_assert_eq!(DerivedPath::parse(&d, &lp.to_legacy_wire(&d), true, "t").expect("parses"), lp);
    }

    #[test]
    fn basic_derivations_round_trip(drv in arb_basic_derivation()) {
        let bytes = enc(|o| drv.write(o, &dir()));
        prop_assert_eq!(decode_exact(&bytes, |r| nixmux_proto::derivation::BasicDerivation::read(r, &dir())), drv);
    }

    #[test]
    fn export_trailers_round_trip(t in arb_export_trailer(), last in any::<bool>()) {
        let bytes = enc(|o| serve::write_export_entry(o, &dir(), &t));
        prop_assert_eq!(decode_exact(&bytes, |r| serve::read_export_trailer(r, &dir())), t);
        let item = if last { ExportItem::End } else { ExportItem::Path };
        let bytes = enc(|o| serve::write_export_item(o, item));
        prop_assert_eq!(decode_exact(&bytes, serve::read_export_item), item);
    }

    #[test]
    fn realisation_replies_round_trip(
        (n, real, found) in arb_negotiated()
            .prop_filter("realisations need 1.27", |n| n.version.at_least(1, 27))
            .prop_flat_map(|n| {
                let id = if n.features.is_empty() { arb_old_id().boxed() } else { arb_path_id().boxed() };
                (Just(n), arb_realisation(id), any::<bool>())
            })
    ) {
        let d = dir();
        let sent = found.then_some(&real);
        let bytes = enc(|o| worker::write_realisation(o, &d, &n, sent));
        let back = decode_exact(&bytes, |r| worker::read_realisation(r, &d, &n, &real.id));
        let mut want = real.clone();
        if !n.version.at_least(1, 31) {
            want.signatures.clear();
        }
        prop_assert_eq!(back, found.then_some(want));
    }

    #[test]
    fn missing_and_path_sets_round_trip(m in arb_missing(), paths in arb_paths(6), opt in prop::option::of(arb_store_path())) {
        let d = dir();
        let bytes = enc(|o| worker::write_missing(o, &d, &m));
        prop_assert_eq!(decode_exact(&bytes, |r| worker::read_missing(r, &d)), m);
        let bytes = enc(|o| put_store_path_set(o, &d, &paths));
        prop_assert_eq!(decode_exact(&bytes, |r| read_store_path_set(r, &d, "set")), paths);
        let bytes = enc(|o| worker::write_opt_path(o, &d, opt.as_ref()));
        prop_assert_eq!(decode_exact(&bytes, |r| worker::read_opt_path(r, &d)), opt);
    }

    #[test]
    fn handshakes_round_trip(
        minor in 0u8..=255,
        version in prop::option::of("[ -~]{0,20}"),
        trust in prop::sample::select(vec![None, Some(Trust::Trusted), Some(Trust::NotTrusted)]),
        features in prop::collection::btree_set("[a-z-]{1,30}", 0..4),
        sv in 4u8..=255,
    ) {
        let v = ProtocolVersion::new(1, minor);
        // Client and server hellos, both protocols.
        let bytes = enc(|o| worker::write_client_hello(o, v));
        prop_assert_eq!(decode_exact(&bytes, worker::read_client_hello), v);
        let bytes = enc(|o| serve::write_client_hello(o, ProtocolVersion::new(2, sv)));
        prop_assert_eq!(decode_exact(&bytes, serve::read_client_hello), ProtocolVersion::new(2, sv));
        let bytes = enc(|o| serve::write_server_hello(o, ProtocolVersion::new(2, sv)));
        prop_assert_eq!(
            decode_exact(&bytes, |r| serve::read_server_hello(r, serve::OUR_VERSION)),
            serve::OUR_VERSION.negotiate(ProtocolVersion::new(2, sv))
        );
        if minor >= 21 {
            let bytes = enc(|o| worker::write_server_hello(o, v));
            prop_assert_eq!(
                decode_exact(&bytes, |r| worker::read_server_hello(r, worker::OUR_VERSION)),
                worker::OUR_VERSION.negotiate(v)
            );
        }
        let bytes = enc(|o| worker::write_features(o, &features));
        prop_assert_eq!(decode_exact(&bytes, worker::read_features), features);
        let bytes = enc(|o| worker::write_client_tail(o, v));
        if bytes.is_empty() {
            prop_assert!(worker::read_client_tail(&mut WireReader::new(&bytes, &L), v).is_ok());
        } else {
            decode_exact(&bytes, |r| worker::read_client_tail(r, v));
        }
        let info = DaemonInfo { nix_version: version, trust };
        let bytes = enc(|o| worker::write_daemon_info(o, v, &info));
        let back = if bytes.is_empty() {
            worker::read_daemon_info(&mut WireReader::new(&bytes, &L), v).expect("nothing to read")
        } else {
            decode_exact(&bytes, |r| worker::read_daemon_info(r, v))
        };
        let want = DaemonInfo {
            nix_version: if minor >= 33 { Some(info.nix_version.clone().unwrap_or_default()) } else { None },
            trust: if minor >= 35 { info.trust } else { None },
        };
        prop_assert_eq!(back, want);
    }

    #[test]
    fn serve_build_paths_replies(code in prop_oneof![Just(0u64), 1u64..200, any::<u64>()], msg in arb_text()) {
        let failure = (code != 0).then_some((code, msg.as_str()));
        let bytes = enc(|o| serve::write_build_paths_reply(o, failure));
        let back = decode_exact(&bytes, serve::read_build_paths_reply);
        prop_assert_eq!(back.status.is_success(), code == 0);
        if code != 0 {
            prop_assert_eq!(back.error_msg, msg);
        }
    }
}

proptest! {
    /// Store path order is the order of the printed hash parts even when they share a long
    /// prefix (the comparison works on the decoded bytes, last byte first, in two integers).
    #[test]
    fn store_path_order_with_shared_prefixes(
        h in "[0-9a-dfgh-np-sv-z]{32}",
        tail in "[0-9a-dfgh-np-sv-z]{32}",
        k in 0usize..32,
        n1 in "[a-z]{1,3}",
        n2 in "[a-z]{1,3}",
    ) {
        let h2 = format!("{}{}", &h[..k], &tail[k..]);
        let b1 = format!("{h}-{n1}");
        let b2 = format!("{h2}-{n2}");
        let p1 = nixmux_proto::store_path::StorePath::from_base_name(&b1).expect("valid");
        let p2 = nixmux_proto::store_path::StorePath::from_base_name(&b2).expect("valid");
        prop_assert_eq!(p1.cmp(&p2), b1.cmp(&b2));
        prop_assert_eq!(p1.to_string(), b1);
    }
}
