//! Derivations: the ATerm `.drv` files the scheduler reads locally, and the `BasicDerivation`
//! sent to builders.
//!
//! ## `.drv` files
//!
//! A `.drv` file is one ATerm term with no whitespace (NixOS/nix@2.8.0
//! `src/libstore/derivations.cc`, `parseDerivation` and `Derivation::unparse`):
//!
//! ```text
//! Derive([("out","/nix/store/…-x","",""),…],          outputs: name, path, hashAlgo, hash
//!        [("/nix/store/…-y.drv",["out"]),…],           inputDrvs
//!        ["/nix/store/…-src",…],                        inputSrcs
//!        "x86_64-linux","/bin/sh",["-c","…"],           platform, builder, args
//!        [("name","x"),…])                              env
//! ```
//!
//! [`Derivation::to_aterm`] reproduces `unparse` byte for byte, quirks included: only the
//! builder, the arguments and the environment are escaped (`printString`: `\"`, `\\`, `\n`,
//! `\r`, `\t`); output names, paths, hash fields, input derivation output names and the
//! platform are printed raw between quotes (`printUnquotedString`). Nix's own store hashes
//! (`hashDerivationModulo`) run over this exact text, so the printer must not "fix" it.
//!
//! The reader (`parseString`) decodes `\n`, `\r`, `\t`, and any other escaped character as
//! itself. Where Nix 2.8.0's reader is looser than its writer we are stricter, since no Nix ever
//! writes such files: lists must be comma-separated (Nix's `endOfList` also takes `[,"a"]` and
//! `["a""b"]`), duplicate output names, input derivations or environment keys are errors (Nix
//! silently keeps the first output but the last environment value), and a file that ends
//! inside a string is an error (Nix 2.8.0 spins appending `EOF` characters forever, because
//! `parseString` loops until it reads a `"`).
//!
//! Strings are UTF-8 here. Nix strings are byte strings, so a derivation whose environment holds
//! non-UTF-8 bytes is reported as malformed rather than mangled.
//!
//! ## `BasicDerivation` on the wire
//!
//! Both protocols send the same layout (`writeDerivation` / `readDerivation`, and
//! `nix-protocols.md` §2.3): outputs, input sources, platform, builder, arguments, environment.
//! There is no `inputDrvs`: a remote builder only sees store paths, so the input sources must
//! carry the whole input closure ([`Derivation::to_basic`]).

use std::collections::{BTreeMap, BTreeSet};

use bytes::BufMut;

use crate::error::{Malformed, ProtoError};
use crate::limits::Limits;
use crate::store_path::{
    StoreDir, StorePath, put_opt_store_path, put_store_path_set, read_store_path_set,
};
use crate::wire::{ReadError, ReadResult, WireReader, WireWrite};

/// One output of a derivation, with its fields as Nix writes them.
///
/// The hash fields are kept as raw strings because their meaning depends on the kind of output
/// and the Nix version (`parseDerivationOutput`):
///
/// | kind | `path` | `hash_algo` | `hash` |
/// |---|---|---|---|
/// | input-addressed | the path | `""` | `""` |
/// | fixed-output, flat | the path | `"sha256"` | base16 digest |
/// | fixed-output, recursive | the path | `"r:sha256"` | base16 digest |
/// | floating content-addressed | none | `"r:sha256"` (or `"text:sha256"`) | `""` |
/// | deferred (placeholder) | none | `""` | `""` |
/// | impure | none | `"r:sha256"` | `"impure"` |
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DerivationOutput {
    /// Output path; `None` where Nix writes the empty string.
    pub path: Option<StorePath>,
    /// Ingestion method and algorithm, e.g. `""`, `"sha256"`, `"r:sha256"`, `"text:sha256"`.
    pub hash_algo: String,
    /// Expected hash, base16 without prefix, or `""`, or `"impure"`.
    pub hash: String,
}

impl DerivationOutput {
    /// True for fixed-output derivation outputs (a hash is known in advance).
    pub fn is_fixed(&self) -> bool {
        !self.hash.is_empty() && self.hash != "impure"
    }
}

/// A derivation as read from a `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// Outputs by name.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivations and which of their outputs are needed.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    /// Input sources (plain store paths).
    pub input_srcs: BTreeSet<StorePath>,
    /// System type, e.g. `x86_64-linux`.
    pub platform: String,
    /// Builder program.
    pub builder: String,
    /// Builder arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
}

/// A derivation without input derivations: what builders receive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    /// Outputs by name.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input store paths: the full input closure when sent to a builder.
    pub input_srcs: BTreeSet<StorePath>,
    /// System type.
    pub platform: String,
    /// Builder program.
    pub builder: String,
    /// Builder arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
}

const FIELD: &str = "derivation";

impl Derivation {
    /// Parses a `.drv` file. Every string is bounded by [`Limits::max_string`] and every list by
    /// [`Limits::max_list`].
    pub fn parse(input: &[u8], dir: &StoreDir, limits: &Limits) -> Result<Self, ProtoError> {
        let mut p = Parser {
            s: input,
            pos: 0,
            limits,
            dir,
        };
        let drv = p.derivation()?;
        if p.pos != input.len() {
            return Err(p.err("trailing bytes after the derivation"));
        }
        Ok(drv)
    }

    /// Prints the derivation exactly as Nix's `Derivation::unparse` does (without masking).
    pub fn to_aterm(&self, dir: &StoreDir) -> String {
        self.to_aterm_with(dir, false, None)
    }

    /// `Derivation::unparse` with its two hashing options (NixOS/nix@2.8.0
    /// `src/libstore/derivations.cc`), as `hashDerivationModulo` uses it:
    ///
    /// * `mask_outputs`: output paths, and environment variables named like an output, are
    ///   printed as `""` (the derivation's own output paths cannot be inputs of their hash);
    /// * `actual_inputs`: printed in place of the input derivations, keyed by what stands for
    ///   each input (the base16 hash modulo of its outputs).
    pub fn to_aterm_with(
        &self,
        dir: &StoreDir,
        mask_outputs: bool,
        actual_inputs: Option<&BTreeMap<String, BTreeSet<String>>>,
    ) -> String {
        let mut s = String::with_capacity(4096);
        s.push_str("Derive([");
        for (i, (name, out)) in self.outputs.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('(');
            raw(&mut s, name);
            s.push(',');
            raw(
                &mut s,
                &out.path
                    .as_ref()
                    .filter(|_| !mask_outputs)
                    .map(|p| p.to_absolute(dir))
                    .unwrap_or_default(),
            );
            s.push(',');
            raw(&mut s, &out.hash_algo);
            s.push(',');
            raw(&mut s, &out.hash);
            s.push(')');
        }
        s.push_str("],[");
        let mut input = |i: usize, key: &str, outs: &BTreeSet<String>| {
            if i > 0 {
                s.push(',');
            }
            s.push('(');
            raw(&mut s, key);
            s.push_str(",[");
            list(&mut s, outs, raw);
            s.push_str("])");
        };
        match actual_inputs {
            Some(inputs) => {
                for (i, (key, outs)) in inputs.iter().enumerate() {
                    input(i, key, outs);
                }
            }
            None => {
                for (i, (drv, outs)) in self.input_drvs.iter().enumerate() {
                    input(i, &drv.to_absolute(dir), outs);
                }
            }
        }
        s.push_str("],[");
        list(
            &mut s,
            self.input_srcs.iter().map(|p| p.to_absolute(dir)),
            raw,
        );
        s.push_str("],");
        raw(&mut s, &self.platform);
        s.push(',');
        escaped(&mut s, &self.builder);
        s.push_str(",[");
        list(&mut s, &self.args, escaped);
        s.push_str("],[");
        for (i, (k, v)) in self.env.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('(');
            escaped(&mut s, k);
            s.push(',');
            let masked = mask_outputs && self.outputs.contains_key(k);
            escaped(&mut s, if masked { "" } else { v });
            s.push(')');
        }
        s.push_str("])");
        s
    }

    /// The derivation as sent to a builder: `input_closure` (the closure of the input sources
    /// and of the needed outputs of the input derivations) becomes the input sources, together
    /// with the derivation's own sources (which any closure contains anyway). This is what the
    /// build hook does in NixOS/nix@2.8.0 `src/build-remote/build-remote.cc`: the serve protocol
    /// has no `inputDrvs`, so the builder must be told every path it needs.
    pub fn to_basic(&self, input_closure: BTreeSet<StorePath>) -> BasicDerivation {
        let mut input_srcs = input_closure;
        input_srcs.extend(self.input_srcs.iter().cloned());
        BasicDerivation {
            outputs: self.outputs.clone(),
            input_srcs,
            platform: self.platform.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        }
    }
}

impl BasicDerivation {
    /// Decodes the wire form (`readDerivation`).
    pub fn read(r: &mut WireReader<'_>, dir: &StoreDir) -> ReadResult<Self> {
        let n = r.read_count("BasicDerivation.outputs")?;
        let mut outputs = BTreeMap::new();
        for _ in 0..n {
            let name = r.read_string("BasicDerivation.outputs.name")?;
            let path = r.read_string("BasicDerivation.outputs.path")?;
            let path = if path.is_empty() {
                None
            } else {
                Some(
                    StorePath::parse_field(dir, &path, "BasicDerivation.outputs.path")
                        .map_err(ReadError::Proto)?,
                )
            };
            let hash_algo = r.read_string("BasicDerivation.outputs.hashAlgo")?;
            let hash = r.read_string("BasicDerivation.outputs.hash")?;
            if outputs.contains_key(&name) {
                return Err(dup("BasicDerivation.outputs", &name));
            }
            outputs.insert(
                name,
                DerivationOutput {
                    path,
                    hash_algo,
                    hash,
                },
            );
        }
        let input_srcs = read_store_path_set(r, dir, "BasicDerivation.inputSrcs")?;
        let platform = r.read_string("BasicDerivation.platform")?;
        let builder = r.read_string("BasicDerivation.builder")?;
        let args = r.read_string_list("BasicDerivation.args")?;
        let n = r.read_count("BasicDerivation.env")?;
        let mut env = BTreeMap::new();
        for _ in 0..n {
            let k = r.read_string("BasicDerivation.env.key")?;
            let v = r.read_string("BasicDerivation.env.value")?;
            if env.contains_key(&k) {
                return Err(dup("BasicDerivation.env", &k));
            }
            env.insert(k, v);
        }
        Ok(Self {
            outputs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }

    /// Encodes the wire form (`writeDerivation`), maps and sets in Nix's sorted order.
    pub fn write<B: BufMut + ?Sized>(&self, out: &mut B, dir: &StoreDir) {
        out.put_word(self.outputs.len() as u64);
        for (name, o) in &self.outputs {
            out.put_str(name);
            put_opt_store_path(out, dir, o.path.as_ref());
            out.put_str(&o.hash_algo);
            out.put_str(&o.hash);
        }
        put_store_path_set(out, dir, &self.input_srcs);
        out.put_str(&self.platform);
        out.put_str(&self.builder);
        out.put_str_list(&self.args);
        out.put_word(self.env.len() as u64);
        for (k, v) in &self.env {
            out.put_str(k);
            out.put_str(v);
        }
    }
}

fn dup(field: &'static str, key: &str) -> ReadError {
    ReadError::Proto(ProtoError::invalid(field, format!("duplicate key {key:?}")))
}

/// `printUnquotedString`: the string between quotes, unescaped.
fn raw(s: &mut String, v: &str) {
    s.push('"');
    s.push_str(v);
    s.push('"');
}

/// `printString`: the string between quotes with `"`, `\`, newline, CR and tab escaped.
fn escaped(s: &mut String, v: &str) {
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c => s.push(c),
        }
    }
    s.push('"');
}

/// Comma-separated items, each printed with `item`.
fn list<I, S>(s: &mut String, items: I, item: fn(&mut String, &str))
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    for (i, v) in items.into_iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        item(s, v.as_ref());
    }
}

/// ATerm reader over a complete `.drv` file.
struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    limits: &'a Limits,
    dir: &'a StoreDir,
}

impl Parser<'_> {
    fn err(&self, reason: impl std::fmt::Display) -> ProtoError {
        ProtoError::invalid(FIELD, format!("at byte {}: {reason}", self.pos))
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn expect(&mut self, lit: &str) -> Result<(), ProtoError> {
        let end = self.pos.saturating_add(lit.len());
        if self.s.get(self.pos..end) == Some(lit.as_bytes()) {
            self.pos = end;
            Ok(())
        } else {
            Err(self.err(format_args!("expected {lit:?}")))
        }
    }

    /// A quoted string with Nix's escapes (`parseString`).
    fn string(&mut self) -> Result<String, ProtoError> {
        self.expect("\"")?;
        let max = self.limits.max_string;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err("unterminated string"));
            };
            self.pos += 1;
            let b = match c {
                b'"' => break,
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return Err(self.err("unterminated string"));
                    };
                    self.pos += 1;
                    match e {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    }
                }
                other => other,
            };
            if out.len() as u64 >= max {
                return Err(ProtoError::Malformed {
                    field: FIELD,
                    kind: Malformed::TooLong {
                        len: out.len() as u64 + 1,
                        max,
                    },
                });
            }
            out.push(b);
        }
        String::from_utf8(out).map_err(|_| self.err("string is not UTF-8"))
    }

    /// A string Nix prints without escapes (`printUnquotedString`): output names, paths, hash
    /// algorithms and hashes, input derivation outputs, the platform. An escape there would
    /// print back unescaped, so the text would change meaning or stop parsing: refused.
    fn raw_string(&mut self) -> Result<String, ProtoError> {
        let start = self.pos;
        let s = self.string()?;
        if self
            .s
            .get(start..self.pos)
            .is_some_and(|b| b.contains(&b'\\'))
        {
            return Err(ProtoError::invalid(
                FIELD,
                format!("at byte {start}: escape sequence in a field Nix prints unescaped"),
            ));
        }
        Ok(s)
    }

    fn path(&mut self) -> Result<StorePath, ProtoError> {
        let start = self.pos;
        let s = self.raw_string()?;
        StorePath::parse_field(self.dir, &s, FIELD)
            .map_err(|e| ProtoError::invalid(FIELD, format!("at byte {start}: {e}")))
    }

    /// `[a,b,...]` with each element read by `item`; the opening `[` is consumed here.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, ProtoError>,
        mut add: impl FnMut(&mut Self, T) -> Result<(), ProtoError>,
    ) -> Result<(), ProtoError> {
        self.expect("[")?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        let mut n: u64 = 0;
        loop {
            n += 1;
            if n > self.limits.max_list {
                return Err(ProtoError::Malformed {
                    field: FIELD,
                    kind: Malformed::TooLong {
                        len: n,
                        max: self.limits.max_list,
                    },
                });
            }
            let v = item(self)?;
            add(self, v)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn derivation(&mut self) -> Result<Derivation, ProtoError> {
        let mut drv = Derivation::default();
        self.expect("Derive(")?;

        self.list(
            |p| {
                p.expect("(")?;
                let name = p.raw_string()?;
                p.expect(",")?;
                let path_start = p.pos;
                let path = p.raw_string()?;
                p.expect(",")?;
                let hash_algo = p.raw_string()?;
                p.expect(",")?;
                let hash = p.raw_string()?;
                p.expect(")")?;
                let path = if path.is_empty() {
                    None
                } else {
                    Some(StorePath::parse_field(p.dir, &path, FIELD).map_err(|e| {
                        ProtoError::invalid(FIELD, format!("at byte {path_start}: {e}"))
                    })?)
                };
                Ok((
                    name,
                    DerivationOutput {
                        path,
                        hash_algo,
                        hash,
                    },
                ))
            },
            |p, (name, out)| {
                if drv.outputs.contains_key(&name) {
                    return Err(p.err(format_args!("duplicate output {name:?}")));
                }
                drv.outputs.insert(name, out);
                Ok(())
            },
        )?;

        self.expect(",")?;
        self.list(
            |p| {
                p.expect("(")?;
                let path = p.path()?;
                p.expect(",")?;
                let mut outs = BTreeSet::new();
                p.list(Parser::raw_string, |_, o| {
                    outs.insert(o);
                    Ok(())
                })?;
                p.expect(")")?;
                Ok((path, outs))
            },
            |p, (path, outs)| {
                if drv.input_drvs.contains_key(&path) {
                    return Err(p.err(format_args!("duplicate input derivation {path}")));
                }
                drv.input_drvs.insert(path, outs);
                Ok(())
            },
        )?;

        self.expect(",")?;
        self.list(Parser::path, |_, p| {
            drv.input_srcs.insert(p);
            Ok(())
        })?;

        self.expect(",")?;
        drv.platform = self.raw_string()?;
        self.expect(",")?;
        drv.builder = self.string()?;
        self.expect(",")?;
        self.list(Parser::string, |_, a| {
            drv.args.push(a);
            Ok(())
        })?;

        self.expect(",")?;
        self.list(
            |p| {
                p.expect("(")?;
                let k = p.string()?;
                p.expect(",")?;
                let v = p.string()?;
                p.expect(")")?;
                Ok((k, v))
            },
            |p, (k, v)| {
                if drv.env.contains_key(&k) {
                    return Err(p.err(format_args!("duplicate environment variable {k:?}")));
                }
                drv.env.insert(k, v);
                Ok(())
            },
        )?;
        self.expect(")")?;
        Ok(drv)
    }
}
