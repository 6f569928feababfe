//! Store path validation and ordering, with paths from the Nix 2.8.0 transcripts.

use std::collections::BTreeSet;

use nixmux_proto::Limits;
use nixmux_proto::hash::Hash;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::store_path::{
    StoreDir, StorePath, check_name, make_source_path, put_opt_store_path, put_store_path,
    put_store_path_set, read_opt_store_path, read_store_path, read_store_path_set,
};
use nixmux_proto::wire::{WireWrite, try_decode};
use proptest::prelude::*;

const HOOK_TWO_DRV: &str = "/nix/store/8hbpqnh0lyz7bvx6kk3bdi6hhi4l0a3s-hook-two.drv";
const HOOK_SRC: &str = "/nix/store/da3jygvvij1ybx9bjg7h0g0l8b9izvgw-hook-src";

#[test]
fn parses_real_paths() {
    let dir = StoreDir::default();
    let p = StorePath::parse(&dir, HOOK_TWO_DRV).expect("valid");
    assert_eq!(p.hash_part(), "8hbpqnh0lyz7bvx6kk3bdi6hhi4l0a3s");
    assert_eq!(p.name(), "hook-two.drv");
    assert!(p.is_derivation());
    assert_eq!(p.to_absolute(&dir), HOOK_TWO_DRV);
    assert_eq!(
        p.to_string(),
        "8hbpqnh0lyz7bvx6kk3bdi6hhi4l0a3s-hook-two.drv"
    );
    assert_eq!(StorePath::from_base_name(&p.to_string()), Ok(p.clone()));
    let src = StorePath::parse(&dir, HOOK_SRC).expect("valid");
    assert!(!src.is_derivation());

    let other = StoreDir::new("/tmp/x/store").expect("valid");
    assert!(StorePath::parse(&other, HOOK_SRC).is_err());
    assert_eq!(
        src.to_absolute(&other),
        "/tmp/x/store/da3jygvvij1ybx9bjg7h0g0l8b9izvgw-hook-src"
    );
}

#[test]
fn names() {
    for ok in [
        "a",
        ".envrc",
        "...",
        "..a",
        ".a-b",
        "foo-1.2+3_x?y=z",
        "A-Z",
        &"x".repeat(211),
    ] {
        assert_eq!(check_name(ok), Ok(()), "{ok:?}");
    }
    for bad in [
        "",
        ".",
        "..",
        ".-x",
        "..-x",
        "a/b",
        "a b",
        "é",
        "a\0",
        "a:b",
        &"x".repeat(212),
    ] {
        assert!(check_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn rejects_bad_paths() {
    let dir = StoreDir::default();
    for bad in [
        "",
        "/nix/store",
        "/nix/store/",
        "nix/store/da3jygvvij1ybx9bjg7h0g0l8b9izvgw-hook-src",
        "/nix/storeda3jygvvij1ybx9bjg7h0g0l8b9izvgw-hook-src",
        "/nix/store/da3jygvvij1ybx9bjg7h0g0l8b9izvgw-hook-src/bin",
        "/nix/store/da3jygvvij1ybx9bjg7h0g0l8b9izvgw-",
        "/nix/store/da3jygvvij1ybx9bjg7h0g0l8b9izvgw",
        // Nix 2.8.0 accepts any byte in place of the '-'; newer Nix and we do not.
        "/nix/store/da3jygvvij1ybx9bjg7h0g0l8b9izvgw_hook-src",
        // 'e', 'o', 't', 'u' are not nix32 digits.
        "/nix/store/ea3jygvvij1ybx9bjg7h0g0l8b9izvgw-hook-src",
        "/nix/store/Da3jygvvij1ybx9bjg7h0g0l8b9izvgw-hook-src",
        "/nix/store/da3jygvvij1ybx9bjg7h0g0l8b9izvg-hook-src",
        "/nix/store/da3jygvvij1ybx9bjg7h0g0l8b9izvgw-..",
        "//nix/store/da3jygvvij1ybx9bjg7h0g0l8b9izvgw-hook-src",
    ] {
        assert!(StorePath::parse(&dir, bad).is_err(), "{bad:?}");
    }
}

#[test]
fn store_dirs() {
    for ok in ["/nix/store", "/a", "/tmp/x/nix/store", "/a.b/c"] {
        assert_eq!(StoreDir::new(ok).expect(ok).as_str(), ok);
    }
    for bad in [
        "",
        "/",
        "nix/store",
        "/nix/store/",
        "/nix//store",
        "/nix/./store",
        "/nix/../store",
        "/a\0",
    ] {
        assert!(StoreDir::new(bad).is_err(), "{bad:?}");
    }
    assert_eq!(StoreDir::default().as_str(), "/nix/store");
}

#[test]
fn wire_helpers() {
    let dir = StoreDir::default();
    let a = StorePath::parse(&dir, HOOK_TWO_DRV).expect("valid");
    let b = StorePath::parse(&dir, HOOK_SRC).expect("valid");
    let mut buf = Vec::new();
    put_store_path(&mut buf, &dir, &a);
    put_opt_store_path(&mut buf, &dir, None);
    put_opt_store_path(&mut buf, &dir, Some(&b));
    let set: BTreeSet<_> = [a.clone(), b.clone()].into();
    put_store_path_set(&mut buf, &dir, &set);
    let limits = Limits::DEFAULT;
    let (v, used) = try_decode(&buf, &limits, |r| {
        Ok((
            read_store_path(r, &dir, "p")?,
            read_opt_store_path(r, &dir, "o")?,
            read_opt_store_path(r, &dir, "o")?,
            read_store_path_set(r, &dir, "s")?,
        ))
    })
    .expect("valid")
    .expect("complete");
    assert_eq!(used, buf.len());
    assert_eq!(v, (a.clone(), None, Some(b.clone()), set.clone()));
    // Sorted as Nix sorts: by the printed path.
    let mut printed = Vec::new();
    printed.put_word(2);
    printed.put_str(HOOK_TWO_DRV);
    printed.put_str(HOOK_SRC);
    let mut encoded = Vec::new();
    put_store_path_set(&mut encoded, &dir, &set);
    assert_eq!(encoded, printed);
    assert!(a < b);

    // An invalid path names the field.
    let mut bad = Vec::new();
    bad.put_str("/nix/store/x");
    let e = try_decode(&bad, &limits, |r| {
        read_store_path(r, &dir, "QueryValidPaths.paths")
    })
    .expect_err("invalid");
    assert!(e.to_string().contains("QueryValidPaths.paths"), "{e}");
    // Truncated input is incomplete, not an error.
    let mut buf = Vec::new();
    put_store_path(&mut buf, &dir, &a);
    for cut in 0..buf.len() {
        assert_eq!(
            try_decode(&buf[..cut], &limits, |r| read_store_path(r, &dir, "p")),
            Ok(None)
        );
    }
}

/// A file added with `nix-store --add` (Nix 2.8): `hello.txt` holding `hello\n`. Its record
/// in the store's database, as `AddToStore` by content must reproduce it.
fn hello_source() -> PathInfo {
    let d = StoreDir::new("/nix/store").expect("dir");
    let nar_hash = Hash::parse(
        "sha256:1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13",
        None,
    )
    .expect("hash");
    PathInfo {
        path: StorePath::parse(&d, "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt")
            .expect("path"),
        deriver: None,
        nar_hash,
        references: BTreeSet::new(),
        registration_time: 0,
        nar_size: 120,
        ultimate: false,
        sigs: BTreeSet::new(),
        ca: Some("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw".into()),
    }
}

#[test]
fn source_paths_follow_from_their_nar_hash() {
    let d = StoreDir::new("/nix/store").expect("dir");
    let info = hello_source();
    let made = make_source_path(&d, &info.nar_hash, "hello.txt").expect("path");
    assert_eq!(made, info.path);
    assert!(info.is_plain_source(&d));

    // Anything the by-content route would not carry, or a record it would not reproduce,
    // keeps the path on `AddToStoreNar`.
    let other = StoreDir::new("/other/store").expect("dir");
    assert!(
        !info.is_plain_source(&other),
        "the path depends on the store dir"
    );
    type Change = fn(&mut PathInfo);
    let variants: [(&str, Change); 7] = [
        ("a deriver", |i| i.deriver = Some(i.path.clone())),
        ("a signature", |i| {
            i.sigs.insert("cache.example.org-1:c2ln".into());
        }),
        ("a reference", |i| {
            i.references.insert(i.path.clone());
        }),
        ("no content address", |i| i.ca = None),
        ("a flat file hash", |i| {
            i.ca = Some("fixed:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw".into())
        }),
        ("another NAR hash", |i| {
            i.nar_hash = Hash::sha256_of(b"something else");
        }),
        ("another name", |i| {
            i.path = StorePath::from_base_name("i9pmrzmpshapij2kin22pff6fc2adavx-hello2.txt")
                .expect("path");
        }),
    ];
    for (what, change) in variants {
        let mut i = hello_source();
        change(&mut i);
        assert!(!i.is_plain_source(&d), "{what}");
    }
}

fn nix32_hash_part() -> impl Strategy<Value = String> {
    "[0-9a-dfgh-np-sv-z]{32}"
}

proptest! {
    /// `Ord` must agree with the order of the printed base names, which is what Nix sorts by.
    #[test]
    fn order_is_printed_order(h1 in nix32_hash_part(), h2 in nix32_hash_part(), n1 in "[a-z.+-]{1,4}", n2 in "[a-z.+-]{1,4}") {
        let b1 = format!("{h1}-x{n1}");
        let b2 = format!("{h2}-x{n2}");
        let p1 = StorePath::from_base_name(&b1).expect("valid");
        let p2 = StorePath::from_base_name(&b2).expect("valid");
        prop_assert_eq!(p1.to_string(), b1.clone());
        prop_assert_eq!(p1.cmp(&p2), b1.cmp(&b2));
        let dir = StoreDir::default();
        prop_assert_eq!(p1.cmp(&p2), p1.to_absolute(&dir).cmp(&p2.to_absolute(&dir)));
    }

    #[test]
    fn parse_never_panics(s in "\\PC{0,80}") {
        let _ = StorePath::parse(&StoreDir::default(), &s);
        let _ = StorePath::from_base_name(&s);
    }
}
