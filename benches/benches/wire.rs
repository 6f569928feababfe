//! Wire codec throughput, decoding from memory (no I/O):
//!
//! * a serve `QueryPathInfos` reply of 10 000 paths (`serve::read_path_infos`);
//! * a worker `QueryValidPaths` reply of 10 000 paths (`worker::read_path_set`);
//! * 1 GiB streamed through `NarParser` (parse + SHA-256), generated with `SingleFileNar`
//!   and fed in 64 KiB and 256 KiB chunks from one reused buffer: nothing holds the GiB.
//!
//! Run: `cargo bench -p nixmux-benches --bench wire`. Results: `docs/benchmarks.md`.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nixmux_proto::Limits;
use nixmux_proto::hash::{Hash, Sha256};
use nixmux_proto::nar::{NarParser, SingleFileNar};
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve;
use nixmux_proto::store_path::{StoreDir, StorePath, put_store_path_set};
use nixmux_proto::wire::try_decode;
use nixmux_proto::worker;

const PATHS: usize = 10_000;

/// A store path whose hash part comes from `i` (names like real package outputs).
fn path(i: usize, name: &str) -> StorePath {
    let mut h = [0u8; 20];
    for (k, b) in h.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761).wrapping_add(k * 97) >> (k % 24)).to_le_bytes()[0];
    }
    h[..8].copy_from_slice(&(i as u64).to_le_bytes());
    StorePath::new(h, name).expect("valid store path")
}

/// 10 000 realistic path infos: a deriver, 3 references, one signature, 20% with a `ca`.
fn path_infos() -> Vec<PathInfo> {
    (0..PATHS)
        .map(|i| PathInfo {
            path: path(i, &format!("package-{i}-1.2.3")),
            deriver: Some(path(i + 1_000_000, &format!("package-{i}-1.2.3.drv"))),
            nar_hash: Hash::sha256_of(&i.to_le_bytes()),
            references: (1..=3)
                .map(|k| path((i + k * 7) % PATHS, "dep-lib"))
                .collect(),
            registration_time: 0,
            nar_size: 100_000 + i as u64,
            ultimate: false,
            sigs: BTreeSet::from([format!("cache.nixos.org-1:{}", "A".repeat(86) + "==")]),
            ca: (i % 5 == 0).then(|| format!("fixed:r:sha256:{}", "1".repeat(52))),
        })
        .collect()
}

fn decoders(c: &mut Criterion) {
    let dir = StoreDir::default();
    let limits = Limits::DEFAULT;

    let infos = path_infos();
    let mut reply = Vec::new();
    serve::write_path_infos(&mut reply, &dir, &infos);
    let mut g = c.benchmark_group("serve QueryPathInfos reply, 10 000 paths");
    g.throughput(Throughput::Bytes(reply.len() as u64));
    g.bench_function("read_path_infos", |b| {
        b.iter(|| {
            let (v, used) = try_decode(black_box(&reply), &limits, |r| {
                serve::read_path_infos(r, &dir)
            })
            .expect("valid")
            .expect("complete");
            assert_eq!((v.len(), used), (PATHS, reply.len()));
            v
        })
    });
    g.finish();

    let set: BTreeSet<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    let mut reply = Vec::new();
    put_store_path_set(&mut reply, &dir, &set);
    let mut g = c.benchmark_group("worker QueryValidPaths reply, 10 000 paths");
    g.throughput(Throughput::Bytes(reply.len() as u64));
    g.bench_function("read_path_set", |b| {
        b.iter(|| {
            let (v, _) = try_decode(black_box(&reply), &limits, |r| {
                worker::read_path_set(r, &dir)
            })
            .expect("valid")
            .expect("complete");
            assert_eq!(v.len(), PATHS);
            v
        })
    });
    g.finish();
}

fn nar_parser(c: &mut Criterion) {
    const SIZE: u64 = 1 << 30;
    let nar = SingleFileNar::new(SIZE, false);
    let (header, trailer) = (nar.header(), nar.trailer());
    let mut g = c.benchmark_group("NarParser, 1 GiB single file (parse + SHA-256)");
    g.throughput(Throughput::Bytes(nar.nar_size()));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(15));
    for chunk in [64usize << 10, 256 << 10] {
        // Arbitrary, non-uniform contents; one buffer reused for the whole GiB.
        let buf: Vec<u8> = (0..chunk)
            .map(|i| (i * 31 % 251).to_le_bytes()[0])
            .collect();
        g.bench_function(format!("{} KiB chunks", chunk >> 10), |b| {
            b.iter(|| {
                let mut p = NarParser::new(Limits::DEFAULT);
                p.feed(&header).expect("header");
                let mut left = SIZE;
                while left > 0 {
                    let n = usize::try_from(left.min(chunk as u64)).expect("fits");
                    let used = p.feed(black_box(&buf[..n])).expect("contents");
                    debug_assert_eq!(used, n);
                    left -= n as u64;
                }
                p.feed(&trailer).expect("trailer");
                assert!(p.is_done());
                p.nar_hash()
            })
        });
    }
    // The floor: SHA-256 alone over the same bytes (the parser hashes everything it reads).
    let buf = vec![0x5au8; 256 << 10];
    g.bench_function("SHA-256 alone, 256 KiB chunks", |b| {
        b.iter(|| {
            let mut h = Sha256::new();
            for _ in 0..(SIZE / (256 << 10)) {
                h.update(black_box(&buf));
            }
            h.finish()
        })
    });
    g.finish();
}

criterion_group!(benches, decoders, nar_parser);
criterion_main!(benches);
