//! Nix machines files and the `builders` setting, parsed exactly as Nix parses them.
//!
//! The reference is Nix's src/libstore/machines.cc (2.8.0 through 2.35; `expandBuilderLines`,
//! `parseBuilderLine`, the `Machine` constructor and `Machine::openStore` /
//! `completeStoreReference`).
//!
//! # Two formats, told apart by content
//!
//! Besides the legacy format below, Lix >= 2.95 reads a TOML machines file. The reference is
//! Lix (lix-project/lix) at tag 2.95.3 (753944a1), `lix/libstore/machines.cc`
//! (`machines_toml_parsing`) and `doc/manual/src/advanced-topics/distributed-builds.md`, and
//! its Rust port on main (049cc4e1, `lix/lix-rs/src/machines.rs`), which reads the same files:
//!
//! ```toml
//! version = 1                       # optional; 1 is the only version
//!
//! [machines.andesite]               # one table per machine; the key is its name
//! uri = "ssh://nix@andesite"        # required, non-empty; taken as written (no `ssh://` added)
//! system-types = ["x86_64-linux"]   # default: the local system
//! ssh-key = "/root/.ssh/id_ed25519" # default: none ("" = none)
//! jobs = 8                          # integer >= 0, default 1
//! speed-factor = 2.5                # integer or float >= 0, default 1
//! supported-features = ["kvm"]      # default: none
//! mandatory-features = []           # default: none
//! ssh-public-host-key = "ssh-ed25519 AAAA..."  # the .pub line itself, not base64
//! enable = false                    # default true; a disabled machine is checked, then dropped
//! ```
//!
//! Each key maps onto the legacy field of the same meaning, so both formats give the same
//! [`BuilderSpec`]s except that a TOML machine's [`BuilderSpec::name`] is its table key. Lix
//! refuses unknown keys, in a machine table (both versions) and at the top level (2.95; the
//! Rust port ignores them there): so do we. Lix also accepts `enabled` for `enable` (Rust
//! port). Where we differ: a `speed-factor` of 0 means 1, as in the legacy format (Lix's TOML
//! reader keeps 0); NaN and infinities are refused; the host key of an SSH machine must be an
//! OpenSSH public key line (Lix does not look at it); a `uri` without scheme such as
//! `nix@host` is reported as a store nixmux skips, with a hint (Lix cannot open it either);
//! a missing `@file.toml` is skipped like any missing include (Lix's Rust port fails).
//!
//! Detection follows Lix: a text that parses as a non-empty TOML document is TOML, and then
//! every problem in it is reported as a TOML problem with its dotted key and line. A text that
//! does not parse as TOML is read in the legacy format, unless it looks like broken TOML (a
//! file named `*.toml`, a `"`, or an entry `key = value`), in which case the TOML syntax error
//! is reported. A text with only comments and blank lines has no machines in either format.
//! Lix reads TOML only when the whole `builders` setting is TOML or a single `@file`; we
//! decide for every text and every `@file` include on its own, so a TOML file included next
//! to legacy entries works here (Lix rejects that setting). Includes inside a TOML file do not
//! exist.
//!
//! # Entries (legacy format)
//!
//! * The text is split into lines at `\n`. On each line `#` starts a comment that runs to the
//!   end of the line; what is left is split at `;` into entries, each trimmed of spaces, tabs,
//!   CR and LF. Empty entries are skipped.
//!
//!   We follow Nix >= 2.29. Nix up to 2.28 (including the 2.8 on our builders) differs in two
//!   ways, both checked against Debian's Nix 2.8 with `nix-build --builders '...'`:
//!   1. it split at `\n` *and* `;` before stripping comments, so in `a # c ; b` the `b` is an
//!      entry (fixed by commit f8b13cce, "Fix `;` and `#` bug in machine file parsing");
//!   2. its `trim(line)` discarded the result, so entries were not trimmed: a whitespace-only
//!      entry (an indented `# comment` line, a trailing `a ;`) failed with "store URL was not
//!      found at the first column", and ` @file` was not an include (fixed by b74b0f4e, "Fix
//!      another machine config parsing bug").
//!
//!   So every text Nix 2.8 accepts splits into the same entries here, except lines of the
//!   form `... # comment ; more`.
//! * An entry `@path` is replaced by the entries of the file `path` (trimmed). A file that
//!   does not exist is skipped silently (Nix: "cannot find machines file", at debug level);
//!   any other read error is an error. Nix opens `path` as given, so a relative path is
//!   relative to the *current directory*, not to the including file; we do the same. Nix has
//!   no loop protection (it recurses until the stack overflows); we report a loop as an error.
//!
//! # Fields
//!
//! Fields are separated by spaces, tabs, CR or LF. A missing field or `-` takes the default.
//! Fields after the 8th are ignored, as in Nix.
//!
//! | # | field | default |
//! |---|---|---|
//! | 1 | store URI; without `://` gets `ssh://` ([`effective_store_uri`]) | required |
//! | 2 | systems, comma-separated | the local system (a parameter here) |
//! | 3 | SSH identity file | none |
//! | 4 | max jobs, unsigned integer | 1 |
//! | 5 | speed factor: a float since Nix 2.20 (2.8 took only integers); `0` means 1, negative is an error | 1 |
//! | 6 | supported features, comma-separated | none |
//! | 7 | mandatory features, comma-separated | none |
//! | 8 | base64 of the host's `.pub` line; must decode | none |
//!
//! Every field is validated on every entry, SSH or not, because Nix validates them before it
//! looks at the URI. For SSH entries field 8 must moreover decode to a public key line
//! (`algorithm blob [comment]` whose blob names that algorithm): Nix only checks that it is
//! base64 (2.8 accepts `aGVsbG8=`, "hello") and leaves ssh to fail on the bogus known_hosts
//! file, but we pin the key ourselves and a pin we cannot read must not be dropped silently.
//!
//! Entries whose store is not `ssh://` or `ssh-ng://` (`local`, `auto`, `daemon`,
//! `unix://...`, a path, ...) are returned as [`MachineEntry::NotSsh`]: Nix would build there,
//! nixmux cannot, and a tool says it skips them.
//!
//! # Precedence of machines-file fields over URL parameters
//!
//! Field 3 and field 8 become the store parameters `ssh-key` and `base64-ssh-public-host-key`.
//! When both the field and the URL's `?ssh-key=` / `?base64-ssh-public-host-key=` are given,
//! **the field wins** in every Nix version: Nix 2.8's `openStore(uri, extraParams)`
//! (src/libstore/store-api.cc) starts from the machine's parameters and `insert`s the URL's,
//! which never overwrites an existing key; Nix >= 2.2x's `Machine::completeStoreReference`
//! assigns the machine's values over the parsed URL's. A field that is unset (`-`) leaves the
//! URL parameter in force.
//!
//! Nix also forces `max-connections=1` and `log-fd=4` on `ssh://` machines. Both only serve
//! Nix's one-process-per-build hook (ssh's stderr is the build log on fd 4); nixmux keeps one
//! multiplexed connection per builder anyway, so [`BuilderSpec::max_connections`] reports the
//! URL's value as written and nothing is forced.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::b64::nix_base64_decode;
use super::error::{ConfigError, Location, MachineProblem, Origin, StoreUrlProblem};
use super::machines_toml::{self, Detected};
use super::store_url::{StoreKind, StoreUrl, effective_store_uri, shell_escape, store_kind};
use crate::{DEFAULT_DAEMON_SOCKET, Protocol, WorkerRoute};

/// Whitespace as Nix's `tokenizeString` and `trim` know it.
const NIX_WS: &[char] = &[' ', '\t', '\n', '\r'];

/// How deep `@file` includes may nest before we call it a loop.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Store parameters Nix knows for SSH stores that have no effect in nixmux.
const IGNORED_PARAMS: &[&str] = &[
    "log-fd",
    "max-connection-age",
    "path-info-cache-size",
    "priority",
    "store",
    "system-features",
    "trusted",
    "want-mass-query",
];

/// The Nix system type of this machine as Nix spells it (`thisSystem`): `x86_64-linux`,
/// `aarch64-linux`, `aarch64-darwin`, ... Field 2 defaults to it.
pub fn local_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        a => a,
    };
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        o => o,
    };
    format!("{arch}-{os}")
}

/// A host key pinned for a builder: the decoded `.pub` line of field 8 (or of the
/// `base64-ssh-public-host-key` parameter).
///
/// Nix writes `<host> <decoded field>` into a temporary known_hosts file and runs ssh with
/// `-oUserKnownHostsFile=<that file>` (src/libstore/ssh.cc), so the decoded text must be an
/// OpenSSH public key line, `algorithm base64-blob [comment]`. Only its first line counts (the
/// further lines of Nix's file would not parse as known_hosts lines and ssh skips them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PinnedHostKey {
    /// Key algorithm, e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// The key blob, base64 as in the `.pub` file.
    pub key_base64: String,
    /// The comment after the blob, if any.
    pub comment: Option<String>,
}

impl PinnedHostKey {
    /// Decodes field 8 of a machines line (base64 of a `.pub` line).
    pub fn from_machines_field(field: &str) -> Result<PinnedHostKey, MachineProblem> {
        Self::from_base64(field, "field 8 (public host key)")
    }

    fn from_base64(field: &str, what: &'static str) -> Result<PinnedHostKey, MachineProblem> {
        let bytes =
            nix_base64_decode(field).map_err(|reason| MachineProblem::BadHostKeyBase64 {
                what,
                value: field.to_owned(),
                reason,
            })?;
        let decoded = String::from_utf8_lossy(&bytes).into_owned();
        Self::from_openssh_line(&decoded).map_err(|reason| MachineProblem::BadHostKeyLine {
            what,
            decoded,
            reason,
        })
    }

    /// Parses an OpenSSH public key line, `ssh-ed25519 AAAA... [comment]`; only the first
    /// non-empty line is read.
    pub fn from_openssh_line(text: &str) -> Result<PinnedHostKey, String> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or_else(|| "it is empty".to_owned())?;
        let mut words = line.split_ascii_whitespace();
        let (Some(algorithm), Some(key_base64)) = (words.next(), words.next()) else {
            return Err("expected `algorithm base64-key [comment]`".to_owned());
        };
        let blob = match nix_base64_decode(key_base64) {
            Ok(b) => b,
            Err(_) if looks_like_algorithm(key_base64) => {
                return Err(format!(
                    "it looks like a known_hosts line (host `{algorithm}` first); field 8 is \
                     base64 of the host's .pub file, e.g. `base64 -w0 \
                     /etc/ssh/ssh_host_ed25519_key.pub`"
                ));
            }
            Err(e) => return Err(format!("the key is not base64: {e}")),
        };
        // The blob starts with the algorithm name as an SSH string (RFC 4253 §6.6).
        let name = blob
            .get(..4)
            .and_then(|l| <[u8; 4]>::try_from(l).ok())
            .map(u32::from_be_bytes)
            .and_then(|n| blob.get(4..4 + usize::try_from(n).ok()?));
        if name != Some(algorithm.as_bytes()) {
            return Err(format!(
                "the key blob does not hold a `{algorithm}` key (it names {:?})",
                name.map(String::from_utf8_lossy)
            ));
        }
        let comment = words.collect::<Vec<_>>().join(" ");
        Ok(PinnedHostKey {
            algorithm: algorithm.to_owned(),
            key_base64: key_base64.to_owned(),
            comment: (!comment.is_empty()).then_some(comment),
        })
    }

    /// `algorithm base64-blob`, the form known_hosts files and `.pub` files use (no comment).
    pub fn openssh_line(&self) -> String {
        format!("{} {}", self.algorithm, self.key_base64)
    }

    /// The decoded key blob (SSH wire format).
    pub fn key_blob(&self) -> Vec<u8> {
        // Validated when parsed.
        nix_base64_decode(&self.key_base64).unwrap_or_default()
    }
}

fn looks_like_algorithm(s: &str) -> bool {
    ["ssh-", "ecdsa-", "sk-", "rsa-"]
        .iter()
        .any(|p| s.starts_with(p))
}

/// One SSH builder: everything a machines line or a store URL says about it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuilderSpec {
    /// Field 1 as written (`nix@host`, `ssh-ng://host?remote-store=...`); for a machine of a
    /// TOML machines file, its table key (`andesite` for `[machines.andesite]`), which Lix
    /// uses as the machine's name too.
    pub name: String,
    /// The store URI Nix uses: `name` with `ssh://` prepended where Nix prepends it. Nix keys
    /// its per-machine slot locks by this string.
    pub uri: String,
    /// `ssh://` → serve protocol, `ssh-ng://` → worker protocol.
    pub protocol: Protocol,
    /// Host as written in the URL (an ssh_config `Host` alias or a real name), decoded.
    pub host: String,
    /// Port from the URL.
    pub port: Option<u16>,
    /// User from the URL.
    pub user: Option<String>,
    /// Field 3, else the `ssh-key` parameter. Passed to ssh as `-i`, as written.
    pub identity: Option<PathBuf>,
    /// Field 8, else the `base64-ssh-public-host-key` parameter.
    pub host_key: Option<PinnedHostKey>,
    /// The `remote-program` words (split at whitespace, as Nix >= 2.2x's `Strings` setting
    /// does); default `nix-store` for `ssh://`, `nix-daemon` for `ssh-ng://`.
    pub remote_program: Vec<String>,
    /// The `remote-store` parameter, if non-empty.
    pub remote_store: Option<String>,
    /// The `compress` parameter (ssh `-C`).
    pub compress: bool,
    /// The `daemon-socket` parameter (nixmux's own; Nix would warn "unknown setting"):
    /// `auto` (default), `no` (always `nix-daemon --stdio`), `yes` (only the daemon's
    /// socket), or an absolute path (only the socket at that path). Worker protocol only.
    pub daemon_socket: DaemonSocketParam,
    /// The `bulk-compression` parameter (nixmux's own): `auto` (default), `zstd` or `no`;
    /// see [`crate::bulk`].
    pub bulk_compression: crate::bulk::BulkCompression,
    /// The `max-connections` parameter as written (at least 1, as Nix clamps it); `None` when
    /// absent. Nix forces 1 on `ssh://` machines; see the module docs for why we do not.
    pub max_connections: Option<u32>,
    /// Field 2: system types, in the order written, duplicates removed.
    pub systems: Vec<String>,
    /// Field 4.
    pub max_jobs: u32,
    /// Field 5 (0 already replaced by 1).
    pub speed_factor: f64,
    /// Field 6.
    pub supported_features: BTreeSet<String>,
    /// Field 7.
    pub mandatory_features: BTreeSet<String>,
    /// Parameters Nix knows but nixmux has no use for (`priority`, `trusted`, ...).
    pub ignored_params: BTreeMap<String, String>,
    /// Parameters Nix does not know either (Nix warns "unknown setting").
    pub unknown_params: BTreeMap<String, String>,
    /// Where the entry was written; `None` for a builder given as a bare store URL.
    pub location: Option<Location>,
}

impl BuilderSpec {
    /// A builder from a store URL alone, with the defaults of a machines line that has only
    /// field 1 (systems = `local_system`, one job, speed factor 1, no features). Accepts what
    /// field 1 accepts: `ssh://...`, `ssh-ng://...`, `user@host`, `host:port`.
    pub fn from_store_url(url: &str, local_system: &str) -> Result<BuilderSpec, ConfigError> {
        let uri = effective_store_uri(url).into_owned();
        if let StoreKind::Other(kind) = store_kind(&uri) {
            return Err(ConfigError::NotSsh {
                uri: url.to_owned(),
                kind,
            });
        }
        let fields = Fields::defaults(local_system);
        build_spec(url, &uri, fields, None).map_err(|problem| ConfigError::Builder {
            uri: url.to_owned(),
            problem,
        })
    }

    /// The command Nix runs on the builder, as one string for an SSH exec request.
    ///
    /// Serve: `<remote-program> --serve --write`; worker: `<remote-program> --stdio`; both
    /// followed by `--store <remote-store>` when `remote-store` is set (Nix 2.8
    /// src/libstore/legacy-ssh-store.cc and ssh-store.cc; the same words in 2.35).
    ///
    /// Quoting follows Nix 2.8, which built this string itself: the `remote-program` words
    /// are inserted verbatim (so they can hold shell syntax, e.g. an environment assignment)
    /// and the remote store is `shellEscape`d (always single-quoted). Nix >= 2.2x hands the
    /// words to ssh as separate arguments, and ssh joins them with single spaces *without*
    /// quoting; for a `remote-store` without shell metacharacters both give the same command,
    /// and with them only the quoted form runs what was meant.
    pub fn remote_command(&self) -> String {
        let mut cmd = self.remote_program.join(" ");
        cmd.push_str(match self.protocol {
            Protocol::Serve => " --serve --write",
            Protocol::Worker => " --stdio",
        });
        if let Some(store) = &self.remote_store {
            cmd.push_str(" --store ");
            cmd.push_str(&shell_escape(store));
        }
        cmd
    }

    /// How `ssh-ng://` sessions reach the builder's Nix, and the daemon socket's path there.
    ///
    /// The `daemon-socket` parameter decides when given. Otherwise ([`WorkerRoute::Auto`]):
    /// a builder with its own `remote-program` is reached by running it (the socket would
    /// bypass it); a `remote-store` of `unix://PATH` or `daemon` names the socket; any other
    /// `remote-store` (a chroot store, another daemon's URL) is reached by exec, which is the
    /// only way to pass `--store`.
    pub fn worker_route(&self) -> (WorkerRoute, String) {
        let store_socket = self.remote_store.as_deref().and_then(|s| {
            let s = s.split('?').next().unwrap_or(s);
            match s.strip_prefix("unix://") {
                Some(p) if p.starts_with('/') => Some(p.to_owned()),
                _ if s == "daemon" => Some(DEFAULT_DAEMON_SOCKET.to_owned()),
                _ => None,
            }
        });
        let default_path = || {
            store_socket
                .clone()
                .unwrap_or_else(|| DEFAULT_DAEMON_SOCKET.to_owned())
        };
        if self.protocol == Protocol::Serve {
            return (WorkerRoute::Exec, default_path());
        }
        match &self.daemon_socket {
            DaemonSocketParam::Never => (WorkerRoute::Exec, default_path()),
            DaemonSocketParam::Only => (WorkerRoute::Socket, default_path()),
            DaemonSocketParam::Path(p) => (WorkerRoute::Socket, p.clone()),
            DaemonSocketParam::Auto => {
                let own_program = self.remote_program != ["nix-daemon"];
                let other_store = self.remote_store.is_some() && store_socket.is_none();
                if own_program || other_store {
                    (WorkerRoute::Exec, default_path())
                } else {
                    (WorkerRoute::Auto, default_path())
                }
            }
        }
    }

    /// Whether this builder may take a derivation for `system` (Nix's `systemSupported`: the
    /// system is listed, or it is `builtin`).
    pub fn supports_system(&self, system: &str) -> bool {
        system == "builtin" || self.systems.iter().any(|s| s == system)
    }

    /// Whether this builder may take a derivation requiring `features` (Nix's `allSupported`
    /// and `mandatoryMet`): every required feature is supported or mandatory, and every
    /// mandatory feature is required.
    pub fn accepts_features<'a>(&self, features: impl IntoIterator<Item = &'a str>) -> bool {
        let required: BTreeSet<&str> = features.into_iter().collect();
        required
            .iter()
            .all(|f| self.supported_features.contains(*f) || self.mandatory_features.contains(*f))
            && self
                .mandatory_features
                .iter()
                .all(|f| required.contains(f.as_str()))
    }
}

/// The `daemon-socket` store-URL parameter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DaemonSocketParam {
    /// Not given, or `auto`.
    #[default]
    Auto,
    /// `no`, `false`, `0`, `never`, `exec`.
    Never,
    /// `yes`, `true`, `1`, `only`, `socket`.
    Only,
    /// An absolute path: only the socket at that path.
    Path(String),
}

/// An entry whose store is not reached over SSH (`local`, `auto`, `daemon`, `unix://`, a
/// path, an HTTP cache, ...). Nix would build there; nixmux skips it.
#[derive(Debug, Clone, PartialEq)]
pub struct NotSshBuilder {
    /// Field 1 as written (a TOML machine's table key).
    pub name: String,
    /// What kind of store it is, for messages ("the local Nix daemon (daemon)", ...).
    pub kind: String,
    /// Where the entry was written.
    pub location: Location,
}

/// One entry of a machines file.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // a few per file; boxing would only complicate matching
pub enum MachineEntry {
    /// An `ssh://` or `ssh-ng://` builder.
    Ssh(BuilderSpec),
    /// Not an SSH builder; reported so a tool can say it skips it.
    NotSsh(NotSshBuilder),
}

/// The parsed `builders` setting or machines file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Machines {
    /// Entries in order (includes expanded in place).
    pub entries: Vec<MachineEntry>,
    /// `@file` includes whose file does not exist (skipped, as Nix skips them), with the
    /// line that named them.
    pub missing_includes: Vec<(Location, PathBuf)>,
}

impl Machines {
    /// The SSH builders, in order.
    pub fn builders(&self) -> impl Iterator<Item = &BuilderSpec> {
        self.entries.iter().filter_map(|e| match e {
            MachineEntry::Ssh(b) => Some(b),
            MachineEntry::NotSsh(_) => None,
        })
    }

    /// The entries that are not SSH builders, in order.
    pub fn not_ssh(&self) -> impl Iterator<Item = &NotSshBuilder> {
        self.entries.iter().filter_map(|e| match e {
            MachineEntry::NotSsh(n) => Some(n),
            MachineEntry::Ssh(_) => None,
        })
    }
}

/// Parses a `builders` setting value (or any machines text): a Lix TOML document, or legacy
/// entries separated by newlines or `;` with `@file` includes and comments (each included
/// file again in either format; see the module docs on detection). `origin` names the text in
/// error messages (use [`Origin::File`] when it is a file's content). `local_system` is the
/// default system type.
pub fn parse_builders(
    text: &str,
    origin: Origin,
    local_system: &str,
) -> Result<Machines, ConfigError> {
    let mut machines = Machines::default();
    let origin = Arc::new(origin);
    let named_toml = machines_toml::origin_named_toml(&origin);
    if let Detected::Toml(table) = machines_toml::detect(text, &origin, named_toml)? {
        machines.entries = machines_toml::parse(text, &table, &origin, local_system)?;
        return Ok(machines);
    }
    let mut raw = Vec::new();
    let mut stack = Vec::new();
    if let Origin::File(p) = &*origin {
        stack.push(fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
    }
    let mut ctx = Expansion {
        local_system,
        stack: &mut stack,
        out: &mut raw,
        missing: &mut machines.missing_includes,
    };
    expand(text, &origin, &mut ctx)?;
    for entry in raw {
        machines.entries.push(match entry {
            Pending::Line(line) => parse_entry(&line, local_system)?,
            Pending::Parsed(entry) => entry,
        });
    }
    Ok(machines)
}

/// Reads and parses a machines file. Unlike an `@file` include, a file named explicitly must
/// exist.
pub fn read_machines_file(path: &Path, local_system: &str) -> Result<Machines, ConfigError> {
    let bytes = fs::read(path).map_err(|source| ConfigError::Read {
        location: None,
        path: path.to_owned(),
        source,
    })?;
    parse_builders(
        &String::from_utf8_lossy(&bytes),
        Origin::File(path.to_owned()),
        local_system,
    )
}

/// One entry before field parsing.
struct RawEntry {
    text: String,
    location: Location,
}

/// An entry of the expanded text: a legacy line still to parse, or a machine of an included
/// TOML file.
#[allow(clippy::large_enum_variant)] // short-lived, a few per file (as `MachineEntry`)
enum Pending {
    Line(RawEntry),
    Parsed(MachineEntry),
}

/// The state of one expansion: where entries and missing includes go, and the files being
/// read (for loops).
struct Expansion<'a> {
    local_system: &'a str,
    stack: &'a mut Vec<PathBuf>,
    out: &'a mut Vec<Pending>,
    missing: &'a mut Vec<(Location, PathBuf)>,
}

/// Nix's `expandBuilderLines` (>= 2.29 comment semantics), with locations.
fn expand(text: &str, origin: &Arc<Origin>, ctx: &mut Expansion<'_>) -> Result<(), ConfigError> {
    for (i, line) in text.split('\n').enumerate() {
        let line = line.split('#').next().unwrap_or_default();
        for entry in line.split(';') {
            let entry = entry.trim_matches(NIX_WS);
            if entry.is_empty() {
                continue;
            }
            let location = Location {
                origin: origin.clone(),
                line: i + 1,
            };
            match entry.strip_prefix('@') {
                Some(path) => include(Path::new(path.trim_matches(NIX_WS)), location, ctx)?,
                None => ctx.out.push(Pending::Line(RawEntry {
                    text: entry.to_owned(),
                    location,
                })),
            }
        }
    }
    Ok(())
}

fn include(path: &Path, location: Location, ctx: &mut Expansion<'_>) -> Result<(), ConfigError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            ctx.missing.push((location, path.to_owned()));
            return Ok(());
        }
        Err(source) => {
            return Err(ConfigError::Read {
                location: Some(location),
                path: path.to_owned(),
                source,
            });
        }
    };
    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    if ctx.stack.contains(&canonical) {
        return Err(ConfigError::IncludeLoop {
            location,
            path: path.to_owned(),
        });
    }
    if ctx.stack.len() > MAX_INCLUDE_DEPTH {
        return Err(ConfigError::IncludeDepth {
            location,
            max: MAX_INCLUDE_DEPTH,
        });
    }
    let text = String::from_utf8_lossy(&bytes);
    let origin = Arc::new(Origin::File(path.to_owned()));
    if let Detected::Toml(table) =
        machines_toml::detect(&text, &origin, machines_toml::named_toml(path))?
    {
        let entries = machines_toml::parse(&text, &table, &origin, ctx.local_system)?;
        ctx.out.extend(entries.into_iter().map(Pending::Parsed));
        return Ok(());
    }
    ctx.stack.push(canonical);
    let result = expand(&text, &origin, ctx);
    ctx.stack.pop();
    result
}

/// Fields 2-8 after validation (or the same values from a TOML machine table).
pub(super) struct Fields {
    pub(super) systems: Vec<String>,
    pub(super) ssh_key: Option<String>,
    pub(super) max_jobs: u32,
    pub(super) speed_factor: f64,
    pub(super) supported: BTreeSet<String>,
    pub(super) mandatory: BTreeSet<String>,
    pub(super) host_key: Option<PinnedHostKey>,
}

impl Fields {
    pub(super) fn defaults(local_system: &str) -> Fields {
        Fields {
            systems: vec![local_system.to_owned()],
            ssh_key: None,
            max_jobs: 1,
            speed_factor: 1.0,
            supported: BTreeSet::new(),
            mandatory: BTreeSet::new(),
            host_key: None,
        }
    }
}

/// Nix's `parseBuilderLine` plus the `Machine` constructor.
fn parse_entry(raw: &RawEntry, local_system: &str) -> Result<MachineEntry, ConfigError> {
    let fail = |problem| ConfigError::Machine {
        location: raw.location.clone(),
        entry: raw.text.clone(),
        problem,
    };
    let tokens: Vec<&str> = raw.text.split(NIX_WS).filter(|t| !t.is_empty()).collect();
    let field = |i: usize| tokens.get(i).copied().filter(|t| *t != "-");
    let Some(name) = field(0) else {
        return Err(fail(MachineProblem::MissingStoreUrl));
    };
    let mut fields = Fields::defaults(local_system);
    if let Some(s) = field(1) {
        fields.systems.clear();
        for sys in s.split(',').filter(|s| !s.is_empty()) {
            if !fields.systems.iter().any(|x| x == sys) {
                fields.systems.push(sys.to_owned());
            }
        }
    }
    fields.ssh_key = field(2).map(str::to_owned);
    if let Some(s) = field(3) {
        fields.max_jobs = s
            .parse()
            .map_err(|_| fail(MachineProblem::BadMaxJobs(s.to_owned())))?;
    }
    if let Some(s) = field(4) {
        fields.speed_factor = parse_speed_factor(s).map_err(fail)?;
    }
    let features = |s: &str| -> BTreeSet<String> {
        s.split(',')
            .filter(|f| !f.is_empty())
            .map(str::to_owned)
            .collect()
    };
    if let Some(s) = field(5) {
        fields.supported = features(s);
    }
    if let Some(s) = field(6) {
        fields.mandatory = features(s);
    }
    let uri = effective_store_uri(name).into_owned();
    let kind = store_kind(&uri);
    if let Some(s) = field(7) {
        // Nix only checks that it decodes; the key line matters for SSH entries only.
        nix_base64_decode(s).map_err(|reason| {
            fail(MachineProblem::BadHostKeyBase64 {
                what: "field 8 (public host key)",
                value: s.to_owned(),
                reason,
            })
        })?;
        if let StoreKind::Ssh(_) = kind {
            fields.host_key = Some(PinnedHostKey::from_machines_field(s).map_err(fail)?);
        }
    }
    match kind {
        StoreKind::Other(kind) => Ok(MachineEntry::NotSsh(NotSshBuilder {
            name: name.to_owned(),
            kind,
            location: raw.location.clone(),
        })),
        StoreKind::Ssh(_) => build_spec(name, &uri, fields, Some(raw.location.clone()))
            .map(MachineEntry::Ssh)
            .map_err(fail),
    }
}

/// Field 5: Nix >= 2.20 parses a float (`string2Float<float>`), replaces 0 by 1 and refuses
/// negative values ("speed factor must be >= 0"). Nix 2.8 took unsigned integers only, so
/// every value it accepts is accepted here with the same meaning. Unlike Nix we also refuse
/// NaN and infinities, which would make the `load / speedFactor` ranking meaningless.
fn parse_speed_factor(s: &str) -> Result<f64, MachineProblem> {
    let v: f64 = s
        .parse()
        .map_err(|_| MachineProblem::BadSpeedFactor(s.to_owned()))?;
    if !v.is_finite() {
        return Err(MachineProblem::BadSpeedFactor(s.to_owned()));
    }
    if v < 0.0 {
        return Err(MachineProblem::NegativeSpeedFactor(s.to_owned()));
    }
    Ok(if v == 0.0 { 1.0 } else { v })
}

/// Combines the URL's parameters with the machine's fields (fields win, see module docs).
pub(super) fn build_spec(
    name: &str,
    uri: &str,
    fields: Fields,
    location: Option<Location>,
) -> Result<BuilderSpec, MachineProblem> {
    let url = StoreUrl::parse(uri).map_err(|e| MachineProblem::StoreUrl(e.problem))?;
    let bad_param = |name: &str, value: &str, reason: &'static str| {
        MachineProblem::StoreUrl(StoreUrlProblem::BadParam {
            name: name.to_owned(),
            value: value.to_owned(),
            reason,
        })
    };
    let mut spec = BuilderSpec {
        name: name.to_owned(),
        uri: uri.to_owned(),
        protocol: url.protocol,
        host: url.host,
        port: url.port,
        user: url.user,
        identity: fields.ssh_key.map(PathBuf::from),
        host_key: fields.host_key,
        remote_program: vec![
            match url.protocol {
                Protocol::Serve => "nix-store",
                Protocol::Worker => "nix-daemon",
            }
            .to_owned(),
        ],
        remote_store: None,
        compress: false,
        daemon_socket: DaemonSocketParam::Auto,
        bulk_compression: crate::bulk::BulkCompression::Auto,
        max_connections: None,
        systems: fields.systems,
        max_jobs: fields.max_jobs,
        speed_factor: fields.speed_factor,
        supported_features: fields.supported,
        mandatory_features: fields.mandatory,
        ignored_params: BTreeMap::new(),
        unknown_params: BTreeMap::new(),
        location,
    };
    for (k, v) in url.params {
        match k.as_str() {
            "ssh-key" => {
                if spec.identity.is_none() && !v.is_empty() {
                    spec.identity = Some(PathBuf::from(v));
                }
            }
            "base64-ssh-public-host-key" => {
                if spec.host_key.is_none() && !v.is_empty() {
                    spec.host_key = Some(PinnedHostKey::from_base64(
                        &v,
                        "base64-ssh-public-host-key",
                    )?);
                }
            }
            "remote-program" => {
                let words: Vec<String> = v
                    .split(NIX_WS)
                    .filter(|w| !w.is_empty())
                    .map(str::to_owned)
                    .collect();
                if words.is_empty() {
                    return Err(bad_param(&k, &v, "must name a program"));
                }
                spec.remote_program = words;
            }
            "remote-store" => spec.remote_store = (!v.is_empty()).then_some(v),
            "compress" => {
                // Nix's BaseSetting<bool>::set.
                spec.compress = match v.as_str() {
                    "true" | "yes" | "1" => true,
                    "false" | "no" | "0" => false,
                    _ => return Err(bad_param(&k, &v, "expected true or false")),
                };
            }
            "daemon-socket" => {
                spec.daemon_socket = match v.as_str() {
                    "" | "auto" => DaemonSocketParam::Auto,
                    "no" | "false" | "0" | "never" | "exec" => DaemonSocketParam::Never,
                    "yes" | "true" | "1" | "only" | "socket" => DaemonSocketParam::Only,
                    p if p.starts_with('/') => DaemonSocketParam::Path(p.to_owned()),
                    _ => {
                        return Err(bad_param(
                            &k,
                            &v,
                            "expected auto, yes, no or an absolute socket path",
                        ));
                    }
                };
            }
            "bulk-compression" => {
                spec.bulk_compression = crate::bulk::BulkCompression::parse(&v)
                    .ok_or_else(|| bad_param(&k, &v, "expected auto, zstd or no"))?;
            }
            "max-connections" => {
                // A Setting<int>; the connection pool uses max(1, value).
                let n: i32 = v
                    .parse()
                    .map_err(|_| bad_param(&k, &v, "expected an integer"))?;
                spec.max_connections = Some(u32::try_from(n.max(1)).unwrap_or(1));
            }
            _ if IGNORED_PARAMS.contains(&k.as_str()) => {
                spec.ignored_params.insert(k, v);
            }
            _ => {
                spec.unknown_params.insert(k, v);
            }
        }
    }
    Ok(spec)
}
