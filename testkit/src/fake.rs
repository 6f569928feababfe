//! An in-process fake Nix peer: the *server* side of the serve and worker protocols at a chosen
//! version, built only from `nixmux-proto`'s server-side codecs (`read_client_hello`,
//! `write_server_hello`, `Request::read`, `write_daemon_info`, `StderrMsg::write`,
//! `write_keyed_build_results`, ...), connected to a real [`ServeSession`] /
//! [`WorkerSession`] through `tokio::io::duplex`.
//!
//! It answers from an in-memory [`FakeStore`], records every byte each side sent, the decoded
//! requests and what it saw of uploads, and has fault knobs ([`Fault`]) for the failures a real
//! peer cannot be made to produce on demand. A `script` hook lets a test answer a request with
//! hand-built bytes instead, so decoders are checked against bytes that were not produced by
//! our own encoders.
//!
//! Version gating: the fake gates every field on `min(client, fake)`, as Nix ≥ 2.2x does (Nix
//! 2.8.0 and Lix gate on the client's version as sent, which agrees as long as the client never
//! announces fields the server lacks: the fake then simply does not know them).
//!
//! [`ServeSession`]: nixmux_session::ServeSession
//! [`WorkerSession`]: nixmux_session::WorkerSession

use std::collections::{BTreeMap, BTreeSet};

use bytes::BytesMut;
use nixmux_proto::build_result::{BuildResult, BuildStatus, OutputsEncoding};
use nixmux_proto::nar::{NarInfo, NarParser, parse_nar};
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve::{self, ExportItem, ExportTrailer};
use nixmux_proto::store_path::{StoreDir, StorePath, make_source_path, put_store_path_set};
use nixmux_proto::wire::{ReadResult, WireReader, WireWrite, try_decode_hint};
use nixmux_proto::worker::{
    self, DaemonInfo, DrvOutputId, Missing, Negotiated, Realisation, RemoteError, StderrMsg,
};
use nixmux_proto::{Limits, ProtoError, ProtocolVersion};
use nixmux_session::{BoxReader, BoxWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// A length no decoder may believe: 2^63.
pub const HUGE: u64 = 1 << 63;

/// A `STDERR_*` code that does not exist ("NOPE").
pub const UNKNOWN_STDERR_CODE: u64 = 0x4e4f_5045;

/// The store directory both sides use.
pub fn dir() -> StoreDir {
    StoreDir::default()
}

/// An in-memory pipe: the client halves, boxed for a session, and the server's end.
pub fn pipe() -> (BoxReader, BoxWriter, DuplexStream) {
    let (client, server) = tokio::io::duplex(64 << 10);
    let (r, w) = tokio::io::split(client);
    (Box::new(r), Box::new(w), server)
}

// ===== byte I/O with recording =====

/// Why the fake stopped serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The client closed the pipe between requests.
    Eof,
    /// The client closed the pipe in the middle of a message.
    Truncated,
    /// The client sent bytes the server-side decoders reject.
    Proto(ProtoError),
    /// The fake closed the pipe on purpose (a fault, or a serve server "dying").
    ClosedByFake,
    /// Writing to the client failed (it went away).
    Io(String),
}

/// The server's end of the pipe, recording both directions.
pub struct FakeIo {
    stream: DuplexStream,
    rbuf: BytesMut,
    limits: Limits,
    /// Every byte the client sent, as it arrived.
    pub c2s: Vec<u8>,
    /// Every byte the fake sent.
    pub s2c: Vec<u8>,
    /// Bytes of `c2s` consumed by decoders so far.
    pub consumed: usize,
}

impl FakeIo {
    fn new(stream: DuplexStream, limits: Limits) -> Self {
        FakeIo {
            stream,
            rbuf: BytesMut::new(),
            limits,
            c2s: Vec::new(),
            s2c: Vec::new(),
            consumed: 0,
        }
    }

    async fn fill(&mut self) -> Result<(), End> {
        let before = self.rbuf.len();
        self.rbuf.reserve(64 << 10);
        match self.stream.read_buf(&mut self.rbuf).await {
            Ok(0) if before == 0 => Err(End::Eof),
            Ok(0) => Err(End::Truncated),
            Ok(_) => {
                self.c2s.extend_from_slice(&self.rbuf[before..]);
                Ok(())
            }
            Err(e) => Err(End::Io(e.to_string())),
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        self.consumed += n;
        self.rbuf.split_to(n).to_vec()
    }

    /// Decodes one value with a proto decoder, reading as needed.
    pub async fn read<T>(
        &mut self,
        decode: impl Fn(&mut WireReader<'_>) -> ReadResult<T>,
    ) -> Result<T, End> {
        loop {
            match try_decode_hint(&self.rbuf, &self.limits, &decode) {
                Ok(Ok((v, used))) => {
                    self.take(used);
                    return Ok(v);
                }
                Ok(Err(_)) => self.fill().await?,
                Err(e) => return Err(End::Proto(e)),
            }
        }
    }

    /// Exactly `n` raw bytes.
    pub async fn read_raw(&mut self, n: usize) -> Result<Vec<u8>, End> {
        while self.rbuf.len() < n {
            self.fill().await?;
        }
        Ok(self.take(n))
    }

    /// One self-delimiting NAR, returned whole.
    pub async fn read_nar(&mut self) -> Result<Vec<u8>, End> {
        let mut p = NarParser::new(self.limits);
        let mut out = Vec::new();
        loop {
            let used = p.feed(&self.rbuf).map_err(End::Proto)?;
            out.extend(self.take(used));
            if p.is_done() {
                return Ok(out);
            }
            self.fill().await?;
        }
    }

    /// Sends bytes to the client.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), End> {
        self.s2c.extend_from_slice(bytes);
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| End::Io(e.to_string()))?;
        self.stream
            .flush()
            .await
            .map_err(|e| End::Io(e.to_string()))
    }

    /// Never answers again: reads (and records) until the client closes.
    pub async fn stall(&mut self) -> End {
        loop {
            let n = self.rbuf.len();
            self.take(n);
            if let Err(e) = self.fill().await {
                return match e {
                    End::Truncated => End::Eof,
                    other => other,
                };
            }
        }
    }

    /// Closes the pipe (drops our end after flushing).
    async fn close(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}

// ===== the store behind both fakes =====

/// A path's metadata and its NAR.
pub type Item = (PathInfo, Vec<u8>);

/// What the fake knows: valid paths with their NARs, build outcomes, realisations.
#[derive(Debug, Clone, Default)]
pub struct FakeStore {
    /// Valid paths.
    pub paths: BTreeMap<StorePath, (PathInfo, Vec<u8>)>,
    /// The result a build of each `.drv` gets (a missing one fails).
    pub builds: BTreeMap<StorePath, BuildResult>,
    /// Known realisations.
    pub realisations: Vec<Realisation>,
    /// The `QueryMissing` answer.
    pub missing: Missing,
    /// Temp roots added.
    pub temp_roots: BTreeSet<StorePath>,
    /// The last `SetOptions` received.
    pub options: Option<worker::ClientOptions>,
    /// Build logs added (`AddBuildLog`), by derivation.
    pub build_logs: BTreeMap<StorePath, Vec<u8>>,
}

impl FakeStore {
    /// Adds a valid path.
    pub fn add(&mut self, info: PathInfo, nar: Vec<u8>) {
        self.paths.insert(info.path.clone(), (info, nar));
    }

    fn info(&self, p: &StorePath) -> Option<&PathInfo> {
        self.paths.get(p).map(|(i, _)| i)
    }

    fn valid(&self, paths: &BTreeSet<StorePath>) -> BTreeSet<StorePath> {
        paths
            .iter()
            .filter(|p| self.paths.contains_key(p))
            .cloned()
            .collect()
    }

    /// `paths` and everything they refer to, dependencies first.
    fn topo(&self, paths: &BTreeSet<StorePath>) -> Vec<StorePath> {
        fn visit(
            s: &FakeStore,
            p: &StorePath,
            seen: &mut BTreeSet<StorePath>,
            out: &mut Vec<StorePath>,
        ) {
            if !seen.insert(p.clone()) {
                return;
            }
            if let Some(info) = s.info(p) {
                for r in &info.references {
                    if r != p {
                        visit(s, r, seen, out);
                    }
                }
            }
            out.push(p.clone());
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for p in paths {
            visit(self, p, &mut seen, &mut out);
        }
        out
    }

    /// The record `AddToStore` makes of a dump, as Nix's `addToStoreFromDump` does for a NAR
    /// hashed with SHA-256 and no references (the only kind the fake takes).
    fn by_content(
        name: &str,
        method: &str,
        references: &BTreeSet<StorePath>,
        nar: Vec<u8>,
    ) -> Result<Vec<Item>, String> {
        if method != "fixed:r:sha256" || !references.is_empty() {
            return Err(format!(
                "the fake adds only plain NARs by content, not {method}"
            ));
        }
        let NarInfo { size, hash } = whole_nar(&nar)?;
        let path = make_source_path(&dir(), &hash, name).map_err(|e| e.to_string())?;
        let info = PathInfo {
            path,
            deriver: None,
            nar_hash: hash,
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size: size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: Some(format!("fixed:r:{}", hash.to_nix32_prefixed())),
        };
        Ok(vec![(info, nar)])
    }

    /// Checks a received NAR against its metadata and adds the path.
    fn import(&mut self, info: PathInfo, nar: Vec<u8>) -> Result<(), String> {
        let NarInfo { size, hash } = whole_nar(&nar)?;
        if size != info.nar_size {
            return Err(format!(
                "size mismatch importing path '{}'",
                info.path.to_absolute(&dir())
            ));
        }
        if hash != info.nar_hash {
            return Err(format!(
                "hash mismatch importing path '{}'",
                info.path.to_absolute(&dir())
            ));
        }
        self.add(info, nar);
        Ok(())
    }
}

/// The size and hash of `nar`, which must be exactly one whole archive.
fn whole_nar(nar: &[u8]) -> Result<NarInfo, String> {
    match parse_nar(nar, Limits::DEFAULT).map_err(|e| e.to_string())? {
        Some(info) if info.size == nar.len() as u64 => Ok(info),
        _ => Err("NAR is incomplete or has trailing bytes".into()),
    }
}

// ===== faults =====

/// A failure to inject. Request-level faults hit the first request after the handshake that
/// is not `SetOptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The hello reply carries a wrong magic.
    WrongMagic,
    /// The handshake's server bytes after the version (worker: daemon info and stderr loop)
    /// are replaced by these; then the fake never answers again.
    ReplaceHandshake(Vec<u8>),
    /// The reply starts with a `STDERR_*` code that does not exist (worker only).
    UnknownStderrCode,
    /// The reply is replaced by these bytes; then the fake never answers again (so the client
    /// must fail on the bytes themselves, not on EOF).
    Replace(Vec<u8>),
    /// Only the first `n` bytes of the reply are sent, then the pipe is closed.
    CutReply(usize),
    /// The request is read and never answered; the pipe stays open.
    Stall,
    /// During a framed upload the fake sends `STDERR_ERROR` after the first frame, then keeps
    /// draining frames up to the terminator (as Nix's `FramedSource` does). At 1.21–1.22 it
    /// sends the error instead of the second `STDERR_READ`.
    ErrorMidUpload,
}

/// What the fake saw of one upload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadSeen {
    /// Payload bytes received (frames' contents, or `STDERR_READ` answers).
    pub data_bytes: u64,
    /// Frames received (0 for pulled uploads).
    pub frames: usize,
    /// Whether the 0 terminator of a framed stream arrived.
    pub terminated: bool,
    /// `STDERR_READ` requests sent (pulled uploads).
    pub reads: usize,
    /// Whether the fake reported an error.
    pub failed: bool,
}

/// A hook that answers a request with raw bytes instead of the fake's own encoding.
pub type WorkerScript =
    Box<dyn FnMut(&worker::Request, &Negotiated) -> Option<Vec<u8>> + Send + Sync + 'static>;
/// The serve equivalent of [`WorkerScript`].
pub type ServeScript =
    Box<dyn FnMut(&serve::Request, ProtocolVersion) -> Option<Vec<u8>> + Send + Sync + 'static>;

// ===== worker =====

/// A fake `nix-daemon --stdio`.
pub struct WorkerFake {
    /// The version it announces.
    pub version: ProtocolVersion,
    /// Features it offers at 1.38.
    pub features: BTreeSet<String>,
    /// Version string (1.33+) and trust (1.35+).
    pub info: DaemonInfo,
    /// Messages sent before the handshake's `STDERR_LAST`.
    pub startup: Vec<StderrMsg>,
    /// Messages sent before every operation's `STDERR_LAST`.
    pub op_logs: Vec<StderrMsg>,
    /// The store.
    pub store: FakeStore,
    /// A fault to inject.
    pub fault: Option<Fault>,
    /// Lix ≥ 2.94: realisation ops fail with "ca derivations are not supported".
    pub refuse_ca: bool,
    /// Size asked for by each `STDERR_READ` at 1.21–1.22 (Nix asks for its buffer size).
    pub pull_chunk: u64,
    /// Raw answers for chosen requests.
    pub script: Option<WorkerScript>,
    /// Limits of the fake's decoders.
    pub limits: Limits,
}

/// What a fake daemon saw and did.
#[derive(Debug, Default)]
pub struct WorkerReport {
    /// All bytes from the client.
    pub c2s: Vec<u8>,
    /// All bytes to the client.
    pub s2c: Vec<u8>,
    /// The client's announced version.
    pub client_version: Option<ProtocolVersion>,
    /// The client's feature list (1.38+).
    pub client_features: Option<BTreeSet<String>>,
    /// What was negotiated.
    pub negotiated: Option<Negotiated>,
    /// Decoded requests, in order.
    pub requests: Vec<worker::Request>,
    /// The exact bytes of each request header.
    pub request_bytes: Vec<Vec<u8>>,
    /// Uploads, in order.
    pub uploads: Vec<UploadSeen>,
    /// The store at the end.
    pub store: FakeStore,
    /// Why the fake stopped.
    pub end: Option<End>,
}

impl WorkerFake {
    /// A daemon at `version` that tells Nix 2.8.0's version string (where the version has
    /// one) and trusts the client (where it can say so).
    pub fn new(version: ProtocolVersion) -> Self {
        WorkerFake {
            version,
            features: BTreeSet::new(),
            info: DaemonInfo {
                nix_version: Some("2.8.0".into()),
                trust: Some(worker::Trust::Trusted),
            },
            startup: Vec::new(),
            op_logs: Vec::new(),
            store: FakeStore::default(),
            fault: None,
            refuse_ca: false,
            pull_chunk: 32 << 10,
            script: None,
            limits: Limits::DEFAULT,
        }
    }

    /// Serves one connection until the client closes it (or a fault ends it).
    pub fn spawn(self, stream: DuplexStream) -> tokio::task::JoinHandle<WorkerReport> {
        tokio::spawn(self.run(stream))
    }

    async fn run(mut self, stream: DuplexStream) -> WorkerReport {
        let mut io = FakeIo::new(stream, self.limits);
        let mut rep = WorkerReport::default();
        let end = match self.conversation(&mut io, &mut rep).await {
            Ok(()) => End::Eof,
            Err(e) => e,
        };
        if end == End::ClosedByFake {
            io.close().await;
        }
        rep.c2s = std::mem::take(&mut io.c2s);
        rep.s2c = std::mem::take(&mut io.s2c);
        rep.store = self.store;
        rep.end = Some(end);
        rep
    }

    async fn conversation(&mut self, io: &mut FakeIo, rep: &mut WorkerReport) -> Result<(), End> {
        let client = io.read(worker::read_client_hello).await?;
        rep.client_version = Some(client);
        let mut hello = Vec::new();
        if self.fault == Some(Fault::WrongMagic) {
            // What a login shell's greeting looks like to a client.
            hello.extend_from_slice(b"Welcome!\nLast login: yesterday\n\0");
        } else {
            worker::write_server_hello(&mut hello, self.version);
        }
        io.send(&hello).await?;
        if self.fault == Some(Fault::WrongMagic) {
            return Err(io.stall().await);
        }
        let v = client.negotiate(self.version);
        let mut neg = Negotiated::new(v);
        if v.at_least(1, 38) {
            let theirs = io.read(worker::read_features).await?;
            let mut out = Vec::new();
            worker::write_features(&mut out, &self.features);
            io.send(&out).await?;
            neg.features = self.features.intersection(&theirs).cloned().collect();
            rep.client_features = Some(theirs);
        }
        io.read(|r| worker::read_client_tail(r, v)).await?;
        rep.negotiated = Some(neg.clone());
        if let Some(Fault::ReplaceHandshake(bytes)) = &self.fault {
            let bytes = bytes.clone();
            io.send(&bytes).await?;
            return Err(io.stall().await);
        }
        let mut out = Vec::new();
        worker::write_daemon_info(&mut out, v, &self.info);
        for m in &self.startup {
            m.write(&mut out, v);
        }
        StderrMsg::Last.write(&mut out, v);
        io.send(&out).await?;

        loop {
            let start = io.consumed;
            let req = match io.read(|r| worker::Request::read(r, &dir(), &neg)).await {
                Ok(r) => r,
                Err(End::Eof) => return Ok(()),
                Err(e) => return Err(e),
            };
            rep.request_bytes.push(io.c2s[start..io.consumed].to_vec());
            rep.requests.push(req.clone());
            let fault = if matches!(req, worker::Request::SetOptions(_)) {
                None
            } else {
                self.fault.take()
            };
            self.handle(req, &neg, fault, io, rep).await?;
        }
    }

    fn error(&self, v: ProtocolVersion, msg: &str) -> Vec<u8> {
        let mut out = Vec::new();
        StderrMsg::Error(RemoteError {
            level: 0,
            message: format!("error: {msg}"),
            exit_status: Some(1),
            traces: Vec::new(),
        })
        .write(&mut out, v);
        out
    }

    async fn handle(
        &mut self,
        req: worker::Request,
        neg: &Negotiated,
        fault: Option<Fault>,
        io: &mut FakeIo,
        rep: &mut WorkerReport,
    ) -> Result<(), End> {
        use worker::Request as R;
        let v = neg.version;
        let d = dir();
        let mut upload_failed = false;
        // Payloads first: they are part of the request.
        let mut received: Option<Result<Vec<Item>, String>> = None;
        match &req {
            R::AddToStoreNar { info, .. } => {
                let (seen, data) = if v.at_least(1, 23) {
                    self.read_framed(io, v, fault.as_ref()).await?
                } else {
                    self.pull(io, v, info.nar_size, fault.as_ref()).await?
                };
                upload_failed = seen.failed;
                rep.uploads.push(seen);
                received = Some(Ok(vec![(info.clone(), data)]));
            }
            R::AddToStore {
                name,
                method,
                references,
                ..
            } => {
                let (seen, data) = self.read_framed(io, v, fault.as_ref()).await?;
                upload_failed = seen.failed;
                rep.uploads.push(seen);
                if !upload_failed {
                    received = Some(FakeStore::by_content(name, method, references, data));
                }
            }
            R::AddMultipleToStore { .. } => {
                let (seen, data) = self.read_framed(io, v, fault.as_ref()).await?;
                upload_failed = seen.failed;
                rep.uploads.push(seen);
                if !upload_failed {
                    received = Some(parse_multiple(&data, self.limits));
                }
            }
            R::AddBuildLog { drv_path } => {
                let (seen, data) = self.read_framed(io, v, fault.as_ref()).await?;
                upload_failed = seen.failed;
                rep.uploads.push(seen);
                self.store.build_logs.insert(drv_path.clone(), data);
            }
            _ => {}
        }
        if upload_failed {
            // The error went out during the upload; no reply follows.
            return Ok(());
        }

        let mut body = Vec::new();
        let mut failure: Option<String> = None;
        let scripted = match &mut self.script {
            Some(s) => s(&req, neg),
            None => None,
        };
        if scripted.is_none() {
            match &req {
                R::IsValidPath { path } => body.put_flag(self.store.paths.contains_key(path)),
                R::EnsurePath { path } => {
                    if self.store.paths.contains_key(path) {
                        body.put_word(1);
                    } else {
                        failure = Some(format!(
                            "path '{}' does not exist and cannot be created",
                            path.to_absolute(&d)
                        ));
                    }
                }
                R::AddTempRoot { path } => {
                    self.store.temp_roots.insert(path.clone());
                    body.put_word(1);
                }
                R::SetOptions(o) => self.store.options = Some(o.clone()),
                R::QueryPathInfo { path } => {
                    worker::write_query_path_info(&mut body, &d, neg, self.store.info(path));
                }
                R::QueryPathFromHashPart { hash_part } => {
                    let found = self
                        .store
                        .paths
                        .keys()
                        .find(|p| &p.hash_part() == hash_part);
                    worker::write_opt_path(&mut body, &d, found);
                }
                R::QueryValidPaths { paths, .. } => {
                    put_store_path_set(&mut body, &d, &self.store.valid(paths));
                }
                R::BuildDerivation { drv_path, .. } => {
                    let res = self.store.builds.get(drv_path).cloned().unwrap_or_else(|| {
                        BuildResult::failure(BuildStatus::MiscFailure, "no such build")
                    });
                    res.write(&mut body, &d, neg.result_layout());
                }
                R::AddBuildLog { .. } => body.put_word(1),
                R::AddSignatures { path, sigs } => match self.store.paths.get_mut(path) {
                    Some((info, _)) => {
                        info.sigs.extend(sigs.iter().cloned());
                        body.put_word(1);
                    }
                    None => failure = Some("path is not valid".into()),
                },
                R::NarFromPath { path } => match self.store.paths.get(path) {
                    Some((_, nar)) => body.extend_from_slice(nar),
                    None => {
                        failure = Some(format!("path '{}' is not valid", path.to_absolute(&d)));
                    }
                },
                R::AddToStoreNar { .. } | R::AddMultipleToStore { .. } => {
                    match received.take().unwrap_or(Ok(Vec::new())) {
                        Ok(items) => {
                            for (info, nar) in items {
                                if let Err(e) = self.store.import(info, nar) {
                                    failure = Some(e);
                                    break;
                                }
                            }
                        }
                        Err(e) => failure = Some(e),
                    }
                }
                R::AddToStore { .. } => match received.take().unwrap_or(Ok(Vec::new())) {
                    Ok(items) => {
                        for (info, nar) in items {
                            info.put_worker_keyed(&mut body, &d, v);
                            if let Err(e) = self.store.import(info, nar) {
                                failure = Some(e);
                            }
                        }
                    }
                    Err(e) => failure = Some(e),
                },
                R::QueryMissing { .. } => worker::write_missing(&mut body, &d, &self.store.missing),
                // The fake store holds no derivations: no output paths to tell.
                R::QueryDerivationOutputMap { .. } => {
                    worker::write_derivation_output_map(&mut body, &d, &Default::default())
                }
                R::RegisterDrvOutput(real) => {
                    if self.refuse_ca {
                        failure = Some("ca derivations are not supported".into());
                    } else {
                        self.store.realisations.push(real.clone());
                    }
                }
                R::QueryRealisation(id) => {
                    if self.refuse_ca {
                        failure = Some("ca derivations are not supported".into());
                    } else {
                        let found = self.store.realisations.iter().find(|r| &r.id == id);
                        worker::write_realisation(&mut body, &d, neg, found);
                    }
                }
                R::BuildPaths { targets, .. } => {
                    let ok = targets.iter().all(|t| self.target_ok(t));
                    if ok {
                        body.put_word(1);
                    } else {
                        failure = Some("build of some targets failed".into());
                    }
                }
                R::BuildPathsWithResults { targets, .. } => {
                    let results: Vec<_> = targets
                        .iter()
                        .map(|t| (t.clone(), self.target_result(t)))
                        .collect();
                    worker::write_keyed_build_results(&mut body, &d, neg, &results);
                }
            }
        }

        let mut reply = Vec::new();
        match scripted {
            Some(raw) => reply = raw,
            None => {
                for m in &self.op_logs {
                    m.write(&mut reply, v);
                }
                match failure {
                    Some(msg) => reply.extend(self.error(v, &msg)),
                    None => {
                        StderrMsg::Last.write(&mut reply, v);
                        reply.extend(body);
                    }
                }
            }
        }
        send_with_fault(io, reply, fault).await
    }

    fn target_result(&self, t: &nixmux_proto::derived_path::DerivedPath) -> BuildResult {
        use nixmux_proto::derived_path::DerivedPath;
        match t {
            DerivedPath::Opaque(p) if self.store.paths.contains_key(p) => {
                BuildResult::failure(BuildStatus::AlreadyValid, "")
            }
            DerivedPath::Opaque(_) => BuildResult::failure(BuildStatus::MiscFailure, "invalid"),
            DerivedPath::Built { drv, .. } => {
                self.store.builds.get(drv).cloned().unwrap_or_else(|| {
                    BuildResult::failure(BuildStatus::MiscFailure, "no such build")
                })
            }
        }
    }

    fn target_ok(&self, t: &nixmux_proto::derived_path::DerivedPath) -> bool {
        self.target_result(t).status.is_success()
    }

    /// Reads a framed stream up to its terminator, draining after an injected error.
    async fn read_framed(
        &self,
        io: &mut FakeIo,
        v: ProtocolVersion,
        fault: Option<&Fault>,
    ) -> Result<(UploadSeen, Vec<u8>), End> {
        let mut seen = UploadSeen::default();
        let mut data = Vec::new();
        loop {
            let n = io.read(worker::read_frame_header).await?;
            if n == 0 {
                seen.terminated = true;
                return Ok((seen, data));
            }
            let chunk = io.read_raw(n).await?;
            seen.frames += 1;
            seen.data_bytes += n as u64;
            data.extend_from_slice(&chunk);
            if fault == Some(&Fault::ErrorMidUpload) && !seen.failed {
                seen.failed = true;
                io.send(&self.error(v, "fake daemon refuses this upload"))
                    .await?;
            }
        }
    }

    /// Pulls a NAR with `STDERR_READ` (1.21–1.22) until the archive is complete.
    async fn pull(
        &self,
        io: &mut FakeIo,
        v: ProtocolVersion,
        _nar_size: u64,
        fault: Option<&Fault>,
    ) -> Result<(UploadSeen, Vec<u8>), End> {
        let mut seen = UploadSeen::default();
        let mut parser = NarParser::new(self.limits);
        let mut data = Vec::new();
        while !parser.is_done() {
            if fault == Some(&Fault::ErrorMidUpload) && seen.reads == 1 {
                seen.failed = true;
                io.send(&self.error(v, "fake daemon refuses this upload"))
                    .await?;
                return Ok((seen, data));
            }
            let mut ask = Vec::new();
            StderrMsg::Read(self.pull_chunk).write(&mut ask, v);
            io.send(&ask).await?;
            seen.reads += 1;
            let chunk = io
                .read(|r| r.read_bytes("STDERR_READ answer").map(<[u8]>::to_vec))
                .await?;
            if chunk.is_empty() {
                // Nix's TunnelSource: "unexpected end-of-file".
                seen.failed = true;
                io.send(&self.error(v, "unexpected end-of-file")).await?;
                return Ok((seen, data));
            }
            seen.data_bytes += chunk.len() as u64;
            let used = parser.feed(&chunk).map_err(End::Proto)?;
            if used != chunk.len() {
                return Err(End::Proto(ProtoError::invalid(
                    "upload",
                    "data after the end of the NAR",
                )));
            }
            data.extend_from_slice(&chunk);
        }
        Ok((seen, data))
    }
}

fn parse_multiple(data: &[u8], limits: Limits) -> Result<Vec<Item>, String> {
    let mut r = WireReader::new(data, &limits);
    let n = r.read_u64().map_err(|e| format!("{e:?}"))?;
    let mut out = Vec::new();
    for _ in 0..n {
        let info = worker::read_multiple_entry(&mut r, &dir()).map_err(|e| format!("{e:?}"))?;
        let rest = r.remaining();
        let mut p = NarParser::new(limits);
        let used = p.feed(rest).map_err(|e| e.to_string())?;
        if !p.is_done() {
            return Err("NAR ends early".into());
        }
        let nar = r.read_raw(used).map_err(|e| format!("{e:?}"))?.to_vec();
        out.push((info, nar));
    }
    if !r.remaining().is_empty() {
        return Err("bytes after the last path".into());
    }
    Ok(out)
}

/// Sends a reply, applying a fault to it.
async fn send_with_fault(io: &mut FakeIo, reply: Vec<u8>, fault: Option<Fault>) -> Result<(), End> {
    match fault {
        None | Some(Fault::ErrorMidUpload) | Some(Fault::WrongMagic) => io.send(&reply).await,
        Some(Fault::ReplaceHandshake(_)) => io.send(&reply).await,
        Some(Fault::UnknownStderrCode) => {
            let mut out = Vec::new();
            out.put_word(UNKNOWN_STDERR_CODE);
            io.send(&out).await?;
            Err(io.stall().await)
        }
        Some(Fault::Replace(bytes)) => {
            io.send(&bytes).await?;
            Err(io.stall().await)
        }
        Some(Fault::CutReply(n)) => {
            let n = n.min(reply.len().saturating_sub(1));
            io.send(&reply[..n]).await?;
            Err(End::ClosedByFake)
        }
        Some(Fault::Stall) => Err(io.stall().await),
    }
}

// ===== serve =====

/// A fake `nix-store --serve --write`.
pub struct ServeFake {
    /// The version it announces.
    pub version: ProtocolVersion,
    /// The store.
    pub store: FakeStore,
    /// A fault to inject.
    pub fault: Option<Fault>,
    /// Nix 2.8.0–2.10: `builtOutputs` is sent whatever the version (a gate that is always
    /// true).
    pub always_built_outputs: bool,
    /// Raw answers for chosen requests.
    pub script: Option<ServeScript>,
    /// Limits of the fake's decoders.
    pub limits: Limits,
}

/// What a fake serve server saw and did.
#[derive(Debug, Default)]
pub struct ServeReport {
    /// All bytes from the client.
    pub c2s: Vec<u8>,
    /// All bytes to the client.
    pub s2c: Vec<u8>,
    /// The client's announced version.
    pub client_version: Option<ProtocolVersion>,
    /// `min(client, fake)`.
    pub negotiated: Option<ProtocolVersion>,
    /// Decoded requests, in order.
    pub requests: Vec<serve::Request>,
    /// The exact bytes of each request header.
    pub request_bytes: Vec<Vec<u8>>,
    /// The store at the end.
    pub store: FakeStore,
    /// Why the fake stopped.
    pub end: Option<End>,
}

impl ServeFake {
    /// A server at `version`.
    pub fn new(version: ProtocolVersion) -> Self {
        ServeFake {
            version,
            store: FakeStore::default(),
            fault: None,
            always_built_outputs: false,
            script: None,
            limits: Limits::DEFAULT,
        }
    }

    /// Serves one connection.
    pub fn spawn(self, stream: DuplexStream) -> tokio::task::JoinHandle<ServeReport> {
        tokio::spawn(self.run(stream))
    }

    async fn run(mut self, stream: DuplexStream) -> ServeReport {
        let mut io = FakeIo::new(stream, self.limits);
        let mut rep = ServeReport::default();
        let end = match self.conversation(&mut io, &mut rep).await {
            Ok(()) => End::Eof,
            Err(e) => e,
        };
        if end == End::ClosedByFake {
            io.close().await;
        }
        rep.c2s = std::mem::take(&mut io.c2s);
        rep.s2c = std::mem::take(&mut io.s2c);
        rep.store = self.store;
        rep.end = Some(end);
        rep
    }

    async fn conversation(&mut self, io: &mut FakeIo, rep: &mut ServeReport) -> Result<(), End> {
        let client = io.read(serve::read_client_hello).await?;
        rep.client_version = Some(client);
        let mut hello = Vec::new();
        if self.fault == Some(Fault::WrongMagic) {
            hello.extend_from_slice(b"bash: nix-store: command not found\n\0\0\0\0\0");
        } else {
            serve::write_server_hello(&mut hello, self.version);
        }
        io.send(&hello).await?;
        if self.fault == Some(Fault::WrongMagic) {
            return Err(io.stall().await);
        }
        let v = client.negotiate(self.version);
        rep.negotiated = Some(v);
        loop {
            let start = io.consumed;
            let req = match io.read(|r| serve::Request::read(r, &dir(), v)).await {
                Ok(r) => r,
                Err(End::Eof) => return Ok(()),
                Err(e) => return Err(e),
            };
            rep.request_bytes.push(io.c2s[start..io.consumed].to_vec());
            rep.requests.push(req.clone());
            let fault = self.fault.take();
            self.handle(req, v, fault, io).await?;
        }
    }

    async fn handle(
        &mut self,
        req: serve::Request,
        v: ProtocolVersion,
        fault: Option<Fault>,
        io: &mut FakeIo,
    ) -> Result<(), End> {
        use serve::Request as R;
        let d = dir();
        // Payloads first.
        let mut imported: Option<Result<(), String>> = None;
        match &req {
            R::AddToStoreNar { info } => {
                let n = usize::try_from(info.nar_size).map_err(|_| End::Truncated)?;
                let nar = io.read_raw(n).await?;
                imported = Some(self.store.import(info.clone(), nar));
            }
            R::ImportPaths => {
                let mut result = Ok(());
                loop {
                    match io.read(serve::read_export_item).await? {
                        ExportItem::End => break,
                        ExportItem::Path => {
                            let nar = io.read_nar().await?;
                            let t = io.read(|r| serve::read_export_trailer(r, &d)).await?;
                            let summary = nixmux_proto::nar::parse_nar(&nar, self.limits)
                                .map_err(End::Proto)?
                                .ok_or(End::Truncated)?;
                            let info = PathInfo {
                                path: t.path,
                                deriver: t.deriver,
                                nar_hash: summary.hash,
                                references: t.references,
                                registration_time: 0,
                                nar_size: summary.size,
                                ultimate: false,
                                sigs: BTreeSet::new(),
                                ca: None,
                            };
                            if let Err(e) = self.store.import(info, nar) {
                                result = Err(e);
                            }
                        }
                    }
                }
                imported = Some(result);
            }
            _ => {}
        }
        let scripted = match &mut self.script {
            Some(s) => s(&req, v),
            None => None,
        };
        let reply = match scripted {
            Some(raw) => raw,
            None => {
                let mut out = Vec::new();
                match &req {
                    R::QueryValidPaths { paths, .. } => {
                        put_store_path_set(&mut out, &d, &self.store.valid(paths));
                    }
                    R::QueryPathInfos { paths } => {
                        let infos: Vec<PathInfo> = paths
                            .iter()
                            .filter_map(|p| self.store.info(p).cloned())
                            .collect();
                        serve::write_path_infos(&mut out, &d, &infos);
                    }
                    R::DumpStorePath { path } => match self.store.paths.get(path) {
                        Some((_, nar)) => out.extend_from_slice(nar),
                        // The real server prints an error on stderr and exits.
                        None => return Err(End::ClosedByFake),
                    },
                    R::AddToStoreNar { .. } | R::ImportPaths => match imported.take() {
                        Some(Ok(())) | None => out.put_word(1),
                        Some(Err(_)) => return Err(End::ClosedByFake),
                    },
                    R::ExportPaths { paths } => {
                        // Exactly the requested paths, dependencies first (Nix's
                        // `exportPaths` sorts them topologically; it adds nothing).
                        for p in self
                            .store
                            .topo(paths)
                            .into_iter()
                            .filter(|p| paths.contains(p))
                        {
                            let Some((info, nar)) = self.store.paths.get(&p) else {
                                return Err(End::ClosedByFake);
                            };
                            serve::write_export_item(&mut out, ExportItem::Path);
                            out.extend_from_slice(nar);
                            serve::write_export_entry(
                                &mut out,
                                &d,
                                &ExportTrailer {
                                    path: p.clone(),
                                    references: info.references.clone(),
                                    deriver: info.deriver.clone(),
                                },
                            );
                        }
                        serve::write_export_item(&mut out, ExportItem::End);
                    }
                    R::BuildPaths { paths, .. } => {
                        use nixmux_proto::derived_path::DerivedPath;
                        let failed = paths.iter().find_map(|t| match t {
                            DerivedPath::Built { drv, .. } => match self.store.builds.get(drv) {
                                Some(r) if r.status.is_success() => None,
                                Some(r) => Some(r.error_msg.clone()),
                                None => Some("no such build".to_owned()),
                            },
                            DerivedPath::Opaque(_) => None,
                        });
                        match failed {
                            None => serve::write_build_paths_reply(&mut out, None),
                            Some(msg) => {
                                serve::write_build_paths_reply(&mut out, Some((100, &msg)))
                            }
                        }
                    }
                    R::QueryClosure { paths, .. } => {
                        let all: BTreeSet<StorePath> = self.store.topo(paths).into_iter().collect();
                        put_store_path_set(&mut out, &d, &all);
                    }
                    R::BuildDerivation { drv_path, .. } => {
                        let res = self.store.builds.get(drv_path).cloned().unwrap_or_else(|| {
                            BuildResult::failure(BuildStatus::MiscFailure, "no such build")
                        });
                        let mut layout = serve::result_layout(v);
                        if self.always_built_outputs && layout.outputs == OutputsEncoding::Absent {
                            layout.outputs = OutputsEncoding::RealisationJson;
                        }
                        res.write(&mut out, &d, layout);
                    }
                }
                out
            }
        };
        send_with_fault(io, reply, fault).await
    }
}

// ===== sample data =====

/// A store path `/nix/store/<hash from seed>-<name>`.
pub fn sp(seed: u8, name: &str) -> StorePath {
    StorePath::new([seed; 20], name).expect("valid store path")
}

/// A single-file NAR with `contents`, and its path info for `path`.
pub fn sample(path: StorePath, contents: &[u8], refs: &[&StorePath]) -> (PathInfo, Vec<u8>) {
    let nar = nixmux_proto::nar::NarNode::File {
        executable: false,
        contents: contents.to_vec(),
    }
    .to_nar();
    let info = PathInfo {
        path,
        deriver: None,
        nar_hash: nixmux_proto::hash::Hash::sha256_of(&nar),
        references: refs.iter().map(|p| (*p).clone()).collect(),
        registration_time: 1_700_000_000,
        nar_size: nar.len() as u64,
        ultimate: false,
        sigs: BTreeSet::new(),
        ca: None,
    };
    (info, nar)
}

/// A plain source path (as `nix-store --add` makes it) holding one file of `contents`.
pub fn sample_source(name: &str, contents: &[u8]) -> (PathInfo, Vec<u8>) {
    let (mut info, nar) = sample(
        StorePath::new([0; 20], name).expect("valid name"),
        contents,
        &[],
    );
    info.path = make_source_path(&dir(), &info.nar_hash, name).expect("valid name");
    info.ca = Some(format!("fixed:r:{}", info.nar_hash.to_nix32_prefixed()));
    (info, nar)
}

/// `DrvOutputId::HashModulo` for tests.
pub fn old_id(output: &str) -> DrvOutputId {
    DrvOutputId::HashModulo {
        drv_hash: format!("sha256:{}", "ab".repeat(32)),
        output: output.to_owned(),
    }
}

// ===== hand-built bytes =====

/// One item of hand-built wire bytes (independent of the proto encoders).
#[derive(Debug, Clone)]
pub enum W<'a> {
    /// A word.
    N(u64),
    /// A padded string.
    S(&'a str),
    /// A counted list of strings.
    L(&'a [&'a str]),
}

/// Assembles hand-built bytes: words little-endian, strings length-prefixed and zero-padded.
pub fn wire(items: &[W<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let put_str = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
    };
    for it in items {
        match it {
            W::N(n) => out.extend_from_slice(&n.to_le_bytes()),
            W::S(s) => put_str(&mut out, s),
            W::L(l) => {
                out.extend_from_slice(&(l.len() as u64).to_le_bytes());
                for s in *l {
                    put_str(&mut out, s);
                }
            }
        }
    }
    out
}

/// Reads `n` little-endian words from the start of `bytes` (for messages in tests).
pub fn words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect()
}
