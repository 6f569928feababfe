//! The outcome of a build, normalised across protocols and versions.
//!
//! Serve and worker send the same status codes but different field sets (times from serve 2.3 /
//! worker 1.29, CPU times from worker 1.37, outputs from serve 2.6 / worker 1.28) and two
//! encodings of the built outputs (the old JSON realisations, or the newer name → path map of
//! serve 2.8 and the worker feature `realisation-with-path-not-hash`). [`BuildResult`] is the one
//! shape the scheduler sees.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::BufMut;

use crate::error::ProtoError;
use crate::store_path::{StoreDir, StorePath, put_store_path, read_store_path};
use crate::wire::{ReadError, ReadResult, WireReader, WireWrite};

/// Build status codes, the same in both protocols (`BuildResult::Status` in Nix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildStatus {
    /// 0: built now.
    Built,
    /// 1: fetched from a substituter.
    Substituted,
    /// 2: was already valid.
    AlreadyValid,
    /// 3: the builder failed (non-zero exit, missing outputs...).
    PermanentFailure,
    /// 4: an input was rejected.
    InputRejected,
    /// 5: an output was rejected (newer Nix also reports hash mismatches here).
    OutputRejected,
    /// 6: a failure that may go away on retry.
    TransientFailure,
    /// 7: a cached failure (unused by current Nix).
    CachedFailure,
    /// 8: `max-silent-time` or `timeout` exceeded.
    TimedOut,
    /// 9: anything else.
    MiscFailure,
    /// 10: a dependency failed.
    DependencyFailed,
    /// 11: `max-build-log-size` exceeded.
    LogLimitExceeded,
    /// 12: a repeated build gave different outputs.
    NotDeterministic,
    /// 13: a CA derivation resolved to an already valid one.
    ResolvesToAlreadyValid,
    /// 14: no substituter could provide the path.
    NoSubstituters,
    /// A code this crate does not know, from a newer peer. Treated as a failure.
    Unknown(u64),
}

impl BuildStatus {
    /// From the wire code.
    pub fn from_code(code: u64) -> Self {
        use BuildStatus::*;
        match code {
            0 => Built,
            1 => Substituted,
            2 => AlreadyValid,
            3 => PermanentFailure,
            4 => InputRejected,
            5 => OutputRejected,
            6 => TransientFailure,
            7 => CachedFailure,
            8 => TimedOut,
            9 => MiscFailure,
            10 => DependencyFailed,
            11 => LogLimitExceeded,
            12 => NotDeterministic,
            13 => ResolvesToAlreadyValid,
            14 => NoSubstituters,
            other => Unknown(other),
        }
    }

    /// The wire code.
    pub fn code(self) -> u64 {
        use BuildStatus::*;
        match self {
            Built => 0,
            Substituted => 1,
            AlreadyValid => 2,
            PermanentFailure => 3,
            InputRejected => 4,
            OutputRejected => 5,
            TransientFailure => 6,
            CachedFailure => 7,
            TimedOut => 8,
            MiscFailure => 9,
            DependencyFailed => 10,
            LogLimitExceeded => 11,
            NotDeterministic => 12,
            ResolvesToAlreadyValid => 13,
            NoSubstituters => 14,
            Unknown(c) => c,
        }
    }

    /// Whether the outputs are now valid.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// One built output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltOutput {
    /// Where the output is.
    pub path: StorePath,
    /// Signatures on the realisation.
    pub signatures: BTreeSet<String>,
    /// The old encoding's DrvOutput id (`sha256:<hash modulo>!<name>`), kept so the value
    /// re-encodes byte for byte. `None` when it came in the new encoding.
    pub id: Option<String>,
    /// The old encoding's `dependentRealisations` (id → base name), kept for re-encoding.
    pub dependent_realisations: BTreeMap<String, String>,
}

/// The result of one build, whichever protocol carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// What happened.
    pub status: BuildStatus,
    /// Failure text from the builder's Nix (empty on success).
    pub error_msg: String,
    /// How many times the derivation was built (serve 2.3+, worker 1.29+; else 0).
    pub times_built: u64,
    /// Whether repeated builds disagreed.
    pub is_non_deterministic: bool,
    /// Unix seconds; 0 when the peer does not say.
    pub start_time: i64,
    /// Unix seconds; 0 when the peer does not say.
    pub stop_time: i64,
    /// User CPU time of the build (worker 1.37+ only).
    pub cpu_user: Option<Duration>,
    /// System CPU time of the build (worker 1.37+ only).
    pub cpu_system: Option<Duration>,
    /// Output name → where it is.
    pub built_outputs: BTreeMap<String, BuiltOutput>,
}

impl BuildResult {
    /// A result with only a status and a message, as Nix's serve `BuildPaths` and errors give.
    pub fn failure(status: BuildStatus, error_msg: impl Into<String>) -> Self {
        BuildResult {
            status,
            error_msg: error_msg.into(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            cpu_user: None,
            cpu_system: None,
            built_outputs: BTreeMap::new(),
        }
    }
}

/// How `builtOutputs` is encoded on a given connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputsEncoding {
    /// Not sent at all (serve < 2.6, worker < 1.28).
    Absent,
    /// `map<str DrvOutputId, str RealisationJSON>`.
    RealisationJson,
    /// `map<str name, (path, set<str> sigs)>` (serve 2.8, worker feature
    /// `realisation-with-path-not-hash`).
    NameToPath,
}

/// Which optional fields a connection carries, derived from its negotiated version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultLayout {
    /// timesBuilt, isNonDeterministic, startTime, stopTime.
    pub times: bool,
    /// cpuUser, cpuSystem (worker 1.37+).
    pub cpu: bool,
    /// builtOutputs and their encoding.
    pub outputs: OutputsEncoding,
}

fn read_opt_duration(r: &mut WireReader<'_>, field: &'static str) -> ReadResult<Option<Duration>> {
    match r.read_u64()? {
        0 => Ok(None),
        1 => {
            // Microseconds as a signed 64-bit value; negative makes no sense for CPU time.
            let us = r.read_u64()?;
            let us = i64::try_from(us)
                .map_err(|_| ReadError::Proto(ProtoError::invalid(field, "negative CPU time")))?;
            Ok(Some(Duration::from_micros(us.unsigned_abs())))
        }
        tag => Err(ProtoError::invalid(field, format!("optional tag {tag}")).into()),
    }
}

fn put_opt_duration<B: BufMut + ?Sized>(out: &mut B, d: Option<Duration>) {
    match d {
        None => out.put_word(0),
        Some(d) => {
            out.put_word(1);
            out.put_word(u64::try_from(d.as_micros()).unwrap_or(u64::MAX >> 1));
        }
    }
}

/// The old realisation JSON (`Realisation::toJSON` in Nix): keys in sorted order, compact.
fn realisation_json(o: &BuiltOutput, id: &str) -> String {
    let value = serde_json::json!({
        "dependentRealisations": o.dependent_realisations,
        "id": id,
        "outPath": o.path.to_string(),
        "signatures": o.signatures,
    });
    value.to_string()
}

fn parse_realisation(
    key: &str,
    json: &str,
    field: &'static str,
) -> Result<(String, BuiltOutput), ProtoError> {
    let bad = |why: &str| ProtoError::invalid(field, format!("realisation {key:?}: {why}"));
    // The output name is what follows the last '!' of the id (Nix >= 2.35 sends dummy hashes).
    let name = key
        .rsplit_once('!')
        .map(|(_, n)| n.to_owned())
        .ok_or_else(|| bad("id has no '!'"))?;
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let out_path = v
        .get("outPath")
        .and_then(|p| p.as_str())
        .ok_or_else(|| bad("no outPath"))?;
    // Some peers write the base name, a few the absolute path: accept both.
    let base = out_path.rsplit('/').next().unwrap_or(out_path);
    let path = StorePath::from_base_name_field(base, field)?;
    let signatures = match v.get("signatures") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        _ => BTreeSet::new(),
    };
    let dependent_realisations = match v.get("dependentRealisations") {
        Some(serde_json::Value::Object(m)) => m
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
            .collect(),
        _ => BTreeMap::new(),
    };
    Ok((
        name,
        BuiltOutput {
            path,
            signatures,
            id: Some(key.to_owned()),
            dependent_realisations,
        },
    ))
}

impl BuildResult {
    /// Decodes a build result with the given layout.
    pub fn read(r: &mut WireReader<'_>, dir: &StoreDir, layout: ResultLayout) -> ReadResult<Self> {
        let status = BuildStatus::from_code(r.read_u64()?);
        let error_msg = r.read_text("BuildResult.errorMsg", r.limits().max_string)?;
        let mut res = BuildResult::failure(status, error_msg);
        if layout.times {
            res.times_built = r.read_u64()?;
            res.is_non_deterministic = r.read_bool()?;
            res.start_time = r.read_time("BuildResult.startTime")?;
            res.stop_time = r.read_time("BuildResult.stopTime")?;
        }
        if layout.cpu {
            res.cpu_user = read_opt_duration(r, "BuildResult.cpuUser")?;
            res.cpu_system = read_opt_duration(r, "BuildResult.cpuSystem")?;
        }
        match layout.outputs {
            OutputsEncoding::Absent => {}
            OutputsEncoding::RealisationJson => {
                let n = r.read_count("BuildResult.builtOutputs")?;
                for _ in 0..n {
                    let key = r.read_string("BuildResult.builtOutputs.id")?;
                    let json = r.read_string("BuildResult.builtOutputs.realisation")?;
                    let (name, out) = parse_realisation(&key, &json, "BuildResult.builtOutputs")
                        .map_err(ReadError::Proto)?;
                    res.built_outputs.insert(name, out);
                }
            }
            OutputsEncoding::NameToPath => {
                let n = r.read_count("BuildResult.builtOutputs")?;
                for _ in 0..n {
                    let name = r.read_string("BuildResult.builtOutputs.name")?;
                    let path = read_store_path(r, dir, "BuildResult.builtOutputs.path")?;
                    let signatures = r
                        .read_string_list("BuildResult.builtOutputs.sigs")?
                        .into_iter()
                        .collect();
                    res.built_outputs.insert(
                        name,
                        BuiltOutput {
                            path,
                            signatures,
                            id: None,
                            dependent_realisations: BTreeMap::new(),
                        },
                    );
                }
            }
        }
        Ok(res)
    }

    /// Encodes a build result with the given layout (server side and tests). In the old
    /// encoding an output without an id gets Nix 2.35's dummy id `sha256:000…0!<name>`.
    pub fn write<B: BufMut + ?Sized>(&self, out: &mut B, dir: &StoreDir, layout: ResultLayout) {
        out.put_word(self.status.code());
        out.put_str(&self.error_msg);
        if layout.times {
            out.put_word(self.times_built);
            out.put_flag(self.is_non_deterministic);
            out.put_time(self.start_time);
            out.put_time(self.stop_time);
        }
        if layout.cpu {
            put_opt_duration(out, self.cpu_user);
            put_opt_duration(out, self.cpu_system);
        }
        match layout.outputs {
            OutputsEncoding::Absent => {}
            OutputsEncoding::RealisationJson => {
                out.put_word(self.built_outputs.len() as u64);
                // Nix sorts this map by id, which starts with the same hash for every output
                // of one derivation, so sorting by name gives the same order.
                for (name, o) in &self.built_outputs {
                    let id =
                        o.id.clone()
                            .unwrap_or_else(|| format!("sha256:{}!{name}", "0".repeat(64)));
                    out.put_str(&id);
                    out.put_str(&realisation_json(o, &id));
                }
            }
            OutputsEncoding::NameToPath => {
                out.put_word(self.built_outputs.len() as u64);
                for (name, o) in &self.built_outputs {
                    out.put_str(name);
                    put_store_path(out, dir, &o.path);
                    out.put_str_list(&o.signatures);
                }
            }
        }
    }
}
