//! Decoders never allocate for lengths they have not checked: with a counting global allocator,
//! the peak heap growth while decoding hostile inputs (lengths of 2^63, counts of 2^63, and
//! wire-shaped random inputs) stays within a bound set by the [`Limits`], not by the lengths
//! announced.
//!
//! This binary has one test function, so no other test thread allocates while it measures.
// A global allocator needs an `unsafe impl`; it only forwards to the system allocator.
#![allow(unsafe_code)]

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use nixmux_proto::worker::{self, Negotiated};
use nixmux_proto::{Limits, ProtocolVersion};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::*;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; the counters
// are plain atomics and never affect the returned memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let now = CURRENT.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak heap growth (bytes) while running `f`.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

fn word(w: u64) -> Vec<u8> {
    w.to_le_bytes().to_vec()
}

/// Hostile inputs: every decoder's first length or count replaced by a huge value, at
/// several depths.
fn hostile_inputs() -> Vec<Vec<u8>> {
    let huge = [1u64 << 63, u64::MAX, 1 << 40, 1 << 32];
    let mut out = Vec::new();
    let prefixes: Vec<Vec<u8>> = vec![
        vec![],
        word(1),
        [word(worker::STDERR_NEXT)].concat(),
        [word(worker::STDERR_WRITE)].concat(),
        [
            word(worker::STDERR_ERROR),
            word(5),
            b"Error\0\0\0".to_vec(),
            word(0),
        ]
        .concat(),
        [
            word(worker::STDERR_START_ACTIVITY),
            word(1),
            word(0),
            word(105),
            word(0),
        ]
        .concat(),
        [word(worker::STDERR_RESULT), word(1), word(101)].concat(),
        [word(31)].concat(),
        [word(39), word(0)].concat(),
        [word(9), word(0), word(0)].concat(),
        [
            word(13),
            b"nix-archive-1\0\0\0".to_vec(),
            word(1),
            b"(\0\0\0\0\0\0\0".to_vec(),
        ]
        .concat(),
    ];
    for p in &prefixes {
        for h in huge {
            let mut v = p.clone();
            v.extend(word(h));
            out.push(v.clone());
            v.extend(word(h));
            out.push(v);
        }
    }
    out
}

#[test]
fn decoding_hostile_input_allocates_within_the_limits() {
    let worker_versions = worker_versions();
    let serve_versions: Vec<ProtocolVersion> =
        (0..=8).map(|m| ProtocolVersion::new(2, m)).collect();
    // The counter sees allocations at all.
    let seen = peak_during(|| drop(std::hint::black_box(vec![0u8; 1 << 20])));
    assert!(seen >= 1 << 20, "{seen}");

    // 1. Lengths and counts of up to 2^64-1, with the default limits: nothing is reserved for
    //    them. The bound covers the decoders' own small allocations (error texts, one token).
    let mut worst = 0;
    for input in hostile_inputs() {
        for n in &worker_versions {
            for sv in &serve_versions {
                let peak = peak_during(|| {
                    decode_everything(&input, &Limits::DEFAULT, n, *sv);
                });
                worst = worst.max(peak);
            }
        }
    }
    eprintln!("worst peak over hostile lengths: {worst} bytes");
    assert!(worst < 64 << 10, "peak {worst} bytes for hostile lengths");

    // 2. Wire-shaped random inputs with small limits: the peak is bounded by the limits (a
    //    few lists of a few strings) whatever the input says.
    let mut runner = TestRunner::new(Config {
        cases: 512,
        ..Config::default()
    });
    let strategy = (arb_wire_input(), arb_negotiated(), arb_serve_version());
    let worst = std::cell::Cell::new(0usize);
    runner
        .run(
            &strategy,
            |(input, n, sv): (Vec<u8>, Negotiated, ProtocolVersion)| {
                let peak = peak_during(|| {
                    decode_everything(&input, &SMALL, &n, sv);
                });
                worst.set(worst.get().max(peak));
                prop_assert!(
                    peak < 64 << 10,
                    "peak {} bytes for {} input bytes",
                    peak,
                    input.len()
                );
                Ok(())
            },
        )
        .expect("bounded");
    eprintln!("worst peak over random inputs: {} bytes", worst.get());
}
