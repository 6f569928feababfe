//! Lix's TOML machines files (Lix >= 2.95), read into the same [`MachineEntry`]s as the legacy
//! format. The rules and their upstream sources are on [`super::machines`]; this module is
//! the parser.
//!
//! The document is parsed with `toml`'s span-keeping tree ([`DeTable`]) rather than serde
//! derive, so that every error can name the dotted key (`machines.andesite.jobs`) and its line.

use std::ops::Range;
use std::sync::Arc;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::b64::nix_base64_decode;
use super::error::{ConfigError, Location, Origin, TomlMachinesProblem as P};
use super::machines::{Fields, MachineEntry, NotSshBuilder, PinnedHostKey, build_spec};
use super::store_url::{StoreKind, effective_store_uri, store_kind};

/// The keys of a machine table (Lix's `EXPECTED_KEYS`, plus HEAD's alias `enabled`).
const MACHINE_KEYS: &str = "uri, system-types, ssh-key, jobs, speed-factor, supported-features, \
                            mandatory-features, ssh-public-host-key, enable";

/// The only `version` Lix 2.95 reads (`MIN_VERSION` = `LATEST_VERSION` = 1).
const VERSION: i64 = 1;

/// How a text is to be read.
pub(super) enum Detected<'t> {
    /// A non-empty TOML document: Lix's format.
    Toml(DeTable<'t>),
    /// Not TOML (or empty): the legacy format.
    Legacy,
}

/// Decides the format of `text` by its content, as Lix does (see [`super::machines`]):
/// a text that parses as a non-empty TOML document is TOML; a text that does not parse is
/// legacy unless it looks like TOML that went wrong (`named_toml`, a file name ending in
/// `.toml`, or [`looks_like_toml`]), in which case the TOML syntax error is the answer.
pub(super) fn detect<'t>(
    text: &'t str,
    origin: &Arc<Origin>,
    named_toml: bool,
) -> Result<Detected<'t>, ConfigError> {
    match DeTable::parse(text) {
        // Only blank and `#` comment lines: no machines in either format.
        Ok(table) if table.get_ref().is_empty() => Ok(Detected::Legacy),
        Ok(table) => Ok(Detected::Toml(table.into_inner())),
        Err(e) if named_toml || looks_like_toml(text) => {
            let at = e.span().map_or(0, |s| s.start);
            let doc = Doc { text, origin };
            Err(ConfigError::MachinesToml {
                location: doc.location(at),
                key: None,
                problem: P::Syntax {
                    column: doc.column(at),
                    message: e.message().trim_end().to_owned(),
                },
            })
        }
        Err(_) => Ok(Detected::Legacy),
    }
}

/// Whether a text that is not valid TOML was meant as TOML. Lix 2.95 (machines.cc) shows the
/// TOML error when the text holds a `"`, which TOML strings need and legacy lines never
/// have; Lix HEAD (lix-rs machines.rs) when the legacy reading yields a system type `=`, i.e.
/// an entry `key = value`. We take both, on the legacy view of the text (comments cut, split
/// at `;`), so that a `"` in a legacy comment does not count.
fn looks_like_toml(text: &str) -> bool {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .flat_map(|l| l.split(';'))
        .any(|entry| {
            // Not a first word ending in `=`: base64 padding in a URL parameter does.
            entry.contains('"')
                || entry
                    .split_whitespace()
                    .nth(1)
                    .is_some_and(|w| w.starts_with('='))
        })
}

/// A TOML text being read: turns byte offsets into lines and errors.
struct Doc<'a> {
    text: &'a str,
    origin: &'a Arc<Origin>,
}

impl Doc<'_> {
    fn location(&self, at: usize) -> Location {
        let before = self.text.get(..at).unwrap_or(self.text);
        Location {
            origin: self.origin.clone(),
            line: before.matches('\n').count() + 1,
        }
    }

    fn column(&self, at: usize) -> usize {
        let before = self.text.get(..at).unwrap_or(self.text);
        before
            .rsplit('\n')
            .next()
            .unwrap_or_default()
            .chars()
            .count()
            + 1
    }

    fn err(&self, span: Range<usize>, key: &str, problem: P) -> ConfigError {
        ConfigError::MachinesToml {
            location: self.location(span.start),
            key: (!key.is_empty()).then(|| key.to_owned()),
            problem,
        }
    }

    fn wrong_type(
        &self,
        v: &Spanned<DeValue<'_>>,
        key: &str,
        expected: &'static str,
    ) -> ConfigError {
        self.err(
            v.span(),
            key,
            P::WrongType {
                expected,
                found: v.get_ref().type_str(),
                hint: "",
            },
        )
    }

    fn string(&self, v: &Spanned<DeValue<'_>>, key: &str) -> Result<String, ConfigError> {
        match v.get_ref() {
            DeValue::String(s) => Ok(s.to_string()),
            _ => Err(self.wrong_type(v, key, "a string")),
        }
    }

    fn strings(&self, v: &Spanned<DeValue<'_>>, key: &str) -> Result<Vec<String>, ConfigError> {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.wrong_type(v, key, "an array of strings"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.string(item, &format!("{key}[{i}]")))
            .collect()
    }

    fn integer(&self, v: &Spanned<DeValue<'_>>, key: &str) -> Result<i128, ConfigError> {
        match v.get_ref() {
            // TOML integers are 64-bit; i128 leaves room for the range checks.
            DeValue::Integer(n) => i128::from_str_radix(n.as_str(), n.radix())
                .map_err(|_| self.wrong_type(v, key, "an integer")),
            _ => Err(self.wrong_type(v, key, "an integer")),
        }
    }
}

/// A key as it would be written in a dotted key: bare if it can be, else quoted.
fn key_part(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        k.to_owned()
    } else {
        format!("{k:?}")
    }
}

/// Reads a TOML machines document (already detected) into entries, in file order. Machines
/// with `enable = false` are checked like the others and then left out, as Lix does.
pub(super) fn parse(
    text: &str,
    table: &DeTable<'_>,
    origin: &Arc<Origin>,
    local_system: &str,
) -> Result<Vec<MachineEntry>, ConfigError> {
    let doc = Doc { text, origin };
    let mut machines = None;
    for (k, v) in table.iter() {
        match k.get_ref().as_ref() {
            "version" => {
                let n = doc.integer(v, "version")?;
                if n != i128::from(VERSION) {
                    return Err(doc.err(v.span(), "version", P::UnsupportedVersion(n.to_string())));
                }
            }
            "machines" => machines = Some(v),
            // Lix 2.95 refuses unknown top-level keys ("unexpected keys found").
            other => {
                return Err(doc.err(
                    k.span(),
                    &key_part(other),
                    P::UnknownKey {
                        allowed: "version, machines",
                    },
                ));
            }
        }
    }
    let Some(machines) = machines else {
        return Err(doc.err(0..0, "", P::MissingMachines));
    };
    let DeValue::Table(machines) = machines.get_ref() else {
        return Err(doc.err(
            machines.span(),
            "machines",
            P::WrongType {
                expected: "a table of machines",
                found: machines.get_ref().type_str(),
                hint: "; write one `[machines.NAME]` table per machine, not `[[machines]]`",
            },
        ));
    };
    let mut out = Vec::new();
    for (name, m) in machines.iter() {
        let name_span = name.span();
        let name = name.get_ref().as_ref();
        let key = format!("machines.{}", key_part(name));
        if let Some(entry) = parse_machine(&doc, name, name_span, &key, m, local_system)? {
            out.push(entry);
        }
    }
    Ok(out)
}

/// One `[machines.NAME]` table. `None` when it is disabled.
fn parse_machine(
    doc: &Doc<'_>,
    name: &str,
    name_span: Range<usize>,
    key: &str,
    m: &Spanned<DeValue<'_>>,
    local_system: &str,
) -> Result<Option<MachineEntry>, ConfigError> {
    let DeValue::Table(t) = m.get_ref() else {
        return Err(doc.err(
            m.span(),
            key,
            P::WrongType {
                expected: "a table",
                found: m.get_ref().type_str(),
                hint: "; did you mean `.uri = ...`?",
            },
        ));
    };
    let location = doc.location(name_span.start);
    let mut fields = Fields::defaults(local_system);
    let mut uri = None;
    let mut host_key = None;
    let mut enable = None;
    for (k, v) in t.iter() {
        let field = k.get_ref().as_ref();
        let key = format!("{key}.{}", key_part(field));
        let key = key.as_str();
        match field {
            "uri" => uri = Some((doc.string(v, key)?, v.span())),
            "system-types" => {
                fields.systems.clear();
                for s in doc.strings(v, key)? {
                    if !fields.systems.contains(&s) {
                        fields.systems.push(s);
                    }
                }
            }
            // Lix passes an empty `ssh-key` / host key as "not set" (machines.cc `openStore`).
            "ssh-key" => fields.ssh_key = Some(doc.string(v, key)?).filter(|s| !s.is_empty()),
            "jobs" => {
                let n = doc.integer(v, key)?;
                fields.max_jobs = u32::try_from(n)
                    .map_err(|_| doc.err(v.span(), key, P::BadJobs(n.to_string())))?;
            }
            "speed-factor" => fields.speed_factor = speed_factor(doc, v, key)?,
            "supported-features" => fields.supported = doc.strings(v, key)?.into_iter().collect(),
            "mandatory-features" => fields.mandatory = doc.strings(v, key)?.into_iter().collect(),
            "ssh-public-host-key" => {
                host_key = Some((doc.string(v, key)?, v.span())).filter(|(s, _)| !s.is_empty());
            }
            "enable" | "enabled" => {
                let DeValue::Boolean(b) = v.get_ref() else {
                    return Err(doc.wrong_type(v, key, "a boolean"));
                };
                if enable.is_some() {
                    return Err(doc.err(k.span(), key, P::EnableTwice));
                }
                enable = Some(*b);
            }
            _ => {
                return Err(doc.err(
                    k.span(),
                    key,
                    P::UnknownKey {
                        allowed: MACHINE_KEYS,
                    },
                ));
            }
        }
    }
    let Some((uri, uri_span)) = uri.filter(|(u, _)| !u.is_empty()) else {
        return Err(doc.err(name_span, key, P::MissingUri));
    };
    let entry = match store_kind(&uri) {
        StoreKind::Ssh(_) => {
            if let Some((line, span)) = host_key {
                fields.host_key = Some(pinned_host_key(&line).map_err(|reason| {
                    doc.err(
                        span,
                        &format!("{key}.ssh-public-host-key"),
                        P::BadHostKey {
                            value: line.clone(),
                            reason,
                        },
                    )
                })?);
            }
            // `build_spec` reports problems with the URL and with its parameters (a bad
            // `?base64-ssh-public-host-key=`).
            let spec = build_spec(name, &uri, fields, Some(location))
                .map_err(|p| doc.err(uri_span, &format!("{key}.uri"), P::Machine(p)))?;
            MachineEntry::Ssh(spec)
        }
        StoreKind::Other(kind) => {
            // Lix hands `uri` to `openStore` as written: unlike the legacy format it does not
            // prepend `ssh://` to `user@host`, and such a store cannot be opened there either
            // ("don't know how to open Nix store", lix/libstore/store-api.cc).
            let kind = if effective_store_uri(&uri) != uri.as_str() {
                format!(
                    "`{uri}` has no scheme, and the TOML format does not add `ssh://` as the \
                     legacy format does (write `ssh://{uri}`)"
                )
            } else {
                kind
            };
            MachineEntry::NotSsh(NotSshBuilder {
                name: name.to_owned(),
                kind,
                location,
            })
        }
    };
    Ok((enable != Some(false)).then_some(entry))
}

/// `speed-factor`: an integer or a float (Lix accepts both), finite and >= 0. Lix's TOML
/// reader keeps 0, which its ranking (load divided by speed factor) cannot use; we map 0 to 1
/// as the legacy format does, so both formats give the same entries.
fn speed_factor(doc: &Doc<'_>, v: &Spanned<DeValue<'_>>, key: &str) -> Result<f64, ConfigError> {
    let (text, value) = match v.get_ref() {
        DeValue::Integer(n) => (n.to_string(), doc.integer(v, key)? as f64),
        DeValue::Float(f) => (f.to_string(), f.as_str().parse().unwrap_or(f64::NAN)),
        _ => return Err(doc.wrong_type(v, key, "a number")),
    };
    if !value.is_finite() || value < 0.0 {
        return Err(doc.err(v.span(), key, P::BadSpeedFactor(text)));
    }
    Ok(if value == 0.0 { 1.0 } else { value })
}

/// `ssh-public-host-key` is the key line itself (Lix base64-encodes it into the store's
/// `base64-ssh-public-host-key`), not the base64 of legacy field 8. A value in that legacy
/// form is refused with a hint rather than pinned as garbage.
fn pinned_host_key(line: &str) -> Result<PinnedHostKey, String> {
    PinnedHostKey::from_openssh_line(line).map_err(|reason| {
        let legacy_form = !line.trim().contains(char::is_whitespace)
            && nix_base64_decode(line.trim()).ok().is_some_and(|b| {
                PinnedHostKey::from_openssh_line(&String::from_utf8_lossy(&b)).is_ok()
            });
        if legacy_form {
            "this is the base64 form the legacy format's field 8 takes; the TOML format takes \
             the key line itself"
                .to_owned()
        } else {
            reason
        }
    })
}

/// Whether a file name asks for TOML (Lix 2.95 shows TOML syntax errors when the `builders`
/// setting mentions `toml`; HEAD when the file name ends in `toml`).
pub(super) fn named_toml(path: &std::path::Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
}

/// Shorthand for [`named_toml`] on an origin.
pub(super) fn origin_named_toml(origin: &Origin) -> bool {
    match origin {
        Origin::File(p) => named_toml(p),
        Origin::Text(_) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::Write;

    use super::super::error::{MachineProblem, StoreUrlProblem};
    use super::super::machines::{BuilderSpec, Machines, parse_builders, read_machines_file};
    use super::*;
    use crate::Protocol;

    const SYSTEM: &str = "x86_64-linux";
    /// An ed25519 host key line (the .pub file without its newline) and `base64 -w0` of the
    /// whole .pub file, as legacy field 8 takes it.
    const KEY_LINE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIVh9XOh+CdwauX8p2ifOfPKgw7kWeuejoiAeLONKMW5 root@builder0";
    const KEY_B64: &str = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUlWaDlYT2grQ2R3YXVYOHAyaWZPZlBLZ3c3a1dldWVqb2lBZUxPTktNVzUgcm9vdEBidWlsZGVyMAo=";

    fn parse(text: &str) -> Result<Machines, ConfigError> {
        parse_builders(text, Origin::Text("test".into()), SYSTEM)
    }

    fn specs(text: &str) -> Vec<BuilderSpec> {
        parse(text).unwrap().builders().cloned().collect()
    }

    /// The key, line and problem of a TOML error (panics on any other result).
    fn toml_err(text: &str) -> (Option<String>, usize, P) {
        match parse(text) {
            Err(ConfigError::MachinesToml {
                location,
                key,
                problem,
            }) => (key, location.line, problem),
            other => panic!("expected a TOML error for {text:?}, got {other:?}"),
        }
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// The example of Lix's manual (distributed-builds.md), keys in a different order.
    const MANUAL: &str = r#"version = 1

[machines.andesite]
uri = "ssh://lix@andesite.lix.systems" # a comment
system-types = ["i686-linux"]
jobs = 8
speed-factor = 1.0
supported-features = ["kvm"]
ssh-key = "/home/deepslate/.ssh/id_ed25519"

[machines.diorite]
speed-factor = 2.0
uri = "ssh://lix@diorite.lix.systems"
jobs = 8
system-types = ["i686-linux"]
ssh-key = "/home/deepslate/.ssh/id_ed25519"

[machines.granite]
uri = "ssh://lix@granite.lix.systems"
system-types = ["i686-linux"]
jobs = 1
speed-factor = 2
supported-features = ["kvm", "benchmark"]
ssh-key = "/home/deepslate/.ssh/id_ed25519"

[machines.legacy]
uri = "ssh://nix@nix-15-11.nixos.org"
enable = false
"#;

    #[test]
    fn manual_example() {
        let m = parse(MANUAL).unwrap();
        assert_eq!(m.entries.len(), 3, "the disabled machine is left out");
        let s: Vec<_> = m.builders().collect();
        let names: Vec<_> = s.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["andesite", "diorite", "granite"], "file order");
        let a = s[0];
        assert_eq!(a.uri, "ssh://lix@andesite.lix.systems");
        assert_eq!(a.protocol, Protocol::Serve);
        assert_eq!(a.user.as_deref(), Some("lix"));
        assert_eq!(a.host, "andesite.lix.systems");
        assert_eq!(a.systems, ["i686-linux"]);
        assert_eq!(
            a.identity.as_deref(),
            Some(std::path::Path::new("/home/deepslate/.ssh/id_ed25519"))
        );
        assert_eq!(a.max_jobs, 8);
        assert_eq!(a.speed_factor, 1.0);
        assert_eq!(a.supported_features, set(&["kvm"]));
        assert!(a.mandatory_features.is_empty());
        assert_eq!(a.location.as_ref().unwrap().line, 3);
        assert_eq!(s[1].speed_factor, 2.0);
        assert_eq!(s[1].location.as_ref().unwrap().line, 11);
        assert_eq!(s[2].speed_factor, 2.0, "an integer speed factor");
        assert_eq!(s[2].supported_features, set(&["kvm", "benchmark"]));
        // Scheduling sees the same things as for a legacy line.
        assert!(s[2].supports_system("i686-linux") && !s[2].supports_system(SYSTEM));
        assert!(s[0].accepts_features(["kvm"]) && !s[1].accepts_features(["kvm"]));
    }

    #[test]
    fn defaults_of_a_uri_only_machine() {
        let s = specs("[machines.scratchy]\nuri = \"ssh-ng://nix@scratchy.labs.cs.uu.nl\"\n");
        assert_eq!(s.len(), 1);
        let b = &s[0];
        assert_eq!(b.name, "scratchy");
        assert_eq!(b.protocol, Protocol::Worker);
        assert_eq!(b.systems, [SYSTEM]);
        assert_eq!(b.identity, None);
        assert_eq!(b.host_key, None);
        assert_eq!(b.max_jobs, 1);
        assert_eq!(b.speed_factor, 1.0);
        assert!(b.supported_features.is_empty() && b.mandatory_features.is_empty());
        assert_eq!(b.location.as_ref().unwrap().line, 1);
    }

    /// The same machines in both formats give the same specs (but for name and location).
    #[test]
    fn same_machines_in_both_formats_give_equal_specs() {
        let legacy = format!(
            "ssh://nix@scratchy.labs.cs.uu.nl i686-linux,x86_64-linux /home/nix/.ssh/id 8 3 kvm benchmark {KEY_B64}\n\
             ssh-ng://itchy:2222?remote-store=unix:///run/nix.sock&compress=true - - 2 0.5 - -\n\
             ssh://bare x86_64-linux - - 0\n"
        );
        let toml = format!(
            r#"
version = 1
[machines.scratchy]
uri = "ssh://nix@scratchy.labs.cs.uu.nl"
system-types = ["i686-linux", "x86_64-linux"]
ssh-key = "/home/nix/.ssh/id"
jobs = 8
speed-factor = 3.0
supported-features = ["kvm"]
mandatory-features = ["benchmark"]
ssh-public-host-key = "{KEY_LINE}"

[machines.itchy]
uri = "ssh-ng://itchy:2222?remote-store=unix:///run/nix.sock&compress=true"
jobs = 2
speed-factor = 0.5
ssh-key = ""

[machines.bare]
uri = "ssh://bare"
speed-factor = 0
"#
        );
        let strip = |v: Vec<BuilderSpec>| -> Vec<BuilderSpec> {
            v.into_iter()
                .map(|mut b| {
                    b.name = String::new();
                    b.location = None;
                    b
                })
                .collect()
        };
        let from_toml = specs(&toml);
        let from_legacy = specs(&legacy);
        assert_eq!(from_toml.len(), 3);
        assert!(from_toml[0].host_key.is_some());
        assert!(from_toml[1].compress);
        assert_eq!(from_toml[2].speed_factor, 1.0, "0 means 1 in both formats");
        assert_eq!(strip(from_toml), strip(from_legacy));
    }

    #[test]
    fn inline_tables_and_a_one_line_setting() {
        // Lix's manual: `--builders 'machines.andesite = {uri = "...", jobs = 8}'`.
        let s = specs(r#"machines.andesite = {uri = "ssh://lix@andesite.lix.systems", jobs = 8}"#);
        assert_eq!((s[0].name.as_str(), s[0].max_jobs), ("andesite", 8));
        let s = specs("[machines]\n\"a.b\" = { uri = \"ssh://a\" }\nc = { uri = \"ssh://c\" }\n");
        assert_eq!(
            s.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
            ["a.b", "c"]
        );
        assert_eq!(s[1].location.as_ref().unwrap().line, 3);
    }

    #[test]
    fn stores_that_are_not_ssh() {
        let m = parse(
            "[machines.fox]\nuri = \"file:///tmp/fox-store\"\n[machines.plain]\nuri = \"nix@host\"\n\
             [machines.word]\nuri = \"andesite\"\n[machines.local]\nuri = \"local\"\n",
        )
        .unwrap();
        let skipped: Vec<_> = m.not_ssh().collect();
        assert_eq!(skipped.len(), 4);
        assert!(
            skipped[2].kind.contains("write `ssh://andesite`"),
            "{}",
            skipped[2].kind
        );
        assert_eq!(skipped[3].kind, "the local store (local)");
        assert_eq!(skipped[0].name, "fox");
        assert!(skipped[0].kind.contains("file://"), "{}", skipped[0].kind);
        assert!(
            skipped[1].kind.contains("write `ssh://nix@host`"),
            "{}",
            skipped[1].kind
        );
        assert_eq!(skipped[1].location.line, 3);
    }

    #[test]
    fn wrong_types() {
        let (key, line, p) = toml_err("[machines.s]\nuri = \"ssh://s\"\njobs = \"three\"\n");
        assert_eq!((key.as_deref(), line), (Some("machines.s.jobs"), 3));
        assert_eq!(
            p,
            P::WrongType {
                expected: "an integer",
                found: "string",
                hint: ""
            }
        );
        let (key, line, _) = toml_err("[machines.s]\nuri = 3\n");
        assert_eq!((key.as_deref(), line), (Some("machines.s.uri"), 2));
        let (key, _, _) = toml_err("[machines.s]\nuri = \"ssh://s\"\nsystem-types = [\"a\", 1]\n");
        assert_eq!(key.as_deref(), Some("machines.s.system-types[1]"));
        let (key, _, _) =
            toml_err("[machines.s]\nuri = \"ssh://s\"\nsupported-features = \"kvm\"\n");
        assert_eq!(key.as_deref(), Some("machines.s.supported-features"));
        let (key, _, p) = toml_err("[machines.s]\nuri = \"ssh://s\"\nenable = 0\n");
        assert_eq!(key.as_deref(), Some("machines.s.enable"));
        assert!(matches!(
            p,
            P::WrongType {
                expected: "a boolean",
                ..
            }
        ));
        let (key, _, p) = toml_err("[machines.s]\nuri = \"ssh://s\"\nspeed-factor = \"fast\"\n");
        assert_eq!(key.as_deref(), Some("machines.s.speed-factor"));
        assert!(matches!(
            p,
            P::WrongType {
                expected: "a number",
                ..
            }
        ));
        // `[[machines]]` (an array of tables) and a machine that is a string.
        let (key, _, p) =
            toml_err("[[machines]]\nuri = \"ssh://a\"\n[[machines]]\nuri = \"ssh://b\"\n");
        assert_eq!(key.as_deref(), Some("machines"));
        assert!(matches!(p, P::WrongType { found: "array", .. }), "{p:?}");
        let (key, _, p) = toml_err("machines.a = \"ssh://a\"\n");
        assert_eq!(key.as_deref(), Some("machines.a"));
        assert!(p.to_string().contains("did you mean `.uri = ...`"), "{p}");
    }

    #[test]
    fn bad_values() {
        let (key, line, p) = toml_err("\n[machines.s]\nuri = \"ssh://s\"\njobs = -3\n");
        assert_eq!(
            (key.as_deref(), line, p),
            (Some("machines.s.jobs"), 4, P::BadJobs("-3".into()))
        );
        let (_, _, p) = toml_err("[machines.s]\nuri = \"ssh://s\"\njobs = 4294967296\n");
        assert_eq!(p, P::BadJobs("4294967296".into()));
        for bad in ["-1", "-0.5", "inf", "nan"] {
            let (key, _, p) = toml_err(&format!(
                "[machines.s]\nuri = \"ssh://s\"\nspeed-factor = {bad}\n"
            ));
            assert_eq!(key.as_deref(), Some("machines.s.speed-factor"));
            assert_eq!(p, P::BadSpeedFactor(bad.into()));
        }
        let (key, line, p) = toml_err("[machines.s]\nuri = \"ssh://s:99999\"\n");
        assert_eq!((key.as_deref(), line), (Some("machines.s.uri"), 2));
        assert!(matches!(
            p,
            P::Machine(MachineProblem::StoreUrl(StoreUrlProblem::BadPort(_)))
        ));
    }

    #[test]
    fn missing_uri() {
        let (key, line, p) = toml_err("[machines.a]\njobs = 2\n");
        assert_eq!(
            (key.as_deref(), line, p),
            (Some("machines.a"), 1, P::MissingUri)
        );
        let (_, _, p) = toml_err("[machines.a]\nuri = \"\"\n");
        assert_eq!(p, P::MissingUri);
        // A disabled machine is still checked, as Lix does.
        let (_, _, p) = toml_err("[machines.a]\nenable = false\n");
        assert_eq!(p, P::MissingUri);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let (key, line, p) = toml_err("[machines.andesite]\nuri = \"ssh://a\"\nextra-key = 3\n");
        assert_eq!(
            (key.as_deref(), line),
            (Some("machines.andesite.extra-key"), 3)
        );
        assert!(matches!(p, P::UnknownKey { .. }));
        // `max-jobs` is the legacy name; Lix's key is `jobs`.
        let (key, _, _) = toml_err("[machines.a]\nuri = \"ssh://a\"\nmax-jobs = 3\n");
        assert_eq!(key.as_deref(), Some("machines.a.max-jobs"));
        let (key, line, p) = toml_err("verison = 1\n[machines.a]\nuri = \"ssh://a\"\n");
        assert_eq!((key.as_deref(), line), (Some("verison"), 1));
        assert_eq!(
            p.to_string(),
            "unknown key (expected one of: version, machines)"
        );
    }

    #[test]
    fn enable_and_its_alias() {
        let s = specs(
            "[machines.a]\nuri = \"ssh://a\"\nenabled = false\n[machines.b]\nuri = \"ssh://b\"\nenable = true\n",
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "b");
        let (_, _, p) =
            toml_err("[machines.a]\nuri = \"ssh://a\"\nenable = true\nenabled = true\n");
        assert_eq!(p, P::EnableTwice);
    }

    #[test]
    fn versions() {
        assert_eq!(
            specs("version = 1\n[machines.a]\nuri = \"ssh://a\"\n").len(),
            1
        );
        for v in ["0", "2", "42"] {
            let (key, _, p) = toml_err(&format!("version = {v}\nmachines = {{}}\n"));
            assert_eq!(
                (key.as_deref(), p),
                (Some("version"), P::UnsupportedVersion(v.into()))
            );
        }
        let (_, _, p) = toml_err("version = \"hello\"\nmachines = {}\n");
        assert!(matches!(
            p,
            P::WrongType {
                expected: "an integer",
                found: "string",
                ..
            }
        ));
        assert!(
            parse("version = 1\nmachines = {}\n")
                .unwrap()
                .entries
                .is_empty()
        );
        let (key, _, p) = toml_err("version = 1\n");
        assert_eq!((key, p), (None, P::MissingMachines));
    }

    #[test]
    fn host_keys() {
        let s = specs(&format!(
            "[machines.a]\nuri = \"ssh://a\"\nssh-public-host-key = \"{KEY_LINE}\"\n"
        ));
        let pin = s[0].host_key.as_ref().unwrap();
        assert_eq!(pin.algorithm, "ssh-ed25519");
        assert_eq!(pin.comment.as_deref(), Some("root@builder0"));
        assert_eq!(pin, &PinnedHostKey::from_machines_field(KEY_B64).unwrap());
        // The blob is not base64.
        let (key, line, p) = toml_err(
            "[machines.a]\nuri = \"ssh://a\"\n\nssh-public-host-key = \"ssh-ed25519 AAAA!!!notbase64\"\n",
        );
        assert_eq!(
            (key.as_deref(), line),
            (Some("machines.a.ssh-public-host-key"), 4)
        );
        let P::BadHostKey { reason, .. } = &p else {
            panic!("{p:?}")
        };
        assert!(reason.contains("not base64"), "{reason}");
        // The legacy form (base64 of the whole .pub line) gets a hint.
        let (_, _, p) = toml_err(&format!(
            "[machines.a]\nuri = \"ssh://a\"\nssh-public-host-key = \"{KEY_B64}\"\n"
        ));
        assert!(
            p.to_string()
                .contains("the TOML format takes the key line itself"),
            "{p}"
        );
        // Empty means none (Lix: an empty key is not passed on).
        let s = specs("[machines.a]\nuri = \"ssh://a\"\nssh-public-host-key = \"\"\n");
        assert_eq!(s[0].host_key, None);
        // Not looked at for stores that are not SSH, as Lix never uses it there.
        let m = parse("[machines.a]\nuri = \"local\"\nssh-public-host-key = \"junk\"\n").unwrap();
        assert_eq!(m.not_ssh().count(), 1);
    }

    #[test]
    fn detection() {
        // Broken TOML is reported as TOML (Lix's two heuristics), with line and column.
        let text = "[machines.andesite]\nuri = ssh://whoops.forgotten.quotes\n";
        let (key, line, p) = toml_err(text);
        assert_eq!((key, line), (None, 2));
        let P::Syntax { column, .. } = p else {
            panic!("{p:?}")
        };
        assert_eq!(column, 7);
        let msg = parse(text).unwrap_err().to_string();
        assert!(
            msg.starts_with(
                "test, line 2: TOML machines file (Lix format): TOML syntax error at column 7"
            ),
            "{msg}"
        );
        assert!(matches!(
            toml_err("[machines.a]\nuri = \"ssh://a\n").2,
            P::Syntax { .. }
        ));
        // Legacy texts stay legacy: not TOML, no `"` outside comments, no `key = value`.
        let m = parse("a\nb # the \"fast\" one\n").unwrap();
        assert_eq!(m.entries.len(), 2);
        let m = parse("ssh://a x86_64-linux - 2 ; ssh-ng://b\n").unwrap();
        assert_eq!(m.builders().map(|b| b.max_jobs).collect::<Vec<_>>(), [2, 1]);
        // A first word ending in `=` (base64 padding in a parameter) is legacy; a second
        // word starting with `=` is broken TOML.
        let m = parse("ssh://a?remote-store=/s= x86_64-linux\n").unwrap();
        assert_eq!(m.entries.len(), 1);
        assert!(matches!(
            toml_err("[machines.a]\nuri =ssh://a\n").2,
            P::Syntax { .. }
        ));
        // Only comments: nothing, in either format.
        assert!(parse("# nothing here\n\n").unwrap().entries.is_empty());
        assert!(parse("").unwrap().entries.is_empty());
        // A legacy error stays a legacy error.
        assert!(matches!(
            parse("host - - eight"),
            Err(ConfigError::Machine {
                problem: MachineProblem::BadMaxJobs(_),
                ..
            })
        ));
    }

    #[test]
    fn files_and_includes() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("machines.toml");
        std::fs::File::create(&toml_path)
            .unwrap()
            .write_all(MANUAL.as_bytes())
            .unwrap();
        // A machines file named explicitly, and the setting `@file` (Lix's usual case).
        let m = read_machines_file(&toml_path, SYSTEM).unwrap();
        assert_eq!(m.builders().count(), 3);
        let loc = m.builders().next().unwrap().location.clone().unwrap();
        assert_eq!(loc, Location::file(&toml_path, 3));
        let setting = format!("@{}", toml_path.display());
        assert_eq!(parse(&setting).unwrap(), m);
        // Next to legacy entries (Lix refuses this; we read each file on its own).
        let m = parse(&format!("ssh://first ; {setting}\nssh://last\n")).unwrap();
        let names: Vec<_> = m.builders().map(|b| b.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ssh://first",
                "andesite",
                "diorite",
                "granite",
                "ssh://last"
            ]
        );
        // A `.toml` file that is not TOML is reported as TOML.
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "host x86_64-linux\n").unwrap();
        let e = read_machines_file(&bad, SYSTEM).unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::MachinesToml {
                    problem: P::Syntax { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("{}:1: TOML machines file", bad.display())),
            "{e}"
        );
        // An error in an included TOML file names that file.
        std::fs::write(&bad, "[machines.a]\nuri = \"ssh://a\"\njobs = -1\n").unwrap();
        let e = parse(&format!("ssh://first\n@{}\n", bad.display())).unwrap_err();
        let ConfigError::MachinesToml { location, key, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(
            (location, key.as_deref()),
            (&Location::file(&bad, 3), Some("machines.a.jobs"))
        );
    }
}
