//! What to build: an opaque path or outputs of a derivation.

use std::collections::BTreeSet;
use std::fmt;

use crate::error::ProtoError;
use crate::store_path::{StoreDir, StorePath};

/// Which outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OutputsSpec {
    /// Every output (`*`).
    All,
    /// The named outputs.
    Names(BTreeSet<String>),
}

/// A path to realise: an opaque store path, or outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DerivedPath {
    /// Make this path valid (substitute it if needed).
    Opaque(StorePath),
    /// Build these outputs of the derivation.
    Built {
        /// The `.drv` path.
        drv: StorePath,
        /// Which outputs.
        outputs: OutputsSpec,
    },
}

impl DerivedPath {
    /// All outputs of `drv`.
    pub fn all_outputs(drv: StorePath) -> Self {
        DerivedPath::Built {
            drv,
            outputs: OutputsSpec::All,
        }
    }

    /// The worker form from 1.30: `drv!out1,out2`, `drv!*`, or a plain path.
    pub fn to_wire(&self, dir: &StoreDir) -> String {
        match self {
            DerivedPath::Opaque(p) => p.to_absolute(dir),
            DerivedPath::Built { drv, outputs } => {
                let outs = match outputs {
                    OutputsSpec::All => "*".to_owned(),
                    OutputsSpec::Names(n) => n.iter().cloned().collect::<Vec<_>>().join(","),
                };
                format!("{}!{outs}", drv.to_absolute(dir))
            }
        }
    }

    /// The legacy `StorePathWithOutputs` form (serve protocol, worker below 1.30): a bare
    /// `.drv` means every output, and an opaque `.drv` cannot be expressed. Every output of a
    /// path that is not a `.drv` is written `path!*`: bare, it would read back as an opaque
    /// path (see [`Self::parse`]).
    pub fn to_legacy_wire(&self, dir: &StoreDir) -> String {
        match self {
            DerivedPath::Opaque(p) => p.to_absolute(dir),
            DerivedPath::Built {
                drv,
                outputs: OutputsSpec::All,
            } if drv.is_derivation() => drv.to_absolute(dir),
            DerivedPath::Built { .. } => self.to_wire(dir),
        }
    }

    /// Parses either form. A bare `.drv` path is read the legacy way when `legacy` is set
    /// (all outputs), as an opaque path otherwise.
    ///
    /// In the legacy form, `path!` (no output named) is the same as the bare path: Nix 2.8's
    /// `parsePathWithOutputs` reads it as the path with an empty output set, and
    /// `StorePathWithOutputs::toDerivedPath` turns an empty set into an opaque path unless
    /// the path is a `.drv` (src/libstore/path-with-outputs.cc). Reading it as "all outputs"
    /// of a path that is not a `.drv` would also give a value [`Self::to_legacy_wire`]
    /// cannot express.
    pub fn parse(
        dir: &StoreDir,
        s: &str,
        legacy: bool,
        field: &'static str,
    ) -> Result<Self, ProtoError> {
        let bare = |s: &str| -> Result<Self, ProtoError> {
            let p = StorePath::parse_field(dir, s, field)?;
            if legacy && p.is_derivation() {
                Ok(DerivedPath::all_outputs(p))
            } else {
                Ok(DerivedPath::Opaque(p))
            }
        };
        match s.split_once('!') {
            None => bare(s),
            Some((path, "")) if legacy => bare(path),
            Some((drv, outs)) => {
                let drv = StorePath::parse_field(dir, drv, field)?;
                // `*` is how newer Nix says "all outputs"; Nix 2.8 printed an empty list.
                let outputs = if outs == "*" || outs.is_empty() {
                    OutputsSpec::All
                } else {
                    let names: BTreeSet<String> = outs.split(',').map(str::to_owned).collect();
                    if names.iter().any(String::is_empty) {
                        return Err(ProtoError::invalid(
                            field,
                            format!("empty output name in {s:?}"),
                        ));
                    }
                    OutputsSpec::Names(names)
                };
                Ok(DerivedPath::Built { drv, outputs })
            }
        }
    }
}

impl fmt::Display for DerivedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_wire(&StoreDir::default()))
    }
}
