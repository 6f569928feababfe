//! A builder: the handle a scheduler holds, with the operations that work the same way on
//! both protocols.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nixmux_proto::path_info::PathInfo;
use nixmux_proto::store_path::{StoreDir, StorePath};
use nixmux_session::{Lead, SessionConfig, WorkerConfig};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::connections::{ConnectionLimits, ConnectionSet, Registry};
use crate::error::{Result, from_session};
use crate::pool::{LeadFn, PoolSettings, PooledSession, SessionPool};
use crate::protocol::{DEFAULT_DAEMON_SOCKET, Protocol, RemoteInfo, WorkerRoute};
use crate::remote::SessionSpec;
use crate::stats::{BuilderStats, Health};
use crate::target::ConnectTarget;

/// What the scheduler knows about a machine besides how to reach it (machines-file fields).
#[derive(Debug, Clone, PartialEq)]
pub struct MachineInfo {
    /// Platforms it builds for (`x86_64-linux`...).
    pub systems: Vec<String>,
    /// Concurrent builds it accepts (machines-file field 4): nixmux runs at most this many
    /// builds on it at once, each holding a slot from before its inputs are pushed until its
    /// result, as Nix's build hook holds a machine's slot lock while it copies (fetching the
    /// outputs afterwards, pushes and queries of their own take none). A build waiting for a
    /// slot holds no session. 0: no limit, the default of a configuration made in code; a
    /// machines line without the field says 1, as in Nix.
    pub max_jobs: u32,
    /// Relative speed.
    pub speed_factor: f64,
    /// Features it supports.
    pub supported_features: Vec<String>,
    /// Features a derivation must require to be sent there.
    pub mandatory_features: Vec<String>,
}

impl Default for MachineInfo {
    fn default() -> Self {
        MachineInfo {
            systems: Vec::new(),
            max_jobs: 0,
            speed_factor: 1.0,
            supported_features: Vec::new(),
            mandatory_features: Vec::new(),
        }
    }
}

/// Everything needed to use one builder.
#[derive(Debug, Clone)]
pub struct BuilderConfig {
    /// Name used in errors and reports (the store URL as written, usually).
    pub name: String,
    /// Serve (`ssh://`) or worker (`ssh-ng://`).
    pub protocol: Protocol,
    /// How to reach the host.
    pub target: ConnectTarget,
    /// The command run on the builder for each session.
    pub remote_command: String,
    /// How `ssh-ng://` sessions reach the builder's Nix (the daemon's socket or
    /// `remote_command`); ignored for `ssh://`.
    pub worker_route: WorkerRoute,
    /// The daemon's socket on the builder ([`DEFAULT_DAEMON_SOCKET`] unless `remote-store`
    /// or `daemon-socket` names another).
    pub daemon_socket: String,
    /// The store directory of the builder (`/nix/store`).
    pub store_dir: StoreDir,
    /// Session pool limits.
    pub pool: PoolSettings,
    /// Connection limits (shared with other builders on the same host: the first wins).
    pub connections: ConnectionLimits,
    /// Idle timeouts and wire limits of each session.
    pub session: SessionConfig,
    /// Bound on each operation of the [`Builder`] API from call to result, however much
    /// progress it makes (`None`, the default: none; every wait still has its idle timeout).
    /// For schedulers that want a hard ceiling; on expiry the operation is cancelled (its
    /// sessions discarded, the remote work stopped) and fails with `TimedOut`.
    pub operation_deadline: Option<Duration>,
    /// Worker-protocol handshake settings.
    pub worker: WorkerConfig,
    /// Scheduling metadata.
    pub machine: MachineInfo,
    /// zstd for bulk transfers (`bulk-compression`; see `crate::bulk`).
    pub bulk: crate::bulk::BulkSettings,
    /// Large transfers over several channels (see `crate::parallel`).
    pub parallel: crate::parallel::ParallelSettings,
}

impl BuilderConfig {
    /// How its sessions are started and greeted.
    pub(crate) fn session_spec(&self) -> SessionSpec {
        SessionSpec {
            protocol: self.protocol,
            command: self.remote_command.clone(),
            route: match self.protocol {
                Protocol::Serve => WorkerRoute::Exec,
                Protocol::Worker => self.worker_route,
            },
            daemon_socket: self.daemon_socket.clone(),
            session: self.session.clone(),
            worker: self.worker.clone(),
            store_dir: self.store_dir.clone(),
            channel_wait: self.pool.acquire_timeout,
        }
    }

    /// A builder with default settings and the standard remote command for `protocol`.
    pub fn new(name: impl Into<String>, protocol: Protocol, target: ConnectTarget) -> Self {
        BuilderConfig {
            name: name.into(),
            protocol,
            target,
            remote_command: match protocol {
                Protocol::Serve => "nix-store --serve --write".into(),
                Protocol::Worker => "nix-daemon --stdio".into(),
            },
            worker_route: WorkerRoute::Auto,
            daemon_socket: DEFAULT_DAEMON_SOCKET.to_owned(),
            store_dir: StoreDir::default(),
            pool: PoolSettings::default(),
            connections: ConnectionLimits::default(),
            session: SessionConfig::default(),
            operation_deadline: None,
            worker: WorkerConfig::default(),
            machine: MachineInfo::default(),
            bulk: crate::bulk::BulkSettings::default(),
            parallel: crate::parallel::ParallelSettings::default(),
        }
    }
}

pub(crate) struct BuilderInner {
    pub(crate) config: BuilderConfig,
    pub(crate) set: Arc<ConnectionSet>,
    pub(crate) pool: Arc<SessionPool>,
    /// Build slots (`machine.max_jobs`; `None`: unlimited).
    build_slots: Option<Arc<Semaphore>>,
    builds_running: AtomicU64,
    builds_waiting: AtomicU64,
    /// zstd probe and bulk-transfer counters.
    pub(crate) bulk: crate::bulk::BulkState,
    /// Parallel-transfer counters.
    pub(crate) parallel: crate::parallel::ParallelState,
}

/// One of a builder's build slots (`max_jobs`), held while a build runs; counts the build as
/// running, which [`Pool::select`] reads as the builder's load. Taken by the build calls, or
/// ahead of them with [`Builder::build_slot`] by a scheduler that must make its choice
/// visible at once (see [`crate::Lease::build_in_slot`]).
pub struct BuildSlot<'a> {
    builder: &'a BuilderInner,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for BuildSlot<'_> {
    fn drop(&mut self) {
        self.builder.builds_running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one build in `builds_waiting` while it lives.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A builder. Cheap to clone; all clones share its connection and sessions.
#[derive(Clone)]
pub struct Builder {
    pub(crate) inner: Arc<BuilderInner>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("name", &self.inner.config.name)
            .field("protocol", &self.inner.config.protocol)
            .finish_non_exhaustive()
    }
}

impl Builder {
    pub(crate) fn new(config: BuilderConfig, registry: &Registry) -> Self {
        let set = registry.get(config.target.clone(), config.connections.clone());
        let spec = config.session_spec();
        let pool = SessionPool::new(config.name.clone(), set.clone(), spec, config.pool.clone());
        let build_slots = match config.machine.max_jobs {
            0 => None,
            n => Some(Arc::new(Semaphore::new(
                usize::try_from(n).unwrap_or(Semaphore::MAX_PERMITS),
            ))),
        };
        Builder {
            inner: Arc::new(BuilderInner {
                config,
                set,
                pool,
                build_slots,
                builds_running: AtomicU64::new(0),
                builds_waiting: AtomicU64::new(0),
                bulk: crate::bulk::BulkState::default(),
                parallel: crate::parallel::ParallelState::default(),
            }),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// Its protocol.
    pub fn protocol(&self) -> Protocol {
        self.inner.config.protocol
    }

    /// Its configuration.
    pub fn config(&self) -> &BuilderConfig {
        &self.inner.config
    }

    /// Health of its connection.
    pub fn health(&self) -> Health {
        self.inner.set.health()
    }

    /// Counters.
    pub fn stats(&self) -> BuilderStats {
        let c = &self.inner.set.counters;
        let p = &self.inner.pool.counters;
        let (bytes_in, bytes_out) = self.inner.set.bytes();
        BuilderStats {
            connections_opened: c.connections_opened.load(Ordering::Relaxed),
            connect_failures: c.connect_failures.load(Ordering::Relaxed),
            startup_drops: c.startup_drops.load(Ordering::Relaxed),
            channels_opened: c.channels_opened.load(Ordering::Relaxed),
            channel_refusals: c.channel_refusals.load(Ordering::Relaxed),
            channel_refusals_transient: c.race_refusals.load(Ordering::Relaxed),
            peak_channels_per_connection: c.peak_channels.load(Ordering::Relaxed),
            connections_lost: c.connections_lost.load(Ordering::Relaxed),
            sessions_created: p.created.load(Ordering::Relaxed),
            sessions_via_socket: p.via_socket.load(Ordering::Relaxed),
            daemon_socket_refusals: p.socket_refusals.load(Ordering::Relaxed),
            daemon_socket_refused: self.inner.pool.socket.last_refusal().map(|r| r.why),
            sessions_discarded: p.discarded.load(Ordering::Relaxed),
            sessions_expired: p.expired.load(Ordering::Relaxed),
            idle_sessions: self.inner.pool.idle_count(),
            busy_sessions: self.inner.pool.busy_count(),
            acquires: p.acquires.load(Ordering::Relaxed),
            acquires_waited: p.waited.load(Ordering::Relaxed),
            acquire_timeouts: p.timeouts.load(Ordering::Relaxed),
            wait_time: Duration::from_micros(p.wait_micros.load(Ordering::Relaxed)),
            bytes_in,
            bytes_out,
            builds_running: self.inner.builds_running.load(Ordering::Relaxed),
            builds_waiting: self.inner.builds_waiting.load(Ordering::Relaxed),
            build_slots: self.inner.config.machine.max_jobs,
            round_trips: p.round_trips.count(),
        }
    }

    /// Closes idle sessions (e.g. before measuring cold starts).
    pub fn close_idle(&self) {
        self.inner.pool.clear_idle();
    }

    pub(crate) async fn acquire(&self) -> Result<PooledSession> {
        self.inner.pool.acquire(None).await
    }

    /// A session whose first request will be `lead()`: a session started for it sends the
    /// request with its handshake ([`Lead`]); an idle one does not need it built.
    pub(crate) async fn acquire_leading(&self, lead: LeadFn<'_>) -> Result<PooledSession> {
        self.inner.pool.acquire(Some(lead)).await
    }

    /// Waits for one of the builder's build slots (`machine.max_jobs`), for as long as the
    /// builds ahead take: queueing behind running builds is not a failure. A scheduler that
    /// picked this builder with [`Pool::select`] takes the slot right away, before it leases
    /// a session, so that the next selection already counts this build.
    pub async fn build_slot(&self) -> Result<BuildSlot<'_>> {
        let inner = &*self.inner;
        let permit = match &inner.build_slots {
            None => None,
            Some(slots) => {
                // Counted as waiting by a guard: a caller that gives up (drops this future)
                // must not stay in the builder's load for ever.
                let waiting = Waiting::new(&inner.builds_waiting);
                let p = slots.clone().acquire_owned().await;
                drop(waiting);
                Some(p.map_err(|_| {
                    crate::Error::local(crate::ErrorKind::Cancelled, "the builder was removed")
                })?)
            }
        };
        inner.builds_running.fetch_add(1, Ordering::Relaxed);
        Ok(BuildSlot {
            builder: inner,
            _permit: permit,
        })
    }

    fn err(&self, e: nixmux_session::SessionError) -> crate::Error {
        from_session(e).on(self.name())
    }

    /// Runs one API operation under [`BuilderConfig::operation_deadline`], if any.
    pub(crate) async fn bounded<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let Some(deadline) = self.inner.config.operation_deadline else {
            return op.await;
        };
        match tokio::time::timeout(deadline, op).await {
            Ok(r) => r,
            Err(_) => Err(crate::Error::new(
                crate::ErrorKind::TimedOut,
                crate::Initiator::Caller,
                format!("{what} did not finish within its deadline of {deadline:?}"),
            )
            .hint("raise or remove `operation_deadline`; idle timeouts already catch a stalled builder")
            .on(self.name())),
        }
    }

    /// Protocol, version, remote Nix version and trust, from a (pooled) session.
    pub async fn remote_info(&self) -> Result<RemoteInfo> {
        self.bounded("remote_info", async {
            let mut s = self.acquire().await?;
            let info = s.get().conv.info();
            s.succeeded();
            Ok(info)
        })
        .await
    }

    /// Which of `paths` are valid on the builder. With `substitute`, the builder first tries
    /// to fetch missing ones from its own substituters (`builders-use-substitutes`), on both
    /// protocols.
    pub async fn query_valid_paths(
        &self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>> {
        self.bounded("query_valid_paths", async {
            let lead = || Lead::QueryValidPaths {
                paths: paths.clone(),
                substitute,
            };
            let mut s = self.acquire_leading(&lead).await?;
            let r = s
                .get()
                .conv
                .query_valid_paths(paths, substitute)
                .await
                .map_err(|e| self.err(e));
            if r.is_ok() {
                s.succeeded();
            }
            r
        })
        .await
    }

    /// Metadata of the valid ones among `paths`, in one round trip on both protocols (serve
    /// batches natively; worker requests are pipelined).
    pub async fn query_path_infos(&self, paths: &BTreeSet<StorePath>) -> Result<Vec<PathInfo>> {
        self.bounded("query_path_infos", async {
            let mut s = self.acquire().await?;
            let r = s
                .get()
                .conv
                .query_path_infos(paths)
                .await
                .map_err(|e| self.err(e));
            if r.is_ok() {
                s.succeeded();
            }
            r
        })
        .await
    }
}

/// A set of builders sharing connections: builders that reach the same host (say an `ssh://`
/// and an `ssh-ng://` line for one machine, or machines behind one jump host) use the same
/// pooled SSH connection.
pub struct Pool {
    registry: Arc<Registry>,
    builders: std::sync::Mutex<Vec<Builder>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        Pool {
            registry: Registry::new(),
            builders: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Adds a builder. Nothing connects until it is first used.
    pub fn add(&self, config: BuilderConfig) -> Builder {
        let b = Builder::new(config, &self.registry);
        if let Ok(mut v) = self.builders.lock() {
            v.push(b.clone());
        }
        b
    }

    /// Every builder added so far.
    pub fn builders(&self) -> Vec<Builder> {
        self.builders.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Removes `builder` from the pool: idle sessions close; sessions in use finish
    /// undisturbed (they hold what they need). A host that no builder uses any more is
    /// disconnected once nothing uses its connections. Returns false if it was not here.
    pub async fn remove(&self, builder: &Builder) -> bool {
        let removed = match self.builders.lock() {
            Ok(mut v) => {
                let before = v.len();
                v.retain(|b| !Arc::ptr_eq(&b.inner, &builder.inner));
                v.len() != before
            }
            Err(_) => false,
        };
        builder.close_idle();
        for set in self.registry.prune_unused() {
            set.disconnect_all().await;
        }
        removed
    }

    /// The builder to run a derivation for `system` requiring `features` on: one that can
    /// ever take it (its systems, supported and mandatory features, as Nix decides), with a
    /// free build slot if any has one, least loaded per speed factor first; a builder that is
    /// down only if no other can take it. When all are busy, the least loaded one is
    /// returned and the build waits for its slot (see `mux/src/select.rs` for the rule and
    /// where it differs from Nix's).
    ///
    /// # Errors
    /// [`crate::ErrorKind::NoSuitableBuilder`] when no builder of the pool can ever take it,
    /// with every builder's reason.
    pub fn select(
        &self,
        system: &str,
        features: &std::collections::BTreeSet<String>,
    ) -> Result<Builder> {
        let builders = self.builders();
        let stats: Vec<(BuilderStats, Health)> =
            builders.iter().map(|b| (b.stats(), b.health())).collect();
        let candidates: Vec<crate::select::Candidate<'_>> = builders
            .iter()
            .zip(&stats)
            .map(|(b, (st, h))| {
                let m = &b.inner.config.machine;
                crate::select::Candidate {
                    name: b.name(),
                    systems: &m.systems,
                    supported: &m.supported_features,
                    mandatory: &m.mandatory_features,
                    max_jobs: m.max_jobs,
                    speed_factor: m.speed_factor,
                    load: st.builds_running + st.builds_waiting,
                    down: h.state == crate::stats::HealthState::Down,
                }
            })
            .collect();
        match crate::select::choose(&candidates, system, features) {
            Ok(i) => Ok(builders[i].clone()),
            Err(reasons) => Err(crate::Error::new(
                crate::ErrorKind::NoSuitableBuilder,
                crate::Initiator::Caller,
                format!(
                    "no builder can build for {system}{}: {}",
                    if features.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " with {}",
                            features.iter().cloned().collect::<Vec<_>>().join(", ")
                        )
                    },
                    if reasons.is_empty() {
                        "the pool has no builders".to_owned()
                    } else {
                        reasons.join("; ")
                    }
                ),
            )
            .hint("add a builder for that system and those features to the machines file (fields 2, 6 and 7)")
            .retryable(false)),
        }
    }

    /// Replaces `old` with a builder for `config` (a machines-file reload that changed an
    /// entry): `old`'s idle sessions close, its running operations finish on what they hold,
    /// and new work goes to the returned builder. Connections stay shared when both reach
    /// the same host.
    pub async fn replace(&self, old: &Builder, config: BuilderConfig) -> Builder {
        let new = self.add(config);
        self.remove(old).await;
        new
    }

    /// Closes idle sessions and every connection.
    pub async fn shutdown(&self) {
        for b in self.builders() {
            b.close_idle();
        }
        for set in self.registry.all() {
            set.disconnect_all().await;
        }
    }
}
