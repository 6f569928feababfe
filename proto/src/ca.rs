//! Content-addressed derivations: derivation hashes modulo, realisation ids, placeholders and
//! resolution, computed the way Nix 2.8 computes them, with no I/O (callers read the `.drv`
//! files and pass what they found).
//!
//! ## Why this exists
//!
//! A *floating* content-addressed derivation (`__contentAddressed = true`) has no output path
//! in its `.drv`: the path is known only once the output exists. Its dependents refer to its
//! outputs through *downstream placeholders*, and before one of them can be built its
//! placeholders must be replaced by the real paths (*resolution*). Which path an output got is
//! recorded in a *realisation*, keyed by a [`DrvOutputId`]: the derivation's hash modulo and
//! the output name.
//!
//! ## What Nix 2.8.0 does, mirrored here
//!
//! * `hashDerivationModulo` (`src/libstore/derivations.cc`): a fixed-output derivation hashes
//!   to `sha256("fixed:out:<method:algo>:<base16 hash>:<output path>")` per output; any other
//!   derivation to the SHA-256 of its ATerm in which every input derivation is replaced by the
//!   base16 hash modulo of its needed outputs ([`Derivation::to_aterm_with`]). Input
//!   derivations are hashed unmasked (`pathDerivationModulo`); the result is *deferred* when
//!   the derivation is floating or any input is.
//! * `staticOutputHashes`: the same with the outputs masked: the hashes realisation ids use.
//! * `DrvOutput::to_string` (`src/libstore/realisation.cc`): `sha256:<base16>!<output>`.
//! * `hashPlaceholder` and `downstreamPlaceholder` (`src/libstore/derivations.cc`).
//! * `Derivation::tryResolve` and `rewriteDerivation`: placeholders of input outputs become
//!   their real paths (in the builder, the arguments and the environment, names and values),
//!   the real paths become input sources, the input derivations go away, and deferred
//!   input-addressed outputs get their path from the resolved derivation's hash modulo
//!   (`Store::makeOutputPath`, `src/libstore/store-api.cc`).
//!
//! Impure derivations (another experimental feature) are refused.

use std::collections::{BTreeMap, BTreeSet};

use crate::derivation::{BasicDerivation, Derivation, DerivationOutput};
use crate::hash::{Hash, nix32_encode};
use crate::store_path::{StoreDir, StorePath, make_store_path};
use crate::worker::DrvOutputId;

/// Why a content-addressed computation cannot be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The derivation has no outputs.
    #[error("the derivation has no outputs")]
    NoOutputs,
    /// Outputs of different kinds in one derivation (Nix: "can't mix derivation output
    /// types").
    #[error("the derivation mixes output kinds")]
    MixedOutputs,
    /// An impure derivation (`__impure`): its outputs have no stable id.
    #[error("impure derivations are not supported")]
    Impure,
    /// The hash modulo of an input derivation was not given.
    #[error("no hash modulo for the input derivation {0}")]
    MissingInput(StorePath),
    /// An input derivation does not have the output the derivation needs.
    #[error("input derivation {drv} has no output {output:?}")]
    NoSuchOutput {
        /// The input derivation.
        drv: StorePath,
        /// The output asked for.
        output: String,
    },
    /// Resolution needs the real path of an input output that is not known.
    #[error("output {output:?} of {drv} has no known path (not built or not realised)")]
    Unresolved {
        /// The input derivation.
        drv: StorePath,
        /// Its output.
        output: String,
    },
    /// A computed path or name is not a valid store path.
    #[error("invalid output path: {0}")]
    InvalidPath(String),
}

/// What kind of output an output of a `.drv` is (`parseDerivationOutput`,
/// `src/libstore/derivations.cc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A path fixed by the derivation's inputs.
    InputAddressed,
    /// A path fixed by an expected content hash.
    Fixed,
    /// A content-addressed output whose path is known only once it is built.
    Floating,
    /// Input-addressed, but the path depends on a floating input: computed at resolution.
    Deferred,
    /// Impure.
    Impure,
}

/// The kind of `out`.
pub fn output_kind(out: &DerivationOutput) -> OutputKind {
    if out.hash_algo.is_empty() {
        if out.path.is_some() {
            OutputKind::InputAddressed
        } else {
            OutputKind::Deferred
        }
    } else if out.hash == "impure" {
        OutputKind::Impure
    } else if out.hash.is_empty() {
        OutputKind::Floating
    } else {
        OutputKind::Fixed
    }
}

/// The type of a whole derivation (`BasicDerivation::type`): all its outputs are of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrvType {
    /// Input-addressed; `deferred` when its output paths wait for floating inputs.
    InputAddressed {
        /// Output paths computed at resolution.
        deferred: bool,
    },
    /// Fixed-output.
    Fixed,
    /// Floating content-addressed.
    Floating,
    /// Impure.
    Impure,
}

impl DrvType {
    /// Whether every output path is written in the `.drv` (`hasKnownOutputPaths`).
    pub fn has_known_output_paths(self) -> bool {
        matches!(
            self,
            DrvType::InputAddressed { deferred: false } | DrvType::Fixed
        )
    }

    /// Whether a build must first resolve the derivation (`DerivationGoal::inputsRealised`):
    /// deferred input-addressed and floating derivations with input derivations. (Nix may
    /// also resolve fixed-output ones; it does not need to.)
    pub fn needs_resolution(self, drv: &Derivation) -> bool {
        !drv.input_drvs.is_empty()
            && matches!(
                self,
                DrvType::InputAddressed { deferred: true } | DrvType::Floating
            )
    }
}

/// The type of `drv`.
pub fn drv_type(outputs: &BTreeMap<String, DerivationOutput>) -> Result<DrvType, CaError> {
    let mut kinds = outputs.values().map(output_kind);
    let first = kinds.next().ok_or(CaError::NoOutputs)?;
    if kinds.any(|k| k != first) {
        return Err(CaError::MixedOutputs);
    }
    Ok(match first {
        OutputKind::InputAddressed => DrvType::InputAddressed { deferred: false },
        OutputKind::Deferred => DrvType::InputAddressed { deferred: true },
        OutputKind::Fixed => DrvType::Fixed,
        OutputKind::Floating => DrvType::Floating,
        OutputKind::Impure => DrvType::Impure,
    })
}

/// A derivation's hash modulo (`DrvHash`): one hash per output, and whether it is deferred
/// (depends on a floating output, so it is not the hash of a final input-addressed path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvHash {
    /// Output name → hash.
    pub hashes: BTreeMap<String, Hash>,
    /// `DrvHash::Kind::Deferred`.
    pub deferred: bool,
}

/// `hashDerivationModulo(drv, mask_outputs)`. `inputs` must hold the (unmasked) hash modulo of
/// every input derivation of `drv`, as [`hash_derivation_modulo`] computed it for them with
/// `mask_outputs = false`.
pub fn hash_derivation_modulo(
    drv: &Derivation,
    dir: &StoreDir,
    mask_outputs: bool,
    inputs: &BTreeMap<StorePath, DrvHash>,
) -> Result<DrvHash, CaError> {
    let ty = drv_type(&drv.outputs)?;
    match ty {
        DrvType::Impure => return Err(CaError::Impure),
        DrvType::Fixed => {
            let mut hashes = BTreeMap::new();
            for (name, out) in &drv.outputs {
                let path = out.path.as_ref().ok_or_else(|| {
                    CaError::InvalidPath(format!("fixed output {name} has no path"))
                })?;
                let text = format!(
                    "fixed:out:{}:{}:{}",
                    out.hash_algo,
                    out.hash,
                    path.to_absolute(dir)
                );
                hashes.insert(name.clone(), Hash::sha256_of(text.as_bytes()));
            }
            return Ok(DrvHash {
                hashes,
                deferred: false,
            });
        }
        _ => {}
    }
    let mut deferred = ty == DrvType::Floating;
    let mut actual: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (input, outs) in &drv.input_drvs {
        let h = inputs
            .get(input)
            .ok_or_else(|| CaError::MissingInput(input.clone()))?;
        deferred |= h.deferred;
        for o in outs {
            let oh = h.hashes.get(o).ok_or_else(|| CaError::NoSuchOutput {
                drv: input.clone(),
                output: o.clone(),
            })?;
            actual.entry(oh.to_base16()).or_default().insert(o.clone());
        }
    }
    let text = drv.to_aterm_with(dir, mask_outputs, Some(&actual));
    let hash = Hash::sha256_of(text.as_bytes());
    Ok(DrvHash {
        hashes: drv.outputs.keys().map(|k| (k.clone(), hash)).collect(),
        deferred,
    })
}

/// `staticOutputHashes`: the masked hash modulo of each output, from which realisation ids are
/// made ([`drv_output_id`]).
pub fn static_output_hashes(
    drv: &Derivation,
    dir: &StoreDir,
    inputs: &BTreeMap<StorePath, DrvHash>,
) -> Result<BTreeMap<String, Hash>, CaError> {
    Ok(hash_derivation_modulo(drv, dir, true, inputs)?.hashes)
}

/// The realisation id of `output` of a derivation with static output hash `hash`:
/// `sha256:<base16>!<output>` (`DrvOutput::to_string`, `src/libstore/realisation.cc`).
pub fn drv_output_id(hash: &Hash, output: &str) -> DrvOutputId {
    DrvOutputId::HashModulo {
        drv_hash: format!("sha256:{}", hash.to_base16()),
        output: output.to_owned(),
    }
}

/// The derivation name of a `.drv` path (`BasicDerivation::nameFromPath`).
pub fn drv_name(drv_path: &StorePath) -> &str {
    drv_path
        .name()
        .strip_suffix(".drv")
        .unwrap_or(drv_path.name())
}

/// `outputPathName`: the name of an output's store path.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_owned()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// `hashPlaceholder`: what a derivation's environment holds for its own floating output
/// `output` until the build knows the path.
pub fn hash_placeholder(output: &str) -> String {
    let h = Hash::sha256_of(format!("nix-output:{output}").as_bytes());
    format!("/{}", nix32_encode(h.digest()))
}

/// `downstreamPlaceholder`: what a dependent derivation holds for output `output` of the
/// input derivation `drv_path` whose path is not known in advance.
pub fn downstream_placeholder(drv_path: &StorePath, output: &str) -> String {
    let clear = format!(
        "nix-upstream-output:{}:{}",
        drv_path.hash_part(),
        output_path_name(drv_name(drv_path), output)
    );
    let h = Hash::sha256_of(clear.as_bytes());
    format!("/{}", nix32_encode(h.digest()))
}

/// `Store::makeOutputPath`: the path of input-addressed output `output` of derivation
/// `drv_name` whose (masked) hash modulo is `hash`.
pub fn make_output_path(
    dir: &StoreDir,
    output: &str,
    hash: &Hash,
    drv_name: &str,
) -> Result<StorePath, CaError> {
    let name = output_path_name(drv_name, output);
    make_store_path(dir, &format!("output:{output}"), hash, &name)
        .map_err(|e| CaError::InvalidPath(e.to_string()))
}

/// `Derivation::tryResolve`: the derivation `drv` (stored at `drv_path`) with every input
/// derivation output replaced by its real path, given in `input_outputs` (keyed by input
/// derivation and output name). The result has no input derivations, so it is what a builder
/// receives, and it is the derivation whose build Nix records as the resolved one.
pub fn resolve(
    drv: &Derivation,
    drv_path: &StorePath,
    dir: &StoreDir,
    input_outputs: &BTreeMap<(StorePath, String), StorePath>,
) -> Result<BasicDerivation, CaError> {
    let mut rewrites: BTreeMap<String, String> = BTreeMap::new();
    let mut input_srcs = drv.input_srcs.clone();
    for (input, outs) in &drv.input_drvs {
        for o in outs {
            let path = input_outputs
                .get(&(input.clone(), o.clone()))
                .ok_or_else(|| CaError::Unresolved {
                    drv: input.clone(),
                    output: o.clone(),
                })?;
            rewrites.insert(downstream_placeholder(input, o), path.to_absolute(dir));
            input_srcs.insert(path.clone());
        }
    }
    let rewrite = |s: &str| rewrite_strings(s, &rewrites);
    let mut env = BTreeMap::new();
    for (k, v) in &drv.env {
        // Nix builds the new environment with `emplace`: the first of two names that rewrite
        // to the same one wins.
        env.entry(rewrite(k)).or_insert_with(|| rewrite(v));
    }
    let mut resolved = Derivation {
        outputs: drv.outputs.clone(),
        input_drvs: BTreeMap::new(),
        input_srcs,
        platform: drv.platform.clone(),
        builder: rewrite(&drv.builder),
        args: drv.args.iter().map(|a| rewrite(a)).collect(),
        env,
    };
    // Deferred outputs get their input-addressed path now, from the masked hash modulo of the
    // resolved derivation (`rewriteDerivation`).
    let deferred: Vec<String> = resolved
        .outputs
        .iter()
        .filter(|(_, o)| output_kind(o) == OutputKind::Deferred)
        .map(|(n, _)| n.clone())
        .collect();
    if !deferred.is_empty() {
        let hashes = static_output_hashes(&resolved, dir, &BTreeMap::new())?;
        let name = drv_name(drv_path).to_owned();
        for out in deferred {
            let h = hashes.get(&out).ok_or_else(|| CaError::NoSuchOutput {
                drv: drv_path.clone(),
                output: out.clone(),
            })?;
            let path = make_output_path(dir, &out, h, &name)?;
            resolved.env.insert(out.clone(), path.to_absolute(dir));
            resolved.outputs.insert(
                out,
                DerivationOutput {
                    path: Some(path),
                    hash_algo: String::new(),
                    hash: String::new(),
                },
            );
        }
    }
    Ok(resolved.to_basic(BTreeSet::new()))
}

/// A basic derivation as a derivation without input derivations (`Derivation(BasicDerivation)`),
/// e.g. to compute the realisation ids of a resolved derivation.
pub fn as_derivation(basic: &BasicDerivation) -> Derivation {
    Derivation {
        outputs: basic.outputs.clone(),
        input_drvs: BTreeMap::new(),
        input_srcs: basic.input_srcs.clone(),
        platform: basic.platform.clone(),
        builder: basic.builder.clone(),
        args: basic.args.clone(),
        env: basic.env.clone(),
    }
}

/// `rewriteStrings` (src/libutil/util.cc): every occurrence of each key replaced by its value,
/// key by key in order. (Nix 2.8 searches again from the start of a replacement; the keys here
/// are placeholders that never occur in their replacements, so both give the same text.)
fn rewrite_strings(s: &str, rewrites: &BTreeMap<String, String>) -> String {
    let mut s = s.to_owned();
    for (from, to) in rewrites {
        if from != to && s.contains(from.as_str()) {
            s = s.replace(from.as_str(), to);
        }
    }
    s
}
