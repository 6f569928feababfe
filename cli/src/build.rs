//! `nixmux build`: build local derivations on a builder, the way a scheduler would: copy
//! inputs, build remotely with the log streamed here, copy outputs back.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use nixmux::graph::BuildQueue;
use nixmux::local::{LocalStore, LocalStoreAccess};
use nixmux::ops::{BuildOptions, TransferProgress};
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::{Builder, BuilderConfig, LogEvent, Pool, log_channel};

use crate::exit_code;

/// Options of `nixmux build`.
pub(crate) struct BuildArgs {
    pub(crate) drvs: Vec<String>,
    pub(crate) local_store: Option<String>,
    pub(crate) local_store_files: Option<PathBuf>,
    pub(crate) options: BuildOptions,
    /// Builds at once (`None`: the builders' max-jobs summed).
    pub(crate) jobs: Option<usize>,
    /// Go on with what does not depend on a failed build.
    pub(crate) keep_going: bool,
    /// Where each build's log is written (`None`: a fresh directory under $TMPDIR).
    pub(crate) log_dir: Option<std::path::PathBuf>,
}

/// Output for people: progress bars and log lines on a terminal, plain lines otherwise.
pub(crate) struct Ui {
    pub(crate) multi: Option<MultiProgress>,
}

impl Ui {
    pub(crate) fn new() -> Self {
        Ui {
            multi: std::io::stderr().is_terminal().then(MultiProgress::new),
        }
    }

    pub(crate) fn line(&self, s: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(s);
            }
            None => eprintln!("{s}"),
        }
    }

    /// On a terminal, one status line for a running build: what, where, for how long, and
    /// its last log line.
    pub(crate) fn running(&self, what: &str) -> Option<ProgressBar> {
        self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(what.to_owned());
            bar.set_message("connecting");
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        })
    }

    /// A byte progress bar (terminal) or a callback printing a line per finished path.
    pub(crate) fn transfer(&self, what: &str) -> (Option<ProgressBar>, nixmux::ops::ProgressFn) {
        match &self.multi {
            Some(m) => {
                let bar = m.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_message(what.to_owned());
                let b = bar.clone();
                let f: nixmux::ops::ProgressFn = Arc::new(move |p: TransferProgress| {
                    b.set_length(p.bytes_total);
                    b.set_position(p.bytes_done);
                });
                (Some(bar), f)
            }
            None => {
                let what = what.to_owned();
                let last = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let f: nixmux::ops::ProgressFn = Arc::new(move |p: TransferProgress| {
                    let prev = last.swap(p.paths_done, std::sync::atomic::Ordering::Relaxed);
                    if p.paths_done != prev {
                        eprintln!(
                            "{what}: {}/{} paths, {}/{} bytes",
                            p.paths_done, p.paths_total, p.bytes_done, p.bytes_total
                        );
                    }
                });
                (None, f)
            }
        }
    }
}

/// The local store `spec` names (`--local-store`), its files where `files` says
/// (`--local-store-files`: a directory, or `none`).
pub(crate) fn local_store(spec: Option<&str>, files: Option<&Path>) -> LocalStore {
    let store = match spec {
        None | Some("auto") => LocalStore::auto(),
        Some("stdio") => LocalStore::new(LocalStoreAccess::Command(Arc::new(|| {
            let mut c = tokio::process::Command::new("nix-daemon");
            c.arg("--stdio");
            c
        }))),
        Some(socket) => LocalStore::new(LocalStoreAccess::Socket(socket.into())),
    };
    match files {
        None => store,
        Some(dir) if dir.as_os_str() == "none" => store.with_store_files(None),
        Some(dir) => store.with_store_files(Some(dir.to_owned())),
    }
}

/// The builders `--builder` names (all of them without it).
pub(crate) fn restrict(
    builders: Vec<BuilderConfig>,
    wanted: &[String],
) -> anyhow::Result<Vec<BuilderConfig>> {
    if builders.is_empty() {
        bail!("no builder configured");
    }
    if wanted.is_empty() {
        return Ok(builders);
    }
    let names: Vec<String> = builders.iter().map(|b| b.name.clone()).collect();
    let chosen: Vec<BuilderConfig> = builders
        .into_iter()
        .filter(|b| {
            wanted
                .iter()
                .any(|w| b.name == nixmux::setup::readable_name(w) || b.target.endpoint.host == *w)
        })
        .collect();
    if chosen.is_empty() {
        bail!(
            "no builder named {} (known: {})",
            wanted.join(" or "),
            names.join(", ")
        );
    }
    Ok(chosen)
}

pub(crate) fn pick(
    builders: Vec<BuilderConfig>,
    wanted: Option<&str>,
) -> anyhow::Result<BuilderConfig> {
    match wanted {
        Some(w) => {
            let names: Vec<String> = builders.iter().map(|b| b.name.clone()).collect();
            builders
                .into_iter()
                .find(|b| b.name == w || b.target.endpoint.host == w)
                .with_context(|| format!("no builder named {w:?} (known: {})", names.join(", ")))
        }
        None => {
            let n = builders.len();
            let mut it = builders.into_iter();
            match (it.next(), n) {
                (Some(b), 1) => Ok(b),
                (None, _) => bail!("no builder configured"),
                _ => bail!("{n} builders configured: choose one with --builder"),
            }
        }
    }
}

/// A command-line `.drv` argument as a store path: symlinks (`./result.drv`, as
/// `nix-instantiate` leaves one) are followed without requiring the target to be visible here
/// (the local store may live in another mount namespace), other relative paths made
/// absolute.
pub(crate) fn resolve_drv_arg(arg: &str) -> String {
    let mut path = std::path::PathBuf::from(arg);
    for _ in 0..8 {
        match std::fs::read_link(&path) {
            Ok(target) => {
                path = match path.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            Err(_) => break,
        }
    }
    if path.is_relative()
        && let Ok(abs) = std::path::absolute(&path)
    {
        path = abs;
    }
    path.to_string_lossy().into_owned()
}

/// A derivation's fixed output paths and how many outputs it has in all.
type Outputs = (BTreeSet<StorePath>, usize);

/// The derivations that must be built for `roots`, dependencies first: those with an
/// output that is not valid locally.
async fn plan(local: &LocalStore, roots: &[StorePath]) -> nixmux::Result<Vec<StorePath>> {
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    // Iterative post-order walk over input derivations; each `.drv` is read once, and its
    // outputs checked after its inputs were visited.
    let mut stack: Vec<(StorePath, Option<Outputs>)> =
        roots.iter().rev().map(|r| (r.clone(), None)).collect();
    while let Some((drv_path, outputs)) = stack.pop() {
        if let Some((outs, n_outputs)) = outputs {
            // Outputs with no known path (floating CA, not realised here) count as missing.
            let valid = local.query_valid_paths(&outs).await?;
            if valid.len() < n_outputs {
                order.push(drv_path);
            }
            continue;
        }
        if !seen.insert(drv_path.clone()) {
            continue;
        }
        let drv = local.read_derivation(&drv_path).await?;
        let outs: BTreeSet<StorePath> = known_outputs(local, &drv_path, &drv)
            .await?
            .into_iter()
            .collect();
        stack.push((drv_path, Some((outs, drv.outputs.len()))));
        for input in drv.input_drvs.keys() {
            if !seen.contains(input) {
                stack.push((input.clone(), None));
            }
        }
    }
    Ok(order)
}

/// The paths known for `drv`'s outputs, in output-name order: the fixed ones written in the
/// `.drv`, and for outputs without one (floating content-addressed, or deferred behind such
/// an input) what the local store has realised (`QueryDerivationOutputMap`; asked only
/// then).
async fn known_outputs(
    local: &LocalStore,
    drv_path: &StorePath,
    drv: &nixmux::proto::derivation::Derivation,
) -> nixmux::Result<Vec<StorePath>> {
    let realised = if drv.outputs.values().any(|o| o.path.is_none()) {
        local.query_derivation_output_map(drv_path).await?
    } else {
        Default::default()
    };
    Ok(drv
        .outputs
        .iter()
        .filter_map(|(name, o)| {
            o.path
                .clone()
                .or_else(|| realised.get(name).cloned().flatten())
        })
        .collect())
}

/// One derivation to build: what the scheduler needs to know about it.
struct Job {
    drv: StorePath,
    system: String,
    features: BTreeSet<String>,
    /// Derivations of this run it needs built first.
    deps: BTreeSet<StorePath>,
}

/// How one job ended.
enum Ended {
    Built,
    /// The build ran and failed: exit code 16.
    Failed,
    /// It could not run (no builder, transport, ...): that error's exit code.
    Error(i32),
}

/// Runs the builds on `builders`, scheduling the whole graph: a derivation starts once the
/// derivations it needs are built, on the builder [`Pool::select`] picks for its system and
/// required features, at most `jobs` at once (each builder also keeps to its own max-jobs).
/// Every build's log goes to a file in `log_dir`; a failed build's tail is printed.
/// Returns the exit code.
pub(crate) async fn run(args: BuildArgs, builders: Vec<BuilderConfig>) -> anyhow::Result<i32> {
    let dir = StoreDir::default();
    let roots: Vec<StorePath> = args
        .drvs
        .iter()
        .map(|d| {
            let resolved = resolve_drv_arg(d.trim());
            StorePath::parse(&dir, &resolved).with_context(|| {
                if resolved == d.trim() {
                    format!("{d}: not a path in the store")
                } else {
                    format!("{d} (-> {resolved}): not a path in the store")
                }
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let local = Arc::new(local_store(
        args.local_store.as_deref(),
        args.local_store_files.as_deref(),
    ));
    let pool = Arc::new(Pool::new());
    for b in builders {
        pool.add(b);
    }
    let slots: usize = pool
        .builders()
        .iter()
        .map(|b| usize::try_from(b.config().machine.max_jobs.max(1)).unwrap_or(1))
        .sum();
    let jobs = args.jobs.unwrap_or(slots).max(1);
    let ui = Arc::new(Ui::new());
    let started = Instant::now();
    let order = match plan(&local, &roots).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("nixmux: {e}");
            return Ok(exit_code::for_kind(e.kind()));
        }
    };
    let mut graph = Vec::with_capacity(order.len());
    let wanted: BTreeSet<StorePath> = order.iter().cloned().collect();
    for drv in &order {
        let d = match local.read_derivation(drv).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("nixmux: {e}");
                return Ok(exit_code::for_kind(e.kind()));
            }
        };
        graph.push(Job {
            drv: drv.clone(),
            system: d.platform.clone(),
            features: d
                .env
                .get("requiredSystemFeatures")
                .map(|f| f.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            deps: d
                .input_drvs
                .keys()
                .filter(|i| wanted.contains(*i))
                .cloned()
                .collect(),
        });
    }
    let log_dir = args.log_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("nixmux-build-{}", std::process::id()))
    });
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("creating the log directory {}", log_dir.display()))?;
    ui.line(&format!(
        "{} derivation(s) to build on {} builder(s), at most {jobs} at once; logs in {}",
        graph.len(),
        pool.builders().len(),
        log_dir.display()
    ));

    let mut built = 0usize;
    let mut broken: BTreeSet<StorePath> = BTreeSet::new();
    let mut code = exit_code::OK;
    // Ready derivations start longest chain first (see `nixmux::graph`), ties in plan order.
    let mut queue = BuildQueue::new(
        graph
            .iter()
            .map(|j| (j.drv.clone(), j.deps.iter().cloned().collect())),
    );
    let mut jobs_by_drv: BTreeMap<StorePath, Job> =
        graph.into_iter().map(|j| (j.drv.clone(), j)).collect();
    let skip = |lost: Vec<StorePath>, broken: &mut BTreeSet<StorePath>| {
        for drv in lost {
            ui.line(&format!("skipping {drv}: an input failed"));
            broken.insert(drv);
        }
    };
    // A derivation no builder can ever take fails now, before anything is sent anywhere:
    // without --keep-going the run stops here; with it, the rest of the graph is built.
    let impossible: Vec<StorePath> = jobs_by_drv
        .values()
        .filter_map(|job| match pool.select(&job.system, &job.features) {
            Ok(_) => None,
            Err(e) => {
                ui.line(&format!("cannot build {}: {e}", job.drv));
                if code == exit_code::OK {
                    code = exit_code::for_kind(e.kind());
                }
                Some(job.drv.clone())
            }
        })
        .collect();
    if !impossible.is_empty() && !args.keep_going {
        pool.shutdown().await;
        return Ok(code);
    }
    for drv in impossible {
        broken.insert(drv.clone());
        let lost = queue.failed(&drv);
        skip(lost, &mut broken);
    }
    let mut running = tokio::task::JoinSet::new();
    let mut stop = false;
    loop {
        while !stop && running.len() < jobs {
            let Some(job) = queue.next_ready().and_then(|d| jobs_by_drv.remove(&d)) else {
                break;
            };
            let (pool, local, ui) = (pool.clone(), local.clone(), ui.clone());
            let (options, log_dir) = (args.options.clone(), log_dir.clone());
            let single = jobs == 1;
            running.spawn(async move {
                let ended = build_one(&pool, &local, &ui, &job, &options, &log_dir, single).await;
                (job.drv, ended)
            });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (drv, ended) = joined.context("a build task failed unexpectedly")?;
        match ended {
            Ended::Built => {
                built += 1;
                queue.built(&drv);
            }
            Ended::Failed | Ended::Error(_) => {
                let c = match ended {
                    Ended::Error(c) => c,
                    _ => exit_code::BUILD_FAILED,
                };
                if code == exit_code::OK {
                    code = c;
                }
                broken.insert(drv.clone());
                let lost = queue.failed(&drv);
                skip(lost, &mut broken);
                stop = !args.keep_going;
            }
        }
    }
    if code == exit_code::OK {
        for root in &roots {
            if let Ok(drv) = local.read_derivation(root).await
                && let Ok(outs) = known_outputs(&local, root, &drv).await
            {
                for o in outs {
                    println!("{}", o.to_absolute(&dir));
                }
            }
        }
        ui.line(&format!("done in {:.1}s", started.elapsed().as_secs_f64()));
    } else {
        ui.line(&format!(
            "{} built, {} failed or skipped, in {:.1}s",
            built,
            broken.len(),
            started.elapsed().as_secs_f64()
        ));
    }
    pool.shutdown().await;
    Ok(code)
}

/// Builds one derivation on the builder the pool picks, on one lease: push the inputs, build
/// with the log to its file (and here), fetch the outputs.
async fn build_one(
    pool: &Pool,
    local: &LocalStore,
    ui: &Ui,
    job: &Job,
    options: &BuildOptions,
    log_dir: &std::path::Path,
    single: bool,
) -> Ended {
    let b = match pool.select(&job.system, &job.features) {
        Ok(b) => b,
        Err(e) => {
            ui.line(&format!("cannot build {}: {e}", job.drv));
            return Ended::Error(exit_code::for_kind(e.kind()));
        }
    };
    let name = builder_label(&b);
    let log_path = log_dir.join(format!("{}.log", job.drv));
    ui.line(&format!("building {} on {name}", job.drv));
    let t = Instant::now();
    let (logs, mut stream) = log_channel(4096);
    let short = job.drv.name().trim_end_matches(".drv").to_owned();
    let status = ui.running(&format!("{short} on {name}"));
    let writer = {
        let multi = ui.multi.clone();
        let short = short.clone();
        let path = log_path.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let mut file = std::fs::File::create(&path).ok();
            while let Some(ev) = stream.recv().await {
                if let LogEvent::Line { text, .. } = ev {
                    if let Some(bar) = &status {
                        bar.set_message(text.clone());
                    }
                    if let Some(f) = &mut file {
                        use std::io::Write;
                        let _ = writeln!(f, "{text}");
                    }
                    let line = if single {
                        format!("  | {text}")
                    } else {
                        format!("  {short} | {text}")
                    };
                    match &multi {
                        Some(m) => {
                            let _ = m.println(line);
                        }
                        None => eprintln!("{line}"),
                    }
                }
            }
        })
    };
    let result = async {
        // The slot before the session: the next job's selection sees this one at once
        // (a lease can take a while; jobs selected meanwhile would all pick this builder).
        let slot = b.build_slot().await?;
        let mut lease = b.lease().await?;
        if let Some(bar) = &status {
            bar.set_message("building");
        }
        let (bar, progress) = ui.transfer(&format!("inputs of {} to {name}", job.drv.name()));
        let outcome = lease
            .build_in_slot(slot, local, &job.drv, options, &logs, Some(progress))
            .await;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let outcome = outcome?;
        if !outcome.result.status.is_success() {
            return Ok((outcome, None));
        }
        let outputs: BTreeSet<StorePath> = outcome
            .result
            .built_outputs
            .values()
            .map(|o| o.path.clone())
            .collect();
        let (bar, progress) = ui.transfer(&format!("outputs of {} from {name}", job.drv.name()));
        let fetched = lease.fetch_outputs(local, &outputs, Some(progress)).await;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        Ok::<_, nixmux::Error>((outcome, Some(fetched?)))
    }
    .await;
    drop(logs);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    if let Some(bar) = status {
        bar.finish_and_clear();
    }
    match result {
        Err(e) => {
            ui.line(&format!("error building {} on {name}: {e}", job.drv));
            Ended::Error(exit_code::for_kind(e.kind()))
        }
        Ok((outcome, None)) => {
            ui.line(&format!(
                "build of {} on {name} failed ({:?}): {}",
                job.drv,
                outcome.result.status,
                nixmux::proto::worker::strip_ansi(&outcome.result.error_msg).trim()
            ));
            for l in &outcome.log_tail {
                ui.line(&format!("  > {l}"));
            }
            ui.line(&format!("  full log: {}", log_path.display()));
            if let nixmux::ops::LocalLog::Stored { .. } = outcome.local_log {
                ui.line(&format!(
                    "  or: nix log {}",
                    job.drv.to_absolute(local.store_dir())
                ));
            }
            Ended::Failed
        }
        Ok((outcome, Some(fetched))) => {
            ui.line(&format!(
                "built {} on {name} in {:.1}s ({} input paths sent, {} output paths fetched, {} bytes)",
                job.drv,
                t.elapsed().as_secs_f64(),
                outcome.pushed.transferred.len(),
                fetched.transferred.len(),
                fetched.bytes
            ));
            Ended::Built
        }
    }
}

/// A builder as people know it: `user@host:port`, not its whole store URL (which may carry
/// a base64 host key).
fn builder_label(b: &Builder) -> String {
    let e = &b.config().target.endpoint;
    format!("{}@{}:{}", e.user, e.host, e.port)
}

#[cfg(test)]
mod tests {
    use super::resolve_drv_arg;

    #[test]
    fn drv_arguments_follow_result_symlinks_and_absolute_paths_stay() {
        let dir = tempfile::tempdir().expect("tmp");
        let link = dir.path().join("result.drv");
        let target = "/nix/store/00000000000000000000000000000000-x.drv";
        std::os::unix::fs::symlink(target, &link).expect("symlink");
        assert_eq!(resolve_drv_arg(link.to_str().expect("utf8")), target);
        // A link to a link, relative at each step.
        let second = dir.path().join("second");
        std::os::unix::fs::symlink("result.drv", &second).expect("symlink");
        assert_eq!(resolve_drv_arg(second.to_str().expect("utf8")), target);
        assert_eq!(resolve_drv_arg(target), target);
    }
}
