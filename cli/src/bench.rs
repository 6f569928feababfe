//! `nixmux bench`: nixmux against OpenSSH and Nix on the same builders in one run (the
//! workloads and statistics live in the nixmux-benches crate).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nixmux_benches::env::Targets;
use nixmux_benches::render;
use nixmux_benches::report::WanSettings;
use nixmux_benches::runner::{Event, Progress};
use nixmux_benches::soak;
use nixmux_benches::workloads::{self, ALL};

use crate::{BuilderArgs, exit_code, resolve};

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Builders to measure (store URLs). With none and no --machines, local rig builders
    /// are started for the run and removed afterwards.
    #[arg(value_name = "STORE-URL")]
    urls: Vec<String>,
    /// Builders from a Nix machines file.
    #[arg(long, value_name = "FILE")]
    machines: Option<PathBuf>,
    /// SSH identity for URLs that don't name one (like `ssh -i`).
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    identity: Vec<PathBuf>,
    /// known_hosts file(s) for external builders.
    #[arg(long = "known-hosts", value_name = "FILE")]
    known_hosts: Vec<PathBuf>,
    /// Workloads to run (repeatable or comma-separated). Default: cold-session, warm-op,
    /// new-channel, query, throughput, push-small, push-large and fetch-large (not under
    /// --wan), build, concurrency, builders, agent-connect. On demand: push-1gib,
    /// push-closure-1gib (long), push-real (reads system files), graph (minutes of builds);
    /// and `soak` (alone: see --duration).
    #[arg(long = "workload", value_name = "NAME", value_delimiter = ',')]
    workloads: Vec<String>,
    /// Soak: how long operations run (`60s`, `10m`, `1h`), with faults on a schedule;
    /// checks and the report come on top. Default 60s.
    #[arg(long, value_name = "D")]
    duration: Option<String>,
    /// Soak: pause between faults (default 8s for runs under 2 minutes, else 20s).
    #[arg(long = "fault-every", value_name = "D")]
    fault_every: Option<String>,
    /// Soak: operations in flight at once (default 3).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    concurrency: Option<u32>,
    /// Write the report as JSON (schema: the types in nixmux-benches' `report` module).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Directory for one SVG chart per workload (default: next to --json).
    #[arg(long, value_name = "DIR")]
    charts: Option<PathBuf>,
    /// Measured repetitions per side (default: per workload).
    #[arg(long, value_name = "N")]
    repeat: Option<u32>,
    /// Small sizes and few repetitions (CI-sized).
    #[arg(long)]
    quick: bool,
    /// Emulate a WAN link between client and rig builders: round trip in ms and rate in
    /// Mbit/s (0: unlimited), e.g. `50:100`.
    #[arg(long, value_name = "RTT_MS:MBIT")]
    wan: Option<String>,
    /// Number of local rig builders (default 4, 2 with --quick and for the soak).
    #[arg(long, value_name = "N")]
    builders: Option<usize>,
    /// sshd `MaxSessions` of the local rig builders (default 10, sshd's own): e.g. 2 to see
    /// how each side copes with a builder that takes few sessions per connection.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_sessions: Option<u32>,
}

fn parse_wan(s: &str) -> anyhow::Result<WanSettings> {
    let (rtt, rate) = s.split_once(':').unwrap_or((s, "0"));
    let rtt_ms: f64 = rtt.trim().parse().context("--wan: RTT in milliseconds")?;
    let mbit: f64 = rate.trim().parse().context("--wan: rate in Mbit/s")?;
    if !(0.0..=10_000.0).contains(&rtt_ms) || mbit < 0.0 {
        bail!("--wan {s}: RTT must be 0..10000 ms and the rate non-negative");
    }
    Ok(WanSettings {
        rtt_ms,
        mbit: (mbit > 0.0).then_some(mbit),
    })
}

/// Live progress: a bar per workload on a terminal, plain lines otherwise.
struct Display {
    bar: Mutex<Option<ProgressBar>>,
    tty: bool,
    workload: Mutex<String>,
}

fn fmt_d(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.2} ms", s * 1e3)
    }
}

impl Progress for Display {
    fn event(&self, e: &Event) {
        let Ok(mut bar) = self.bar.lock() else { return };
        match e {
            Event::Workload {
                name,
                title,
                total_samples,
            } => {
                if let Ok(mut w) = self.workload.lock() {
                    w.clone_from(name);
                }
                if self.tty {
                    let b = ProgressBar::new(*total_samples);
                    if let Ok(style) = ProgressStyle::with_template(
                        "{prefix:>14} [{bar:30}] {pos}/{len} {elapsed:>4} {msg}",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                    b.set_prefix(name.clone());
                    b.enable_steady_tick(Duration::from_millis(200));
                    *bar = Some(b);
                } else {
                    eprintln!("nixmux bench: {name}: {title} ({total_samples} samples)");
                }
            }
            Event::Sample {
                case,
                side,
                warmup,
                result,
            } => {
                let what = match result {
                    Ok(d) => fmt_d(*d),
                    Err(e) => format!("failed: {}", e.chars().take(160).collect::<String>()),
                };
                let case = if case.is_empty() {
                    String::new()
                } else {
                    format!("{case} ")
                };
                let warm = if *warmup { " (warm-up)" } else { "" };
                match bar.as_ref() {
                    Some(b) => {
                        b.inc(1);
                        b.set_message(format!("{case}{side}: {what}{warm}"));
                    }
                    None => {
                        let w = self.workload.lock().map(|w| w.clone()).unwrap_or_default();
                        eprintln!("  {w} {case}{side}: {what}{warm}");
                    }
                }
            }
            Event::Note(n) => match bar.as_ref() {
                Some(b) => b.println(format!("  {n}")),
                None => eprintln!("nixmux bench: {n}"),
            },
            Event::WorkloadDone { .. } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
            }
        }
    }
}

/// Runs `nixmux bench`.
pub(crate) fn main(args: BenchArgs) -> anyhow::Result<i32> {
    if args.workloads.iter().any(|w| w.trim() == "soak") {
        return soak(args);
    }
    if args.duration.is_some() || args.fault_every.is_some() || args.concurrency.is_some() {
        eprintln!("nixmux: --duration, --fault-every and --concurrency apply to --workload soak");
        return Ok(exit_code::CONFIG);
    }
    let wan = args.wan.as_deref().map(parse_wan).transpose()?;
    let targets = if args.urls.is_empty() && args.machines.is_none() {
        if !args.identity.is_empty() || !args.known_hosts.is_empty() {
            bail!("-i and --known-hosts apply to external builders (STORE-URL or --machines)");
        }
        Targets::Embedded {
            builders: args
                .builders
                .unwrap_or_else(|| workloads::default_builders(args.quick))
                .max(1),
            max_sessions: args.max_sessions,
        }
    } else {
        if args.max_sessions.is_some() {
            bail!("--max-sessions configures local rig builders; it cannot change external ones");
        }
        let resolved = match resolve::builders(&BuilderArgs {
            urls: args.urls.clone(),
            machines: args.machines.clone(),
            identity: args.identity.clone(),
            known_hosts: args.known_hosts.clone(),
            ssh_config: None,
            connect_timeout: 10.0,
        }) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("nixmux: {e:#}");
                return Ok(exit_code::CONFIG);
            }
        };
        for s in &resolved.skipped {
            eprintln!("nixmux: skipping {s}");
        }
        if resolved.builders.is_empty() {
            eprintln!("nixmux: no SSH builders to measure");
            return Ok(exit_code::NO_BUILDERS);
        }
        Targets::External(resolved.builders)
    };
    let mut names: Vec<String> = args
        .workloads
        .iter()
        .map(|w| w.trim().to_owned())
        .filter(|w| !w.is_empty())
        .collect();
    if names.is_empty() {
        names = workloads::default_workloads(wan.is_some());
    }
    for n in &names {
        if !ALL.contains(&n.as_str()) {
            eprintln!("nixmux: unknown workload {n:?}; known: {}", ALL.join(", "));
            return Ok(exit_code::CONFIG);
        }
    }
    let display = Display {
        bar: Mutex::new(None),
        tty: std::io::stderr().is_terminal(),
        workload: Mutex::new(String::new()),
    };
    let options = workloads::Options {
        targets,
        workloads: names,
        repeat: args.repeat,
        quick: args.quick,
        wan,
    };
    let rt = tokio::runtime::Runtime::new()?;
    // On Ctrl-C the run is dropped: that stops every ssh and nix child (kill on drop) and
    // tears the rig builders down (the rig's Drop) before we exit.
    let outcome = rt.block_on(async {
        tokio::select! {
            r = workloads::run(options, &display) => r.map(Some),
            _ = tokio::signal::ctrl_c() => Ok(None),
        }
    });
    // Let child-reaping and close tasks finish before the runtime goes.
    rt.shutdown_timeout(Duration::from_secs(10));
    let Some(report) = outcome? else {
        eprintln!("nixmux bench: interrupted; builders stopped");
        // 128 + SIGINT, as a shell reports it.
        return Ok(130);
    };

    print!("{}", render::table(&report));
    if let Some(path) = &args.json {
        let text = report.to_json()?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("nixmux bench: JSON report in {}", path.display());
    }
    let chart_dir: Option<PathBuf> = args.charts.clone().or_else(|| {
        args.json.as_ref().map(|j| {
            let stem = j
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "bench".into());
            j.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .join(format!("{stem}-charts"))
        })
    });
    if let Some(dir) = chart_dir {
        let written = render::write_charts(&report, &dir)
            .with_context(|| format!("writing charts into {}", dir.display()))?;
        eprintln!(
            "nixmux bench: {} chart(s) in {}",
            written.len(),
            dir.display()
        );
    }
    Ok(exit_code::OK)
}

/// `nixmux bench --workload soak`: a long mixed run with faults on local rig builders; the
/// exit code says whether every check held.
fn soak(args: BenchArgs) -> anyhow::Result<i32> {
    if args.workloads.iter().any(|w| w.trim() != "soak") {
        eprintln!("nixmux: the soak workload runs alone");
        return Ok(exit_code::CONFIG);
    }
    if !args.urls.is_empty() || args.machines.is_some() || args.wan.is_some() {
        eprintln!(
            "nixmux: the soak injects faults into local rig builders; it takes no STORE-URL, --machines or --wan"
        );
        return Ok(exit_code::CONFIG);
    }
    let duration = match soak::parse_duration(args.duration.as_deref().unwrap_or("60s")) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("nixmux: --duration: {e:#}");
            return Ok(exit_code::CONFIG);
        }
    };
    let mut options = soak::SoakOptions::new(duration);
    if let Some(f) = &args.fault_every {
        match soak::parse_duration(f) {
            Ok(d) => options.fault_every = d,
            Err(e) => {
                eprintln!("nixmux: --fault-every: {e:#}");
                return Ok(exit_code::CONFIG);
            }
        }
    }
    if let Some(c) = args.concurrency {
        options.concurrency = usize::try_from(c).unwrap_or(3);
    }
    if let Some(b) = args.builders {
        options.builders = b.max(1);
    }
    let display = Display {
        bar: Mutex::new(None),
        tty: false,
        workload: Mutex::new(String::new()),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let outcome = rt.block_on(async {
        tokio::select! {
            r = soak::run(options, &display) => r.map(Some),
            _ = tokio::signal::ctrl_c() => Ok(None),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(10));
    let Some(report) = outcome? else {
        eprintln!("nixmux bench: interrupted; builders stopped");
        return Ok(130);
    };
    print!("{}", soak::table(&report));
    if let Some(path) = &args.json {
        let text = report.to_json()?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("nixmux bench: JSON report in {}", path.display());
    }
    // The chart goes next to the JSON report (or into --charts).
    let chart_dir = args.charts.clone().or_else(|| {
        args.json.as_ref().map(|j| {
            j.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned()
        })
    });
    if let Some(dir) = chart_dir {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let p = dir.join("soak.svg");
        std::fs::write(&p, soak::chart(&report))
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("nixmux bench: chart in {}", p.display());
    }
    Ok(if report.passed {
        exit_code::OK
    } else {
        exit_code::FAILURE
    })
}
