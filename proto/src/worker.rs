//! The worker (daemon) protocol (`nix-daemon --stdio`, store URLs `ssh-ng://`, and the local
//! daemon socket).
//!
//! Every operation is a request, then a stream of `STDERR_*` messages (logs, activities, an
//! error) ending in `STDERR_LAST` or `STDERR_ERROR`, then the reply. A `STDERR_ERROR` fails the
//! operation but leaves the connection usable. Reference: `nix-protocols.md` §3; Nix 2.8.0
//! `src/libstore/worker-protocol.hh`, `remote-store.cc`, `daemon.cc`.
//!
//! Like [`crate::serve`], requests are values with a client-side `write` and a server-side
//! `read`; framed payloads (NAR uploads) are sent by the driver after the request header.

use std::collections::{BTreeMap, BTreeSet};

use bytes::BufMut;

use crate::build_result::{BuildResult, OutputsEncoding, ResultLayout};
use crate::derivation::BasicDerivation;
use crate::derived_path::DerivedPath;
use crate::error::{Incompatible, Misbehaved, ProtoError};
use crate::path_info::PathInfo;
use crate::store_path::{
    StoreDir, StorePath, put_opt_store_path, put_store_path, put_store_path_set,
    read_opt_store_path, read_store_path, read_store_path_set,
};
use crate::version::ProtocolVersion;
use crate::wire::{ReadError, ReadResult, WireReader, WireWrite};

/// Client → daemon magic (`WORKER_MAGIC_1`, "cxin" as little-endian bytes).
pub const MAGIC_1: u64 = 0x6e69_7863;
/// Daemon → client magic (`WORKER_MAGIC_2`).
pub const MAGIC_2: u64 = 0x6478_696f;
/// What we announce by default: the newest version, with feature negotiation. Peers answer
/// with their own version and both sides gate on the lower one (Nix 2.8.0: 1.34, Lix: 1.35,
/// Nix 2.24+: 1.38). At least 1.35 is mandatory: Lix 2.94+ refuses older clients.
pub const OUR_VERSION: ProtocolVersion = ProtocolVersion::new(1, 38);
/// Oldest daemon we accept. 1.21 is the oldest Lix 2.91+ still speaks with; it also brings
/// activities (1.20) and the ops a scheduler needs.
pub const MIN_VERSION: ProtocolVersion = ProtocolVersion::new(1, 21);
/// The feature that switches realisations to the `name → (path, sigs)` encoding (Nix 2.35).
pub const FEATURE_REALISATION_WITH_PATH: &str = "realisation-with-path-not-hash";

/// `STDERR_NEXT`: a log or error text.
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
/// `STDERR_READ`: the daemon pulls data (AddToStoreNar at 1.21–1.22).
pub const STDERR_READ: u64 = 0x6461_7461;
/// `STDERR_WRITE`: the daemon pushes data (obsolete ops only).
pub const STDERR_WRITE: u64 = 0x6461_7416;
/// `STDERR_LAST`: the operation's reply follows.
pub const STDERR_LAST: u64 = 0x616c_7473;
/// `STDERR_ERROR`: the operation failed; no reply follows.
pub const STDERR_ERROR: u64 = 0x6378_7470;
/// `STDERR_START_ACTIVITY`.
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
/// `STDERR_STOP_ACTIVITY`.
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
/// `STDERR_RESULT`.
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Operation numbers (`WorkerOp` in Nix) of the operations this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Op {
    /// 1
    IsValidPath = 1,
    /// 7
    AddToStore = 7,
    /// 9
    BuildPaths = 9,
    /// 10
    EnsurePath = 10,
    /// 11
    AddTempRoot = 11,
    /// 19
    SetOptions = 19,
    /// 26
    QueryPathInfo = 26,
    /// 29
    QueryPathFromHashPart = 29,
    /// 31
    QueryValidPaths = 31,
    /// 36
    BuildDerivation = 36,
    /// 37
    AddSignatures = 37,
    /// 38
    NarFromPath = 38,
    /// 39
    AddToStoreNar = 39,
    /// 40
    QueryMissing = 40,
    /// 41
    QueryDerivationOutputMap = 41,
    /// 42
    RegisterDrvOutput = 42,
    /// 43
    QueryRealisation = 43,
    /// 44
    AddMultipleToStore = 44,
    /// 45
    AddBuildLog = 45,
    /// 46
    BuildPathsWithResults = 46,
}

impl Op {
    /// From the wire number.
    pub fn from_code(code: u64) -> Option<Self> {
        use Op::*;
        Some(match code {
            1 => IsValidPath,
            7 => AddToStore,
            9 => BuildPaths,
            10 => EnsurePath,
            11 => AddTempRoot,
            19 => SetOptions,
            26 => QueryPathInfo,
            29 => QueryPathFromHashPart,
            31 => QueryValidPaths,
            36 => BuildDerivation,
            37 => AddSignatures,
            38 => NarFromPath,
            39 => AddToStoreNar,
            40 => QueryMissing,
            41 => QueryDerivationOutputMap,
            42 => RegisterDrvOutput,
            43 => QueryRealisation,
            44 => AddMultipleToStore,
            45 => AddBuildLog,
            46 => BuildPathsWithResults,
            _ => return None,
        })
    }

    /// The oldest negotiated version that has the operation.
    pub fn min_version(self) -> ProtocolVersion {
        let minor = match self {
            Op::QueryValidPaths => 12,
            Op::AddToStoreNar => 18,
            // Older daemons read another layout (a bare name, flags and an unframed dump);
            // only the 1.25 one, with the content-address method, references and a framed
            // dump, is spoken here (src/libstore/daemon.cc).
            Op::AddToStore => 25,
            Op::QueryMissing => 19,
            // RemoteStore::queryPartialDerivationOutputMap sends it from 1.22 (0x16) on
            // (src/libstore/remote-store.cc).
            Op::QueryDerivationOutputMap => 22,
            Op::RegisterDrvOutput | Op::QueryRealisation => 27,
            // Both came with the framed uploads of Nix 2.4 (protocol 1.32); RemoteStore's
            // addBuildLog sends it without a version check (src/libstore/remote-store.cc).
            Op::AddMultipleToStore | Op::AddBuildLog => 32,
            Op::BuildPathsWithResults => 34,
            _ => 0,
        };
        ProtocolVersion::new(1, minor)
    }
}

// ===== connection parameters =====

/// What a worker connection negotiated; every encoder and decoder is gated on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// `min(ours, theirs)`.
    pub version: ProtocolVersion,
    /// Features both sides listed (1.38+).
    pub features: BTreeSet<String>,
}

impl Negotiated {
    /// A connection at `version` with no features.
    pub fn new(version: ProtocolVersion) -> Self {
        Negotiated {
            version,
            features: BTreeSet::new(),
        }
    }

    fn at_least(&self, minor: u8) -> bool {
        self.version.at_least(1, minor)
    }

    fn realisation_with_path(&self) -> bool {
        self.features.contains(FEATURE_REALISATION_WITH_PATH)
    }

    /// The build-result layout of `BuildDerivation` and `BuildPathsWithResults` replies.
    pub fn result_layout(&self) -> ResultLayout {
        ResultLayout {
            times: self.at_least(29),
            cpu: self.at_least(37),
            outputs: if !self.at_least(28) {
                OutputsEncoding::Absent
            } else if self.realisation_with_path() {
                OutputsEncoding::NameToPath
            } else {
                OutputsEncoding::RealisationJson
            },
        }
    }

    /// Errors unless the negotiated version has `op`.
    pub fn check_op(&self, op: Op) -> Result<(), ProtoError> {
        let needs = op.min_version();
        if self.version < needs {
            return Err(Incompatible::OperationUnsupported {
                op: op_name(op),
                needs,
                negotiated: self.version,
            }
            .into());
        }
        Ok(())
    }

    /// Errors unless `req` can be encoded on this connection: its op exists at the negotiated
    /// version ([`Negotiated::check_op`]), and a realisation id has the form the connection
    /// uses. A derivation-path id ([`DrvOutputId::Path`]) exists only with the
    /// [`FEATURE_REALISATION_WITH_PATH`] feature, and a hash-modulo id only without it;
    /// encoding the other form would send a request the daemon cannot parse.
    pub fn check_request(&self, req: &Request) -> Result<(), ProtoError> {
        let op = req.op();
        self.check_op(op)?;
        let id = match req {
            Request::RegisterDrvOutput(real) => &real.id,
            Request::QueryRealisation(id) => id,
            _ => return Ok(()),
        };
        let with_path = self.realisation_with_path();
        let reason = match (id, with_path) {
            (DrvOutputId::Path { .. }, false) => {
                "a derivation-path id needs the feature realisation-with-path-not-hash"
            }
            (DrvOutputId::HashModulo { .. }, true) => {
                "a hash-modulo id cannot be sent once realisation-with-path-not-hash is negotiated"
            }
            _ => return Ok(()),
        };
        Err(Incompatible::FeatureMismatch {
            op: op_name(op),
            reason,
        }
        .into())
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::IsValidPath => "IsValidPath",
        Op::BuildPaths => "BuildPaths",
        Op::EnsurePath => "EnsurePath",
        Op::AddTempRoot => "AddTempRoot",
        Op::SetOptions => "SetOptions",
        Op::QueryPathInfo => "QueryPathInfo",
        Op::QueryPathFromHashPart => "QueryPathFromHashPart",
        Op::QueryValidPaths => "QueryValidPaths",
        Op::BuildDerivation => "BuildDerivation",
        Op::AddSignatures => "AddSignatures",
        Op::NarFromPath => "NarFromPath",
        Op::AddToStoreNar => "AddToStoreNar",
        Op::AddToStore => "AddToStore",
        Op::QueryMissing => "QueryMissing",
        Op::QueryDerivationOutputMap => "QueryDerivationOutputMap",
        Op::RegisterDrvOutput => "RegisterDrvOutput",
        Op::QueryRealisation => "QueryRealisation",
        Op::AddMultipleToStore => "AddMultipleToStore",
        Op::AddBuildLog => "AddBuildLog",
        Op::BuildPathsWithResults => "BuildPathsWithResults",
    }
}

// ===== handshake =====

/// Whether the daemon trusts us (1.35+; unknown before, and on 2.8.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The remote user is trusted: signatures are not checked, any derivation may be built.
    Trusted,
    /// Untrusted: paths need signatures, only content-addressed derivations may be built.
    NotTrusted,
}

/// What the daemon tells about itself after the version exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInfo {
    /// Its Nix (or Lix) version string (1.33+).
    pub nix_version: Option<String>,
    /// Its trust decision (1.35+); `None` means unknown.
    pub trust: Option<Trust>,
}

/// First client write: magic and our version.
pub fn write_client_hello<B: BufMut + ?Sized>(out: &mut B, ours: ProtocolVersion) {
    out.put_word(MAGIC_1);
    out.put_word(ours.to_wire());
}

/// Reads the daemon's magic and version; returns the negotiated version.
pub fn read_server_hello(
    r: &mut WireReader<'_>,
    ours: ProtocolVersion,
) -> ReadResult<ProtocolVersion> {
    let theirs = r.read_hello(MAGIC_2, "worker version")?;
    Ok(ours
        .negotiate_checked(theirs, MIN_VERSION)
        .map_err(ProtoError::from)?)
}

/// A feature list (1.38+), sent by both sides.
pub fn write_features<B: BufMut + ?Sized>(out: &mut B, features: &BTreeSet<String>) {
    out.put_str_list(features);
}

/// Reads a feature list.
pub fn read_features(r: &mut WireReader<'_>) -> ReadResult<BTreeSet<String>> {
    Ok(r.read_string_list("features")?.into_iter().collect())
}

/// The client's words after the version (and features): obsolete CPU affinity (1.14+) and
/// reserveSpace (1.11+), both zero.
pub fn write_client_tail<B: BufMut + ?Sized>(out: &mut B, v: ProtocolVersion) {
    if v.at_least(1, 14) {
        out.put_word(0);
    }
    if v.at_least(1, 11) {
        out.put_word(0);
    }
}

/// Reads the daemon's version string and trust byte, as far as `v` has them. The stderr loop
/// (up to `STDERR_LAST`) follows.
pub fn read_daemon_info(r: &mut WireReader<'_>, v: ProtocolVersion) -> ReadResult<DaemonInfo> {
    let nix_version = if v.at_least(1, 33) {
        Some(r.read_text("daemon version", 1024)?)
    } else {
        None
    };
    let trust = if v.at_least(1, 35) {
        match r.read_u64()? {
            0 => None,
            1 => Some(Trust::Trusted),
            2 => Some(Trust::NotTrusted),
            other => {
                return Err(ProtoError::invalid("trust", format!("value {other}")).into());
            }
        }
    } else {
        None
    };
    Ok(DaemonInfo { nix_version, trust })
}

/// Server side: the client's magic and version.
pub fn read_client_hello(r: &mut WireReader<'_>) -> ReadResult<ProtocolVersion> {
    r.read_hello(MAGIC_1, "worker version")
}

/// Server side: magic and version.
pub fn write_server_hello<B: BufMut + ?Sized>(out: &mut B, ours: ProtocolVersion) {
    out.put_word(MAGIC_2);
    out.put_word(ours.to_wire());
}

/// Server side: the obsolete words of [`write_client_tail`]. A non-zero affinity flag would be
/// followed by a CPU number, which is read and ignored.
pub fn read_client_tail(r: &mut WireReader<'_>, v: ProtocolVersion) -> ReadResult<()> {
    if v.at_least(1, 14) && r.read_bool()? {
        let _cpu = r.read_u64()?;
    }
    if v.at_least(1, 11) {
        let _reserve = r.read_bool()?;
    }
    Ok(())
}

/// Server side: version string and trust byte.
pub fn write_daemon_info<B: BufMut + ?Sized>(out: &mut B, v: ProtocolVersion, info: &DaemonInfo) {
    if v.at_least(1, 33) {
        out.put_str(info.nix_version.as_deref().unwrap_or(""));
    }
    if v.at_least(1, 35) {
        out.put_word(match info.trust {
            None => 0,
            Some(Trust::Trusted) => 1,
            Some(Trust::NotTrusted) => 2,
        });
    }
}

// ===== stderr messages =====

/// A typed field of an activity or result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// Kind 0.
    Int(u64),
    /// Kind 1.
    Str(String),
}

/// `STDERR_START_ACTIVITY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartActivity {
    /// Activity id, unique per daemon process.
    pub id: u64,
    /// Verbosity level.
    pub level: u64,
    /// Activity type (105 = Build, 100 = CopyPath, ...).
    pub kind: u64,
    /// Human-readable description.
    pub text: String,
    /// Type-specific fields (for Build: drvPath, machine, curRound, nrRounds).
    pub fields: Vec<Field>,
    /// Parent activity, 0 for none.
    pub parent: u64,
}

/// `STDERR_RESULT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityResult {
    /// Activity this belongs to.
    pub id: u64,
    /// Result type (101 = BuildLogLine, 104 = SetPhase, 105 = Progress, ...).
    pub kind: u64,
    /// Type-specific fields.
    pub fields: Vec<Field>,
}

/// An error the daemon reports for the current operation (`STDERR_ERROR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// Verbosity level of the error (1.26+; 0 before).
    pub level: u64,
    /// The message, possibly with ANSI colour codes.
    pub message: String,
    /// Exit status (before 1.26 only).
    pub exit_status: Option<u64>,
    /// Trace lines (1.26+).
    pub traces: Vec<String>,
}

impl RemoteError {
    /// The message without ANSI escape sequences, for display and matching.
    pub fn plain_message(&self) -> String {
        strip_ansi(&self.message)
    }
}

/// Removes ANSI CSI escape sequences (`ESC [ ... letter`), which Nix uses for colour.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One message of the stderr loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrMsg {
    /// A log or error line (with its trailing newline).
    Next(String),
    /// The daemon wants at most this many bytes of input (answer with one string).
    Read(u64),
    /// Data for the client's sink (obsolete ops).
    Write(Vec<u8>),
    /// End of the stream; the reply follows.
    Last,
    /// The operation failed.
    Error(RemoteError),
    /// An activity started.
    StartActivity(StartActivity),
    /// An activity stopped.
    StopActivity(u64),
    /// A result of an activity (log line, phase, progress).
    Result(ActivityResult),
}

fn read_fields(r: &mut WireReader<'_>) -> ReadResult<Vec<Field>> {
    let n = r.read_u64()?;
    let max = r.limits().max_fields;
    if n > max {
        return Err(ProtoError::Malformed {
            field: "fields",
            kind: crate::error::Malformed::TooLong { len: n, max },
        }
        .into());
    }
    let mut out = Vec::new();
    for _ in 0..n {
        match r.read_u64()? {
            0 => out.push(Field::Int(r.read_u64()?)),
            1 => out.push(Field::Str(r.read_text("field", r.limits().max_string)?)),
            kind => {
                return Err(
                    ProtoError::invalid("field", format!("unknown field kind {kind}")).into(),
                );
            }
        }
    }
    Ok(out)
}

fn write_fields<B: BufMut + ?Sized>(out: &mut B, fields: &[Field]) {
    out.put_word(fields.len() as u64);
    for f in fields {
        match f {
            Field::Int(i) => {
                out.put_word(0);
                out.put_word(*i);
            }
            Field::Str(s) => {
                out.put_word(1);
                out.put_str(s);
            }
        }
    }
}

impl StderrMsg {
    /// Decodes one message at negotiated version `v`.
    pub fn read(r: &mut WireReader<'_>, v: ProtocolVersion) -> ReadResult<Self> {
        let max_text = r.limits().max_string;
        let code = r.read_u64()?;
        Ok(match code {
            STDERR_NEXT => StderrMsg::Next(r.read_text("STDERR_NEXT", max_text)?),
            STDERR_READ => StderrMsg::Read(r.read_u64()?),
            STDERR_WRITE => StderrMsg::Write(r.read_bytes("STDERR_WRITE")?.to_vec()),
            STDERR_LAST => StderrMsg::Last,
            STDERR_ERROR => {
                if v.at_least(1, 26) {
                    let _type = r.read_bytes("STDERR_ERROR.type")?;
                    let level = r.read_u64()?;
                    let _name = r.read_bytes("STDERR_ERROR.name")?;
                    let message = r.read_text("STDERR_ERROR.message", max_text)?;
                    if r.read_bool()? {
                        return Err(ProtoError::invalid("STDERR_ERROR", "error position").into());
                    }
                    let n = r.read_count("STDERR_ERROR.traces")?;
                    let mut traces = Vec::new();
                    for _ in 0..n {
                        if r.read_bool()? {
                            return Err(
                                ProtoError::invalid("STDERR_ERROR", "trace position").into()
                            );
                        }
                        traces.push(r.read_text("STDERR_ERROR.trace", max_text)?);
                    }
                    StderrMsg::Error(RemoteError {
                        level,
                        message,
                        exit_status: None,
                        traces,
                    })
                } else {
                    let message = r.read_text("STDERR_ERROR.message", max_text)?;
                    let status = r.read_u64()?;
                    StderrMsg::Error(RemoteError {
                        level: 0,
                        message,
                        exit_status: Some(status),
                        traces: Vec::new(),
                    })
                }
            }
            STDERR_START_ACTIVITY if v.at_least(1, 20) => {
                let id = r.read_u64()?;
                let level = r.read_u64()?;
                let kind = r.read_u64()?;
                let text = r.read_text("START_ACTIVITY.text", max_text)?;
                let fields = read_fields(r)?;
                let parent = r.read_u64()?;
                StderrMsg::StartActivity(StartActivity {
                    id,
                    level,
                    kind,
                    text,
                    fields,
                    parent,
                })
            }
            STDERR_STOP_ACTIVITY if v.at_least(1, 20) => StderrMsg::StopActivity(r.read_u64()?),
            STDERR_RESULT if v.at_least(1, 20) => {
                let id = r.read_u64()?;
                let kind = r.read_u64()?;
                let fields = read_fields(r)?;
                StderrMsg::Result(ActivityResult { id, kind, fields })
            }
            other => return Err(ProtoError::from(Misbehaved::UnknownStderrCode(other)).into()),
        })
    }

    /// Encodes one message (server side).
    pub fn write<B: BufMut + ?Sized>(&self, out: &mut B, v: ProtocolVersion) {
        match self {
            StderrMsg::Next(s) => {
                out.put_word(STDERR_NEXT);
                out.put_str(s);
            }
            StderrMsg::Read(n) => {
                out.put_word(STDERR_READ);
                out.put_word(*n);
            }
            StderrMsg::Write(d) => {
                out.put_word(STDERR_WRITE);
                out.put_bytes_padded(d);
            }
            StderrMsg::Last => out.put_word(STDERR_LAST),
            StderrMsg::Error(e) => {
                out.put_word(STDERR_ERROR);
                if v.at_least(1, 26) {
                    out.put_str("Error");
                    out.put_word(e.level);
                    out.put_str("Error");
                    out.put_str(&e.message);
                    out.put_word(0);
                    out.put_word(e.traces.len() as u64);
                    for t in &e.traces {
                        out.put_word(0);
                        out.put_str(t);
                    }
                } else {
                    out.put_str(&e.message);
                    out.put_word(e.exit_status.unwrap_or(1));
                }
            }
            StderrMsg::StartActivity(a) => {
                out.put_word(STDERR_START_ACTIVITY);
                out.put_word(a.id);
                out.put_word(a.level);
                out.put_word(a.kind);
                out.put_str(&a.text);
                write_fields(out, &a.fields);
                out.put_word(a.parent);
            }
            StderrMsg::StopActivity(id) => {
                out.put_word(STDERR_STOP_ACTIVITY);
                out.put_word(*id);
            }
            StderrMsg::Result(res) => {
                out.put_word(STDERR_RESULT);
                out.put_word(res.id);
                out.put_word(res.kind);
                write_fields(out, &res.fields);
            }
        }
    }
}

// ===== framed streams =====

/// Writes the header of one frame of a framed stream (1.23+ uploads). A zero-length frame ends
/// the stream, so an empty `len` must only be written through [`write_frame_end`].
pub fn write_frame_header<B: BufMut + ?Sized>(out: &mut B, len: usize) {
    out.put_word(len as u64);
}

/// Ends a framed stream.
pub fn write_frame_end<B: BufMut + ?Sized>(out: &mut B) {
    out.put_word(0);
}

/// Server side: one frame header (0 = end), bounded by [`crate::Limits::max_frame`].
pub fn read_frame_header(r: &mut WireReader<'_>) -> ReadResult<usize> {
    let n = r.read_u64()?;
    let max = r.limits().max_frame;
    if n > max {
        return Err(ProtoError::Malformed {
            field: "frame",
            kind: crate::error::Malformed::TooLong { len: n, max },
        }
        .into());
    }
    usize::try_from(n).map_err(|_| ProtoError::invalid("frame", "length does not fit").into())
}

// ===== options =====

/// Daemon-side settings sent with `SetOptions` (op 19). Nix's own `ssh-ng://` client never
/// sends them, which is why `max-silent-time` and friends don't reach ssh-ng builders there;
/// we send them so both protocols get the same build limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Keep build directories of failed builds.
    pub keep_failed: bool,
    /// Continue with other builds after a failure.
    pub keep_going: bool,
    /// Build from source when substitution fails.
    pub try_fallback: bool,
    /// Daemon-side verbosity for `STDERR_NEXT` (0 error … 7 vomit).
    pub verbosity: u64,
    /// Parallel builds on the daemon.
    pub max_build_jobs: u64,
    /// Seconds without output before a build is killed (0 = no limit).
    pub max_silent_time: u64,
    /// Whether build logs are sent at all (Nix maps true to level Error, i.e. "always").
    pub verbose_build: bool,
    /// `cores` for builds (0 = all).
    pub build_cores: u64,
    /// Allow substitution.
    pub use_substitutes: bool,
    /// Further settings by name (1.12+). Untrusted clients may only set a few (`timeout`...).
    pub overrides: BTreeMap<String, String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: 0,
            max_build_jobs: 1,
            max_silent_time: 0,
            verbose_build: true,
            build_cores: 0,
            use_substitutes: false,
            overrides: BTreeMap::new(),
        }
    }
}

impl ClientOptions {
    /// Encodes the body of `SetOptions`.
    pub fn write<B: BufMut + ?Sized>(&self, out: &mut B, v: ProtocolVersion) {
        out.put_flag(self.keep_failed);
        out.put_flag(self.keep_going);
        out.put_flag(self.try_fallback);
        out.put_word(self.verbosity);
        out.put_word(self.max_build_jobs);
        out.put_word(self.max_silent_time);
        out.put_word(1); // obsolete useBuildHook
        out.put_word(if self.verbose_build { 0 } else { 7 });
        out.put_word(0); // obsolete logType
        out.put_word(0); // obsolete printBuildTrace
        out.put_word(self.build_cores);
        out.put_flag(self.use_substitutes);
        if v.at_least(1, 12) {
            out.put_word(self.overrides.len() as u64);
            for (k, val) in &self.overrides {
                out.put_str(k);
                out.put_str(val);
            }
        }
    }

    /// Decodes the body of `SetOptions` (server side).
    pub fn read(r: &mut WireReader<'_>, v: ProtocolVersion) -> ReadResult<Self> {
        let keep_failed = r.read_bool()?;
        let keep_going = r.read_bool()?;
        let try_fallback = r.read_bool()?;
        let verbosity = r.read_u64()?;
        let max_build_jobs = r.read_u64()?;
        let max_silent_time = r.read_u64()?;
        let _use_build_hook = r.read_u64()?;
        let verbose_build = r.read_u64()? == 0;
        let _log_type = r.read_u64()?;
        let _print_build_trace = r.read_u64()?;
        let build_cores = r.read_u64()?;
        let use_substitutes = r.read_bool()?;
        let mut overrides = BTreeMap::new();
        if v.at_least(1, 12) {
            let n = r.read_count("SetOptions.overrides")?;
            for _ in 0..n {
                let k = r.read_string("SetOptions.name")?;
                let val = r.read_string("SetOptions.value")?;
                overrides.insert(k, val);
            }
        }
        Ok(ClientOptions {
            keep_failed,
            keep_going,
            try_fallback,
            verbosity,
            max_build_jobs,
            max_silent_time,
            verbose_build,
            build_cores,
            use_substitutes,
            overrides,
        })
    }
}

// ===== realisations =====

/// A derivation output id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum DrvOutputId {
    /// Old form: `sha256:<base16 hash modulo>!<output>`.
    HashModulo {
        /// `sha256:<hex>`.
        drv_hash: String,
        /// Output name.
        output: String,
    },
    /// With the `realisation-with-path-not-hash` feature: the derivation path and output.
    Path {
        /// The `.drv`.
        drv_path: StorePath,
        /// Output name.
        output: String,
    },
}

impl DrvOutputId {
    /// The old string form, for `HashModulo` ids.
    pub fn to_old_string(&self) -> Option<String> {
        match self {
            DrvOutputId::HashModulo { drv_hash, output } => Some(format!("{drv_hash}!{output}")),
            DrvOutputId::Path { .. } => None,
        }
    }

    /// Parses the old string form.
    pub fn parse_old(s: &str) -> Result<Self, ProtoError> {
        let (h, o) = s
            .rsplit_once('!')
            .ok_or_else(|| ProtoError::invalid("DrvOutput", format!("{s:?} has no '!'")))?;
        Ok(DrvOutputId::HashModulo {
            drv_hash: h.to_owned(),
            output: o.to_owned(),
        })
    }
}

/// A realisation: where an output of a (content-addressed) derivation ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    /// Which output.
    pub id: DrvOutputId,
    /// Its path.
    pub out_path: StorePath,
    /// Signatures.
    pub signatures: BTreeSet<String>,
}

impl Realisation {
    fn to_json(&self, id: &str) -> String {
        serde_json::json!({
            "dependentRealisations": {},
            "id": id,
            "outPath": self.out_path.to_string(),
            "signatures": self.signatures,
        })
        .to_string()
    }

    fn from_json(s: &str, field: &'static str) -> Result<Self, ProtoError> {
        let bad = |why: String| ProtoError::invalid(field, format!("realisation: {why}"));
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| bad(e.to_string()))?;
        let id = v
            .get("id")
            .and_then(|x| x.as_str())
            .ok_or_else(|| bad("no id".into()))?;
        let out = v
            .get("outPath")
            .and_then(|x| x.as_str())
            .ok_or_else(|| bad("no outPath".into()))?;
        let base = out.rsplit('/').next().unwrap_or(out);
        let signatures = match v.get("signatures") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect(),
            _ => BTreeSet::new(),
        };
        Ok(Realisation {
            id: DrvOutputId::parse_old(id)?,
            out_path: StorePath::from_base_name_field(base, field)?,
            signatures,
        })
    }
}

// ===== requests =====

/// Build mode of build operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BuildMode {
    /// Build what is missing.
    #[default]
    Normal,
    /// Rebuild and repair (needs a trusted client).
    Repair,
    /// Rebuild and compare.
    Check,
}

impl BuildMode {
    fn code(self) -> u64 {
        match self {
            BuildMode::Normal => 0,
            BuildMode::Repair => 1,
            BuildMode::Check => 2,
        }
    }

    fn from_code(c: u64) -> Result<Self, ProtoError> {
        Ok(match c {
            0 => BuildMode::Normal,
            1 => BuildMode::Repair,
            2 => BuildMode::Check,
            other => return Err(ProtoError::invalid("buildMode", format!("{other}"))),
        })
    }
}

/// One worker request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Reply: bool.
    IsValidPath {
        /// The path.
        path: StorePath,
    },
    /// Substitute the path if possible. Reply: `u64 1`.
    EnsurePath {
        /// The path.
        path: StorePath,
    },
    /// A GC root for the life of the connection. Reply: `u64 1`.
    AddTempRoot {
        /// The path.
        path: StorePath,
    },
    /// Session settings. No reply.
    SetOptions(ClientOptions),
    /// Reply: optional unkeyed path info.
    QueryPathInfo {
        /// The path.
        path: StorePath,
    },
    /// Reply: optional path.
    QueryPathFromHashPart {
        /// 32 nix32 characters.
        hash_part: String,
    },
    /// Reply: path set.
    QueryValidPaths {
        /// Paths to check.
        paths: BTreeSet<StorePath>,
        /// Substitute first (1.27+; ignored before).
        substitute: bool,
    },
    /// Reply: BuildResult.
    BuildDerivation {
        /// `.drv` path.
        drv_path: StorePath,
        /// The derivation, inputs resolved.
        drv: BasicDerivation,
        /// Mode.
        mode: BuildMode,
    },
    /// Reply: `u64 1`.
    AddSignatures {
        /// The path.
        path: StorePath,
        /// Signatures to add.
        sigs: BTreeSet<String>,
    },
    /// Reply (after `STDERR_LAST`): a raw NAR.
    NarFromPath {
        /// The path.
        path: StorePath,
    },
    /// `AddToStore` in its 1.25 layout: a framed dump follows, from which the daemon computes
    /// the path itself (`addToStoreFromDump`). Reply (after `STDERR_LAST`): the path's keyed
    /// info ([`PathInfo::read_worker_keyed`]).
    AddToStore {
        /// The name part of the path.
        name: String,
        /// How the dump is addressed: `fixed:r:sha256` (a NAR), `fixed:sha256` (a flat file's
        /// bytes), `text:sha256`.
        method: String,
        /// References of the new path.
        references: BTreeSet<StorePath>,
        /// Repair an existing path.
        repair: bool,
    },
    /// A NAR follows (framed from 1.23). No reply.
    AddToStoreNar {
        /// Metadata.
        info: PathInfo,
        /// Repair an existing path.
        repair: bool,
        /// Skip signature checks (honoured for trusted clients only).
        dont_check_sigs: bool,
    },
    /// Reply: willBuild, willSubstitute, unknown, downloadSize, narSize.
    QueryMissing {
        /// Targets.
        targets: Vec<DerivedPath>,
    },
    /// Reply: output name → path, or none where the store does not know it
    /// (`queryPartialDerivationOutputMap`). With `ca-derivations` enabled the daemon answers
    /// from its realisations too, and lists every output; without it, only the outputs whose
    /// paths the `.drv` fixes (src/libstore/local-store.cc). The derivation must be valid.
    QueryDerivationOutputMap {
        /// The `.drv`.
        path: StorePath,
    },
    /// No reply.
    RegisterDrvOutput(Realisation),
    /// Reply: optional realisation.
    QueryRealisation(DrvOutputId),
    /// A framed stream of (path info, NAR) pairs follows. No reply.
    AddMultipleToStore {
        /// Repair.
        repair: bool,
        /// Skip signature checks (trusted clients only).
        dont_check_sigs: bool,
    },
    /// A framed stream with the whole log follows. Reply: `u64 1`. Trusted clients only, and
    /// the daemon refuses an untrusted one before it reads the frames
    /// (src/libstore/daemon.cc), so a refused request leaves the stream out of step.
    AddBuildLog {
        /// The derivation the log belongs to; sent as its base name.
        drv_path: StorePath,
    },
    /// Reply: `u64 1`; failures arrive as `STDERR_ERROR`.
    BuildPaths {
        /// Targets.
        targets: Vec<DerivedPath>,
        /// Mode.
        mode: BuildMode,
    },
    /// Reply: one keyed BuildResult per target (1.34+).
    BuildPathsWithResults {
        /// Targets.
        targets: Vec<DerivedPath>,
        /// Mode.
        mode: BuildMode,
    },
}

fn write_derived_paths<B: BufMut + ?Sized>(
    out: &mut B,
    dir: &StoreDir,
    n: &Negotiated,
    targets: &[DerivedPath],
) {
    let legacy = !n.at_least(30);
    out.put_str_list(targets.iter().map(|t| {
        if legacy {
            t.to_legacy_wire(dir)
        } else {
            t.to_wire(dir)
        }
    }));
}

fn read_derived_paths(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
    n: &Negotiated,
    field: &'static str,
) -> ReadResult<Vec<DerivedPath>> {
    let legacy = !n.at_least(30);
    let raw = r.read_string_list(field)?;
    raw.iter()
        .map(|s| DerivedPath::parse(dir, s, legacy, field).map_err(ReadError::Proto))
        .collect()
}

impl Request {
    /// The operation.
    pub fn op(&self) -> Op {
        match self {
            Request::IsValidPath { .. } => Op::IsValidPath,
            Request::EnsurePath { .. } => Op::EnsurePath,
            Request::AddTempRoot { .. } => Op::AddTempRoot,
            Request::SetOptions(_) => Op::SetOptions,
            Request::QueryPathInfo { .. } => Op::QueryPathInfo,
            Request::QueryPathFromHashPart { .. } => Op::QueryPathFromHashPart,
            Request::QueryValidPaths { .. } => Op::QueryValidPaths,
            Request::BuildDerivation { .. } => Op::BuildDerivation,
            Request::AddSignatures { .. } => Op::AddSignatures,
            Request::NarFromPath { .. } => Op::NarFromPath,
            Request::AddToStoreNar { .. } => Op::AddToStoreNar,
            Request::AddToStore { .. } => Op::AddToStore,
            Request::QueryMissing { .. } => Op::QueryMissing,
            Request::QueryDerivationOutputMap { .. } => Op::QueryDerivationOutputMap,
            Request::RegisterDrvOutput(_) => Op::RegisterDrvOutput,
            Request::QueryRealisation(_) => Op::QueryRealisation,
            Request::AddMultipleToStore { .. } => Op::AddMultipleToStore,
            Request::AddBuildLog { .. } => Op::AddBuildLog,
            Request::BuildPaths { .. } => Op::BuildPaths,
            Request::BuildPathsWithResults { .. } => Op::BuildPathsWithResults,
        }
    }

    /// Encodes the request header (client side). Call [`Negotiated::check_request`] first:
    /// a request the connection cannot express would be encoded into bytes the daemon cannot
    /// parse.
    pub fn write<B: BufMut + ?Sized>(&self, out: &mut B, dir: &StoreDir, n: &Negotiated) {
        out.put_word(self.op() as u64);
        match self {
            Request::IsValidPath { path }
            | Request::EnsurePath { path }
            | Request::AddTempRoot { path }
            | Request::QueryPathInfo { path }
            | Request::QueryDerivationOutputMap { path }
            | Request::NarFromPath { path } => put_store_path(out, dir, path),
            Request::SetOptions(o) => o.write(out, n.version),
            Request::QueryPathFromHashPart { hash_part } => out.put_str(hash_part),
            Request::QueryValidPaths { paths, substitute } => {
                put_store_path_set(out, dir, paths);
                if n.at_least(27) {
                    out.put_flag(*substitute);
                }
            }
            Request::BuildDerivation {
                drv_path,
                drv,
                mode,
            } => {
                put_store_path(out, dir, drv_path);
                drv.write(out, dir);
                out.put_word(mode.code());
            }
            Request::AddSignatures { path, sigs } => {
                put_store_path(out, dir, path);
                out.put_str_list(sigs);
            }
            Request::AddToStore {
                name,
                method,
                references,
                repair,
            } => {
                out.put_str(name);
                out.put_str(method);
                put_store_path_set(out, dir, references);
                out.put_flag(*repair);
            }
            Request::AddToStoreNar {
                info,
                repair,
                dont_check_sigs,
            } => {
                info.put_add_to_store_fields(out, dir);
                out.put_flag(*repair);
                out.put_flag(*dont_check_sigs);
            }
            Request::QueryMissing { targets } => write_derived_paths(out, dir, n, targets),
            Request::RegisterDrvOutput(real) => {
                if n.realisation_with_path() {
                    if let DrvOutputId::Path { drv_path, output } = &real.id {
                        put_store_path(out, dir, drv_path);
                        out.put_str(output);
                    }
                    put_store_path(out, dir, &real.out_path);
                    out.put_str_list(&real.signatures);
                } else {
                    let id = real.id.to_old_string().unwrap_or_default();
                    if n.at_least(31) {
                        out.put_str(&real.to_json(&id));
                    } else {
                        out.put_str(&id);
                        put_store_path(out, dir, &real.out_path);
                    }
                }
            }
            Request::QueryRealisation(id) => match id {
                DrvOutputId::Path { drv_path, output } => {
                    put_store_path(out, dir, drv_path);
                    out.put_str(output);
                }
                DrvOutputId::HashModulo { .. } => {
                    out.put_str(&id.to_old_string().unwrap_or_default());
                }
            },
            Request::AddMultipleToStore {
                repair,
                dont_check_sigs,
            } => {
                out.put_flag(*repair);
                out.put_flag(*dont_check_sigs);
            }
            // The daemon reads a bare string and makes a `StorePath` of it: the base name.
            Request::AddBuildLog { drv_path } => out.put_str(&drv_path.to_string()),
            Request::BuildPaths { targets, mode } => {
                write_derived_paths(out, dir, n, targets);
                if n.at_least(15) {
                    out.put_word(mode.code());
                }
            }
            Request::BuildPathsWithResults { targets, mode } => {
                write_derived_paths(out, dir, n, targets);
                out.put_word(mode.code());
            }
        }
    }

    /// Decodes a request header (server side). An unknown op is a typed error: like the real
    /// daemon, a server cannot skip a request it cannot parse.
    pub fn read(r: &mut WireReader<'_>, dir: &StoreDir, n: &Negotiated) -> ReadResult<Self> {
        let code = r.read_u64()?;
        let op = Op::from_code(code)
            .ok_or_else(|| ProtoError::from(Misbehaved::Unexpected(format!("worker op {code}"))))?;
        Ok(match op {
            Op::IsValidPath => Request::IsValidPath {
                path: read_store_path(r, dir, "IsValidPath.path")?,
            },
            Op::EnsurePath => Request::EnsurePath {
                path: read_store_path(r, dir, "EnsurePath.path")?,
            },
            Op::AddTempRoot => Request::AddTempRoot {
                path: read_store_path(r, dir, "AddTempRoot.path")?,
            },
            Op::QueryPathInfo => Request::QueryPathInfo {
                path: read_store_path(r, dir, "QueryPathInfo.path")?,
            },
            Op::NarFromPath => Request::NarFromPath {
                path: read_store_path(r, dir, "NarFromPath.path")?,
            },
            Op::SetOptions => Request::SetOptions(ClientOptions::read(r, n.version)?),
            Op::QueryPathFromHashPart => Request::QueryPathFromHashPart {
                hash_part: r.read_string("QueryPathFromHashPart.hashPart")?,
            },
            Op::QueryValidPaths => {
                let paths = read_store_path_set(r, dir, "QueryValidPaths.paths")?;
                let substitute = if n.at_least(27) {
                    r.read_bool()?
                } else {
                    false
                };
                Request::QueryValidPaths { paths, substitute }
            }
            Op::BuildDerivation => Request::BuildDerivation {
                drv_path: read_store_path(r, dir, "BuildDerivation.drvPath")?,
                drv: BasicDerivation::read(r, dir)?,
                mode: BuildMode::from_code(r.read_u64()?)?,
            },
            Op::AddSignatures => Request::AddSignatures {
                path: read_store_path(r, dir, "AddSignatures.path")?,
                sigs: r
                    .read_string_list("AddSignatures.sigs")?
                    .into_iter()
                    .collect(),
            },
            Op::AddToStore => Request::AddToStore {
                name: r.read_string("AddToStore.name")?,
                method: r.read_string("AddToStore.camStr")?,
                references: read_store_path_set(r, dir, "AddToStore.references")?,
                repair: r.read_bool()?,
            },
            Op::AddToStoreNar => Request::AddToStoreNar {
                info: PathInfo::read_add_to_store_fields(r, dir)?,
                repair: r.read_bool()?,
                dont_check_sigs: r.read_bool()?,
            },
            Op::QueryMissing => Request::QueryMissing {
                targets: read_derived_paths(r, dir, n, "QueryMissing.targets")?,
            },
            Op::QueryDerivationOutputMap => Request::QueryDerivationOutputMap {
                path: read_store_path(r, dir, "QueryDerivationOutputMap.path")?,
            },
            Op::RegisterDrvOutput => {
                if n.realisation_with_path() {
                    let drv_path = read_store_path(r, dir, "RegisterDrvOutput.drvPath")?;
                    let output = r.read_string("RegisterDrvOutput.outputName")?;
                    let out_path = read_store_path(r, dir, "RegisterDrvOutput.outPath")?;
                    let signatures = r
                        .read_string_list("RegisterDrvOutput.sigs")?
                        .into_iter()
                        .collect();
                    Request::RegisterDrvOutput(Realisation {
                        id: DrvOutputId::Path { drv_path, output },
                        out_path,
                        signatures,
                    })
                } else if n.at_least(31) {
                    let json = r.read_string("RegisterDrvOutput.realisation")?;
                    Request::RegisterDrvOutput(Realisation::from_json(&json, "RegisterDrvOutput")?)
                } else {
                    let id = DrvOutputId::parse_old(&r.read_string("RegisterDrvOutput.id")?)?;
                    let out_path = read_store_path(r, dir, "RegisterDrvOutput.outPath")?;
                    Request::RegisterDrvOutput(Realisation {
                        id,
                        out_path,
                        signatures: BTreeSet::new(),
                    })
                }
            }
            Op::QueryRealisation => {
                if n.realisation_with_path() {
                    let drv_path = read_store_path(r, dir, "QueryRealisation.drvPath")?;
                    let output = r.read_string("QueryRealisation.outputName")?;
                    Request::QueryRealisation(DrvOutputId::Path { drv_path, output })
                } else {
                    Request::QueryRealisation(DrvOutputId::parse_old(
                        &r.read_string("QueryRealisation.id")?,
                    )?)
                }
            }
            Op::AddMultipleToStore => Request::AddMultipleToStore {
                repair: r.read_bool()?,
                dont_check_sigs: r.read_bool()?,
            },
            Op::AddBuildLog => {
                let base = r.read_string("AddBuildLog.drvPath")?;
                Request::AddBuildLog {
                    drv_path: StorePath::from_base_name_field(&base, "AddBuildLog.drvPath")?,
                }
            }
            Op::BuildPaths => {
                let targets = read_derived_paths(r, dir, n, "BuildPaths.targets")?;
                let mode = if n.at_least(15) {
                    BuildMode::from_code(r.read_u64()?)?
                } else {
                    BuildMode::Normal
                };
                Request::BuildPaths { targets, mode }
            }
            Op::BuildPathsWithResults => Request::BuildPathsWithResults {
                targets: read_derived_paths(r, dir, n, "BuildPathsWithResults.targets")?,
                mode: BuildMode::from_code(r.read_u64()?)?,
            },
        })
    }
}

// ===== replies =====

/// The `u64 1` that several ops answer with.
pub fn read_ack(r: &mut WireReader<'_>, what: &'static str) -> ReadResult<()> {
    match r.read_u64()? {
        1 => Ok(()),
        other => Err(ProtoError::from(Misbehaved::Unexpected(format!(
            "{what} reply {other}, expected 1"
        )))
        .into()),
    }
}

/// Reply to `QueryPathInfo` for `path`: `None` when it is not valid (1.17+ sends a flag).
pub fn read_query_path_info(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
    n: &Negotiated,
    path: &StorePath,
) -> ReadResult<Option<PathInfo>> {
    if n.at_least(17) && !r.read_bool()? {
        return Ok(None);
    }
    PathInfo::read_worker_unkeyed(r, dir, n.version, path.clone()).map(Some)
}

/// Server side of [`read_query_path_info`].
pub fn write_query_path_info<B: BufMut + ?Sized>(
    out: &mut B,
    dir: &StoreDir,
    n: &Negotiated,
    info: Option<&PathInfo>,
) {
    match info {
        None => out.put_flag(false),
        Some(i) => {
            if n.at_least(17) {
                out.put_flag(true);
            }
            i.put_worker_unkeyed(out, dir, n.version);
        }
    }
}

/// Reply to `QueryPathFromHashPart`.
pub fn read_opt_path(r: &mut WireReader<'_>, dir: &StoreDir) -> ReadResult<Option<StorePath>> {
    read_opt_store_path(r, dir, "reply.path")
}

/// Server side of [`read_opt_path`].
pub fn write_opt_path<B: BufMut + ?Sized>(out: &mut B, dir: &StoreDir, p: Option<&StorePath>) {
    put_opt_store_path(out, dir, p);
}

/// Reply to `QueryValidPaths`.
pub fn read_path_set(r: &mut WireReader<'_>, dir: &StoreDir) -> ReadResult<BTreeSet<StorePath>> {
    read_store_path_set(r, dir, "reply.paths")
}

/// What `QueryMissing` says would happen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing {
    /// Derivations that would be built.
    pub will_build: BTreeSet<StorePath>,
    /// Paths that would be substituted.
    pub will_substitute: BTreeSet<StorePath>,
    /// Paths nobody can produce.
    pub unknown: BTreeSet<StorePath>,
    /// Bytes to download.
    pub download_size: u64,
    /// Unpacked bytes.
    pub nar_size: u64,
}

/// Reply to `QueryMissing`.
pub fn read_missing(r: &mut WireReader<'_>, dir: &StoreDir) -> ReadResult<Missing> {
    Ok(Missing {
        will_build: read_store_path_set(r, dir, "QueryMissing.willBuild")?,
        will_substitute: read_store_path_set(r, dir, "QueryMissing.willSubstitute")?,
        unknown: read_store_path_set(r, dir, "QueryMissing.unknown")?,
        download_size: r.read_u64()?,
        nar_size: r.read_u64()?,
    })
}

/// Server side of [`read_missing`].
pub fn write_missing<B: BufMut + ?Sized>(out: &mut B, dir: &StoreDir, m: &Missing) {
    put_store_path_set(out, dir, &m.will_build);
    put_store_path_set(out, dir, &m.will_substitute);
    put_store_path_set(out, dir, &m.unknown);
    out.put_word(m.download_size);
    out.put_word(m.nar_size);
}

/// Reply to `BuildDerivation`.
pub fn read_build_result(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
    n: &Negotiated,
) -> ReadResult<BuildResult> {
    BuildResult::read(r, dir, n.result_layout())
}

/// Reply to `BuildPathsWithResults`: each result keyed by its target.
pub fn read_keyed_build_results(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
    n: &Negotiated,
) -> ReadResult<Vec<(DerivedPath, BuildResult)>> {
    let layout = ResultLayout {
        // Nix 2.8.0 writes every field up to builtOutputs here, which agrees with the 1.34
        // gate on the op.
        times: true,
        ..n.result_layout()
    };
    let legacy = !n.at_least(30);
    r.read_list("BuildPathsWithResults", |r| {
        let key = r.read_string("BuildPathsWithResults.path")?;
        let target = DerivedPath::parse(dir, &key, legacy, "BuildPathsWithResults.path")?;
        let res = BuildResult::read(r, dir, layout)?;
        Ok((target, res))
    })
}

/// Server side of [`read_keyed_build_results`].
pub fn write_keyed_build_results<B: BufMut + ?Sized>(
    out: &mut B,
    dir: &StoreDir,
    n: &Negotiated,
    results: &[(DerivedPath, BuildResult)],
) {
    let layout = ResultLayout {
        times: true,
        ..n.result_layout()
    };
    out.put_word(results.len() as u64);
    for (t, res) in results {
        out.put_str(&t.to_wire(dir));
        res.write(out, dir, layout);
    }
}

/// Reply to `QueryDerivationOutputMap`: `map<str, optional path>` (an empty string for an
/// unknown path).
pub fn read_derivation_output_map(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
) -> ReadResult<BTreeMap<String, Option<StorePath>>> {
    let n = r.read_count("QueryDerivationOutputMap.outputs")?;
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let name = r.read_string("QueryDerivationOutputMap.name")?;
        let path = read_opt_store_path(r, dir, "QueryDerivationOutputMap.path")?;
        out.insert(name, path);
    }
    Ok(out)
}

/// Server side of [`read_derivation_output_map`].
pub fn write_derivation_output_map<B: BufMut + ?Sized>(
    out: &mut B,
    dir: &StoreDir,
    map: &BTreeMap<String, Option<StorePath>>,
) {
    out.put_word(map.len() as u64);
    for (name, path) in map {
        out.put_str(name);
        put_opt_store_path(out, dir, path.as_ref());
    }
}

/// Reply to `QueryRealisation`.
pub fn read_realisation(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
    n: &Negotiated,
    id: &DrvOutputId,
) -> ReadResult<Option<Realisation>> {
    if n.realisation_with_path() {
        return match r.read_u64()? {
            0 => Ok(None),
            1 => {
                let out_path = read_store_path(r, dir, "QueryRealisation.outPath")?;
                let signatures = r
                    .read_string_list("QueryRealisation.sigs")?
                    .into_iter()
                    .collect();
                Ok(Some(Realisation {
                    id: id.clone(),
                    out_path,
                    signatures,
                }))
            }
            tag => Err(ProtoError::invalid("QueryRealisation", format!("tag {tag}")).into()),
        };
    }
    if n.at_least(31) {
        let mut jsons = r.read_string_list("QueryRealisation.realisations")?;
        match jsons.pop() {
            None => Ok(None),
            Some(j) if jsons.is_empty() => {
                Ok(Some(Realisation::from_json(&j, "QueryRealisation")?))
            }
            Some(_) => Err(ProtoError::from(Misbehaved::Inconsistent(
                "QueryRealisation returned more than one realisation".into(),
            ))
            .into()),
        }
    } else {
        let mut paths = read_store_path_set(r, dir, "QueryRealisation.paths")?;
        match paths.pop_first() {
            None => Ok(None),
            Some(out_path) if paths.is_empty() => Ok(Some(Realisation {
                id: id.clone(),
                out_path,
                signatures: BTreeSet::new(),
            })),
            Some(_) => Err(ProtoError::from(Misbehaved::Inconsistent(
                "QueryRealisation returned more than one path".into(),
            ))
            .into()),
        }
    }
}

/// Server side of [`read_realisation`].
pub fn write_realisation<B: BufMut + ?Sized>(
    out: &mut B,
    dir: &StoreDir,
    n: &Negotiated,
    real: Option<&Realisation>,
) {
    if n.realisation_with_path() {
        match real {
            None => out.put_word(0),
            Some(re) => {
                out.put_word(1);
                put_store_path(out, dir, &re.out_path);
                out.put_str_list(&re.signatures);
            }
        }
    } else if n.at_least(31) {
        match real {
            None => out.put_word(0),
            Some(re) => {
                out.put_word(1);
                let id = re.id.to_old_string().unwrap_or_default();
                out.put_str(&re.to_json(&id));
            }
        }
    } else {
        match real {
            None => out.put_word(0),
            Some(re) => {
                out.put_word(1);
                put_store_path(out, dir, &re.out_path);
            }
        }
    }
}

/// The header of an `AddMultipleToStore` inner stream: the number of paths.
pub fn write_multiple_count<B: BufMut + ?Sized>(out: &mut B, count: u64) {
    out.put_word(count);
}

/// One entry's metadata in an `AddMultipleToStore` stream: always the 1.16 layout, whatever
/// was negotiated (Nix hard-codes it), followed by the raw NAR.
pub fn write_multiple_entry<B: BufMut + ?Sized>(out: &mut B, dir: &StoreDir, info: &PathInfo) {
    info.put_worker_keyed(out, dir, ProtocolVersion::new(1, 16));
}

/// Server side of [`write_multiple_entry`].
pub fn read_multiple_entry(r: &mut WireReader<'_>, dir: &StoreDir) -> ReadResult<PathInfo> {
    PathInfo::read_worker_keyed(r, dir, ProtocolVersion::new(1, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_id() -> DrvOutputId {
        DrvOutputId::Path {
            drv_path: StorePath::new([1; 20], "ca.drv").expect("valid"),
            output: "out".into(),
        }
    }

    fn old_id() -> DrvOutputId {
        DrvOutputId::HashModulo {
            drv_hash: format!("sha256:{}", "ab".repeat(32)),
            output: "out".into(),
        }
    }

    /// A realisation id of the other form than the connection uses cannot be encoded (it
    /// would go out as an empty id, which the daemon cannot parse): `check_request` says so.
    #[test]
    fn realisation_id_form_must_match_the_negotiated_encoding() {
        let plain = Negotiated::new(ProtocolVersion::new(1, 38));
        let mut with_path = plain.clone();
        with_path
            .features
            .insert(FEATURE_REALISATION_WITH_PATH.to_owned());
        let old = Negotiated::new(ProtocolVersion::new(1, 27));
        for (n, id, ok) in [
            (&plain, old_id(), true),
            (&old, old_id(), true),
            (&with_path, path_id(), true),
            (&plain, path_id(), false),
            (&old, path_id(), false),
            (&with_path, old_id(), false),
        ] {
            let r = n.check_request(&Request::QueryRealisation(id.clone()));
            assert_eq!(r.is_ok(), ok, "{n:?} {id:?}");
            if !ok {
                assert!(matches!(
                    r,
                    Err(ProtoError::Incompatible(
                        Incompatible::FeatureMismatch { .. }
                    ))
                ));
            }
        }
        // The op's version is still checked first.
        let e = Negotiated::new(ProtocolVersion::new(1, 26))
            .check_request(&Request::QueryRealisation(old_id()))
            .expect_err("1.26");
        assert!(matches!(
            e,
            ProtoError::Incompatible(Incompatible::OperationUnsupported { .. })
        ));
    }
}
