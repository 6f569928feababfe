//! Replays the committed corpus (`fuzz/corpus/<target>/`) and the inputs of past findings
//! (`fuzz/regressions/<target>/`) through the same functions the fuzz targets call, on the
//! stable toolchain and without libFuzzer, so CI (`scripts/fuzz-build`) notices when a change
//! to `nixmux-proto` makes any of them panic or fail a round-trip check again.
//!
//! It runs in the dev profile: overflow checks and debug assertions are on, as in the
//! campaign's `-a` build (docs/fuzzing.md).

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

fn replay(target: &str, run: fn(&[u8]) -> usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut inputs = 0;
    let mut failures = Vec::new();
    for dir in ["corpus", "regressions"] {
        let dir = root.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            // A target without findings has no regressions folder.
            continue;
        };
        let mut paths: Vec<_> = entries
            .map(|e| e.expect("a readable corpus folder").path())
            .collect();
        paths.sort();
        for path in paths {
            let data =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            inputs += 1;
            if panic::catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(
        inputs > 0,
        "no corpus for {target}: run scripts/fuzz-seed (fuzz/README.md)"
    );
    assert!(
        failures.is_empty(),
        "{target}: {} of {inputs} inputs fail (replay one with `cargo +nightly fuzz run \
         {target} <file>`):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn serve_requests() {
    replay("serve_requests", nixmux_fuzz::serve_requests);
}

#[test]
fn serve_replies() {
    replay("serve_replies", nixmux_fuzz::serve_replies);
}

#[test]
fn worker_requests() {
    replay("worker_requests", nixmux_fuzz::worker_requests);
}

#[test]
fn worker_replies() {
    replay("worker_replies", nixmux_fuzz::worker_replies);
}

#[test]
fn values() {
    replay("values", nixmux_fuzz::values);
}

#[test]
fn nar() {
    replay("nar", nixmux_fuzz::nar);
}

#[test]
fn derivation() {
    replay("derivation", nixmux_fuzz::derivation);
}
