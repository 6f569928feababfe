//! Every session operation against real Nix 2.8 peers (`nix-store --serve --write` and
//! `nix-daemon --stdio`) spawned over pipes, each test on fresh private stores of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nixmux_proto::build_result::BuildStatus;
use nixmux_proto::derivation::{BasicDerivation, Derivation};
use nixmux_proto::derived_path::{DerivedPath, OutputsSpec};
use nixmux_proto::log::LogEvent;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve::{BuildOptions, ExportTrailer};
use nixmux_proto::store_path::{StoreDir, StorePath};
use nixmux_proto::worker::{BuildMode, ClientOptions, DrvOutputId};
use nixmux_proto::{Limits, ProtocolVersion};
use nixmux_rig::PrivateStore;
use nixmux_session::process::{self, ChildPipes};
use nixmux_session::{
    Lead, ServeSession, SessionConfig, SessionError, Upload, WorkerConfig, WorkerSession,
};

// ===== helpers =====

fn store() -> PrivateStore {
    nixmux_rig::ensure_peers_installed().expect("nix-bin and openssh-server");
    PrivateStore::temp().expect("private store")
}

fn dir() -> StoreDir {
    StoreDir::default()
}

fn spawn(store: &PrivateStore, args: &[&str]) -> ChildPipes {
    let cmd = store.command(args[0], &args[1..]);
    process::spawn(tokio::process::Command::from(cmd)).expect("spawn peer")
}

fn config(pipes: &ChildPipes) -> SessionConfig {
    SessionConfig {
        idle_timeout: Duration::from_secs(30),
        build_idle_timeout: Some(Duration::from_secs(120)),
        diagnostics: Some(Arc::new(pipes.stderr.clone())),
        ..SessionConfig::default()
    }
}

struct Serve {
    s: ServeSession,
    _guard: process::ChildGuard,
    stderr: process::StderrTail,
}

async fn serve(store: &PrivateStore) -> Serve {
    let p = spawn(store, &["nix-store", "--serve", "--write"]);
    let cfg = config(&p);
    let stderr = p.stderr.clone();
    let s = ServeSession::handshake(p.reader, p.writer, dir(), cfg)
        .await
        .expect("serve handshake");
    Serve {
        s,
        _guard: p.guard,
        stderr,
    }
}

struct Worker {
    s: WorkerSession,
    _guard: process::ChildGuard,
}

async fn worker_with(store: &PrivateStore, wc: &WorkerConfig) -> Worker {
    let p = spawn(store, &["nix-daemon", "--stdio"]);
    let cfg = config(&p);
    let s = WorkerSession::handshake(p.reader, p.writer, dir(), cfg, wc, &mut |_| {})
        .await
        .expect("worker handshake");
    Worker { s, _guard: p.guard }
}

async fn worker(store: &PrivateStore) -> Worker {
    worker_with(store, &WorkerConfig::default()).await
}

fn path(s: &str) -> StorePath {
    StorePath::parse(&dir(), s.trim()).expect("store path")
}

fn write_file(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).expect("create");
    f.write_all(contents.as_bytes()).expect("write");
    p
}

/// Builds the closure `c -> b -> a` (as in the recorded transcripts) in `store`; returns the
/// three output paths, dependencies first.
fn build_closure(store: &PrivateStore) -> Vec<StorePath> {
    let tmp = tempfile::tempdir().expect("tmp");
    let expr = write_file(
        tmp.path(),
        "closure.nix",
        r#"let a = builtins.toFile "cap-a" "alpha\n";
    b = derivation { name = "cap-b"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo ${a} > $out"]; };
    c = derivation { name = "cap-c"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo ${b} > $out; echo ${a} >> $out"]; };
in c"#,
    );
    let out = store
        .run("nix-build", [expr.to_str().expect("utf8"), "--no-out-link"])
        .expect("nix-build");
    let c = path(&String::from_utf8_lossy(&out.stdout));
    let q = store
        .run("nix-store", ["-qR", &c.to_absolute(&dir())])
        .expect("closure");
    let mut paths: Vec<StorePath> = String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(path)
        .collect();
    // `-qR` prints dependencies first.
    assert_eq!(paths.len(), 3, "{paths:?}");
    paths.dedup();
    paths
}

/// Instantiates `expr` in `store` and returns the `.drv` path and the parsed derivation.
fn instantiate(store: &PrivateStore, expr: &str) -> (StorePath, Derivation) {
    let tmp = tempfile::tempdir().expect("tmp");
    let f = write_file(tmp.path(), "drv.nix", expr);
    let out = store
        .run("nix-instantiate", [f.to_str().expect("utf8")])
        .expect("nix-instantiate");
    let drv_path = path(&String::from_utf8_lossy(&out.stdout));
    let text = std::fs::read(store.store_dir().join(drv_path.to_string())).expect("read drv");
    let drv = Derivation::parse(&text, &dir(), &Limits::DEFAULT).expect("parse drv");
    (drv_path, drv)
}

fn trivial_drv(body: &str, name: &str) -> String {
    format!(
        r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" ''PATH=/usr/bin:/bin; {body}'']; }}"#
    )
}

/// Reads path infos and NARs of `paths` from `src` through a serve session.
async fn fetch_all(src: &PrivateStore, paths: &[StorePath]) -> Vec<(PathInfo, Vec<u8>)> {
    let mut s = serve(src).await;
    let set: BTreeSet<_> = paths.iter().cloned().collect();
    let infos = s.s.query_path_infos(&set).await.expect("infos");
    let by_path: BTreeMap<_, _> = infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut out = Vec::new();
    for p in paths {
        let mut nar = Vec::new();
        let sum = s.s.dump_store_path(p, &mut nar).await.expect("dump");
        let info = by_path.get(p).expect("info").clone();
        assert_eq!(sum.nar_size, info.nar_size);
        assert_eq!(sum.nar_hash, Some(info.nar_hash));
        out.push((info, nar));
    }
    out
}

/// A path's metadata, its NAR, and a reader over that NAR.
type Item = (PathInfo, Vec<u8>, std::io::Cursor<Vec<u8>>);

fn uploads(items: &mut [Item]) -> Vec<Upload<'_>> {
    items
        .iter_mut()
        .map(|(info, _, cur)| Upload {
            info: info.clone(),
            nar: cur,
        })
        .collect()
}

fn with_cursors(v: Vec<(PathInfo, Vec<u8>)>) -> Vec<Item> {
    v.into_iter()
        .map(|(i, n)| {
            let c = std::io::Cursor::new(n.clone());
            (i, n, c)
        })
        .collect()
}

fn verify(store: &PrivateStore, p: &StorePath) {
    assert!(
        store.is_valid(&p.to_absolute(&dir())).expect("check"),
        "{p} not valid"
    );
    store
        .run("nix-store", ["--verify-path", &p.to_absolute(&dir())])
        .expect("verify-path");
}

// ===== serve =====

#[tokio::test]
async fn serve_handshake_negotiates_2_7() {
    let st = store();
    let s = serve(&st).await;
    assert_eq!(s.s.version(), ProtocolVersion::new(2, 7));
}

#[tokio::test]
async fn serve_queries() {
    let st = store();
    let closure = build_closure(&st);
    let mut s = serve(&st).await;
    let missing = path("/nix/store/00000000000000000000000000000000-missing");
    let mut ask: BTreeSet<_> = closure.iter().cloned().collect();
    ask.insert(missing.clone());
    let valid =
        s.s.query_valid_paths(&ask, false, false)
            .await
            .expect("qvp");
    assert_eq!(valid, closure.iter().cloned().collect());
    let infos = s.s.query_path_infos(&ask).await.expect("qpi");
    assert_eq!(infos.len(), 3, "invalid paths are omitted");
    let top = infos.iter().find(|i| i.path == closure[2]).expect("top");
    assert!(top.references.contains(&closure[1]));
    let hash = st
        .run(
            "nix-store",
            ["-q", "--hash", &closure[2].to_absolute(&dir())],
        )
        .expect("hash");
    assert_eq!(
        top.nar_hash.to_nix32_prefixed(),
        String::from_utf8_lossy(&hash.stdout).trim()
    );
    let one: BTreeSet<_> = [closure[2].clone()].into();
    let cl = s.s.query_closure(&one, false).await.expect("closure");
    assert_eq!(cl, closure.iter().cloned().collect());
    assert!(s.s.is_usable());
}

#[tokio::test]
async fn serve_dump_of_invalid_path_reports_the_remote_error() {
    let st = store();
    let mut s = serve(&st).await;
    let mut sink = Vec::new();
    let e =
        s.s.dump_store_path(
            &path("/nix/store/00000000000000000000000000000000-missing"),
            &mut sink,
        )
        .await
        .expect_err("invalid path kills the server");
    let text = e.to_string();
    assert!(matches!(e, SessionError::Closed { .. }), "{e:?}");
    assert!(text.contains("is not valid"), "{text}");
    assert!(!s.s.is_usable());
    let again = s.s.query_valid_paths(&BTreeSet::new(), false, false).await;
    assert!(matches!(again, Err(SessionError::Poisoned)));
    drop(s.stderr);
}

#[tokio::test]
async fn serve_add_to_store_nar_pipelined_copies_a_closure() {
    let src = store();
    let dst = store();
    let closure = build_closure(&src);
    let mut items = with_cursors(fetch_all(&src, &closure).await);
    let mut s = serve(&dst).await;
    s.s.add_to_store_nars(&mut uploads(&mut items))
        .await
        .expect("add");
    for p in &closure {
        verify(&dst, p);
    }
    // The session is still good for more.
    let set: BTreeSet<_> = closure.iter().cloned().collect();
    assert_eq!(
        s.s.query_valid_paths(&set, false, false).await.expect("q"),
        set
    );
}

#[tokio::test]
async fn serve_import_and_export_paths() {
    let src = store();
    let dst = store();
    let closure = build_closure(&src);
    // Export from the source...
    let mut s = serve(&src).await;
    let set: BTreeSet<_> = closure.iter().cloned().collect();
    let exported =
        s.s.export_paths(&set, |_| std::io::Cursor::new(Vec::new()))
            .await
            .expect("export");
    let order: Vec<_> = exported.iter().map(|(t, _, _)| t.path.clone()).collect();
    assert_eq!(order, closure, "dependencies first");
    // ...and import into the destination in one stream.
    let mut parts: Vec<(ExportTrailer, std::io::Cursor<Vec<u8>>, u64)> = exported
        .into_iter()
        .map(|(t, sum, sink)| {
            assert_eq!(sum.nar_size, sink.get_ref().len() as u64);
            (t, std::io::Cursor::new(sink.into_inner()), sum.nar_size)
        })
        .collect();
    let mut items: Vec<(
        ExportTrailer,
        &mut (dyn tokio::io::AsyncRead + Unpin + Send),
        u64,
    )> = parts
        .iter_mut()
        .map(|(t, c, n)| {
            (
                t.clone(),
                c as &mut (dyn tokio::io::AsyncRead + Unpin + Send),
                *n,
            )
        })
        .collect();
    let mut d = serve(&dst).await;
    d.s.import_paths(&mut items).await.expect("import");
    for p in &closure {
        verify(&dst, p);
    }
}

#[tokio::test]
async fn serve_build_derivation_success_failure_timeout_and_log_limit() {
    let client = store();
    let builder = store();
    let mut s = serve(&builder).await;

    let (drv_path, drv) = instantiate(&client, &trivial_drv("echo hello > $out", "ok"));
    let basic = drv.to_basic(BTreeSet::new());
    let res =
        s.s.build_derivation(&drv_path, &basic, &BuildOptions::default())
            .await
            .expect("build");
    assert_eq!(res.status, BuildStatus::Built, "{res:?}");
    let out = &res.built_outputs["out"].path;
    assert_eq!(Some(out), drv.outputs["out"].path.as_ref());
    assert!(builder.is_valid(&out.to_absolute(&dir())).expect("valid"));

    let (p, d) = instantiate(&client, &trivial_drv("echo failing >&2; exit 3", "bad"));
    let res =
        s.s.build_derivation(&p, &d.to_basic(BTreeSet::new()), &BuildOptions::default())
            .await
            .expect("a failed build is a result, not an error");
    assert_eq!(res.status, BuildStatus::PermanentFailure);
    assert!(res.error_msg.contains("failed"), "{}", res.error_msg);

    let (p, d) = instantiate(&client, &trivial_drv("sleep 10; touch $out", "slow"));
    let res =
        s.s.build_derivation(
            &p,
            &d.to_basic(BTreeSet::new()),
            &BuildOptions {
                max_silent_time: 1,
                ..BuildOptions::default()
            },
        )
        .await
        .expect("build");
    assert_eq!(res.status, BuildStatus::TimedOut, "{res:?}");

    let (p, d) = instantiate(
        &client,
        &trivial_drv("yes | head -c 100000; touch $out", "chatty"),
    );
    let res =
        s.s.build_derivation(
            &p,
            &d.to_basic(BTreeSet::new()),
            &BuildOptions {
                max_log_size: 1000,
                ..BuildOptions::default()
            },
        )
        .await
        .expect("build");
    assert_eq!(res.status, BuildStatus::LogLimitExceeded, "{res:?}");
    assert!(s.s.is_usable());
}

#[tokio::test]
async fn serve_build_paths() {
    let st = store();
    let (drv_path, drv) = instantiate(&st, &trivial_drv("echo built > $out", "bp"));
    let mut s = serve(&st).await;
    let res =
        s.s.build_paths(
            &[DerivedPath::Built {
                drv: drv_path.clone(),
                outputs: OutputsSpec::Names(["out".to_owned()].into()),
            }],
            &BuildOptions::default(),
        )
        .await
        .expect("build");
    assert!(res.status.is_success(), "{res:?}");
    let out = drv.outputs["out"].path.clone().expect("out path");
    assert!(st.is_valid(&out.to_absolute(&dir())).expect("valid"));
    let (p, _) = instantiate(&st, &trivial_drv("exit 1", "bp-fail"));
    let res =
        s.s.build_paths(&[DerivedPath::all_outputs(p)], &BuildOptions::default())
            .await
            .expect("reply");
    assert!(!res.status.is_success());
    assert!(res.error_msg.contains("failed"), "{}", res.error_msg);
}

/// A serve session whose opening carried `lead` (see `nixmux_session::Lead`).
async fn serve_leading(store: &PrivateStore, lead: Lead) -> Serve {
    use tokio::io::AsyncWriteExt as _;
    let mut p = spawn(store, &["nix-store", "--serve", "--write"]);
    let cfg = config(&p);
    let stderr = p.stderr.clone();
    let opening = ServeSession::opening(&dir(), Some(&lead));
    p.writer.write_all(&opening.bytes()).await.expect("opening");
    p.writer.flush().await.expect("flush");
    let s = ServeSession::handshake_after(opening, p.reader, p.writer, dir(), cfg)
        .await
        .expect("serve handshake");
    Serve {
        s,
        _guard: p.guard,
        stderr,
    }
}

#[tokio::test]
async fn serve_lead_request_goes_with_the_hello() {
    let st = store();
    let (closure, missing, ask, lead) = lead_case(&st);
    // The same question first: answered without a request of its own.
    let mut s = serve_leading(&st, lead.clone()).await;
    let valid =
        s.s.query_valid_paths(&ask, false, false)
            .await
            .expect("qvp");
    assert_eq!(valid, closure[..2].iter().cloned().collect());
    assert_eq!(s.s.round_trips(), 0, "the answer came with the hello's");
    let infos = s.s.query_path_infos(&ask).await.expect("infos");
    assert_eq!(infos.len(), 2);
    assert_eq!(s.s.round_trips(), 1);

    // Another question first (here the same paths with `lock`, which the lead has not):
    // the lead's answer is read and dropped before its own.
    let mut s = serve_leading(&st, lead).await;
    let other: BTreeSet<_> = [closure[2].clone(), missing].into();
    let valid =
        s.s.query_valid_paths(&other, true, false)
            .await
            .expect("qvp");
    assert_eq!(valid, [closure[2].clone()].into());
    assert!(s.s.is_usable(), "stderr: {}", s.stderr.text());

    // A large request does not lead (it would go out under the exec's timeout): its
    // operation sends it, a round trip of its own.
    let (large, lead) = large_lead(&closure[0]);
    let mut s = serve_leading(&st, lead).await;
    let valid =
        s.s.query_valid_paths(&large, false, false)
            .await
            .expect("qvp");
    assert_eq!(valid, [closure[0].clone()].into());
    assert_eq!(s.s.round_trips(), 1);
}

/// The closure `c -> b -> a` built in `st` (dependencies first), a missing path, and a lead
/// asking about `a`, `b` and the missing path (the paths it asks about, and the lead).
fn lead_case(st: &PrivateStore) -> (Vec<StorePath>, StorePath, BTreeSet<StorePath>, Lead) {
    let closure = build_closure(st);
    let missing = path("/nix/store/00000000000000000000000000000000-missing");
    let mut ask: BTreeSet<_> = closure[..2].iter().cloned().collect();
    ask.insert(missing.clone());
    let lead = Lead::QueryValidPaths {
        paths: ask.clone(),
        substitute: false,
    };
    (closure, missing, ask, lead)
}

/// A `QueryValidPaths` lead above `MAX_LEAD_BYTES`: 400 paths, `valid` among them.
fn large_lead(valid: &StorePath) -> (BTreeSet<StorePath>, Lead) {
    let mut paths: BTreeSet<StorePath> = (0..400)
        .map(|i| {
            path(&format!(
                "/nix/store/00000000000000000000000000000000-missing-{i}"
            ))
        })
        .collect();
    paths.insert(valid.clone());
    let lead = Lead::QueryValidPaths {
        paths: paths.clone(),
        substitute: false,
    };
    (paths, lead)
}

// ===== worker =====

#[tokio::test]
async fn worker_handshake_reports_version_and_trust() {
    let st = store();
    let w = worker(&st).await;
    assert_eq!(w.s.version(), ProtocolVersion::new(1, 34));
    assert_eq!(w.s.daemon_info().nix_version.as_deref(), Some("2.8.0"));
    assert_eq!(w.s.daemon_info().trust, None, "1.34 has no trust byte");
    // Announcing 1.37 pipelines the whole handshake; same outcome.
    let w = worker_with(
        &st,
        &WorkerConfig {
            announce: ProtocolVersion::new(1, 37),
            ..WorkerConfig::default()
        },
    )
    .await;
    assert_eq!(w.s.version(), ProtocolVersion::new(1, 34));
}

/// A worker session started with a lead request (see `nixmux_session::Lead`), over a pipe
/// to a new `nix-daemon --stdio`.
async fn worker_leading(store: &PrivateStore, wc: &WorkerConfig, lead: Lead) -> Worker {
    use tokio::io::AsyncWriteExt as _;
    let mut p = spawn(store, &["nix-daemon", "--stdio"]);
    let cfg = config(&p);
    let opening = WorkerSession::opening(&dir(), wc, Some(&lead));
    p.writer.write_all(&opening.bytes()).await.expect("opening");
    p.writer.flush().await.expect("flush");
    let s =
        WorkerSession::handshake_after(opening, p.reader, p.writer, dir(), cfg, wc, &mut |_| {})
            .await
            .expect("worker handshake");
    Worker { s, _guard: p.guard }
}

#[tokio::test]
async fn worker_lead_request_is_answered_with_the_handshake() {
    let st = store();
    let (closure, missing, ask, lead) = lead_case(&st);
    let logs = &mut |_| {};
    for announce in [ProtocolVersion::new(1, 38), ProtocolVersion::new(1, 37)] {
        let wc = WorkerConfig {
            announce,
            ..WorkerConfig::default()
        };
        // The operation that asks what the lead asked takes its answer: no round trip of its
        // own. (The session counts one for the handshake: the opening went out before the
        // session existed, so the wait for the daemon's hello is not counted.)
        // At 1.37 the daemon's whole answer may already be there when the lead goes out
        // (a pipe has no Nagle), so whether that wait counts depends on timing: at most one.
        let mut w = worker_leading(&st, &wc, lead.clone()).await;
        let valid = w.s.query_valid_paths(&ask, false, logs).await.expect("qvp");
        assert_eq!(valid, closure[..2].iter().cloned().collect(), "{announce}");
        let rt = w.s.round_trips();
        if announce.at_least(1, 38) {
            assert_eq!(rt, 1, "{announce}");
        } else {
            assert!(rt <= 1, "{announce}: {rt}");
        }
        // The session goes on as any other.
        assert!(w.s.is_valid_path(&closure[2], logs).await.expect("ivp"));
        assert_eq!(w.s.round_trips(), rt + 1, "{announce}");

        // Another operation first: the lead's answer is read and dropped before its own.
        let mut w = worker_leading(&st, &wc, lead.clone()).await;
        let info =
            w.s.query_path_info(&closure[2], logs)
                .await
                .expect("qpi")
                .expect("valid");
        assert!(info.references.contains(&closure[1]), "{announce}");
        let other: BTreeSet<_> = [closure[2].clone(), missing.clone()].into();
        let valid =
            w.s.query_valid_paths(&other, false, logs)
                .await
                .expect("qvp");
        assert_eq!(valid, [closure[2].clone()].into(), "{announce}");
        assert!(w.s.is_usable());
    }

    // A large request does not lead: its operation sends it, a round trip of its own.
    let (large, lead) = large_lead(&closure[0]);
    let mut w = worker_leading(&st, &WorkerConfig::default(), lead).await;
    assert_eq!(w.s.round_trips(), 1);
    let valid =
        w.s.query_valid_paths(&large, false, logs)
            .await
            .expect("qvp");
    assert_eq!(valid, [closure[0].clone()].into());
    assert_eq!(w.s.round_trips(), 2);
}

#[tokio::test]
async fn worker_queries() {
    let st = store();
    let closure = build_closure(&st);
    let mut w = worker(&st).await;
    let logs = &mut |_| {};
    let missing = path("/nix/store/00000000000000000000000000000000-missing");
    assert!(w.s.is_valid_path(&closure[0], logs).await.expect("ivp"));
    assert!(!w.s.is_valid_path(&missing, logs).await.expect("ivp"));
    let mut ask: BTreeSet<_> = closure.iter().cloned().collect();
    ask.insert(missing.clone());
    let valid = w.s.query_valid_paths(&ask, false, logs).await.expect("qvp");
    assert_eq!(valid.len(), 3);
    let info =
        w.s.query_path_info(&closure[2], logs)
            .await
            .expect("qpi")
            .expect("valid");
    assert!(info.references.contains(&closure[1]));
    assert!(info.registration_time > 0);
    assert!(
        w.s.query_path_info(&missing, logs)
            .await
            .expect("qpi")
            .is_none()
    );
    let infos = w.s.query_path_infos(&ask, logs).await.expect("pipelined");
    assert_eq!(infos.len(), 3);
    let found =
        w.s.query_path_from_hash_part(&closure[1].hash_part(), logs)
            .await
            .expect("hash part");
    assert_eq!(found.as_ref(), Some(&closure[1]));
    assert_eq!(
        w.s.query_path_from_hash_part(&missing.hash_part(), logs)
            .await
            .expect("hash part"),
        None
    );
    w.s.add_temp_root(&closure[0], logs)
        .await
        .expect("temp root");
    w.s.ensure_path(&closure[0], logs).await.expect("ensure");
    let sigs: BTreeSet<String> = ["test-1:c2lnbmF0dXJl".to_owned()].into();
    w.s.add_signatures(&closure[0], &sigs, logs)
        .await
        .expect("root is trusted");
    let info =
        w.s.query_path_info(&closure[0], logs)
            .await
            .expect("qpi")
            .expect("valid");
    assert!(info.sigs.contains("test-1:c2lnbmF0dXJl"));
}

#[tokio::test]
async fn worker_nar_from_path_and_uploads() {
    let src = store();
    let closure = build_closure(&src);
    let mut w = worker(&src).await;
    let logs = &mut |_| {};
    let mut nar = Vec::new();
    let sum =
        w.s.nar_from_path(&closure[2], &mut nar, logs)
            .await
            .expect("nar");
    let info =
        w.s.query_path_info(&closure[2], logs)
            .await
            .expect("qpi")
            .expect("valid");
    assert_eq!(sum.nar_hash, Some(info.nar_hash));
    assert_eq!(sum.nar_size, nar.len() as u64);

    let fetched = fetch_all(&src, &closure).await;

    // One path at a time with AddToStoreNar (framed at 1.34).
    let dst = store();
    let mut d = worker(&dst).await;
    for (info, n) in &fetched {
        let mut cur = std::io::Cursor::new(n.clone());
        let mut up = Upload {
            info: info.clone(),
            nar: &mut cur,
        };
        d.s.add_to_store_nar(&mut up, false, true, logs)
            .await
            .expect("add");
    }
    for p in &closure {
        verify(&dst, p);
    }

    // All at once with AddMultipleToStore.
    let dst2 = store();
    let mut d2 = worker(&dst2).await;
    let mut items = with_cursors(fetched.clone());
    d2.s.add_multiple_to_store(&mut uploads(&mut items), false, true, logs)
        .await
        .expect("add multiple");
    for p in &closure {
        verify(&dst2, p);
    }
}

/// A batch in which a path is already valid (another client added it first): Nix 2.8's
/// `AddMultipleToStore` skips that path's NAR without reading it and then reads the NAR as
/// the next entry's metadata; the pipelined framed `AddToStoreNar` batch adds the others, in
/// one round trip, and the session stays usable.
#[tokio::test]
async fn worker_batch_upload_with_an_already_valid_path() {
    let src = store();
    let closure = build_closure(&src);
    let fetched = fetch_all(&src, &closure).await;
    let logs = &mut |_| {};

    let dst = store();
    let mut d = worker(&dst).await;
    let mut first = with_cursors(fetched[..1].to_vec());
    d.s.add_paths(&mut uploads(&mut first), false, true, logs)
        .await
        .expect("the first path");
    verify(&dst, &closure[0]);

    // The upstream bug this avoids (Nix 2.8, src/libstore/local-store.cc addToStore).
    let mut again = worker(&dst).await;
    let mut items = with_cursors(fetched.clone());
    let e = again
        .s
        .add_multiple_to_store(&mut uploads(&mut items), false, true, logs)
        .await
        .expect_err("Nix 2.8 loses its place in AddMultipleToStore");
    assert!(format!("{e}").contains("nix-archive-1"), "{e}");

    let mut items = with_cursors(fetched.clone());
    let before = d.s.round_trips();
    d.s.add_paths(&mut uploads(&mut items), false, true, logs)
        .await
        .expect("the batch, with its first path already valid");
    assert_eq!(d.s.round_trips() - before, 1);
    for p in &closure {
        verify(&dst, p);
    }
    assert!(d.s.is_usable());
    assert!(d.s.is_valid_path(&closure[2], logs).await.expect("in step"));
}

#[tokio::test]
async fn worker_upload_with_a_wrong_hash_fails_and_the_session_survives() {
    let src = store();
    let closure = build_closure(&src);
    let fetched = fetch_all(&src, &closure[..1]).await;
    let dst = store();
    let mut d = worker(&dst).await;
    let logs = &mut |_| {};
    let (mut info, nar) = fetched[0].clone();
    info.nar_hash = nixmux_proto::hash::Hash::sha256_of(b"not the nar");
    let mut cur = std::io::Cursor::new(nar.clone());
    let e =
        d.s.add_to_store_nar(
            &mut Upload {
                info,
                nar: &mut cur,
            },
            false,
            true,
            logs,
        )
        .await
        .expect_err("hash mismatch");
    assert!(matches!(e, SessionError::Remote(_)), "{e:?}");
    assert!(d.s.is_usable(), "a STDERR_ERROR keeps the session");
    let mut cur = std::io::Cursor::new(nar);
    d.s.add_to_store_nar(
        &mut Upload {
            info: fetched[0].0.clone(),
            nar: &mut cur,
        },
        false,
        true,
        logs,
    )
    .await
    .expect("the session still works");
    verify(&dst, &closure[0]);
}

/// Adds `nix-store --add` sources to `store`: a tree (a file, an executable, a symlink, a
/// subdirectory) and a lone file. Returns their paths.
fn add_sources(store: &PrivateStore) -> Vec<StorePath> {
    let tmp = tempfile::tempdir().expect("tmp");
    let tree = tmp.path().join("src-tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    write_file(&tree, "README", "a source tree\n");
    let run = write_file(&tree.join("sub"), "run.sh", "#!/bin/sh\necho hi\n");
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::os::unix::fs::symlink("sub/run.sh", tree.join("run")).expect("symlink");
    let lone = write_file(tmp.path(), "lone.txt", "one file\n");
    [tree, lone]
        .iter()
        .map(|p| {
            let out = store
                .run("nix-store", ["--add", p.to_str().expect("utf8")])
                .expect("nix-store --add");
            path(&String::from_utf8_lossy(&out.stdout))
        })
        .collect()
}

/// Plain sources (`nix-store --add`) go by content (`AddToStore`), in the same pipelined
/// batch as the paths that go as `AddToStoreNar`; the builder's record matches the source's.
/// A NAR that is not what its record says makes the builder store another path: that path
/// fails, the one named is not made valid.
#[tokio::test]
async fn worker_adds_plain_sources_by_content() {
    let src = store();
    let closure = build_closure(&src);
    let sources = add_sources(&src);
    let all: Vec<StorePath> = closure.iter().chain(&sources).cloned().collect();
    let fetched = fetch_all(&src, &all).await;
    for (info, _) in &fetched {
        assert_eq!(
            info.is_plain_source(&dir()),
            sources.contains(&info.path),
            "{info:?}"
        );
    }
    let logs = &mut |_| {};

    let dst = store();
    let mut d = worker(&dst).await;
    let mut items = with_cursors(fetched.clone());
    let before = d.s.round_trips();
    d.s.add_paths(&mut uploads(&mut items), false, true, logs)
        .await
        .expect("the batch");
    assert_eq!(d.s.round_trips() - before, 1);
    for p in &all {
        verify(&dst, p);
    }
    let set: BTreeSet<StorePath> = sources.iter().cloned().collect();
    let mut got = d.s.query_path_infos(&set, logs).await.expect("infos");
    got.sort_by(|a, b| a.path.cmp(&b.path));
    let mut want: Vec<PathInfo> = fetched
        .iter()
        .filter(|(i, _)| set.contains(&i.path))
        .map(|(i, _)| i.clone())
        .collect();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            (&g.path, &g.nar_hash, g.nar_size, &g.ca),
            (&w.path, &w.nar_hash, w.nar_size, &w.ca)
        );
    }

    // The tree's record with the lone file's NAR.
    let (tree, lone) = (&fetched[3], &fetched[4]);
    let dst2 = store();
    let mut d2 = worker(&dst2).await;
    let mut items = vec![(
        tree.0.clone(),
        lone.1.clone(),
        std::io::Cursor::new(lone.1.clone()),
    )];
    items[0].0.nar_size = lone.0.nar_size;
    let e =
        d2.s.add_paths(&mut uploads(&mut items), false, true, logs)
            .await
            .expect_err("another content");
    match &e {
        SessionError::UploadMismatch { path, detail } => {
            assert_eq!(path, &tree.0.path.to_absolute(&dir()));
            assert!(
                detail.contains(&lone.0.nar_hash.to_nix32_prefixed()),
                "{detail}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !dst2
            .is_valid(&tree.0.path.to_absolute(&dir()))
            .expect("check")
    );
    assert!(d2.s.is_usable(), "every answer was read");
    assert!(
        !d2.s
            .is_valid_path(&tree.0.path, logs)
            .await
            .expect("in step")
    );
}

#[tokio::test]
async fn worker_builds_with_logs_and_limits() {
    let client = store();
    let builder = store();
    let mut w = worker(&builder).await;
    let mut events = Vec::new();
    let (drv_path, drv) = instantiate(
        &client,
        &trivial_drv("echo line-one; echo line-two >&2; echo ok > $out", "wok"),
    );
    let res =
        w.s.build_derivation(
            &drv_path,
            &drv.to_basic(BTreeSet::new()),
            BuildMode::Normal,
            &mut |e| events.push(e),
        )
        .await
        .expect("build");
    assert_eq!(res.status, BuildStatus::Built, "{res:?}");
    assert!(res.built_outputs.contains_key("out"));
    let lines: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            LogEvent::Line {
                activity: Some(_),
                text,
            } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        lines.contains(&"line-one") && lines.contains(&"line-two"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, LogEvent::Start { kind: 105, .. }))
    );

    // Limits travel with SetOptions: max-silent-time as a field, the rest as overrides.
    let opts = ClientOptions {
        max_silent_time: 1,
        ..ClientOptions::default()
    };
    w.s.set_options(&opts, &mut |_| {}).await.expect("options");
    let (p, d) = instantiate(&client, &trivial_drv("sleep 10; touch $out", "wslow"));
    let res =
        w.s.build_derivation(
            &p,
            &d.to_basic(BTreeSet::new()),
            BuildMode::Normal,
            &mut |_| {},
        )
        .await
        .expect("build");
    assert_eq!(res.status, BuildStatus::TimedOut, "{res:?}");

    let mut opts = ClientOptions::default();
    opts.overrides
        .insert("max-build-log-size".into(), "1000".into());
    w.s.set_options(&opts, &mut |_| {}).await.expect("options");
    let (p, d) = instantiate(
        &client,
        &trivial_drv("yes | head -c 100000; touch $out", "wchatty"),
    );
    let res =
        w.s.build_derivation(
            &p,
            &d.to_basic(BTreeSet::new()),
            BuildMode::Normal,
            &mut |_| {},
        )
        .await
        .expect("build");
    assert_eq!(res.status, BuildStatus::LogLimitExceeded, "{res:?}");

    let (p, d) = instantiate(&client, &trivial_drv("exit 1", "wfail"));
    let res =
        w.s.build_derivation(
            &p,
            &d.to_basic(BTreeSet::new()),
            BuildMode::Normal,
            &mut |_| {},
        )
        .await
        .expect("build");
    assert_eq!(res.status, BuildStatus::PermanentFailure);
    assert!(w.s.is_usable());
}

#[tokio::test]
async fn worker_build_paths_and_missing() {
    let st = store();
    let (drv_path, drv) = instantiate(&st, &trivial_drv("echo x > $out", "wbp"));
    let mut w = worker(&st).await;
    let logs = &mut |_| {};
    let target = DerivedPath::Built {
        drv: drv_path.clone(),
        outputs: OutputsSpec::Names(["out".to_owned()].into()),
    };
    let missing =
        w.s.query_missing(std::slice::from_ref(&target), logs)
            .await
            .expect("missing");
    assert!(missing.will_build.contains(&drv_path), "{missing:?}");
    let results =
        w.s.build_paths_with_results(std::slice::from_ref(&target), BuildMode::Normal, logs)
            .await
            .expect("build");
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].0, target);
    assert!(results[0].1.status.is_success(), "{:?}", results[0].1);
    let out = drv.outputs["out"].path.clone().expect("path");
    assert_eq!(results[0].1.built_outputs["out"].path, out);

    let (p, _) = instantiate(&st, &trivial_drv("exit 1", "wbp-fail"));
    let e =
        w.s.build_paths(&[DerivedPath::all_outputs(p)], BuildMode::Normal, logs)
            .await
            .expect_err("failure");
    assert!(matches!(e, SessionError::Remote(_)), "{e:?}");
    assert!(w.s.is_usable());
    w.s.build_paths(&[target], BuildMode::Normal, logs)
        .await
        .expect("already valid");
}

#[tokio::test]
async fn worker_realisations() {
    // Nix 2.8's daemon aborts (an assertion in sqlite.cc) when asked for a realisation on a
    // store without the ca-derivations feature: the session must end with the remote's words.
    let plain = store();
    let mut w = worker(&plain).await;
    let logs = &mut |_| {};
    let id = DrvOutputId::HashModulo {
        drv_hash: format!("sha256:{}", "1".repeat(64)),
        output: "out".into(),
    };
    let e =
        w.s.query_realisation(&id, logs)
            .await
            .expect_err("daemon dies");
    assert!(e.to_string().contains("Assertion"), "{e}");
    assert!(!w.s.is_usable());

    let st =
        PrivateStore::temp_with_config(&["experimental-features = nix-command ca-derivations"])
            .expect("store");
    let closure = build_closure(&st);
    let mut w = worker(&st).await;
    assert_eq!(w.s.query_realisation(&id, logs).await.expect("query"), None);
    let real = nixmux_proto::worker::Realisation {
        id: id.clone(),
        out_path: closure[0].clone(),
        signatures: BTreeSet::new(),
    };
    w.s.register_drv_output(&real, logs)
        .await
        .expect("register");
    let got = w.s.query_realisation(&id, logs).await.expect("query");
    assert_eq!(got, Some(real));
}

#[tokio::test]
async fn dropping_an_operation_poisons_the_session() {
    let client = store();
    let builder = store();
    let mut w = worker(&builder).await;
    let (p, d) = instantiate(&client, &trivial_drv("sleep 30; touch $out", "long"));
    let basic: BasicDerivation = d.to_basic(BTreeSet::new());
    let mut ignore = |_| {};
    let fut =
        w.s.build_derivation(&p, &basic, BuildMode::Normal, &mut ignore);
    // Cancel mid-build.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), fut)
            .await
            .is_err()
    );
    assert!(!w.s.is_usable());
    let e =
        w.s.is_valid_path(&p, &mut |_| {})
            .await
            .expect_err("poisoned");
    assert!(matches!(e, SessionError::Poisoned));
}
