//! Hash encodings checked against values printed by Nix 2.8.0's `nix-hash`
//! (`nix-hash --type <algo> --to-base32 <hex>`, `nix hash to-sri`, `nix hash to-base64`).

use nixmux_proto::hash::{Hash, HashAlgo, Sha256, nix32_decode, nix32_encode};
use proptest::prelude::*;

/// (algorithm, base16, nix32 as printed by `nix-hash --type <algo> --to-base32 <base16>`).
const VECTORS: &[(&str, &str, &str)] = &[
    // The digests of "abc".
    (
        "md5",
        "900150983cd24fb0d6963f7d28e17f72",
        "3jgzhjhz9zjvbb0kyj7jc500ch",
    ),
    (
        "sha1",
        "a9993e364706816aba3e25717850c26c9cd0d89d",
        "kpcd173cq987hw957sx6m0868wv3x6d9",
    ),
    (
        "sha256",
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
    ),
    (
        "sha512",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "2gs8k559z4rlahfx0y688s49m2vvszylcikrfinm30ly9rak69236nkam5ydvly1ai7xac99vxfc4ii84hawjbk876blyk1jfhkbbyx",
    ),
    // Random digests.
    (
        "md5",
        "ced2326f8382f0f0c411a985a2d998ff",
        "7zk3cs51d9272g1w42hdpk5lnf",
    ),
    (
        "md5",
        "d933743ea298d7d8248224fd7e718c23",
        "13iiqpxz94h8jdimwql8z78cyr",
    ),
    (
        "md5",
        "dd48cff8685e51f80dc644b92d48343a",
        "1s6i42vfa4qq6zhlayd3wcyj6x",
    ),
    (
        "sha1",
        "0b332eb9f790ee08e1408f8ea79c5ad9efe304eb",
        "xc2f7vyrbafag3lg83hhivlhyywjwcqb",
    ),
    (
        "sha1",
        "d55ecc7e1853e85f88e23101a03a32b3a4bb90d5",
        "sn8bp95k68xa009iwa45zs2k31zcqpnm",
    ),
    (
        "sha1",
        "f3a14f5e19a4433cfd715fddbc8b8168d977f530",
        "63spgnb8h65vrpazf7ykqhx435g4z8gk",
    ),
    (
        "sha256",
        "7c2d7dfb037c6d3f45b6a3dc0926800418fd94b54155ac4aef476cec73ef4a07",
        "01saxxryqv27xx5aqma1nnags604h0k0kp53nr2kyvbw0gxpsbbw",
    ),
    (
        "sha256",
        "59ac1eb5582f1e9f7b6b778f6f2e6d93c7cbcd8e0a1eb6e18ca8acb6462b46d8",
        "1n265d3bdb58ikhvc7haiv6wpiwkdlp6z3vpddxry7igb2sixb2r",
    ),
    (
        "sha256",
        "594c46943daa0d3d00f640cc8da59146a1b7472e39563302b2048f8e445e9dbf",
        "1gwxbr28x3q4n8136mir5r3vg8a6j6jqvk20yq03s3da7na4ck2r",
    ),
    (
        "sha512",
        "3343b669ae825de993588c7b2aaa2f755660a0aa974f4ae3792dd19ed145d75829a6ba318c3416f737228cbbc45d9ae0fe4cd84faf04d507b0538430169c1a21",
        "0him70n62257c07sl2aykyq9kzf16jxqjxqq8ipywb3931ipak2jn6p8p8rxl9dg7illkwpmah60mkm5ym2lywcb29yjpc2mrlvchrk",
    ),
    (
        "sha512",
        "4967cfac50c13c757ee3e5a6be4a190a556dfda20918442b280b1ebe713a0cef00ceecfd1519222912239f7762cd1704dbe7f7457f6fca865e14d2fe2d40e754",
        "1affh1dzv918pl6r9ppyigpwzdh85ydc9vry8qj54i1j5gxxk701vqc79qvw7hb50ml8609lbynsm8a355bx9p5wdz7ag61a2ncyrs9",
    ),
    (
        "sha512",
        "7f62fad6a2c23fcfe4a41d289b52073887192da75e57882026a6a9ba71d8ec4ba839f08d6114e244bd6ae441a8e392a4efa1892616509ae21ad8cad563e8ac22",
        "0iars33sp5dh6p2k981c9l9l7ps94p3m10y8smx8ki18qcdy0wshjzcv1qvmad64qh8hmsylwnik1rq0x99na0xlkjcygy2lbbglqkz",
    ),
    // Edge digests: they pin the bit order (first byte = least significant digit).
    (
        "sha1",
        "0000000000000000000000000000000000000000",
        "00000000000000000000000000000000",
    ),
    (
        "sha1",
        "ffffffffffffffffffffffffffffffffffffffff",
        "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    ),
    (
        "sha1",
        "0100000000000000000000000000000000000000",
        "00000000000000000000000000000001",
    ),
    (
        "sha1",
        "0000000000000000000000000000000000000080",
        "h0000000000000000000000000000000",
    ),
    (
        "sha256",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000",
    ),
    (
        "sha256",
        "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "1zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    ),
    (
        "sha256",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000001",
    ),
    (
        "sha256",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "1000000000000000000000000000000000000000000000000000",
    ),
];

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn nix32_matches_nix_hash() {
    for &(algo, hex, nix32) in VECTORS {
        let algo = HashAlgo::from_name(algo).expect("algo");
        let bytes = unhex(hex);
        assert_eq!(nix32_encode(&bytes), nix32, "{algo} {hex}");
        assert_eq!(
            nix32_decode(nix32, bytes.len()).as_deref(),
            Some(&bytes[..])
        );

        let h = Hash::from_digest(algo, &bytes).expect("len");
        assert_eq!(h.to_base16(), hex);
        assert_eq!(h.to_nix32(), nix32);
        assert_eq!(h.to_nix32_prefixed(), format!("{algo}:{nix32}"));
        assert_eq!(h.to_string(), format!("{algo}:{nix32}"));
        // Every spelling parses back to the same hash.
        for s in [
            hex.to_owned(),
            hex.to_uppercase(),
            nix32.to_owned(),
            h.to_base64(),
            format!("{algo}:{hex}"),
            format!("{algo}:{nix32}"),
            format!("{algo}:{}", h.to_base64()),
            h.to_sri(),
            h.to_sri().trim_end_matches('=').to_owned(),
        ] {
            assert_eq!(Hash::parse(&s, Some(algo)).expect(&s), h, "{s}");
        }
        for s in [format!("{algo}:{nix32}"), h.to_sri()] {
            assert_eq!(s.parse::<Hash>().expect(&s), h);
            assert_eq!(Hash::parse(&s, None).expect(&s), h);
        }
    }
}

#[test]
fn sri_and_base64_match_nix() {
    // `nix hash to-sri --type sha256 ba78…` and `nix hash to-base64 --type sha512 ddaf…`.
    let h = Hash::sha256_of(b"abc");
    assert_eq!(
        h.to_sri(),
        "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
    );
    let h512 = Hash::from_digest(HashAlgo::Sha512, &unhex(VECTORS[3].1)).expect("len");
    assert_eq!(
        h512.to_base64(),
        "3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
    );
}

#[test]
fn streaming_sha256() {
    let mut s = Sha256::new();
    s.update(b"a");
    assert_eq!(s.current(), Hash::sha256_of(b"a"));
    s.update(b"bc");
    assert_eq!(s.finish().to_base16(), VECTORS[2].1);
    // `nix-hash --flat` of an empty file.
    assert_eq!(
        Hash::sha256_of(b"").to_nix32(),
        "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    );
}

#[test]
fn rejections() {
    let s256 = Some(HashAlgo::Sha256);
    let cases: &[(&str, Option<HashAlgo>)] = &[
        // `nix-hash --to-base16` rejects spare high bits: "invalid base-32 hash".
        ("2zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", s256),
        // Letters outside the alphabet.
        ("1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5e", s256),
        // "hash 'sha512:…' should have type 'sha256'".
        ("sha512:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=", s256),
        // No algorithm anywhere.
        (
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            None,
        ),
        // Unknown algorithm.
        (
            "sha3:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            None,
        ),
        // Wrong lengths.
        ("sha256:ba7816bf", None),
        ("", s256),
        ("sha256-", None),
        ("sha256-AAAA", None),
        // Not hex.
        (
            "zz7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            s256,
        ),
        // Not base64.
        ("sha256:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAF!0=", None),
    ];
    for &(s, algo) in cases {
        assert!(Hash::parse(s, algo).is_err(), "{s:?} should be rejected");
    }
    assert!(nix32_decode("000", 1).is_none(), "length mismatch");
    assert!(nix32_decode("80", 1).is_none(), "spare bits set");
    assert_eq!(nix32_decode("7z", 1), Some(vec![0xff]));
}

proptest! {
    #[test]
    fn any_digest_round_trips(algo in prop::sample::select(HashAlgo::ALL.to_vec()), seed in prop::collection::vec(any::<u8>(), 64)) {
        let digest = &seed[..algo.digest_len()];
        let h = Hash::from_digest(algo, digest).expect("len");
        prop_assert_eq!(h.digest(), digest);
        for s in [h.to_base16(), h.to_nix32(), h.to_base64(), h.to_nix32_prefixed(), h.to_sri(), h.to_base16_prefixed()] {
            prop_assert_eq!(Hash::parse(&s, Some(algo)).expect("parses"), h);
        }
    }

    #[test]
    fn parse_never_panics(s in "\\PC{0,120}") {
        let _ = Hash::parse(&s, Some(HashAlgo::Sha256));
        let _ = Hash::parse(&s, None);
    }
}
