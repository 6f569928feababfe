//! The streaming NAR parser against archives written by Nix 2.8.0's `nix-store --dump`
//! (`tests/data/nar/`, see `tests/data/PROVENANCE.md`), corrupted archives, and random trees.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nixmux_proto::hash::Hash;
use nixmux_proto::nar::{NarEvent, NarNode, NarParser, SingleFileNar, parse_nar};
use nixmux_proto::wire::WireWrite;
use nixmux_proto::{Limits, Malformed, ProtoError};
use proptest::prelude::*;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nar")
}

/// One archive from `expected.txt`: name, size, hash as `nix-hash --type sha256` printed it
/// (base16) and as `nix-hash --type sha256 --base32` printed it.
struct Sample {
    name: String,
    bytes: Vec<u8>,
    size: u64,
    base16: String,
    nix32: String,
}

fn samples() -> Vec<Sample> {
    let index = std::fs::read_to_string(data_dir().join("expected.txt")).expect("expected.txt");
    index
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let bytes = std::fs::read(data_dir().join(format!("{}.nar", f[0]))).expect("nar file");
            Sample {
                name: f[0].to_owned(),
                bytes,
                size: f[1].parse().expect("size"),
                base16: f[2].to_owned(),
                nix32: f[3].to_owned(),
            }
        })
        .collect()
}

/// A name within its parent directory (`None` for the root).
type Name = Option<Vec<u8>>;
/// An open directory: its name and the entries seen so far.
type OpenDir = (Name, BTreeMap<Vec<u8>, NarNode>);
/// An open file: name, executable bit, announced size, contents so far.
type OpenFile = (Name, bool, u64, Vec<u8>);

/// Rebuilds a tree from parser events; checks that the events are well nested.
#[derive(Default)]
struct TreeBuilder {
    dirs: Vec<OpenDir>,
    pending: Option<Vec<u8>>,
    file: Option<OpenFile>,
    root: Option<NarNode>,
}

impl TreeBuilder {
    fn place(&mut self, name: Option<Vec<u8>>, node: NarNode) {
        match self.dirs.last_mut() {
            Some((_, entries)) => {
                let name = name.expect("child without a name");
                assert!(entries.insert(name, node).is_none(), "duplicate entry");
            }
            None => {
                assert!(name.is_none(), "root with a name");
                assert!(self.root.replace(node).is_none(), "two roots");
            }
        }
    }

    fn event(&mut self, e: NarEvent<'_>) {
        match e {
            NarEvent::Entry { name } => {
                assert!(!self.dirs.is_empty(), "entry outside a directory");
                assert!(self.pending.replace(name.to_vec()).is_none());
            }
            NarEvent::Directory => {
                let name = self.pending.take();
                self.dirs.push((name, BTreeMap::new()));
            }
            NarEvent::DirectoryEnd => {
                let (name, entries) = self.dirs.pop().expect("unbalanced DirectoryEnd");
                self.place(name, NarNode::Directory(entries));
            }
            NarEvent::File { executable, size } => {
                assert!(self.file.is_none());
                self.file = Some((self.pending.take(), executable, size, Vec::new()));
            }
            NarEvent::Contents(piece) => {
                assert!(!piece.is_empty(), "empty contents event");
                self.file
                    .as_mut()
                    .expect("contents outside a file")
                    .3
                    .extend_from_slice(piece);
            }
            NarEvent::FileEnd => {
                let (name, executable, size, contents) = self.file.take().expect("FileEnd");
                assert_eq!(contents.len() as u64, size);
                self.place(
                    name,
                    NarNode::File {
                        executable,
                        contents,
                    },
                );
            }
            NarEvent::Symlink { target } => {
                let name = self.pending.take();
                self.place(
                    name,
                    NarNode::Symlink {
                        target: target.to_vec(),
                    },
                );
            }
        }
    }

    fn finish(self) -> NarNode {
        assert!(self.dirs.is_empty() && self.file.is_none() && self.pending.is_none());
        self.root.expect("no root")
    }
}

/// Feeds `input` in the given chunk sizes (cycled); returns bytes consumed, the parser and the
/// rebuilt tree (if complete).
fn feed_chunked(input: &[u8], chunks: &[usize]) -> (usize, NarParser, Option<NarNode>) {
    let mut p = NarParser::new(Limits::DEFAULT);
    let mut b = TreeBuilder::default();
    let mut pos = 0;
    let mut i = 0;
    while pos < input.len() {
        let n = chunks[i % chunks.len()].max(1).min(input.len() - pos);
        i += 1;
        let used = p
            .feed_with(&input[pos..pos + n], |e| b.event(e))
            .expect("valid archive");
        pos += used;
        if used < n {
            assert!(p.is_done(), "stopped early without being done");
            break;
        }
        if p.is_done() {
            break;
        }
    }
    let done = p.is_done();
    (pos, p, done.then(|| b.finish()))
}

#[test]
fn real_archives_parse_with_nix_hash() {
    let all = samples();
    assert_eq!(all.len(), 6);
    for s in &all {
        assert_eq!(s.bytes.len() as u64, s.size, "{}", s.name);
        let (used, p, tree) = feed_chunked(&s.bytes, &[usize::MAX]);
        assert!(p.is_done(), "{}", s.name);
        assert_eq!(used, s.bytes.len());
        assert_eq!(p.nar_size(), s.size);
        assert_eq!(
            p.nar_hash().expect("hashed").to_base16(),
            s.base16,
            "{}",
            s.name
        );
        assert_eq!(
            p.nar_hash().expect("hashed").to_nix32(),
            s.nix32,
            "{}",
            s.name
        );
        // Events rebuild a tree that NarNode writes back to the very same bytes Nix wrote:
        // this checks the events and the writer against Nix.
        let tree = tree.expect("complete");
        assert_eq!(tree.to_nar(), s.bytes, "{}", s.name);
        assert_eq!(tree.nar_size(), s.size);
        let info = parse_nar(&s.bytes, Limits::DEFAULT)
            .expect("valid")
            .expect("complete");
        assert_eq!(info.size, s.size);
        assert_eq!(
            info.hash,
            Hash::parse(&s.base16, Some(nixmux_proto::hash::HashAlgo::Sha256)).expect("hash")
        );
    }
}

#[test]
fn the_tree_has_what_we_put_in_it() {
    let s = samples()
        .into_iter()
        .find(|s| s.name == "tree")
        .expect("tree");
    let (_, _, tree) = feed_chunked(&s.bytes, &[4096]);
    let NarNode::Directory(root) = tree.expect("complete") else {
        panic!("root is a directory")
    };
    let names: Vec<&[u8]> = root.keys().map(Vec::as_slice).collect();
    assert_eq!(
        names,
        [
            &b"B"[..],
            b"a",
            b"dangling",
            b"eight",
            b"empty",
            b"emptydir",
            b"hello.txt",
            b"link",
            b"nine",
            b"run.sh",
            b"sub"
        ]
    );
    assert_eq!(
        root[&b"run.sh"[..]],
        NarNode::File {
            executable: true,
            contents: b"#!/bin/sh\necho hi\n".to_vec()
        }
    );
    assert_eq!(
        root[&b"link"[..]],
        NarNode::Symlink {
            target: b"hello.txt".to_vec()
        }
    );
    assert_eq!(root[&b"emptydir"[..]], NarNode::Directory(BTreeMap::new()));
    let NarNode::Directory(a) = &root[&b"a"[..]] else {
        panic!("a is a directory")
    };
    // Byte order, including a name with bytes 0xff 0xfe and one with a newline.
    let names: Vec<&[u8]> = a.keys().map(Vec::as_slice).collect();
    assert_eq!(
        names,
        [
            &b"A"[..],
            b"a-b",
            b"a.b",
            b"ab",
            b"abc",
            b"new\nline",
            b"with space",
            "ünïcödé".as_bytes(),
            b"\xff\xfe high bytes",
        ]
    );
}

#[test]
fn every_split_gives_the_same_result() {
    for s in samples() {
        let want = (s.bytes.len(), Some(s.nar_hash_bytes()));
        // One byte at a time.
        let (used, p, tree) = feed_chunked(&s.bytes, &[1]);
        assert_eq!((used, p.nar_hash()), want, "{} byte by byte", s.name);
        assert_eq!(tree.expect("complete").to_nar(), s.bytes);
        // Every two-part split (strided for the big archive to keep debug builds quick).
        let stride = if s.bytes.len() > 4096 { 61 } else { 1 };
        for cut in (0..=s.bytes.len()).step_by(stride) {
            let mut p = NarParser::new(Limits::DEFAULT);
            let a = p.feed(&s.bytes[..cut]).expect("valid prefix");
            assert_eq!(a, cut);
            assert_eq!(p.is_done(), cut == s.bytes.len());
            let b = p.feed(&s.bytes[cut..]).expect("valid rest");
            assert_eq!((a + b, p.nar_hash()), want, "{} cut at {cut}", s.name);
            assert!(p.is_done());
        }
        // Odd chunk sizes that straddle words, padding and contents.
        for chunks in [&[3usize, 5, 7][..], &[13, 1, 8, 100], &[9, 4095, 2]] {
            let (used, p, _) = feed_chunked(&s.bytes, chunks);
            assert_eq!((used, p.nar_hash()), want, "{} chunks {chunks:?}", s.name);
        }
    }
}

impl Sample {
    fn nar_hash_bytes(&self) -> Hash {
        Hash::sha256_of(&self.bytes)
    }
}

#[test]
fn truncated_archives_are_incomplete() {
    for s in samples() {
        let stride = if s.bytes.len() > 4096 { 17 } else { 1 };
        for cut in (0..s.bytes.len()).step_by(stride) {
            let mut p = NarParser::new(Limits::DEFAULT);
            assert_eq!(p.feed(&s.bytes[..cut]), Ok(cut), "{} cut at {cut}", s.name);
            assert!(!p.is_done(), "{} cut at {cut}", s.name);
            assert_eq!(parse_nar(&s.bytes[..cut], Limits::DEFAULT), Ok(None));
        }
    }
}

#[test]
fn bytes_after_the_end_are_left_alone() {
    for s in samples() {
        let mut input = s.bytes.clone();
        input.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0xde, 0xad]);
        let mut p = NarParser::new(Limits::DEFAULT);
        assert_eq!(p.feed(&input), Ok(s.bytes.len()));
        assert!(p.is_done());
        assert_eq!(p.feed(&input[s.bytes.len()..]), Ok(0));
        assert_eq!(p.nar_size(), s.size);
        assert_eq!(p.nar_hash().expect("hashed").to_base16(), s.base16);
        // The same when the end falls inside a later chunk.
        let (used, _, _) = feed_chunked(&input, &[5]);
        assert_eq!(used, s.bytes.len());
    }
}

/// Token-level builder for hand-made (and broken) archives.
struct Raw(Vec<u8>);

impl Raw {
    fn new() -> Self {
        Raw(Vec::new())
    }
    fn s(mut self, tok: &[u8]) -> Self {
        self.0.put_bytes_padded(tok);
        self
    }
    fn toks(mut self, toks: &[&[u8]]) -> Self {
        for t in toks {
            self.0.put_bytes_padded(t);
        }
        self
    }
    fn word(mut self, w: u64) -> Self {
        self.0.put_word(w);
        self
    }
    fn entry(self, name: &[u8], node: impl FnOnce(Raw) -> Raw) -> Raw {
        node(self.toks(&[b"entry", b"(", b"name", name, b"node"])).s(b")")
    }
    fn file(self, contents: &[u8]) -> Raw {
        self.toks(&[b"(", b"type", b"regular", b"contents", contents, b")"])
    }
}

fn nar() -> Raw {
    Raw::new().s(b"nix-archive-1")
}

fn dir(entries: &[(&[u8], &[u8])]) -> Raw {
    let mut r = nar().toks(&[b"(", b"type", b"directory"]);
    for (name, contents) in entries {
        r = r.entry(name, |r| r.file(contents));
    }
    r.s(b")")
}

/// Parses `bytes` in one go and in single bytes; both must fail with the same error.
fn reject(bytes: &[u8]) -> ProtoError {
    let mut p = NarParser::new(Limits::DEFAULT);
    let e = p.feed(bytes).expect_err("must be rejected");
    // Poisoned: the same error again.
    assert_eq!(p.feed(b"(").expect_err("poisoned"), e);
    let mut p = NarParser::new(Limits::DEFAULT);
    let mut e1 = None;
    for b in bytes.chunks(1) {
        if let Err(e) = p.feed(b) {
            e1 = Some(e);
            break;
        }
    }
    assert_eq!(e1.as_ref(), Some(&e), "byte-wise parse disagrees");
    e
}

fn reason(e: &ProtoError) -> String {
    e.to_string()
}

#[test]
fn hand_made_valid_archives() {
    let ok = dir(&[(b"a", b"1"), (b"b", b"22")]);
    let (used, p, _) = feed_chunked(&ok.0, &[usize::MAX]);
    assert!(p.is_done());
    assert_eq!(used, ok.0.len());
    // Deeply nested, right at the limit.
    let limits = Limits {
        max_nar_depth: 3,
        ..Limits::DEFAULT
    };
    let nested = |levels: usize| {
        let mut node = NarNode::File {
            executable: false,
            contents: vec![],
        };
        for _ in 0..levels {
            node = NarNode::Directory([(b"d".to_vec(), node)].into());
        }
        node.to_nar()
    };
    let mut p = NarParser::new(limits);
    p.feed(&nested(3)).expect("depth 3 is allowed");
    assert!(p.is_done());
    let mut p = NarParser::new(limits);
    let e = p.feed(&nested(4)).expect_err("depth 4 is too deep");
    assert!(reason(&e).contains("nested deeper than 3"), "{e}");
    // Default limit: 256 directories deep.
    let mut p = NarParser::new(Limits::DEFAULT);
    p.feed(&nested(256)).expect("256 deep");
    assert!(p.is_done());
    let mut p = NarParser::new(Limits::DEFAULT);
    assert!(p.feed(&nested(257)).is_err());
    // Token-length limits.
    let target = vec![b'x'; 100];
    let link = NarNode::Symlink { target }.to_nar();
    let tight = Limits {
        max_nar_target: 99,
        max_nar_name: 1,
        max_nar_file: 1,
        ..Limits::DEFAULT
    };
    let mut p = NarParser::new(tight);
    assert!(matches!(
        p.feed(&link),
        Err(ProtoError::Malformed {
            kind: Malformed::TooLong { len: 100, max: 99 },
            ..
        })
    ));
    let mut p = NarParser::new(tight);
    assert!(matches!(
        p.feed(&dir(&[(b"ab", b"")]).0),
        Err(ProtoError::Malformed {
            kind: Malformed::TooLong { len: 2, max: 1 },
            ..
        })
    ));
    let mut p = NarParser::new(tight);
    assert!(matches!(
        p.feed(&dir(&[(b"a", b"xx")]).0),
        Err(ProtoError::Malformed {
            field: "NAR file size",
            kind: Malformed::TooLong { len: 2, max: 1 },
        })
    ));
}

#[test]
fn corrupt_archives_are_typed_errors() {
    // Wrong magic, of the right and of a wrong length.
    let e = reject(&Raw::new().s(b"nix-archive-2").0);
    assert!(
        reason(&e).contains("doesn't look like a Nix archive"),
        "{e}"
    );
    let e = reject(&Raw::new().s(b"nix-archive-10").0);
    assert!(matches!(
        e,
        ProtoError::Malformed {
            kind: Malformed::TooLong { .. },
            ..
        }
    ));
    reject(&Raw::new().word(0x6863_7261_2d78_696e).0);

    // Directory order: unsorted and duplicate names.
    let e = reject(&dir(&[(b"b", b""), (b"a", b"")]).0);
    assert!(reason(&e).contains("not sorted"), "{e}");
    reject(&dir(&[(b"a", b""), (b"a", b"")]).0);
    // Byte order, not case-insensitive or locale order: "B" < "a" is fine, "a" < "B" is not.
    feed_chunked(&dir(&[(b"B", b""), (b"a", b"")]).0, &[7]);
    reject(&dir(&[(b"a", b""), (b"B", b"")]).0);

    // Invalid names.
    for name in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
        let e = reject(&dir(&[(name, b"x")]).0);
        assert!(reason(&e).contains("invalid file name"), "{name:?}: {e}");
    }

    // Non-zero padding: after a tag, after a name, after contents.
    let mut bad = dir(&[(b"a", b"1")]).0;
    bad[8 + 13] = 1; // inside the magic's padding
    assert!(matches!(
        reject(&bad),
        ProtoError::Malformed {
            kind: Malformed::NonZeroPadding,
            ..
        }
    ));
    let good = NarNode::File {
        executable: false,
        contents: b"abc".to_vec(),
    }
    .to_nar();
    let pos = good.windows(3).position(|w| w == b"abc").expect("contents") + 3;
    for i in pos..pos + 5 {
        let mut bad = good.clone();
        bad[i] = 0x80;
        assert!(matches!(
            reject(&bad),
            ProtoError::Malformed {
                kind: Malformed::NonZeroPadding,
                field: "NAR file contents"
            }
        ));
    }

    // Huge lengths in every length position: never an allocation, always an error.
    let huge = 1u64 << 63;
    let base = || nar().toks(&[b"(", b"type"]);
    reject(&Raw::new().word(huge).0);
    reject(&nar().word(huge).0);
    reject(&base().word(huge).0);
    reject(&base().s(b"regular").word(huge).0);
    reject(&base().s(b"regular").s(b"contents").word(huge).0);
    reject(&base().s(b"regular").s(b"contents").word(u64::MAX).0);
    reject(&base().s(b"symlink").s(b"target").word(huge).0);
    reject(
        &base()
            .s(b"directory")
            .s(b"entry")
            .s(b"(")
            .s(b"name")
            .word(huge)
            .0,
    );
    reject(&base().s(b"regular").s(b"executable").word(huge).0);

    // Grammar violations.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no open paren", nar().s(b"type").0),
        ("no type", nar().toks(&[b"(", b")"]).0),
        ("unknown type", base().s(b"fifo").0),
        (
            "contents before executable",
            base()
                .toks(&[b"regular", b"contents", b"", b"executable"])
                .0,
        ),
        (
            "regular without contents",
            base().toks(&[b"regular", b")"]).0,
        ),
        (
            "non-empty executable marker",
            base().toks(&[b"regular", b"executable", b"x"]).0,
        ),
        (
            "two executable markers",
            base()
                .toks(&[b"regular", b"executable", b"", b"executable"])
                .0,
        ),
        (
            "two contents",
            base().toks(&[b"regular", b"contents", b"", b"contents"]).0,
        ),
        (
            "empty symlink target",
            base().toks(&[b"symlink", b"target", b""]).0,
        ),
        (
            "NUL in symlink target",
            base().toks(&[b"symlink", b"target", b"a\0"]).0,
        ),
        ("symlink without target", base().toks(&[b"symlink", b")"]).0),
        (
            "stray tag in directory",
            base().toks(&[b"directory", b"contents"]).0,
        ),
        (
            "entry without name",
            base().toks(&[b"directory", b"entry", b"(", b"node"]).0,
        ),
        (
            "entry with two nodes",
            base()
                .s(b"directory")
                .entry(b"a", |r| r.file(b"").toks(&[b"node"]))
                .0,
        ),
        ("type twice", base().toks(&[b"regular", b"type"]).0),
        ("uppercase tag", base().s(b"REGULAR").0),
    ];
    for (what, bytes) in cases {
        let mut p = NarParser::new(Limits::DEFAULT);
        assert!(p.feed(&bytes).is_err(), "{what} must be rejected");
    }
}

#[test]
fn single_file_stream_matches_writer() {
    for (size, exec) in [(0u64, false), (5, true), (8, false), (70_000, true)] {
        let s = SingleFileNar::new(size, exec);
        let contents: Vec<u8> = (0..size)
            .map(|i| u8::try_from(i % 251).expect("small"))
            .collect();
        let mut streamed = s.header();
        for chunk in contents.chunks(4096) {
            streamed.extend_from_slice(chunk);
        }
        streamed.extend(s.trailer());
        assert_eq!(
            streamed,
            NarNode::File {
                executable: exec,
                contents
            }
            .to_nar()
        );
        let info = parse_nar(&streamed, Limits::DEFAULT)
            .expect("valid")
            .expect("complete");
        assert_eq!(info.size, s.nar_size());
    }
    // The single-file sample written by Nix has exactly this shape.
    let sample = samples()
        .into_iter()
        .find(|s| s.name == "single-exec")
        .expect("sample");
    let s = SingleFileNar::new(5, true);
    let mut streamed = s.header();
    streamed.extend_from_slice(b"exec\n");
    streamed.extend(s.trailer());
    assert_eq!(streamed, sample.bytes);
}

/// `nix-store --dump` of trees we write to disk must equal what `NarNode` writes. Skipped when
/// Nix is not installed; `--dump` reads a plain directory and never touches the store.
#[test]
fn writer_matches_nix_store_dump() {
    let Ok(out) = std::process::Command::new("nix-store")
        .arg("--version")
        .output()
    else {
        eprintln!("nix-store not found: skipping");
        return;
    };
    if !out.status.success() {
        return;
    }
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let base = std::env::temp_dir().join(format!("nixmux-nar-test-{}", std::process::id()));
    for i in 0..12 {
        let tree = arb_tree().new_tree(&mut runner).expect("tree").current();
        let path = base.join(i.to_string());
        materialize(&tree, &path);
        let out = std::process::Command::new("nix-store")
            .arg("--dump")
            .arg(&path)
            .output()
            .expect("run nix-store");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, tree.to_nar(), "tree {i}: {tree:?}");
    }
    let _ = std::fs::remove_dir_all(&base);
}

fn materialize(node: &NarNode, path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    match node {
        NarNode::File {
            executable,
            contents,
        } => {
            std::fs::write(path, contents).expect("write");
            let mode = if *executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        NarNode::Symlink { target } => {
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), path).expect("symlink");
        }
        NarNode::Directory(entries) => {
            std::fs::create_dir(path).expect("mkdir");
            for (name, child) in entries {
                materialize(child, &path.join(std::ffi::OsStr::from_bytes(name)));
            }
        }
    }
}

/// Valid file names: any bytes but `/` and NUL, not `.` or `..`.
fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::num::u8::ANY.prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
        1..12,
    )
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn arb_tree() -> impl Strategy<Value = NarNode> {
    let leaf = prop_oneof![
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(
            |(executable, contents)| {
                NarNode::File {
                    executable,
                    contents,
                }
            }
        ),
        prop::collection::vec(prop::num::u8::ANY.prop_filter("no NUL", |b| *b != 0), 1..30)
            .prop_map(|target| NarNode::Symlink { target }),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop::collection::btree_map(arb_name(), inner, 0..6).prop_map(NarNode::Directory)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(tree in arb_tree(), chunks in prop::collection::vec(1usize..64, 1..8)) {
        let bytes = tree.to_nar();
        prop_assert_eq!(bytes.len() as u64, tree.nar_size());
        let mut input = bytes.clone();
        input.extend_from_slice(b"trailing");
        let (used, p, rebuilt) = feed_chunked(&input, &chunks);
        prop_assert!(p.is_done());
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(p.nar_size(), bytes.len() as u64);
        prop_assert_eq!(p.nar_hash(), Some(Hash::sha256_of(&bytes)));
        prop_assert_eq!(rebuilt, Some(tree));
    }

    #[test]
    fn mutations_never_panic(
        tree in arb_tree(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        chunk in 1usize..40,
    ) {
        let mut bytes = tree.to_nar();
        for (at, b) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *b;
        }
        let end = cut.index(bytes.len() + 1);
        let bytes = &bytes[..end];
        let mut whole = NarParser::new(Limits::DEFAULT);
        let r_whole = whole.feed(bytes);
        let mut pieces = NarParser::new(Limits::DEFAULT);
        let mut r_pieces = Ok(0);
        let mut total = 0;
        for c in bytes.chunks(chunk) {
            match pieces.feed(c) {
                Ok(n) => { total += n; r_pieces = Ok(total); if pieces.is_done() { break; } }
                Err(e) => { r_pieces = Err(e); break; }
            }
        }
        prop_assert_eq!(&r_whole, &r_pieces);
        if let Ok(n) = r_whole {
            prop_assert!(n <= bytes.len());
            prop_assert!(n == bytes.len() || whole.is_done());
        }
    }
}
