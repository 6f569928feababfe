//! `WorkerSession` against an in-process fake daemon (`support/fake.rs`) at every worker
//! version our gating depends on, which real Nix 2.8.0 (1.34 only) cannot show:
//!
//! * one handshake test per version boundary, asserting the exact bytes each side sends
//!   (hand-built, not produced by our encoders);
//! * per boundary, the exact request bytes and hand-built replies of the operations whose
//!   encoding changes (substitute flag, DerivedPath strings, error layouts, build result
//!   fields, realisation encodings, pulled vs framed uploads);
//! * every operation at every version against the fake store, and `Unsupported` (session
//!   still usable) below an operation's version;
//! * Lix 1.35 (trust byte, Lix version string, CA operations refused with `STDERR_ERROR`);
//! * faults: wrong magic, unknown stderr code, 2^63 lengths, replies cut then EOF, stalls,
//!   `STDERR_ERROR` in the middle of an upload. Each gives a typed error and leaves the
//!   session unusable, except the remote error, after which the session keeps working.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nixmux_proto::build_result::{BuildResult, BuildStatus, BuiltOutput};
use nixmux_proto::derivation::{BasicDerivation, DerivationOutput};
use nixmux_proto::derived_path::{DerivedPath, OutputsSpec};
use nixmux_proto::log::LogEvent;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::store_path::StorePath;
use nixmux_proto::worker::{
    self, ActivityResult, BuildMode, ClientOptions, DaemonInfo, DrvOutputId, Field, Missing,
    Realisation, StartActivity, StderrMsg, Trust,
};
use nixmux_proto::{Incompatible, Malformed, Misbehaved, ProtoError, ProtocolVersion};
use nixmux_session::{SessionConfig, SessionError, Upload, WorkerConfig, WorkerSession};
use support::fake::{
    Fault, HUGE, UNKNOWN_STDERR_CODE, W, WorkerFake, WorkerReport, dir, old_id, pipe, sample,
    sample_source, sp, wire,
};
use tokio::task::JoinHandle;

// ===== constants, hand-copied from the reference (not from the crate) =====

const MAGIC_1: u64 = 0x6e69_7863;
const MAGIC_2: u64 = 0x6478_696f;
const LAST: u64 = 0x616c_7473;
const ERROR: u64 = 0x6378_7470;
const NEXT: u64 = 0x6f6c_6d67;
const START: u64 = 0x5354_5254;
const RESULT: u64 = 0x5253_4c54;

const REALISATION_WITH_PATH: &str = "realisation-with-path-not-hash";

fn v(minor: u8) -> ProtocolVersion {
    ProtocolVersion::new(1, minor)
}

// ===== plumbing =====

fn config() -> SessionConfig {
    SessionConfig {
        idle_timeout: Duration::from_secs(5),
        build_idle_timeout: Some(Duration::from_secs(5)),
        ..SessionConfig::default()
    }
}

fn no_options() -> WorkerConfig {
    WorkerConfig {
        options: None,
        ..WorkerConfig::default()
    }
}

async fn connect_with(
    fake: WorkerFake,
    cfg: SessionConfig,
    wc: &WorkerConfig,
) -> (
    Result<WorkerSession, SessionError>,
    JoinHandle<WorkerReport>,
) {
    let (r, w, server) = pipe();
    let h = fake.spawn(server);
    let s = WorkerSession::handshake(r, w, dir(), cfg, wc, &mut |_| {}).await;
    (s, h)
}

async fn connect(fake: WorkerFake, wc: &WorkerConfig) -> (WorkerSession, JoinHandle<WorkerReport>) {
    let (s, h) = connect_with(fake, config(), wc).await;
    (s.expect("handshake"), h)
}

async fn finish(s: WorkerSession, h: JoinHandle<WorkerReport>) -> WorkerReport {
    s.close().await;
    h.await.expect("fake daemon task")
}

async fn report_after_failure(
    s: Option<WorkerSession>,
    h: JoinHandle<WorkerReport>,
) -> WorkerReport {
    drop(s);
    tokio::time::timeout(Duration::from_secs(5), h)
        .await
        .expect("the fake ends once the client is gone")
        .expect("fake daemon task")
}

fn proto_err(e: &SessionError) -> &ProtoError {
    match e {
        SessionError::Protocol { source, .. } => source,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

fn assert_too_long(e: &SessionError) {
    assert!(
        matches!(
            proto_err(e),
            ProtoError::Malformed {
                kind: Malformed::TooLong { len: HUGE, .. },
                ..
            }
        ),
        "{e:?}"
    );
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
        input_srcs: BTreeSet::new(),
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
        cpu_user: Some(Duration::from_micros(1_500_000)),
        cpu_system: Some(Duration::from_micros(250_000)),
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

/// What a result looks like after travelling at `n`: fields the version lacks are lost.
fn as_seen_at(res: &BuildResult, n: &worker::Negotiated) -> BuildResult {
    let layout = n.result_layout();
    let mut r = res.clone();
    if !layout.times {
        r.times_built = 0;
        r.is_non_deterministic = false;
        r.start_time = 0;
        r.stop_time = 0;
    }
    if !layout.cpu {
        r.cpu_user = None;
        r.cpu_system = None;
    }
    match layout.outputs {
        nixmux_proto::build_result::OutputsEncoding::Absent => r.built_outputs.clear(),
        nixmux_proto::build_result::OutputsEncoding::RealisationJson => {}
        nixmux_proto::build_result::OutputsEncoding::NameToPath => {
            for o in r.built_outputs.values_mut() {
                o.id = None;
                o.dependent_realisations.clear();
            }
        }
    }
    r
}

// ===== handshakes =====

/// The server's handshake bytes at negotiated version `n` from a daemon announcing `daemon`.
fn server_handshake(daemon: u8, n: u8, features: &[&str], info: &DaemonInfo) -> Vec<u8> {
    let mut items = vec![W::N(MAGIC_2), W::N(0x100 | u64::from(daemon))];
    if n >= 38 {
        items.push(W::L(features));
    }
    let version = info.nix_version.clone().unwrap_or_default();
    if n >= 33 {
        items.push(W::S(&version));
    }
    if n >= 35 {
        items.push(W::N(match info.trust {
            None => 0,
            Some(Trust::Trusted) => 1,
            Some(Trust::NotTrusted) => 2,
        }));
    }
    items.push(W::N(LAST));
    wire(&items)
}

#[tokio::test]
async fn handshake_bytes_at_every_version_boundary() {
    // Daemon versions around every boundary the client gates on (1.39: a daemon newer than
    // us, which must settle on our 1.38).
    for daemon in [
        21u8, 22, 23, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39,
    ] {
        let fake = WorkerFake::new(v(daemon));
        let info = fake.info.clone();
        let (s, h) = connect(fake, &no_options()).await;
        let n = daemon.min(38);
        assert_eq!(s.version(), v(n), "daemon 1.{daemon}");
        assert_eq!(
            s.daemon_info().nix_version.as_deref(),
            (n >= 33).then_some("2.8.0"),
            "1.{daemon}"
        );
        assert_eq!(
            s.daemon_info().trust,
            (n >= 35).then_some(Trust::Trusted),
            "1.{daemon}"
        );
        let rep = finish(s, h).await;
        let mut client = vec![W::N(MAGIC_1), W::N(0x126)];
        if n >= 38 {
            client.push(W::L(&[]));
        }
        client.extend([W::N(0), W::N(0)]);
        assert_eq!(rep.c2s, wire(&client), "client bytes, daemon 1.{daemon}");
        assert_eq!(
            rep.s2c,
            server_handshake(daemon, n, &[], &info),
            "server bytes, daemon 1.{daemon}"
        );
        assert_eq!(rep.end, Some(support::fake::End::Eof));
    }
}

#[tokio::test]
async fn handshake_refuses_daemons_we_cannot_use() {
    // 1.20 is below our minimum; major 2 is another protocol; a version word above 16 bits
    // is malformed.
    for (word, check) in [
        (
            0x114u64,
            (|e: &ProtoError| {
                matches!(
                    e,
                    ProtoError::Incompatible(Incompatible::TooOld { theirs, .. })
                        if *theirs == ProtocolVersion::new(1, 20)
                )
            }) as fn(&ProtoError) -> bool,
        ),
        (0x226, |e| {
            matches!(
                e,
                ProtoError::Incompatible(Incompatible::MajorVersion { .. })
            )
        }),
        (1 << 40, |e| matches!(e, ProtoError::Malformed { .. })),
    ] {
        let mut raw = Vec::new();
        raw.extend_from_slice(&MAGIC_2.to_le_bytes());
        raw.extend_from_slice(&word.to_le_bytes());
        let (r, w, mut server) = pipe();
        let writer = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut hello = [0u8; 16];
            server.read_exact(&mut hello).await.expect("client hello");
            server.write_all(&raw).await.expect("reply");
            let mut rest = Vec::new();
            let _ = server.read_to_end(&mut rest).await;
            hello
        });
        let e = WorkerSession::handshake(r, w, dir(), config(), &no_options(), &mut |_| {})
            .await
            .expect_err("refused");
        assert!(check(proto_err(&e)), "{word:#x}: {e:?}");
        let hello = writer.await.expect("task");
        assert_eq!(hello.to_vec(), wire(&[W::N(MAGIC_1), W::N(0x126)]));
    }
}

#[tokio::test]
async fn handshake_at_1_38_negotiates_the_shared_features() {
    let mut fake = WorkerFake::new(v(38));
    fake.features = BTreeSet::from([
        "delete-dead-specific-referrers".to_owned(),
        REALISATION_WITH_PATH.to_owned(),
    ]);
    fake.info.nix_version = Some("2.35.0".into());
    let info = fake.info.clone();
    let wc = WorkerConfig {
        features: BTreeSet::from([
            "made-up-feature".to_owned(),
            REALISATION_WITH_PATH.to_owned(),
        ]),
        options: None,
        ..WorkerConfig::default()
    };
    let (s, h) = connect(fake, &wc).await;
    assert_eq!(
        s.negotiated().features,
        BTreeSet::from([REALISATION_WITH_PATH.to_owned()])
    );
    let rep = finish(s, h).await;
    assert_eq!(
        rep.c2s,
        wire(&[
            W::N(MAGIC_1),
            W::N(0x126),
            W::L(&["made-up-feature", REALISATION_WITH_PATH]),
            W::N(0),
            W::N(0),
        ])
    );
    assert_eq!(
        rep.s2c,
        server_handshake(
            38,
            38,
            &["delete-dead-specific-referrers", REALISATION_WITH_PATH],
            &info
        )
    );
}

/// Announcing 1.37 sends the whole handshake and `SetOptions` in one write, before the
/// daemon's answer; `SetOptions` is exactly the reference layout.
#[tokio::test]
async fn pipelined_handshake_at_1_37_with_set_options() {
    for daemon in [21u8, 34, 37, 38] {
        let fake = WorkerFake::new(v(daemon));
        let info = fake.info.clone();
        let options = ClientOptions {
            keep_failed: true,
            keep_going: false,
            try_fallback: true,
            verbosity: 3,
            max_build_jobs: 4,
            max_silent_time: 600,
            verbose_build: true,
            build_cores: 2,
            use_substitutes: true,
            overrides: BTreeMap::from([("timeout".to_owned(), "3600".to_owned())]),
        };
        let wc = WorkerConfig {
            announce: v(37),
            features: BTreeSet::new(),
            options: Some(options.clone()),
        };
        let (s, h) = connect(fake, &wc).await;
        let n = daemon.min(37);
        assert_eq!(s.version(), v(n));
        let rep = finish(s, h).await;
        let expected = wire(&[
            W::N(MAGIC_1),
            W::N(0x125),
            W::N(0), // CPU affinity
            W::N(0), // reserveSpace
            W::N(19),
            W::N(1), // keepFailed
            W::N(0), // keepGoing
            W::N(1), // tryFallback
            W::N(3), // verbosity
            W::N(4), // maxBuildJobs
            W::N(600),
            W::N(1), // useBuildHook
            W::N(0), // verboseBuild → lvlError
            W::N(0), // logType
            W::N(0), // printBuildTrace
            W::N(2), // buildCores
            W::N(1), // useSubstitutes
            W::N(1),
            W::S("timeout"),
            W::S("3600"),
        ]);
        assert_eq!(rep.c2s, expected, "daemon 1.{daemon}");
        let mut server = server_handshake(daemon, n, &[], &info);
        server.extend(wire(&[W::N(LAST)])); // SetOptions
        assert_eq!(rep.s2c, server, "daemon 1.{daemon}");
        assert_eq!(rep.store.options, Some(options));
    }
}

#[tokio::test]
async fn lix_1_35_handshake_trust_and_version_string() {
    for (trust, word) in [
        (Some(Trust::Trusted), 1u64),
        (Some(Trust::NotTrusted), 2),
        (None, 0),
    ] {
        let mut fake = WorkerFake::new(v(35));
        fake.info = DaemonInfo {
            nix_version: Some("2.93.3".into()),
            trust,
        };
        // Lix greets with a message before LAST at times; it must reach the log callback.
        fake.startup = vec![StderrMsg::Next("warning: lix says hi\n".into())];
        let (r, w, server) = pipe();
        let h = fake.spawn(server);
        let mut logs = Vec::new();
        let s =
            WorkerSession::handshake(r, w, dir(), config(), &no_options(), &mut |e| logs.push(e))
                .await
                .expect("handshake");
        assert_eq!(s.version(), v(35));
        assert_eq!(s.daemon_info().nix_version.as_deref(), Some("2.93.3"));
        assert_eq!(s.daemon_info().trust, trust);
        assert_eq!(
            logs,
            [LogEvent::Line {
                activity: None,
                text: "warning: lix says hi".into()
            }]
        );
        let rep = finish(s, h).await;
        assert_eq!(
            rep.s2c,
            wire(&[
                W::N(MAGIC_2),
                W::N(0x123),
                W::S("2.93.3"),
                W::N(word),
                W::N(NEXT),
                W::S("warning: lix says hi\n"),
                W::N(LAST),
            ])
        );
    }
}

#[tokio::test]
async fn lix_refuses_ca_operations_and_the_session_stays_usable() {
    let mut fake = WorkerFake::new(v(35));
    fake.info.nix_version = Some("2.93.3".into());
    fake.refuse_ca = true;
    let p = sp(1, "present");
    let (info, nar) = sample(p.clone(), b"x", &[]);
    fake.store.add(info, nar);
    let (mut s, h) = connect(fake, &no_options()).await;
    let e = s
        .query_realisation(&old_id("out"), &mut |_| {})
        .await
        .expect_err("refused");
    match &e {
        SessionError::Remote(re) => {
            assert!(
                re.plain_message()
                    .contains("ca derivations are not supported")
            );
            assert_eq!(re.exit_status, None, "1.26+ errors have no exit status");
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.is_fatal());
    assert!(s.is_usable());
    let real = Realisation {
        id: old_id("out"),
        out_path: sp(2, "out"),
        signatures: BTreeSet::new(),
    };
    let e = s
        .register_drv_output(&real, &mut |_| {})
        .await
        .expect_err("refused");
    assert!(matches!(e, SessionError::Remote(_)), "{e:?}");
    assert!(s.is_usable());
    assert!(s.is_valid_path(&p, &mut |_| {}).await.expect("still works"));
    let rep = finish(s, h).await;
    assert_eq!(rep.requests.len(), 3);
}

// ===== request and reply bytes at the boundaries =====

fn path_str(p: &StorePath) -> String {
    p.to_absolute(&dir())
}

#[tokio::test]
async fn query_valid_paths_substitute_flag_from_1_27() {
    let a = sp(1, "a");
    let pa = path_str(&a);
    for (daemon, flag) in [(26u8, None), (27, Some(1u64)), (34, Some(1))] {
        let (mut s, h) = connect(WorkerFake::new(v(daemon)), &no_options()).await;
        let valid = s
            .query_valid_paths(&BTreeSet::from([a.clone()]), true, &mut |_| {})
            .await
            .expect("query");
        assert!(valid.is_empty());
        let rep = finish(s, h).await;
        let mut expected = vec![W::N(31), W::N(1), W::S(&pa)];
        if let Some(f) = flag {
            expected.push(W::N(f));
        }
        assert_eq!(rep.request_bytes[0], wire(&expected), "1.{daemon}");
        assert_eq!(
            rep.requests[0],
            worker::Request::QueryValidPaths {
                paths: BTreeSet::from([a.clone()]),
                substitute: flag.is_some(),
            }
        );
    }
}

#[tokio::test]
async fn derived_path_strings_from_1_30() {
    let drv = sp(3, "multi.drv");
    let opaque = sp(4, "src");
    let d = path_str(&drv);
    let o = path_str(&opaque);
    let targets = vec![
        DerivedPath::all_outputs(drv.clone()),
        DerivedPath::Built {
            drv: drv.clone(),
            outputs: OutputsSpec::Names(BTreeSet::from(["dev".to_owned(), "out".to_owned()])),
        },
        DerivedPath::Opaque(opaque.clone()),
    ];
    for daemon in [29u8, 30] {
        let mut fake = WorkerFake::new(v(daemon));
        let (info, nar) = sample(opaque.clone(), b"src", &[]);
        fake.store.add(info, nar);
        fake.store
            .builds
            .insert(drv.clone(), built(&sp(5, "multi")));
        let (mut s, h) = connect(fake, &no_options()).await;
        s.build_paths(&targets, BuildMode::Check, &mut |_| {})
            .await
            .expect("build");
        s.query_missing(&targets, &mut |_| {})
            .await
            .expect("missing");
        let rep = finish(s, h).await;
        let all = if daemon >= 30 {
            format!("{d}!*")
        } else {
            d.clone()
        };
        let some = format!("{d}!dev,out");
        let strs = [all.as_str(), some.as_str(), o.as_str()];
        assert_eq!(
            rep.request_bytes[0],
            wire(&[W::N(9), W::L(&strs), W::N(2)]),
            "BuildPaths at 1.{daemon}"
        );
        assert_eq!(
            rep.request_bytes[1],
            wire(&[W::N(40), W::L(&strs)]),
            "QueryMissing at 1.{daemon}"
        );
        // The fake decoded them back to the same targets.
        assert_eq!(
            rep.requests[0],
            worker::Request::BuildPaths {
                targets: targets.clone(),
                mode: BuildMode::Check
            }
        );
    }
}

#[tokio::test]
async fn error_layouts_before_and_from_1_26() {
    let a = sp(1, "a");
    for daemon in [25u8, 26, 34] {
        let mut fake = WorkerFake::new(v(daemon));
        let reply = if daemon < 26 {
            wire(&[
                W::N(NEXT),
                W::S("some log\n"),
                W::N(ERROR),
                W::S("\u{1b}[31;1merror:\u{1b}[0m boom"),
                W::N(102),
            ])
        } else {
            wire(&[
                W::N(ERROR),
                W::S("Error"),
                W::N(0),
                W::S("Error"),
                W::S("\u{1b}[31;1merror:\u{1b}[0m boom"),
                W::N(0),
                W::N(2),
                W::N(0),
                W::S("while doing A"),
                W::N(0),
                W::S("while doing B"),
            ])
        };
        let mut once = Some(reply);
        fake.script = Some(Box::new(move |req, _| match req {
            worker::Request::AddTempRoot { .. } => once.take(),
            _ => None,
        }));
        let (mut s, h) = connect(fake, &no_options()).await;
        let mut logs = Vec::new();
        let e = s
            .add_temp_root(&a, &mut |l| logs.push(l))
            .await
            .expect_err("remote error");
        let SessionError::Remote(re) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(re.plain_message(), "error: boom");
        if daemon < 26 {
            assert_eq!(re.exit_status, Some(102));
            assert!(re.traces.is_empty());
            assert_eq!(logs.len(), 1);
        } else {
            assert_eq!(re.exit_status, None);
            assert_eq!(re.traces, ["while doing A", "while doing B"]);
        }
        assert!(s.is_usable(), "a remote error keeps the session");
        // The next operation is answered by the fake's own encoder.
        s.add_temp_root(&a, &mut |_| {}).await.expect("works again");
        finish(s, h).await;
    }
}

/// `BuildDerivation` replies built by hand per the reference: times from 1.29, builtOutputs
/// from 1.28 (after the times), CPU times from 1.37.
#[tokio::test]
async fn build_result_fields_at_1_27_1_28_1_29_1_37() {
    let (drv_path, d, out) = drv();
    let json = format!(
        r#"{{"dependentRealisations":{{}},"id":"sha256:{}!out","outPath":"{out}","signatures":[]}}"#,
        "cd".repeat(32)
    );
    let id = format!("sha256:{}!out", "cd".repeat(32));
    for daemon in [27u8, 28, 29, 36, 37] {
        let mut items = vec![W::N(0), W::S("")];
        if daemon >= 29 {
            items.extend([W::N(1), W::N(0), W::N(1_700_000_000), W::N(1_700_000_005)]);
        }
        if daemon >= 37 {
            items.extend([W::N(1), W::N(1_500_000), W::N(1), W::N(250_000)]);
        }
        if daemon >= 28 {
            items.extend([W::N(1), W::S(&id), W::S(&json)]);
        }
        let mut reply = wire(&[W::N(LAST)]);
        reply.extend(wire(&items));
        let mut fake = WorkerFake::new(v(daemon));
        let mut once = Some(reply);
        fake.script = Some(Box::new(move |req, _| match req {
            worker::Request::BuildDerivation { .. } => once.take(),
            _ => None,
        }));
        let (mut s, h) = connect(fake, &no_options()).await;
        let res = s
            .build_derivation(&drv_path, &d, BuildMode::Normal, &mut |_| {})
            .await
            .expect("result");
        let n = s.negotiated().clone();
        assert_eq!(res, as_seen_at(&built(&out), &n), "1.{daemon}");
        assert!(s.is_usable());
        // And the same result from the fake's own encoder decodes to the same value.
        let rep = finish(s, h).await;
        assert_eq!(rep.requests.len(), 1);
        let mut fake = WorkerFake::new(v(daemon));
        fake.store.builds.insert(drv_path.clone(), built(&out));
        let (mut s, h) = connect(fake, &no_options()).await;
        let res2 = s
            .build_derivation(&drv_path, &d, BuildMode::Normal, &mut |_| {})
            .await
            .expect("result");
        assert_eq!(res2, res, "1.{daemon}");
        // The request: path, BasicDerivation, build mode.
        let rep = finish(s, h).await;
        let mut req = wire(&[W::N(36), W::S(&path_str(&drv_path))]);
        let op = path_str(&out);
        req.extend(wire(&[
            W::N(1),
            W::S("out"),
            W::S(&op),
            W::S(""),
            W::S(""),
            W::N(0),
            W::S("x86_64-linux"),
            W::S("/bin/sh"),
            W::L(&["-c", "echo hi > $out"]),
            W::N(1),
            W::S("out"),
            W::S(&op),
            W::N(0),
        ]));
        assert_eq!(rep.request_bytes[0], req);
    }
}

#[tokio::test]
async fn realisation_encodings_1_27_1_31_and_the_1_38_feature() {
    let out = sp(9, "ca-out");
    let drv_path = sp(10, "ca.drv");
    let id = old_id("out");
    let id_str = id.to_old_string().expect("old id");
    let base = out.to_string();
    let json = format!(
        r#"{{"dependentRealisations":{{}},"id":"{id_str}","outPath":"{base}","signatures":["k:sig"]}}"#
    );
    let sigs = BTreeSet::from(["k:sig".to_owned()]);

    // 1.27–1.30: id string and out path; the reply is a path set.
    // 1.31–1.38 without the feature: JSON both ways.
    // 1.38 with the feature: drv path and output name; reply tag, path, signatures.
    for (daemon, feature) in [
        (27u8, false),
        (30, false),
        (31, false),
        (38, false),
        (38, true),
    ] {
        let real = Realisation {
            id: if feature {
                DrvOutputId::Path {
                    drv_path: drv_path.clone(),
                    output: "out".into(),
                }
            } else {
                id.clone()
            },
            out_path: out.clone(),
            signatures: if daemon >= 31 {
                sigs.clone()
            } else {
                BTreeSet::new()
            },
        };
        let mut fake = WorkerFake::new(v(daemon));
        let wc = if feature {
            fake.features = BTreeSet::from([REALISATION_WITH_PATH.to_owned()]);
            WorkerConfig {
                features: BTreeSet::from([REALISATION_WITH_PATH.to_owned()]),
                options: None,
                ..WorkerConfig::default()
            }
        } else {
            no_options()
        };
        let (mut s, h) = connect(fake, &wc).await;
        s.register_drv_output(&real, &mut |_| {})
            .await
            .expect("register");
        let got = s
            .query_realisation(&real.id, &mut |_| {})
            .await
            .expect("query");
        assert_eq!(got.as_ref(), Some(&real), "1.{daemon} feature={feature}");
        let other = match &real.id {
            DrvOutputId::Path { drv_path, .. } => DrvOutputId::Path {
                drv_path: drv_path.clone(),
                output: "dev".into(),
            },
            DrvOutputId::HashModulo { .. } => old_id("dev"),
        };
        let missing = s
            .query_realisation(&other, &mut |_| {})
            .await
            .expect("query");
        assert_eq!(missing, None);
        let rep = finish(s, h).await;
        let dp = path_str(&drv_path);
        let op = path_str(&out);
        let (register, query, answer) = if feature {
            (
                wire(&[
                    W::N(42),
                    W::S(&dp),
                    W::S("out"),
                    W::S(&op),
                    W::L(&["k:sig"]),
                ]),
                wire(&[W::N(43), W::S(&dp), W::S("out")]),
                wire(&[W::N(LAST), W::N(1), W::S(&op), W::L(&["k:sig"])]),
            )
        } else if daemon >= 31 {
            (
                wire(&[W::N(42), W::S(&json)]),
                wire(&[W::N(43), W::S(&id_str)]),
                wire(&[W::N(LAST), W::L(&[json.as_str()])]),
            )
        } else {
            (
                wire(&[W::N(42), W::S(&id_str), W::S(&op)]),
                wire(&[W::N(43), W::S(&id_str)]),
                wire(&[W::N(LAST), W::L(&[op.as_str()])]),
            )
        };
        assert_eq!(rep.request_bytes[0], register, "1.{daemon} {feature}");
        assert_eq!(rep.request_bytes[1], query, "1.{daemon} {feature}");
        // The fake's replies: RegisterDrvOutput (nothing), the query (found), the query
        // (not found: tag 0, empty JSON list or empty path set, all one 0 word).
        let mut tail = wire(&[W::N(LAST)]);
        tail.extend(&answer);
        tail.extend(wire(&[W::N(LAST), W::N(0)]));
        assert!(rep.s2c.ends_with(&tail), "1.{daemon} {feature}");
    }
}

/// A realisation id of the form the connection does not use is refused before anything is
/// sent (it used to be encoded as an empty id, which the daemon cannot parse, and the session
/// was lost); the session stays usable.
#[tokio::test]
async fn realisation_ids_of_the_wrong_form_are_refused_locally() {
    let path_id = DrvOutputId::Path {
        drv_path: sp(10, "ca.drv"),
        output: "out".into(),
    };
    let real = |id: &DrvOutputId| Realisation {
        id: id.clone(),
        out_path: sp(9, "ca-out"),
        signatures: BTreeSet::new(),
    };
    for (daemon, feature, id) in [
        (27u8, false, path_id.clone()),
        (31, false, path_id.clone()),
        (38, false, path_id.clone()),
        (38, true, old_id("out")),
    ] {
        let mut fake = WorkerFake::new(v(daemon));
        let mut wc = no_options();
        if feature {
            fake.features = BTreeSet::from([REALISATION_WITH_PATH.to_owned()]);
            wc.features = fake.features.clone();
        }
        let (mut s, h) = connect(fake, &wc).await;
        let e = s
            .query_realisation(&id, &mut |_| {})
            .await
            .expect_err("wrong id form");
        assert!(
            matches!(
                e,
                SessionError::Unsupported(Incompatible::FeatureMismatch { .. })
            ),
            "1.{daemon}: {e:?}"
        );
        let e = s
            .register_drv_output(&real(&id), &mut |_| {})
            .await
            .expect_err("wrong id form");
        assert!(matches!(e, SessionError::Unsupported(_)), "{e:?}");
        assert!(s.is_usable());
        assert!(
            !s.is_valid_path(&sp(1, "a"), &mut |_| {})
                .await
                .expect("in sync")
        );
        let rep = finish(s, h).await;
        assert_eq!(rep.requests.len(), 1, "only IsValidPath went out");
        assert_eq!(rep.end, Some(support::fake::End::Eof));
    }
}

/// Below 1.27 the realisation operations do not exist: `Unsupported`, nothing sent, the
/// session stays usable. Same for AddMultipleToStore below 1.32 and BuildPathsWithResults
/// below 1.34.
#[tokio::test]
async fn operations_below_their_version_are_unsupported() {
    let (mut s, h) = connect(WorkerFake::new(v(26)), &no_options()).await;
    let e = s
        .query_realisation(&old_id("out"), &mut |_| {})
        .await
        .expect_err("1.26");
    assert!(
        matches!(
            &e,
            SessionError::Unsupported(Incompatible::OperationUnsupported { needs, .. })
                if *needs == v(27)
        ),
        "{e:?}"
    );
    assert!(s.is_usable());
    let rep = finish(s, h).await;
    assert!(rep.requests.is_empty());

    let (mut s, h) = connect(WorkerFake::new(v(31)), &no_options()).await;
    let e = s
        .add_multiple_to_store(&mut [], false, false, &mut |_| {})
        .await
        .expect_err("1.31");
    assert!(matches!(e, SessionError::Unsupported(_)), "{e:?}");
    assert!(s.is_usable());
    finish(s, h).await;

    let (mut s, h) = connect(WorkerFake::new(v(33)), &no_options()).await;
    let e = s
        .build_paths_with_results(&[], BuildMode::Normal, &mut |_| {})
        .await
        .expect_err("1.33");
    assert!(matches!(e, SessionError::Unsupported(_)), "{e:?}");
    assert!(s.is_usable());
    let rep = finish(s, h).await;
    assert!(rep.requests.is_empty());
}

/// 1.21–1.22: the daemon pulls the NAR with `STDERR_READ`; from 1.23 it is framed.
#[tokio::test]
async fn add_to_store_nar_pulled_at_1_21_1_22_framed_from_1_23() {
    let p = sp(11, "upload");
    let contents = vec![b'z'; 100_000];
    let (info, nar) = sample(p.clone(), &contents, &[]);
    for daemon in [21u8, 22, 23, 34] {
        let mut fake = WorkerFake::new(v(daemon));
        fake.pull_chunk = 32 << 10;
        let (mut s, h) = connect(fake, &no_options()).await;
        let mut src: &[u8] = &nar;
        let mut up = Upload {
            info: info.clone(),
            nar: &mut src,
        };
        s.add_to_store_nar(&mut up, false, true, &mut |_| {})
            .await
            .expect("upload");
        assert!(s.is_valid_path(&p, &mut |_| {}).await.expect("valid"));
        let rep = finish(s, h).await;
        let seen = &rep.uploads[0];
        assert_eq!(seen.data_bytes, nar.len() as u64);
        assert!(!seen.failed);
        if daemon < 23 {
            assert_eq!(seen.frames, 0);
            // One READ per 32 KiB the daemon asks for.
            assert_eq!(seen.reads, nar.len().div_ceil(32 << 10), "1.{daemon}");
            // The client answered each READ with exactly one string of at most 32 KiB:
            // the request header, then the answers.
            let header = &rep.request_bytes[0];
            let answers = &rep.c2s[16 + 16 + header.len()..];
            let mut expect = Vec::new();
            for chunk in nar.chunks(32 << 10) {
                expect.extend_from_slice(&(chunk.len() as u64).to_le_bytes());
                expect.extend_from_slice(chunk);
                expect.resize(expect.len() + (8 - chunk.len() % 8) % 8, 0);
            }
            // Then IsValidPath.
            assert_eq!(&answers[..expect.len()], &expect[..], "1.{daemon}");
        } else {
            assert!(seen.terminated);
            assert_eq!(seen.reads, 0);
            assert_eq!(seen.frames, nar.len().div_ceil(64 << 10));
        }
        assert!(rep.store.paths.contains_key(&p));
    }
}

/// A daemon asking for 2^63 bytes with `STDERR_READ` gets at most what is left (and the
/// client does not allocate what it asked for).
#[tokio::test]
async fn stderr_read_of_2_pow_63_is_harmless() {
    let p = sp(12, "upload");
    let (info, nar) = sample(p.clone(), &[7u8; 5000], &[]);
    let mut fake = WorkerFake::new(v(22));
    fake.pull_chunk = HUGE;
    let (mut s, h) = connect(fake, &no_options()).await;
    let mut src: &[u8] = &nar;
    let mut up = Upload {
        info,
        nar: &mut src,
    };
    s.add_to_store_nar(&mut up, false, false, &mut |_| {})
        .await
        .expect("upload");
    let rep = finish(s, h).await;
    assert_eq!(rep.uploads[0].reads, 1);
    assert!(rep.store.paths.contains_key(&p));
}

// ===== every operation at every version =====

struct Fixture {
    a: StorePath,
    b: StorePath,
    absent: StorePath,
    a_item: (PathInfo, Vec<u8>),
    b_item: (PathInfo, Vec<u8>),
    c_item: (PathInfo, Vec<u8>),
    d_item: (PathInfo, Vec<u8>),
}

fn fixture() -> Fixture {
    let a = sp(1, "a");
    let b = sp(2, "b");
    let mut a_item = sample(a.clone(), b"alpha\n", &[]);
    a_item.0.sigs = BTreeSet::from(["cache:c2ln".to_owned()]);
    a_item.0.ca = Some(format!("text:sha256:{}", "1".repeat(52)));
    a_item.0.deriver = Some(sp(20, "a.drv"));
    let b_item = sample(b.clone(), b"beta\n", &[&a, &b]);
    let c = sp(3, "c");
    let c_item = sample(c, &[1u8; 70_000], &[&a]);
    let d = sp(4, "d");
    let d_item = sample(d.clone(), b"delta", &[&d]);
    Fixture {
        a,
        b,
        absent: sp(5, "absent"),
        a_item,
        b_item,
        c_item,
        d_item,
    }
}

/// What a path info looks like after travelling at `v` (registration time, ultimate, sigs
/// and ca are all carried from 1.16, i.e. at every version we accept).
fn expect_info(info: &PathInfo) -> PathInfo {
    info.clone()
}

#[tokio::test]
async fn every_operation_at_every_version() {
    let versions: &[(u8, bool)] = &[
        (21, false),
        (22, false),
        (23, false),
        (25, false),
        (26, false),
        (27, false),
        (28, false),
        (29, false),
        (30, false),
        (31, false),
        (32, false),
        (33, false),
        (34, false),
        (35, false),
        (37, false),
        (38, false),
        (38, true),
    ];
    for &(daemon, feature) in versions {
        let f = fixture();
        let (drv_path, d, out) = drv();
        let mut fake = WorkerFake::new(v(daemon));
        fake.store.add(f.a_item.0.clone(), f.a_item.1.clone());
        fake.store.add(f.b_item.0.clone(), f.b_item.1.clone());
        fake.store.builds.insert(drv_path.clone(), built(&out));
        fake.store.missing = Missing {
            will_build: BTreeSet::from([drv_path.clone()]),
            will_substitute: BTreeSet::new(),
            unknown: BTreeSet::from([f.absent.clone()]),
            download_size: 12,
            nar_size: 34,
        };
        fake.op_logs = vec![
            StderrMsg::StartActivity(StartActivity {
                id: 7,
                level: 3,
                kind: 105,
                text: "building".into(),
                fields: vec![
                    Field::Str(path_str(&drv_path)),
                    Field::Str(String::new()),
                    Field::Int(1),
                    Field::Int(1),
                ],
                parent: 0,
            }),
            StderrMsg::Result(ActivityResult {
                id: 7,
                kind: 101,
                fields: vec![Field::Str("a log line".into())],
            }),
            StderrMsg::StopActivity(7),
        ];
        let mut wc = WorkerConfig::default();
        if feature {
            fake.features = BTreeSet::from([REALISATION_WITH_PATH.to_owned()]);
            wc.features = fake.features.clone();
        }
        let (mut s, h) = connect(fake, &wc).await;
        let n = s.negotiated().clone();
        let ctx = format!("1.{daemon} feature={feature}");
        let mut logs = Vec::new();
        let mut log = |e: LogEvent| logs.push(e);

        assert!(s.is_valid_path(&f.a, &mut log).await.expect(&ctx));
        assert!(!s.is_valid_path(&f.absent, &mut log).await.expect(&ctx));
        let all = BTreeSet::from([f.a.clone(), f.b.clone(), f.absent.clone()]);
        assert_eq!(
            s.query_valid_paths(&all, true, &mut log).await.expect(&ctx),
            BTreeSet::from([f.a.clone(), f.b.clone()])
        );
        assert_eq!(
            s.query_path_info(&f.a, &mut log).await.expect(&ctx),
            Some(expect_info(&f.a_item.0)),
            "{ctx}"
        );
        assert_eq!(
            s.query_path_info(&f.absent, &mut log).await.expect(&ctx),
            None
        );
        assert_eq!(
            s.query_path_infos(&all, &mut log).await.expect(&ctx),
            vec![expect_info(&f.a_item.0), expect_info(&f.b_item.0)]
        );
        assert_eq!(
            s.query_path_from_hash_part(&f.b.hash_part(), &mut log)
                .await
                .expect(&ctx),
            Some(f.b.clone())
        );
        assert_eq!(
            s.query_path_from_hash_part(&f.absent.hash_part(), &mut log)
                .await
                .expect(&ctx),
            None
        );
        s.add_temp_root(&f.a, &mut log).await.expect(&ctx);
        s.ensure_path(&f.a, &mut log).await.expect(&ctx);
        let e = s.ensure_path(&f.absent, &mut log).await.expect_err(&ctx);
        assert!(matches!(e, SessionError::Remote(_)), "{ctx}: {e:?}");
        s.add_signatures(&f.a, &BTreeSet::from(["k:new".to_owned()]), &mut log)
            .await
            .expect(&ctx);
        let mut sink = Vec::new();
        let sum = s
            .nar_from_path(&f.b, &mut sink, &mut log)
            .await
            .expect(&ctx);
        assert_eq!(sink, f.b_item.1);
        assert_eq!(
            (sum.nar_size, sum.nar_hash),
            (f.b_item.0.nar_size, Some(f.b_item.0.nar_hash))
        );
        let e = s
            .nar_from_path(&f.absent, &mut Vec::new(), &mut log)
            .await
            .expect_err(&ctx);
        assert!(matches!(e, SessionError::Remote(_)), "{ctx}: {e:?}");

        // Uploads: AddToStoreNar always; AddMultipleToStore from 1.32.
        let mut src: &[u8] = &f.c_item.1;
        let mut up = Upload {
            info: f.c_item.0.clone(),
            nar: &mut src,
        };
        s.add_to_store_nar(&mut up, false, true, &mut log)
            .await
            .expect(&ctx);
        let mut src: &[u8] = &f.d_item.1;
        let mut ups = [Upload {
            info: f.d_item.0.clone(),
            nar: &mut src,
        }];
        let multi = s
            .add_multiple_to_store(&mut ups, false, true, &mut log)
            .await;
        if daemon >= 32 {
            multi.expect(&ctx);
            assert!(
                s.is_valid_path(&f.d_item.0.path, &mut log)
                    .await
                    .expect(&ctx)
            );
        } else {
            assert!(matches!(multi, Err(SessionError::Unsupported(_))), "{ctx}");
        }
        assert!(
            s.is_valid_path(&f.c_item.0.path, &mut log)
                .await
                .expect(&ctx)
        );
        // A plain source, with a path that goes as a NAR: by content from 1.25.
        let source = sample_source("source", b"source\n");
        let (mut src1, mut src2): (&[u8], &[u8]) = (&source.1, &f.c_item.1);
        let mut ups = [
            Upload {
                info: source.0.clone(),
                nar: &mut src1,
            },
            Upload {
                info: f.c_item.0.clone(),
                nar: &mut src2,
            },
        ];
        s.add_paths(&mut ups, false, true, &mut log)
            .await
            .expect(&ctx);
        assert!(s.is_valid_path(&source.0.path, &mut log).await.expect(&ctx));

        // Builds.
        let res = s
            .build_derivation(&drv_path, &d, BuildMode::Normal, &mut log)
            .await
            .expect(&ctx);
        assert_eq!(res, as_seen_at(&built(&out), &n), "{ctx}");
        let targets = vec![
            DerivedPath::all_outputs(drv_path.clone()),
            DerivedPath::Opaque(f.a.clone()),
        ];
        s.build_paths(&targets, BuildMode::Normal, &mut log)
            .await
            .expect(&ctx);
        let keyed = s
            .build_paths_with_results(&targets, BuildMode::Normal, &mut log)
            .await;
        if daemon >= 34 {
            let keyed = keyed.expect(&ctx);
            assert_eq!(keyed.len(), 2);
            assert_eq!(keyed[0].0, targets[0]);
            let mut want = as_seen_at(&built(&out), &n);
            // Keyed results always carry the times (the op needs 1.34 > 1.29).
            want.times_built = 1;
            want.start_time = 1_700_000_000;
            want.stop_time = 1_700_000_005;
            assert_eq!(keyed[0].1, want, "{ctx}");
            assert_eq!(keyed[1].1.status, BuildStatus::AlreadyValid);
        } else {
            assert!(matches!(keyed, Err(SessionError::Unsupported(_))), "{ctx}");
        }
        let missing = s.query_missing(&targets, &mut log).await.expect(&ctx);
        assert_eq!(missing.will_build, BTreeSet::from([drv_path.clone()]));
        assert_eq!((missing.download_size, missing.nar_size), (12, 34));

        // Realisations from 1.27.
        let real = Realisation {
            id: if feature {
                DrvOutputId::Path {
                    drv_path: drv_path.clone(),
                    output: "out".into(),
                }
            } else {
                old_id("out")
            },
            out_path: out.clone(),
            signatures: BTreeSet::new(),
        };
        let reg = s.register_drv_output(&real, &mut log).await;
        let q = s.query_realisation(&real.id, &mut log).await;
        if daemon >= 27 {
            reg.expect(&ctx);
            assert_eq!(q.expect(&ctx), Some(real.clone()), "{ctx}");
        } else {
            assert!(matches!(reg, Err(SessionError::Unsupported(_))), "{ctx}");
            assert!(matches!(q, Err(SessionError::Unsupported(_))), "{ctx}");
        }
        s.set_options(&ClientOptions::default(), &mut log)
            .await
            .expect(&ctx);
        assert!(s.is_usable(), "{ctx}");

        // Logs: every operation carried a build activity with one log line.
        let lines = logs
            .iter()
            .filter(
                |e| matches!(e, LogEvent::Line { activity: Some(7), text } if text == "a log line"),
            )
            .count();
        assert!(lines >= 15, "{ctx}: {lines} log lines");
        assert!(logs.iter().any(|e| matches!(
            e,
            LogEvent::Start { id: 7, kind: 105, drv_path: Some(p), .. } if *p == path_str(&drv_path)
        )));

        let rep = finish(s, h).await;
        assert_eq!(rep.end, Some(support::fake::End::Eof), "{ctx}");
        assert!(rep.store.temp_roots.contains(&f.a));
        assert!(rep.store.paths[&f.a].0.sigs.contains("k:new"));
        let by_content = rep
            .requests
            .iter()
            .filter(|r| matches!(r, worker::Request::AddToStore { .. }))
            .count();
        assert_eq!(by_content, usize::from(daemon >= 25), "{ctx}");
        assert_eq!(rep.store.paths[&source.0.path].0.ca, source.0.ca, "{ctx}");
    }
}

// ===== faults =====

#[tokio::test]
async fn wrong_magic_is_a_typed_handshake_error() {
    let mut fake = WorkerFake::new(v(34));
    fake.fault = Some(Fault::WrongMagic);
    let (s, h) = connect_with(fake, config(), &no_options()).await;
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

#[tokio::test]
async fn huge_lengths_in_the_handshake() {
    for (daemon, bytes) in [
        // The version string.
        (34u8, wire(&[W::N(HUGE)])),
        // A startup message's text.
        (34, wire(&[W::S("2.8.0"), W::N(NEXT), W::N(HUGE)])),
        // The feature list at 1.38 is read before: checked by the stall tests; here the
        // trust byte is followed by an activity with 2^63 fields.
        (
            35,
            wire(&[
                W::S("2.93.3"),
                W::N(1),
                W::N(START),
                W::N(1),
                W::N(0),
                W::N(0),
                W::S(""),
                W::N(HUGE),
            ]),
        ),
    ] {
        let mut fake = WorkerFake::new(v(daemon));
        fake.fault = Some(Fault::ReplaceHandshake(bytes));
        let (s, h) = connect_with(fake, config(), &no_options()).await;
        let e = s.expect_err("too long");
        assert_too_long(&e);
        report_after_failure(None, h).await;
    }
}

/// A fault in the reply to an operation: typed error, session unusable, later calls fail
/// with `Poisoned`.
async fn op_fault(
    daemon: u8,
    fault: Fault,
    cfg: SessionConfig,
    op: impl AsyncFnOnce(&mut WorkerSession) -> Result<(), SessionError>,
) -> (SessionError, WorkerReport) {
    let f = fixture();
    let mut fake = WorkerFake::new(v(daemon));
    fake.store.add(f.a_item.0.clone(), f.a_item.1.clone());
    fake.fault = Some(fault);
    let (s, h) = connect_with(fake, cfg, &WorkerConfig::default()).await;
    let mut s = s.expect("handshake");
    let e = op(&mut s).await.expect_err("fault");
    assert!(e.is_fatal(), "{e:?}");
    assert!(!s.is_usable());
    let again = s
        .is_valid_path(&f.a, &mut |_| {})
        .await
        .expect_err("poisoned");
    assert!(matches!(again, SessionError::Poisoned), "{again:?}");
    let rep = report_after_failure(Some(s), h).await;
    (e, rep)
}

#[tokio::test]
async fn unknown_stderr_code_poisons_the_session() {
    for daemon in [21u8, 34, 38] {
        let (e, _) = op_fault(daemon, Fault::UnknownStderrCode, config(), async |s| {
            s.is_valid_path(&sp(1, "a"), &mut |_| {}).await.map(|_| ())
        })
        .await;
        assert!(
            matches!(
                proto_err(&e),
                ProtoError::Misbehaved(Misbehaved::UnknownStderrCode(UNKNOWN_STDERR_CODE))
            ),
            "{e:?}"
        );
    }
    // Activity codes do not exist below 1.20; at 1.21 they do. A STDERR_WRITE outside an
    // operation that transfers data is a protocol error too.
    let (e, _) = op_fault(
        34,
        Fault::Replace(wire(&[W::N(0x6461_7416), W::S("data")])),
        config(),
        async |s| s.is_valid_path(&sp(1, "a"), &mut |_| {}).await.map(|_| ()),
    )
    .await;
    assert!(
        matches!(
            proto_err(&e),
            ProtoError::Misbehaved(Misbehaved::Unexpected(_))
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn lengths_of_2_pow_63_are_refused_before_allocation() {
    type Op = fn(
        &mut WorkerSession,
    )
        -> std::pin::Pin<Box<dyn Future<Output = Result<(), SessionError>> + Send + '_>>;
    let valid: Op = |s| {
        Box::pin(async move {
            s.query_valid_paths(&BTreeSet::from([sp(1, "a")]), false, &mut |_| {})
                .await
                .map(|_| ())
        })
    };
    let info: Op = |s| {
        Box::pin(async move {
            s.query_path_info(&sp(1, "a"), &mut |_| {})
                .await
                .map(|_| ())
        })
    };
    let nar: Op = |s| {
        Box::pin(async move {
            s.nar_from_path(&sp(1, "a"), &mut Vec::new(), &mut |_| {})
                .await
                .map(|_| ())
        })
    };
    let keyed: Op = |s| {
        Box::pin(async move {
            s.build_paths_with_results(&[], BuildMode::Normal, &mut |_| {})
                .await
                .map(|_| ())
        })
    };
    let build: Op = |s| {
        Box::pin(async move {
            let (p, d, _) = drv();
            s.build_derivation(&p, &d, BuildMode::Normal, &mut |_| {})
                .await
                .map(|_| ())
        })
    };
    let cases: Vec<(&str, Vec<u8>, Op)> = vec![
        ("STDERR_NEXT text", wire(&[W::N(NEXT), W::N(HUGE)]), valid),
        (
            "activity text",
            wire(&[W::N(START), W::N(1), W::N(0), W::N(105), W::N(HUGE)]),
            valid,
        ),
        (
            "activity fields",
            wire(&[
                W::N(START),
                W::N(1),
                W::N(0),
                W::N(105),
                W::S("b"),
                W::N(HUGE),
            ]),
            valid,
        ),
        (
            "result fields",
            wire(&[W::N(RESULT), W::N(1), W::N(101), W::N(HUGE)]),
            valid,
        ),
        (
            "result field string",
            wire(&[
                W::N(RESULT),
                W::N(1),
                W::N(101),
                W::N(1),
                W::N(1),
                W::N(HUGE),
            ]),
            valid,
        ),
        (
            "error message",
            wire(&[
                W::N(ERROR),
                W::S("Error"),
                W::N(0),
                W::S("Error"),
                W::N(HUGE),
            ]),
            valid,
        ),
        (
            "error traces",
            wire(&[
                W::N(ERROR),
                W::S("Error"),
                W::N(0),
                W::S("Error"),
                W::S("m"),
                W::N(0),
                W::N(HUGE),
            ]),
            valid,
        ),
        ("path set count", wire(&[W::N(LAST), W::N(HUGE)]), valid),
        (
            "path in a set",
            wire(&[W::N(LAST), W::N(1), W::N(HUGE)]),
            valid,
        ),
        (
            "path info deriver",
            wire(&[W::N(LAST), W::N(1), W::N(HUGE)]),
            info,
        ),
        (
            "path info references",
            wire(&[
                W::N(LAST),
                W::N(1),
                W::S(""),
                W::S(&"0".repeat(64)),
                W::N(HUGE),
            ]),
            info,
        ),
        (
            "path info signatures",
            wire(&[
                W::N(LAST),
                W::N(1),
                W::S(""),
                W::S(&"0".repeat(64)),
                W::N(0),
                W::N(0),
                W::N(8),
                W::N(0),
                W::N(HUGE),
            ]),
            info,
        ),
        (
            "NAR file size",
            {
                let mut b = wire(&[W::N(LAST), W::S("nix-archive-1"), W::S("("), W::S("type")]);
                b.extend(wire(&[W::S("regular"), W::S("contents"), W::N(HUGE)]));
                b
            },
            nar,
        ),
        (
            "NAR entry name",
            wire(&[
                W::N(LAST),
                W::S("nix-archive-1"),
                W::S("("),
                W::S("type"),
                W::S("directory"),
                W::S("entry"),
                W::S("("),
                W::S("name"),
                W::N(HUGE),
            ]),
            nar,
        ),
        (
            "keyed results count",
            wire(&[W::N(LAST), W::N(HUGE)]),
            keyed,
        ),
        (
            "build result message",
            wire(&[W::N(LAST), W::N(0), W::N(HUGE)]),
            build,
        ),
        (
            "built outputs count",
            wire(&[
                W::N(LAST),
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
    ];
    for (what, bytes, op) in cases {
        let (e, rep) = op_fault(34, Fault::Replace(bytes), config(), async |s| op(s).await).await;
        let msg = format!("{what}: {e:?}");
        assert!(
            matches!(
                proto_err(&e),
                ProtoError::Malformed {
                    kind: Malformed::TooLong { len: HUGE, .. },
                    ..
                }
            ),
            "{msg}"
        );
        assert_eq!(rep.end, Some(support::fake::End::Eof), "{what}");
    }
}

#[tokio::test]
async fn a_reply_cut_then_eof_is_closed() {
    let f = fixture();
    // Cut the QueryPathInfo reply at every length (after STDERR_LAST and before).
    let mut full = Vec::new();
    worker::write_query_path_info(
        &mut full,
        &dir(),
        &worker::Negotiated::new(v(34)),
        Some(&f.a_item.0),
    );
    for cut in [0usize, 3, 8, 9, 16, 40, full.len() / 2, full.len() + 7] {
        let (e, rep) = op_fault(34, Fault::CutReply(cut), config(), async |s| {
            s.query_path_info(&sp(1, "a"), &mut |_| {})
                .await
                .map(|_| ())
        })
        .await;
        assert!(matches!(e, SessionError::Closed { .. }), "cut {cut}: {e:?}");
        assert_eq!(rep.end, Some(support::fake::End::ClosedByFake));
    }
    // In the middle of a NAR.
    let (e, _) = op_fault(34, Fault::CutReply(100), config(), async |s| {
        s.nar_from_path(&sp(1, "a"), &mut Vec::new(), &mut |_| {})
            .await
            .map(|_| ())
    })
    .await;
    assert!(matches!(e, SessionError::Closed { .. }), "{e:?}");
}

#[tokio::test]
async fn a_stalled_daemon_hits_the_idle_timeout() {
    let cfg = SessionConfig {
        idle_timeout: Duration::from_millis(200),
        ..config()
    };
    let started = std::time::Instant::now();
    let (e, rep) = op_fault(34, Fault::Stall, cfg.clone(), async |s| {
        s.query_valid_paths(&BTreeSet::from([sp(1, "a")]), false, &mut |_| {})
            .await
            .map(|_| ())
    })
    .await;
    assert!(
        matches!(e, SessionError::Timeout { after, .. } if after == Duration::from_millis(200)),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(rep.end, Some(support::fake::End::Eof));

    // A stall in the handshake.
    let mut fake = WorkerFake::new(v(34));
    fake.fault = Some(Fault::ReplaceHandshake(Vec::new()));
    let (s, h) = connect_with(fake, cfg, &no_options()).await;
    let e = s.expect_err("timeout");
    assert!(matches!(e, SessionError::Timeout { .. }), "{e:?}");
    report_after_failure(None, h).await;
}

/// `STDERR_ERROR` while the client is still sending frames: the client stops sending data but
/// still ends the framed stream, reports the remote error, and the session stays usable.
#[tokio::test]
async fn error_in_the_middle_of_a_framed_upload() {
    let big = vec![0x5au8; 4 << 20];
    for (daemon, multiple) in [(23u8, false), (34, false), (34, true), (38, true)] {
        let p = sp(13, "big");
        let (info, nar) = sample(p.clone(), &big, &[]);
        let mut fake = WorkerFake::new(v(daemon));
        fake.fault = Some(Fault::ErrorMidUpload);
        let (mut s, h) = connect(fake, &no_options()).await;
        let mut src: &[u8] = &nar;
        let mut up = Upload {
            info: info.clone(),
            nar: &mut src,
        };
        let r = if multiple {
            s.add_multiple_to_store(std::slice::from_mut(&mut up), false, false, &mut |_| {})
                .await
        } else {
            s.add_to_store_nar(&mut up, false, false, &mut |_| {}).await
        };
        let e = r.expect_err("refused");
        match &e {
            SessionError::Remote(re) => {
                assert!(re.plain_message().contains("refuses this upload"), "{re:?}");
            }
            other => panic!("1.{daemon}: {other:?}"),
        }
        assert!(s.is_usable(), "1.{daemon}");
        // The session is in sync: the next operations work.
        assert!(!s.is_valid_path(&p, &mut |_| {}).await.expect("next op"));
        let (info2, nar2) = sample(sp(14, "small"), b"small", &[]);
        let mut src2: &[u8] = &nar2;
        let mut up2 = Upload {
            info: info2,
            nar: &mut src2,
        };
        s.add_to_store_nar(&mut up2, false, false, &mut |_| {})
            .await
            .expect("upload after the error");
        let rep = finish(s, h).await;
        let seen = &rep.uploads[0];
        assert!(seen.failed);
        assert!(seen.terminated, "1.{daemon}: the 0 terminator arrived");
        assert!(
            seen.data_bytes < nar.len() as u64,
            "1.{daemon}: the client stopped early ({} of {} bytes)",
            seen.data_bytes,
            nar.len()
        );
        assert_eq!(rep.uploads.len(), 2);
        assert!(rep.uploads[1].terminated && !rep.uploads[1].failed);
        assert_eq!(rep.end, Some(support::fake::End::Eof));
    }
}

/// The same at 1.21–1.22, where the daemon pulls: the error replaces the next `STDERR_READ`.
#[tokio::test]
async fn error_in_the_middle_of_a_pulled_upload() {
    let p = sp(13, "big");
    let (info, nar) = sample(p.clone(), &[1u8; 200_000], &[]);
    let mut fake = WorkerFake::new(v(22));
    fake.fault = Some(Fault::ErrorMidUpload);
    let (mut s, h) = connect(fake, &no_options()).await;
    let mut src: &[u8] = &nar;
    let mut up = Upload {
        info,
        nar: &mut src,
    };
    let e = s
        .add_to_store_nar(&mut up, false, false, &mut |_| {})
        .await
        .expect_err("refused");
    assert!(matches!(e, SessionError::Remote(_)), "{e:?}");
    assert!(s.is_usable());
    assert!(!s.is_valid_path(&p, &mut |_| {}).await.expect("in sync"));
    let rep = finish(s, h).await;
    assert_eq!(rep.uploads[0].reads, 1);
    assert_eq!(rep.uploads[0].data_bytes, 32 << 10);
}

/// `query_path_infos` pipelines its requests. With thousands of paths, the replies fill the
/// pipe back to us while we are still writing requests: the daemon blocks writing and stops
/// reading, so we must read while we write. And however many paths, the batch is one round
/// trip (a bounded window would cost one per window).
#[tokio::test]
async fn pipelined_query_path_infos_of_many_paths_do_not_deadlock() {
    let mut fake = WorkerFake::new(v(34));
    let mut paths = BTreeSet::new();
    for i in 0..5000u32 {
        let p = StorePath::new(
            {
                let mut h = [0u8; 20];
                h[..4].copy_from_slice(&i.to_le_bytes());
                h
            },
            "many",
        )
        .expect("path");
        if i % 2 == 0 {
            let (info, nar) = sample(p.clone(), b"x", &[]);
            fake.store.add(info, nar);
        }
        paths.insert(p);
    }
    let cfg = SessionConfig {
        idle_timeout: Duration::from_secs(2),
        ..config()
    };
    let (s, h) = connect_with(fake, cfg, &no_options()).await;
    let mut s = s.expect("handshake");
    let before = s.round_trips();
    let infos = s
        .query_path_infos(&paths, &mut |_| {})
        .await
        .expect("no deadlock");
    assert_eq!(infos.len(), 2500);
    assert_eq!(s.round_trips() - before, 1, "one round trip for 5000 paths");
    // Two requests one after the other: two round trips.
    let one = BTreeSet::from([paths.iter().next().expect("a path").clone()]);
    let before = s.round_trips();
    s.query_path_infos(&one, &mut |_| {}).await.expect("one");
    s.query_path_infos(&one, &mut |_| {}).await.expect("two");
    assert_eq!(s.round_trips() - before, 2);
    finish(s, h).await;
}

/// `AddBuildLog`: op 45, the `.drv`'s base name, the log as a framed stream, `u64 1`. A
/// refusal poisons the session (a real daemon refuses an untrusted client before it reads
/// the frames, so the byte stream is out of step); before 1.32 nothing is sent.
#[tokio::test]
async fn add_build_log_frames_the_log_and_a_refusal_poisons_the_session() {
    let (drv_path, _, _) = drv();
    let log = b"line one\nline two\n".repeat(10_000);

    let (mut s, h) = connect(WorkerFake::new(v(34)), &no_options()).await;
    s.add_build_log(&drv_path, &log, &mut |_| {})
        .await
        .expect("stored");
    assert!(s.is_usable());
    let rep = finish(s, h).await;
    assert_eq!(
        rep.requests,
        [worker::Request::AddBuildLog {
            drv_path: drv_path.clone()
        }]
    );
    assert_eq!(
        rep.request_bytes[0],
        wire(&[W::N(45), W::S(&drv_path.to_string())])
    );
    assert_eq!(rep.uploads[0].data_bytes, log.len() as u64);
    assert!(rep.uploads[0].terminated);

    let mut fake = WorkerFake::new(v(34));
    let refusal = wire(&[
        W::N(ERROR),
        W::S("Error"),
        W::N(0),
        W::S("Error"),
        W::S("error: you are not privileged to add logs"),
        W::N(0),
        W::N(0),
    ]);
    let mut once = Some(refusal);
    fake.script = Some(Box::new(move |req, _| match req {
        worker::Request::AddBuildLog { .. } => once.take(),
        _ => None,
    }));
    let (mut s, h) = connect(fake, &no_options()).await;
    let e = s
        .add_build_log(&drv_path, b"x\n", &mut |_| {})
        .await
        .expect_err("refused");
    assert!(matches!(e, SessionError::Remote(_)), "{e:?}");
    assert!(
        !s.is_usable(),
        "a refused AddBuildLog leaves the stream out of step"
    );
    drop(s);
    let _ = h.await;

    let (mut s, h) = connect(WorkerFake::new(v(31)), &no_options()).await;
    let e = s
        .add_build_log(&drv_path, b"x\n", &mut |_| {})
        .await
        .expect_err("too old");
    assert!(matches!(e, SessionError::Unsupported(_)), "{e:?}");
    assert!(s.is_usable());
    let rep = finish(s, h).await;
    assert!(rep.requests.is_empty());
}

/// `AddTempRoot` for every path and `QueryValidPaths` of them travel together: one round
/// trip, every path rooted, the valid ones answered.
#[tokio::test]
async fn protect_and_query_valid_is_one_round_trip() {
    let mut fake = WorkerFake::new(v(34));
    let (a, b, c) = (sp(1, "a"), sp(2, "b"), sp(3, "c"));
    for p in [&a, &b] {
        let (info, nar) = sample(p.clone(), b"x", &[]);
        fake.store.add(info, nar);
    }
    let (mut s, h) = connect(fake, &no_options()).await;
    let all = BTreeSet::from([a.clone(), b.clone(), c.clone()]);
    let before = s.round_trips();
    let valid = s
        .protect_and_query_valid(&all, false, &mut |_| {})
        .await
        .expect("answer");
    assert_eq!(valid, BTreeSet::from([a, b]));
    assert_eq!(s.round_trips() - before, 1);
    assert!(s.is_usable());
    let rep = finish(s, h).await;
    let roots = rep
        .requests
        .iter()
        .filter(|r| matches!(r, worker::Request::AddTempRoot { .. }))
        .count();
    assert_eq!(roots, 3);
    assert!(matches!(
        rep.requests.last(),
        Some(worker::Request::QueryValidPaths { .. })
    ));
}
