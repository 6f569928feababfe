//! Content-addressed derivations built remotely: what nixmux does around a build when a
//! derivation's outputs, or its inputs' outputs, have no path in their `.drv` (floating
//! content-addressed derivations, `__contentAddressed = true`, and the derivations that use
//! them).
//!
//! It mirrors Nix 2.8.0's `DerivationGoal` (src/libstore/build/derivation-goal.cc) and build
//! hook (src/build-remote/build-remote.cc):
//!
//! 1. The inputs' outputs come from the local store's realisations
//!    (`queryPartialDerivationOutputMap`, which `Derivation::tryResolve` uses too).
//! 2. A derivation with input derivations is *resolved* (`inputsRealised` →
//!    `Derivation::tryResolve`): the builder receives the resolved derivation, whose input
//!    sources are exactly the inputs' outputs, not widened to the input closure (the hook
//!    widens `inputSrcs` only for derivations that still have input derivations, because
//!    widening changes the ids the builder gives the outputs).
//! 3. The output paths of floating outputs come from the build result's `builtOutputs`; the
//!    outputs are copied back, and realisations are registered locally for the original
//!    derivation's outputs (`resolvedFinished`) and for the resolved derivation's (what the
//!    hook and `checkPathValidity` record for the resolved goal), with ids made from the static
//!    output hashes (`staticOutputHashes`), computed here ([`nixmux_proto::ca`]).
//!
//! ## Detecting support without crashing anyone
//!
//! Nix 2.8 without the `ca-derivations` experimental feature aborts on `QueryRealisation` (its
//! realisation statements are never prepared, src/libstore/local-store.cc), so nixmux never
//! sends it. It asks `QueryDerivationOutputMap` instead, which every Nix answers: with the
//! feature, the daemon lists every output of a floating derivation (unknown paths as none);
//! without it, only outputs whose paths the `.drv` fixes, so a floating output missing from
//! the answer means the local store lacks the feature. The builder is never asked: a builder
//! without the feature refuses the build itself (`haveDerivation` requires the feature for
//! derivations without known output paths), and that refusal becomes a typed
//! [`ErrorKind::Unsupported`].
//!
//! Not done: `dependentRealisations` (the realisations of inputs an output refers to, which
//! Nix records for copying realisations between stores) are registered empty.

use std::collections::{BTreeMap, BTreeSet};

use nixmux_proto::build_result::BuildResult;
use nixmux_proto::ca::{
    CaError, DrvHash, DrvType, as_derivation, drv_output_id, drv_type, hash_derivation_modulo,
    resolve, static_output_hashes,
};
use nixmux_proto::derivation::{BasicDerivation, Derivation};
use nixmux_proto::store_path::StorePath;
use nixmux_proto::worker::{DrvOutputId, Realisation};

use crate::error::{Error, ErrorKind, Result};
use crate::local::LocalStore;

/// How Nix words its refusal when an experimental feature is off (`requireExperimentalFeature`,
/// src/libutil/config.cc and src/libstore/globals.cc).
const CA_DISABLED: &str = "experimental Nix feature 'ca-derivations' is disabled";

/// Whether an error text is Nix refusing for lack of `ca-derivations`.
pub(crate) fn lacks_ca_feature(message: &str) -> bool {
    message.contains(CA_DISABLED)
}

/// A content-addressed build, prepared: what to send and which realisations to record.
#[derive(Debug)]
pub(crate) struct CaBuild {
    /// The derivation as the builder receives it: resolved when it had input derivations.
    pub(crate) basic: BasicDerivation,
    /// Output name → the realisation ids to register for it.
    ids: BTreeMap<String, Vec<DrvOutputId>>,
}

fn ca_error(drv: &StorePath, e: CaError) -> Error {
    let kind = match e {
        CaError::Impure => ErrorKind::Unsupported,
        CaError::Unresolved { .. } => ErrorKind::InvalidInput,
        _ => ErrorKind::LocalStore,
    };
    Error::caller(kind, format!("{drv}: {e}"))
}

fn local_lacks_ca(drv: &StorePath) -> Error {
    Error::local(
        ErrorKind::Unsupported,
        format!(
            "{drv} has floating content-addressed outputs, but the local store's Nix does not have the experimental feature ca-derivations enabled (it knows no realisations)"
        ),
    )
    .hint("add `experimental-features = ca-derivations` to the local nix.conf (and the builders')")
}

/// How a derivation is built.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Every path is in the `.drv` files: the outputs of the input derivations it needs.
    Ordinary(BTreeSet<StorePath>),
    /// Content-addressed outputs whose paths are not in the `.drv` files are involved.
    Ca(CaBuild),
}

/// Reads the input derivations of `drv` (read from `drv_path`) and decides how to build it.
pub(crate) async fn prepare(
    local: &LocalStore,
    drv_path: &StorePath,
    drv: &Derivation,
) -> Result<Plan> {
    let ty = drv_type(&drv.outputs).map_err(|e| ca_error(drv_path, e))?;
    let mut input_outputs: BTreeMap<(StorePath, String), StorePath> = BTreeMap::new();
    let mut unknown: BTreeMap<StorePath, BTreeSet<String>> = BTreeMap::new();
    for (input, outs) in &drv.input_drvs {
        let idrv = local.read_derivation(input).await?;
        for o in outs {
            let out = idrv.outputs.get(o).ok_or_else(|| {
                Error::caller(
                    ErrorKind::InvalidInput,
                    format!("{drv_path} needs output {o} of {input}, which has no such output"),
                )
            })?;
            match &out.path {
                Some(p) => {
                    input_outputs.insert((input.clone(), o.clone()), p.clone());
                }
                None => {
                    unknown.entry(input.clone()).or_default().insert(o.clone());
                }
            }
        }
    }
    if unknown.is_empty() && ty.has_known_output_paths() {
        return Ok(Plan::Ordinary(input_outputs.into_values().collect()));
    }
    if ty == DrvType::Impure {
        return Err(ca_error(drv_path, CaError::Impure));
    }
    // The local store must know realisations before anything is sent: probe it with the
    // derivation itself when its outputs float (see the module documentation).
    if !ty.has_known_output_paths() {
        let known = local.query_derivation_output_map(drv_path).await?;
        if !drv.outputs.keys().all(|o| known.contains_key(o)) {
            return Err(local_lacks_ca(drv_path));
        }
    }
    for (input, outs) in &unknown {
        let known = local.query_derivation_output_map(input).await?;
        for o in outs {
            match known.get(o) {
                None => return Err(local_lacks_ca(input)),
                Some(None) => {
                    return Err(Error::caller(
                        ErrorKind::InvalidInput,
                        format!(
                            "output {o} of {input} (an input of {drv_path}) is not realised in the local store: build it first"
                        ),
                    ));
                }
                Some(Some(p)) => {
                    input_outputs.insert((input.clone(), o.clone()), p.clone());
                }
            }
        }
    }
    let dir = local.store_dir();
    let hashes = input_hashes(local, drv).await?;
    let mut ids: BTreeMap<String, Vec<DrvOutputId>> = BTreeMap::new();
    for (o, h) in static_output_hashes(drv, dir, &hashes).map_err(|e| ca_error(drv_path, e))? {
        ids.entry(o.clone())
            .or_default()
            .push(drv_output_id(&h, &o));
    }
    let basic = if drv.input_drvs.is_empty() {
        drv.to_basic(BTreeSet::new())
    } else {
        let basic =
            resolve(drv, drv_path, dir, &input_outputs).map_err(|e| ca_error(drv_path, e))?;
        let resolved = static_output_hashes(&as_derivation(&basic), dir, &BTreeMap::new())
            .map_err(|e| ca_error(drv_path, e))?;
        for (o, h) in resolved {
            let id = drv_output_id(&h, &o);
            let v = ids.entry(o).or_default();
            if !v.contains(&id) {
                v.push(id);
            }
        }
        basic
    };
    tracing::debug!(drv = %drv_path, ?ids, "content-addressed build prepared");
    Ok(Plan::Ca(CaBuild { basic, ids }))
}

/// The unmasked hash modulo of every derivation in the input-derivation closure of `drv`
/// (`pathDerivationModulo`, which recurses through all of them), reading each `.drv` once.
async fn input_hashes(
    local: &LocalStore,
    drv: &Derivation,
) -> Result<BTreeMap<StorePath, DrvHash>> {
    let dir = local.store_dir();
    let mut done: BTreeMap<StorePath, DrvHash> = BTreeMap::new();
    let mut read: BTreeMap<StorePath, Derivation> = BTreeMap::new();
    // Depth-first, each derivation hashed after all of its inputs.
    let mut stack: Vec<(StorePath, bool)> =
        drv.input_drvs.keys().map(|p| (p.clone(), false)).collect();
    while let Some((path, inputs_done)) = stack.pop() {
        if done.contains_key(&path) {
            continue;
        }
        if inputs_done {
            let Some(d) = read.remove(&path) else {
                continue;
            };
            let h =
                hash_derivation_modulo(&d, dir, false, &done).map_err(|e| ca_error(&path, e))?;
            done.insert(path, h);
            continue;
        }
        if read.contains_key(&path) {
            continue;
        }
        let d = local.read_derivation(&path).await?;
        stack.push((path.clone(), true));
        for i in d.input_drvs.keys() {
            if !done.contains_key(i) && !read.contains_key(i) {
                stack.push((i.clone(), false));
            }
        }
        read.insert(path, d);
    }
    Ok(done)
}

impl CaBuild {
    /// Where each output is after a successful build: the resolved derivation's path where it
    /// has one, else what the builder reported in `builtOutputs`.
    pub(crate) fn output_paths(
        &self,
        result: &BuildResult,
        builder: &str,
    ) -> Result<BTreeMap<String, StorePath>> {
        let mut out = BTreeMap::new();
        for (name, o) in &self.basic.outputs {
            let path = match (&o.path, result.built_outputs.get(name)) {
                (Some(p), _) => p.clone(),
                (None, Some(b)) => b.path.clone(),
                (None, None) => {
                    return Err(Error::remote(
                        ErrorKind::Protocol,
                        format!(
                            "the builder did not report where output {name} of a content-addressed derivation went (no builtOutputs entry)"
                        ),
                    )
                    .on(builder));
                }
            };
            out.insert(name.clone(), path);
        }
        Ok(out)
    }

    /// Registers the realisations of the built outputs in the local store, which must hold
    /// the outputs already.
    pub(crate) async fn register(
        &self,
        local: &LocalStore,
        outputs: &BTreeMap<String, StorePath>,
    ) -> Result<()> {
        for (name, ids) in &self.ids {
            let Some(path) = outputs.get(name) else {
                continue;
            };
            for id in ids {
                local
                    .register_drv_output(&Realisation {
                        id: id.clone(),
                        out_path: path.clone(),
                        signatures: BTreeSet::new(),
                    })
                    .await?;
            }
        }
        Ok(())
    }
}

/// A builder's refusal for lack of `ca-derivations`, as a typed error.
pub(crate) fn builder_lacks_ca(builder: &str, message: &str) -> Error {
    Error::remote(
        ErrorKind::Unsupported,
        format!(
            "the builder's Nix does not have the experimental feature ca-derivations enabled, which this content-addressed derivation needs: {message}"
        ),
    )
    .on(builder)
    .hint("add `experimental-features = ca-derivations` to the builder's nix.conf, or build elsewhere")
}
