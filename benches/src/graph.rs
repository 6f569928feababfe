//! The `graph` workload (issue 12): a derivation graph wider than one builder's slots, built
//! across the farm by nixmux's scheduling (the way `nixmux build --machines` does it: a
//! derivation starts once its inputs are built, on the builder [`Pool::select`] picks, then
//! its outputs come back) and by Nix 2.8's build hook (`nix-build -j0 --builders @machines`:
//! a hook process, an `ssh` and a remote `nix-store --serve --write` per build).
//!
//! The graph: `leaves` independent derivations, `mids` derivations each needing an equal share
//! of the leaves, and one top needing every mid. Every build sleeps for a fixed time (a
//! build waiting on its builder; a CPU loop would only measure how 16 builds share the two
//! cores of a small machine), reads its inputs and writes one line: which builder ran it
//! (from a marker file the bench puts in each builder's `/nix`), its name, a salt and its
//! inputs. A fresh salt per sample makes every derivation new, so nothing is built already.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::future::BoxFuture;
use nixmux::graph::BuildQueue;
use nixmux::ops::BuildOptions;
use nixmux::proto::build_result::BuildStatus;
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::{Pool, Protocol, log_channel};

use crate::env::{Rng, run_output, store_path};
use crate::report::Role;
use crate::runner::{Sample, Side, SideResultT};
use crate::sides::EnvRef;

/// The file in each rig builder's `/nix` naming it, read by every build of the graph.
const MARKER: &str = ".nixmux-bench-builder";

/// Overrides the shape: `LEAVES,MIDS,MAX_JOBS,SLEEP_MS`.
pub const SHAPE_VAR: &str = "NIXMUX_BENCH_GRAPH";

/// The graph and the farm's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Independent derivations at the bottom.
    pub leaves: usize,
    /// Derivations of the middle level, each needing `leaves / mids` leaves.
    pub mids: usize,
    /// Build slots per builder (field 4 of the machines file), the same for every side.
    pub max_jobs: u32,
    /// How long each build sleeps.
    pub sleep_ms: u64,
}

impl Shape {
    /// The default shape: 4 builders × 4 slots are 16 slots, and 128 leaves fill them 8
    /// times over, so 4 builders can be 3.5× faster than 1 at best (see [`Shape::ideal`]);
    /// `quick`: a tiny graph for tests.
    pub fn default_for(quick: bool) -> Shape {
        if quick {
            Shape {
                leaves: 4,
                mids: 2,
                max_jobs: 1,
                sleep_ms: 50,
            }
        } else {
            Shape {
                leaves: 128,
                mids: 8,
                max_jobs: 4,
                sleep_ms: 500,
            }
        }
    }

    /// The default, or [`SHAPE_VAR`] when set.
    ///
    /// # Errors
    /// [`SHAPE_VAR`] is set but not four positive numbers.
    pub fn from_env(quick: bool) -> anyhow::Result<Shape> {
        let Some(v) = std::env::var_os(SHAPE_VAR) else {
            return Ok(Shape::default_for(quick));
        };
        let v = v.to_string_lossy();
        let n: Vec<u64> = v
            .split(',')
            .map(|x| x.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{SHAPE_VAR}={v}: expected LEAVES,MIDS,MAX_JOBS,SLEEP_MS"))?;
        let [leaves, mids, max_jobs, sleep_ms] = n[..] else {
            bail!("{SHAPE_VAR}={v}: expected four numbers LEAVES,MIDS,MAX_JOBS,SLEEP_MS");
        };
        if leaves == 0 || mids == 0 || mids > leaves || max_jobs == 0 || leaves > 10_000 {
            bail!("{SHAPE_VAR}={v}: need 1 ≤ MIDS ≤ LEAVES ≤ 10000 and MAX_JOBS ≥ 1");
        }
        Ok(Shape {
            leaves: usize::try_from(leaves)?,
            mids: usize::try_from(mids)?,
            max_jobs: u32::try_from(max_jobs)?,
            sleep_ms,
        })
    }

    /// Derivations in the graph.
    pub fn builds(&self) -> usize {
        self.leaves + self.mids + 1
    }

    /// The shortest possible wall time on `builders` builders: level by level, each level
    /// in `ceil(width / slots)` rounds of one build's sleep, with no cost per build at all.
    pub fn ideal(&self, builders: usize) -> Duration {
        let slots = builders.max(1) * usize::try_from(self.max_jobs.max(1)).unwrap_or(1);
        let rounds = self.leaves.div_ceil(slots) + self.mids.div_ceil(slots) + 1;
        Duration::from_millis(self.sleep_ms) * u32::try_from(rounds).unwrap_or(u32::MAX)
    }

    /// The Nix expression of the graph, salted; evaluates to the top derivation.
    fn expr(&self, salt: &str) -> String {
        let sleep = format!("{}.{:03}", self.sleep_ms / 1000, self.sleep_ms % 1000);
        // Leaf i goes to mid i mod mids: shares differ by one at most.
        let mids: Vec<String> = (0..self.mids)
            .map(|j| {
                let deps: Vec<String> = (j..self.leaves)
                    .step_by(self.mids)
                    .map(|i| format!("(leaf {i})"))
                    .collect();
                format!("(mk \"graph-mid-{j}\" [ {} ])", deps.join(" "))
            })
            .collect();
        // Builds see no PATH (Nix sets /path-not-set), hence absolute programs; `read` and
        // `echo` are the shell's. Referencing the inputs in the output makes them runtime
        // references too, as real outputs often have.
        format!(
            r#"let
  mk = name: deps: derivation {{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "/bin/sleep {sleep}; read b < /nix/{MARKER} || b=unknown; for d in ${{toString deps}}; do read x < $d; done; echo \"$b ${{name}} {salt} ${{toString deps}}\" > $out" ];
  }};
  leaves = builtins.genList (i: mk "graph-leaf-${{toString i}}" [ ]) {leaves};
  leaf = builtins.elemAt leaves;
in
mk "graph-top" [ {mids} ]
"#,
            leaves = self.leaves,
            mids = mids.join(" "),
        )
    }
}

/// One sample's graph, instantiated in the client store.
#[derive(Debug, Clone)]
struct Fixture {
    top: StorePath,
    /// Every derivation's output (one each).
    outputs: Vec<StorePath>,
    top_output: StorePath,
}

/// Untimed preparation shared by the sides: markers in the builders' `/nix`, a fresh graph in
/// the client store, and its outputs (read from the `.drv` files).
async fn prepare(env: &EnvRef, shape: &Shape) -> anyhow::Result<Fixture> {
    let rig = env.rig().ok_or_else(|| anyhow!("needs the embedded rig"))?;
    // Written before every sample: another workload may have emptied a builder's store.
    for b in rig.builders() {
        let p = b.store().nix_dir().join(MARKER);
        std::fs::write(&p, format!("{}\n", b.name()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let salt = format!(
        "{}-{}-{:x}",
        std::process::id(),
        env.next_seq(),
        Rng::seeded().next_u64()
    );
    let file = env.scratch().join(format!("graph-{salt}.nix"));
    std::fs::write(&file, shape.expr(&salt))?;
    let mut cmd = env.nix_command("nix-instantiate", [file.as_os_str()])?;
    let out = run_output(&mut cmd, Duration::from_secs(300)).await;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out?).trim().to_owned();
    let top = store_path(&text)?;
    let local = env.local().ok_or_else(|| anyhow!("no local store"))?;
    let mut outputs = Vec::new();
    let mut top_output = None;
    let mut seen = BTreeSet::new();
    let mut stack = vec![top.clone()];
    while let Some(d) = stack.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let drv = local
            .read_derivation(&d)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let out = drv
            .outputs
            .values()
            .find_map(|o| o.path.clone())
            .ok_or_else(|| anyhow!("{d}: no output path"))?;
        if d == top {
            top_output = Some(out.clone());
        }
        outputs.push(out);
        stack.extend(drv.input_drvs.keys().cloned());
    }
    if outputs.len() != shape.builds() {
        bail!(
            "the graph has {} derivations, not {}",
            outputs.len(),
            shape.builds()
        );
    }
    Ok(Fixture {
        top,
        outputs,
        top_output: top_output.ok_or_else(|| anyhow!("no top output"))?,
    })
}

/// Checks that every output of the graph is valid in the client store and says which builder
/// built each (the first word of the output, from the builder's marker).
async fn check(env: &EnvRef, f: &Fixture) -> anyhow::Result<BTreeMap<String, usize>> {
    let local = env.local().ok_or_else(|| anyhow!("no local store"))?;
    let all: BTreeSet<StorePath> = f.outputs.iter().cloned().collect();
    let valid = local.query_valid_paths(&all).await?;
    if valid.len() != all.len() {
        bail!("{} of {} outputs valid locally", valid.len(), all.len());
    }
    let dir = env
        .client_store()
        .ok_or_else(|| anyhow!("no client store"))?
        .store_dir();
    let mut by = BTreeMap::new();
    for o in &f.outputs {
        let p = dir.join(o.to_string());
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let who = text
            .split_whitespace()
            .next()
            .unwrap_or("unknown")
            .to_owned();
        *by.entry(who).or_insert(0) += 1;
    }
    Ok(by)
}

/// Busy and total jiffies of the whole machine (the `cpu` line of `/proc/stat`, proc(5)):
/// every process counts, the builders' sshd and Nix included, and other users' too.
fn machine_cpu() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// The share of the machine's CPU time that was busy since `start` (0 to 1).
fn busy_since(start: Option<(u64, u64)>) -> Option<f64> {
    let ((b0, t0), (b1, t1)) = (start?, machine_cpu()?);
    (t1 > t0).then(|| (b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64)
}

fn spread(by: &BTreeMap<String, usize>) -> String {
    by.iter()
        .map(|(b, n)| format!("{b}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What every side records: the spread of the last sample, the fewest builders a sample
/// used, and builds/s at the median sample.
#[derive(Debug, Default)]
struct Record {
    walls: Vec<f64>,
    /// Per sample: the machine's busy share.
    busy: Vec<f64>,
    last_spread: String,
    fewest_builders: Option<usize>,
    extra: BTreeMap<String, String>,
}

impl Record {
    fn add(&mut self, wall: Duration, by: &BTreeMap<String, usize>, busy: Option<f64>) {
        self.walls.push(wall.as_secs_f64());
        self.busy.extend(busy);
        self.last_spread = spread(by);
        let used = by.keys().filter(|k| *k != "unknown").count();
        self.fewest_builders = Some(self.fewest_builders.map_or(used, |f| f.min(used)));
    }

    fn details(&self, shape: &Shape, builders: usize) -> BTreeMap<String, String> {
        let mut d = self.extra.clone();
        d.insert("builds".into(), shape.builds().to_string());
        d.insert(
            "graph".into(),
            format!(
                "{} leaves, {} mids, 1 top; sleep {} ms; max-jobs {} × {builders} builder(s)",
                shape.leaves, shape.mids, shape.sleep_ms, shape.max_jobs
            ),
        );
        d.insert(
            "ideal_s".into(),
            format!("{:.3}", shape.ideal(builders).as_secs_f64()),
        );
        if !self.walls.is_empty() {
            let mut w = self.walls.clone();
            w.sort_by(f64::total_cmp);
            let med = w[w.len() / 2];
            d.insert(
                "builds_per_s".into(),
                format!("{:.2}", shape.builds() as f64 / med.max(1e-9)),
            );
        }
        if !self.busy.is_empty() {
            let mut b = self.busy.clone();
            b.sort_by(f64::total_cmp);
            d.insert(
                "machine_cpu_busy_median".into(),
                format!("{:.0}%", b[b.len() / 2] * 100.0),
            );
        }
        if !self.last_spread.is_empty() {
            d.insert("built_on_last_sample".into(), self.last_spread.clone());
        }
        if let Some(f) = self.fewest_builders {
            d.insert("fewest_builders_used".into(), f.to_string());
        }
        d
    }
}

// ===================================================================== nixmux

/// One derivation of the graph to build.
struct Job {
    drv: StorePath,
    system: String,
    features: BTreeSet<String>,
    /// Derivations of the graph it needs built first.
    deps: BTreeSet<StorePath>,
}

/// nixmux scheduling the graph over its first `builders` builders, from a cold pool.
pub struct NixmuxGraph {
    env: EnvRef,
    builders: usize,
    protocol: Protocol,
    shape: Shape,
    pool: Option<Arc<Pool>>,
    fixture: Option<Fixture>,
    record: Record,
    /// Per build: build + fetch, summed, and the count.
    build_time: Duration,
    fetch_time: Duration,
    counted: u32,
    /// Build and fetch on one lease, as `nixmux build` does (see
    /// [`NixmuxGraph::lease_first`]).
    lease_first: bool,
}

impl NixmuxGraph {
    /// A side on builders `0..builders`.
    pub fn new(env: EnvRef, builders: usize, protocol: Protocol, shape: Shape) -> Self {
        NixmuxGraph {
            env,
            builders: builders.max(1),
            protocol,
            shape,
            pool: None,
            fixture: None,
            record: Record::default(),
            build_time: Duration::ZERO,
            fetch_time: Duration::ZERO,
            counted: 0,
            lease_first: false,
        }
    }

    /// The same side in the order of `nixmux build` (cli/src/build.rs): `Pool::select`, then
    /// `Builder::build_slot` (so that the next selection counts this build), `Builder::lease`,
    /// `Lease::build_in_slot` and `Lease::fetch_outputs` on the one session. The default
    /// order (`Builder::build`, then `Builder::fetch_outputs` on a second lease) shows what
    /// holding one session across build and fetch costs or saves.
    pub fn lease_first(mut self) -> Self {
        self.lease_first = true;
        self
    }
}

/// The derivations to build for `top`, with their inputs among them: what `nixmux build`
/// plans before it schedules (reads every `.drv` of the client store once).
async fn plan(env: &EnvRef, top: &StorePath) -> anyhow::Result<Vec<Job>> {
    let local = env.local().ok_or_else(|| anyhow!("no local store"))?;
    let mut jobs = Vec::new();
    let mut seen = BTreeSet::new();
    let mut stack = vec![top.clone()];
    while let Some(d) = stack.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let drv = local
            .read_derivation(&d)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let outs: BTreeSet<StorePath> = drv
            .outputs
            .values()
            .filter_map(|o| o.path.clone())
            .collect();
        let valid = local.query_valid_paths(&outs).await?;
        if valid.len() == outs.len() && !outs.is_empty() {
            // Built already (not in a fresh graph).
            continue;
        }
        stack.extend(drv.input_drvs.keys().cloned());
        jobs.push(Job {
            drv: d,
            system: drv.platform.clone(),
            features: drv
                .env
                .get("requiredSystemFeatures")
                .map(|f| f.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            deps: drv.input_drvs.keys().cloned().collect(),
        });
    }
    let wanted: BTreeSet<StorePath> = jobs.iter().map(|j| j.drv.clone()).collect();
    for j in &mut jobs {
        j.deps.retain(|d| wanted.contains(d));
    }
    Ok(jobs)
}

impl Side for NixmuxGraph {
    fn id(&self) -> String {
        if self.lease_first {
            format!("nixmux-{}-lease-first", self.builders)
        } else {
            format!("nixmux-{}", self.builders)
        }
    }
    fn label(&self) -> String {
        format!(
            "nixmux {}: the graph on {} builder(s) × {} slots ({}), cold pool",
            self.protocol.scheme(),
            self.builders,
            self.shape.max_jobs,
            if self.lease_first {
                "yardstick: select, lease, build, fetch on the lease, as `nixmux build` orders them"
            } else {
                "select, build, fetch_outputs"
            }
        )
    }
    fn role(&self) -> Role {
        if self.lease_first {
            Role::Reference
        } else {
            Role::Subject
        }
    }
    fn unavailable(&self) -> Option<String> {
        if self.env.rig().is_none() {
            return Some("needs the embedded rig (a client store, markers on the builders)".into());
        }
        (self.env.builder_count() < self.builders)
            .then(|| format!("needs {} builders", self.builders))
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            self.fixture = Some(prepare(&self.env, &self.shape).await?);
            // A new pool per sample, not connected yet: the sample pays for connecting, as a
            // `nixmux build` run does.
            let pool = Pool::new();
            for i in 0..self.builders {
                let mut c = self.env.nixmux_config(i, self.protocol)?;
                c.machine.max_jobs = self.shape.max_jobs;
                // As the machines file's field 2 says for Nix.
                c.machine.systems = vec![nixmux::config::local_system()];
                // A build and a fetch per slot at most.
                c.pool.max_sessions = usize::try_from(self.shape.max_jobs)?.max(1) * 2;
                pool.add(c);
            }
            self.pool = Some(Arc::new(pool));
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            tracing::debug!(target: "nixmux::timing", side = %format!("{}-{}-{}", self.label(), self.builders, self.lease_first), "sample");
            let t0 = Instant::now();
            let cpu0 = machine_cpu();
            let fixture = self
                .fixture
                .clone()
                .ok_or_else(|| anyhow!("not prepared"))?;
            let pool = self.pool.clone().ok_or_else(|| anyhow!("not prepared"))?;
            let local = self.env.local().ok_or_else(|| anyhow!("no local store"))?;
            let planned_jobs = plan(&self.env, &fixture.top).await?;
            let planned = t0.elapsed();
            if planned_jobs.len() != self.shape.builds() {
                bail!(
                    "{} derivations to build, not {}",
                    planned_jobs.len(),
                    self.shape.builds()
                );
            }
            // As `nixmux build` orders them: the ready derivation with the longest chain
            // waiting behind it first (`nixmux::graph::BuildQueue`).
            let mut queue = BuildQueue::new(
                planned_jobs
                    .iter()
                    .map(|j| (j.drv.clone(), j.deps.iter().cloned().collect())),
            );
            let mut jobs: BTreeMap<StorePath, Job> = planned_jobs
                .into_iter()
                .map(|j| (j.drv.clone(), j))
                .collect();
            let slots = self.builders * usize::try_from(self.shape.max_jobs)?.max(1);
            let (logs, mut stream) = log_channel(10_000);
            // Logs are drained as a scheduler would (the CLI writes them to files).
            let drain = tokio::spawn(async move { while stream.recv().await.is_some() {} });
            let mut running = tokio::task::JoinSet::new();
            let mut ops = Vec::with_capacity(jobs.len());
            let mut failure = None;
            loop {
                while failure.is_none() && running.len() < slots {
                    let Some(job) = queue.next_ready().and_then(|d| jobs.remove(&d)) else {
                        break;
                    };
                    let (pool, local, logs) = (pool.clone(), local.clone(), logs.clone());
                    let lease_first = self.lease_first;
                    running.spawn(async move {
                        let t = Instant::now();
                        let b = pool.select(&job.system, &job.features)?;
                        let options = BuildOptions::default();
                        let outputs = |o: &nixmux::ops::BuildOutcome| -> anyhow::Result<_> {
                            if o.result.status != BuildStatus::Built {
                                bail!(
                                    "{}: {:?}: {}",
                                    job.drv,
                                    o.result.status,
                                    o.log_tail.join(" | ")
                                );
                            }
                            Ok(o.result
                                .built_outputs
                                .values()
                                .map(|x| x.path.clone())
                                .collect::<BTreeSet<StorePath>>())
                        };
                        let built;
                        if lease_first {
                            let slot = b.build_slot().await?;
                            let mut lease = b.lease().await?;
                            let o = lease
                                .build_in_slot(slot, &local, &job.drv, &options, &logs, None)
                                .await?;
                            let outs = outputs(&o)?;
                            built = t.elapsed();
                            lease.fetch_outputs(&local, &outs, None).await?;
                        } else {
                            // Selecting and starting the build in the same poll: the build
                            // counts against its builder's load before the next job selects.
                            let o = b.build(&local, &job.drv, &options, &logs).await?;
                            let outs = outputs(&o)?;
                            built = t.elapsed();
                            b.fetch_outputs(&local, &outs, None).await?;
                        }
                        Ok::<_, anyhow::Error>((job.drv, built, t.elapsed() - built))
                    });
                }
                let Some(joined) = running.join_next().await else {
                    break;
                };
                match joined
                    .map_err(|e| anyhow!("build task: {e}"))
                    .and_then(|r| r)
                {
                    Ok((drv, built, fetched)) => {
                        ops.push(built + fetched);
                        self.build_time += built;
                        self.fetch_time += fetched;
                        self.counted += 1;
                        queue.built(&drv);
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
            drop(logs);
            drain.abort();
            if let Some(e) = failure {
                return Err(e);
            }
            if queue.pending() > 0 {
                bail!("{} derivations never became ready", queue.pending());
            }
            let built = t0.elapsed();
            let by = check(&self.env, &fixture).await?;
            self.record.add(t0.elapsed(), &by, busy_since(cpu0));
            self.record.extra.insert(
                "plan_s_last".into(),
                format!("{:.3}", planned.as_secs_f64()),
            );
            self.record.extra.insert(
                "check_s_last".into(),
                format!("{:.3}", (t0.elapsed() - built).as_secs_f64()),
            );
            Ok(Sample {
                ops,
                ..Sample::one()
            })
        })
    }
    fn after(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(pool) = self.pool.take() {
                let (mut conns, mut chans) = (0, 0);
                for b in pool.builders() {
                    let st = b.stats();
                    conns += st.connections_opened;
                    chans += st.channels_opened;
                }
                self.record
                    .extra
                    .insert("connections_opened_last".into(), conns.to_string());
                self.record
                    .extra
                    .insert("channels_opened_last".into(), chans.to_string());
                pool.shutdown().await;
            }
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        let mut d = self.record.details(&self.shape, self.builders);
        if self.counted > 0 {
            let n = f64::from(self.counted);
            let sleep = self.shape.sleep_ms as f64 / 1e3;
            d.insert(
                "mean_build_s".into(),
                format!("{:.4}", self.build_time.as_secs_f64() / n),
            );
            d.insert(
                "mean_build_overhead_s".into(),
                format!("{:.4}", self.build_time.as_secs_f64() / n - sleep),
            );
            d.insert(
                "mean_fetch_s".into(),
                format!("{:.4}", self.fetch_time.as_secs_f64() / n),
            );
        }
        d
    }
}

// ===================================================================== Nix

/// `nix-build -j0 --builders @machines --no-out-link TOP.drv` in the client's private store,
/// the machines file naming builders `0..builders` with the same max-jobs as nixmux's.
pub struct NixGraph {
    env: EnvRef,
    builders: usize,
    protocol: Protocol,
    shape: Shape,
    timeout: Duration,
    machines: Option<PathBuf>,
    fixture: Option<Fixture>,
    record: Record,
    /// `--option build-poll-interval N` (`None`: Nix's default, 5 s).
    poll_interval: Option<u32>,
}

impl NixGraph {
    /// The same side with `build-poll-interval` set: how long Nix waits before offering a
    /// derivation the hook postponed (every slot busy) again. Nix's default is 5 s
    /// (`pollInterval`, src/libstore/globals.hh); with 0, postponed derivations are offered
    /// again whenever any build makes progress (`Worker::waitForInput`,
    /// src/libstore/build/worker.cc), which takes the wait out and leaves the cost per build.
    pub fn with_poll_interval(mut self, seconds: u32) -> Self {
        self.poll_interval = Some(seconds);
        self
    }

    /// A side on builders `0..builders`.
    pub fn new(
        env: EnvRef,
        builders: usize,
        protocol: Protocol,
        shape: Shape,
        timeout: Duration,
    ) -> Self {
        NixGraph {
            env,
            builders: builders.max(1),
            protocol,
            shape,
            timeout,
            machines: None,
            fixture: None,
            record: Record::default(),
            poll_interval: None,
        }
    }
}

impl Side for NixGraph {
    fn id(&self) -> String {
        match self.poll_interval {
            None => format!("nix-build-{}", self.builders),
            Some(p) => format!("nix-build-{}-poll{p}", self.builders),
        }
    }
    fn label(&self) -> String {
        format!(
            "nix-build -j0 --builders @machines ({}://, {} builder(s) × {} slots){}",
            self.protocol.scheme(),
            self.builders,
            self.shape.max_jobs,
            match self.poll_interval {
                None => String::new(),
                Some(p) => format!(
                    " --option build-poll-interval {p} (yardstick: Nix without its wait for a free slot)"
                ),
            }
        )
    }
    fn role(&self) -> Role {
        if self.poll_interval.is_some() {
            Role::Reference
        } else {
            Role::Baseline
        }
    }
    fn unavailable(&self) -> Option<String> {
        if self.env.rig().is_none() {
            return Some("needs the embedded rig (a client store Nix 2.8 builds from)".into());
        }
        (self.env.builder_count() < self.builders)
            .then(|| format!("needs {} builders", self.builders))
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            // The rig's lines for Nix (`root@builderN`, reached through the bench's
            // ssh_config), with max-jobs (field 4, Nix's machines.cc) set to the shape's.
            let base = self.env.machines_file(self.protocol, self.builders)?;
            let text = std::fs::read_to_string(&base)?;
            let mut out = String::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let mut f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 4 {
                    bail!("short machines line {line:?}");
                }
                let jobs = self.shape.max_jobs.to_string();
                f[3] = &jobs;
                out.push_str(&f.join(" "));
                out.push('\n');
            }
            let path = self.env.scratch().join(format!(
                "graph-machines-{}-{}",
                self.protocol.scheme(),
                self.builders
            ));
            std::fs::write(&path, out)?;
            self.machines = Some(path);
            Ok(())
        })
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            self.fixture = Some(prepare(&self.env, &self.shape).await?);
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let t0 = Instant::now();
            let cpu0 = machine_cpu();
            let fixture = self
                .fixture
                .clone()
                .ok_or_else(|| anyhow!("not prepared"))?;
            let machines = self.machines.clone().ok_or_else(|| anyhow!("not set up"))?;
            let mut args: Vec<OsString> = vec![
                // No local builds: every derivation goes through the build hook.
                "-j0".into(),
                "--builders".into(),
                format!("@{}", machines.display()).into(),
                "--no-out-link".into(),
            ];
            if let Some(p) = self.poll_interval {
                args.extend([
                    "--option".into(),
                    "build-poll-interval".into(),
                    p.to_string().into(),
                ]);
            }
            args.push(fixture.top.to_absolute(&StoreDir::default()).into());
            let mut cmd = self.env.nix_command("nix-build", args)?;
            let out = run_output(&mut cmd, self.timeout).await?;
            let printed = String::from_utf8_lossy(&out).trim().to_owned();
            let want = fixture.top_output.to_absolute(&StoreDir::default());
            if printed != want {
                bail!("nix-build printed {printed:?}, not {want}");
            }
            let by = check(&self.env, &fixture).await?;
            self.record.add(t0.elapsed(), &by, busy_since(cpu0));
            Ok(Sample::one())
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        self.record.details(&self.shape, self.builders)
    }
}

/// The sides of the workload: nixmux on 1 builder and on `farm`, Nix on `farm`.
pub fn sides(
    env: &EnvRef,
    farm: usize,
    shape: Shape,
    timeout: Duration,
) -> Vec<Box<dyn crate::runner::Side>> {
    let protocol = Protocol::Serve;
    let mut v: Vec<Box<dyn crate::runner::Side>> = vec![Box::new(NixmuxGraph::new(
        env.clone(),
        farm,
        protocol,
        shape,
    ))];
    if farm > 1 {
        v.push(Box::new(NixmuxGraph::new(env.clone(), 1, protocol, shape)));
        v.push(Box::new(
            NixmuxGraph::new(env.clone(), farm, protocol, shape).lease_first(),
        ));
    }
    v.push(Box::new(NixGraph::new(
        env.clone(),
        farm,
        protocol,
        shape,
        timeout,
    )));
    v.push(Box::new(
        NixGraph::new(env.clone(), farm, protocol, shape, timeout).with_poll_interval(0),
    ));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ideal_time_counts_rounds_per_level() {
        let s = Shape::default_for(false);
        // 128 leaves on 4 slots: 32 rounds, 8 mids: 2, top: 1.
        assert_eq!(s.ideal(1), Duration::from_millis(500 * 35));
        // 16 slots: 8 + 1 + 1.
        assert_eq!(s.ideal(4), Duration::from_millis(500 * 10));
    }

    #[test]
    fn every_leaf_feeds_one_mid() {
        let s = Shape {
            leaves: 5,
            mids: 2,
            max_jobs: 1,
            sleep_ms: 1250,
        };
        let e = s.expr("SALT");
        assert!(
            e.contains("(mk \"graph-mid-0\" [ (leaf 0) (leaf 2) (leaf 4) ])"),
            "{e}"
        );
        assert!(
            e.contains("(mk \"graph-mid-1\" [ (leaf 1) (leaf 3) ])"),
            "{e}"
        );
        assert!(e.contains("/bin/sleep 1.250;"), "{e}");
        assert!(e.contains("builtins.genList (i: mk \"graph-leaf-${toString i}\" [ ]) 5"));
    }
}
