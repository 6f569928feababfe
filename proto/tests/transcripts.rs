//! Golden transcripts: real Nix 2.8.0 conversations (`tests/data/transcripts/`, see the
//! PROVENANCE.md there) decoded completely with our codecs, in both directions, message by
//! message:
//!
//! * client → server with the server-side decoders (`serve::Request::read`,
//!   `worker::Request::read`, the client tail), the NAR parser for raw NAR payloads and the
//!   frame reader for framed uploads (whose inner stream is decoded too);
//! * server → client with the client-side decoders (hellos, daemon info, `StderrMsg::read`,
//!   each operation's reply decoder, the NAR parser).
//!
//! Every decoded message is re-encoded with our encoders and compared byte for byte with what
//! Nix sent. The one field that cannot be reproduced is listed in
//! [`serve_options_differ_only_in_enforce_determinism`]; everything else is byte-identical.
//!
//! Then every stream is cut at every byte offset: decoding a strict prefix must say "need more
//! bytes" (never an error, never a panic), and the number of missing bytes it names must never
//! reach past the end of the message being decoded (a driver waits for that many bytes, so an
//! overshoot would hang a session waiting for bytes the peer never sends).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nixmux_proto::build_result::BuildResult;
use nixmux_proto::hash::Hash;
use nixmux_proto::nar::{NarEvent, NarNode, NarParser};
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve;
use nixmux_proto::store_path::{StoreDir, StorePath, put_store_path_set};
use nixmux_proto::wire::{ReadError, ReadResult, WireReader, WireWrite};
use nixmux_proto::worker::{self, DaemonInfo, Negotiated, Op, StderrMsg};
use nixmux_proto::{Limits, Misbehaved, ProtoError, ProtocolVersion};

// ===== the recordings =====

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Serve,
    Worker,
}

struct Recording {
    name: &'static str,
    protocol: Protocol,
    c2s: Vec<u8>,
    s2c: Vec<u8>,
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/transcripts/nix-2.8.0")
}

fn read(rel: &str) -> Vec<u8> {
    let p = data_dir().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn recordings() -> Vec<Recording> {
    let pair = |name, protocol, prefix: &str| Recording {
        name,
        protocol,
        c2s: read(&format!("{prefix}client-to-server.bin")),
        s2c: read(&format!("{prefix}server-to-client.bin")),
    };
    vec![
        pair("copy-ssh", Protocol::Serve, "copy-ssh/"),
        pair("copy-ssh-ng", Protocol::Worker, "copy-ssh-ng/"),
        pair(
            "build-hook-ssh/build1",
            Protocol::Serve,
            "build-hook-ssh/build1-",
        ),
        pair(
            "build-hook-ssh-ng/build1",
            Protocol::Worker,
            "build-hook-ssh-ng/build1-",
        ),
        pair(
            "build-hook-ssh-ng/build2",
            Protocol::Worker,
            "build-hook-ssh-ng/build2-",
        ),
    ]
}

fn dir() -> StoreDir {
    StoreDir::default()
}

const LIMITS: Limits = Limits::DEFAULT;

// ===== NAR helpers =====

/// A NAR decoded back into a tree (so it can be re-serialised with our writer).
#[derive(Debug, Clone, PartialEq, Eq)]
struct DecodedNar {
    size: u64,
    hash: Hash,
    tree: NarNode,
}

/// An open directory: the name it has in its parent, and its entries so far.
type OpenDir = (Option<Vec<u8>>, BTreeMap<Vec<u8>, NarNode>);

/// Rebuilds a [`NarNode`] tree from parser events.
#[derive(Default)]
struct TreeBuilder {
    dirs: Vec<OpenDir>,
    pending_name: Option<Vec<u8>>,
    file: Option<(Option<Vec<u8>>, bool, Vec<u8>)>,
    root: Option<NarNode>,
}

impl TreeBuilder {
    fn place(&mut self, name: Option<Vec<u8>>, node: NarNode) {
        match self.dirs.last_mut() {
            Some((_, entries)) => {
                entries.insert(name.expect("entry inside a directory has a name"), node);
            }
            None => self.root = Some(node),
        }
    }

    fn event(&mut self, e: NarEvent<'_>) {
        match e {
            NarEvent::Entry { name } => self.pending_name = Some(name.to_vec()),
            NarEvent::Directory => {
                let name = self.pending_name.take();
                self.dirs.push((name, BTreeMap::new()));
            }
            NarEvent::DirectoryEnd => {
                let (name, entries) = self.dirs.pop().expect("open directory");
                self.place(name, NarNode::Directory(entries));
            }
            NarEvent::File { executable, .. } => {
                self.file = Some((self.pending_name.take(), executable, Vec::new()));
            }
            NarEvent::Contents(c) => self.file.as_mut().expect("open file").2.extend(c),
            NarEvent::FileEnd => {
                let (name, executable, contents) = self.file.take().expect("open file");
                self.place(
                    name,
                    NarNode::File {
                        executable,
                        contents,
                    },
                );
            }
            NarEvent::Symlink { target } => {
                let name = self.pending_name.take();
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

/// Reads one self-delimiting NAR from the reader.
fn read_nar(r: &mut WireReader<'_>) -> ReadResult<DecodedNar> {
    let mut p = NarParser::new(*r.limits());
    let mut b = TreeBuilder::default();
    let used = p.feed_with(r.remaining(), |e| b.event(e))?;
    if !p.is_done() {
        return Err(ReadError::Incomplete { needed: 1 });
    }
    r.read_raw(used)?;
    Ok(DecodedNar {
        size: p.nar_size(),
        hash: p.nar_hash().expect("hashed"),
        tree: b.root.expect("a complete NAR has a root"),
    })
}

/// Reads exactly `size` raw bytes that must form one NAR (serve `AddToStoreNar`).
fn read_sized_nar(r: &mut WireReader<'_>, size: u64) -> ReadResult<DecodedNar> {
    let n = usize::try_from(size).expect("small");
    let avail = r.remaining().len();
    if avail < n {
        return Err(ReadError::Incomplete { needed: n - avail });
    }
    let bytes = r.read_raw(n)?;
    let mut inner = WireReader::new(bytes, r.limits());
    let nar = read_nar(&mut inner).map_err(|e| match e {
        ReadError::Incomplete { .. } => ReadError::Proto(ProtoError::from(
            Misbehaved::Inconsistent("NAR shorter than its narSize".into()),
        )),
        other => other,
    })?;
    if nar.size != size {
        return Err(ProtoError::from(Misbehaved::Inconsistent(
            "NAR longer than its narSize".into(),
        ))
        .into());
    }
    Ok(nar)
}

// ===== client → server =====

/// What the inner stream of a framed upload held.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FramedPayload {
    /// `AddToStoreNar`: one NAR.
    Nar(DecodedNar),
    /// `AddMultipleToStore`: a count, then path infos and NARs.
    Multiple(Vec<(PathInfo, DecodedNar)>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum C2S {
    ServeHello(ProtocolVersion),
    WorkerHello(ProtocolVersion),
    WorkerTail,
    Serve(serve::Request),
    Worker(worker::Request),
    /// Raw NAR bytes after a serve `AddToStoreNar`.
    RawNar(DecodedNar),
    /// A framed stream: the frame sizes as sent, and what they carried.
    Framed {
        frames: Vec<usize>,
        payload: FramedPayload,
    },
}

#[derive(Debug, Clone)]
struct Spanned<T> {
    msg: T,
    start: usize,
    end: usize,
}

fn read_frames(r: &mut WireReader<'_>) -> ReadResult<(Vec<usize>, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut data = Vec::new();
    loop {
        let n = worker::read_frame_header(r)?;
        if n == 0 {
            return Ok((frames, data));
        }
        frames.push(n);
        data.extend_from_slice(r.read_raw(n)?);
    }
}

/// Decodes the inner stream of a complete framed upload; it must be complete and exact.
fn decode_framed_payload(
    op: Op,
    payload: &[u8],
    limits: &Limits,
) -> Result<FramedPayload, ProtoError> {
    let mut r = WireReader::new(payload, limits);
    let decoded = (|| -> ReadResult<FramedPayload> {
        Ok(match op {
            Op::AddToStoreNar => FramedPayload::Nar(read_nar(&mut r)?),
            Op::AddMultipleToStore => {
                let n = r.read_u64()?;
                let mut items = Vec::new();
                for _ in 0..n {
                    let info = worker::read_multiple_entry(&mut r, &dir())?;
                    let nar = read_nar(&mut r)?;
                    items.push((info, nar));
                }
                FramedPayload::Multiple(items)
            }
            other => panic!("{other:?} has no framed payload"),
        })
    })();
    match decoded {
        Ok(v) if r.remaining().is_empty() => Ok(v),
        Ok(_) => Err(Misbehaved::Inconsistent("bytes after the framed payload".into()).into()),
        Err(ReadError::Incomplete { .. }) => {
            Err(Misbehaved::Inconsistent("framed payload ends early".into()).into())
        }
        Err(ReadError::Proto(e)) => Err(e),
    }
}

/// The versions a recording negotiated: (client's, negotiated).
fn versions(rec: &Recording) -> (ProtocolVersion, ProtocolVersion) {
    let mut c = WireReader::new(&rec.c2s, &LIMITS);
    let mut s = WireReader::new(&rec.s2c, &LIMITS);
    match rec.protocol {
        Protocol::Serve => {
            let ours = serve::read_client_hello(&mut c).expect("client hello");
            (
                ours,
                serve::read_server_hello(&mut s, ours).expect("server hello"),
            )
        }
        Protocol::Worker => {
            let ours = worker::read_client_hello(&mut c).expect("client hello");
            (
                ours,
                worker::read_server_hello(&mut s, ours).expect("server hello"),
            )
        }
    }
}

/// Decodes a client → server stream. With `count`, exactly that many messages are decoded
/// (so a strict prefix must be incomplete); without, until the bytes run out at a message
/// boundary.
fn decode_c2s(
    bytes: &[u8],
    protocol: Protocol,
    negotiated: ProtocolVersion,
    count: Option<usize>,
) -> ReadResult<Vec<Spanned<C2S>>> {
    let mut r = WireReader::new(bytes, &LIMITS);
    let mut out: Vec<Spanned<C2S>> = Vec::new();
    let neg = Negotiated::new(negotiated);
    let done = |out: &Vec<Spanned<C2S>>, r: &WireReader<'_>| match count {
        Some(n) => out.len() >= n,
        None => r.remaining().is_empty(),
    };
    macro_rules! push {
        ($start:expr, $msg:expr) => {{
            let msg = $msg;
            out.push(Spanned {
                msg,
                start: $start,
                end: r.position(),
            });
        }};
    }
    let start = r.position();
    match protocol {
        Protocol::Serve => push!(start, C2S::ServeHello(serve::read_client_hello(&mut r)?)),
        Protocol::Worker => {
            push!(start, C2S::WorkerHello(worker::read_client_hello(&mut r)?));
            let start = r.position();
            worker::read_client_tail(&mut r, negotiated)?;
            push!(start, C2S::WorkerTail);
        }
    }
    while !done(&out, &r) {
        let start = r.position();
        match protocol {
            Protocol::Serve => {
                let req = serve::Request::read(&mut r, &dir(), negotiated)?;
                let size = match &req {
                    serve::Request::AddToStoreNar { info } => Some(info.nar_size),
                    _ => None,
                };
                push!(start, C2S::Serve(req));
                if let Some(size) = size {
                    let start = r.position();
                    push!(start, C2S::RawNar(read_sized_nar(&mut r, size)?));
                }
            }
            Protocol::Worker => {
                let req = worker::Request::read(&mut r, &dir(), &neg)?;
                let op = req.op();
                push!(start, C2S::Worker(req));
                if matches!(op, Op::AddToStoreNar | Op::AddMultipleToStore) {
                    let start = r.position();
                    let (frames, data) = read_frames(&mut r)?;
                    let payload = decode_framed_payload(op, &data, r.limits())?;
                    push!(start, C2S::Framed { frames, payload });
                }
            }
        }
    }
    Ok(out)
}

// ===== server → client =====

#[derive(Debug, Clone, PartialEq, Eq)]
enum S2C {
    ServeHello(ProtocolVersion),
    WorkerHello(ProtocolVersion),
    DaemonInfo(DaemonInfo),
    Stderr(StderrMsg),
    PathSet(std::collections::BTreeSet<StorePath>),
    PathInfos(Vec<PathInfo>),
    OptPathInfo(Option<PathInfo>),
    Ack,
    BuildResult(BuildResult),
    Nar(DecodedNar),
}

/// Decodes a server → client stream, using the decoded requests to know which reply comes.
fn decode_s2c(
    bytes: &[u8],
    protocol: Protocol,
    client: ProtocolVersion,
    requests: &[C2S],
    count: Option<usize>,
) -> ReadResult<Vec<Spanned<S2C>>> {
    let mut r = WireReader::new(bytes, &LIMITS);
    let mut out: Vec<Spanned<S2C>> = Vec::new();
    macro_rules! push {
        ($start:expr, $msg:expr) => {{
            if count.is_some_and(|n| out.len() >= n) {
                return Ok(out);
            }
            let msg = $msg;
            out.push(Spanned {
                msg,
                start: $start,
                end: r.position(),
            });
        }};
    }
    let start = r.position();
    match protocol {
        Protocol::Serve => {
            let v = serve::read_server_hello(&mut r, client)?;
            push!(start, S2C::ServeHello(v));
            for req in requests {
                let C2S::Serve(req) = req else { continue };
                let start = r.position();
                match req {
                    serve::Request::QueryValidPaths { .. }
                    | serve::Request::QueryClosure { .. } => {
                        push!(start, S2C::PathSet(serve::read_path_set(&mut r, &dir())?));
                    }
                    serve::Request::QueryPathInfos { .. } => {
                        push!(
                            start,
                            S2C::PathInfos(serve::read_path_infos(&mut r, &dir())?)
                        );
                    }
                    serve::Request::DumpStorePath { .. } => {
                        push!(start, S2C::Nar(read_nar(&mut r)?));
                    }
                    serve::Request::AddToStoreNar { .. } | serve::Request::ImportPaths => {
                        serve::read_ack(&mut r, "ack")?;
                        push!(start, S2C::Ack);
                    }
                    serve::Request::BuildDerivation { .. } => {
                        push!(
                            start,
                            S2C::BuildResult(serve::read_build_result(&mut r, &dir(), v)?)
                        );
                    }
                    other => panic!("no reply decoder for {other:?} in this test"),
                }
            }
        }
        Protocol::Worker => {
            let v = worker::read_server_hello(&mut r, client)?;
            push!(start, S2C::WorkerHello(v));
            let neg = Negotiated::new(v);
            let start = r.position();
            push!(start, S2C::DaemonInfo(worker::read_daemon_info(&mut r, v)?));
            // The handshake's stderr loop, then one per request.
            let stderr_loop =
                |r: &mut WireReader<'_>, out: &mut Vec<Spanned<S2C>>| -> ReadResult<bool> {
                    loop {
                        if count.is_some_and(|n| out.len() >= n) {
                            return Ok(false);
                        }
                        let start = r.position();
                        let msg = StderrMsg::read(r, v)?;
                        let last = match &msg {
                            StderrMsg::Last => Some(true),
                            StderrMsg::Error(_) => Some(false),
                            _ => None,
                        };
                        out.push(Spanned {
                            msg: S2C::Stderr(msg),
                            start,
                            end: r.position(),
                        });
                        if let Some(reply_follows) = last {
                            return Ok(reply_follows);
                        }
                    }
                };
            stderr_loop(&mut r, &mut out)?;
            for req in requests {
                let C2S::Worker(req) = req else { continue };
                if !stderr_loop(&mut r, &mut out)? {
                    continue;
                }
                let start = r.position();
                match req {
                    worker::Request::QueryValidPaths { .. } => {
                        push!(start, S2C::PathSet(worker::read_path_set(&mut r, &dir())?));
                    }
                    worker::Request::QueryPathInfo { path } => {
                        push!(
                            start,
                            S2C::OptPathInfo(worker::read_query_path_info(
                                &mut r,
                                &dir(),
                                &neg,
                                path
                            )?)
                        );
                    }
                    worker::Request::NarFromPath { .. } => {
                        push!(start, S2C::Nar(read_nar(&mut r)?));
                    }
                    worker::Request::BuildDerivation { .. } => {
                        push!(
                            start,
                            S2C::BuildResult(worker::read_build_result(&mut r, &dir(), &neg)?)
                        );
                    }
                    worker::Request::AddMultipleToStore { .. }
                    | worker::Request::AddToStoreNar { .. }
                    | worker::Request::SetOptions(_) => {}
                    other => panic!("no reply decoder for {other:?} in this test"),
                }
            }
        }
    }
    Ok(out)
}

// ===== re-encoding =====

/// Our encoding of a client → server message.
fn encode_c2s(msg: &C2S, negotiated: ProtocolVersion) -> Vec<u8> {
    let mut out = Vec::new();
    let neg = Negotiated::new(negotiated);
    match msg {
        C2S::ServeHello(v) => serve::write_client_hello(&mut out, *v),
        C2S::WorkerHello(v) => worker::write_client_hello(&mut out, *v),
        C2S::WorkerTail => worker::write_client_tail(&mut out, negotiated),
        C2S::Serve(req) => req.write(&mut out, &dir(), negotiated),
        C2S::Worker(req) => req.write(&mut out, &dir(), &neg),
        C2S::RawNar(nar) => nar.tree.write_nar(&mut out),
        C2S::Framed { frames, payload } => {
            let mut inner = Vec::new();
            match payload {
                FramedPayload::Nar(nar) => nar.tree.write_nar(&mut inner),
                FramedPayload::Multiple(items) => {
                    worker::write_multiple_count(&mut inner, items.len() as u64);
                    for (info, nar) in items {
                        worker::write_multiple_entry(&mut inner, &dir(), info);
                        nar.tree.write_nar(&mut inner);
                    }
                }
            }
            // Frame boundaries are the sender's choice: cut where Nix cut.
            let mut rest = inner.as_slice();
            for &n in frames {
                worker::write_frame_header(&mut out, n);
                let (frame, tail) = rest.split_at(n.min(rest.len()));
                out.extend_from_slice(frame);
                rest = tail;
            }
            assert!(rest.is_empty(), "re-encoded payload is longer");
            worker::write_frame_end(&mut out);
        }
    }
    out
}

/// Our encoding of a server → client message.
fn encode_s2c(msg: &S2C, protocol: Protocol, negotiated: ProtocolVersion) -> Vec<u8> {
    let mut out = Vec::new();
    let neg = Negotiated::new(negotiated);
    match msg {
        S2C::ServeHello(_) => serve::write_server_hello(&mut out, serve::OUR_VERSION),
        S2C::WorkerHello(_) => worker::write_server_hello(&mut out, ProtocolVersion::new(1, 34)),
        S2C::DaemonInfo(info) => worker::write_daemon_info(&mut out, negotiated, info),
        S2C::Stderr(m) => m.write(&mut out, negotiated),
        S2C::PathSet(paths) => put_store_path_set(&mut out, &dir(), paths),
        S2C::PathInfos(infos) => serve::write_path_infos(&mut out, &dir(), infos),
        S2C::OptPathInfo(info) => {
            worker::write_query_path_info(&mut out, &dir(), &neg, info.as_ref());
        }
        S2C::Ack => out.put_word(1),
        S2C::BuildResult(res) => {
            let layout = match protocol {
                Protocol::Serve => serve::result_layout(negotiated),
                Protocol::Worker => neg.result_layout(),
            };
            res.write(&mut out, &dir(), layout);
        }
        S2C::Nar(nar) => nar.tree.write_nar(&mut out),
    }
    out
}

/// The serve options block ends every `BuildDerivation` / `BuildPaths` request; at 2.7 it is
/// six words, and `enforceDeterminism` is the fifth.
const SERVE_OPTIONS_WORDS: usize = 6;
const ENFORCE_DETERMINISM_WORD: usize = 4;

/// Whether a re-encoded client message may differ from Nix's, and where.
fn known_difference(msg: &C2S, ours: &[u8], theirs: &[u8]) -> bool {
    let C2S::Serve(serve::Request::BuildDerivation { .. } | serve::Request::BuildPaths { .. }) =
        msg
    else {
        return false;
    };
    // Nix 2.8.0 sends `settings.enforceDeterminism` (default true); `BuildOptions` does not
    // carry it and always sends false, which every server ignores (it only matters with
    // nrRepeats > 0, which we never send and newer servers refuse).
    if ours.len() != theirs.len() {
        return false;
    }
    let at = ours.len() - 8 * (SERVE_OPTIONS_WORDS - ENFORCE_DETERMINISM_WORD);
    let mut patched = ours.to_vec();
    patched[at..at + 8].copy_from_slice(&theirs[at..at + 8]);
    patched == theirs && theirs[at..at + 8] == 1u64.to_le_bytes()
}

// ===== tests =====

fn decode_both(rec: &Recording) -> (Vec<Spanned<C2S>>, Vec<Spanned<S2C>>, ProtocolVersion) {
    let (client, negotiated) = versions(rec);
    let c2s = decode_c2s(&rec.c2s, rec.protocol, negotiated, None)
        .unwrap_or_else(|e| panic!("{}: client stream: {e:?}", rec.name));
    let requests: Vec<C2S> = c2s.iter().map(|s| s.msg.clone()).collect();
    let s2c = decode_s2c(&rec.s2c, rec.protocol, client, &requests, None)
        .unwrap_or_else(|e| panic!("{}: server stream: {e:?}", rec.name));
    (c2s, s2c, negotiated)
}

#[test]
fn every_recording_decodes_completely_in_both_directions() {
    for rec in recordings() {
        let (c2s, s2c, _) = decode_both(&rec);
        let c_end = c2s.last().expect("messages").end;
        let s_end = s2c.last().expect("messages").end;
        assert_eq!(c_end, rec.c2s.len(), "{}: client bytes left over", rec.name);
        assert_eq!(s_end, rec.s2c.len(), "{}: server bytes left over", rec.name);
        // Spans tile the stream.
        for w in c2s.windows(2) {
            assert_eq!(w[0].end, w[1].start, "{}", rec.name);
        }
        for w in s2c.windows(2) {
            assert_eq!(w[0].end, w[1].start, "{}", rec.name);
        }
    }
}

#[test]
fn what_the_recordings_contain() {
    let recs = recordings();
    let summary = |rec: &Recording| {
        let (c2s, s2c, v) = decode_both(rec);
        let c: Vec<String> = c2s.iter().map(|s| c2s_name(&s.msg)).collect();
        let s: Vec<String> = s2c.iter().map(|s| s2c_name(&s.msg)).collect();
        (v, c.join(" "), s.join(" "))
    };
    let (v, c, s) = summary(&recs[0]);
    assert_eq!(v, ProtocolVersion::new(2, 7));
    assert_eq!(
        c,
        "hello QueryValidPaths AddToStoreNar nar AddToStoreNar nar AddToStoreNar nar"
    );
    assert_eq!(s, "hello paths ack ack ack");

    let (v, c, s) = summary(&recs[1]);
    assert_eq!(v, ProtocolVersion::new(1, 34));
    assert_eq!(c, "hello tail QueryValidPaths AddMultipleToStore framed");
    assert_eq!(s, "hello info last last paths last");

    let (v, c, s) = summary(&recs[2]);
    assert_eq!(v, ProtocolVersion::new(2, 7));
    assert_eq!(
        c,
        "hello QueryValidPaths AddToStoreNar nar AddToStoreNar nar BuildDerivation \
         QueryPathInfos DumpStorePath"
    );
    assert_eq!(s, "hello paths ack ack result infos nar");

    for rec in &recs[3..] {
        let (v, c, s) = summary(rec);
        assert_eq!(v, ProtocolVersion::new(1, 34));
        assert_eq!(
            c,
            "hello tail QueryValidPaths AddMultipleToStore framed BuildDerivation \
             QueryPathInfo NarFromPath",
            "{}",
            rec.name
        );
        assert!(
            s.starts_with("hello info last last paths last start "),
            "{s}"
        );
        assert!(s.ends_with(" last result last info last nar"), "{s}");
    }
}

fn c2s_name(m: &C2S) -> String {
    match m {
        C2S::ServeHello(_) | C2S::WorkerHello(_) => "hello".into(),
        C2S::WorkerTail => "tail".into(),
        C2S::Serve(r) => format!("{:?}", r.command()),
        C2S::Worker(r) => format!("{:?}", r.op()),
        C2S::RawNar(_) => "nar".into(),
        C2S::Framed { .. } => "framed".into(),
    }
}

fn s2c_name(m: &S2C) -> String {
    match m {
        S2C::ServeHello(_) | S2C::WorkerHello(_) => "hello",
        S2C::DaemonInfo(_) => "info",
        S2C::Stderr(StderrMsg::Last) => "last",
        S2C::Stderr(StderrMsg::StartActivity(_)) => "start",
        S2C::Stderr(StderrMsg::StopActivity(_)) => "stop",
        S2C::Stderr(StderrMsg::Result(_)) => "result-msg",
        S2C::Stderr(_) => "stderr",
        S2C::PathSet(_) => "paths",
        S2C::PathInfos(_) => "infos",
        S2C::OptPathInfo(_) => "info",
        S2C::Ack => "ack",
        S2C::BuildResult(_) => "result",
        S2C::Nar(_) => "nar",
    }
    .into()
}

#[test]
fn re_encoding_reproduces_nix_bytes() {
    let mut known = 0;
    for rec in recordings() {
        let (c2s, s2c, v) = decode_both(&rec);
        for m in &c2s {
            let theirs = &rec.c2s[m.start..m.end];
            let ours = encode_c2s(&m.msg, v);
            if ours != theirs {
                assert!(
                    known_difference(&m.msg, &ours, theirs),
                    "{}: client message at {} re-encodes differently: {:?}",
                    rec.name,
                    m.start,
                    m.msg
                );
                known += 1;
            }
        }
        for m in &s2c {
            let theirs = &rec.s2c[m.start..m.end];
            let ours = encode_s2c(&m.msg, rec.protocol, v);
            assert_eq!(
                ours, theirs,
                "{}: server message at {} re-encodes differently: {:?}",
                rec.name, m.start, m.msg
            );
        }
    }
    // Exactly the one serve BuildDerivation differs (enforceDeterminism).
    assert_eq!(known, 1);
}

#[test]
fn serve_options_differ_only_in_enforce_determinism() {
    let rec = &recordings()[2];
    let (c2s, _, v) = decode_both(rec);
    let m = c2s
        .iter()
        .find(|m| matches!(m.msg, C2S::Serve(serve::Request::BuildDerivation { .. })))
        .expect("BuildDerivation");
    let theirs = &rec.c2s[m.start..m.end];
    let options = &theirs[theirs.len() - 8 * SERVE_OPTIONS_WORDS..];
    let words: Vec<u64> = options
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("word")))
        .collect();
    // maxSilentTime, buildTimeout, maxLogSize, nrRepeats, enforceDeterminism, keepFailed.
    assert_eq!(words, [0, 0, 0, 0, 1, 0]);
    let ours = encode_c2s(&m.msg, v);
    assert_ne!(ours, theirs);
    assert!(known_difference(&m.msg, &ours, theirs));
}

#[test]
fn payloads_agree_with_their_metadata() {
    for rec in recordings() {
        let (c2s, s2c, _) = decode_both(&rec);
        // Uploads: every NAR has the size and hash its path info announced.
        let mut uploaded = 0;
        for w in c2s.windows(2) {
            match (&w[0].msg, &w[1].msg) {
                (C2S::Serve(serve::Request::AddToStoreNar { info }), C2S::RawNar(nar)) => {
                    assert_eq!((nar.size, nar.hash), (info.nar_size, info.nar_hash));
                    uploaded += 1;
                }
                (
                    C2S::Worker(worker::Request::AddMultipleToStore { .. }),
                    C2S::Framed {
                        payload: FramedPayload::Multiple(items),
                        ..
                    },
                ) => {
                    for (info, nar) in items {
                        assert_eq!((nar.size, nar.hash), (info.nar_size, info.nar_hash));
                        uploaded += 1;
                    }
                }
                _ => {}
            }
        }
        // Downloads: the NAR matches the path info the server gave just before.
        let mut last_info: Option<PathInfo> = None;
        let mut downloaded = 0;
        for m in &s2c {
            match &m.msg {
                S2C::PathInfos(infos) => last_info = infos.first().cloned(),
                S2C::OptPathInfo(info) => last_info = info.clone(),
                S2C::Nar(nar) => {
                    let info = last_info.as_ref().expect("info before the NAR");
                    assert_eq!((nar.size, nar.hash), (info.nar_size, info.nar_hash));
                    downloaded += 1;
                }
                _ => {}
            }
        }
        let expected = match rec.name {
            "copy-ssh" | "copy-ssh-ng" => (3, 0),
            "build-hook-ssh/build1" => (2, 1),
            "build-hook-ssh-ng/build1" => (1, 1),
            "build-hook-ssh-ng/build2" => (0, 1),
            other => panic!("{other}"),
        };
        assert_eq!((uploaded, downloaded), expected, "{}", rec.name);
    }
}

#[test]
fn build_results_carry_the_built_output() {
    for rec in recordings() {
        let (_, s2c, _) = decode_both(&rec);
        for m in &s2c {
            if let S2C::BuildResult(res) = &m.msg {
                assert!(res.status.is_success(), "{}: {res:?}", rec.name);
                assert_eq!(res.times_built, 1);
                assert!(res.start_time > 0 && res.stop_time >= res.start_time);
                let out = res.built_outputs.get("out").expect("out");
                assert!(out.path.name().starts_with("hook-"), "{out:?}");
                assert!(out.id.as_deref().is_some_and(|id| id.ends_with("!out")));
            }
        }
    }
}

/// The end of the message that contains byte `cut` (the first span ending after it).
fn message_end<T>(spans: &[Spanned<T>], cut: usize) -> usize {
    spans
        .iter()
        .find(|s| s.end > cut)
        .map(|s| s.end)
        .expect("cut inside the stream")
}

#[test]
fn every_strict_prefix_needs_more_bytes() {
    for rec in recordings() {
        let (client, negotiated) = versions(&rec);
        let (c2s, s2c, _) = decode_both(&rec);
        let requests: Vec<C2S> = c2s.iter().map(|s| s.msg.clone()).collect();

        for cut in 0..rec.c2s.len() {
            let r = decode_c2s(&rec.c2s[..cut], rec.protocol, negotiated, Some(c2s.len()));
            match r {
                Err(ReadError::Incomplete { needed }) => {
                    assert!(needed > 0);
                    let end = message_end(&c2s, cut);
                    assert!(
                        cut + needed <= end,
                        "{}: client cut at {cut} asks for {needed} bytes, message ends at {end}",
                        rec.name
                    );
                }
                other => panic!("{}: client cut at {cut}: {other:?}", rec.name),
            }
        }
        for cut in 0..rec.s2c.len() {
            let r = decode_s2c(
                &rec.s2c[..cut],
                rec.protocol,
                client,
                &requests,
                Some(s2c.len()),
            );
            match r {
                Err(ReadError::Incomplete { needed }) => {
                    assert!(needed > 0);
                    let end = message_end(&s2c, cut);
                    assert!(
                        cut + needed <= end,
                        "{}: server cut at {cut} asks for {needed} bytes, message ends at {end}",
                        rec.name
                    );
                }
                other => panic!("{}: server cut at {cut}: {other:?}", rec.name),
            }
        }
    }
}

/// The same property for each server message decoded on its own, with the message's own
/// decoder: every prefix is incomplete (with an honest hint), and the whole message decodes to
/// the same value, consuming it exactly.
#[test]
fn every_message_alone_needs_more_bytes_until_complete() {
    for rec in recordings() {
        let (client, negotiated) = versions(&rec);
        let (_, s2c, _) = decode_both(&rec);
        let neg = Negotiated::new(negotiated);
        let mut checked = 0;
        for m in &s2c {
            let decode = |r: &mut WireReader<'_>| -> ReadResult<S2C> {
                Ok(match &m.msg {
                    S2C::Stderr(_) => S2C::Stderr(StderrMsg::read(r, negotiated)?),
                    S2C::BuildResult(_) => S2C::BuildResult(match rec.protocol {
                        Protocol::Serve => serve::read_build_result(r, &dir(), negotiated)?,
                        Protocol::Worker => worker::read_build_result(r, &dir(), &neg)?,
                    }),
                    S2C::PathInfos(_) => S2C::PathInfos(serve::read_path_infos(r, &dir())?),
                    S2C::PathSet(_) => S2C::PathSet(serve::read_path_set(r, &dir())?),
                    S2C::DaemonInfo(_) => S2C::DaemonInfo(worker::read_daemon_info(r, negotiated)?),
                    S2C::ServeHello(_) => S2C::ServeHello(serve::read_server_hello(r, client)?),
                    S2C::WorkerHello(_) => S2C::WorkerHello(worker::read_server_hello(r, client)?),
                    S2C::OptPathInfo(info) => {
                        let path = &info
                            .as_ref()
                            .expect("the recordings ask for valid paths")
                            .path;
                        S2C::OptPathInfo(worker::read_query_path_info(r, &dir(), &neg, path)?)
                    }
                    S2C::Ack => {
                        serve::read_ack(r, "ack")?;
                        S2C::Ack
                    }
                    S2C::Nar(_) => S2C::Nar(read_nar(r)?),
                })
            };
            let bytes = &rec.s2c[m.start..m.end];
            let mut r = WireReader::new(bytes, &LIMITS);
            let v = decode(&mut r).unwrap_or_else(|e| panic!("{}: {e:?}", rec.name));
            assert_eq!(v, m.msg);
            assert_eq!(r.position(), bytes.len(), "{}: {:?}", rec.name, m.msg);
            for cut in 0..bytes.len() {
                let mut r = WireReader::new(&bytes[..cut], &LIMITS);
                match decode(&mut r) {
                    Err(ReadError::Incomplete { needed }) => {
                        assert!(needed > 0 && cut + needed <= bytes.len());
                    }
                    other => panic!("{}: {:?} cut at {cut}: {other:?}", rec.name, m.msg),
                }
            }
            checked += 1;
        }
        assert!(checked > 0);
    }
}

/// Corrupting any single byte of any recording gives a value or a typed error, never a panic
/// (and never a hang: the decoders are pure).
#[test]
fn single_byte_corruptions_never_panic() {
    let mut errors = 0usize;
    for rec in recordings() {
        let (client, negotiated) = versions(&rec);
        let (c2s, _, _) = decode_both(&rec);
        let requests: Vec<C2S> = c2s.iter().map(|s| s.msg.clone()).collect();
        for (stream, is_client) in [(&rec.c2s, true), (&rec.s2c, false)] {
            for at in 0..stream.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut bad = stream.clone();
                    bad[at] ^= flip;
                    let r = if is_client {
                        decode_c2s(&bad, rec.protocol, negotiated, None).map(|_| ())
                    } else {
                        decode_s2c(&bad, rec.protocol, client, &requests, None).map(|_| ())
                    };
                    if matches!(r, Err(ReadError::Proto(_))) {
                        errors += 1;
                    }
                }
            }
        }
    }
    // Most corruptions are caught (the rest land in free-form bytes: file contents, log text).
    assert!(errors > 10_000, "{errors}");
}
