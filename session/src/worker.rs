//! A worker-protocol session (`nix-daemon --stdio`, or a daemon socket).
//!
//! A `STDERR_ERROR` fails the operation only ([`SessionError::Remote`]); the session stays
//! usable. Log frames that arrive during an operation are handed to the caller's log callback,
//! which must not block (the mux layer forwards them into a bounded channel that drops when
//! full, so a slow log reader never stalls the protocol).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use nixmux_proto::build_result::BuildResult;
use nixmux_proto::derivation::BasicDerivation;
use nixmux_proto::derived_path::DerivedPath;
use nixmux_proto::log::LogEvent;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::store_path::{StoreDir, StorePath};
use nixmux_proto::wire::WireWrite;
use nixmux_proto::worker::{
    self, BuildMode, ClientOptions, DaemonInfo, DrvOutputId, Missing, Negotiated, Op, Realisation,
    RemoteError, Request, StderrMsg,
};
use nixmux_proto::{Misbehaved, ProtoError, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::activity::Patience;
use crate::conn::{
    BoxReader, BoxWriter, Conn, NarHashing, NarSummary, ReadHalf, SessionConfig, WRITE_CHUNK,
    read_upload_piece,
};
use crate::error::SessionError;
use crate::lead::{Lead, Opening};
use crate::serve::{NAR_WINDOW, NarsError, Upload};

/// A log callback. It is called from inside the protocol loop, so it must return quickly.
pub type LogFn<'a> = &'a mut (dyn FnMut(LogEvent) + Send);

/// Worker-protocol specific settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Version we announce. 1.38 (default) negotiates features, which costs one more round
    /// trip in the handshake; 1.37 skips them and lets the whole handshake (and SetOptions)
    /// go out in one write.
    pub announce: ProtocolVersion,
    /// Features we offer at 1.38.
    pub features: BTreeSet<String>,
    /// Settings sent with `SetOptions` right after the handshake (Nix's own ssh-ng client
    /// never sends them; we do, so build limits reach the builder on both protocols).
    pub options: Option<ClientOptions>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            announce: worker::OUR_VERSION,
            features: BTreeSet::new(),
            options: Some(ClientOptions::default()),
        }
    }
}

/// An established worker session.
pub struct WorkerSession {
    conn: Conn,
    neg: Negotiated,
    info: DaemonInfo,
    dir: StoreDir,
    /// Sent with the handshake, answer not read yet ([`Lead`]).
    lead: Option<Lead>,
}

impl std::fmt::Debug for WorkerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSession")
            .field("negotiated", &self.neg)
            .field("info", &self.info)
            .field("usable", &self.conn.is_usable())
            .finish_non_exhaustive()
    }
}

/// A request the session cannot send: nothing was sent, the session stays usable.
fn unsupported(e: ProtoError) -> SessionError {
    match e {
        ProtoError::Incompatible(i) => SessionError::Unsupported(i),
        other => SessionError::Protocol {
            during: "worker",
            source: other,
        },
    }
}

/// Runs the stderr loop on a read half until `STDERR_LAST` (Ok) or `STDERR_ERROR` (Err).
async fn stderr_loop(
    rh: &mut ReadHalf<'_>,
    v: ProtocolVersion,
    during: &'static str,
    patience: Patience,
    logs: LogFn<'_>,
) -> Result<(), SessionError> {
    loop {
        let msg = rh.read(during, patience, |r| StderrMsg::read(r, v)).await?;
        match msg {
            StderrMsg::Last => return Ok(()),
            StderrMsg::Error(e) => return Err(SessionError::Remote(e)),
            StderrMsg::Read(_) | StderrMsg::Write(_) => {
                return Err(SessionError::Protocol {
                    during,
                    source: Misbehaved::Unexpected(
                        "STDERR_READ/WRITE outside an operation that transfers data".into(),
                    )
                    .into(),
                });
            }
            other => {
                if let Some(ev) = LogEvent::from_worker(&other) {
                    logs(ev);
                }
            }
        }
    }
}

impl WorkerSession {
    /// Performs the handshake (and `SetOptions`, when configured) over a fresh pipe to
    /// `nix-daemon --stdio`.
    pub async fn handshake(
        reader: BoxReader,
        writer: BoxWriter,
        dir: StoreDir,
        config: SessionConfig,
        wconfig: &WorkerConfig,
        logs: LogFn<'_>,
    ) -> Result<Self, SessionError> {
        Self::handshake_from(reader, writer, dir, config, wconfig, logs, None).await
    }

    /// What the handshake with `wconfig` sends before it reads anything: the hello, and
    /// below 1.38 also the rest of the client's part and `SetOptions`. A caller that can send
    /// these bytes ahead (with the SSH exec request that starts the daemon, a round trip
    /// before the channel is ready) does so, then calls [`WorkerSession::handshake_after`]
    /// with the same `dir` and `wconfig`.
    ///
    /// `lead` is not among these bytes: the handshake sends it as soon as the daemon's
    /// version is known, in the same write as the rest of the handshake ([`Lead`]). A lead
    /// the negotiated version cannot express, or a large one, is not sent (the operation
    /// then sends it, or says why it cannot).
    pub fn opening(dir: &StoreDir, wconfig: &WorkerConfig, lead: Option<&Lead>) -> Opening {
        let mut buf = BytesMut::new();
        Self::write_opening(&mut buf, dir, wconfig);
        Opening::new(buf.freeze(), lead.cloned())
    }

    /// The handshake on a pipe to which `opening` ([`WorkerSession::opening`]) was already
    /// written.
    pub async fn handshake_after(
        opening: Opening,
        reader: BoxReader,
        writer: BoxWriter,
        dir: StoreDir,
        config: SessionConfig,
        wconfig: &WorkerConfig,
        logs: LogFn<'_>,
    ) -> Result<Self, SessionError> {
        Self::handshake_from(reader, writer, dir, config, wconfig, logs, Some(opening)).await
    }

    /// Writes the opening; returns whether it holds the whole client part (below 1.38).
    fn write_opening(out: &mut BytesMut, dir: &StoreDir, wconfig: &WorkerConfig) -> bool {
        let ours = wconfig.announce;
        worker::write_client_hello(out, ours);
        // Below 1.38 nothing depends on the daemon's answer: the obsolete words are gated on
        // 1.11/1.14, below anything we accept, and SetOptions can follow right away.
        let pipelined = !ours.at_least(1, 38);
        if pipelined {
            worker::write_client_tail(out, ours);
            if let Some(o) = &wconfig.options {
                // Gated on the version we cannot know yet: only the 1.12 overrides map
                // depends on it, and every daemon we accept is past 1.12.
                Request::SetOptions(o.clone()).write(out, dir, &Negotiated::new(ours));
            }
        }
        pipelined
    }

    async fn handshake_from(
        reader: BoxReader,
        writer: BoxWriter,
        dir: StoreDir,
        config: SessionConfig,
        wconfig: &WorkerConfig,
        logs: LogFn<'_>,
        sent: Option<Opening>,
    ) -> Result<Self, SessionError> {
        const DURING: &str = "worker handshake";
        let mut conn = Conn::new(reader, writer, config);
        let ours = wconfig.announce;
        let (pipelined, lead) = match sent {
            // Already on its way: only note it as sent.
            Some(opening) => {
                conn.bytes_out += opening.bytes.len() as u64;
                (!ours.at_least(1, 38), opening.lead)
            }
            None => {
                let pipelined = Self::write_opening(&mut conn.wbuf, &dir, wconfig);
                conn.flush(DURING).await?;
                (pipelined, None)
            }
        };
        let version = conn
            .read(DURING, |r| worker::read_server_hello(r, ours))
            .await?;
        let mut neg = Negotiated::new(version);
        let lead = lead.and_then(|l| Some((l.worker_bytes(&dir, &neg)?, l)));
        // Everything left to say goes in one write: our features (1.38), the rest of the
        // handshake, SetOptions and the lead. None of it depends on the daemon's features
        // (read after), and the daemon reads them in this order (its side of the handshake,
        // src/libstore/worker-protocol-connection.cc, then `processConnection` in
        // src/libstore/daemon.cc), so what it writes back after reading them (its features,
        // its version string, STDERR_LAST for the handshake and for SetOptions, the lead's
        // answer) leaves in one burst instead of one round trip after another.
        let features = !pipelined && version.at_least(1, 38);
        if features {
            worker::write_features(&mut conn.wbuf, &wconfig.features);
        }
        if !pipelined {
            worker::write_client_tail(&mut conn.wbuf, version);
            if let Some(o) = &wconfig.options {
                Request::SetOptions(o.clone()).write(&mut conn.wbuf, &dir, &neg);
            }
        }
        if let Some((bytes, _)) = &lead {
            conn.wbuf.extend_from_slice(bytes);
        }
        if !conn.wbuf.is_empty() {
            conn.flush(DURING).await?;
        }
        if features {
            let theirs = conn.read(DURING, worker::read_features).await?;
            neg.features = wconfig.features.intersection(&theirs).cloned().collect();
        }
        let info = conn
            .read(DURING, |r| worker::read_daemon_info(r, version))
            .await?;
        let mut session = WorkerSession {
            conn,
            neg,
            info,
            dir,
            lead: lead.map(|(_, l)| l),
        };
        {
            let t = Patience::Transfer;
            let (mut rh, _) = session.conn.halves();
            stderr_loop(&mut rh, version, DURING, t, logs).await?;
            if wconfig.options.is_some() {
                stderr_loop(&mut rh, version, "worker SetOptions", t, logs).await?;
            }
        }
        Ok(session)
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// The negotiated version.
    pub fn version(&self) -> ProtocolVersion {
        self.neg.version
    }

    /// What the daemon told about itself (version string, trust).
    pub fn daemon_info(&self) -> &DaemonInfo {
        &self.info
    }

    /// The store directory paths are printed with.
    pub fn store_dir(&self) -> &StoreDir {
        &self.dir
    }

    /// Whether another operation may be started.
    pub fn is_usable(&self) -> bool {
        self.conn.is_usable()
    }

    /// Round trips so far: waits for the peer's answer after sending (counted on the shared
    /// counter of `SessionConfig::round_trips` when there is one).
    pub fn round_trips(&self) -> u64 {
        self.conn.round_trips()
    }

    /// Bytes received and sent so far.
    pub fn byte_counts(&self) -> (u64, u64) {
        (self.conn.bytes_in, self.conn.bytes_out)
    }

    /// Marks the session unusable.
    pub fn poison(&mut self) {
        self.conn.poison();
    }

    /// Ends the session cleanly (the daemon exits on EOF between operations).
    pub async fn close(mut self) {
        self.conn.shutdown().await;
    }

    fn check(&self, op: Op) -> Result<(), SessionError> {
        self.neg.check_op(op).map_err(unsupported)
    }

    /// Like [`WorkerSession::check`], and also refuses a request whose realisation id has the
    /// other form than the connection uses (it would be encoded into bytes the daemon cannot
    /// parse, and the session would be lost).
    fn check_request(&self, req: &Request) -> Result<(), SessionError> {
        self.neg.check_request(req).map_err(unsupported)
    }

    /// Reads and drops the answer to the [`Lead`] if no operation took it: the next
    /// operation's answer comes after it. A refusal of the lead is dropped too (nobody asked).
    async fn settle_lead(&mut self) -> Result<(), SessionError> {
        const DURING: &str = "worker handshake's lead request";
        let Some(lead) = self.lead.take() else {
            return Ok(());
        };
        self.conn.begin()?;
        let v = self.neg.version;
        let dir = self.dir.clone();
        let r = async {
            let t = Patience::Transfer;
            {
                let (mut rh, _) = self.conn.halves();
                match stderr_loop(&mut rh, v, DURING, t, &mut |_| {}).await {
                    Ok(()) => {}
                    Err(SessionError::Remote(_)) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            match lead {
                Lead::QueryValidPaths { .. } => self
                    .conn
                    .read(DURING, |r| worker::read_path_set(r, &dir))
                    .await
                    .map(drop),
            }
        }
        .await;
        self.conn.end(r)
    }

    /// Starts an operation other than [`WorkerSession::simple`]'s: the lead's answer first.
    async fn begin(&mut self) -> Result<(), SessionError> {
        self.settle_lead().await?;
        self.conn.begin()
    }

    /// Sends `req`, runs the stderr loop, and decodes the reply with `decode`.
    async fn simple<T>(
        &mut self,
        req: Request,
        during: &'static str,
        patience: Patience,
        logs: LogFn<'_>,
        decode: impl Fn(
            &mut nixmux_proto::wire::WireReader<'_>,
            &StoreDir,
            &Negotiated,
        ) -> nixmux_proto::wire::ReadResult<T>,
    ) -> Result<T, SessionError> {
        self.check_request(&req)?;
        // Asked already with the handshake: its answer is the next thing to read.
        let led = self.lead.take_if(|l| l.worker_request() == req).is_some();
        if !led {
            self.settle_lead().await?;
        }
        self.conn.begin()?;
        let r = async {
            if !led {
                req.write(&mut self.conn.wbuf, &self.dir, &self.neg);
                self.conn.flush(during).await?;
            }
            let v = self.neg.version;
            {
                let (mut rh, _) = self.conn.halves();
                stderr_loop(&mut rh, v, during, patience, logs).await?;
            }
            let dir = self.dir.clone();
            let neg = self.neg.clone();
            self.conn
                .read_with(during, patience, |r| decode(r, &dir, &neg))
                .await
        }
        .await;
        self.conn.end(r)
    }

    /// Sends `SetOptions` again (e.g. different build limits for the next build).
    pub async fn set_options(
        &mut self,
        options: &ClientOptions,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        let t = Patience::Transfer;
        self.simple(
            Request::SetOptions(options.clone()),
            "worker SetOptions",
            t,
            logs,
            |_, _, _| Ok(()),
        )
        .await
    }

    /// `IsValidPath`.
    pub async fn is_valid_path(
        &mut self,
        path: &StorePath,
        logs: LogFn<'_>,
    ) -> Result<bool, SessionError> {
        let t = Patience::Transfer;
        self.simple(
            Request::IsValidPath { path: path.clone() },
            "worker IsValidPath",
            t,
            logs,
            |r, _, _| r.read_bool(),
        )
        .await
    }

    /// `QueryValidPaths`; `substitute` is honoured from 1.27.
    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
        logs: LogFn<'_>,
    ) -> Result<BTreeSet<StorePath>, SessionError> {
        let t = Patience::Transfer;
        self.simple(
            Request::QueryValidPaths {
                paths: paths.clone(),
                substitute,
            },
            "worker QueryValidPaths",
            t,
            logs,
            |r, dir, _| worker::read_path_set(r, dir),
        )
        .await
    }

    /// `AddTempRoot` for each of `paths`, then `QueryValidPaths` of them, all in one round
    /// trip: the paths are protected from the garbage collector for as long as the session
    /// lives (see [`WorkerSession::add_temp_roots`]) and the answer says which are there.
    pub async fn protect_and_query_valid(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
        logs: LogFn<'_>,
    ) -> Result<BTreeSet<StorePath>, SessionError> {
        const DURING: &str = "worker AddTempRoot + QueryValidPaths";
        self.check(Op::AddTempRoot)?;
        let query = Request::QueryValidPaths {
            paths: paths.clone(),
            substitute,
        };
        self.check_request(&query)?;
        self.begin().await?;
        let mut requests = BytesMut::new();
        for p in paths {
            Request::AddTempRoot { path: p.clone() }.write(&mut requests, &self.dir, &self.neg);
        }
        query.write(&mut requests, &self.dir, &self.neg);
        let dir = self.dir.clone();
        let v = self.neg.version;
        let t = Patience::Transfer;
        self.conn.concurrent_turn();
        let (mut rh, mut wh) = self.conn.halves();
        let writer = wh.send(&requests, DURING);
        let reader = async {
            let mut refused = None;
            for _ in paths {
                match stderr_loop(&mut rh, v, DURING, t, logs).await {
                    Ok(()) => {
                        rh.read(DURING, t, |r| worker::read_ack(r, "AddTempRoot"))
                            .await?
                    }
                    Err(SessionError::Remote(e)) => {
                        refused.get_or_insert(e);
                    }
                    Err(other) => return Err(other),
                }
            }
            stderr_loop(&mut rh, v, DURING, t, logs).await?;
            let valid = rh
                .read(DURING, t, |r| worker::read_path_set(r, &dir))
                .await?;
            refused.map_or(Ok(valid), |e| Err(SessionError::Remote(e)))
        };
        let r = tokio::try_join!(writer, reader).map(|((), valid)| valid);
        self.conn.end(r)
    }

    /// `QueryPathInfo`: `None` when the path is not valid.
    pub async fn query_path_info(
        &mut self,
        path: &StorePath,
        logs: LogFn<'_>,
    ) -> Result<Option<PathInfo>, SessionError> {
        let t = Patience::Transfer;
        let p = path.clone();
        let r = self
            .simple(
                Request::QueryPathInfo { path: path.clone() },
                "worker QueryPathInfo",
                t,
                logs,
                move |r, dir, neg| worker::read_query_path_info(r, dir, neg, &p),
            )
            .await;
        match r {
            // Before 1.17 an invalid path is reported as an error.
            Err(SessionError::Remote(e))
                if !self.neg.version.at_least(1, 17)
                    && e.plain_message().contains("is not valid") =>
            {
                Ok(None)
            }
            other => other,
        }
    }

    /// Several `QueryPathInfo`s pipelined: up to 64 requests are in flight, so N paths cost
    /// about N / 32 round trips instead of N, while our writes stay small enough never to
    /// block on a daemon that waits for us to read its replies.
    pub async fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
        logs: LogFn<'_>,
    ) -> Result<Vec<PathInfo>, SessionError> {
        let v = self.neg.version;
        let replies = self
            .pipelined(
                "worker QueryPathInfo",
                Op::QueryPathInfo,
                paths,
                |p| Request::QueryPathInfo { path: p.clone() },
                worker::read_query_path_info,
                // Below 1.17 an invalid path is an error, not an empty reply.
                |e| !v.at_least(1, 17) && e.plain_message().contains("is not valid"),
                logs,
            )
            .await?;
        Ok(replies.into_iter().flatten().flatten().collect())
    }

    /// One request per path, all pipelined: the requests are written while the replies are
    /// read, so the batch costs one round trip whatever its size (a daemon whose replies
    /// fill the pipe back to us stops reading until we read, which we do concurrently).
    /// Returns each path's reply, `None` where the daemon answered with an error `ignore`
    /// accepts. Another error answers its own request only: the others' replies are still
    /// read, so that the session stays in step, and the first such error is returned at the
    /// end.
    #[allow(clippy::too_many_arguments)]
    async fn pipelined<T>(
        &mut self,
        during: &'static str,
        op: Op,
        paths: &BTreeSet<StorePath>,
        request: impl Fn(&StorePath) -> Request,
        decode: impl Fn(
            &mut nixmux_proto::wire::WireReader<'_>,
            &StoreDir,
            &Negotiated,
            &StorePath,
        ) -> nixmux_proto::wire::ReadResult<T>,
        ignore: impl Fn(&RemoteError) -> bool,
        logs: LogFn<'_>,
    ) -> Result<Vec<Option<T>>, SessionError> {
        self.check(op)?;
        self.begin().await?;
        let mut requests = BytesMut::new();
        for p in paths {
            request(p).write(&mut requests, &self.dir, &self.neg);
        }
        let (dir, neg) = (self.dir.clone(), self.neg.clone());
        let v = neg.version;
        let t = Patience::Transfer;
        self.conn.concurrent_turn();
        let (mut rh, mut wh) = self.conn.halves();
        let writer = wh.send(&requests, during);
        let reader = async {
            let mut out = Vec::with_capacity(paths.len());
            let mut first_error = None;
            for p in paths {
                match stderr_loop(&mut rh, v, during, t, logs).await {
                    Ok(()) => {
                        let reply = rh.read(during, t, |r| decode(r, &dir, &neg, p)).await?;
                        out.push(Some(reply));
                    }
                    Err(SessionError::Remote(e)) if ignore(&e) => out.push(None),
                    Err(SessionError::Remote(e)) => {
                        first_error.get_or_insert(e);
                        out.push(None);
                    }
                    Err(other) => return Err(other),
                }
            }
            match first_error {
                Some(e) => Err(SessionError::Remote(e)),
                None => Ok(out),
            }
        };
        // The first failure ends both sides (a reader stuck behind a failed write, or a
        // writer blocked on a daemon whose replies nobody reads any more); either poisons
        // the session, except an answered error, which comes after every write is done.
        let r = tokio::try_join!(writer, reader).map(|((), out)| out);
        self.conn.end(r)
    }

    /// `QueryPathFromHashPart`.
    pub async fn query_path_from_hash_part(
        &mut self,
        hash_part: &str,
        logs: LogFn<'_>,
    ) -> Result<Option<StorePath>, SessionError> {
        let t = Patience::Transfer;
        self.simple(
            Request::QueryPathFromHashPart {
                hash_part: hash_part.to_owned(),
            },
            "worker QueryPathFromHashPart",
            t,
            logs,
            |r, dir, _| worker::read_opt_path(r, dir),
        )
        .await
    }

    /// `AddTempRoot`: protects `path` from garbage collection while the session lives.
    pub async fn add_temp_root(
        &mut self,
        path: &StorePath,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        let t = Patience::Transfer;
        self.simple(
            Request::AddTempRoot { path: path.clone() },
            "worker AddTempRoot",
            t,
            logs,
            |r, _, _| worker::read_ack(r, "AddTempRoot"),
        )
        .await
    }

    /// `AddTempRoot` for each of `paths`, pipelined like [`WorkerSession::query_path_infos`]:
    /// protects them from the builder's garbage collector for as long as this session lives
    /// (Nix keeps a process's temporary roots until it exits: src/libstore/gc.cc).
    pub async fn add_temp_roots(
        &mut self,
        paths: &BTreeSet<StorePath>,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        self.pipelined(
            "worker AddTempRoot",
            Op::AddTempRoot,
            paths,
            |p| Request::AddTempRoot { path: p.clone() },
            |r, _, _, _| worker::read_ack(r, "AddTempRoot"),
            |_| false,
            logs,
        )
        .await
        .map(drop)
    }

    /// `EnsurePath`: makes `path` valid, substituting it if needed.
    pub async fn ensure_path(
        &mut self,
        path: &StorePath,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        let t = Patience::Build;
        self.simple(
            Request::EnsurePath { path: path.clone() },
            "worker EnsurePath",
            t,
            logs,
            |r, _, _| worker::read_ack(r, "EnsurePath"),
        )
        .await
    }

    /// `AddSignatures` (trusted clients only on Nix 2.8).
    pub async fn add_signatures(
        &mut self,
        path: &StorePath,
        sigs: &BTreeSet<String>,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        let t = Patience::Transfer;
        self.simple(
            Request::AddSignatures {
                path: path.clone(),
                sigs: sigs.clone(),
            },
            "worker AddSignatures",
            t,
            logs,
            |r, _, _| worker::read_ack(r, "AddSignatures"),
        )
        .await
    }

    /// `QueryMissing`.
    pub async fn query_missing(
        &mut self,
        targets: &[DerivedPath],
        logs: LogFn<'_>,
    ) -> Result<Missing, SessionError> {
        let t = Patience::Transfer;
        self.simple(
            Request::QueryMissing {
                targets: targets.to_vec(),
            },
            "worker QueryMissing",
            t,
            logs,
            |r, dir, _| worker::read_missing(r, dir),
        )
        .await
    }

    /// `BuildDerivation`: builds `drv` (inputs resolved, valid remotely). Log frames go to
    /// `logs` while it runs.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        mode: BuildMode,
        logs: LogFn<'_>,
    ) -> Result<BuildResult, SessionError> {
        let t = Patience::Build;
        self.simple(
            Request::BuildDerivation {
                drv_path: drv_path.clone(),
                drv: drv.clone(),
                mode,
            },
            "worker BuildDerivation",
            t,
            logs,
            worker::read_build_result,
        )
        .await
    }

    /// `BuildPaths`: failures arrive as [`SessionError::Remote`].
    pub async fn build_paths(
        &mut self,
        targets: &[DerivedPath],
        mode: BuildMode,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        let t = Patience::Build;
        self.simple(
            Request::BuildPaths {
                targets: targets.to_vec(),
                mode,
            },
            "worker BuildPaths",
            t,
            logs,
            |r, _, _| worker::read_ack(r, "BuildPaths"),
        )
        .await
    }

    /// `BuildPathsWithResults` (1.34+): one result per target.
    pub async fn build_paths_with_results(
        &mut self,
        targets: &[DerivedPath],
        mode: BuildMode,
        logs: LogFn<'_>,
    ) -> Result<Vec<(DerivedPath, BuildResult)>, SessionError> {
        let t = Patience::Build;
        self.simple(
            Request::BuildPathsWithResults {
                targets: targets.to_vec(),
                mode,
            },
            "worker BuildPathsWithResults",
            t,
            logs,
            worker::read_keyed_build_results,
        )
        .await
    }

    /// `QueryDerivationOutputMap`: the paths the store knows for the outputs of `drv`
    /// (see [`Request::QueryDerivationOutputMap`]). Safe on any Nix, unlike `QueryRealisation`,
    /// which Nix 2.8 without `ca-derivations` answers by aborting (its realisation statements
    /// are not prepared, src/libstore/local-store.cc).
    pub async fn query_derivation_output_map(
        &mut self,
        drv: &StorePath,
        logs: LogFn<'_>,
    ) -> Result<BTreeMap<String, Option<StorePath>>, SessionError> {
        let t = Patience::Transfer;
        self.simple(
            Request::QueryDerivationOutputMap { path: drv.clone() },
            "worker QueryDerivationOutputMap",
            t,
            logs,
            |r, dir, _| worker::read_derivation_output_map(r, dir),
        )
        .await
    }

    /// `QueryRealisation`. Lix 2.94+ refuses it with an error ("ca derivations are not
    /// supported"), which arrives as [`SessionError::Remote`].
    pub async fn query_realisation(
        &mut self,
        id: &DrvOutputId,
        logs: LogFn<'_>,
    ) -> Result<Option<Realisation>, SessionError> {
        let t = Patience::Transfer;
        let id2 = id.clone();
        self.simple(
            Request::QueryRealisation(id.clone()),
            "worker QueryRealisation",
            t,
            logs,
            move |r, dir, neg| worker::read_realisation(r, dir, neg, &id2),
        )
        .await
    }

    /// `RegisterDrvOutput`.
    pub async fn register_drv_output(
        &mut self,
        realisation: &Realisation,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        let t = Patience::Transfer;
        self.simple(
            Request::RegisterDrvOutput(realisation.clone()),
            "worker RegisterDrvOutput",
            t,
            logs,
            |_, _, _| Ok(()),
        )
        .await
    }

    /// `NarFromPath`: streams the NAR of `path` into `sink`.
    pub async fn nar_from_path(
        &mut self,
        path: &StorePath,
        sink: &mut (dyn AsyncWrite + Unpin + Send),
        logs: LogFn<'_>,
    ) -> Result<NarSummary, SessionError> {
        const DURING: &str = "worker NarFromPath";
        self.begin().await?;
        let r = async {
            Request::NarFromPath { path: path.clone() }.write(
                &mut self.conn.wbuf,
                &self.dir,
                &self.neg,
            );
            self.conn.flush(DURING).await?;
            let v = self.neg.version;
            let t = Patience::Transfer;
            {
                let (mut rh, _) = self.conn.halves();
                stderr_loop(&mut rh, v, DURING, t, logs).await?;
            }
            self.conn.read_nar(sink, DURING, NarHashing::Hash).await
        }
        .await;
        self.conn.end(r)
    }

    /// `NarFromPath` for each of `paths`, pipelined (see `NAR_WINDOW`): the NAR of
    /// `paths[i]` is streamed into `sinks[i]`, which is then shut down, and `after(i, sum)`
    /// checks it before the next is read (hashed as `hashing` says).
    pub async fn nars_from_paths<W, E>(
        &mut self,
        paths: &[StorePath],
        sinks: &mut [W],
        hashing: NarHashing,
        after: impl FnMut(usize, NarSummary) -> Result<(), E> + Send,
    ) -> Result<(), NarsError<E>>
    where
        W: AsyncWrite + Unpin + Send,
    {
        self.settle_lead().await.map_err(NarsError::Session)?;
        let (dir, neg) = (self.dir.clone(), self.neg.clone());
        let request = |p: &StorePath, out: &mut BytesMut| {
            Request::NarFromPath { path: p.clone() }.write(out, &dir, &neg);
        };
        nar_batch(
            &mut self.conn,
            "worker NarFromPath",
            Some(self.neg.version),
            paths,
            sinks,
            hashing,
            request,
            after,
        )
        .await
    }

    /// `AddToStoreNar` for one path. From 1.23 the NAR is framed and the daemon's messages are
    /// read while it is sent (it may fail early, e.g. on a missing signature, and then we stop
    /// sending data but still end the framed stream so the session stays in sync). At
    /// 1.21–1.22 the daemon pulls the NAR with `STDERR_READ`.
    pub async fn add_to_store_nar(
        &mut self,
        upload: &mut Upload<'_>,
        repair: bool,
        dont_check_sigs: bool,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        const DURING: &str = "worker AddToStoreNar";
        self.check(Op::AddToStoreNar)?;
        self.begin().await?;
        let req = Request::AddToStoreNar {
            info: upload.info.clone(),
            repair,
            dont_check_sigs,
        };
        req.write(&mut self.conn.wbuf, &self.dir, &self.neg);
        let r = if self.neg.version.at_least(1, 23) {
            let header = self.conn.wbuf.split();
            self.framed_upload(header, DURING, logs, Payload::Single(upload))
                .await
        } else {
            self.pull_upload(upload, DURING, logs).await
        };
        self.conn.end(r)
    }

    /// Adds each of `uploads` (dependencies first), pipelined: from 1.23 the requests and
    /// their framed NARs are written while the daemon's answers are read, so the batch costs
    /// one round trip (before 1.23 the daemon pulls each NAR: one at a time).
    ///
    /// Each path goes as a framed `AddToStoreNar`, except, from 1.25, a plain source path
    /// ([`PathInfo::is_plain_source`]), which goes by content (`AddToStore`): the daemon then
    /// computes its path from the NAR, which it hashes once instead of twice, and answers
    /// with the path's record, which must be the one uploaded (else the NAR was not what its
    /// record says, and the path fails with [`SessionError::UploadMismatch`]).
    ///
    /// Safer than [`WorkerSession::add_multiple_to_store`] when a path may already be valid
    /// (another client added it meanwhile): Nix 2.8's `LocalStore::addToStore` skips a valid
    /// path without reading its NAR (src/libstore/local-store.cc), which inside
    /// `AddMultipleToStore`'s single stream makes the daemon read that NAR as the next
    /// entry's metadata; a framed request is drained by the daemon's `FramedSource` whatever
    /// the store read (src/libstore/daemon.cc). A path the daemon refuses fails with its error
    /// after every answer was read: the session stays in step.
    pub async fn add_paths(
        &mut self,
        uploads: &mut [Upload<'_>],
        repair: bool,
        dont_check_sigs: bool,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        const DURING: &str = "worker AddToStoreNar";
        const BY_CONTENT: &str = "worker AddToStore";
        if !self.neg.version.at_least(1, 23) {
            for up in uploads.iter_mut() {
                self.add_to_store_nar(up, repair, dont_check_sigs, logs)
                    .await?;
            }
            return Ok(());
        }
        self.check(Op::AddToStoreNar)?;
        self.begin().await?;
        let (dir, neg) = (self.dir.clone(), self.neg.clone());
        let v = neg.version;
        // What each answer must say: `Some` for a path sent by content, whose record comes
        // back; `None` for an `AddToStoreNar`, which has no answer.
        let by_content: Vec<Option<PathInfo>> = uploads
            .iter()
            .map(|up| (v.at_least(1, 25) && up.info.is_plain_source(&dir)).then(|| up.info.clone()))
            .collect();
        // The daemon drains each framed NAR even when it refuses the path, so the writer
        // never has to stop early.
        let never = AtomicBool::new(false);
        self.conn.concurrent_turn();
        let (mut rh, wh) = self.conn.halves();
        let mut sink = FrameSink::new(wh, &never, DURING);
        let writer = async {
            let mut header = BytesMut::new();
            for (up, content) in uploads.iter_mut().zip(&by_content) {
                header.clear();
                let request = match content {
                    Some(info) => Request::AddToStore {
                        name: info.path.name().to_owned(),
                        method: SOURCE_METHOD.to_owned(),
                        references: BTreeSet::new(),
                        repair,
                    },
                    None => Request::AddToStoreNar {
                        info: up.info.clone(),
                        repair,
                        dont_check_sigs,
                    },
                };
                request.write(&mut header, &dir, &neg);
                sink.wh.send(&header, DURING).await?;
                copy_sized(&mut *up.nar, up.info.nar_size, &mut sink).await?;
                sink.finish().await?;
            }
            Ok(())
        };
        let reader = async {
            let mut failed = None;
            for content in &by_content {
                let during = if content.is_some() {
                    BY_CONTENT
                } else {
                    DURING
                };
                match stderr_loop(&mut rh, v, during, Patience::Transfer, logs).await {
                    Ok(()) => {}
                    Err(SessionError::Remote(e)) => {
                        failed.get_or_insert(SessionError::Remote(e));
                        continue;
                    }
                    Err(other) => return Err(other),
                }
                let Some(want) = content else { continue };
                let got = rh
                    .read(BY_CONTENT, Patience::Transfer, |r| {
                        PathInfo::read_worker_keyed(r, &dir, v)
                    })
                    .await?;
                if let Some(detail) = source_mismatch(want, &got, &dir) {
                    failed.get_or_insert(SessionError::UploadMismatch {
                        path: want.path.to_absolute(&dir),
                        detail,
                    });
                }
            }
            failed.map_or(Ok(()), Err)
        };
        let r = tokio::try_join!(writer, reader).map(drop);
        self.conn.end(r)
    }

    /// `AddMultipleToStore` (1.32+): many paths in one framed stream, dependencies first.
    /// Only for paths that cannot become valid meanwhile: see
    /// [`WorkerSession::add_to_store_nars`].
    pub async fn add_multiple_to_store(
        &mut self,
        uploads: &mut [Upload<'_>],
        repair: bool,
        dont_check_sigs: bool,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        const DURING: &str = "worker AddMultipleToStore";
        self.check(Op::AddMultipleToStore)?;
        self.begin().await?;
        Request::AddMultipleToStore {
            repair,
            dont_check_sigs,
        }
        .write(&mut self.conn.wbuf, &self.dir, &self.neg);
        let header = self.conn.wbuf.split();
        let r = self
            .framed_upload(header, DURING, logs, Payload::Multiple(uploads))
            .await;
        self.conn.end(r)
    }

    /// `AddBuildLog` (1.32+, trusted clients only): stores `log` as the whole build log of
    /// `drv_path` in the daemon's store, where `nix log` finds it. A failure poisons the
    /// session whatever it was: the daemon refuses an untrusted client before it reads the
    /// frames we already sent (src/libstore/daemon.cc), so the stream is out of step.
    pub async fn add_build_log(
        &mut self,
        drv_path: &StorePath,
        log: &[u8],
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        const DURING: &str = "worker AddBuildLog";
        self.check(Op::AddBuildLog)?;
        self.begin().await?;
        Request::AddBuildLog {
            drv_path: drv_path.clone(),
        }
        .write(&mut self.conn.wbuf, &self.dir, &self.neg);
        let header = self.conn.wbuf.split();
        let r = async {
            self.framed_upload(header, DURING, logs, Payload::Bytes(log))
                .await?;
            self.conn
                .read_with(DURING, Patience::Transfer, |r| {
                    worker::read_ack(r, "AddBuildLog")
                })
                .await
        }
        .await;
        if r.is_err() {
            self.conn.poison();
        }
        self.conn.end(r)
    }

    /// Sends `header`, then `payload` as a framed stream, while concurrently running the
    /// stderr loop.
    async fn framed_upload(
        &mut self,
        header: BytesMut,
        during: &'static str,
        logs: LogFn<'_>,
        payload: Payload<'_, '_>,
    ) -> Result<(), SessionError> {
        let stop = AtomicBool::new(false);
        let t = Patience::Transfer;
        let v = self.neg.version;
        let dir = self.dir.clone();
        self.conn.concurrent_turn();
        let (mut rh, wh) = self.conn.halves();
        let mut sink = FrameSink::new(wh, &stop, during);
        let writer = async {
            sink.wh.send(&header, during).await?;
            let produced = match payload {
                Payload::Single(up) => copy_sized(&mut *up.nar, up.info.nar_size, &mut sink).await,
                Payload::Multiple(uploads) => write_multiple(uploads, &dir, &mut sink).await,
                Payload::Bytes(bytes) => sink.push(bytes).await,
            };
            let stopped = matches!(produced, Err(SessionError::RemoteStopped));
            // Whatever happened, end the framed stream: the daemon drains frames up to the
            // terminator, which keeps the session in sync after an early error.
            let end = sink.finish().await;
            match produced {
                Err(e) if !stopped => Err(e),
                _ => end,
            }
        };
        let reader = async {
            let r = stderr_loop(&mut rh, v, during, t, logs).await;
            stop.store(true, Ordering::Release);
            r
        };
        let (w, r) = tokio::join!(writer, reader);
        // The daemon's verdict wins (it explains an early stop); then a local failure.
        r?;
        w
    }

    /// Upload at 1.21–1.22: the daemon asks for data with `STDERR_READ`.
    async fn pull_upload(
        &mut self,
        upload: &mut Upload<'_>,
        during: &'static str,
        logs: LogFn<'_>,
    ) -> Result<(), SessionError> {
        self.conn.flush(during).await?;
        let v = self.neg.version;
        let mut left = upload.info.nar_size;
        let mut buf = vec![0u8; WRITE_CHUNK];
        loop {
            let msg = self.conn.read(during, |r| StderrMsg::read(r, v)).await?;
            match msg {
                StderrMsg::Last => return Ok(()),
                StderrMsg::Error(e) => return Err(SessionError::Remote(e)),
                StderrMsg::Read(max) => {
                    let want = usize::try_from(max.min(left).min(WRITE_CHUNK as u64))
                        .unwrap_or(WRITE_CHUNK);
                    let n = if want == 0 {
                        0
                    } else {
                        let _ours = self.conn.activity.pause();
                        upload
                            .nar
                            .read(&mut buf[..want])
                            .await
                            .map_err(SessionError::Source)?
                    };
                    left -= n as u64;
                    self.conn.wbuf.put_bytes_padded(&buf[..n]);
                    self.conn.flush(during).await?;
                }
                StderrMsg::Write(_) => {
                    return Err(SessionError::Protocol {
                        during,
                        source: Misbehaved::Unexpected("STDERR_WRITE during an upload".into())
                            .into(),
                    });
                }
                other => {
                    if let Some(ev) = LogEvent::from_worker(&other) {
                        logs(ev);
                    }
                }
            }
        }
    }
}

/// A batch of NAR downloads, pipelined (at most [`NAR_WINDOW`] requests in flight, topped
/// up when half are answered): `request` writes the request for a path, and before each NAR
/// the worker protocol's stderr messages are read when `stderr` gives its version. The NAR of
/// `paths[i]` is streamed into `sinks[i]`, which is then shut down, and `after(i, sum)` checks
/// it before the next is read; a refusal poisons the session (replies are still in flight).
/// Shared by serve `DumpStorePath` and worker `NarFromPath`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn nar_batch<W, E>(
    conn: &mut Conn,
    during: &'static str,
    stderr: Option<ProtocolVersion>,
    paths: &[StorePath],
    sinks: &mut [W],
    hashing: NarHashing,
    request: impl Fn(&StorePath, &mut BytesMut),
    mut after: impl FnMut(usize, NarSummary) -> Result<(), E> + Send,
) -> Result<(), NarsError<E>>
where
    W: AsyncWrite + Unpin + Send,
{
    conn.begin().map_err(NarsError::Session)?;
    let mut refused = None;
    let r = async {
        let mut sent = 0;
        for (i, sink) in sinks.iter_mut().enumerate().take(paths.len()) {
            if sent < paths.len() && sent - i <= NAR_WINDOW / 2 {
                let upto = paths.len().min(i + NAR_WINDOW);
                for p in &paths[sent..upto] {
                    request(p, &mut conn.wbuf);
                }
                sent = upto;
                conn.flush(during).await?;
            }
            if let Some(v) = stderr {
                let (mut rh, _) = conn.halves();
                stderr_loop(&mut rh, v, during, Patience::Transfer, &mut |_| {}).await?;
            }
            let summary = conn.read_nar(sink, during, hashing).await?;
            tokio::io::AsyncWriteExt::shutdown(sink)
                .await
                .map_err(SessionError::Sink)?;
            if let Err(e) = after(i, summary) {
                refused = Some(e);
                return Ok(());
            }
        }
        Ok(())
    }
    .await;
    if refused.is_some() {
        conn.poison();
    }
    conn.end(r).map_err(NarsError::Session)?;
    refused.map_or(Ok(()), |e| Err(NarsError::Caller(e)))
}

/// What a framed upload carries.
enum Payload<'a, 'b> {
    /// One NAR (`AddToStoreNar`).
    Single(&'a mut Upload<'b>),
    /// Several paths with their metadata (`AddMultipleToStore`).
    Multiple(&'a mut [Upload<'b>]),
    /// Bytes in memory (`AddBuildLog`).
    Bytes(&'a [u8]),
}

/// The inner stream of `AddMultipleToStore`: a count, then per path its metadata and NAR.
async fn write_multiple(
    uploads: &mut [Upload<'_>],
    dir: &StoreDir,
    out: &mut FrameSink<'_, '_>,
) -> Result<(), SessionError> {
    let mut meta = BytesMut::new();
    worker::write_multiple_count(&mut meta, uploads.len() as u64);
    out.push(&meta).await?;
    for up in uploads.iter_mut() {
        meta.clear();
        worker::write_multiple_entry(&mut meta, dir, &up.info);
        out.push(&meta).await?;
        copy_sized(&mut *up.nar, up.info.nar_size, out).await?;
    }
    Ok(())
}

/// The content-address method of a plain source path on `AddToStore`: a NAR, hashed with
/// SHA-256 (`renderContentAddressMethod`, src/libstore/content-address.cc).
const SOURCE_METHOD: &str = "fixed:r:sha256";

/// How the record the daemon made of a path added by content differs from the record
/// uploaded, if it does.
fn source_mismatch(want: &PathInfo, got: &PathInfo, dir: &StoreDir) -> Option<String> {
    if got.path != want.path {
        Some(format!(
            "it hashes to {} (NAR hash {}), not to its recorded hash {}",
            got.path.to_absolute(dir),
            got.nar_hash.to_nix32_prefixed(),
            want.nar_hash.to_nix32_prefixed()
        ))
    } else if (got.nar_hash, got.nar_size) != (want.nar_hash, want.nar_size) {
        Some(format!(
            "it was recorded with NAR hash {} and size {}, not {} and {}",
            got.nar_hash.to_nix32_prefixed(),
            got.nar_size,
            want.nar_hash.to_nix32_prefixed(),
            want.nar_size
        ))
    } else {
        None
    }
}

/// Copies exactly `size` bytes from `src` into the frame sink.
async fn copy_sized(
    src: &mut (dyn AsyncRead + Unpin + Send),
    size: u64,
    out: &mut FrameSink<'_, '_>,
) -> Result<(), SessionError> {
    let mut left = size;
    while left > 0 {
        left -= out.fill_from(src, left).await?;
    }
    Ok(())
}

/// Collects payload bytes into frames of up to [`WRITE_CHUNK`] and sends them.
///
/// A frame is built where it is sent from: `buf` starts with room for the frame's length,
/// written when the frame is complete, and an upload's source is read straight into it
/// (a NAR's bytes are copied once on their way from the source to the channel).
pub(crate) struct FrameSink<'f, 's> {
    wh: crate::conn::WriteHalf<'s>,
    /// The length word's room, then the payload so far.
    buf: BytesMut,
    stop: &'f AtomicBool,
    during: &'static str,
}

/// Size of a frame's length word.
const FRAME_HEADER: usize = 8;

impl<'f, 's> FrameSink<'f, 's> {
    fn new(wh: crate::conn::WriteHalf<'s>, stop: &'f AtomicBool, during: &'static str) -> Self {
        let mut buf = BytesMut::with_capacity(FRAME_HEADER + WRITE_CHUNK + FRAME_HEADER);
        buf.extend_from_slice(&[0; FRAME_HEADER]);
        FrameSink {
            wh,
            buf,
            stop,
            during,
        }
    }

    fn payload(&self) -> usize {
        self.buf.len() - FRAME_HEADER
    }

    fn check_stop(&self) -> Result<(), SessionError> {
        if self.stop.load(Ordering::Acquire) {
            return Err(SessionError::RemoteStopped);
        }
        Ok(())
    }

    /// Adds payload bytes. Fails with [`SessionError::RemoteStopped`] once the daemon has
    /// ended the operation (it will not read more data).
    pub(crate) async fn push(&mut self, mut data: &[u8]) -> Result<(), SessionError> {
        while !data.is_empty() {
            self.check_stop()?;
            let n = (WRITE_CHUNK - self.payload()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.payload() == WRITE_CHUNK {
                self.emit().await?;
            }
        }
        Ok(())
    }

    /// Reads the next piece of an upload with `left` bytes still announced from `src`
    /// straight into the frame; returns its size.
    async fn fill_from(
        &mut self,
        src: &mut (dyn AsyncRead + Unpin + Send),
        left: u64,
    ) -> Result<u64, SessionError> {
        self.check_stop()?;
        let room = (WRITE_CHUNK - self.payload()) as u64;
        let n = read_upload_piece(src, &mut self.buf, room, left, self.wh.activity()).await?;
        if self.payload() == WRITE_CHUNK {
            self.emit().await?;
        }
        Ok(n as u64)
    }

    async fn emit(&mut self) -> Result<(), SessionError> {
        let len = self.payload();
        if len == 0 {
            return Ok(());
        }
        self.buf[..FRAME_HEADER].copy_from_slice(&(len as u64).to_le_bytes());
        let sent = self.wh.send(&self.buf, self.during).await;
        self.buf.truncate(FRAME_HEADER);
        sent
    }

    async fn finish(&mut self) -> Result<(), SessionError> {
        if !self.stop.load(Ordering::Acquire) {
            self.emit().await?;
        }
        self.buf.truncate(FRAME_HEADER);
        let mut end = BytesMut::new();
        worker::write_frame_end(&mut end);
        self.wh.send(&end, self.during).await
    }
}
