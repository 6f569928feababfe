//! Writes a seed corpus for every fuzz target from recorded Nix conversations, archives and
//! derivations (run by `scripts/fuzz-seed`, which then minimises the result; see README.md).
//!
//! ```text
//! cargo run --release --manifest-path fuzz/Cargo.toml --example seed -- OUT \
//!     [--transcripts DIR] [--nar DIR] [--drv DIR]
//! ```
//!
//! writes `OUT/<target>/<name>` for the 7 targets. The defaults are the test data of
//! `nixmux-proto`: `proto/tests/data/{transcripts/nix-2.8.0,nar,drv}`.
//!
//! How the conversations are cut into seeds: the recordings are one file per direction, and the
//! folder name says the protocol (`…-ssh-ng` is the worker protocol, `…-ssh` the serve one).
//! Rather than re-implementing the conversation's grammar here, every target function is tried
//! at every byte offset of every recording of its direction and protocol, behind every selector
//! (protocol version × decoder, see `src/lib.rs`). A target function returns how many bytes the
//! messages it accepted span, so wherever it accepts something the seed is exactly the
//! selector bytes followed by those messages. A request or reply is thus seeded at every
//! version that accepts it; `cargo fuzz cmin` later keeps only the inputs that add coverage.
//!
//! * `serve_requests`, `worker_requests`: client → server recordings;
//! * `serve_replies`, `worker_replies`: server → client recordings;
//! * `values` (path infos, build results, `BasicDerivation`s): both directions, both
//!   protocols, because these records travel both ways;
//! * `nar`: every archive found inside a recording (where the `nix-archive-1` magic string
//!   starts) and the `.nar` files, at several chunk sizes;
//! * `derivation`: the `.drv` files.
//!
//! Each target is also seeded with the small limits (top bit of the first byte) at the
//! recordings' own versions, so the "too long" paths start close to real data. A target that
//! panics on recorded data is a bug: it is reported, written as a seed (named `panic-…`) and
//! the program exits with status 1.

use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A target function, as the fuzz targets call it.
type Target = fn(&[u8]) -> usize;

/// Which recordings feed a target.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Client → server recordings of the serve protocol.
    ServeRequests,
    ServeReplies,
    WorkerRequests,
    WorkerReplies,
    /// Every recording.
    All,
}

/// The serve protocol minors (2.0–2.8) as `serve_version` maps the first byte.
const SERVE_VERSIONS: u8 = 9;
/// The worker versions `negotiated` maps the first byte to (index 17: 1.38 with features).
const WORKER_VERSIONS: u8 = 18;
/// The recordings' own versions: serve 2.7 and worker 1.34 (index 12).
const SERVE_RECORDED: u8 = 7;
const WORKER_RECORDED: u8 = 12;
/// The top bit of the first byte: small limits.
const SMALL: u8 = 0x80;

/// The selector prefixes tried for one target: every version × every decoder, plus the
/// recorded version × every decoder with small limits.
fn prefixes(versions: u8, recorded: u8, decoders: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for v in (0..versions).chain([recorded | SMALL]) {
        for &d in decoders {
            out.push(vec![v, d]);
        }
    }
    out
}

struct Recording {
    name: String,
    feed: Feed,
    bytes: Vec<u8>,
}

fn recordings(dir: &Path) -> std::io::Result<Vec<Recording>> {
    let mut out = Vec::new();
    for conv in sorted_entries(dir)? {
        if !conv.is_dir() {
            continue;
        }
        let folder = file_name(&conv);
        let worker = folder.ends_with("-ssh-ng");
        for file in sorted_entries(&conv)? {
            let name = file_name(&file);
            let requests = if name.ends_with("client-to-server.bin") {
                true
            } else if name.ends_with("server-to-client.bin") {
                false
            } else {
                continue;
            };
            let feed = match (worker, requests) {
                (false, true) => Feed::ServeRequests,
                (false, false) => Feed::ServeReplies,
                (true, true) => Feed::WorkerRequests,
                (true, false) => Feed::WorkerReplies,
            };
            out.push(Recording {
                name: format!("{folder}-{}", name.trim_end_matches(".bin")),
                feed,
                bytes: std::fs::read(&file)?,
            });
        }
    }
    Ok(out)
}

fn sorted_entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    v.sort();
    Ok(v)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The seeds of one target, deduplicated by content.
struct Seeds {
    dir: PathBuf,
    seen: HashSet<Vec<u8>>,
    panics: usize,
}

impl Seeds {
    fn new(out: &Path, target: &str) -> std::io::Result<Self> {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            seen: HashSet::new(),
            panics: 0,
        })
    }

    /// Runs `target` on `prefix ++ rest`; keeps the prefix and the accepted bytes, if any.
    fn try_at(
        &mut self,
        target: Target,
        prefix: &[u8],
        rest: &[u8],
        name: &str,
    ) -> std::io::Result<()> {
        let mut input = prefix.to_vec();
        input.extend_from_slice(rest);
        match panic::catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(0) => Ok(()),
            Ok(used) => {
                input.truncate(prefix.len() + used);
                self.write(input, &format!("{name}-{}", hex(prefix)))
            }
            Err(_) => {
                self.panics += 1;
                eprintln!("PANIC on {name} with selector {}", hex(prefix));
                self.write(input, &format!("panic-{name}-{}", hex(prefix)))
            }
        }
    }

    fn write(&mut self, input: Vec<u8>, name: &str) -> std::io::Result<()> {
        if self.seen.contains(&input) {
            return Ok(());
        }
        std::fs::write(self.dir.join(name), &input)?;
        self.seen.insert(input);
        Ok(())
    }
}

/// Every offset of every recording of `feed`, behind every prefix.
fn scan(
    seeds: &mut Seeds,
    target: Target,
    recs: &[Recording],
    feed: Feed,
    prefixes: &[Vec<u8>],
) -> std::io::Result<()> {
    for rec in recs.iter().filter(|r| feed == Feed::All || r.feed == feed) {
        for at in 0..rec.bytes.len() {
            for p in prefixes {
                seeds.try_at(target, p, &rec.bytes[at..], &format!("{}@{at}", rec.name))?;
            }
        }
    }
    Ok(())
}

/// Files in `dir` ending with `ext`, with their names.
fn files(dir: &Path, ext: &str) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for p in sorted_entries(dir)? {
        let name = file_name(&p);
        if name.ends_with(ext) {
            out.push((name, std::fs::read(&p)?));
        }
    }
    Ok(out)
}

/// The length-prefixed, padded `nix-archive-1` string a NAR starts with.
const NAR_MAGIC: &[u8] = b"\x0d\0\0\0\0\0\0\0nix-archive-1\0\0\0";

fn run(out: &Path, transcripts: &Path, nar_dir: &Path, drv_dir: &Path) -> std::io::Result<usize> {
    let recs = recordings(transcripts)?;
    let mut panics = 0;
    let mut report = |target: &str, seeds: &Seeds| {
        println!("{target}: {} seeds", seeds.seen.len());
        panics += seeds.panics;
    };

    // serve_requests has no decoder byte: bit 6 of the first byte selects the hello.
    let mut s = Seeds::new(out, "serve_requests")?;
    let serve_req: Vec<Vec<u8>> = (0..SERVE_VERSIONS)
        .chain([0x40, SERVE_RECORDED | SMALL, 0x40 | SMALL])
        .map(|v| vec![v])
        .collect();
    scan(
        &mut s,
        nixmux_fuzz::serve_requests,
        &recs,
        Feed::ServeRequests,
        &serve_req,
    )?;
    report("serve_requests", &s);

    let mut s = Seeds::new(out, "serve_replies")?;
    let p = prefixes(SERVE_VERSIONS, SERVE_RECORDED, &[0, 1, 2, 3, 4, 5, 6, 7]);
    scan(
        &mut s,
        nixmux_fuzz::serve_replies,
        &recs,
        Feed::ServeReplies,
        &p,
    )?;
    report("serve_replies", &s);

    let mut s = Seeds::new(out, "worker_requests")?;
    let p = prefixes(WORKER_VERSIONS, WORKER_RECORDED, &[0, 1, 2, 3, 4, 5]);
    scan(
        &mut s,
        nixmux_fuzz::worker_requests,
        &recs,
        Feed::WorkerRequests,
        &p,
    )?;
    report("worker_requests", &s);

    let mut s = Seeds::new(out, "worker_replies")?;
    let p = prefixes(
        WORKER_VERSIONS,
        WORKER_RECORDED,
        &[0, 1, 2, 3, 4, 5, 6, 7, 8],
    );
    scan(
        &mut s,
        nixmux_fuzz::worker_replies,
        &recs,
        Feed::WorkerReplies,
        &p,
    )?;
    report("worker_replies", &s);

    // values: only the worker-keyed path info (decoder 0) depends on the version; the build
    // result decoder (2) takes its layout from the upper bits of the decoder byte.
    let mut s = Seeds::new(out, "values")?;
    let mut p = prefixes(WORKER_VERSIONS, WORKER_RECORDED, &[0]);
    let layouts = (0..3u8).flat_map(|o| (0..4u8).map(move |tc| 2 | (tc << 4) | (o << 6)));
    for d in [1, 3].into_iter().chain(layouts) {
        p.push(vec![0, d]);
        p.push(vec![SMALL, d]);
    }
    scan(&mut s, nixmux_fuzz::values, &recs, Feed::All, &p)?;
    report("values", &s);

    // nar: the first byte is the chunk size - 1 (and the limits).
    let mut s = Seeds::new(out, "nar")?;
    let chunkings: [&[u8]; 6] = [&[0x00], &[0x07], &[0x0c], &[0x3f], &[0x7f], &[0x87]];
    for rec in &recs {
        for at in 0..rec.bytes.len() {
            if rec.bytes[at..].starts_with(NAR_MAGIC) {
                for p in chunkings {
                    s.try_at(
                        nixmux_fuzz::nar,
                        p,
                        &rec.bytes[at..],
                        &format!("{}@{at}", rec.name),
                    )?;
                }
            }
        }
    }
    for (name, bytes) in files(nar_dir, ".nar")? {
        for p in chunkings {
            s.try_at(nixmux_fuzz::nar, p, &bytes, &name)?;
        }
    }
    report("nar", &s);

    let mut s = Seeds::new(out, "derivation")?;
    for (name, bytes) in files(drv_dir, ".drv")? {
        for p in [[0x00], [SMALL]] {
            s.try_at(nixmux_fuzz::derivation, &p, &bytes, &name)?;
        }
    }
    report("derivation", &s);

    Ok(panics)
}

fn main() -> ExitCode {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/tests/data");
    let mut transcripts = data.join("transcripts/nix-2.8.0");
    let mut nar_dir = data.join("nar");
    let mut drv_dir = data.join("drv");
    let mut out = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let slot = match a.to_str() {
            Some("--transcripts") => &mut transcripts,
            Some("--nar") => &mut nar_dir,
            Some("--drv") => &mut drv_dir,
            _ if out.is_none() => {
                out = Some(PathBuf::from(a));
                continue;
            }
            _ => {
                eprintln!("unexpected argument {a:?}");
                return ExitCode::from(2);
            }
        };
        let Some(v) = args.next() else {
            eprintln!("{a:?} needs a directory");
            return ExitCode::from(2);
        };
        *slot = PathBuf::from(v);
    }
    let Some(out) = out else {
        eprintln!("usage: seed OUT [--transcripts DIR] [--nar DIR] [--drv DIR]");
        return ExitCode::from(2);
    };
    // The targets panic on purpose when a check fails; the count below says so once.
    panic::set_hook(Box::new(|info| eprintln!("{info}")));
    match run(&out, &transcripts, &nar_dir, &drv_dir) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("{n} inputs from real data made a target panic (written as panic-*)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("seed: {e}");
            ExitCode::FAILURE
        }
    }
}
