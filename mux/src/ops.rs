//! The operations that move paths and run builds, the same on both protocols.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixmux_proto::build_result::BuildResult;
use nixmux_proto::derivation::Derivation;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::store_path::StorePath;
use nixmux_session::SessionError;

pub use crate::options::BuildOptions;

use crate::builder::Builder;
use crate::conversation::{BuildLog, Conversation};
use crate::error::{Error, ErrorKind, Result, from_session};
use crate::local::{LocalStore, closure_with, topo_sort};
use crate::logs::{LogRecord, LogSender, LogWatch};
use crate::pool::PooledSession;
use crate::protocol::RemoteInfo;
use crate::stream::{self, Tally};

pub use crate::stream::{ProgressFn, TransferProgress};

/// What a push or fetch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferReport {
    /// Paths in the closure.
    pub closure: usize,
    /// Paths that were already there.
    pub already_present: usize,
    /// Paths transferred, in the order sent.
    pub transferred: Vec<StorePath>,
    /// NAR bytes transferred.
    pub bytes: u64,
}

/// How a build was sent, which depends on protocol and trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStrategy {
    /// The derivation was sent inline with its input closure (serve, or trusted worker).
    BuildDerivation,
    /// The `.drv` closure was copied and the outputs built by path (untrusted worker), as
    /// Nix's build hook does for untrusted ssh-ng builders.
    BuildPaths,
}

/// The outcome of a remote build.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The result: status, error text, times, built outputs.
    pub result: BuildResult,
    /// The last lines of the build log.
    pub log_tail: Vec<String>,
    /// How it was sent.
    pub strategy: BuildStrategy,
    /// The input push.
    pub pushed: TransferReport,
    /// Whether the whole log was stored in the local store.
    pub local_log: LocalLog,
}

/// Whether a build's whole log was stored in the local store, where `nix log` finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalLog {
    /// Stored, this many bytes long.
    Stored {
        /// Size of the stored log.
        bytes: u64,
    },
    /// Not stored: the build logged nothing, or the caller asked not to
    /// ([`BuildOptions::no_local_log`]).
    NotKept,
    /// Storing it failed (for example, the local daemon does not trust this user). The build
    /// itself is not affected.
    Failed(String),
}

/// Most of a build log kept in memory to store locally (head and tail; see `LogRecord`).
/// Nix keeps whole logs on disk; holding them for many concurrent builds must stay bounded.
const LOCAL_LOG_CAP: usize = 64 << 20;

/// Everything one build needs, passed between the strategies.
struct BuildJob<'a> {
    local: &'a LocalStore,
    drv_path: &'a StorePath,
    drv: &'a Derivation,
    input_outputs: &'a BTreeSet<StorePath>,
    options: &'a BuildOptions,
    logs: &'a LogSender,
    progress: Option<ProgressFn>,
    /// A content-addressed build (`crate::ca`): the derivation sent as it is (resolved), with
    /// its input sources not widened to the input closure.
    ca: Option<&'a crate::ca::CaBuild>,
}

/// Splits a closure (dependencies first) into the paths the other side lacks, in order, and
/// the report of the transfer that will send them.
fn plan_transfer(
    closure: Vec<PathInfo>,
    present: &BTreeSet<StorePath>,
) -> (Vec<PathInfo>, TransferReport) {
    let total = closure.len();
    let missing: Vec<PathInfo> = closure
        .into_iter()
        .filter(|i| !present.contains(&i.path))
        .collect();
    let report = TransferReport {
        closure: total,
        already_present: total - missing.len(),
        transferred: missing.iter().map(|i| i.path.clone()).collect(),
        bytes: missing.iter().map(|i| i.nar_size).sum(),
    };
    (missing, report)
}

/// A session of one builder held across several operations: a scheduler's lease for a
/// composite job (push the inputs, build, fetch the outputs).
///
/// It queues for a session once instead of once per step, and it keeps the builder's garbage
/// collector off the job's paths for as long as it lives: every path it finds present is
/// given a temporary root first (serve `QueryValidPaths` with `lock`; worker `AddTempRoot`),
/// paths it uploads and outputs it builds get one from the builder's Nix itself, and the
/// outputs of its builds are rooted again explicitly. Nix keeps a process's temporary roots
/// until the process ends, which is when the lease's session ends (src/libstore/gc.cc).
///
/// Each operation runs under the builder's `operation_deadline`. An operation that fails or
/// is cancelled half-way makes the session unusable: the next operation on the lease takes a
/// new session in its place (within the same slot of the builder's session limit), and
/// dropping the lease closes a broken session instead of returning it.
pub struct Lease {
    builder: Builder,
    session: PooledSession,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("builder", &self.builder.name())
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Holds one of this builder's sessions for several operations (see [`Lease`]), waiting
    /// for one like any operation does.
    pub async fn lease(&self) -> Result<Lease> {
        let mut session = self.acquire().await?;
        // A fresh or idle session is in a known state: returned if dropped unused.
        session.succeeded();
        Ok(Lease {
            builder: self.clone(),
            session,
        })
    }

    /// Copies the closure of `roots` from `local` to this builder: asks the builder once
    /// which paths it lacks (letting it substitute them when `substitute` is set), then
    /// streams the missing NARs dependencies first, in one pipelined batch (`AddToStoreNar`
    /// back to back on both protocols, framed on the worker one), never holding a whole NAR.
    pub async fn push_closure(
        &self,
        local: &LocalStore,
        roots: &BTreeSet<StorePath>,
        substitute: bool,
        progress: Option<ProgressFn>,
    ) -> Result<TransferReport> {
        self.bounded("push_closure", async {
            let mut lease = self.lease().await?;
            lease
                .run(async |l: &mut Lease| {
                    l.push_closure_unbounded(local, roots, substitute, progress)
                        .await
                })
                .await
        })
        .await
    }

    /// Copies `paths` and everything they reference that the local store lacks from the
    /// builder into `local`, dependencies first. Every NAR's size is checked against the
    /// builder's record while it streams, and its hash by the local store before it registers
    /// the path (through the zstd bulk channel, also here). A path whose transfer fails is not
    /// registered locally.
    pub async fn fetch_outputs(
        &self,
        local: &LocalStore,
        paths: &BTreeSet<StorePath>,
        progress: Option<ProgressFn>,
    ) -> Result<TransferReport> {
        self.bounded("fetch_outputs", async {
            let mut lease = self.lease().await?;
            lease
                .run(async |l: &mut Lease| l.fetch_unbounded(local, paths, progress).await)
                .await
        })
        .await
    }

    /// Builds the derivation `drv_path` of the local store on this builder: reads the `.drv`,
    /// pushes what the build needs, runs it with `options` (which reach the builder on both
    /// protocols), streams its log into `logs`, and returns the result. Outputs stay on the
    /// builder; use [`Builder::fetch_outputs`] to copy them back (or a [`Lease`], whose
    /// `build` and `fetch_outputs` keep the outputs protected in between).
    ///
    /// The strategy follows trust, as Nix's build hook does: the serve protocol and trusted
    /// worker sessions get the derivation inline with its input closure; an untrusted worker
    /// session (which may only build content-addressed derivations inline) gets the `.drv`
    /// closure and builds the outputs by path.
    pub async fn build(
        &self,
        local: &LocalStore,
        drv_path: &StorePath,
        options: &BuildOptions,
        logs: &LogSender,
    ) -> Result<BuildOutcome> {
        self.build_with_progress(local, drv_path, options, logs, None)
            .await
    }

    /// [`Builder::build`], reporting the progress of the input push.
    pub async fn build_with_progress(
        &self,
        local: &LocalStore,
        drv_path: &StorePath,
        options: &BuildOptions,
        logs: &LogSender,
        progress: Option<ProgressFn>,
    ) -> Result<BuildOutcome> {
        self.bounded("build", async {
            // The slot first: a build waiting for one holds no session meanwhile.
            let t = Instant::now();
            let _slot = self.build_slot().await?;
            let t_slot = t.elapsed();
            let mut lease = self.lease().await?;
            tracing::debug!(target: "nixmux::timing",
                slot_us = micros(t_slot),
                lease_us = micros(t.elapsed() - t_slot), "lease");
            lease
                .run(async |l: &mut Lease| {
                    l.build_unbounded(local, drv_path, options, logs, progress)
                        .await
                })
                .await
        })
        .await
    }
}

impl Lease {
    /// The builder.
    pub fn builder(&self) -> &Builder {
        &self.builder
    }

    /// What the session's handshake told about the builder.
    pub fn remote_info(&self) -> RemoteInfo {
        self.session.peek().conv.info()
    }

    /// Runs one operation of the lease under the builder's deadline; the session stays
    /// reusable only if it succeeds.
    async fn step<T>(
        &mut self,
        what: &str,
        op: impl AsyncFnOnce(&mut Lease) -> Result<T>,
    ) -> Result<T> {
        let builder = self.builder.clone();
        builder.bounded(what, self.run(op)).await
    }

    /// Runs one operation: the session stays reusable only if it succeeds (a failure or a
    /// cancellation half-way leaves it to be closed).
    async fn run<T>(&mut self, op: impl AsyncFnOnce(&mut Lease) -> Result<T>) -> Result<T> {
        // An earlier operation broke the session (or a build was stopped at a limit): go on
        // with a new one; what the old one protected is protected again as it is used.
        if !self.session.peek().is_usable() {
            self.session.renew().await?;
        }
        self.session.begin();
        let r = op(self).await;
        if r.is_ok() {
            self.session.succeeded();
        }
        r
    }

    /// Which of `paths` are valid on the builder (substituting missing ones first when
    /// `substitute` is set); the valid ones are protected from its garbage collector for as
    /// long as the lease lives.
    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>> {
        self.step("query_valid_paths", async |l: &mut Lease| {
            l.query_protected(paths, substitute).await
        })
        .await
    }

    /// [`Builder::push_closure`] on the leased session; what it pushes or finds present
    /// stays protected while the lease lives.
    pub async fn push_closure(
        &mut self,
        local: &LocalStore,
        roots: &BTreeSet<StorePath>,
        substitute: bool,
        progress: Option<ProgressFn>,
    ) -> Result<TransferReport> {
        self.step("push_closure", async |l: &mut Lease| {
            l.push_closure_unbounded(local, roots, substitute, progress)
                .await
        })
        .await
    }

    /// [`Builder::build_with_progress`] on the leased session; its outputs stay protected
    /// while the lease lives, for [`Lease::fetch_outputs`].
    pub async fn build(
        &mut self,
        local: &LocalStore,
        drv_path: &StorePath,
        options: &BuildOptions,
        logs: &LogSender,
        progress: Option<ProgressFn>,
    ) -> Result<BuildOutcome> {
        let builder = self.builder.clone();
        let slot = builder.build_slot().await?;
        self.build_in_slot(slot, local, drv_path, options, logs, progress)
            .await
    }

    /// [`Lease::build`] in a slot the caller took already ([`Builder::build_slot`], before
    /// leasing, so that builds selected at the same moment spread over the builders).
    pub async fn build_in_slot(
        &mut self,
        slot: crate::builder::BuildSlot<'_>,
        local: &LocalStore,
        drv_path: &StorePath,
        options: &BuildOptions,
        logs: &LogSender,
        progress: Option<ProgressFn>,
    ) -> Result<BuildOutcome> {
        let _slot = slot;
        self.step("build", async |l: &mut Lease| {
            l.build_unbounded(local, drv_path, options, logs, progress)
                .await
        })
        .await
    }

    /// [`Builder::fetch_outputs`] on the leased session.
    pub async fn fetch_outputs(
        &mut self,
        local: &LocalStore,
        paths: &BTreeSet<StorePath>,
        progress: Option<ProgressFn>,
    ) -> Result<TransferReport> {
        self.step("fetch_outputs", async |l: &mut Lease| {
            l.fetch_unbounded(local, paths, progress).await
        })
        .await
    }

    async fn query_protected(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>> {
        let name = self.builder.name().to_owned();
        self.session
            .get()
            .conv
            .query_valid_protected(paths, substitute)
            .await
            .map_err(|e| from_session(e).on(&name))
    }

    /// Roots the outputs a build produced on the leased session, until they are fetched.
    async fn protect_outputs(&mut self, result: &BuildResult) -> Result<()> {
        let outputs: BTreeSet<StorePath> = result
            .built_outputs
            .values()
            .map(|o| o.path.clone())
            .collect();
        if outputs.is_empty() {
            return Ok(());
        }
        self.query_protected(&outputs, false).await.map(drop)
    }

    async fn push_closure_unbounded(
        &mut self,
        local: &LocalStore,
        roots: &BTreeSet<StorePath>,
        substitute: bool,
        progress: Option<ProgressFn>,
    ) -> Result<TransferReport> {
        let closure = local.closure(roots).await?;
        self.push_infos(local, closure, substitute, progress).await
    }

    /// [`Lease::push_closure`] for a closure whose metadata is already known (dependencies
    /// first).
    async fn push_infos(
        &mut self,
        local: &LocalStore,
        closure: Vec<PathInfo>,
        substitute: bool,
        progress: Option<ProgressFn>,
    ) -> Result<TransferReport> {
        let all: BTreeSet<StorePath> = closure.iter().map(|i| i.path.clone()).collect();
        let t = Instant::now();
        let present = self.query_protected(&all, substitute).await?;
        tracing::debug!(target: "nixmux::timing", paths = all.len(),
            query_us = micros(t.elapsed()), "push query");
        let (missing, report) = plan_transfer(closure, &present);
        if !missing.is_empty()
            && !crate::bulk::push(
                &self.builder,
                &mut self.session,
                local,
                &missing,
                progress.clone(),
            )
            .await?
            && !crate::parallel::push(
                &self.builder,
                &mut self.session,
                local,
                &missing,
                progress.clone(),
            )
            .await?
        {
            self.upload(local, &missing, progress).await?;
        }
        Ok(report)
    }

    /// Streams `infos` (topologically sorted) from `local` to the builder.
    async fn upload(
        &mut self,
        local: &LocalStore,
        infos: &[PathInfo],
        progress: Option<ProgressFn>,
    ) -> Result<()> {
        let tally = Tally::new(infos, progress);
        let infos: Vec<&PathInfo> = infos.iter().collect();
        let name = self.builder.name().to_owned();
        stream::upload(local, &mut self.session, &infos, &tally, &name).await
    }

    async fn fetch_unbounded(
        &mut self,
        local: &LocalStore,
        paths: &BTreeSet<StorePath>,
        progress: Option<ProgressFn>,
    ) -> Result<TransferReport> {
        let t = Instant::now();
        let closure = self.remote_closure(paths).await?;
        let t_remote = t.elapsed();
        let all: BTreeSet<StorePath> = closure.iter().map(|i| i.path.clone()).collect();
        let present = local.query_valid_paths(&all).await?;
        let t_local = t.elapsed();
        let (missing, report) = plan_transfer(closure, &present);
        if missing.is_empty()
            || crate::bulk::fetch(
                &self.builder,
                &mut self.session,
                local,
                &missing,
                progress.clone(),
            )
            .await?
            || crate::parallel::fetch(
                &self.builder,
                &mut self.session,
                local,
                &missing,
                progress.clone(),
            )
            .await?
        {
            return Ok(report);
        }
        let tally = Tally::new(&missing, progress);
        let infos: Vec<&PathInfo> = missing.iter().collect();
        let name = self.builder.name().to_owned();
        stream::download(local, &mut self.session, &infos, &tally, &name).await?;
        tracing::debug!(target: "nixmux::timing",
            remote_closure_us = micros(t_remote),
            local_query_us = micros(t_local - t_remote),
            transfer_us = micros(t.elapsed() - t_local),
            "fetch");
        Ok(report)
    }

    /// The closure of `roots` on the builder, with metadata, dependencies first.
    async fn remote_closure(&mut self, roots: &BTreeSet<StorePath>) -> Result<Vec<PathInfo>> {
        let name = self.builder.name().to_owned();
        let mut source = RemoteInfos {
            conv: &mut self.session.get().conv,
            name: &name,
        };
        let r = closure_with(roots, &mut source).await;
        Ok(topo_sort(r?))
    }

    /// Builds `drv_path` on the leased session, then stores its whole log locally (unless
    /// `options.no_local_log`). Storing the log never fails the build: its outcome says
    /// whether it was stored.
    async fn build_unbounded(
        &mut self,
        local: &LocalStore,
        drv_path: &StorePath,
        options: &BuildOptions,
        logs: &LogSender,
        progress: Option<ProgressFn>,
    ) -> Result<BuildOutcome> {
        let logs = logs.with_tail(30);
        let logs = if options.no_local_log {
            logs
        } else {
            logs.recording(LOCAL_LOG_CAP)
        };
        let t = Instant::now();
        let mut outcome = self
            .build_remote(local, drv_path, options, &logs, progress)
            .await?;
        let t_remote = t.elapsed();
        if let Some(text) = logs.record().and_then(LogRecord::contents) {
            outcome.local_log = match local.add_build_log(drv_path, &text).await {
                Ok(()) => LocalLog::Stored {
                    bytes: text.len() as u64,
                },
                Err(e) => {
                    tracing::warn!(drv = %drv_path, error = %e, "cannot store the build log locally");
                    LocalLog::Failed(e.message().to_owned())
                }
            };
        }
        tracing::debug!(target: "nixmux::timing", drv = %drv_path,
            remote_us = micros(t_remote),
            log_us = micros(t.elapsed() - t_remote),
            "build");
        Ok(outcome)
    }

    async fn build_remote(
        &mut self,
        local: &LocalStore,
        drv_path: &StorePath,
        options: &BuildOptions,
        logs: &LogSender,
        progress: Option<ProgressFn>,
    ) -> Result<BuildOutcome> {
        let name = self.builder.name().to_owned();
        let drv = local.read_derivation(drv_path).await?;
        // Outputs of input derivations: input-addressed ones have their paths in the `.drv`;
        // floating content-addressed ones need the local store's realisations.
        let input_outputs = match crate::ca::prepare(local, drv_path, &drv).await? {
            crate::ca::Plan::Ordinary(paths) => paths,
            crate::ca::Plan::Ca(ca) => {
                return self
                    .build_ca(local, drv_path, &drv, &ca, options, logs, progress)
                    .await;
            }
        };
        let info = self.session.peek().conv.info();
        let job = BuildJob {
            local,
            drv_path,
            drv: &drv,
            input_outputs: &input_outputs,
            options,
            logs,
            progress,
            ca: None,
        };
        let known_untrusted = info.trusted == Some(false);
        if !known_untrusted {
            match self.build_inline(&job).await {
                Err(e) if e.kind() == ErrorKind::NotTrusted && is_build_refusal(&e) => {
                    // The builder took the inputs but refuses input-addressed builds from
                    // this user: Nix allows building the `.drv` by path instead.
                    tracing::info!(builder = %name, "not trusted to build inline; building by path");
                    // The serve protocol ends the session on any error: go on with a new one
                    // (what the old one protected is pushed and protected again).
                    if !self.session.peek().is_usable() {
                        self.session.renew().await?;
                    }
                }
                other => return other,
            }
        }
        self.build_by_path(&job).await
    }

    /// Sends the derivation inline (serve `BuildDerivation`, worker `BuildDerivation`) after
    /// pushing its input closure: what Nix's build hook does for trusted builders.
    async fn build_inline(&mut self, job: &BuildJob<'_>) -> Result<BuildOutcome> {
        let BuildJob {
            local,
            drv_path,
            drv,
            input_outputs,
            options,
            logs,
            ..
        } = *job;
        let progress = job.progress.clone();
        let name = self.builder.name().to_owned();
        let mut srcs = drv.input_srcs.clone();
        srcs.extend(input_outputs.iter().cloned());
        if let Some(ca) = job.ca {
            srcs = ca.basic.input_srcs.clone();
        }
        // The closure's metadata serves twice: the derivation's inputSrcs and the push.
        let t = Instant::now();
        let infos = local.closure(&srcs).await?;
        let t_closure = t.elapsed();
        let closure: BTreeSet<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
        let pushed = self
            .push_infos(local, infos, options.substitute, progress)
            .await?;
        let t_push = t.elapsed();
        let basic = match job.ca {
            Some(ca) => ca.basic.clone(),
            None => drv.to_basic(closure),
        };
        let session = self.session.get();
        let log = BuildLog {
            logs,
            stderr: &session.route,
            channel: &session.status,
        };
        let watch = logs.watch();
        let result = within_limits(
            options,
            watch,
            session
                .conv
                .build_derivation(log, drv_path, &basic, options),
        )
        .await
        .map_err(|e| build_error(e, &name))?;
        let t_build = t.elapsed();
        self.protect_outputs(&result).await?;
        tracing::debug!(target: "nixmux::timing", drv = %drv_path, builder = %name,
            closure_us = micros(t_closure),
            push_us = micros(t_push - t_closure),
            build_us = micros(t_build - t_push),
            protect_us = micros(t.elapsed() - t_build),
            "build_inline");
        Ok(BuildOutcome {
            result,
            log_tail: logs.tail(),
            strategy: BuildStrategy::BuildDerivation,
            pushed,
            local_log: LocalLog::NotKept,
        })
    }

    /// Builds a derivation with content-addressed outputs or inputs (see `crate::ca`): sends
    /// it resolved, then copies its outputs back and registers their realisations locally,
    /// since only the builder's result says where floating outputs went and the local store
    /// records a realisation only for a path it holds.
    #[allow(clippy::too_many_arguments)]
    async fn build_ca(
        &mut self,
        local: &LocalStore,
        drv_path: &StorePath,
        drv: &Derivation,
        ca: &crate::ca::CaBuild,
        options: &BuildOptions,
        logs: &LogSender,
        progress: Option<ProgressFn>,
    ) -> Result<BuildOutcome> {
        let name = self.builder.name().to_owned();
        let no_inputs = BTreeSet::new();
        let job = BuildJob {
            local,
            drv_path,
            drv,
            input_outputs: &no_inputs,
            options,
            logs,
            progress,
            ca: Some(ca),
        };
        let outcome = match self.build_inline(&job).await {
            Err(e) if crate::ca::lacks_ca_feature(e.message()) => {
                return Err(crate::ca::builder_lacks_ca(&name, e.message()));
            }
            other => other?,
        };
        if !outcome.result.status.is_success() {
            if crate::ca::lacks_ca_feature(&outcome.result.error_msg) {
                return Err(crate::ca::builder_lacks_ca(
                    &name,
                    &outcome.result.error_msg,
                ));
            }
            return Ok(outcome);
        }
        let outputs = ca.output_paths(&outcome.result, &name)?;
        let paths: BTreeSet<StorePath> = outputs.values().cloned().collect();
        self.fetch_unbounded(local, &paths, None).await?;
        ca.register(local, &outputs).await?;
        Ok(outcome)
    }

    /// Copies the `.drv` closure (and the outputs of its inputs) and builds the outputs by
    /// path (serve `BuildPaths`, worker `BuildPathsWithResults`): what Nix allows a user the
    /// builder's daemon does not trust.
    async fn build_by_path(&mut self, job: &BuildJob<'_>) -> Result<BuildOutcome> {
        let BuildJob {
            local,
            drv_path,
            drv,
            input_outputs,
            options,
            logs,
            ..
        } = *job;
        let progress = job.progress.clone();
        let name = self.builder.name().to_owned();
        let mut roots: BTreeSet<StorePath> = (*input_outputs).clone();
        roots.insert(drv_path.clone());
        let pushed = self
            .push_closure_unbounded(local, &roots, options.substitute, progress)
            .await?;
        let session = self.session.get();
        let log = BuildLog {
            logs,
            stderr: &session.route,
            channel: &session.status,
        };
        let watch = logs.watch();
        let result = within_limits(
            options,
            watch,
            session.conv.build_by_path(log, drv_path, drv, options),
        )
        .await
        .map_err(|e| build_error(e, &name))?;
        self.protect_outputs(&result).await?;
        Ok(BuildOutcome {
            result,
            log_tail: logs.tail(),
            strategy: BuildStrategy::BuildPaths,
            pushed,
            local_log: LocalLog::NotKept,
        })
    }
}

/// Path metadata from a builder session, for closure walks.
struct RemoteInfos<'a> {
    conv: &'a mut Conversation,
    name: &'a str,
}

impl crate::local::InfoSource for RemoteInfos<'_> {
    fn infos<'a>(
        &'a mut self,
        batch: &'a BTreeSet<StorePath>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Vec<PathInfo>>> + Send + 'a>> {
        Box::pin(async move {
            self.conv
                .query_path_infos(batch)
                .await
                .map_err(|e| from_session(e).on(self.name))
        })
    }
}

/// How long past a limit nixmux waits for the builder's Nix to enforce it (and report it in
/// its own words) before enforcing it itself.
const LIMIT_GRACE: Duration = Duration::from_secs(2);

/// Runs `build`, enforcing the build options' limits (`timeout`, `max_silent_time`,
/// `max_log_size`) on our side too, a little after the builder's Nix should have.
///
/// The builder does not always apply them: `nix-store --serve` run by a user the daemon does
/// not trust sets them in its own process only, not on its daemon connection
/// (src/nix-store/nix-store.cc `opServe`, a FIXME upstream), and the daemon ignores
/// `max-log-size` from untrusted clients (src/libstore/daemon.cc `ClientSettings::apply`).
/// When a limit is exceeded, the build's future is dropped (which poisons the session: it is
/// closed, so the remote Nix stops and its daemon cancels the build) and the result says
/// TimedOut or LogLimitExceeded, with a message naming nixmux as the one that stopped it.
/// A duration in whole microseconds, for the `nixmux::timing` debug events (which say where
/// a build's time went; `RUST_LOG=nixmux::timing=debug`).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn within_limits(
    options: &BuildOptions,
    watch: Option<Arc<LogWatch>>,
    build: impl std::future::Future<Output = std::result::Result<BuildResult, SessionError>>,
) -> std::result::Result<BuildResult, SessionError> {
    use nixmux_proto::build_result::BuildStatus;
    if options.timeout.is_none()
        && options.max_silent_time.is_none()
        && options.max_log_size.is_none()
    {
        return build.await;
    }
    let started = Instant::now();
    let watchdog = async {
        let mut over_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = Instant::now();
            if let Some(t) = options.timeout
                && now >= started + t + LIMIT_GRACE
            {
                return BuildResult::failure(
                    BuildStatus::TimedOut,
                    format!(
                        "the build took longer than its timeout of {t:?}; nixmux stopped it (the builder did not)"
                    ),
                );
            }
            if let (Some(quiet), Some(w)) = (options.max_silent_time, &watch)
                && now >= w.last().max(started) + quiet + LIMIT_GRACE
            {
                return BuildResult::failure(
                    BuildStatus::TimedOut,
                    format!(
                        "the build printed nothing for {quiet:?} (max-silent-time); nixmux stopped it (the builder did not)"
                    ),
                );
            }
            if let (Some(max), Some(w)) = (options.max_log_size, &watch)
                && w.bytes() > max
            {
                let since = *over_since.get_or_insert(now);
                if now >= since + LIMIT_GRACE {
                    return BuildResult::failure(
                        BuildStatus::LogLimitExceeded,
                        format!(
                            "the build's log exceeded {max} bytes (max-log-size); nixmux stopped it (the builder did not)"
                        ),
                    );
                }
            }
        }
    };
    let result = tokio::select! {
        r = build => r?,
        r = watchdog => return Ok(r),
    };
    // A build quicker than the grace finished before the watchdog could stop it; its log
    // still says whether the limit held.
    if let (Some(max), Some(w)) = (options.max_log_size, &watch)
        && result.status.is_success()
        && w.bytes() > max
    {
        return Ok(BuildResult::failure(
            BuildStatus::LogLimitExceeded,
            format!(
                "the build's log exceeded {max} bytes (max-log-size); the builder did not stop it, so nixmux does not take its outputs"
            ),
        ));
    }
    Ok(result)
}

/// Whether a trust refusal came from the build step (not from importing inputs): the builder
/// would accept the same derivation built by path.
fn is_build_refusal(e: &Error) -> bool {
    e.message().contains("not privileged to build")
}

/// A build that could not run (as opposed to one that ran and failed, which is a result).
fn build_error(e: SessionError, builder: &str) -> Error {
    let mut err = from_session(e);
    if err.kind() == ErrorKind::Remote {
        err = Error::remote(ErrorKind::BuildFailed, err.message().to_owned());
    }
    err.on(builder)
}
