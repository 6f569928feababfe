//! Every decoder of the crate, fed arbitrary bytes: it answers a value, "need more bytes" or a
//! typed error, never panics; with small [`Limits`], announced lengths above them are refused
//! as `Malformed::TooLong` (the peak allocation that proves nothing is reserved for them is
//! measured in `alloc_bound.rs`).

mod support;

use nixmux_proto::wire::{ReadError, WireReader};
use nixmux_proto::worker::{self, Negotiated, StderrMsg};
use nixmux_proto::{Limits, Malformed, ProtoError, ProtocolVersion};
use proptest::prelude::*;
use support::*;

proptest! {
    #[test]
    fn random_bytes_never_panic(
        data in prop::collection::vec(any::<u8>(), 0..300),
        n in arb_negotiated(),
        sv in arb_serve_version(),
    ) {
        for limits in [Limits::DEFAULT, SMALL] {
            decode_everything(&data, &limits, &n, sv);
        }
    }

    #[test]
    fn wire_shaped_bytes_never_panic(
        data in arb_wire_input(),
        n in arb_negotiated(),
        sv in arb_serve_version(),
    ) {
        for limits in [Limits::DEFAULT, SMALL] {
            let results = decode_everything(&data, &limits, &n, sv);
            // A decoder that reads a length above its limit must say so, not fail otherwise
            // or allocate: any `TooLong` names a length above the limit it reports.
            for (name, o) in results {
                if let Outcome::Error(ProtoError::Malformed { kind: Malformed::TooLong { len, max }, .. }) = o {
                    prop_assert!(len > max, "{}: {} <= {}", name, len, max);
                }
            }
        }
    }

    /// Every strict prefix of a value a decoder accepts is "need more bytes" for it (or, for
    /// the whole-buffer parsers, an error): streaming decoders never mistake a short read for
    /// corruption.
    #[test]
    fn prefixes_of_accepted_inputs_are_incomplete(
        data in arb_wire_input(),
        n in arb_negotiated(),
        sv in arb_serve_version(),
    ) {
        let full = decode_everything(&data, &Limits::DEFAULT, &n, sv);
        for cut in 0..data.len() {
            let part = decode_everything(&data[..cut], &Limits::DEFAULT, &n, sv);
            for ((name, whole), (_, prefix)) in full.iter().zip(&part) {
                if *name == "Derivation::parse" {
                    continue; // parses a complete buffer, not a stream
                }
                if matches!(whole, Outcome::Value | Outcome::Incomplete) {
                    prop_assert!(
                        matches!(prefix, Outcome::Incomplete | Outcome::Value),
                        "{}: prefix {} of {} is {:?}", name, cut, data.len(), prefix
                    );
                }
            }
        }
    }
}

fn word(w: u64) -> Vec<u8> {
    w.to_le_bytes().to_vec()
}

fn too_long(r: Result<impl std::fmt::Debug, ReadError>) -> (u64, u64) {
    match r {
        Err(ReadError::Proto(ProtoError::Malformed {
            kind: Malformed::TooLong { len, max },
            ..
        })) => (len, max),
        other => panic!("expected TooLong, got {other:?}"),
    }
}

/// Lengths just above each limit are refused, and lengths at the limit are merely incomplete.
#[test]
fn each_limit_is_enforced_exactly() {
    let v = ProtocolVersion::new(1, 34);
    let n = Negotiated::new(v);
    let d = dir();
    let l = SMALL;
    let read = |data: &[u8], f: &dyn Fn(&mut WireReader<'_>) -> Result<(), ReadError>| {
        let mut r = WireReader::new(data, &l);
        f(&mut r)
    };
    // max_string: a store path, an error text.
    for (len, ok) in [(l.max_string, true), (l.max_string + 1, false)] {
        let mut data = word(1);
        data.extend(word(len));
        let r = read(&data, &|r| worker::read_path_set(r, &d).map(drop));
        if ok {
            assert!(matches!(r, Err(ReadError::Incomplete { .. })), "{r:?}");
        } else {
            assert_eq!(too_long(r), (len, l.max_string));
        }
        let mut data = word(worker::STDERR_NEXT);
        data.extend(word(len));
        let r = read(&data, &|r| StderrMsg::read(r, v).map(drop));
        if ok {
            assert!(matches!(r, Err(ReadError::Incomplete { .. })));
        } else {
            assert_eq!(too_long(r), (len, l.max_string));
        }
    }
    // max_list: a path set, a string list.
    for (count, ok) in [(l.max_list, true), (l.max_list + 1, false)] {
        let r = read(&word(count), &|r| worker::read_path_set(r, &d).map(drop));
        if ok {
            assert!(matches!(r, Err(ReadError::Incomplete { .. })));
        } else {
            assert_eq!(too_long(r), (count, l.max_list));
        }
        let r = read(&word(count), &|r| worker::read_features(r).map(drop));
        if !ok {
            assert_eq!(too_long(r), (count, l.max_list));
        }
    }
    // max_fields.
    let mut data = word(worker::STDERR_RESULT);
    data.extend(word(1));
    data.extend(word(101));
    data.extend(word(l.max_fields + 1));
    let r = read(&data, &|r| StderrMsg::read(r, v).map(drop));
    assert_eq!(too_long(r), (l.max_fields + 1, l.max_fields));
    // max_frame.
    let r = read(&word(l.max_frame + 1), &|r| {
        worker::read_frame_header(r).map(drop)
    });
    assert_eq!(too_long(r), (l.max_frame + 1, l.max_frame));
    let r = read(&word(l.max_frame), &|r| {
        worker::read_frame_header(r).map(drop)
    });
    assert!(r.is_ok());
    // The keyed results count and the QueryPathInfos record count use max_list too.
    let r = read(&word(l.max_list + 1), &|r| {
        worker::read_keyed_build_results(r, &d, &n).map(drop)
    });
    assert_eq!(too_long(r), (l.max_list + 1, l.max_list));
}

/// The NAR parser's own limits: names, targets, file sizes, depth.
#[test]
fn nar_limits_are_enforced() {
    use nixmux_proto::nar::{NarNode, NarParser};
    use std::collections::BTreeMap;
    let l = SMALL;
    let parse = |nar: &[u8]| NarParser::new(l).feed(nar);
    let file = |n: usize| NarNode::File {
        executable: false,
        contents: vec![0; n],
    };
    let limit = usize::try_from(l.max_nar_file).expect("small");
    assert!(parse(&file(limit).to_nar()).is_ok());
    assert!(matches!(
        parse(&file(limit + 1).to_nar()),
        Err(ProtoError::Malformed {
            kind: Malformed::TooLong { .. },
            ..
        })
    ));
    let name = |n: usize| NarNode::Directory(BTreeMap::from([(vec![b'a'; n], file(1))])).to_nar();
    let limit = usize::try_from(l.max_nar_name).expect("small");
    assert!(parse(&name(limit)).is_ok());
    assert!(matches!(
        parse(&name(limit + 1)),
        Err(ProtoError::Malformed {
            kind: Malformed::TooLong { .. },
            ..
        })
    ));
    let link = |n: usize| {
        NarNode::Symlink {
            target: vec![b't'; n],
        }
        .to_nar()
    };
    let limit = usize::try_from(l.max_nar_target).expect("small");
    assert!(parse(&link(limit)).is_ok());
    assert!(parse(&link(limit + 1)).is_err());
    let mut deep = file(1);
    for _ in 0..l.max_nar_depth {
        deep = NarNode::Directory(BTreeMap::from([(b"d".to_vec(), deep)]));
    }
    assert!(parse(&deep.to_nar()).is_ok());
    let deeper = NarNode::Directory(BTreeMap::from([(b"d".to_vec(), deep)]));
    assert!(parse(&deeper.to_nar()).is_err());
}
