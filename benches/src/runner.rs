//! The runner: warm-up, then interleaved repetitions (A B C, B C A, C A B, ...) so that a
//! noisy shared machine treats every side alike; timing, CPU and peak RSS per side.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use crate::report::{CaseResult, CpuTime, Figure, Outcome, Role, SideResult};
use crate::stats::{self, CpuSnapshot, Latencies};

/// What one timed sample produced.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Latencies of single operations inside the sample (empty: the sample is one operation,
    /// timed by the runner).
    pub ops: Vec<Duration>,
    /// The sample's own timing of its measured part, when it excludes set-up done inside
    /// `run` (e.g. throughput timed from the first byte). `None`: the runner's wall time.
    pub timed: Option<Duration>,
    /// Bytes moved.
    pub bytes: u64,
    /// Operations that failed without failing the sample (counted, not timed).
    pub failures: u32,
}

impl Sample {
    /// A sample timed by the runner.
    pub fn one() -> Self {
        Sample::default()
    }

    /// A sample that moved `bytes`, timed by the runner.
    pub fn bytes(bytes: u64) -> Self {
        Sample {
            bytes,
            ..Sample::default()
        }
    }
}

/// The result type of side hooks.
pub type SideResultT<T> = anyhow::Result<T>;

/// One contender in a case. Hooks other than [`Side::run`] are not timed.
pub trait Side: Send {
    /// Stable id.
    fn id(&self) -> String;
    /// Description for people.
    fn label(&self) -> String;
    /// nixmux, baseline or yardstick.
    fn role(&self) -> Role {
        Role::Baseline
    }
    /// Why this side cannot run here, if it cannot.
    fn unavailable(&self) -> Option<String> {
        None
    }
    /// Once, before the first sample.
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Before every sample (reset a store, warm a connection).
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async { Ok(()) })
    }
    /// The timed sample.
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>>;
    /// After every sample, also after a failed one (close sessions, reap processes).
    fn after(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Once, at the end.
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Extra facts for the report, read after the samples.
    fn details(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}

/// One parameter value of a workload, with its sides.
pub struct Case {
    /// Label (`""` for plain workloads).
    pub label: String,
    /// Sweep x value.
    pub param: Option<f64>,
    /// The side ratios compare with.
    pub reference: Option<String>,
    /// The sides, nixmux first.
    pub sides: Vec<Box<dyn Side>>,
    /// Measured samples per side.
    pub repeat: u32,
    /// Unmeasured rounds first.
    pub warmup: u32,
    /// Longest a single sample (with its untimed hooks) may take.
    pub timeout: Duration,
}

/// Progress of a run, for a live display.
#[derive(Debug, Clone)]
pub enum Event {
    /// A workload starts.
    Workload {
        /// Its name.
        name: String,
        /// Its title.
        title: String,
        /// Samples it will take in all (warm-up included), for a progress bar.
        total_samples: u64,
    },
    /// A sample finished.
    Sample {
        /// Case label.
        case: String,
        /// Side id.
        side: String,
        /// Warm-up or measured.
        warmup: bool,
        /// Its time, or the error.
        result: Result<Duration, String>,
    },
    /// Something worth telling (fixtures being prepared, a side unavailable).
    Note(String),
    /// The workload finished.
    WorkloadDone {
        /// Its name.
        name: String,
    },
}

/// Receives [`Event`]s.
pub trait Progress: Send + Sync {
    /// One event; must return quickly.
    fn event(&self, e: &Event);
}

/// Ignores events.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn event(&self, _e: &Event) {}
}

#[derive(Default)]
struct Acc {
    walls: Latencies,
    ops: Latencies,
    sample_seconds: Vec<f64>,
    rates: Vec<f64>,
    bytes: Option<u64>,
    failures: u32,
    samples: u32,
    cpu: Option<CpuTime>,
    peak: Option<u64>,
    error: Option<String>,
    setup_failed: bool,
}

/// Samples a case takes in all.
pub fn case_samples(case: &Case) -> u64 {
    u64::from(case.repeat + case.warmup) * case.sides.len() as u64
}

async fn hook<T>(
    timeout: Duration,
    what: &str,
    f: BoxFuture<'_, SideResultT<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err(format!("{what} timed out after {timeout:?}")),
    }
}

/// Runs a case: every side's setup, warm-up rounds, then `repeat` interleaved rounds whose
/// order rotates, then teardown.
pub async fn run_case(mut case: Case, figure: Figure, progress: &dyn Progress) -> CaseResult {
    let n = case.sides.len();
    let mut accs: Vec<Acc> = (0..n).map(|_| Acc::default()).collect();
    for (side, acc) in case.sides.iter_mut().zip(accs.iter_mut()) {
        if let Some(reason) = side.unavailable() {
            acc.setup_failed = true;
            acc.error = Some(reason.clone());
            progress.event(&Event::Note(format!(
                "{}: unavailable: {reason}",
                side.id()
            )));
            continue;
        }
        if let Err(e) = hook(case.timeout, "setup", side.setup()).await {
            progress.event(&Event::Note(format!("{}: setup failed: {e}", side.id())));
            acc.setup_failed = true;
            acc.error = Some(format!("setup: {e}"));
        }
    }
    let rounds = case.warmup + case.repeat;
    for round in 0..rounds {
        let warm = round < case.warmup;
        for k in 0..n {
            // Rotate who goes first so no side always follows the same other side.
            let i = (k + round as usize) % n;
            let (side, acc) = (&mut case.sides[i], &mut accs[i]);
            if acc.setup_failed {
                continue;
            }
            if !warm {
                // Per sample: the other sides' samples in between must not count.
                stats::reset_peak_rss();
            }
            let r = sample(side.as_mut(), case.timeout).await;
            let event = match &r {
                Ok((s, wall, _)) => Ok(s.timed.unwrap_or(*wall)),
                Err(e) => Err(e.clone()),
            };
            progress.event(&Event::Sample {
                case: case.label.clone(),
                side: side.id(),
                warmup: warm,
                result: event,
            });
            if warm {
                continue;
            }
            match r {
                Ok((s, wall, cpu)) => {
                    let t = s.timed.unwrap_or(wall);
                    acc.samples += 1;
                    acc.failures += s.failures;
                    acc.walls.record(t);
                    acc.sample_seconds.push(t.as_secs_f64());
                    for op in &s.ops {
                        acc.ops.record(*op);
                    }
                    if s.bytes > 0 {
                        acc.bytes = Some(s.bytes);
                        acc.rates.push(s.bytes as f64 / t.as_secs_f64().max(1e-9));
                    }
                    acc.cpu = Some(match acc.cpu {
                        Some(c) => stats::add_cpu(c, cpu),
                        None => cpu,
                    });
                    acc.peak = stats::peak_rss().max(acc.peak);
                }
                Err(e) => {
                    acc.failures += 1;
                    acc.error = Some(e);
                }
            }
        }
    }
    let mut sides = Vec::with_capacity(n);
    for (side, acc) in case.sides.iter_mut().zip(accs) {
        if !acc.setup_failed {
            let _ = tokio::time::timeout(case.timeout, side.teardown()).await;
        }
        let outcome = if acc.samples > 0 {
            Outcome::Measured
        } else if side.unavailable().is_some() {
            Outcome::Unavailable {
                reason: acc.error.clone().unwrap_or_default(),
            }
        } else {
            Outcome::Failed {
                error: acc.error.clone().unwrap_or_else(|| "no samples".into()),
            }
        };
        let mut details = side.details();
        if let (Some(e), true) = (&acc.error, acc.samples > 0) {
            details.insert("last_error".into(), e.clone());
        }
        sides.push(SideResult {
            id: side.id(),
            label: side.label(),
            role: side.role(),
            outcome,
            samples: acc.samples,
            failures: acc.failures,
            sample_seconds: acc.sample_seconds,
            wall: acc.walls.summary(),
            per_op: acc.ops.summary(),
            throughput: stats::summarize(&acc.rates),
            bytes_per_sample: acc.bytes,
            ratio: None,
            cpu: acc
                .cpu
                .map(|c| stats::div_cpu(c, f64::from(acc.samples.max(1)))),
            peak_rss_bytes: acc.peak,
            details,
        });
    }
    let mut result = CaseResult {
        label: case.label,
        param: case.param,
        reference: case.reference,
        sides,
    };
    result.compute_ratios(figure);
    result
}

/// One sample: before, run (timed), after; each bounded by `timeout`.
async fn sample(
    side: &mut dyn Side,
    timeout: Duration,
) -> Result<(Sample, Duration, CpuTime), String> {
    if let Err(e) = hook(timeout, "preparing the sample", side.before()).await {
        let _ = tokio::time::timeout(timeout, side.after()).await;
        return Err(format!("before the sample: {e}"));
    }
    let cpu0 = CpuSnapshot::now();
    let t0 = Instant::now();
    let r = hook(timeout, "the sample", side.run()).await;
    let wall = t0.elapsed();
    let cpu = CpuSnapshot::now().since(&cpu0);
    let _ = tokio::time::timeout(timeout, side.after()).await;
    r.map(|s| (s, wall, cpu))
}
