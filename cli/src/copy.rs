//! `nixmux copy`: copy closures between the local store and one builder (`nix copy
//! --to/--from ssh://...` over a pooled connection), with progress and `--json`.

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::Context;
use nixmux::ops::TransferReport;
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::{BuilderConfig, Pool};
use serde::Serialize;

use crate::build::{Ui, local_store, resolve_drv_arg};
use crate::exit_code;

/// Which way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Local store → builder.
    To,
    /// Builder → local store.
    From,
}

/// Options of `nixmux copy`.
pub(crate) struct CopyArgs {
    pub(crate) direction: Direction,
    pub(crate) paths: Vec<String>,
    pub(crate) local_store: Option<String>,
    pub(crate) local_store_files: Option<std::path::PathBuf>,
    pub(crate) json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    direction: &'static str,
    builder: &'a str,
    closure: usize,
    already_present: usize,
    transferred: Vec<String>,
    bytes: u64,
    seconds: f64,
    /// Protocol round trips with the builder, handshake included: a fixed few, whatever
    /// the number of paths.
    round_trips: u64,
    /// NARs pushed from the local store's files (the others came through its daemon).
    nars_from_files: u64,
    error: Option<String>,
}

/// Runs the copy; returns the exit code.
pub(crate) async fn run(args: CopyArgs, builder: BuilderConfig) -> anyhow::Result<i32> {
    let dir = StoreDir::default();
    let roots: BTreeSet<StorePath> = args
        .paths
        .iter()
        .map(|p| {
            let resolved = resolve_drv_arg(p.trim());
            StorePath::parse(&dir, &resolved)
                .with_context(|| format!("{p}: not a path in the store"))
        })
        .collect::<anyhow::Result<_>>()?;
    let local = local_store(
        args.local_store.as_deref(),
        args.local_store_files.as_deref(),
    );
    let pool = Pool::new();
    let b = pool.add(builder);
    let ui = Ui::new();
    let started = Instant::now();
    let (what, direction) = match args.direction {
        Direction::To => (format!("copying to {}", b.name()), "to"),
        Direction::From => (format!("copying from {}", b.name()), "from"),
    };
    let (bar, progress) = ui.transfer(&what);
    let result: nixmux::Result<TransferReport> = match args.direction {
        Direction::To => b.push_closure(&local, &roots, false, Some(progress)).await,
        Direction::From => b.fetch_outputs(&local, &roots, Some(progress)).await,
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let round_trips = b.stats().round_trips;
    pool.shutdown().await;
    let seconds = started.elapsed().as_secs_f64();
    let (code, report) = match &result {
        Ok(r) => (
            exit_code::OK,
            Report {
                ok: true,
                direction,
                builder: b.name(),
                closure: r.closure,
                already_present: r.already_present,
                transferred: r.transferred.iter().map(|p| p.to_absolute(&dir)).collect(),
                bytes: r.bytes,
                seconds,
                round_trips,
                nars_from_files: local.nars_read_from_files(),
                error: None,
            },
        ),
        Err(e) => (
            exit_code::for_kind(e.kind()),
            Report {
                ok: false,
                direction,
                builder: b.name(),
                closure: 0,
                already_present: 0,
                transferred: Vec::new(),
                bytes: 0,
                seconds,
                round_trips,
                nars_from_files: local.nars_read_from_files(),
                error: Some(e.to_string()),
            },
        ),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        match &result {
            Ok(r) => ui.line(&format!(
                "{what}: {} of {} paths ({} already there), {} bytes in {seconds:.1}s",
                r.transferred.len(),
                r.closure,
                r.already_present,
                r.bytes
            )),
            Err(e) => ui.line(&format!("error: {e}")),
        }
    }
    Ok(code)
}
