//! The serve protocol (`nix-store --serve --write`, store URLs `ssh://`).
//!
//! A strictly request/reply protocol on stdin/stdout; the remote's stderr is unstructured text
//! (build logs and error messages) and there is no error frame: when the server fails it prints
//! `error: ...` on stderr and exits, so the client sees EOF mid-reply. Reference:
//! `nix-protocols.md` §2, Nix 2.8.0 `src/nix-store/nix-store.cc` (`opServe`).
//!
//! Requests are values of [`Request`]: [`Request::write`] is the client side and
//! [`Request::read`] the server side (used by fake peers and the future proxy). Replies have one
//! reader and one writer each. Payloads that stream (NAR bytes after `AddToStoreNar`, export
//! streams) are not part of the request values: the driver sends them after the header.

use std::collections::BTreeSet;

use bytes::BufMut;

use crate::build_result::{BuildResult, BuildStatus, OutputsEncoding, ResultLayout};
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

/// Client → server magic (`SERVE_MAGIC_1`).
pub const MAGIC_1: u64 = 0x390c_9deb;
/// Server → client magic (`SERVE_MAGIC_2`).
pub const MAGIC_2: u64 = 0x5452_eecb;
/// What we announce. 2.7 is what Nix 2.8–2.34 and every Lix speak; announcing it keeps every
/// peer on the same field set (the Nix 2.8.0–2.10 `builtOutputs` gate bug cannot bite, and Nix
/// 2.35 keeps the old realisation encoding). See `nix-protocols.md` §2.2.
pub const OUR_VERSION: ProtocolVersion = ProtocolVersion::new(2, 7);
/// Oldest server we accept: 2.4 brought `narHash` in `QueryPathInfos`, without which copies
/// cannot be verified.
pub const MIN_VERSION: ProtocolVersion = ProtocolVersion::new(2, 4);
/// Version that introduced `AddToStoreNar` (command 9).
pub const ADD_TO_STORE_NAR: ProtocolVersion = ProtocolVersion::new(2, 5);
/// The export stream's per-path trailer marker ("NIXE").
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Command numbers (`ServeCommand` in Nix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Command {
    /// 1
    QueryValidPaths = 1,
    /// 2
    QueryPathInfos = 2,
    /// 3
    DumpStorePath = 3,
    /// 4 (needs `--write`)
    ImportPaths = 4,
    /// 5 (removed from Nix servers in 2.33; Lix keeps it)
    ExportPaths = 5,
    /// 6 (needs `--write`)
    BuildPaths = 6,
    /// 7
    QueryClosure = 7,
    /// 8 (needs `--write`)
    BuildDerivation = 8,
    /// 9 (needs `--write`; serve 2.5+)
    AddToStoreNar = 9,
}

impl Command {
    /// From the wire number.
    pub fn from_code(code: u64) -> Option<Self> {
        use Command::*;
        Some(match code {
            1 => QueryValidPaths,
            2 => QueryPathInfos,
            3 => DumpStorePath,
            4 => ImportPaths,
            5 => ExportPaths,
            6 => BuildPaths,
            7 => QueryClosure,
            8 => BuildDerivation,
            9 => AddToStoreNar,
            _ => return None,
        })
    }
}

// ===== handshake =====

/// The client's opening: magic and version in one write (the server reads the magic, replies,
/// and only then reads our version, so this never deadlocks).
pub fn write_client_hello<B: BufMut + ?Sized>(out: &mut B, ours: ProtocolVersion) {
    out.put_word(MAGIC_1);
    out.put_word(ours.to_wire());
}

/// Reads the server's reply to the hello and returns the negotiated version.
pub fn read_server_hello(
    r: &mut WireReader<'_>,
    ours: ProtocolVersion,
) -> ReadResult<ProtocolVersion> {
    let theirs = r.read_hello(MAGIC_2, "serve version")?;
    Ok(ours
        .negotiate_checked(theirs, MIN_VERSION)
        .map_err(ProtoError::from)?)
}

/// Server side: reads the client's magic (and version, which Nix clients send right away).
pub fn read_client_hello(r: &mut WireReader<'_>) -> ReadResult<ProtocolVersion> {
    r.read_hello(MAGIC_1, "serve version")
}

/// Server side: the reply to the hello.
pub fn write_server_hello<B: BufMut + ?Sized>(out: &mut B, ours: ProtocolVersion) {
    out.put_word(MAGIC_2);
    out.put_word(ours.to_wire());
}

// ===== build options =====

/// Per-build limits sent with `BuildPaths` and `BuildDerivation`. Zero means "no limit".
/// `nrRepeats` is always 0 and `enforceDeterminism` false: Lix and current Nix reject repeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// Seconds without log output before the build is killed.
    pub max_silent_time: u64,
    /// Seconds of total build time before it is killed.
    pub build_timeout: u64,
    /// Bytes of build log before the build is killed.
    pub max_log_size: u64,
    /// Keep the build directory of a failed build on the builder.
    pub keep_failed: bool,
}

/// The serve fields `maxSilentTime`, `buildTimeout` and `nrRepeats` are C++ `unsigned int`:
/// a larger value makes the server throw. Clamp, since anything that large means "no limit" in
/// practice anyway.
fn clamp_u32(v: u64) -> u64 {
    v.min(u64::from(u32::MAX))
}

impl BuildOptions {
    /// Encodes the options block, gated on the negotiated version.
    pub fn write<B: BufMut + ?Sized>(&self, out: &mut B, v: ProtocolVersion) {
        out.put_word(clamp_u32(self.max_silent_time));
        out.put_word(clamp_u32(self.build_timeout));
        if v.at_least(2, 2) {
            out.put_word(self.max_log_size);
        }
        if v.at_least(2, 3) {
            out.put_word(0); // nrRepeats
            out.put_flag(false); // enforceDeterminism
        }
        if v.at_least(2, 7) {
            out.put_flag(self.keep_failed);
        }
    }

    /// Decodes the options block (server side). A non-zero `nrRepeats` is refused as Lix and
    /// current Nix do.
    pub fn read(r: &mut WireReader<'_>, v: ProtocolVersion) -> ReadResult<Self> {
        let max_silent_time = u64::from(r.read_int::<u32>("BuildOptions.maxSilentTime")?);
        let build_timeout = u64::from(r.read_int::<u32>("BuildOptions.buildTimeout")?);
        let max_log_size = if v.at_least(2, 2) { r.read_u64()? } else { 0 };
        if v.at_least(2, 3) {
            let repeats = r.read_int::<u32>("BuildOptions.nrRepeats")?;
            if repeats != 0 {
                return Err(ProtoError::invalid(
                    "BuildOptions.nrRepeats",
                    "repeated builds are not supported",
                )
                .into());
            }
            let _enforce_determinism = r.read_bool()?;
        }
        let keep_failed = if v.at_least(2, 7) {
            r.read_bool()?
        } else {
            false
        };
        Ok(BuildOptions {
            max_silent_time,
            build_timeout,
            max_log_size,
            keep_failed,
        })
    }
}

/// The build-result layout of the serve protocol at version `v`. `always_outputs` models the
/// Nix 2.8.0–2.10 servers that send `builtOutputs` even below 2.6 (a gate that is always true);
/// it only matters when the negotiated version is below 2.6, which announcing 2.7 avoids.
pub fn result_layout(v: ProtocolVersion) -> ResultLayout {
    ResultLayout {
        times: v.at_least(2, 3),
        cpu: false,
        outputs: if v.at_least(2, 8) {
            OutputsEncoding::NameToPath
        } else if v.at_least(2, 6) {
            OutputsEncoding::RealisationJson
        } else {
            OutputsEncoding::Absent
        },
    }
}

// ===== requests =====

/// One serve request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Which of `paths` are valid; `lock` adds temp roots, `substitute` lets the builder fetch
    /// from its caches first (`builders-use-substitutes`). Both flags need `--write`.
    QueryValidPaths {
        /// Add temporary GC roots.
        lock: bool,
        /// Substitute missing paths first.
        substitute: bool,
        /// Paths to check.
        paths: BTreeSet<StorePath>,
    },
    /// Metadata of the valid ones among `paths` (invalid ones are silently omitted).
    QueryPathInfos {
        /// Paths to describe.
        paths: BTreeSet<StorePath>,
    },
    /// The NAR of `path`; the server dies if it is invalid.
    DumpStorePath {
        /// Path to dump.
        path: StorePath,
    },
    /// An export stream follows (see [`write_export_entry`]); the reply is `u64 1`.
    ImportPaths,
    /// An export stream of `paths` comes back.
    ExportPaths {
        /// Paths to export.
        paths: BTreeSet<StorePath>,
    },
    /// Build (legacy `StorePathWithOutputs` strings).
    BuildPaths {
        /// What to build.
        paths: Vec<DerivedPath>,
        /// Limits.
        options: BuildOptions,
    },
    /// The closure of `paths`.
    QueryClosure {
        /// Include derivation outputs.
        include_outputs: bool,
        /// Roots.
        paths: BTreeSet<StorePath>,
    },
    /// Build a derivation sent inline.
    BuildDerivation {
        /// Its `.drv` path (need not be valid on the builder).
        drv_path: StorePath,
        /// The derivation without `inputDrvs`; `input_srcs` carries the whole input closure.
        drv: BasicDerivation,
        /// Limits.
        options: BuildOptions,
    },
    /// Add one path; exactly `info.nar_size` raw NAR bytes follow; the reply is `u64 1`.
    AddToStoreNar {
        /// Metadata of the path.
        info: PathInfo,
    },
}

impl Request {
    /// The command number.
    pub fn command(&self) -> Command {
        match self {
            Request::QueryValidPaths { .. } => Command::QueryValidPaths,
            Request::QueryPathInfos { .. } => Command::QueryPathInfos,
            Request::DumpStorePath { .. } => Command::DumpStorePath,
            Request::ImportPaths => Command::ImportPaths,
            Request::ExportPaths { .. } => Command::ExportPaths,
            Request::BuildPaths { .. } => Command::BuildPaths,
            Request::QueryClosure { .. } => Command::QueryClosure,
            Request::BuildDerivation { .. } => Command::BuildDerivation,
            Request::AddToStoreNar { .. } => Command::AddToStoreNar,
        }
    }

    /// Checks that the negotiated version has this command.
    pub fn check_supported(&self, v: ProtocolVersion) -> Result<(), ProtoError> {
        if matches!(self, Request::AddToStoreNar { .. }) && v < ADD_TO_STORE_NAR {
            return Err(Incompatible::OperationUnsupported {
                op: "serve AddToStoreNar",
                needs: ADD_TO_STORE_NAR,
                negotiated: v,
            }
            .into());
        }
        Ok(())
    }

    /// Encodes the request header (client side).
    pub fn write<B: BufMut + ?Sized>(&self, out: &mut B, dir: &StoreDir, v: ProtocolVersion) {
        out.put_word(self.command() as u64);
        match self {
            Request::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                out.put_flag(*lock);
                out.put_flag(*substitute);
                put_store_path_set(out, dir, paths);
            }
            Request::QueryPathInfos { paths } => put_store_path_set(out, dir, paths),
            Request::DumpStorePath { path } => put_store_path(out, dir, path),
            Request::ImportPaths => {}
            Request::ExportPaths { paths } => {
                out.put_word(0); // obsolete "sign" flag
                put_store_path_set(out, dir, paths);
            }
            Request::BuildPaths { paths, options } => {
                out.put_str_list(paths.iter().map(|p| p.to_legacy_wire(dir)));
                options.write(out, v);
            }
            Request::QueryClosure {
                include_outputs,
                paths,
            } => {
                out.put_flag(*include_outputs);
                put_store_path_set(out, dir, paths);
            }
            Request::BuildDerivation {
                drv_path,
                drv,
                options,
            } => {
                put_store_path(out, dir, drv_path);
                drv.write(out, dir);
                options.write(out, v);
            }
            Request::AddToStoreNar { info } => info.put_add_to_store_fields(out, dir),
        }
    }

    /// Decodes a request header (server side). `Ok(None)` inside means a clean end of session
    /// is not representable here: the caller treats EOF before a command as the end.
    pub fn read(r: &mut WireReader<'_>, dir: &StoreDir, v: ProtocolVersion) -> ReadResult<Self> {
        let code = r.read_u64()?;
        let cmd = Command::from_code(code).ok_or_else(|| {
            ProtoError::from(Misbehaved::Unexpected(format!("serve command {code}")))
        })?;
        Ok(match cmd {
            Command::QueryValidPaths => Request::QueryValidPaths {
                lock: r.read_bool()?,
                substitute: r.read_bool()?,
                paths: read_store_path_set(r, dir, "QueryValidPaths.paths")?,
            },
            Command::QueryPathInfos => Request::QueryPathInfos {
                paths: read_store_path_set(r, dir, "QueryPathInfos.paths")?,
            },
            Command::DumpStorePath => Request::DumpStorePath {
                path: read_store_path(r, dir, "DumpStorePath.path")?,
            },
            Command::ImportPaths => Request::ImportPaths,
            Command::ExportPaths => {
                let _sign = r.read_u64()?;
                Request::ExportPaths {
                    paths: read_store_path_set(r, dir, "ExportPaths.paths")?,
                }
            }
            Command::BuildPaths => {
                let raw = r.read_string_list("BuildPaths.paths")?;
                let paths = raw
                    .iter()
                    .map(|s| DerivedPath::parse(dir, s, true, "BuildPaths.paths"))
                    .collect::<Result<Vec<_>, _>>()?;
                Request::BuildPaths {
                    paths,
                    options: BuildOptions::read(r, v)?,
                }
            }
            Command::QueryClosure => Request::QueryClosure {
                include_outputs: r.read_bool()?,
                paths: read_store_path_set(r, dir, "QueryClosure.paths")?,
            },
            Command::BuildDerivation => Request::BuildDerivation {
                drv_path: read_store_path(r, dir, "BuildDerivation.drvPath")?,
                drv: BasicDerivation::read(r, dir)?,
                options: BuildOptions::read(r, v)?,
            },
            Command::AddToStoreNar => Request::AddToStoreNar {
                info: PathInfo::read_add_to_store_fields(r, dir)?,
            },
        })
    }
}

// ===== replies =====

/// Reply to `QueryValidPaths` and `QueryClosure`: a path set.
pub fn read_path_set(r: &mut WireReader<'_>, dir: &StoreDir) -> ReadResult<BTreeSet<StorePath>> {
    read_store_path_set(r, dir, "reply.paths")
}

/// Reply to `QueryPathInfos`: records until an empty path.
pub fn read_path_infos(r: &mut WireReader<'_>, dir: &StoreDir) -> ReadResult<Vec<PathInfo>> {
    let mut out = Vec::new();
    loop {
        let Some(path) = read_opt_store_path(r, dir, "QueryPathInfos.path")? else {
            return Ok(out);
        };
        if out.len() as u64 >= r.limits().max_list {
            return Err(ProtoError::invalid("QueryPathInfos", "too many records").into());
        }
        out.push(PathInfo::read_serve_record(r, dir, path)?);
    }
}

/// One `QueryPathInfos` record, or `None` for the empty path that ends the reply: lets a
/// driver decode a large reply record by record, so that bytes arriving in many reads are not
/// decoded again from the start of the reply each time.
pub fn read_path_info_record(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
) -> ReadResult<Option<PathInfo>> {
    let Some(path) = read_opt_store_path(r, dir, "QueryPathInfos.path")? else {
        return Ok(None);
    };
    PathInfo::read_serve_record(r, dir, path).map(Some)
}

/// Server side of [`read_path_infos`].
pub fn write_path_infos<B: BufMut + ?Sized>(out: &mut B, dir: &StoreDir, infos: &[PathInfo]) {
    for info in infos {
        info.put_serve_record(out, dir);
    }
    out.put_str("");
}

/// The `u64 1` acknowledgement of `ImportPaths` and `AddToStoreNar`.
pub fn read_ack(r: &mut WireReader<'_>, what: &'static str) -> ReadResult<()> {
    match r.read_u64()? {
        1 => Ok(()),
        other => Err(ProtoError::from(Misbehaved::Unexpected(format!(
            "{what} acknowledgement {other}, expected 1"
        )))
        .into()),
    }
}

/// Reply to `BuildPaths`: `0`, or an exit-status-like code and a message. Converted to a
/// [`BuildResult`] so callers see one type (codes per `Worker::failingExitStatus`: 100 build
/// failure, 101 timeout, 102 hash mismatch, 104 not deterministic).
pub fn read_build_paths_reply(r: &mut WireReader<'_>) -> ReadResult<BuildResult> {
    let code = r.read_u64()?;
    if code == 0 {
        return Ok(BuildResult::failure(BuildStatus::Built, ""));
    }
    let msg = r.read_text("BuildPaths.message", r.limits().max_string)?;
    // `Worker::exitStatus` in Nix: 0x60 marks a build failure code, then bit 0x01 timeout,
    // 0x02 hash mismatch, 0x04 build failure, 0x08 check mismatch; plain 1 is anything else.
    let status = if code & 0x60 != 0x60 {
        // A plain 1 also comes back when the server's store is a daemon (an untrusted remote
        // user): the daemon's error text survives, its exit status does not. A builder that
        // exited non-zero is still a permanent failure, as the worker protocol reports it.
        if msg.contains("failed with exit code") {
            BuildStatus::PermanentFailure
        } else {
            BuildStatus::MiscFailure
        }
    } else if code & 0x01 != 0 {
        BuildStatus::TimedOut
    } else if code & 0x02 != 0 {
        BuildStatus::OutputRejected
    } else if code & 0x08 != 0 {
        BuildStatus::NotDeterministic
    } else {
        BuildStatus::PermanentFailure
    };
    Ok(BuildResult::failure(status, msg))
}

/// Server side of [`read_build_paths_reply`].
pub fn write_build_paths_reply<B: BufMut + ?Sized>(out: &mut B, failure: Option<(u64, &str)>) {
    match failure {
        None => out.put_word(0),
        Some((code, msg)) => {
            out.put_word(code.max(1));
            out.put_str(msg);
        }
    }
}

/// One path's trailer in an export stream (after its NAR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTrailer {
    /// The path.
    pub path: StorePath,
    /// Its references.
    pub references: BTreeSet<StorePath>,
    /// Its deriver.
    pub deriver: Option<StorePath>,
}

/// What comes next in an export stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportItem {
    /// A NAR follows.
    Path,
    /// The stream is over.
    End,
}

/// Reads the word that precedes each path (1) or ends the stream (0).
pub fn read_export_item(r: &mut WireReader<'_>) -> ReadResult<ExportItem> {
    match r.read_u64()? {
        1 => Ok(ExportItem::Path),
        0 => Ok(ExportItem::End),
        other => Err(ProtoError::invalid("export stream", format!("item marker {other}")).into()),
    }
}

/// Reads a trailer (after the NAR).
pub fn read_export_trailer(r: &mut WireReader<'_>, dir: &StoreDir) -> ReadResult<ExportTrailer> {
    let magic = r.read_u64()?;
    if magic != EXPORT_MAGIC {
        return Err(ProtoError::from(Misbehaved::WrongMagic {
            expected: EXPORT_MAGIC,
            got: magic,
        })
        .into());
    }
    let path = read_store_path(r, dir, "export.path")?;
    let references = read_store_path_set(r, dir, "export.references")?;
    let deriver = read_opt_store_path(r, dir, "export.deriver")?;
    // A legacy signature: a flag, then (if set) one string to drop.
    if r.read_bool()? {
        let _ = r.read_bytes("export.signature")?;
    }
    Ok(ExportTrailer {
        path,
        references,
        deriver,
    })
}

/// Writes the item marker that precedes a NAR in an export stream.
pub fn write_export_item<B: BufMut + ?Sized>(out: &mut B, item: ExportItem) {
    out.put_word(match item {
        ExportItem::Path => 1,
        ExportItem::End => 0,
    });
}

/// Writes a trailer (after the NAR) of an export stream.
pub fn write_export_entry<B: BufMut + ?Sized>(out: &mut B, dir: &StoreDir, t: &ExportTrailer) {
    out.put_word(EXPORT_MAGIC);
    put_store_path(out, dir, &t.path);
    put_store_path_set(out, dir, &t.references);
    put_opt_store_path(out, dir, t.deriver.as_ref());
    out.put_word(0);
}

/// Reply to `BuildDerivation`.
pub fn read_build_result(
    r: &mut WireReader<'_>,
    dir: &StoreDir,
    v: ProtocolVersion,
) -> ReadResult<BuildResult> {
    BuildResult::read(r, dir, result_layout(v))
}

/// Maps a short read inside a reply to "the server died": in the serve protocol, EOF before
/// the end of a reply means the server printed an error on stderr and exited.
pub fn is_incomplete(e: &ReadError) -> bool {
    matches!(e, ReadError::Incomplete { .. })
}
