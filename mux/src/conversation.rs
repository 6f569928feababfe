//! One protocol conversation, whichever protocol the builder speaks: the one place that
//! switches on it. Everything above (the [`crate::Builder`] operations, ping) asks for an
//! operation and gets the same result types on both.
//!
//! What differs underneath, and is hidden here:
//! * uploads: serve pipelines `AddToStoreNar` per path; worker sends one framed
//!   `AddMultipleToStore` (1.32+) or framed `AddToStoreNar`s;
//! * downloads: serve `DumpStorePath`; worker `NarFromPath`;
//! * builds: serve carries the build options with each build and writes the log to the
//!   channel's stderr; worker needs `SetOptions` first and sends the log in-band;
//! * building by path: serve `BuildPaths` answers with a status only (outputs come from the
//!   derivation); worker `BuildPathsWithResults` gives a full result.

use std::collections::{BTreeMap, BTreeSet};

use nixmux_proto::build_result::{BuildResult, BuiltOutput};
use nixmux_proto::derivation::{BasicDerivation, Derivation};
use nixmux_proto::derived_path::{DerivedPath, OutputsSpec};
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::store_path::StorePath;
use nixmux_proto::worker::{BuildMode, Trust};
use nixmux_session::{
    NarHashing, NarSummary, NarsError, ServeSession, SessionError, Upload, WorkerSession,
};
use nixmux_transport::ExecStatus;
use tokio::io::AsyncWrite;

use crate::logs::LogSender;
use crate::options::{BuildOptions, client_options, serve_options};
use crate::protocol::{Protocol, RemoteInfo};
use crate::serve_log::LogRoute;

/// The conversation itself.
#[derive(Debug)]
pub(crate) enum Conversation {
    Serve(ServeSession),
    Worker(WorkerSession),
}

/// Where a build's log goes: `logs`, and for the serve protocol (whose log is the channel's
/// stderr) the route its stderr pump follows, and the channel (for the end-of-log barrier).
pub(crate) struct BuildLog<'a> {
    pub(crate) logs: &'a LogSender,
    pub(crate) stderr: &'a LogRoute,
    pub(crate) channel: &'a ExecStatus,
}

impl Conversation {
    /// What the handshake told about the builder.
    pub(crate) fn info(&self) -> RemoteInfo {
        match self {
            Conversation::Serve(x) => RemoteInfo {
                protocol: Protocol::Serve,
                version: x.version(),
                nix_version: None,
                trusted: None,
            },
            Conversation::Worker(w) => RemoteInfo {
                protocol: Protocol::Worker,
                version: w.version(),
                nix_version: w.daemon_info().nix_version.clone(),
                trusted: w.daemon_info().trust.map(|t| t == Trust::Trusted),
            },
        }
    }

    /// Whether it can take another operation.
    pub(crate) fn is_usable(&self) -> bool {
        match self {
            Conversation::Serve(s) => s.is_usable(),
            Conversation::Worker(w) => w.is_usable(),
        }
    }

    /// Which of `paths` are valid, letting the builder substitute missing ones first when
    /// `substitute` is set.
    pub(crate) async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, SessionError> {
        match self {
            Conversation::Serve(x) => x.query_valid_paths(paths, false, substitute).await,
            Conversation::Worker(w) => w.query_valid_paths(paths, substitute, &mut |_| {}).await,
        }
    }

    /// Which of `paths` are valid, protecting them from the builder's garbage collector for
    /// as long as this session lives: serve `QueryValidPaths` with `lock` (the server adds a
    /// temporary root for each path first, src/nix-store/nix-store.cc `opServe`), worker
    /// `AddTempRoot` for each, then `QueryValidPaths`, as Hydra's queue runner does.
    pub(crate) async fn query_valid_protected(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, SessionError> {
        if paths.is_empty() {
            // Nothing to ask and nothing to protect: a build without inputs (the leaves of a
            // graph) saves the round trip.
            return Ok(BTreeSet::new());
        }
        match self {
            Conversation::Serve(x) => x.query_valid_paths(paths, true, substitute).await,
            Conversation::Worker(w) => {
                w.protect_and_query_valid(paths, substitute, &mut |_| {})
                    .await
            }
        }
    }

    /// Metadata of the valid ones among `paths`, in one round trip (serve batches natively;
    /// worker requests are pipelined).
    pub(crate) async fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<PathInfo>, SessionError> {
        match self {
            Conversation::Serve(x) => x.query_path_infos(paths).await,
            Conversation::Worker(w) => w.query_path_infos(paths, &mut |_| {}).await,
        }
    }

    /// Adds the NARs of `uploads` (dependencies first) in one pipelined batch, without
    /// signature checks (the caller trusts what it sends, as Nix's build hook does).
    pub(crate) async fn add_paths(
        &mut self,
        uploads: &mut [Upload<'_>],
    ) -> Result<(), SessionError> {
        match self {
            Conversation::Serve(s) => s.add_to_store_nars(uploads).await,
            // Not `AddMultipleToStore`: another client may add one of the paths meanwhile,
            // which makes Nix 2.8 lose its place in that stream (see `WorkerSession::add_paths`).
            Conversation::Worker(w) => w.add_paths(uploads, false, true, &mut |_| {}).await,
        }
    }

    /// Streams the NAR of each of `paths` into its sink, pipelined (a fixed number of round
    /// trips whatever the number of paths), hashed as `hashing` says; `after` checks each
    /// before the next.
    pub(crate) async fn nars<W, E>(
        &mut self,
        paths: &[StorePath],
        sinks: &mut [W],
        hashing: NarHashing,
        after: impl FnMut(usize, NarSummary) -> Result<(), E> + Send,
    ) -> Result<(), NarsError<E>>
    where
        W: AsyncWrite + Unpin + Send,
    {
        match self {
            Conversation::Serve(s) => s.dump_store_paths(paths, sinks, hashing, after).await,
            Conversation::Worker(w) => w.nars_from_paths(paths, sinks, hashing, after).await,
        }
    }

    /// Builds `basic` (the derivation `drv_path` with its whole input closure in
    /// `inputSrcs`, valid on the builder) with `options`, its log going to `log`.
    pub(crate) async fn build_derivation(
        &mut self,
        log: BuildLog<'_>,
        drv_path: &StorePath,
        basic: &BasicDerivation,
        options: &BuildOptions,
    ) -> Result<BuildResult, SessionError> {
        match self {
            Conversation::Serve(x) => {
                let options = serve_options(options);
                with_serve_log(log, x.build_derivation(drv_path, basic, &options)).await
            }
            Conversation::Worker(w) => {
                w.set_options(&client_options(options), &mut |_| {}).await?;
                w.build_derivation(drv_path, basic, BuildMode::Normal, &mut |ev| {
                    log.logs.send(ev)
                })
                .await
            }
        }
    }

    /// Builds every output of `drv` (whose `.drv` closure is valid on the builder) by path,
    /// its log going to `log`.
    pub(crate) async fn build_by_path(
        &mut self,
        log: BuildLog<'_>,
        drv_path: &StorePath,
        drv: &Derivation,
        options: &BuildOptions,
    ) -> Result<BuildResult, SessionError> {
        let outputs: BTreeSet<String> = drv.outputs.keys().cloned().collect();
        let target = DerivedPath::Built {
            drv: drv_path.clone(),
            outputs: OutputsSpec::Names(outputs),
        };
        match self {
            Conversation::Serve(x) => {
                let options = serve_options(options);
                let build = x.build_paths(std::slice::from_ref(&target), &options);
                let mut result = with_serve_log(log, build).await?;
                // `BuildPaths` answers with a status only; input-addressed outputs have their
                // paths in the derivation.
                if result.status.is_success() {
                    for (out, o) in &drv.outputs {
                        if let Some(path) = &o.path {
                            result.built_outputs.insert(
                                out.clone(),
                                BuiltOutput {
                                    path: path.clone(),
                                    signatures: BTreeSet::new(),
                                    id: None,
                                    dependent_realisations: BTreeMap::new(),
                                },
                            );
                        }
                    }
                }
                Ok(result)
            }
            Conversation::Worker(w) => {
                w.set_options(&client_options(options), &mut |_| {}).await?;
                let mut results = w
                    .build_paths_with_results(
                        std::slice::from_ref(&target),
                        BuildMode::Normal,
                        &mut |ev| log.logs.send(ev),
                    )
                    .await?;
                results
                    .pop()
                    .map(|(_, r)| r)
                    .ok_or_else(|| SessionError::Protocol {
                        during: "worker BuildPathsWithResults",
                        source: nixmux_proto::Misbehaved::Inconsistent("no build result".into())
                            .into(),
                    })
            }
        }
    }
}

/// Runs a serve build with the channel's stderr (the build log) routed into `log.logs`,
/// until every line the server wrote before its reply has been delivered.
async fn with_serve_log<T>(log: BuildLog<'_>, op: impl std::future::Future<Output = T>) -> T {
    log.stderr.set(Some(log.logs.clone()));
    let r = op.await;
    log.stderr.settle(log.channel).await;
    log.stderr.set(None);
    r
}
