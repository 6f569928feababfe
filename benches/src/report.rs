//! The results of a benchmark run, and the JSON schema of `nixmux bench --json`.
//!
//! **These types are the schema.** `--json` writes one [`Report`] with `serde_json`; field
//! names are the Rust names (snake_case), enums are tagged as documented on each type, and
//! every duration is in **seconds** (f64), every size in **bytes**, every rate in **bytes per
//! second**. A consumer can deserialize the file with these very types (a test checks the
//! round trip); [`SCHEMA_VERSION`] changes whenever a field changes meaning or disappears.
//!
//! Shape:
//!
//! ```text
//! Report
//! ├── environment: machine, load before/after, peer versions, targets
//! ├── settings: repeat, warm-up, quick, wan, workloads asked for
//! └── workloads[]: WorkloadResult (name, title, description, primary figure, goals, notes)
//!     └── cases[]: CaseResult (a parameter value: "1000 paths", "16 sessions", ...)
//!         └── sides[]: SideResult (nixmux or a baseline: outcome, summaries, ratio, CPU, RSS)
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of this schema. 1: first version.
pub const SCHEMA_VERSION: u32 = 1;

/// A whole run: what `nixmux bench --json FILE` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// Version of the nixmux that measured.
    pub nixmux_version: String,
    /// Start of the run, seconds since the Unix epoch.
    pub started_unix: u64,
    /// Wall time of the whole run (rig start-up and fixtures included), seconds.
    pub duration_s: f64,
    /// Where it ran.
    pub environment: Environment,
    /// How it ran.
    pub settings: Settings,
    /// One entry per workload, in the order run.
    pub workloads: Vec<WorkloadResult>,
}

/// The machine and peers of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    /// Logical CPUs.
    pub cpus: usize,
    /// `/proc/loadavg` (1, 5, 15 min) when the run started: other users of the machine.
    pub load_before: [f64; 3],
    /// `/proc/loadavg` when it ended.
    pub load_after: [f64; 3],
    /// `uname -r`.
    pub kernel: String,
    /// `nix --version` of the client side, if Nix is installed.
    pub nix_version: Option<String>,
    /// `ssh -V` of the OpenSSH client, if installed.
    pub openssh_version: Option<String>,
    /// The builders measured.
    pub targets: Targets,
}

/// Which builders were measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    /// True: local rig builders started by the run (real sshd + Nix on 127.0.0.1, each with
    /// its own store), removed afterwards. False: the builders named on the command line.
    pub embedded: bool,
    /// Builder names (store URLs or `builderN`).
    pub builders: Vec<String>,
}

/// The settings of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Measured repetitions per side (`--repeat`; `None`: each workload's default).
    pub repeat: Option<u32>,
    /// `--quick`: small sizes and few repetitions (CI).
    pub quick: bool,
    /// The emulated WAN link, if any (`--wan RTT_MS:MBIT`).
    pub wan: Option<WanSettings>,
    /// The workloads asked for, by name.
    pub workloads: Vec<String>,
}

/// An emulated link between client and builders: a TCP relay in the bench process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WanSettings {
    /// Added round-trip time, milliseconds (half of it each direction).
    pub rtt_ms: f64,
    /// Rate limit per direction, Mbit/s (`None`: no limit).
    pub mbit: Option<f64>,
}

/// Which summary of a side the table shows and ratios compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Figure {
    /// The wall time of a sample ([`SideResult::wall`]); lower is better.
    Wall,
    /// The latency of one operation ([`SideResult::per_op`]); lower is better.
    PerOp,
    /// Bytes per second of a sample ([`SideResult::throughput`]); higher is better.
    Throughput,
}

impl Figure {
    /// Whether a larger value is better.
    pub fn higher_is_better(self) -> bool {
        matches!(self, Figure::Throughput)
    }
}

/// One workload: a question ("how long until a session is ready?") asked of every side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadResult {
    /// Name as given to `--workload` (`cold-session`, `push-small`, ...).
    pub name: String,
    /// One-line title.
    pub title: String,
    /// What exactly is timed, and what is not.
    pub description: String,
    /// The figure of the table and of ratios.
    pub primary: Figure,
    /// Parameter values (one case for plain workloads, several for sweeps).
    pub cases: Vec<CaseResult>,
    /// Goals from the issues, checked against this run.
    pub goals: Vec<Goal>,
    /// Remarks: fixtures, caveats, what could not run and why.
    pub notes: Vec<String>,
}

/// One parameter value of a workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// Human label: `""` for plain workloads, `"1000 paths"`, `"16 sessions"`, ...
    pub label: String,
    /// The x value of a sweep (sessions, builders, paths, bytes), if any.
    pub param: Option<f64>,
    /// Id of the side every ratio in this case compares with (normally nixmux's).
    pub reference: Option<String>,
    /// Every side, nixmux first.
    pub sides: Vec<SideResult>,
}

/// Who a side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// nixmux itself.
    Subject,
    /// What users run today (OpenSSH, ControlMaster, Nix's own commands).
    Baseline,
    /// A yardstick rather than a competitor (raw SSH throughput, `ssh true`).
    Reference,
}

/// Whether a side produced figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Measured (some samples may still have failed: [`SideResult::failures`]).
    Measured,
    /// This baseline cannot work here; nothing was faked.
    Unavailable {
        /// Why.
        reason: String,
    },
    /// It was attempted and failed.
    Failed {
        /// The error.
        error: String,
    },
}

/// Order statistics of a set of values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of values.
    pub n: u64,
    /// Median.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

/// CPU time, seconds per measured sample (mean over samples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuTime {
    /// User CPU of the bench process (all threads; nixmux runs in it).
    pub user_s: f64,
    /// System CPU of the bench process.
    pub system_s: f64,
    /// User CPU of child processes reaped during the sample (`ssh`, `nix`, ...).
    pub children_user_s: f64,
    /// System CPU of those children.
    pub children_system_s: f64,
}

/// One side of a case: nixmux, or a baseline, measured the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideResult {
    /// Stable id (`nixmux-ssh-ng`, `openssh-spawn-ssh-ng`, `nix-copy-ssh`, ...).
    pub id: String,
    /// What it is, for people (`ssh builder nix-daemon --stdio + handshake`).
    pub label: String,
    /// nixmux, baseline or yardstick.
    pub role: Role,
    /// Measured, unavailable or failed.
    pub outcome: Outcome,
    /// Measured samples that completed (interleaved with the other sides after warm-up).
    pub samples: u32,
    /// Failed operations or samples (e.g. sessions refused by sshd's MaxSessions).
    pub failures: u32,
    /// Wall time of each sample, seconds, in the order measured.
    pub sample_seconds: Vec<f64>,
    /// Summary of the sample wall times, seconds (HdrHistogram, microsecond resolution).
    pub wall: Option<Summary>,
    /// Summary of single-operation latencies, seconds, when a sample is many operations
    /// (HdrHistogram, microsecond resolution).
    pub per_op: Option<Summary>,
    /// Summary of per-sample rates, bytes per second, for workloads that move data.
    pub throughput: Option<Summary>,
    /// Bytes moved per sample, if the workload moves data.
    pub bytes_per_sample: Option<u64>,
    /// The reference side's advantage over this side on the primary figure, median against
    /// median: this side's time ÷ the reference's time, or the reference's rate ÷ this
    /// side's rate. Above 1: the reference (nixmux) is faster. `None` for the reference
    /// itself or when either side has no figure.
    pub ratio: Option<f64>,
    /// CPU time per sample.
    pub cpu: Option<CpuTime>,
    /// Peak resident set size of the bench process during this side's samples, bytes
    /// (`VmHWM`, reset to the current RSS before each of its samples; the largest over them).
    pub peak_rss_bytes: Option<u64>,
    /// Anything else worth knowing (negotiated cipher, protocol version, breakdowns).
    pub details: BTreeMap<String, String>,
}

impl SideResult {
    /// The summary of `figure`, if any.
    pub fn figure(&self, figure: Figure) -> Option<&Summary> {
        match figure {
            Figure::Wall => self.wall.as_ref(),
            Figure::PerOp => self.per_op.as_ref().or(self.wall.as_ref()),
            Figure::Throughput => self.throughput.as_ref(),
        }
    }
}

/// A goal from the issues and whether this run meets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    /// The goal as stated (`cold session <= 0.1 s (ssh true: 0.28 s)`).
    pub text: String,
    /// The issue it comes from (`#6`).
    pub issue: String,
    /// Met, not met, or not measurable in this run.
    pub verdict: Verdict,
    /// The measured value, in words (`0.062 s`).
    pub measured: String,
}

/// A goal's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The figure meets the goal.
    Met,
    /// It does not.
    NotMet,
    /// This run did not produce the figure (a side failed or was unavailable).
    Unknown,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::NotMet => "NOT met",
            Verdict::Unknown => "unknown",
        })
    }
}

impl CaseResult {
    /// The side with this id.
    pub fn side(&self, id: &str) -> Option<&SideResult> {
        self.sides.iter().find(|s| s.id == id)
    }

    /// Fills in every side's [`SideResult::ratio`] against the reference side.
    pub fn compute_ratios(&mut self, figure: Figure) {
        let reference = self
            .reference
            .as_deref()
            .and_then(|id| self.side(id))
            .and_then(|s| s.figure(figure))
            .map(|s| s.median);
        let reference_id = self.reference.clone();
        for side in &mut self.sides {
            side.ratio = None;
            if Some(&side.id) == reference_id.as_ref() {
                continue;
            }
            let (Some(r), Some(v)) = (reference, side.figure(figure).map(|s| s.median)) else {
                continue;
            };
            if r <= 0.0 || v <= 0.0 {
                continue;
            }
            side.ratio = Some(if figure.higher_is_better() {
                r / v
            } else {
                v / r
            });
        }
    }
}

impl Report {
    /// The workload with this name.
    pub fn workload(&self, name: &str) -> Option<&WorkloadResult> {
        self.workloads.iter().find(|w| w.name == name)
    }

    /// Parses a report written by `--json`.
    ///
    /// # Errors
    /// Malformed JSON or a document of another shape.
    pub fn from_json(text: &str) -> serde_json::Result<Report> {
        serde_json::from_str(text)
    }

    /// The report as pretty-printed JSON.
    ///
    /// # Errors
    /// Only if serialisation fails (it does not for these types).
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }
}
