//! `ServeSession` against an in-process fake `nix-store --serve --write` (`support/fake.rs`)
//! at serve 2.4–2.8, which real Nix 2.8.0 (2.7 only) cannot show:
//!
//! * the exact handshake bytes at every version, and the versions we refuse;
//! * every operation at every version (AddToStoreNar `Unsupported` below 2.5, the session
//!   still usable), the build options block and the build result fields per version, with
//!   hand-built bytes;
//! * a Nix 2.35 server at 2.8 (we announce 2.7: the old `builtOutputs` encoding with dummy ids)
//!   and the Nix 2.8.0–2.10 quirk (`builtOutputs` always sent);
//! * faults: wrong magic, 2^63 lengths, replies cut then EOF (how every serve server error
//!   looks), stalls. Each gives a typed error and leaves the session unusable.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nixmux_proto::build_result::{BuildResult, BuildStatus, BuiltOutput};
use nixmux_proto::derivation::{BasicDerivation, DerivationOutput};
use nixmux_proto::derived_path::DerivedPath;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve::{self, BuildOptions, ExportTrailer};
use nixmux_proto::store_path::StorePath;
use nixmux_proto::{Incompatible, Malformed, Misbehaved, ProtoError, ProtocolVersion};
use nixmux_session::{ServeSession, SessionConfig, SessionError, Upload};
use support::fake::{End, Fault, HUGE, ServeFake, ServeReport, W, dir, pipe, sample, sp, wire};
use tokio::task::JoinHandle;

const MAGIC_1: u64 = 0x390c_9deb;
const MAGIC_2: u64 = 0x5452_eecb;

fn v(minor: u8) -> ProtocolVersion {
    ProtocolVersion::new(2, minor)
}

fn config() -> SessionConfig {
    SessionConfig {
        idle_timeout: Duration::from_secs(5),
        build_idle_timeout: Some(Duration::from_secs(5)),
        ..SessionConfig::default()
    }
}

async fn connect_with(
    fake: ServeFake,
    cfg: SessionConfig,
) -> (Result<ServeSession, SessionError>, JoinHandle<ServeReport>) {
    let (r, w, server) = pipe();
    let h = fake.spawn(server);
    (ServeSession::handshake(r, w, dir(), cfg).await, h)
}

async fn connect(fake: ServeFake) -> (ServeSession, JoinHandle<ServeReport>) {
    let (s, h) = connect_with(fake, config()).await;
    (s.expect("handshake"), h)
}

async fn finish(s: ServeSession, h: JoinHandle<ServeReport>) -> ServeReport {
    s.close().await;
    h.await.expect("fake server task")
}

async fn report_after_failure(s: Option<ServeSession>, h: JoinHandle<ServeReport>) -> ServeReport {
    drop(s);
    tokio::time::timeout(Duration::from_secs(5), h)
        .await
        .expect("the fake ends once the client is gone")
        .expect("fake server task")
}

fn proto_err(e: &SessionError) -> &ProtoError {
    match e {
        SessionError::Protocol { source, .. } => source,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

fn path_str(p: &StorePath) -> String {
    p.to_absolute(&dir())
}

fn drv() -> (StorePath, BasicDerivation, StorePath) {
    let drv_path = sp(7, "hello.drv");
    let out = sp(8, "hello");
    let d = BasicDerivation {
        outputs: BTreeMap::from([(
            "out".to_owned(),
            DerivationOutput {
                path: Some(out.clone()),
                hash_algo: String::new(),
                hash: String::new(),
            },
        )]),
        input_srcs: BTreeSet::from([sp(1, "a")]),
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), "echo hi > $out".into()],
        env: BTreeMap::from([("out".to_owned(), out.to_absolute(&dir()))]),
    };
    (drv_path, d, out)
}

fn built(out: &StorePath) -> BuildResult {
    BuildResult {
        status: BuildStatus::Built,
        error_msg: String::new(),
        times_built: 1,
        is_non_deterministic: false,
        start_time: 1_700_000_000,
        stop_time: 1_700_000_005,
        cpu_user: None,
        cpu_system: None,
        built_outputs: BTreeMap::from([(
            "out".to_owned(),
            BuiltOutput {
                path: out.clone(),
                signatures: BTreeSet::new(),
                id: Some(format!("sha256:{}!out", "cd".repeat(32))),
                dependent_realisations: BTreeMap::new(),
            },
        )]),
    }
}

fn as_seen_at(res: &BuildResult, n: ProtocolVersion) -> BuildResult {
    let layout = serve::result_layout(n);
    let mut r = res.clone();
    assert!(layout.times, "every serve version we accept has the times");
    if layout.outputs == nixmux_proto::build_result::OutputsEncoding::Absent {
        r.built_outputs.clear();
    }
    r
}

/// A serve path info loses what the serve protocol cannot carry.
fn as_served(info: &PathInfo) -> PathInfo {
    PathInfo {
        registration_time: 0,
        ultimate: false,
        ..info.clone()
    }
}

// ===== handshake =====

#[tokio::test]
async fn handshake_bytes_at_every_serve_version() {
    for server in [4u8, 5, 6, 7, 8, 9] {
        let (s, h) = connect(ServeFake::new(v(server))).await;
        let n = server.min(7);
        assert_eq!(s.version(), v(n), "server 2.{server}");
        let rep = finish(s, h).await;
        assert_eq!(rep.c2s, wire(&[W::N(MAGIC_1), W::N(0x207)]));
        assert_eq!(
            rep.s2c,
            wire(&[W::N(MAGIC_2), W::N(0x200 | u64::from(server))])
        );
        assert_eq!(rep.negotiated, Some(v(n)));
        assert_eq!(rep.end, Some(End::Eof), "closing ends the server loop");
    }
}

#[tokio::test]
async fn handshake_refuses_servers_we_cannot_use() {
    for (word, check) in [
        (
            0x203u64,
            (|e: &ProtoError| matches!(e, ProtoError::Incompatible(Incompatible::TooOld { min, .. }) if *min == ProtocolVersion::new(2, 4)))
                as fn(&ProtoError) -> bool,
        ),
        (0x307, |e| {
            matches!(
                e,
                ProtoError::Incompatible(Incompatible::MajorVersion { .. })
            )
        }),
        (0x1_0207, |e| matches!(e, ProtoError::Malformed { .. })),
    ] {
        let (r, w, mut server) = pipe();
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut hello = [0u8; 16];
            server.read_exact(&mut hello).await.expect("client hello");
            let mut raw = MAGIC_2.to_le_bytes().to_vec();
            raw.extend_from_slice(&word.to_le_bytes());
            server.write_all(&raw).await.expect("reply");
            let mut rest = Vec::new();
            let _ = server.read_to_end(&mut rest).await;
        });
        let e = ServeSession::handshake(r, w, dir(), config())
            .await
            .expect_err("refused");
        assert!(check(proto_err(&e)), "{word:#x}: {e:?}");
        task.await.expect("task");
    }

    let mut fake = ServeFake::new(v(7));
    fake.fault = Some(Fault::WrongMagic);
    let (s, h) = connect_with(fake, config()).await;
    let e = s.expect_err("wrong magic");
    assert!(
        matches!(
            proto_err(&e),
            ProtoError::Misbehaved(Misbehaved::WrongMagic {
                expected: MAGIC_2,
                ..
            })
        ),
        "{e:?}"
    );
    report_after_failure(None, h).await;
}

// ===== every operation at every version =====

#[tokio::test]
async fn every_operation_at_every_version() {
    for server in [4u8, 5, 6, 7, 8] {
        let ctx = format!("serve 2.{server}");
        let a = sp(1, "a");
        let b = sp(2, "b");
        let absent = sp(5, "absent");
        let mut a_item = sample(a.clone(), b"alpha\n", &[]);
        a_item.0.sigs = BTreeSet::from(["cache:c2ln".to_owned()]);
        a_item.0.ca = Some(format!("text:sha256:{}", "1".repeat(52)));
        a_item.0.deriver = Some(sp(20, "a.drv"));
        let b_item = sample(b.clone(), b"beta\n", &[&a, &b]);
        let (drv_path, d, out) = drv();
        let failing = sp(9, "failing.drv");
        let mut fake = ServeFake::new(v(server));
        fake.store.add(a_item.0.clone(), a_item.1.clone());
        fake.store.add(b_item.0.clone(), b_item.1.clone());
        fake.store.builds.insert(drv_path.clone(), built(&out));
        fake.store.builds.insert(
            failing.clone(),
            BuildResult::failure(BuildStatus::PermanentFailure, "builder failed"),
        );
        let (mut s, h) = connect(fake).await;
        let n = s.version();

        let all = BTreeSet::from([a.clone(), b.clone(), absent.clone()]);
        assert_eq!(
            s.query_valid_paths(&all, false, true).await.expect(&ctx),
            BTreeSet::from([a.clone(), b.clone()])
        );
        assert_eq!(
            s.query_path_infos(&all).await.expect(&ctx),
            vec![as_served(&a_item.0), as_served(&b_item.0)],
            "{ctx}"
        );
        assert_eq!(
            s.query_closure(&BTreeSet::from([b.clone()]), false)
                .await
                .expect(&ctx),
            BTreeSet::from([a.clone(), b.clone()])
        );
        let mut sink = Vec::new();
        let sum = s.dump_store_path(&b, &mut sink).await.expect(&ctx);
        assert_eq!(sink, b_item.1);
        assert_eq!(
            (sum.nar_size, sum.nar_hash),
            (b_item.0.nar_size, Some(b_item.0.nar_hash))
        );

        // Uploads: pipelined AddToStoreNar from 2.5, ImportPaths always.
        let c = sp(3, "c");
        let c_item = sample(c.clone(), &[3u8; 100_000], &[&a]);
        let d2 = sp(4, "d");
        let d_item = sample(d2.clone(), b"delta", &[&c]);
        let mut c_src: &[u8] = &c_item.1;
        let mut d_src: &[u8] = &d_item.1;
        let mut ups = [
            Upload {
                info: c_item.0.clone(),
                nar: &mut c_src,
            },
            Upload {
                info: d_item.0.clone(),
                nar: &mut d_src,
            },
        ];
        let r = s.add_to_store_nars(&mut ups).await;
        if server >= 5 {
            r.expect(&ctx);
        } else {
            let e = r.expect_err(&ctx);
            assert!(
                matches!(
                    &e,
                    SessionError::Unsupported(Incompatible::OperationUnsupported { needs, .. })
                        if *needs == v(5)
                ),
                "{ctx}: {e:?}"
            );
            assert!(s.is_usable(), "{ctx}");
            let mut c_src: &[u8] = &c_item.1;
            let mut d_src: &[u8] = &d_item.1;
            let c_len = c_item.1.len() as u64;
            let d_len = d_item.1.len() as u64;
            let mut items: Vec<(
                ExportTrailer,
                &mut (dyn tokio::io::AsyncRead + Unpin + Send),
                u64,
            )> = vec![
                (
                    ExportTrailer {
                        path: c.clone(),
                        references: c_item.0.references.clone(),
                        deriver: None,
                    },
                    &mut c_src,
                    c_len,
                ),
                (
                    ExportTrailer {
                        path: d2.clone(),
                        references: d_item.0.references.clone(),
                        deriver: None,
                    },
                    &mut d_src,
                    d_len,
                ),
            ];
            s.import_paths(&mut items).await.expect(&ctx);
        }
        assert_eq!(
            s.query_valid_paths(&BTreeSet::from([c.clone(), d2.clone()]), false, false)
                .await
                .expect(&ctx)
                .len(),
            2
        );
        let exported = s
            .export_paths(&BTreeSet::from([d2.clone(), c.clone(), a.clone()]), |_| {
                Vec::new()
            })
            .await
            .expect(&ctx);
        // Dependencies first: a, c, d.
        let order: Vec<&StorePath> = exported.iter().map(|(t, _, _)| &t.path).collect();
        assert_eq!(order, [&a, &c, &d2], "{ctx}");
        assert_eq!(exported[1].2, c_item.1);
        assert_eq!(exported[1].1.nar_hash, Some(c_item.0.nar_hash));

        // Builds.
        let options = BuildOptions {
            max_silent_time: 60,
            build_timeout: 3600,
            max_log_size: 1 << 20,
            keep_failed: true,
        };
        let res = s
            .build_derivation(&drv_path, &d, &options)
            .await
            .expect(&ctx);
        assert_eq!(res, as_seen_at(&built(&out), n), "{ctx}");
        let ok = s
            .build_paths(&[DerivedPath::all_outputs(drv_path.clone())], &options)
            .await
            .expect(&ctx);
        assert_eq!(ok.status, BuildStatus::Built);
        let bad = s
            .build_paths(&[DerivedPath::all_outputs(failing.clone())], &options)
            .await
            .expect(&ctx);
        assert_eq!(bad.status, BuildStatus::PermanentFailure);
        assert_eq!(bad.error_msg, "builder failed");
        assert!(s.is_usable());

        let rep = finish(s, h).await;
        assert_eq!(rep.end, Some(End::Eof), "{ctx}");
        // The options block the server decoded.
        let decoded = rep
            .requests
            .iter()
            .find_map(|r| match r {
                serve::Request::BuildDerivation { options, .. } => Some(*options),
                _ => None,
            })
            .expect("BuildDerivation");
        assert_eq!(
            decoded,
            BuildOptions {
                keep_failed: n.at_least(2, 7),
                ..options
            },
            "{ctx}"
        );
        assert!(rep.store.paths.contains_key(&c) && rep.store.paths.contains_key(&d2));
    }
}

// ===== exact bytes per version =====

/// The options block: `maxSilentTime`, `buildTimeout` always; `maxLogSize` from 2.2;
/// `nrRepeats` (0) and `enforceDeterminism` (0) from 2.3; `keepFailed` from 2.7. The two
/// `unsigned int` fields are clamped to 32 bits.
#[tokio::test]
async fn build_derivation_request_bytes_per_version() {
    let (drv_path, d, out) = drv();
    let options = BuildOptions {
        max_silent_time: u64::MAX,
        build_timeout: 7,
        max_log_size: 1 << 40,
        keep_failed: true,
    };
    for server in [4u8, 6, 7] {
        let mut fake = ServeFake::new(v(server));
        fake.store.builds.insert(drv_path.clone(), built(&out));
        let (mut s, h) = connect(fake).await;
        s.build_derivation(&drv_path, &d, &options)
            .await
            .expect("build");
        let rep = finish(s, h).await;
        let op = path_str(&out);
        let src = path_str(&sp(1, "a"));
        let dp = path_str(&drv_path);
        let mut items = vec![
            W::N(8),
            W::S(&dp),
            W::N(1),
            W::S("out"),
            W::S(&op),
            W::S(""),
            W::S(""),
            W::N(1),
            W::S(&src),
            W::S("x86_64-linux"),
            W::S("/bin/sh"),
            W::L(&["-c", "echo hi > $out"]),
            W::N(1),
            W::S("out"),
            W::S(&op),
            W::N(0xffff_ffff),
            W::N(7),
            W::N(1 << 40),
            W::N(0),
            W::N(0),
        ];
        if server >= 7 {
            items.push(W::N(1));
        }
        assert_eq!(rep.request_bytes[0], wire(&items), "2.{server}");
    }
}

/// Build results built by hand: times from 2.3, builtOutputs (old JSON map) from 2.6. A Nix
/// 2.35 server speaks 2.8 but answers our 2.7 with the old map, dummy ids and JSON holding
/// only `id` and `outPath`.
#[tokio::test]
async fn build_result_bytes_per_version() {
    let (drv_path, d, out) = drv();
    let base = out.to_string();
    let id = format!("sha256:{}!out", "cd".repeat(32));
    let json = format!(
        r#"{{"dependentRealisations":{{}},"id":"{id}","outPath":"{base}","signatures":[]}}"#
    );
    let dummy = format!("sha256:{}!out", "0".repeat(64));
    let json_2_35 = format!(r#"{{"id":"{dummy}","outPath":"{base}"}}"#);
    for (server, outputs) in [
        (4u8, None),
        (5, None),
        (6, Some((id.as_str(), json.as_str()))),
        (7, Some((id.as_str(), json.as_str()))),
        (8, Some((dummy.as_str(), json_2_35.as_str()))),
    ] {
        let mut items = vec![
            W::N(0),
            W::S(""),
            W::N(1),
            W::N(0),
            W::N(1_700_000_000),
            W::N(1_700_000_005),
        ];
        if let Some((k, j)) = outputs {
            items.extend([W::N(1), W::S(k), W::S(j)]);
        }
        let reply = wire(&items);
        let mut fake = ServeFake::new(v(server));
        let mut once = Some(reply);
        fake.script = Some(Box::new(move |req, _| match req {
            serve::Request::BuildDerivation { .. } => once.take(),
            _ => None,
        }));
        let (mut s, h) = connect(fake).await;
        let res = s
            .build_derivation(&drv_path, &d, &BuildOptions::default())
            .await
            .expect("result");
        let mut want = as_seen_at(&built(&out), s.version());
        if server == 8 {
            let o = want.built_outputs.get_mut("out").expect("out");
            o.id = Some(dummy.clone());
        }
        assert_eq!(res, want, "2.{server}");
        assert!(s.is_usable());
        // The session is in sync: a query works after the result.
        assert!(
            s.query_valid_paths(&BTreeSet::from([out.clone()]), false, false)
                .await
                .expect("in sync")
                .is_empty()
        );
        finish(s, h).await;
    }
}

/// Nix 2.8.0–2.10 send `builtOutputs` whatever the version. Announcing 2.7 makes that
/// invisible: the bytes are the same as from a server with a correct gate.
#[tokio::test]
async fn nix_2_8_builtoutputs_quirk_is_invisible_at_2_7() {
    let (drv_path, d, out) = drv();
    let mut streams = Vec::new();
    for quirk in [false, true] {
        let mut fake = ServeFake::new(v(7));
        fake.always_built_outputs = quirk;
        fake.store.builds.insert(drv_path.clone(), built(&out));
        let (mut s, h) = connect(fake).await;
        let res = s
            .build_derivation(&drv_path, &d, &BuildOptions::default())
            .await
            .expect("result");
        assert_eq!(res, built(&out));
        streams.push(finish(s, h).await.s2c);
    }
    assert_eq!(streams[0], streams[1]);
}

/// `QueryPathInfos` records as Nix writes them (`sha256:<nix32>`), and with the other hash
/// formats a reader must accept (bare base16, SRI).
#[tokio::test]
async fn query_path_infos_reply_bytes_and_hash_formats() {
    let a = sp(1, "a");
    let b = sp(2, "b");
    let (info, _) = sample(a.clone(), b"alpha\n", &[&b]);
    let pa = path_str(&a);
    let pb = path_str(&b);
    for hash in [
        info.nar_hash.to_nix32_prefixed(),
        info.nar_hash.to_base16(),
        info.nar_hash.to_sri(),
    ] {
        let reply = wire(&[
            W::S(&pa),
            W::S(""),
            W::N(1),
            W::S(&pb),
            W::N(info.nar_size),
            W::N(info.nar_size),
            W::S(&hash),
            W::S("fixed:r:sha256:0000000000000000000000000000000000000000000000000000"),
            W::L(&["k:sig"]),
            W::S(""),
        ]);
        let mut fake = ServeFake::new(v(7));
        let mut once = Some(reply);
        fake.script = Some(Box::new(move |req, _| match req {
            serve::Request::QueryPathInfos { .. } => once.take(),
            _ => None,
        }));
        let (mut s, h) = connect(fake).await;
        let got = s
            .query_path_infos(&BTreeSet::from([a.clone()]))
            .await
            .expect(&hash);
        let want = PathInfo {
            sigs: BTreeSet::from(["k:sig".to_owned()]),
            ca: Some("fixed:r:sha256:0000000000000000000000000000000000000000000000000000".into()),
            ..as_served(&info)
        };
        assert_eq!(got, vec![want], "{hash}");
        let rep = finish(s, h).await;
        assert_eq!(rep.request_bytes[0], wire(&[W::N(2), W::N(1), W::S(&pa)]));
    }
}

/// `BuildPaths` answers with an exit-status-like code and a message.
#[tokio::test]
async fn build_paths_failure_codes() {
    let drv_path = sp(7, "hello.drv");
    for (code, status) in [
        (1u64, BuildStatus::MiscFailure),
        (100, BuildStatus::PermanentFailure),
        (101, BuildStatus::TimedOut),
        (102, BuildStatus::OutputRejected),
        (104, BuildStatus::NotDeterministic),
    ] {
        let mut fake = ServeFake::new(v(7));
        let mut once = Some(wire(&[W::N(code), W::S("it failed")]));
        fake.script = Some(Box::new(move |req, _| match req {
            serve::Request::BuildPaths { .. } => once.take(),
            _ => None,
        }));
        let (mut s, h) = connect(fake).await;
        let res = s
            .build_paths(
                &[DerivedPath::all_outputs(drv_path.clone())],
                &BuildOptions::default(),
            )
            .await
            .expect("reply");
        assert_eq!((res.status, res.error_msg.as_str()), (status, "it failed"));
        let rep = finish(s, h).await;
        // Legacy strings: a bare .drv path means every output.
        let dp = path_str(&drv_path);
        assert_eq!(
            rep.request_bytes[0],
            wire(&[
                W::N(6),
                W::L(&[dp.as_str()]),
                W::N(0),
                W::N(0),
                W::N(0),
                W::N(0),
                W::N(0),
                W::N(0),
            ])
        );
    }
}

// ===== faults =====

async fn op_fault(
    fault: Fault,
    cfg: SessionConfig,
    op: impl AsyncFnOnce(&mut ServeSession) -> Result<(), SessionError>,
) -> (SessionError, ServeReport) {
    let a = sp(1, "a");
    let (info, nar) = sample(a.clone(), b"alpha\n", &[]);
    let mut fake = ServeFake::new(v(7));
    fake.store.add(info, nar);
    fake.fault = Some(fault);
    let (s, h) = connect_with(fake, cfg).await;
    let mut s = s.expect("handshake");
    let e = op(&mut s).await.expect_err("fault");
    assert!(e.is_fatal(), "{e:?}");
    assert!(!s.is_usable());
    let again = s
        .query_valid_paths(&BTreeSet::from([a]), false, false)
        .await
        .expect_err("poisoned");
    assert!(matches!(again, SessionError::Poisoned), "{again:?}");
    let rep = report_after_failure(Some(s), h).await;
    (e, rep)
}

#[tokio::test]
async fn lengths_of_2_pow_63_are_refused_before_allocation() {
    let pa = path_str(&sp(1, "a"));
    type Op = fn(
        &mut ServeSession,
    )
        -> std::pin::Pin<Box<dyn Future<Output = Result<(), SessionError>> + Send + '_>>;
    let valid: Op = |s| {
        Box::pin(async move {
            s.query_valid_paths(&BTreeSet::from([sp(1, "a")]), false, false)
                .await
                .map(|_| ())
        })
    };
    let infos: Op = |s| {
        Box::pin(async move {
            s.query_path_infos(&BTreeSet::from([sp(1, "a")]))
                .await
                .map(|_| ())
        })
    };
    let dump: Op = |s| {
        Box::pin(async move {
            s.dump_store_path(&sp(1, "a"), &mut Vec::new())
                .await
                .map(|_| ())
        })
    };
    let build: Op = |s| {
        Box::pin(async move {
            let (p, d, _) = drv();
            s.build_derivation(&p, &d, &BuildOptions::default())
                .await
                .map(|_| ())
        })
    };
    let build_paths: Op = |s| {
        Box::pin(async move {
            s.build_paths(
                &[DerivedPath::all_outputs(sp(7, "x.drv"))],
                &BuildOptions::default(),
            )
            .await
            .map(|_| ())
        })
    };
    let export: Op = |s| {
        Box::pin(async move {
            s.export_paths(&BTreeSet::from([sp(1, "a")]), |_| Vec::new())
                .await
                .map(|_| ())
        })
    };
    let cases: Vec<(&str, Vec<u8>, Op)> = vec![
        ("path set count", wire(&[W::N(HUGE)]), valid),
        ("path in a set", wire(&[W::N(1), W::N(HUGE)]), valid),
        ("record path", wire(&[W::N(HUGE)]), infos),
        ("deriver", wire(&[W::S(&pa), W::N(HUGE)]), infos),
        (
            "references",
            wire(&[W::S(&pa), W::S(""), W::N(HUGE)]),
            infos,
        ),
        (
            "narHash",
            wire(&[W::S(&pa), W::S(""), W::N(0), W::N(8), W::N(8), W::N(HUGE)]),
            infos,
        ),
        (
            "sigs",
            wire(&[
                W::S(&pa),
                W::S(""),
                W::N(0),
                W::N(8),
                W::N(8),
                W::S(&"0".repeat(64)),
                W::S(""),
                W::N(HUGE),
            ]),
            infos,
        ),
        (
            "NAR file size",
            wire(&[
                W::S("nix-archive-1"),
                W::S("("),
                W::S("type"),
                W::S("regular"),
                W::S("contents"),
                W::N(HUGE),
            ]),
            dump,
        ),
        (
            "NAR symlink target",
            wire(&[
                W::S("nix-archive-1"),
                W::S("("),
                W::S("type"),
                W::S("symlink"),
                W::S("target"),
                W::N(HUGE),
            ]),
            dump,
        ),
        ("NAR magic", wire(&[W::N(HUGE)]), dump),
        ("build result message", wire(&[W::N(0), W::N(HUGE)]), build),
        (
            "builtOutputs count",
            wire(&[
                W::N(0),
                W::S(""),
                W::N(1),
                W::N(0),
                W::N(0),
                W::N(0),
                W::N(HUGE),
            ]),
            build,
        ),
        (
            "BuildPaths message",
            wire(&[W::N(100), W::N(HUGE)]),
            build_paths,
        ),
        (
            "export trailer references",
            {
                let mut b = wire(&[W::N(1)]);
                b.extend(
                    nixmux_proto::nar::NarNode::File {
                        executable: false,
                        contents: b"alpha\n".to_vec(),
                    }
                    .to_nar(),
                );
                b.extend(wire(&[W::N(0x4558_494e), W::S(&pa), W::N(HUGE)]));
                b
            },
            export,
        ),
    ];
    for (what, bytes, op) in cases {
        let (e, rep) = op_fault(Fault::Replace(bytes), config(), async |s| op(s).await).await;
        assert!(
            matches!(
                proto_err(&e),
                ProtoError::Malformed {
                    kind: Malformed::TooLong { len: HUGE, .. },
                    ..
                }
            ),
            "{what}: {e:?}"
        );
        assert_eq!(rep.end, Some(End::Eof), "{what}");
    }
}

/// Every serve server error looks like this: the reply stops and the pipe closes.
#[tokio::test]
async fn a_reply_cut_then_eof_is_closed() {
    for cut in [0usize, 5, 8, 30, 64] {
        let (e, rep) = op_fault(Fault::CutReply(cut), config(), async |s| {
            s.query_path_infos(&BTreeSet::from([sp(1, "a")]))
                .await
                .map(|_| ())
        })
        .await;
        assert!(matches!(e, SessionError::Closed { .. }), "cut {cut}: {e:?}");
        assert_eq!(rep.end, Some(End::ClosedByFake));
    }
    let (e, _) = op_fault(Fault::CutReply(50), config(), async |s| {
        s.dump_store_path(&sp(1, "a"), &mut Vec::new())
            .await
            .map(|_| ())
    })
    .await;
    assert!(matches!(e, SessionError::Closed { .. }), "{e:?}");
}

/// The server dies on a request it cannot serve (here: dumping an invalid path; uploading a
/// NAR whose hash does not match).
#[tokio::test]
async fn server_deaths_are_closed() {
    let (mut s, h) = connect(ServeFake::new(v(7))).await;
    let e = s
        .dump_store_path(&sp(5, "absent"), &mut Vec::new())
        .await
        .expect_err("dies");
    assert!(matches!(e, SessionError::Closed { .. }), "{e:?}");
    assert!(!s.is_usable());
    let rep = report_after_failure(Some(s), h).await;
    assert_eq!(rep.end, Some(End::ClosedByFake));

    let (mut s, h) = connect(ServeFake::new(v(7))).await;
    let (mut info, nar) = sample(sp(6, "bad"), b"contents", &[]);
    info.nar_hash = nixmux_proto::hash::Hash::sha256_of(b"something else");
    let mut src: &[u8] = &nar;
    let e = s
        .add_to_store_nars(&mut [Upload {
            info,
            nar: &mut src,
        }])
        .await
        .expect_err("dies");
    assert!(matches!(e, SessionError::Closed { .. }), "{e:?}");
    assert!(!s.is_usable());
    report_after_failure(Some(s), h).await;
}

#[tokio::test]
async fn a_stalled_server_hits_the_idle_timeout() {
    let cfg = SessionConfig {
        idle_timeout: Duration::from_millis(200),
        ..config()
    };
    let started = std::time::Instant::now();
    let (e, rep) = op_fault(Fault::Stall, cfg, async |s| {
        s.query_valid_paths(&BTreeSet::from([sp(1, "a")]), false, false)
            .await
            .map(|_| ())
    })
    .await;
    assert!(
        matches!(e, SessionError::Timeout { after, .. } if after == Duration::from_millis(200)),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(rep.end, Some(End::Eof));
}

/// `add_to_store_nars` pipelines its uploads and reads the acknowledgements at the end. With
/// thousands of paths the acknowledgements fill the pipe back to us while we are still
/// sending: the server blocks writing, stops reading, and we block writing.
#[tokio::test]
async fn pipelined_uploads_of_many_paths_do_not_deadlock() {
    let items: Vec<_> = (0..10_000u32)
        .map(|i| {
            let mut h = [0u8; 20];
            h[..4].copy_from_slice(&i.to_le_bytes());
            sample(StorePath::new(h, "many").expect("path"), b"x", &[])
        })
        .collect();
    let cfg = SessionConfig {
        idle_timeout: Duration::from_secs(2),
        ..config()
    };
    let (s, h) = connect_with(ServeFake::new(v(7)), cfg).await;
    let mut s = s.expect("handshake");
    let mut srcs: Vec<&[u8]> = items.iter().map(|(_, n)| n.as_slice()).collect();
    let mut ups: Vec<Upload<'_>> = items
        .iter()
        .zip(srcs.iter_mut())
        .map(|((info, _), src)| Upload {
            info: info.clone(),
            nar: src,
        })
        .collect();
    s.add_to_store_nars(&mut ups).await.expect("no deadlock");
    drop(ups);
    let rep = finish(s, h).await;
    assert_eq!(rep.store.paths.len(), 10_000);
}

/// `QueryPathInfos` is read record by record (a large reply is not decoded again from its
/// start each time more of it arrives); a server answering with more records than paths
/// asked for is caught.
#[tokio::test]
async fn query_path_infos_reply_with_more_records_than_asked() {
    let a = sp(1, "a");
    let b = sp(2, "b");
    let mut reply = Vec::new();
    let infos = [
        sample(a.clone(), b"a", &[]).0,
        sample(b.clone(), b"b", &[]).0,
    ];
    serve::write_path_infos(&mut reply, &dir(), &infos);
    let mut fake = ServeFake::new(v(7));
    let mut once = Some(reply);
    fake.script = Some(Box::new(move |req, _| match req {
        serve::Request::QueryPathInfos { .. } => once.take(),
        _ => None,
    }));
    let (mut s, h) = connect(fake).await;
    let e = s
        .query_path_infos(&BTreeSet::from([a.clone()]))
        .await
        .expect_err("two records for one path");
    assert!(
        matches!(
            proto_err(&e),
            ProtoError::Misbehaved(Misbehaved::Inconsistent(_))
        ),
        "{e:?}"
    );
    assert!(!s.is_usable());
    report_after_failure(Some(s), h).await;
}
