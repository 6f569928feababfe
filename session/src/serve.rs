//! A serve-protocol session (`nix-store --serve --write`).
//!
//! Any failure here is fatal to the session: the serve protocol has no error frame, a server
//! that fails prints to stderr and exits. [`crate::SessionConfig::diagnostics`] supplies that
//! stderr text for the error.

use std::collections::BTreeSet;

use bytes::BytesMut;
use nixmux_proto::build_result::BuildResult;
use nixmux_proto::derivation::BasicDerivation;
use nixmux_proto::derived_path::DerivedPath;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve::{self, BuildOptions, ExportItem, ExportTrailer, Request};
use nixmux_proto::store_path::{StoreDir, StorePath};
use nixmux_proto::wire::{ReadResult, WireReader};
use nixmux_proto::{ProtoError, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::activity::Patience;
use crate::conn::{
    BoxReader, BoxWriter, Conn, NarHashing, NarSummary, SessionConfig, WRITE_CHUNK,
    read_upload_piece,
};
use crate::error::SessionError;
use crate::lead::{Lead, Opening};

/// One NAR to upload: its metadata and a reader of exactly `info.nar_size` bytes.
pub struct Upload<'a> {
    /// Metadata (path, hash, size, references...).
    pub info: PathInfo,
    /// The NAR bytes.
    pub nar: &'a mut (dyn AsyncRead + Unpin + Send),
}

/// How a batch of pipelined NAR downloads ([`ServeSession::dump_store_paths`],
/// `WorkerSession::nars_from_paths`) failed.
#[derive(Debug)]
pub enum NarsError<E> {
    /// The session failed.
    Session(SessionError),
    /// The caller's check of one NAR refused it; the session is poisoned (replies to the
    /// requests still in flight were not read).
    Caller(E),
}

/// Most NAR requests in flight in a batch: a few tens of KiB of requests, so that writing
/// them never blocks on a peer that is busy sending us a NAR we have not read yet. Topped
/// up when half are answered, so the pipe stays full: one stall per batch, whatever its size.
pub(crate) const NAR_WINDOW: usize = 256;

/// An established serve session.
pub struct ServeSession {
    conn: Conn,
    version: ProtocolVersion,
    dir: StoreDir,
    /// Sent with the opening, answer not read yet ([`Lead`]).
    lead: Option<Lead>,
}

impl std::fmt::Debug for ServeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeSession")
            .field("version", &self.version)
            .field("usable", &self.conn.is_usable())
            .finish_non_exhaustive()
    }
}

impl ServeSession {
    /// Performs the handshake over a fresh pipe to `nix-store --serve --write`.
    pub async fn handshake(
        reader: BoxReader,
        writer: BoxWriter,
        dir: StoreDir,
        config: SessionConfig,
    ) -> Result<Self, SessionError> {
        Self::handshake_from(reader, writer, dir, config, None).await
    }

    /// What the handshake sends before it reads anything (the hello, and `lead` behind
    /// it: see [`Lead`]), for a caller that sends it ahead with the SSH exec request that
    /// starts `nix-store --serve`, then calls [`ServeSession::handshake_after`].
    pub fn opening(dir: &StoreDir, lead: Option<&Lead>) -> Opening {
        let mut buf = bytes::BytesMut::new();
        serve::write_client_hello(&mut buf, serve::OUR_VERSION);
        // Encoded the same at every version we accept (`Lead`), so the one we announce does,
        // before the server's is known.
        let lead = lead.and_then(|l| {
            let bytes = l.serve_bytes(dir, serve::OUR_VERSION)?;
            buf.extend_from_slice(&bytes);
            Some(l.clone())
        });
        Opening::new(buf.freeze(), lead)
    }

    /// The handshake on a pipe to which `opening` ([`ServeSession::opening`]) was already
    /// written.
    pub async fn handshake_after(
        opening: Opening,
        reader: BoxReader,
        writer: BoxWriter,
        dir: StoreDir,
        config: SessionConfig,
    ) -> Result<Self, SessionError> {
        Self::handshake_from(reader, writer, dir, config, Some(opening)).await
    }

    async fn handshake_from(
        reader: BoxReader,
        writer: BoxWriter,
        dir: StoreDir,
        config: SessionConfig,
        sent: Option<Opening>,
    ) -> Result<Self, SessionError> {
        let mut conn = Conn::new(reader, writer, config);
        let lead = match sent {
            Some(opening) => {
                conn.bytes_out += opening.bytes.len() as u64;
                opening.lead
            }
            None => {
                serve::write_client_hello(&mut conn.wbuf, serve::OUR_VERSION);
                conn.flush("serve handshake").await?;
                None
            }
        };
        let version = conn
            .read("serve handshake", |r| {
                serve::read_server_hello(r, serve::OUR_VERSION)
            })
            .await?;
        Ok(ServeSession {
            conn,
            version,
            dir,
            lead,
        })
    }

    /// The negotiated version.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The store directory paths are printed with.
    pub fn store_dir(&self) -> &StoreDir {
        &self.dir
    }

    /// Whether another operation may be started (no earlier failure, nothing cancelled
    /// half-way).
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

    /// Ends the session cleanly: the server exits when it reads EOF where a command would be.
    pub async fn close(mut self) {
        self.conn.shutdown().await;
    }

    async fn send(&mut self, req: &Request, during: &'static str) -> Result<(), SessionError> {
        req.check_supported(self.version).map_err(|e| match e {
            ProtoError::Incompatible(i) => SessionError::Unsupported(i),
            other => SessionError::Protocol {
                during,
                source: other,
            },
        })?;
        req.write(&mut self.conn.wbuf, &self.dir, self.version);
        self.conn.flush(during).await
    }

    /// Reads and drops the answer to the [`Lead`] if no operation took it: the next
    /// operation's answer comes after it.
    async fn settle_lead(&mut self) -> Result<(), SessionError> {
        const DURING: &str = "serve handshake's lead request";
        let Some(lead) = self.lead.take() else {
            return Ok(());
        };
        self.conn.begin()?;
        let dir = self.dir.clone();
        let r = match lead {
            Lead::QueryValidPaths { .. } => self
                .conn
                .read(DURING, |r| serve::read_path_set(r, &dir))
                .await
                .map(drop),
        };
        self.conn.end(r)
    }

    /// Starts an operation: the lead's answer first.
    async fn begin(&mut self) -> Result<(), SessionError> {
        self.settle_lead().await?;
        self.conn.begin()
    }

    /// One request, one reply decoded by `decode` (the peer silent at most the idle limit of
    /// `patience`): the shape of most serve commands.
    async fn call<T>(
        &mut self,
        req: Request,
        during: &'static str,
        patience: Patience,
        decode: impl Fn(&mut WireReader<'_>, &StoreDir, ProtocolVersion) -> ReadResult<T>,
    ) -> Result<T, SessionError> {
        // Asked already with the hello: its answer is the next thing to read.
        let led = self.lead.take_if(|l| l.serve_request() == req).is_some();
        if !led {
            self.settle_lead().await?;
        }
        self.conn.begin()?;
        let r = async {
            if !led {
                self.send(&req, during).await?;
            }
            let dir = self.dir.clone();
            let v = self.version;
            self.conn
                .read_with(during, patience, |r| decode(r, &dir, v))
                .await
        }
        .await;
        self.conn.end(r)
    }

    /// `QueryValidPaths`: which of `paths` are valid on the remote. With `substitute`, the
    /// remote first tries its substituters (`builders-use-substitutes`); `lock` adds temporary
    /// GC roots for the life of the session.
    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        lock: bool,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, SessionError> {
        let req = Request::QueryValidPaths {
            lock,
            substitute,
            paths: paths.clone(),
        };
        let t = Patience::Transfer;
        self.call(req, "serve QueryValidPaths", t, |r, dir, _| {
            serve::read_path_set(r, dir)
        })
        .await
    }

    /// `QueryPathInfos`: metadata of the valid ones among `paths` (invalid ones are omitted).
    pub async fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<PathInfo>, SessionError> {
        self.begin().await?;
        let r = async {
            const DURING: &str = "serve QueryPathInfos";
            self.send(
                &Request::QueryPathInfos {
                    paths: paths.clone(),
                },
                DURING,
            )
            .await?;
            // Record by record: decoding the whole reply at once would start again from its
            // first byte every time more of it arrives, quadratic in its size.
            let dir = self.dir.clone();
            let mut out = Vec::new();
            while let Some(info) = self
                .conn
                .read(DURING, |r| serve::read_path_info_record(r, &dir))
                .await?
            {
                if out.len() >= paths.len() {
                    return Err(SessionError::Protocol {
                        during: DURING,
                        source: nixmux_proto::Misbehaved::Inconsistent(
                            "more path infos than paths asked for".into(),
                        )
                        .into(),
                    });
                }
                out.push(info);
            }
            Ok(out)
        }
        .await;
        self.conn.end(r)
    }

    /// `QueryClosure`: the closure of `paths`.
    pub async fn query_closure(
        &mut self,
        paths: &BTreeSet<StorePath>,
        include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, SessionError> {
        let req = Request::QueryClosure {
            include_outputs,
            paths: paths.clone(),
        };
        let t = Patience::Transfer;
        self.call(req, "serve QueryClosure", t, |r, dir, _| {
            serve::read_path_set(r, dir)
        })
        .await
    }

    /// `DumpStorePath`: streams the NAR of `path` into `sink`. An invalid path kills the
    /// server (its stderr says why).
    pub async fn dump_store_path(
        &mut self,
        path: &StorePath,
        sink: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<NarSummary, SessionError> {
        self.begin().await?;
        let r = async {
            const DURING: &str = "serve DumpStorePath";
            self.send(&Request::DumpStorePath { path: path.clone() }, DURING)
                .await?;
            self.conn.read_nar(sink, DURING, NarHashing::Hash).await
        }
        .await;
        self.conn.end(r)
    }

    /// `DumpStorePath` for each of `paths`, pipelined (see [`NAR_WINDOW`]): the NAR of
    /// `paths[i]` is streamed into `sinks[i]`, which is then shut down, and `after(i, sum)`
    /// checks it before the next is read (hashed as `hashing` says). Every path must be valid
    /// on the server (an invalid one kills it).
    pub async fn dump_store_paths<W, E>(
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
        let (dir, version) = (self.dir.clone(), self.version);
        let request = |p: &StorePath, out: &mut BytesMut| {
            Request::DumpStorePath { path: p.clone() }.write(out, &dir, version);
        };
        crate::worker::nar_batch(
            &mut self.conn,
            "serve DumpStorePath",
            None,
            paths,
            sinks,
            hashing,
            request,
            after,
        )
        .await
    }

    /// `AddToStoreNar` for several paths, pipelined: headers and NARs are sent while the
    /// acknowledgements are read, so the batch costs one round trip (the server handles
    /// commands strictly in order; reading as we write keeps a server blocked on a full
    /// pipe of acknowledgements from deadlocking the upload). Paths must be given
    /// dependencies first.
    pub async fn add_to_store_nars(
        &mut self,
        uploads: &mut [Upload<'_>],
    ) -> Result<(), SessionError> {
        self.begin().await?;
        let r = self.add_to_store_nars_inner(uploads).await;
        self.conn.end(r)
    }

    async fn add_to_store_nars_inner(
        &mut self,
        uploads: &mut [Upload<'_>],
    ) -> Result<(), SessionError> {
        const DURING: &str = "serve AddToStoreNar";
        if self.version < serve::ADD_TO_STORE_NAR {
            return Err(SessionError::Unsupported(
                nixmux_proto::Incompatible::OperationUnsupported {
                    op: "serve AddToStoreNar",
                    needs: serve::ADD_TO_STORE_NAR,
                    negotiated: self.version,
                },
            ));
        }
        if uploads.iter().any(|up| up.info.nar_size == 0) {
            return Err(SessionError::Source(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a NAR is never empty (narSize 0)",
            )));
        }
        let total = uploads.len();
        let (dir, version) = (self.dir.clone(), self.version);
        self.conn.concurrent_turn();
        let (mut rh, mut wh) = self.conn.halves();
        // Headers and NARs go out while the acknowledgements are read: the server handles
        // commands strictly in order and never waits for us to read, so the whole batch
        // costs one round trip.
        let writer = async {
            let mut header = BytesMut::new();
            let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
            for up in uploads.iter_mut() {
                header.clear();
                Request::AddToStoreNar {
                    info: up.info.clone(),
                }
                .write(&mut header, &dir, version);
                wh.send(&header, DURING).await?;
                let mut left = up.info.nar_size;
                while left > 0 {
                    buf.clear();
                    let n = read_upload_piece(
                        up.nar,
                        &mut buf,
                        WRITE_CHUNK as u64,
                        left,
                        wh.activity(),
                    )
                    .await?;
                    wh.send(&buf, DURING).await?;
                    left -= n as u64;
                }
            }
            Ok(())
        };
        let reader = async {
            for _ in 0..total {
                rh.read(DURING, Patience::Transfer, |r| {
                    serve::read_ack(r, "AddToStoreNar")
                })
                .await?;
            }
            Ok(())
        };
        tokio::try_join!(writer, reader).map(drop)
    }

    /// `ImportPaths`: one export stream carrying several paths (dependencies first). The
    /// server imports without checking signatures.
    pub async fn import_paths(
        &mut self,
        uploads: &mut [(ExportTrailer, &mut (dyn AsyncRead + Unpin + Send), u64)],
    ) -> Result<(), SessionError> {
        self.begin().await?;
        let r = async {
            const DURING: &str = "serve ImportPaths";
            self.send(&Request::ImportPaths, DURING).await?;
            for (trailer, nar, size) in uploads.iter_mut() {
                serve::write_export_item(&mut self.conn.wbuf, ExportItem::Path);
                self.conn.flush(DURING).await?;
                self.conn.copy_exact(*nar, *size, DURING).await?;
                serve::write_export_entry(&mut self.conn.wbuf, &self.dir, trailer);
            }
            serve::write_export_item(&mut self.conn.wbuf, ExportItem::End);
            self.conn.flush(DURING).await?;
            self.conn
                .read(DURING, |r| serve::read_ack(r, "ImportPaths"))
                .await
        }
        .await;
        self.conn.end(r)
    }

    /// `ExportPaths`: the NARs of `paths` come back in one stream, dependencies first. Each
    /// NAR is written to the sink `sink_for(i)` returns for the i-th path; the sinks are handed
    /// back with each path's trailer and summary.
    pub async fn export_paths<S>(
        &mut self,
        paths: &BTreeSet<StorePath>,
        mut sink_for: impl FnMut(usize) -> S,
    ) -> Result<Vec<(ExportTrailer, NarSummary, S)>, SessionError>
    where
        S: AsyncWrite + Unpin + Send,
    {
        self.begin().await?;
        let r = async {
            const DURING: &str = "serve ExportPaths";
            self.send(
                &Request::ExportPaths {
                    paths: paths.clone(),
                },
                DURING,
            )
            .await?;
            let mut out = Vec::new();
            loop {
                match self.conn.read(DURING, serve::read_export_item).await? {
                    ExportItem::End => return Ok(out),
                    ExportItem::Path => {
                        if out.len() >= paths.len() {
                            return Err(SessionError::Protocol {
                                during: DURING,
                                source: ProtoError::from(nixmux_proto::Misbehaved::Inconsistent(
                                    "more paths exported than requested".into(),
                                )),
                            });
                        }
                        let mut sink = sink_for(out.len());
                        let summary = self
                            .conn
                            .read_nar(&mut sink, DURING, NarHashing::Hash)
                            .await?;
                        let dir = self.dir.clone();
                        let trailer = self
                            .conn
                            .read(DURING, |r| serve::read_export_trailer(r, &dir))
                            .await?;
                        out.push((trailer, summary, sink));
                    }
                }
            }
        }
        .await;
        self.conn.end(r)
    }

    /// `BuildPaths`: builds derivations whose `.drv` closures are valid on the remote.
    pub async fn build_paths(
        &mut self,
        paths: &[DerivedPath],
        options: &BuildOptions,
    ) -> Result<BuildResult, SessionError> {
        let req = Request::BuildPaths {
            paths: paths.to_vec(),
            options: *options,
        };
        let t = Patience::Build;
        self.call(req, "serve BuildPaths", t, |r, _, _| {
            serve::read_build_paths_reply(r)
        })
        .await
    }

    /// `BuildDerivation`: builds `drv` (inputs must already be valid remotely; `input_srcs`
    /// must hold the whole input closure). The remote's log goes to its stderr.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: &BuildOptions,
    ) -> Result<BuildResult, SessionError> {
        let req = Request::BuildDerivation {
            drv_path: drv_path.clone(),
            drv: drv.clone(),
            options: *options,
        };
        let t = Patience::Build;
        self.call(req, "serve BuildDerivation", t, serve::read_build_result)
            .await
    }

    /// Marks the session unusable (e.g. the caller saw the remote misbehave).
    pub fn poison(&mut self) {
        self.conn.poison();
    }
}
