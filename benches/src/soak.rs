//! The soak workload (issue 13): rig builders on both protocols run a random mix of query,
//! push, build, fetch and cancelled operations for a fixed time while faults come on a
//! schedule (sessions killed, sshd killed, the builder frozen and thawed, the builder
//! restarted). Every second it samples this process's RSS, open fds and tokio tasks and the
//! pool's channels, connections and sessions. At the end it checks that
//!
//! * every operation either succeeded or failed with a typed [`nixmux::Error`] (no panic,
//!   no operation hanging past a watchdog), and none failed while no fault was near it;
//! * every path pushed or fetched is valid and complete (`nix-store --verify-path`) on the
//!   side it went to if the operation succeeded, and absent or valid-and-complete if it was
//!   cancelled or failed: nothing partial is ever valid;
//! * RSS, fds and tasks stay flat after warm-up (the least-squares growth within a bound
//!   plus what the samples cannot tell from noise);
//! * no remote process (`nix-store --serve`, `nix-daemon --stdio`, sshd session processes)
//!   outlives the pool.
//!
//! [`run`] returns a [`SoakReport`] (the JSON schema of `nixmux bench --workload soak
//! --json`), and [`chart`] draws RSS, fds and operations over time as SVG.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use nixmux::local::{LocalStore, LocalStoreAccess};
use nixmux::ops::BuildOptions;
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::transport::{Endpoint, HostKeyCheck, Identity, TransportConfig};
use nixmux::{Builder, BuilderConfig, ConnectTarget, Pool, Protocol, log_channel};
use nixmux_rig::{Rig, RigConfig};
use serde::{Deserialize, Serialize};

use crate::env::{Rng, store_path};
use crate::runner::{Event, Progress};

/// Version of the soak report schema. 1: first version.
pub const SOAK_SCHEMA_VERSION: u32 = 1;

/// How to soak.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// How long operations run (set-up and the final checks come on top).
    pub duration: Duration,
    /// Time between the end of one fault and the start of the next.
    pub fault_every: Duration,
    /// Operations in flight at once.
    pub concurrency: usize,
    /// Rig builders (each is used over both protocols).
    pub builders: usize,
}

impl SoakOptions {
    /// Defaults for a run of `duration`: a fault every 20 s (every 8 s below 2 minutes, so
    /// a CI run sees each kind), 3 operations at once, 2 builders.
    pub fn new(duration: Duration) -> Self {
        SoakOptions {
            duration,
            fault_every: if duration < Duration::from_secs(120) {
                Duration::from_secs(8)
            } else {
                Duration::from_secs(20)
            },
            concurrency: 3,
            builders: 2,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Report schema
// ---------------------------------------------------------------------------------------

/// What `nixmux bench --workload soak --json FILE` writes. Durations and times are seconds
/// (times since the start of the operation phase), sizes bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakReport {
    /// [`SOAK_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Version of the nixmux that ran.
    pub nixmux_version: String,
    /// Start, seconds since the Unix epoch.
    pub started_unix: u64,
    /// Settings of the run.
    pub settings: SoakSettings,
    /// Machine and load.
    pub environment: SoakEnvironment,
    /// Length of the operation phase, seconds.
    pub ops_phase_s: f64,
    /// Wall time of everything (rig start, fixtures, checks), seconds.
    pub total_s: f64,
    /// Per operation kind (`query`, `push`, `build`, `fetch`, `cancel-push`, ...).
    pub operations: BTreeMap<String, OpTotals>,
    /// All operations together.
    pub totals: OpTotals,
    /// Pool counters summed over every builder handle, at the end of the operation phase.
    pub pool: PoolTotals,
    /// The faults injected, in order.
    pub faults: Vec<FaultRecord>,
    /// One sample per second.
    pub samples: Vec<SoakSample>,
    /// Slopes of RSS, fds and tasks after warm-up.
    pub flatness: Vec<Flatness>,
    /// The paths pushed and fetched, checked at the end.
    pub paths: PathChecks,
    /// Remote processes still running after the pool shut down, per builder.
    pub leaked_remote_processes: BTreeMap<String, Vec<String>>,
    /// Up to 20 failed operations that overlapped no fault window (with their errors).
    pub unexplained_failures: Vec<String>,
    /// Up to 5 example messages per error kind.
    pub error_examples: BTreeMap<String, Vec<String>>,
    /// Fixture preparations that failed (operations skipped; not operations themselves).
    pub fixture_failures: u64,
    /// The verdicts.
    pub checks: Vec<Check>,
    /// Whether every check passed.
    pub passed: bool,
}

/// Settings of a soak run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakSettings {
    /// Requested length of the operation phase, seconds.
    pub duration_s: f64,
    /// Pause between faults, seconds.
    pub fault_every_s: f64,
    /// Operations at once.
    pub concurrency: usize,
    /// Rig builders.
    pub builders: usize,
    /// Seconds at the start of the operation phase left out of the slope fits: 20 %, at
    /// least 30 s (half of a shorter run).
    pub warmup_s: f64,
    /// How long an operation may run before it counts as hung, seconds.
    pub watchdog_s: f64,
    /// A failure within this many seconds after a fault ended is blamed on it.
    pub fault_grace_s: f64,
}

/// Where the soak ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakEnvironment {
    /// Logical CPUs.
    pub cpus: usize,
    /// Load averages at the start.
    pub load_before: [f64; 3],
    /// Load averages at the end.
    pub load_after: [f64; 3],
    /// Kernel release.
    pub kernel: String,
}

/// Outcomes of a set of operations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpTotals {
    /// Started.
    pub started: u64,
    /// Succeeded.
    pub ok: u64,
    /// Failed with a typed error, by [`nixmux::ErrorKind`] (its display form).
    pub failed: BTreeMap<String, u64>,
    /// Dropped by the soak mid-way (cancel operations whose bound expired).
    pub cancelled: u64,
    /// Still running at the watchdog: counted as untyped failures.
    pub hung: u64,
    /// Panicked: counted as untyped failures.
    pub panicked: u64,
    /// Builds that ran and reported a failed status (a result, not an error).
    pub build_failures: u64,
}

impl OpTotals {
    fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    fn add(&mut self, o: &OpTotals) {
        self.started += o.started;
        self.ok += o.ok;
        for (k, v) in &o.failed {
            *self.failed.entry(k.clone()).or_default() += v;
        }
        self.cancelled += o.cancelled;
        self.hung += o.hung;
        self.panicked += o.panicked;
        self.build_failures += o.build_failures;
    }
}

/// Pool counters ([`nixmux::BuilderStats`]) summed over the builder handles.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolTotals {
    /// Protocol sessions opened (channel + handshake).
    pub sessions_created: u64,
    /// Sessions closed as broken, poisoned or cancelled.
    pub sessions_discarded: u64,
    /// Sessions closed for idleness.
    pub sessions_expired: u64,
    /// SSH connections opened (per host, not per handle).
    pub connections_opened: u64,
    /// Connections lost to faults.
    pub connections_lost: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Session channels opened.
    pub channels_opened: u64,
    /// Acquires that timed out.
    pub acquire_timeouts: u64,
    /// Payload bytes received.
    pub bytes_in: u64,
    /// Payload bytes sent.
    pub bytes_out: u64,
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// `kill-sessions`, `kill-sshd`, `freeze`, `restart`.
    pub kind: String,
    /// Which builder.
    pub builder: String,
    /// Start, seconds into the operation phase.
    pub start_s: f64,
    /// End (the builder serves again), seconds.
    pub end_s: f64,
    /// Why the fault control failed, if it did.
    pub error: Option<String>,
}

/// One sample of the process and the pool.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SoakSample {
    /// Seconds into the operation phase.
    pub t: f64,
    /// Resident set size, bytes (`VmRSS`).
    pub rss: u64,
    /// Open file descriptors of this process.
    pub fds: u64,
    /// Alive tokio tasks.
    pub tasks: u64,
    /// Session channels open (per host, counted until sshd closed them).
    pub channels: u64,
    /// Live SSH connections.
    pub connections: u64,
    /// Protocol sessions now (idle + busy).
    pub sessions: u64,
    /// Sessions created so far.
    pub sessions_created: u64,
    /// Operations finished so far (all outcomes).
    pub ops_done: u64,
    /// Of those, not successful (failed, cancelled, hung).
    pub ops_not_ok: u64,
}

/// A least-squares line through one figure's samples after warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flatness {
    /// `rss_bytes`, `fds`, `tasks`.
    pub figure: String,
    /// Samples fitted.
    pub samples: usize,
    /// Time span fitted, seconds.
    pub span_s: f64,
    /// Slope, units per second.
    pub slope_per_s: f64,
    /// Slope × span: the growth the line shows over the fitted span.
    pub growth: f64,
    /// Slope × 3600.
    pub growth_per_hour: f64,
    /// Largest accepted growth over the span, before noise.
    pub bound: f64,
    /// Two standard errors of `growth`, widened for the autocorrelation of the samples
    /// (see [`trend`]): what the line's tilt may be by chance. Large for short fits (a
    /// 30 s window of step-shaped fd counts), small for an hour.
    #[serde(default)]
    pub noise: f64,
    /// Lag-1 autocorrelation of the residuals, clamped to 0..0.99.
    #[serde(default)]
    pub autocorrelation: f64,
    /// Mean of the fitted samples.
    pub mean: f64,
    /// Smallest and largest fitted sample.
    pub min: f64,
    /// Largest fitted sample.
    pub max: f64,
    /// `growth <= bound + noise`: no growth beyond the bound that the samples can tell
    /// from chance.
    pub ok: bool,
}

/// The paths moved during the soak, checked at the end in the store they went to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PathChecks {
    /// Paths whose transfer (or build) succeeded.
    pub succeeded: u64,
    /// Of those, valid and verified.
    pub succeeded_valid: u64,
    /// Paths whose operation was cancelled or failed.
    pub interrupted: u64,
    /// Of those, absent.
    pub interrupted_absent: u64,
    /// Of those, valid and verified (the transfer had completed).
    pub interrupted_valid: u64,
    /// Succeeded but not valid, or valid but failing `--verify-path` (must be empty).
    pub bad: Vec<String>,
}

/// One verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// The figures behind it.
    pub detail: String,
}

impl SoakReport {
    /// Parses a report.
    ///
    /// # Errors
    /// Malformed JSON or another shape.
    pub fn from_json(text: &str) -> serde_json::Result<SoakReport> {
        serde_json::from_str(text)
    }

    /// Pretty JSON.
    ///
    /// # Errors
    /// Only if serialisation fails (it does not for these types).
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }
}

// ---------------------------------------------------------------------------------------
// Bounds
// ---------------------------------------------------------------------------------------

/// Share of the operation phase left out of slope fits: connections, pools, allocator
/// arenas and the local store's sessions reach their working size in the first minutes.
const WARMUP_FRACTION: f64 = 0.2;
/// ... but at least this much (or half of a shorter run): in a 60 s run, 12 s are not
/// enough for every fault kind and every operation kind to have grown its buffers once.
const WARMUP_MIN: Duration = Duration::from_secs(30);

/// The warm-up of an operation phase of `phase_s` seconds.
pub fn warmup_s(phase_s: f64) -> f64 {
    (phase_s * WARMUP_FRACTION).max(WARMUP_MIN.as_secs_f64().min(phase_s * 0.5))
}
/// An operation running this long is hung: every wait in nixmux is bounded well below it
/// with the timeouts set in [`builder_config`] (keepalive 6 s, handshake 10 s, idle 15 s,
/// acquire 30 s while nothing moves).
const WATCHDOG: Duration = Duration::from_secs(120);
/// A failure ending this soon after a fault ended is the fault's: the connection's backoff
/// (at most 2 s here) and sshd's start-up follow it.
const FAULT_GRACE: Duration = Duration::from_secs(5);
/// RSS may grow at most this much over the fitted span: 10 MiB, the growth per hour the
/// issue accepts, is also far above what a leak of one session's buffers (a few KiB each,
/// thousands of sessions an hour) would add, and above glibc's arena noise measured here.
const RSS_BOUND: f64 = 10.0 * 1048576.0;
/// fds may grow at most this much over the fitted span: each connection is one socket and
/// each local store session three pipes, so a handful covers in-flight work at either end
/// of the fit; a leak of one fd per session would be thousands.
const FD_BOUND: f64 = 5.0;
/// Tasks: every session has a few (channel drain, stderr), and a few operations are in
/// flight at either end of the fit.
const TASK_BOUND: f64 = 20.0;

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// The fault kinds, in the order they come round.
const FAULTS: [&str; 4] = ["kill-sessions", "kill-sshd", "freeze", "restart"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Query,
    Push,
    Build,
    Fetch,
    CancelPush,
    CancelBuild,
    CancelFetch,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::Query => "query",
            OpKind::Push => "push",
            OpKind::Build => "build",
            OpKind::Fetch => "fetch",
            OpKind::CancelPush => "cancel-push",
            OpKind::CancelBuild => "cancel-build",
            OpKind::CancelFetch => "cancel-fetch",
        }
    }

    fn pick(rng: &mut Rng) -> OpKind {
        match rng.next_u64() % 100 {
            0..35 => OpKind::Query,
            35..55 => OpKind::Push,
            55..68 => OpKind::Build,
            68..82 => OpKind::Fetch,
            82..89 => OpKind::CancelPush,
            89..94 => OpKind::CancelBuild,
            _ => OpKind::CancelFetch,
        }
    }
}

/// One builder handle: rig builder `index` over one of the two protocols.
struct Handle {
    index: usize,
    b: Builder,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    end: Option<Instant>,
}

/// What the workers share.
struct Shared {
    rig: Arc<Rig>,
    local: Arc<LocalStore>,
    handles: Vec<Handle>,
    t0: Instant,
    /// Per builder: held while a fault is applied or the builder's store is written
    /// directly (fixtures), so the two never overlap.
    control: Vec<tokio::sync::Mutex<()>>,
    windows: Mutex<Vec<Window>>,
    totals: Mutex<BTreeMap<&'static str, OpTotals>>,
    unexplained: Mutex<Vec<String>>,
    examples: Mutex<BTreeMap<String, Vec<String>>>,
    done: AtomicU64,
    not_ok: AtomicU64,
    fixture_failures: AtomicU64,
    /// Paths moved: `dest\toutcome\tpath` lines (kept on disk: an hour of them in memory
    /// would show up in the RSS being measured).
    ledger: Mutex<std::fs::File>,
    /// Per builder: the last path pushed there successfully, for query consistency.
    last_pushed: Mutex<Vec<Option<StorePath>>>,
    inconsistent: Mutex<Vec<String>>,
    client_paths: tokio::sync::Mutex<VecDeque<StorePath>>,
    builder_paths: Vec<tokio::sync::Mutex<VecDeque<StorePath>>>,
    drvs: tokio::sync::Mutex<VecDeque<StorePath>>,
    scratch: PathBuf,
    seq: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn now_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn record_path(&self, dest: &str, ok: bool, path: &StorePath) {
        let line = format!(
            "{dest}\t{}\t{}\n",
            if ok { "ok" } else { "interrupted" },
            path.to_absolute(&StoreDir::default())
        );
        if let Ok(mut f) = self.ledger.lock() {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// Whether `[start, end]` overlaps a fault window widened by [`FAULT_GRACE`].
    fn near_fault(&self, start: Instant, end: Instant) -> bool {
        let Ok(w) = self.windows.lock() else {
            return true;
        };
        w.iter().any(|f| {
            let fe = f.end.map(|e| e + FAULT_GRACE);
            f.start <= end && fe.is_none_or(|fe| fe >= start)
        })
    }

    fn random_files(&self, rng: &mut Rng, n: usize) -> anyhow::Result<Vec<PathBuf>> {
        let mut files = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.seq.fetch_add(1, Ordering::Relaxed);
            let p = self.scratch.join(format!("soak-{k}"));
            // Mostly small paths; some of 0.25 to 1.5 MiB, so that a cancel lands mid-NAR.
            let len = if below(rng, 4) == 0 {
                262_144 + below(rng, 1_310_720)
            } else {
                1024 + below(rng, 32_768)
            };
            std::fs::write(&p, rng.bytes(len)).with_context(|| format!("{}", p.display()))?;
            files.push(p);
        }
        Ok(files)
    }

    /// A path of the client store not yet on any builder.
    async fn client_path(&self, rng: &mut Rng) -> anyhow::Result<StorePath> {
        let mut q = self.client_paths.lock().await;
        if q.is_empty() {
            let files = self.random_files(rng, 12)?;
            let rig = self.rig.clone();
            let out =
                add_files(move |args| rig.client_store().run("nix-store", args), files).await?;
            q.extend(out);
        }
        q.pop_front().ok_or_else(|| anyhow!("no client path"))
    }

    /// A path valid only on builder `i` (added to its store directly).
    async fn builder_path(&self, i: usize, rng: &mut Rng) -> anyhow::Result<StorePath> {
        let mut q = self.builder_paths[i].lock().await;
        if q.is_empty() {
            let files = self.random_files(rng, 8)?;
            let _ctl = self.control[i].lock().await;
            let rig = self.rig.clone();
            let out = add_files(
                move |args| rig.builder(i).store().run("nix-store", args),
                files,
            )
            .await?;
            q.extend(out);
        }
        q.pop_front().ok_or_else(|| anyhow!("no builder path"))
    }

    /// A derivation of the client store, unique to the run.
    async fn drv(&self, rng: &mut Rng) -> anyhow::Result<StorePath> {
        let mut q = self.drvs.lock().await;
        if q.is_empty() {
            let salt = format!(
                "{}-{}-{}",
                std::process::id(),
                self.seq.fetch_add(1, Ordering::Relaxed),
                rng.next_u64()
            );
            let file = self.scratch.join(format!("soak-{salt}.nix"));
            std::fs::write(
                &file,
                format!(
                    r#"builtins.genList (i: derivation {{
  name = "soak-${{toString i}}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo {salt} ${{toString i}} > $out" ];
}}) 12
"#
                ),
            )?;
            let rig = self.rig.clone();
            let f = file.clone();
            let out = tokio::task::spawn_blocking(move || {
                rig.client_store().run("nix-instantiate", [f.as_os_str()])
            })
            .await?
            .map_err(|e| anyhow!("{e}"))?;
            let _ = std::fs::remove_file(&file);
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                if !l.trim().is_empty() {
                    q.push_back(store_path(l)?);
                }
            }
        }
        q.pop_front().ok_or_else(|| anyhow!("no derivation"))
    }
}

/// `nix-store --add files...` through `run` (off the async workers); removes the files.
async fn add_files<F>(run: F, files: Vec<PathBuf>) -> anyhow::Result<Vec<StorePath>>
where
    F: FnOnce(Vec<OsString>) -> nixmux_rig::Result<std::process::Output> + Send + 'static,
{
    let mut args: Vec<OsString> = vec!["--add".into()];
    args.extend(files.iter().map(|f| f.clone().into_os_string()));
    let out = tokio::task::spawn_blocking(move || run(args)).await?;
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    let out = out.map_err(|e| anyhow!("{e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(store_path)
        .collect()
}

/// nixmux's configuration for rig builder `i`: timeouts short enough that a fault fails an
/// operation within seconds, and idle sessions closed after 2 s so that sessions churn.
fn builder_config(rig: &Rig, i: usize, protocol: Protocol) -> BuilderConfig {
    let mut transport = TransportConfig::default();
    // Short enough that a fault fails an operation within seconds, long enough that a
    // loaded 2-core machine (CI runs other rig tests beside this one) never trips them
    // without a fault.
    transport.tcp_connect_timeout = Duration::from_secs(10);
    transport.handshake_timeout = Duration::from_secs(10);
    transport.auth_timeout = Duration::from_secs(10);
    transport.channel_open_timeout = Duration::from_secs(10);
    transport.exec_timeout = Duration::from_secs(10);
    // A frozen builder is noticed within 2 s × (2 + 1).
    transport.keepalive_interval = Some(Duration::from_secs(2));
    transport.keepalive_max_misses = 2;
    let target = ConnectTarget {
        endpoint: Endpoint::new("127.0.0.1", rig.builder(i).port(), "root"),
        identities: vec![Identity::key_file(rig.client_key())],
        host_keys: HostKeyCheck::strict([rig.known_hosts()]),
        transport,
        jump: None,
        hooks: Default::default(),
    };
    let mut c = BuilderConfig::new(
        format!("{}://builder{i}", protocol.scheme()),
        protocol,
        target,
    );
    c.session.idle_timeout = Duration::from_secs(15);
    c.pool.max_idle = Duration::from_secs(2);
    c.pool.acquire_timeout = Duration::from_secs(30);
    c.pool.max_sessions = 8;
    c.connections.initial_backoff = Duration::from_millis(200);
    c.connections.max_backoff = Duration::from_secs(2);
    c.machine.max_jobs = 4;
    c
}

enum Outcome {
    Ok,
    BuildFailed,
    Failed(nixmux::Error),
    Cancelled,
    Skipped,
}

/// One operation. Paths it moves go into the ledger with their outcome.
async fn op(s: &Shared, kind: OpKind, h: &Handle, rng: &mut Rng) -> Outcome {
    let dest = format!("builder{}", h.index);
    // A cancel drops the operation's future after 5 to 400 ms: before, during or after the
    // transfer, depending on luck and the machine's load.
    let bound = Duration::from_millis(5 + rng.next_u64() % 396);
    match kind {
        OpKind::Query => {
            let mut paths: BTreeSet<StorePath> = crate::peers::synthetic_paths(8)
                .map(|v| v.into_iter().collect())
                .unwrap_or_default();
            let known = s
                .last_pushed
                .lock()
                .ok()
                .and_then(|v| v.get(h.index).cloned().flatten());
            if let Some(k) = &known {
                paths.insert(k.clone());
            }
            match h.b.query_valid_paths(&paths, false).await {
                Ok(valid) => {
                    if let Some(k) = known
                        && !valid.contains(&k)
                        && let Ok(mut v) = s.inconsistent.lock()
                        && v.len() < 20
                    {
                        v.push(format!("{dest} does not report {k} valid after a push"));
                    }
                    Outcome::Ok
                }
                Err(e) => Outcome::Failed(e),
            }
        }
        OpKind::Push | OpKind::CancelPush => {
            let p = match s.client_path(rng).await {
                Ok(p) => p,
                Err(e) => return fixture_failed(s, e),
            };
            let roots: BTreeSet<StorePath> = [p.clone()].into();
            let fut = h.b.push_closure(&s.local, &roots, false, None);
            let r = if kind == OpKind::CancelPush {
                tokio::time::timeout(bound, fut).await.ok()
            } else {
                Some(fut.await)
            };
            match r {
                Some(Ok(_)) => {
                    s.record_path(&dest, true, &p);
                    if let Ok(mut v) = s.last_pushed.lock()
                        && let Some(slot) = v.get_mut(h.index)
                    {
                        *slot = Some(p);
                    }
                    Outcome::Ok
                }
                Some(Err(e)) => {
                    s.record_path(&dest, false, &p);
                    Outcome::Failed(e)
                }
                None => {
                    s.record_path(&dest, false, &p);
                    Outcome::Cancelled
                }
            }
        }
        OpKind::Fetch | OpKind::CancelFetch => {
            let p = match s.builder_path(h.index, rng).await {
                Ok(p) => p,
                Err(e) => return fixture_failed(s, e),
            };
            let paths: BTreeSet<StorePath> = [p.clone()].into();
            let fut = h.b.fetch_outputs(&s.local, &paths, None);
            let r = if kind == OpKind::CancelFetch {
                tokio::time::timeout(bound, fut).await.ok()
            } else {
                Some(fut.await)
            };
            s.record_path("client", matches!(r, Some(Ok(_))), &p);
            match r {
                Some(Ok(_)) => Outcome::Ok,
                Some(Err(e)) => Outcome::Failed(e),
                None => Outcome::Cancelled,
            }
        }
        OpKind::Build | OpKind::CancelBuild => {
            let drv = match s.drv(rng).await {
                Ok(d) => d,
                Err(e) => return fixture_failed(s, e),
            };
            let outputs: BTreeSet<StorePath> = match s.local.read_derivation(&drv).await {
                Ok(d) => d.outputs.values().filter_map(|o| o.path.clone()).collect(),
                Err(e) => return Outcome::Failed(e),
            };
            let (logs, mut stream) = log_channel(256);
            // Drain the log as a scheduler would.
            let drain = tokio::spawn(async move { while stream.recv().await.is_some() {} });
            let fut = async {
                let outcome =
                    h.b.build(&s.local, &drv, &BuildOptions::default(), &logs)
                        .await?;
                drop(logs);
                if !outcome.result.status.is_success() {
                    return Ok(false);
                }
                for o in &outputs {
                    s.record_path(&dest, true, o);
                }
                h.b.fetch_outputs(&s.local, &outputs, None).await?;
                Ok::<bool, nixmux::Error>(true)
            };
            let r = if kind == OpKind::CancelBuild {
                tokio::time::timeout(bound, fut).await.ok()
            } else {
                Some(fut.await)
            };
            drain.abort();
            let fetched = matches!(r, Some(Ok(true)));
            for o in &outputs {
                s.record_path("client", fetched, o);
                if !fetched {
                    // An interrupted build must not leave a half-written output valid on
                    // the builder either.
                    s.record_path(&dest, false, o);
                }
            }
            match r {
                Some(Ok(true)) => Outcome::Ok,
                Some(Ok(false)) => Outcome::BuildFailed,
                Some(Err(e)) => Outcome::Failed(e),
                None => Outcome::Cancelled,
            }
        }
    }
}

fn fixture_failed(s: &Shared, e: anyhow::Error) -> Outcome {
    s.fixture_failures.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("soak fixture: {e:#}");
    Outcome::Skipped
}

/// A number in `0..n` (`n` > 0).
fn below(rng: &mut Rng, n: usize) -> usize {
    usize::try_from(rng.next_u64() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
}

async fn worker(s: Arc<Shared>, end: Instant) {
    let mut rng = Rng::seeded();
    // Different workers, different streams.
    for _ in 0..(s.seq.fetch_add(1, Ordering::Relaxed) % 17) {
        rng.next_u64();
    }
    while Instant::now() < end && !s.stop.load(Ordering::Relaxed) {
        let kind = OpKind::pick(&mut rng);
        let hi = below(&mut rng, s.handles.len());
        let h = &s.handles[hi];
        let start = Instant::now();
        let s2 = s.clone();
        let mut r2 = Rng::seeded();
        for _ in 0..(rng.next_u64() % 7) {
            r2.next_u64();
        }
        // Its own task: a panic is caught and counted, not fatal to the soak.
        let task = tokio::spawn(async move {
            let h = &s2.handles[hi];
            op(&s2, kind, h, &mut r2).await
        });
        let abort = task.abort_handle();
        let res = tokio::time::timeout(WATCHDOG, task).await;
        let end_op = Instant::now();
        let name = kind.name();
        // Think time: keeps the load modest on a shared machine (a few operations a second
        // per worker) while sessions still churn by thousands an hour.
        let mut pause = Duration::from_millis(50 + rng.next_u64() % 150);
        let mut t = OpTotals::default();
        let mut not_ok = true;
        match res {
            Err(_) => {
                abort.abort();
                t.hung = 1;
                push_unexplained(
                    &s,
                    format!("{name} on {} hung past {WATCHDOG:?}", h.b.name()),
                );
            }
            Ok(Err(j)) => {
                t.panicked = 1;
                push_unexplained(&s, format!("{name} on {} panicked: {j}", h.b.name()));
            }
            Ok(Ok(Outcome::Skipped)) => {
                not_ok = false;
                pause = Duration::from_millis(500);
            }
            Ok(Ok(Outcome::Ok)) => {
                t.ok = 1;
                not_ok = false;
            }
            Ok(Ok(Outcome::BuildFailed)) => {
                t.build_failures = 1;
                if !s.near_fault(start, end_op) {
                    push_unexplained(&s, format!("{name} on {}: the build failed", h.b.name()));
                }
            }
            Ok(Ok(Outcome::Cancelled)) => t.cancelled = 1,
            Ok(Ok(Outcome::Failed(e))) => {
                let kind = e.kind().to_string();
                t.failed.insert(kind.clone(), 1);
                if let Ok(mut ex) = s.examples.lock() {
                    let v = ex.entry(kind).or_default();
                    if v.len() < 5 {
                        v.push(format!("{:.1}s {name}: {e}", s.now_s()));
                    }
                }
                if !s.near_fault(start, end_op) {
                    push_unexplained(
                        &s,
                        format!(
                            "{:.1}s..{:.1}s {name} on {}: {e}",
                            start.duration_since(s.t0).as_secs_f64(),
                            s.now_s(),
                            h.b.name()
                        ),
                    );
                }
                // Do not spin against a builder that is down.
                pause = Duration::from_millis(300);
            }
        }
        t.started = 1;
        if let Ok(mut all) = s.totals.lock() {
            all.entry(name).or_default().add(&t);
        }
        s.done.fetch_add(1, Ordering::Relaxed);
        if not_ok {
            s.not_ok.fetch_add(1, Ordering::Relaxed);
        }
        // Churn: a third of the time, close this builder's idle sessions, as a scheduler
        // that goes quiet would see them expire.
        if below(&mut rng, 3) == 0 {
            h.b.close_idle();
        }
        tokio::time::sleep(pause).await;
    }
}

fn push_unexplained(s: &Shared, msg: String) {
    if let Ok(mut v) = s.unexplained.lock() {
        if v.len() < 20 {
            v.push(msg);
        } else if v.len() == 20 {
            v.push("(more left out)".into());
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> nixmux_rig::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

async fn faults(s: Arc<Shared>, every: Duration, end: Instant, log: Arc<Mutex<Vec<FaultRecord>>>) {
    let n = s.rig.builders().len();
    let mut k = 0usize;
    loop {
        tokio::time::sleep(every).await;
        // Leave the last seconds fault-free so that the end state is a healthy builder.
        if Instant::now() + Duration::from_secs(8) >= end || s.stop.load(Ordering::Relaxed) {
            return;
        }
        // Every kind in the first four faults; over eight, every builder gets every kind.
        let kind = FAULTS[k % FAULTS.len()];
        let i = (k / FAULTS.len() + k) % n;
        k += 1;
        let _ctl = s.control[i].lock().await;
        let start = Instant::now();
        let idx = s.windows.lock().map_or(0, |mut w| {
            w.push(Window { start, end: None });
            w.len() - 1
        });
        let rig = s.rig.clone();
        let r = match kind {
            "kill-sessions" => blocking(move || rig.builder(i).kill_sessions().map(drop)).await,
            "kill-sshd" => {
                let r2 = rig.clone();
                match blocking(move || r2.builder(i).stop_sshd()).await {
                    Ok(()) => {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        blocking(move || rig.builder(i).start_sshd()).await
                    }
                    Err(e) => Err(e),
                }
            }
            "freeze" => {
                let r2 = rig.clone();
                match blocking(move || r2.builder(i).freeze()).await {
                    Ok(()) => {
                        // Longer than the keepalive bound (6 s): connections are declared
                        // dead while the builder is still frozen.
                        tokio::time::sleep(Duration::from_secs(8)).await;
                        blocking(move || rig.builder(i).thaw()).await
                    }
                    Err(e) => Err(e),
                }
            }
            _ => {
                let r2 = rig.clone();
                match blocking(move || r2.builder(i).stop_sshd()).await {
                    Ok(()) => blocking(move || rig.builder(i).start_sshd()).await,
                    Err(e) => Err(e),
                }
            }
        };
        let stop = Instant::now();
        if let Ok(mut w) = s.windows.lock()
            && let Some(x) = w.get_mut(idx)
        {
            x.end = Some(stop);
        }
        if let Ok(mut l) = log.lock() {
            l.push(FaultRecord {
                kind: kind.to_owned(),
                builder: format!("builder{i}"),
                start_s: start.duration_since(s.t0).as_secs_f64(),
                end_s: stop.duration_since(s.t0).as_secs_f64(),
                error: r.err(),
            });
        }
    }
}

fn fd_count() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

fn sample(s: &Shared) -> SoakSample {
    let (mut channels, mut connections) = (0u64, 0u64);
    let mut seen = BTreeSet::new();
    let (mut sessions, mut created) = (0u64, 0u64);
    for h in &s.handles {
        // Handles of one rig builder share its connections: count them once.
        if seen.insert(h.index) {
            let hl = h.b.health();
            channels += hl.channels_open as u64;
            connections += hl.connections as u64;
        }
        let st = h.b.stats();
        sessions += (st.idle_sessions + st.busy_sessions) as u64;
        created += st.sessions_created;
    }
    SoakSample {
        t: s.now_s(),
        rss: crate::stats::current_rss().unwrap_or(0),
        fds: fd_count(),
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as u64,
        channels,
        connections,
        sessions,
        sessions_created: created,
        ops_done: s.done.load(Ordering::Relaxed),
        ops_not_ok: s.not_ok.load(Ordering::Relaxed),
    }
}

/// Runs the soak on freshly started rig builders and returns the report (whose
/// [`SoakReport::passed`] says whether every check held).
///
/// # Errors
/// The rig cannot start or the client-side set-up fails. Failures during the soak are
/// findings, recorded in the report.
pub async fn run(opts: SoakOptions, progress: &dyn Progress) -> anyhow::Result<SoakReport> {
    let begin = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let load_before = crate::stats::load_average();
    let nb = opts.builders.max(1);
    progress.event(&Event::Note(format!(
        "soak: starting {nb} local rig builders"
    )));
    let rig = tokio::task::spawn_blocking(move || {
        nixmux_rig::ensure_peers_installed()?;
        Rig::start(RigConfig {
            max_jobs: 4,
            log_level: "INFO".into(),
            ..RigConfig::with_builders(nb)
        })
    })
    .await
    .context("starting the rig")?
    .context("starting local rig builders")?;
    let rig = Arc::new(rig);
    let scratch = tempfile::Builder::new()
        .prefix("nixmux-soak-")
        .tempdir()
        .context("scratch directory")?;
    let r = rig.clone();
    let files = r.client_store().store_dir();
    let local = Arc::new(
        LocalStore::new(LocalStoreAccess::Command(Arc::new(move || {
            tokio::process::Command::from(r.client_store().command("nix-daemon", ["--stdio"]))
        })))
        .with_store_files(Some(files)),
    );
    let pool = Pool::new();
    let mut handles = Vec::new();
    for i in 0..nb {
        for p in [Protocol::Worker, Protocol::Serve] {
            handles.push(Handle {
                index: i,
                b: pool.add(builder_config(&rig, i, p)),
            });
        }
    }
    let ledger_path = scratch.path().join("ledger.tsv");
    let ledger = std::fs::File::create(&ledger_path).context("ledger")?;
    let shared = Arc::new(Shared {
        rig: rig.clone(),
        local: local.clone(),
        handles,
        t0: Instant::now(),
        control: (0..nb).map(|_| tokio::sync::Mutex::new(())).collect(),
        windows: Mutex::new(Vec::new()),
        totals: Mutex::new(BTreeMap::new()),
        unexplained: Mutex::new(Vec::new()),
        examples: Mutex::new(BTreeMap::new()),
        done: AtomicU64::new(0),
        not_ok: AtomicU64::new(0),
        fixture_failures: AtomicU64::new(0),
        ledger: Mutex::new(ledger),
        last_pushed: Mutex::new(vec![None; nb]),
        inconsistent: Mutex::new(Vec::new()),
        client_paths: tokio::sync::Mutex::new(VecDeque::new()),
        builder_paths: (0..nb)
            .map(|_| tokio::sync::Mutex::new(VecDeque::new()))
            .collect(),
        drvs: tokio::sync::Mutex::new(VecDeque::new()),
        scratch: scratch.path().to_owned(),
        seq: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    // t0 is the start of the operation phase.
    let t0 = shared.t0;
    let end = t0 + opts.duration;
    progress.event(&Event::Note(format!(
        "soak: {} s of operations, {} at once, a fault every {} s",
        opts.duration.as_secs(),
        opts.concurrency,
        opts.fault_every.as_secs()
    )));

    let samples = Arc::new(Mutex::new(Vec::<SoakSample>::new()));
    let sampler = {
        let s = shared.clone();
        let samples = samples.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_note = Instant::now();
            while Instant::now() < end {
                tick.tick().await;
                let x = sample(&s);
                if let Ok(mut v) = samples.lock() {
                    v.push(x);
                }
                if last_note.elapsed() >= Duration::from_secs(30) {
                    last_note = Instant::now();
                    tracing::info!(
                        "soak {:.0} s: {} ops ({} not ok), {} sessions, RSS {:.1} MiB, {} fds, {} tasks",
                        x.t,
                        x.ops_done,
                        x.ops_not_ok,
                        x.sessions_created,
                        x.rss as f64 / 1048576.0,
                        x.fds,
                        x.tasks
                    );
                    eprintln!(
                        "nixmux bench: soak {:.0} s: {} ops ({} not ok), {} sessions created, RSS {:.1} MiB, {} fds, {} tasks",
                        x.t,
                        x.ops_done,
                        x.ops_not_ok,
                        x.sessions_created,
                        x.rss as f64 / 1048576.0,
                        x.fds,
                        x.tasks
                    );
                }
            }
        })
    };
    let fault_log = Arc::new(Mutex::new(Vec::new()));
    let fault_task = tokio::spawn(faults(
        shared.clone(),
        opts.fault_every,
        end,
        fault_log.clone(),
    ));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency.max(1) {
        workers.spawn(worker(shared.clone(), end));
    }
    // The workers end at `end` plus at most one operation (bounded by the watchdog).
    while workers.join_next().await.is_some() {}
    shared.stop.store(true, Ordering::Relaxed);
    let _ = fault_task.await;
    let _ = sampler.await;
    let ops_phase_s = shared.now_s();

    // Pool totals before shutting down.
    let mut pool_totals = PoolTotals::default();
    let mut seen = BTreeSet::new();
    for h in &shared.handles {
        let st = h.b.stats();
        pool_totals.sessions_created += st.sessions_created;
        pool_totals.sessions_discarded += st.sessions_discarded;
        pool_totals.sessions_expired += st.sessions_expired;
        pool_totals.acquire_timeouts += st.acquire_timeouts;
        if seen.insert(h.index) {
            // Connection counters belong to the host's connection set, shared by handles.
            pool_totals.connections_opened += st.connections_opened;
            pool_totals.connections_lost += st.connections_lost;
            pool_totals.connect_failures += st.connect_failures;
            pool_totals.channels_opened += st.channels_opened;
            pool_totals.bytes_in += st.bytes_in;
            pool_totals.bytes_out += st.bytes_out;
        }
    }
    progress.event(&Event::Note(
        "soak: operations done; shutting the pool down and checking".into(),
    ));
    pool.shutdown().await;
    // Builders must serve for the checks (a fault control may have failed half-way).
    for i in 0..nb {
        let r = rig.clone();
        let _ = blocking(move || r.builder(i).thaw()).await;
        let r = rig.clone();
        let _ = blocking(move || r.builder(i).start_sshd()).await;
    }
    let leaks = remote_leaks(&rig).await;
    let paths = check_paths(&rig, &ledger_path).await;

    let samples: Vec<SoakSample> = samples.lock().map(|v| v.clone()).unwrap_or_default();
    let flatness = vec![
        flat("rss_bytes", &samples, ops_phase_s, RSS_BOUND, |x| {
            x.rss as f64
        }),
        flat("fds", &samples, ops_phase_s, FD_BOUND, |x| x.fds as f64),
        flat("tasks", &samples, ops_phase_s, TASK_BOUND, |x| {
            x.tasks as f64
        }),
    ];
    let operations: BTreeMap<String, OpTotals> = shared
        .totals
        .lock()
        .map(|m| {
            m.iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut totals = OpTotals::default();
    for o in operations.values() {
        totals.add(o);
    }
    let unexplained = shared
        .unexplained
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    let inconsistent = shared
        .inconsistent
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    let faults: Vec<FaultRecord> = fault_log.lock().map(|v| v.clone()).unwrap_or_default();

    let mut checks = Vec::new();
    checks.push(Check {
        name: "every operation succeeded or failed with a typed error".into(),
        ok: totals.hung == 0 && totals.panicked == 0 && totals.started > 0,
        detail: format!(
            "{} operations: {} ok, {} typed failures, {} cancelled, {} hung, {} panicked",
            totals.started,
            totals.ok,
            totals.failed_total(),
            totals.cancelled,
            totals.hung,
            totals.panicked
        ),
    });
    let unexplained_n = unexplained.iter().filter(|m| !m.starts_with('(')).count();
    checks.push(Check {
        name: "no operation failed away from a fault".into(),
        ok: unexplained.is_empty(),
        detail: format!(
            "{unexplained_n}{} failures overlapped no fault window (+{} s grace)",
            if unexplained.len() > 20 { "+" } else { "" },
            FAULT_GRACE.as_secs()
        ),
    });
    checks.push(Check {
        name: "builders report pushed paths valid".into(),
        ok: inconsistent.is_empty(),
        detail: if inconsistent.is_empty() {
            "every query after a push saw the path".into()
        } else {
            inconsistent.join("; ")
        },
    });
    checks.push(Check {
        name: "faults were injected".into(),
        ok: !faults.is_empty() && faults.iter().all(|f| f.error.is_none()),
        detail: format!(
            "{} faults ({}), {} with a failed control",
            faults.len(),
            FAULTS
                .iter()
                .map(|k| format!("{k} {}", faults.iter().filter(|f| f.kind == *k).count()))
                .collect::<Vec<_>>()
                .join(", "),
            faults.iter().filter(|f| f.error.is_some()).count()
        ),
    });
    checks.push(Check {
        name: "pushed and fetched paths are complete where valid, valid where the operation succeeded".into(),
        ok: paths.bad.is_empty() && paths.succeeded > 0,
        detail: format!(
            "{} succeeded ({} valid and verified); {} interrupted ({} absent, {} valid and verified); {} bad",
            paths.succeeded,
            paths.succeeded_valid,
            paths.interrupted,
            paths.interrupted_absent,
            paths.interrupted_valid,
            paths.bad.len()
        ),
    });
    for f in &flatness {
        // RSS in MiB, the others as counts.
        let u = if f.figure == "rss_bytes" {
            1048576.0
        } else {
            1.0
        };
        let unit = if f.figure == "rss_bytes" { " MiB" } else { "" };
        checks.push(Check {
            name: format!("{} flat after warm-up", f.figure),
            ok: f.ok,
            detail: format!(
                "least-squares growth over {:.0} s after warm-up {:+.2}{unit} (bound {:.1}{unit} + noise {:.2}{unit}; {:+.2}{unit} per hour); mean {:.1}{unit}, range {:.1}..{:.1}{unit}",
                f.span_s,
                f.growth / u,
                f.bound / u,
                f.noise / u,
                f.growth_per_hour / u,
                f.mean / u,
                f.min / u,
                f.max / u
            ),
        });
    }
    let leaked: usize = leaks.values().map(Vec::len).sum();
    checks.push(Check {
        name: "no remote process outlives the pool".into(),
        ok: leaked == 0,
        detail: format!("{leaked} remote processes left after shutdown"),
    });
    checks.push(Check {
        name: "sessions churned".into(),
        ok: pool_totals.sessions_created > 0,
        detail: format!(
            "{} sessions created ({:.1}/s, {:.0} per hour), {} discarded, {} expired",
            pool_totals.sessions_created,
            pool_totals.sessions_created as f64 / ops_phase_s.max(1e-9),
            pool_totals.sessions_created as f64 * 3600.0 / ops_phase_s.max(1e-9),
            pool_totals.sessions_discarded,
            pool_totals.sessions_expired
        ),
    });
    let passed = checks.iter().all(|c| c.ok);
    let error_examples = shared
        .examples
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    let fixture_failures = shared.fixture_failures.load(Ordering::Relaxed);

    // Tear down: the local store's sessions and the handles hold the rig.
    drop(shared);
    drop(local);
    drop(pool);
    let _ = tokio::task::spawn_blocking(move || drop(rig)).await;
    drop(scratch);

    Ok(SoakReport {
        schema_version: SOAK_SCHEMA_VERSION,
        nixmux_version: env!("CARGO_PKG_VERSION").to_owned(),
        started_unix,
        settings: SoakSettings {
            duration_s: opts.duration.as_secs_f64(),
            fault_every_s: opts.fault_every.as_secs_f64(),
            concurrency: opts.concurrency,
            builders: nb,
            warmup_s: warmup_s(ops_phase_s),
            watchdog_s: WATCHDOG.as_secs_f64(),
            fault_grace_s: FAULT_GRACE.as_secs_f64(),
        },
        environment: SoakEnvironment {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_before,
            load_after: crate::stats::load_average(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        },
        ops_phase_s,
        total_s: begin.elapsed().as_secs_f64(),
        operations,
        totals,
        pool: pool_totals,
        faults,
        samples,
        flatness,
        paths,
        leaked_remote_processes: leaks,
        unexplained_failures: unexplained,
        error_examples,
        fixture_failures,
        checks,
        passed,
    })
}

/// Waits (at most 20 s) for every builder's processes other than its listening sshd to end,
/// and returns those still there.
async fn remote_leaks(rig: &Arc<Rig>) -> BTreeMap<String, Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = rig.clone();
        let left = tokio::task::spawn_blocking(move || {
            let mut m = BTreeMap::new();
            for b in r.builders() {
                let listener = b.sshd_pid();
                let others: Vec<String> = b
                    .processes()
                    .into_iter()
                    .filter(|p| Some(p.pid) != listener)
                    .map(|p| format!("{} {}", p.pid, p.cmdline))
                    .collect();
                if !others.is_empty() {
                    m.insert(b.name().to_owned(), others);
                }
            }
            m
        })
        .await
        .unwrap_or_default();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks every path of the ledger in the store it went to.
async fn check_paths(rig: &Arc<Rig>, ledger: &Path) -> PathChecks {
    let text = std::fs::read_to_string(ledger).unwrap_or_default();
    // dest -> path -> succeeded (a path recorded twice counts as succeeded if any did).
    let mut by_dest: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::new();
    for l in text.lines() {
        let mut it = l.splitn(3, '\t');
        let (Some(d), Some(o), Some(p)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let e = by_dest
            .entry(d.to_owned())
            .or_default()
            .entry(p.to_owned())
            .or_insert(false);
        *e |= o == "ok";
    }
    let rig = rig.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = PathChecks::default();
        for (dest, paths) in by_dest {
            let store = if dest == "client" {
                rig.client_store()
            } else {
                match dest
                    .strip_prefix("builder")
                    .and_then(|n| n.parse::<usize>().ok())
                    .and_then(|i| rig.builders().get(i))
                {
                    Some(b) => b.store(),
                    None => continue,
                }
            };
            let all: Vec<&String> = paths.keys().collect();
            let mut invalid = BTreeSet::new();
            for chunk in all.chunks(400) {
                let mut args = vec!["--check-validity", "--print-invalid"];
                args.extend(chunk.iter().map(|s| s.as_str()));
                match store.run("nix-store", &args) {
                    Ok(out) => {
                        for l in String::from_utf8_lossy(&out.stdout).lines() {
                            invalid.insert(l.trim().to_owned());
                        }
                    }
                    Err(e) => {
                        c.bad
                            .push(format!("{dest}: nix-store --check-validity failed: {e}"));
                    }
                }
            }
            let valid: Vec<&String> = all
                .iter()
                .copied()
                .filter(|p| !invalid.contains(p.as_str()))
                .collect();
            // `--verify-path` rehashes the path's contents against the NAR hash in the
            // database: a path registered before its contents were complete fails it.
            let mut corrupt = BTreeSet::new();
            for chunk in valid.chunks(400) {
                let mut args = vec!["--verify-path"];
                args.extend(chunk.iter().map(|s| s.as_str()));
                if store.run("nix-store", &args).is_err() {
                    for p in chunk {
                        if store
                            .run("nix-store", ["--verify-path", p.as_str()])
                            .is_err()
                        {
                            corrupt.insert((*p).clone());
                        }
                    }
                }
            }
            for (p, ok) in &paths {
                let is_valid = !invalid.contains(p);
                let is_corrupt = corrupt.contains(p);
                if *ok {
                    c.succeeded += 1;
                    if is_valid && !is_corrupt {
                        c.succeeded_valid += 1;
                    }
                } else {
                    c.interrupted += 1;
                    if !is_valid {
                        c.interrupted_absent += 1;
                    } else if !is_corrupt {
                        c.interrupted_valid += 1;
                    }
                }
                if is_corrupt {
                    c.bad
                        .push(format!("{dest}: {p} is valid but fails --verify-path"));
                } else if *ok && !is_valid {
                    c.bad
                        .push(format!("{dest}: {p} was transferred but is not valid"));
                }
            }
        }
        c
    })
    .await
    .unwrap_or_else(|e| PathChecks {
        bad: vec![format!("path check task: {e}")],
        ..PathChecks::default()
    })
}

/// Least-squares slope of `f` over the samples after warm-up.
fn flat(
    figure: &str,
    samples: &[SoakSample],
    phase_s: f64,
    bound: f64,
    f: impl Fn(&SoakSample) -> f64,
) -> Flatness {
    let from = warmup_s(phase_s);
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.t >= from)
        .map(|s| (s.t, f(s)))
        .collect();
    let t = trend(&pts);
    let (slope, mean) = (t.slope, t.mean);
    let span = match (pts.first(), pts.last()) {
        (Some(a), Some(b)) => b.0 - a.0,
        _ => 0.0,
    };
    let growth = slope * span;
    let noise = 2.0 * t.slope_se * span;
    Flatness {
        figure: figure.to_owned(),
        samples: pts.len(),
        span_s: span,
        slope_per_s: slope,
        growth,
        growth_per_hour: slope * 3600.0,
        bound,
        noise,
        autocorrelation: t.autocorrelation,
        mean,
        min: pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
        max: pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max),
        ok: pts.len() >= 3 && growth <= bound + noise,
    }
}

/// A least-squares line and how sure it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trend {
    /// Slope, units per second.
    pub slope: f64,
    /// Mean of the values.
    pub mean: f64,
    /// Standard error of the slope, widened by `sqrt((1 + r) / (1 - r))` for the lag-1
    /// autocorrelation `r` of the residuals: one-second samples of a step-shaped count are
    /// far from independent, and the plain standard error would overstate how much a short
    /// run knows (the usual effective-sample-size correction for trends in serially
    /// correlated series).
    pub slope_se: f64,
    /// `r`, clamped to 0..0.99.
    pub autocorrelation: f64,
}

/// The least-squares trend of `pts` (x, y); zero slope and error for fewer than 3 points.
pub fn trend(pts: &[(f64, f64)]) -> Trend {
    let (slope, mean) = least_squares(pts);
    let flat = Trend {
        slope,
        mean,
        slope_se: 0.0,
        autocorrelation: 0.0,
    };
    if pts.len() < 3 {
        return flat;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    if sxx <= 0.0 {
        return flat;
    }
    let res: Vec<f64> = pts
        .iter()
        .map(|p| p.1 - (mean + slope * (p.0 - mx)))
        .collect();
    let ss: f64 = res.iter().map(|r| r * r).sum();
    let lag: f64 = res.windows(2).map(|w| w[0] * w[1]).sum();
    let r = if ss > 0.0 {
        (lag / ss).clamp(0.0, 0.99)
    } else {
        0.0
    };
    let se = (ss / (n - 2.0) / sxx).sqrt() * ((1.0 + r) / (1.0 - r)).sqrt();
    Trend {
        slope,
        mean,
        slope_se: se,
        autocorrelation: r,
    }
}

/// Slope and mean of `y` over `x` (0 slope for fewer than two points).
pub fn least_squares(pts: &[(f64, f64)]) -> (f64, f64) {
    let n = pts.len() as f64;
    if pts.is_empty() {
        return (0.0, 0.0);
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx <= 0.0 {
        (0.0, my)
    } else {
        (sxy / sxx, my)
    }
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

/// The summary for people.
pub fn table(r: &SoakReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "== soak: {:.0} s of operations on {} rig builders × 2 protocols, {} at once, a fault every {:.0} s ({} CPUs, load {:.2} → {:.2})",
        r.ops_phase_s,
        r.settings.builders,
        r.settings.concurrency,
        r.settings.fault_every_s,
        r.environment.cpus,
        r.environment.load_before[0],
        r.environment.load_after[0]
    );
    let _ = writeln!(
        out,
        "  {:<14} {:>8} {:>8} {:>8} {:>9}  failures by kind",
        "operation", "started", "ok", "failed", "cancelled"
    );
    for (k, o) in r
        .operations
        .iter()
        .chain(std::iter::once((&"all".to_owned(), &r.totals)))
    {
        let kinds: Vec<String> = o.failed.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            out,
            "  {:<14} {:>8} {:>8} {:>8} {:>9}  {}",
            k,
            o.started,
            o.ok,
            o.failed_total() + o.hung + o.panicked + o.build_failures,
            o.cancelled,
            kinds.join(", ")
        );
    }
    let p = &r.pool;
    let _ = writeln!(
        out,
        "  sessions created {} ({:.0}/h), discarded {}, expired {}; connections opened {}, lost {}; channels opened {}",
        p.sessions_created,
        p.sessions_created as f64 * 3600.0 / r.ops_phase_s.max(1e-9),
        p.sessions_discarded,
        p.sessions_expired,
        p.connections_opened,
        p.connections_lost,
        p.channels_opened
    );
    for c in &r.checks {
        let _ = writeln!(
            out,
            "  check [{}] {}: {}",
            if c.ok { "ok" } else { "FAILED" },
            c.name,
            c.detail
        );
    }
    for u in &r.unexplained_failures {
        let _ = writeln!(out, "  unexplained: {u}");
    }
    for p in &r.paths.bad {
        let _ = writeln!(out, "  bad path: {p}");
    }
    for (b, v) in &r.leaked_remote_processes {
        for p in v {
            let _ = writeln!(out, "  leaked on {b}: {p}");
        }
    }
    let _ = writeln!(
        out,
        "soak {} (total {:.0} s)",
        if r.passed { "PASSED" } else { "FAILED" },
        r.total_s
    );
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart: RSS, fds and tasks, channels and sessions, and operations over time, one
/// panel each, with the faults shaded.
pub fn chart(r: &SoakReport) -> String {
    use std::fmt::Write as _;
    let (width, left, right) = (960.0, 80.0, 170.0);
    let (panel_h, gap, top) = (150.0, 40.0, 80.0);
    type Series<'a> = (&'a str, &'a str, Box<dyn Fn(&SoakSample) -> f64>);
    let panels: Vec<(&str, Vec<Series<'_>>)> = vec![
        (
            "RSS (MiB)",
            vec![(
                "RSS",
                "#1f77b4",
                Box::new(|s: &SoakSample| s.rss as f64 / 1048576.0),
            )],
        ),
        (
            "open fds, tokio tasks",
            vec![
                ("fds", "#d62728", Box::new(|s: &SoakSample| s.fds as f64)),
                (
                    "tasks",
                    "#9467bd",
                    Box::new(|s: &SoakSample| s.tasks as f64),
                ),
            ],
        ),
        (
            "channels, sessions, connections",
            vec![
                (
                    "channels",
                    "#2ca02c",
                    Box::new(|s: &SoakSample| s.channels as f64),
                ),
                (
                    "sessions",
                    "#ff7f0e",
                    Box::new(|s: &SoakSample| s.sessions as f64),
                ),
                (
                    "connections",
                    "#8c564b",
                    Box::new(|s: &SoakSample| s.connections as f64),
                ),
            ],
        ),
        (
            "operations and sessions created (cumulative)",
            vec![
                (
                    "ops done",
                    "#1f77b4",
                    Box::new(|s: &SoakSample| s.ops_done as f64),
                ),
                (
                    "ops not ok",
                    "#d62728",
                    Box::new(|s: &SoakSample| s.ops_not_ok as f64),
                ),
                (
                    "sessions created",
                    "#ff7f0e",
                    Box::new(|s: &SoakSample| s.sessions_created as f64),
                ),
            ],
        ),
    ];
    let height = top + panels.len() as f64 * (panel_h + gap) + 20.0;
    let tmax = r
        .samples
        .last()
        .map_or(r.ops_phase_s, |s| s.t)
        .max(r.ops_phase_s)
        .max(1.0);
    let px = |t: f64| left + t / tmax * (width - left - right);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="12" y="24" font-size="15" font-weight="bold">{}</text><text x="12" y="42" font-size="12" fill="#555">{}</text>"##,
        esc(&format!(
            "soak: {:.0} s, {} builders × 2 protocols, {} at once — {}",
            r.ops_phase_s,
            r.settings.builders,
            r.settings.concurrency,
            if r.passed { "passed" } else { "FAILED" }
        )),
        esc(&format!(
            "{} operations, {} sessions created; shaded: faults (kill-sessions, kill-sshd, freeze, restart); dashed: end of warm-up",
            r.totals.started, r.pool.sessions_created
        ))
    );
    for (k, (title, series)) in panels.iter().enumerate() {
        let y0 = top + k as f64 * (panel_h + gap);
        let ymax = r
            .samples
            .iter()
            .flat_map(|s| series.iter().map(move |(_, _, f)| f(s)))
            .fold(0.0_f64, f64::max)
            .max(1e-9)
            * 1.1;
        let py = |v: f64| y0 + (1.0 - v / ymax) * panel_h;
        let _ = write!(
            svg,
            r##"<text x="{left}" y="{}" font-size="12" font-weight="bold">{}</text>"##,
            y0 - 6.0,
            esc(title)
        );
        for f in &r.faults {
            let _ = write!(
                svg,
                r##"<rect x="{:.1}" y="{y0}" width="{:.1}" height="{panel_h}" fill="#f4b400" opacity="0.25"><title>{} {}</title></rect>"##,
                px(f.start_s),
                (px(f.end_s) - px(f.start_s)).max(1.5),
                esc(&f.kind),
                esc(&f.builder)
            );
        }
        let wx = px(r.settings.warmup_s);
        let _ = write!(
            svg,
            r##"<line x1="{wx:.1}" y1="{y0}" x2="{wx:.1}" y2="{}" stroke="#999" stroke-dasharray="4 3"/>"##,
            y0 + panel_h
        );
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="#333"/><line x1="{left}" y1="{y0}" x2="{left}" y2="{0}" stroke="#333"/>"##,
            y0 + panel_h,
            width - right
        );
        for q in 0..=2 {
            let v = ymax * f64::from(q) / 2.0;
            let _ = write!(
                svg,
                r##"<text x="{}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
                left - 6.0,
                py(v) + 3.0,
                if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            );
        }
        for (j, (name, col, f)) in series.iter().enumerate() {
            // At most ~1000 points per line: an hour has 3600 samples.
            let step = (r.samples.len() / 1000).max(1);
            let pts: Vec<String> = r
                .samples
                .iter()
                .step_by(step)
                .map(|s| format!("{:.1},{:.1}", px(s.t), py(f(s))))
                .collect();
            let _ = write!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{col}" stroke-width="1.5"/>"#,
                pts.join(" ")
            );
            let ly = y0 + 14.0 + j as f64 * 16.0;
            let _ = write!(
                svg,
                r#"<rect x="{}" y="{}" width="12" height="3" fill="{col}"/><text x="{}" y="{}" font-size="11">{}</text>"#,
                width - right + 10.0,
                ly - 4.0,
                width - right + 28.0,
                ly,
                esc(name)
            );
        }
    }
    // Time axis labels under the last panel.
    let yb = top + panels.len() as f64 * (panel_h + gap) - gap + 14.0;
    for q in 0..=4 {
        let t = tmax * f64::from(q) / 4.0;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{yb}" font-size="10" text-anchor="middle">{}</text>"#,
            px(t),
            if tmax >= 600.0 {
                let m = t / 60.0;
                if (m - m.round()).abs() < 0.05 {
                    format!("{m:.0} min")
                } else {
                    format!("{m:.1} min")
                }
            } else {
                format!("{t:.0} s")
            }
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Parses `90`, `90s`, `10m`, `1h`, `1h30m` into a duration.
///
/// # Errors
/// Anything else.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let mut total = 0u64;
    let mut num = String::new();
    let s = s.trim();
    if s.is_empty() {
        return Err(anyhow!("empty duration"));
    }
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num
            .parse()
            .map_err(|_| anyhow!("{s:?}: expected a number before {c:?}"))?;
        num.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(anyhow!("{s:?}: unknown unit {c:?} (use s, m or h)")),
        };
    }
    if !num.is_empty() {
        total += num
            .parse::<u64>()
            .map_err(|_| anyhow!("{s:?}: not a duration"))?;
    }
    if total == 0 {
        return Err(anyhow!("{s:?}: must be positive"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60").ok(), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("60s").ok(), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("10m").ok(), Some(Duration::from_secs(600)));
        assert_eq!(
            parse_duration("1h30m").ok(),
            Some(Duration::from_secs(5400))
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> = (0..100)
            .map(|i| (f64::from(i), 3.0 + 0.5 * f64::from(i)))
            .collect();
        let (s, _) = least_squares(&line);
        assert!((s - 0.5).abs() < 1e-9);
        let flat: Vec<(f64, f64)> = (0..100)
            .map(|i| (f64::from(i), if i % 2 == 0 { 10.0 } else { 12.0 }))
            .collect();
        let (s, m) = least_squares(&flat);
        assert!(s.abs() < 0.001 && (m - 11.0).abs() < 1e-9, "{s} {m}");
        assert_eq!(least_squares(&[]), (0.0, 0.0));
    }

    #[test]
    fn noise_of_a_short_step_series_exceeds_that_of_an_hour() {
        // fds as a short run sees them: steps of 4 that last several seconds.
        let short: Vec<(f64, f64)> = (0..30)
            .map(|i| (f64::from(i), if (i / 6) % 2 == 0 { 27.0 } else { 31.0 }))
            .collect();
        let t = trend(&short);
        assert!(t.autocorrelation > 0.5, "{t:?}");
        let noise = 2.0 * t.slope_se * 29.0;
        assert!(noise > 2.0, "{t:?}");
        // The same steps over an hour: the slope is known to a small fraction of a step.
        let long: Vec<(f64, f64)> = (0..3600)
            .map(|i| (f64::from(i), if (i / 6) % 2 == 0 { 27.0 } else { 31.0 }))
            .collect();
        let t = trend(&long);
        assert!(2.0 * t.slope_se * 3599.0 < 1.0, "{t:?}");
        // A steady leak is not noise.
        let leak: Vec<(f64, f64)> = (0..3600)
            .map(|i| (f64::from(i), 27.0 + f64::from(i) / 360.0))
            .collect();
        let t = trend(&leak);
        assert!(
            (t.slope * 3599.0 - 10.0).abs() < 0.1 && t.slope_se < 1e-6,
            "{t:?}"
        );
    }
}
