//! The logic of the fuzz targets, one function per decoder family. Each target decodes the
//! input with the crate's decoders and then checks what must hold for anything they accept:
//!
//! * re-encoding a decoded value and decoding that gives the same value, consuming exactly
//!   the re-encoded bytes (so a fuzzer also finds encoder/decoder disagreements, not only
//!   panics);
//! * strict prefixes of an accepted message are "need more bytes", never an error, and the
//!   hint never reaches past the message;
//! * the NAR parser gives the same result whatever the chunking, and re-serialises what it
//!   accepted byte for byte (it only accepts the canonical form);
//! * a parsed `.drv` prints back to what parses to the same derivation.
//!
//! The first input byte selects the protocol version (and small or default [`Limits`]); the
//! second, for the targets with several decoders, which decoder runs.
//!
//! Every target returns how many input bytes after its selector bytes the messages it
//! accepted span (0 when it accepted nothing). The fuzzer ignores it; the seed generator
//! (`examples/seed.rs`) uses it to cut real conversations into messages, and the corpus
//! replay (`tests/corpus.rs`) runs the same functions on stable.

use std::collections::BTreeMap;
use std::fmt::Debug;

use nixmux_proto::build_result::{BuildResult, OutputsEncoding, ResultLayout};
use nixmux_proto::derivation::{BasicDerivation, Derivation};
use nixmux_proto::nar::{NarEvent, NarNode, NarParser};
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve;
use nixmux_proto::store_path::{StoreDir, StorePath, put_store_path_set};
use nixmux_proto::wire::{ReadError, ReadResult, WireReader, WireWrite};
use nixmux_proto::worker::{
    self, ClientOptions, DrvOutputId, FEATURE_REALISATION_WITH_PATH, Negotiated, StderrMsg,
};
use nixmux_proto::{Limits, ProtocolVersion};

/// Small limits, so that "too long" paths are reachable with short inputs.
pub const SMALL: Limits = Limits {
    max_string: 200,
    max_log_line: 200,
    max_list: 8,
    max_nar_name: 32,
    max_nar_target: 64,
    max_nar_depth: 4,
    max_nar_file: 4096,
    max_frame: 512,
    max_fields: 4,
};

fn dir() -> StoreDir {
    StoreDir::default()
}

fn limits(sel: u8) -> Limits {
    if sel & 0x80 != 0 {
        SMALL
    } else {
        Limits::DEFAULT
    }
}

/// The worker connection parameters selected by `sel`: every gating version, and 1.38 with
/// the realisation feature.
fn negotiated(sel: u8) -> Negotiated {
    const MINORS: [u8; 18] = [
        21, 22, 23, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 38,
    ];
    let i = usize::from(sel & 0x7f) % MINORS.len();
    let mut n = Negotiated::new(ProtocolVersion::new(1, MINORS[i]));
    if i == MINORS.len() - 1 {
        n.features.insert(FEATURE_REALISATION_WITH_PATH.to_owned());
    }
    n
}

fn serve_version(sel: u8) -> ProtocolVersion {
    ProtocolVersion::new(2, (sel & 0x7f) % 9)
}

/// Checks the prefixes of an accepted message: each is incomplete, with an honest hint.
fn check_prefixes<T: Debug>(
    msg: &[u8],
    limits: &Limits,
    decode: &dyn Fn(&mut WireReader<'_>) -> ReadResult<T>,
) {
    let step = (msg.len() / 8).max(1);
    for cut in (0..msg.len()).step_by(step) {
        let mut r = WireReader::new(&msg[..cut], limits);
        match decode(&mut r) {
            Err(ReadError::Incomplete { needed }) => {
                assert!(needed > 0, "a hint of 0 at {cut}");
                assert!(
                    cut + needed <= msg.len(),
                    "hint {needed} at {cut} of {}",
                    msg.len()
                );
            }
            other => panic!(
                "prefix {cut} of an accepted {}-byte message: {other:?}",
                msg.len()
            ),
        }
    }
}

/// Decodes one message from `r`; on success checks its prefixes and that re-encoding it with
/// `encode` decodes to the same value. Returns whether a message was decoded.
fn accept<T: Debug + PartialEq>(
    r: &mut WireReader<'_>,
    limits: &Limits,
    decode: &dyn Fn(&mut WireReader<'_>) -> ReadResult<T>,
    encode: &dyn Fn(&T, &mut Vec<u8>),
) -> Option<T> {
    let start = r.position();
    let all = r.remaining();
    let v = decode(r).ok()?;
    let msg = &all[..r.position() - start];
    check_prefixes(msg, limits, decode);
    let mut again = Vec::new();
    encode(&v, &mut again);
    // The re-encoding may legitimately be longer (e.g. a nix32 hash comes back as base16),
    // so it is read with the default limits.
    let mut r2 = WireReader::new(&again, &Limits::DEFAULT);
    let back =
        decode(&mut r2).unwrap_or_else(|e| panic!("re-encoded {v:?} does not decode: {e:?}"));
    assert_eq!(back, v, "re-encoding changed the value");
    assert_eq!(r2.position(), again.len(), "re-encoding has trailing bytes");
    Some(v)
}

// ===== serve =====

/// Serve requests as a server reads them: a stream of up to 8 request headers.
pub fn serve_requests(data: &[u8]) -> usize {
    let Some((&sel, rest)) = data.split_first() else {
        return 0;
    };
    let l = limits(sel);
    let v = serve_version(sel);
    let d = dir();
    let mut r = WireReader::new(rest, &l);
    if sel & 0x40 != 0 {
        return accept(&mut r, &l, &serve::read_client_hello, &|v, o| {
            serve::write_client_hello(o, *v)
        })
        .map_or(0, |_| r.position());
    }
    let mut used = 0;
    for _ in 0..8 {
        if accept(&mut r, &l, &|r| serve::Request::read(r, &d, v), &|q, o| {
            q.write(o, &d, v)
        })
        .is_none()
        {
            break;
        }
        used = r.position();
    }
    used
}

/// Serve replies as a client reads them; the second byte picks the decoder.
pub fn serve_replies(data: &[u8]) -> usize {
    let [sel, which, rest @ ..] = data else {
        return 0;
    };
    let l = limits(*sel);
    let v = serve_version(*sel);
    let d = dir();
    let mut r = WireReader::new(rest, &l);
    let ok = match which % 8 {
        0 => serve::read_server_hello(&mut r, serve::OUR_VERSION).is_ok(),
        1 => accept(&mut r, &l, &|r| serve::read_path_set(r, &d), &|s, o| {
            put_store_path_set(o, &d, s)
        })
        .is_some(),
        2 => accept(&mut r, &l, &|r| serve::read_path_infos(r, &d), &|i, o| {
            serve::write_path_infos(o, &d, i)
        })
        .is_some(),
        3 => accept(&mut r, &l, &|r| serve::read_ack(r, "ack"), &|_, o| {
            o.put_word(1)
        })
        .is_some(),
        // Lossy by design (exit code → status); only the decoder runs.
        4 => serve::read_build_paths_reply(&mut r).is_ok(),
        5 => accept(
            &mut r,
            &l,
            &|r| serve::read_build_result(r, &d, v),
            &|b, o| b.write(o, &d, serve::result_layout(v)),
        )
        .is_some(),
        6 => accept(
            &mut r,
            &l,
            &|r| serve::read_export_trailer(r, &d),
            &|t, o| serve::write_export_entry(o, &d, t),
        )
        .is_some(),
        _ => {
            // A whole export stream: items, NARs, trailers.
            let mut used = 0;
            for _ in 0..4 {
                match serve::read_export_item(&mut r) {
                    Ok(serve::ExportItem::Path) => {}
                    Ok(serve::ExportItem::End) => return r.position(),
                    Err(_) => return used,
                }
                let mut p = NarParser::new(l);
                let Ok(n) = p.feed(r.remaining()) else {
                    return used;
                };
                if !p.is_done() || r.read_raw(n).is_err() {
                    return used;
                }
                if serve::read_export_trailer(&mut r, &d).is_err() {
                    return used;
                }
                used = r.position();
            }
            return used;
        }
    };
    if ok { r.position() } else { 0 }
}

// ===== worker =====

/// Worker requests as a daemon reads them (handshake words, request headers, options, frames).
pub fn worker_requests(data: &[u8]) -> usize {
    let [sel, which, rest @ ..] = data else {
        return 0;
    };
    let l = limits(*sel);
    let n = negotiated(*sel);
    let v = n.version;
    let d = dir();
    let mut r = WireReader::new(rest, &l);
    let ok = match which % 6 {
        0 => accept(&mut r, &l, &worker::read_client_hello, &|v, o| {
            worker::write_client_hello(o, *v)
        })
        .is_some(),
        1 => {
            if accept(&mut r, &l, &worker::read_features, &|f, o| {
                worker::write_features(o, f)
            })
            .is_none()
            {
                return 0;
            }
            let used = r.position();
            if worker::read_client_tail(&mut r, v).is_ok() {
                return r.position();
            }
            return used;
        }
        2 => accept(&mut r, &l, &|r| ClientOptions::read(r, v), &|c, o| {
            c.write(o, v)
        })
        .is_some(),
        3 => {
            // Frames up to the terminator.
            while let Ok(len) = worker::read_frame_header(&mut r) {
                if len == 0 {
                    return r.position();
                }
                if r.read_raw(len).is_err() {
                    return 0;
                }
            }
            return 0;
        }
        4 => accept(
            &mut r,
            &l,
            &|r| worker::read_multiple_entry(r, &d),
            &|i, o| worker::write_multiple_entry(o, &d, i),
        )
        .is_some(),
        _ => {
            let mut used = 0;
            for _ in 0..8 {
                let Some(req) = accept(
                    &mut r,
                    &l,
                    &|r| worker::Request::read(r, &d, &n),
                    &|q, o| q.write(o, &d, &n),
                ) else {
                    break;
                };
                // Whatever a daemon decodes, a client could have sent on this connection.
                assert!(
                    n.check_request(&req).is_ok() || n.check_op(req.op()).is_err(),
                    "decoded a request the connection cannot carry: {req:?}"
                );
                used = r.position();
            }
            return used;
        }
    };
    if ok { r.position() } else { 0 }
}

/// Worker replies as a client reads them: the stderr loop, the daemon's greeting and every
/// operation's reply.
pub fn worker_replies(data: &[u8]) -> usize {
    let [sel, which, rest @ ..] = data else {
        return 0;
    };
    let l = limits(*sel);
    let n = negotiated(*sel);
    let v = n.version;
    let d = dir();
    let p = StorePath::new([7; 20], "p").expect("a valid path");
    let mut r = WireReader::new(rest, &l);
    let ok = match which % 9 {
        0 => {
            let mut used = 0;
            for _ in 0..16 {
                let Some(m) = accept(&mut r, &l, &|r| StderrMsg::read(r, v), &|m, o| {
                    m.write(o, v)
                }) else {
                    break;
                };
                used = r.position();
                if matches!(m, StderrMsg::Last | StderrMsg::Error(_)) {
                    break;
                }
            }
            return used;
        }
        1 => {
            if worker::read_server_hello(&mut r, worker::OUR_VERSION).is_err() {
                return 0;
            }
            let used = r.position();
            if accept(&mut r, &l, &|r| worker::read_daemon_info(r, v), &|i, o| {
                worker::write_daemon_info(o, v, i)
            })
            .is_some()
            {
                return r.position();
            }
            return used;
        }
        2 => accept(
            &mut r,
            &l,
            &|r| worker::read_query_path_info(r, &d, &n, &p),
            &|i, o| worker::write_query_path_info(o, &d, &n, i.as_ref()),
        )
        .is_some(),
        3 => accept(&mut r, &l, &|r| worker::read_missing(r, &d), &|m, o| {
            worker::write_missing(o, &d, m)
        })
        .is_some(),
        4 => accept(
            &mut r,
            &l,
            &|r| worker::read_build_result(r, &d, &n),
            &|b, o| b.write(o, &d, n.result_layout()),
        )
        .is_some(),
        5 => accept(
            &mut r,
            &l,
            &|r| worker::read_keyed_build_results(r, &d, &n),
            &|k, o| worker::write_keyed_build_results(o, &d, &n, k),
        )
        .is_some(),
        6 => {
            let id = if n.features.is_empty() {
                DrvOutputId::HashModulo {
                    drv_hash: "sha256:00".into(),
                    output: "out".into(),
                }
            } else {
                DrvOutputId::Path {
                    drv_path: p.clone(),
                    output: "out".into(),
                }
            };
            accept(
                &mut r,
                &l,
                &|r| worker::read_realisation(r, &d, &n, &id),
                &|x, o| worker::write_realisation(o, &d, &n, x.as_ref()),
            )
            .is_some()
        }
        7 => {
            if accept(&mut r, &l, &|r| worker::read_path_set(r, &d), &|s, o| {
                put_store_path_set(o, &d, s)
            })
            .is_none()
            {
                return 0;
            }
            let used = r.position();
            if accept(&mut r, &l, &|r| worker::read_opt_path(r, &d), &|x, o| {
                worker::write_opt_path(o, &d, x.as_ref())
            })
            .is_some()
            {
                return r.position();
            }
            return used;
        }
        _ => worker::read_ack(&mut r, "ack").is_ok(),
    };
    if ok { r.position() } else { 0 }
}

// ===== values =====

/// Path infos in every encoding, build results in every layout, derivations, trailers.
pub fn values(data: &[u8]) -> usize {
    let [sel, which, rest @ ..] = data else {
        return 0;
    };
    let l = limits(*sel);
    let v = negotiated(*sel).version;
    let d = dir();
    let p = StorePath::new([7; 20], "p").expect("a valid path");
    let mut r = WireReader::new(rest, &l);
    let ok = match which % 4 {
        0 => accept(
            &mut r,
            &l,
            &|r| PathInfo::read_worker_keyed(r, &d, v),
            &|i, o| i.put_worker_keyed(o, &d, v),
        )
        .is_some(),
        1 => {
            accept(
                &mut r,
                &l,
                &|r| PathInfo::read_serve_record(r, &d, p.clone()),
                &|i, o| {
                    let mut rec = Vec::new();
                    i.put_serve_record(&mut rec, &d);
                    // The record without its leading path.
                    let mut skip = WireReader::new(&rec, &Limits::DEFAULT);
                    let _ = skip.read_bytes("path");
                    o.extend_from_slice(skip.remaining());
                },
            )
            .is_some()
        }
        2 => {
            let layout = ResultLayout {
                times: which & 0x10 != 0,
                cpu: which & 0x20 != 0,
                outputs: match (which >> 6) % 3 {
                    0 => OutputsEncoding::Absent,
                    1 => OutputsEncoding::RealisationJson,
                    _ => OutputsEncoding::NameToPath,
                },
            };
            accept(
                &mut r,
                &l,
                &|r| BuildResult::read(r, &d, layout),
                &|b, o| b.write(o, &d, layout),
            )
            .is_some()
        }
        _ => accept(&mut r, &l, &|r| BasicDerivation::read(r, &d), &|b, o| {
            b.write(o, &d)
        })
        .is_some(),
    };
    if ok { r.position() } else { 0 }
}

// ===== NAR and .drv =====

/// An open directory: its name in its parent and its entries so far.
type OpenDir = (Option<Vec<u8>>, BTreeMap<Vec<u8>, NarNode>);

/// Rebuilds a tree from parser events.
#[derive(Default)]
struct Tree {
    dirs: Vec<OpenDir>,
    name: Option<Vec<u8>>,
    file: Option<(Option<Vec<u8>>, bool, Vec<u8>)>,
    root: Option<NarNode>,
}

impl Tree {
    fn place(&mut self, name: Option<Vec<u8>>, node: NarNode) {
        match (self.dirs.last_mut(), name) {
            (Some((_, entries)), Some(name)) => {
                entries.insert(name, node);
            }
            (None, None) => self.root = Some(node),
            _ => panic!("NAR events out of order"),
        }
    }

    fn event(&mut self, e: NarEvent<'_>) {
        match e {
            NarEvent::Entry { name } => self.name = Some(name.to_vec()),
            NarEvent::Directory => {
                let name = self.name.take();
                self.dirs.push((name, BTreeMap::new()));
            }
            NarEvent::DirectoryEnd => {
                let (name, entries) = self.dirs.pop().expect("an open directory");
                self.place(name, NarNode::Directory(entries));
            }
            NarEvent::File { executable, .. } => {
                self.file = Some((self.name.take(), executable, Vec::new()));
            }
            NarEvent::Contents(c) => self.file.as_mut().expect("an open file").2.extend(c),
            NarEvent::FileEnd => {
                let (name, executable, contents) = self.file.take().expect("an open file");
                self.place(
                    name,
                    NarNode::File {
                        executable,
                        contents,
                    },
                );
            }
            NarEvent::Symlink { target } => {
                let name = self.name.take();
                self.place(
                    name,
                    NarNode::Symlink {
                        target: target.to_vec(),
                    },
                );
            }
        }
    }
}

/// The NAR parser: same outcome whatever the chunking; what it accepts re-serialises byte for
/// byte; what follows the archive is never consumed.
pub fn nar(data: &[u8]) -> usize {
    let Some((&sel, input)) = data.split_first() else {
        return 0;
    };
    let l = limits(sel);
    let chunk = usize::from(sel & 0x7f) + 1;

    let mut whole = NarParser::new(l);
    let whole_result = whole.feed(input);

    let mut tree = Tree::default();
    let mut pieces = NarParser::new(l);
    let mut used = 0usize;
    let mut error = None;
    for part in input.chunks(chunk) {
        match pieces.feed_with(part, |e| tree.event(e)) {
            Ok(n) => {
                used += n;
                if n < part.len() {
                    assert!(pieces.is_done(), "stopped early without being done");
                    break;
                }
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
        if pieces.is_done() {
            break;
        }
    }
    match whole_result {
        Ok(n) => {
            assert!(error.is_none(), "chunked feeding failed: {error:?}");
            assert_eq!(n, used, "consumed differently in chunks");
            assert_eq!(whole.is_done(), pieces.is_done());
            assert_eq!(whole.nar_hash(), pieces.nar_hash());
            assert_eq!(whole.nar_size(), n as u64);
            if whole.is_done() {
                let tree = tree.root.expect("a complete NAR has a root");
                assert_eq!(
                    tree.to_nar(),
                    &input[..n],
                    "not re-serialised byte for byte"
                );
                return n;
            }
            0
        }
        Err(e) => {
            assert_eq!(error, Some(e), "chunked feeding disagrees");
            0
        }
    }
}

/// The `.drv` parser: what it accepts prints back to something that parses to the same value,
/// and printing is canonical.
pub fn derivation(data: &[u8]) -> usize {
    let Some((&sel, input)) = data.split_first() else {
        return 0;
    };
    let l = limits(sel);
    let d = dir();
    if let Ok(drv) = Derivation::parse(input, &d, &l) {
        let text = drv.to_aterm(&d);
        let back = Derivation::parse(text.as_bytes(), &d, &Limits::DEFAULT)
            .unwrap_or_else(|e| panic!("printed derivation does not parse: {e:?}\n{text}"));
        assert_eq!(back, drv);
        // Printing is canonical: printing the re-parsed value gives the same text. (The input
        // itself need not be canonical: like Nix, the parser takes a raw tab or newline inside
        // a string, which prints escaped.)
        assert_eq!(back.to_aterm(&d), text, "printing is not stable");
        return input.len();
    }
    0
}
