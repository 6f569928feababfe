//! `nixmux build`: build local derivations on a builder, the way a scheduler would: copy
//! inputs, build remotely with the log streamed here, copy outputs back.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use nixmux::local::{LocalStore, LocalStoreAccess};
use nixmux::ops::{BuildOptions, TransferProgress};
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::{Builder, BuilderConfig, LogEvent, Pool, log_channel};

use crate::exit_code;

/// Options of `nixmux build`.
pub(crate) struct BuildArgs {
    pub(crate) drvs: Vec<String>,
    pub(crate) local_store: Option<String>,
    pub(crate) options: BuildOptions,
}

/// Output for people: progress bars and log lines on a terminal, plain lines otherwise.
pub(crate) struct Ui {
    multi: Option<MultiProgress>,
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

pub(crate) fn local_store(spec: Option<&str>) -> LocalStore {
    match spec {
        None | Some("auto") => LocalStore::auto(),
        Some("stdio") => LocalStore::new(LocalStoreAccess::Command(Arc::new(|| {
            let mut c = tokio::process::Command::new("nix-daemon");
            c.arg("--stdio");
            c
        }))),
        Some(socket) => LocalStore::new(LocalStoreAccess::Socket(socket.into())),
    }
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
            // Outputs without a fixed path (floating CA) count as missing.
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
        let outs: BTreeSet<StorePath> = drv
            .outputs
            .values()
            .filter_map(|o| o.path.clone())
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

/// Runs the build; returns the exit code.
pub(crate) async fn run(args: BuildArgs, builder: BuilderConfig) -> anyhow::Result<i32> {
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
    let local = local_store(args.local_store.as_deref());
    let pool = Pool::new();
    let b: Builder = pool.add(builder);
    let ui = Ui::new();
    let started = Instant::now();
    let order = match plan(&local, &roots).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("nixmux: {e}");
            return Ok(exit_code::for_kind(e.kind()));
        }
    };
    ui.line(&format!(
        "{} derivation(s) to build on {}",
        order.len(),
        b.name()
    ));
    let (logs, mut stream) = log_channel(4096);
    let printer = {
        let multi = ui.multi.clone();
        tokio::spawn(async move {
            while let Some(ev) = stream.recv().await {
                if let LogEvent::Line { text, .. } = ev {
                    let line = format!("  | {text}");
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
    let mut code = exit_code::OK;
    for drv in &order {
        ui.line(&format!("building {drv} on {}", b.name()));
        let (bar, progress) = ui.transfer("copying inputs");
        let t = Instant::now();
        let outcome = b
            .build_with_progress(&local, drv, &args.options, &logs, Some(progress))
            .await;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                ui.line(&format!("error: {e}"));
                code = exit_code::for_kind(e.kind());
                break;
            }
        };
        if !outcome.result.status.is_success() {
            ui.line(&format!(
                "build of {drv} failed ({:?}): {}",
                outcome.result.status,
                nixmux::proto::worker::strip_ansi(&outcome.result.error_msg).trim()
            ));
            for l in &outcome.log_tail {
                ui.line(&format!("  > {l}"));
            }
            code = exit_code::BUILD_FAILED;
            break;
        }
        let outputs: BTreeSet<StorePath> = outcome
            .result
            .built_outputs
            .values()
            .map(|o| o.path.clone())
            .collect();
        let (bar, progress) = ui.transfer("copying outputs");
        let fetched = b.fetch_outputs(&local, &outputs, Some(progress)).await;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        match fetched {
            Ok(r) => ui.line(&format!(
                "built {drv} in {:.1}s ({} input paths sent, {} output paths fetched, {} bytes)",
                t.elapsed().as_secs_f64(),
                outcome.pushed.transferred.len(),
                r.transferred.len(),
                r.bytes
            )),
            Err(e) => {
                ui.line(&format!("error: {e}"));
                code = exit_code::for_kind(e.kind());
                break;
            }
        }
    }
    drop(logs);
    let _ = tokio::time::timeout(Duration::from_secs(1), printer).await;
    if code == exit_code::OK {
        for root in &roots {
            if let Ok(drv) = local.read_derivation(root).await {
                for o in drv.outputs.values().filter_map(|o| o.path.as_ref()) {
                    println!("{}", o.to_absolute(&dir));
                }
            }
        }
        ui.line(&format!("done in {:.1}s", started.elapsed().as_secs_f64()));
    }
    pool.shutdown().await;
    Ok(code)
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
