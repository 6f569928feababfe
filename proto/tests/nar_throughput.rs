//! Throughput of the NAR parser on one large file (hashing included), without holding it.
//!
//! Ignored by default; run in release mode:
//! `cargo test --release -p nixmux-proto --test nar_throughput -- --ignored --nocapture`.
//! The goal is at least 1 GiB/s on one core (SHA-256 dominates; `sha2` uses the CPU's SHA
//! extensions when present).

use std::time::Instant;

use nixmux_proto::Limits;
use nixmux_proto::nar::{NarEvent, NarParser, SingleFileNar};

#[test]
#[ignore = "benchmark: run in release mode with --ignored"]
fn one_gib_single_file() {
    const SIZE: u64 = 1 << 30;
    const CHUNK: usize = 1 << 20;
    let nar = SingleFileNar::new(SIZE, false);
    let chunk: Vec<u8> = (0..CHUNK)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31))
        .collect();
    let mut p = NarParser::new(Limits::DEFAULT);
    let mut seen = 0u64;
    let start = Instant::now();
    p.feed(&nar.header()).expect("header");
    let mut left = SIZE;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).expect("fits");
        let used = p
            .feed_with(&chunk[..n], |e| {
                if let NarEvent::Contents(c) = e {
                    seen += c.len() as u64;
                }
            })
            .expect("valid");
        assert_eq!(used, n);
        left -= n as u64;
    }
    p.feed(&nar.trailer()).expect("trailer");
    let secs = start.elapsed().as_secs_f64();
    assert!(p.is_done());
    assert_eq!(seen, SIZE);
    assert_eq!(p.nar_size(), nar.nar_size());
    let gib_s = nar.nar_size() as f64 / secs / f64::from(1u32 << 30);
    println!("NAR parse + SHA-256: {gib_s:.2} GiB/s ({secs:.3} s for 1 GiB)");
}
