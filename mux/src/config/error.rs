//! Configuration errors: every one says where (file and line, or which setting) and what.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Where a piece of configuration text came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A file (a machines file, an `@file` include, nix.conf, an ssh_config).
    File(PathBuf),
    /// Text that is not a file of its own, e.g. the `builders` setting given on a command line
    /// or through `NIX_CONFIG`; the string says which.
    Text(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Text(s) => f.write_str(s),
        }
    }
}

/// A line of configuration text (1-based).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// The file or text (shared by all locations in it).
    pub origin: Arc<Origin>,
    /// 1-based line number.
    pub line: usize,
}

impl Location {
    /// Line `line` of file `path`.
    pub fn file(path: impl Into<PathBuf>, line: usize) -> Self {
        Location {
            origin: Arc::new(Origin::File(path.into())),
            line,
        }
    }

    /// Line `line` of the text described by `what`.
    pub fn text(what: impl Into<String>, line: usize) -> Self {
        Location {
            origin: Arc::new(Origin::Text(what.into())),
            line,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.origin {
            Origin::File(p) => write!(f, "{}:{}", p.display(), self.line),
            Origin::Text(s) => write!(f, "{s}, line {}", self.line),
        }
    }
}

/// What is wrong with a store URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreUrlProblem {
    /// The scheme is not `ssh` or `ssh-ng`.
    #[error("scheme `{0}` is not an SSH store (expected ssh:// or ssh-ng://)")]
    NotSsh(String),
    /// No host name.
    #[error("host name must not be empty")]
    EmptyHost,
    /// `user@` with nothing before the `@`.
    #[error("user name must not be empty")]
    EmptyUser,
    /// A host or user name starting with `-` would be taken for an ssh option (Nix refuses it too).
    #[error("{what} `{value}` must not start with '-'")]
    LeadingDash {
        /// "host name" or "user name".
        what: &'static str,
        /// The offending value.
        value: String,
    },
    /// `user:password@host`.
    #[error("passwords are not supported in SSH store URLs (remove `:...` before the `@`)")]
    Password,
    /// More than one unescaped `@`.
    #[error("more than one '@' (write a literal '@' in a user name as %40)")]
    ManyAts,
    /// A character that a URL authority cannot contain.
    #[error("invalid character {0:?} in the host part")]
    BadHostChar(char),
    /// Bad IPv6 literal.
    #[error("invalid IPv6 address `{0}`")]
    BadIpv6(String),
    /// Port not a number in 1..=65535.
    #[error("port `{0}` is invalid (expected 1..65535)")]
    BadPort(String),
    /// Something after the host (`ssh://host/path`).
    #[error("unexpected path `{0}` after the host")]
    UnexpectedPath(String),
    /// A `#fragment`.
    #[error("unexpected fragment `#{0}`")]
    Fragment(String),
    /// A `%` not followed by two hex digits, or an escape that does not decode to UTF-8.
    #[error("invalid percent-encoding in `{0}`")]
    BadPercentEncoding(String),
    /// A store parameter whose value Nix would refuse.
    #[error("parameter `{name}={value}`: {reason}")]
    BadParam {
        /// Parameter name.
        name: String,
        /// Decoded value.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// A store URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid store URL `{url}`: {problem}")]
pub struct StoreUrlError {
    /// The URL as given.
    pub url: String,
    /// What is wrong.
    pub problem: StoreUrlProblem,
}

/// What is wrong with one machine specification (one entry of a machines file).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MachineProblem {
    /// Field 1 is `-`.
    #[error("store URL was not found in the first field")]
    MissingStoreUrl,
    /// Field 4 is not an unsigned integer.
    #[error("field 4 (max jobs) `{0}` is not an unsigned integer")]
    BadMaxJobs(String),
    /// Field 5 is not a number.
    #[error("field 5 (speed factor) `{0}` is not a number")]
    BadSpeedFactor(String),
    /// Field 5 is negative (Nix >= 2.20: "speed factor must be >= 0").
    #[error("field 5 (speed factor) `{0}` must be >= 0")]
    NegativeSpeedFactor(String),
    /// Field 8 (or `base64-ssh-public-host-key`) is not base64.
    #[error("{what} `{value}` is not valid base64: {reason}")]
    BadHostKeyBase64 {
        /// "field 8 (public host key)" or the parameter name.
        what: &'static str,
        /// The value as written.
        value: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// Field 8 decodes, but not to an OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
    #[error(
        "{what} does not decode to an OpenSSH public key line: {reason} (decoded: {decoded:?})"
    )]
    BadHostKeyLine {
        /// "field 8 (public host key)" or the parameter name.
        what: &'static str,
        /// The decoded text.
        decoded: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store URL of an SSH entry is malformed.
    #[error("{0}")]
    StoreUrl(StoreUrlProblem),
}

/// What is wrong in a TOML machines file (Lix >= 2.95's format; see [`super::machines`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TomlMachinesProblem {
    /// The text is not TOML (and looks too much like TOML to be read as the legacy format).
    #[error("TOML syntax error at column {column}: {message}")]
    Syntax {
        /// 1-based column (in characters).
        column: usize,
        /// The TOML parser's message.
        message: String,
    },
    /// A key Lix does not know (Lix refuses unknown keys too).
    #[error("unknown key (expected one of: {allowed})")]
    UnknownKey {
        /// The keys allowed at that place.
        allowed: &'static str,
    },
    /// A value of the wrong TOML type.
    #[error("expected {expected}, found {found}{hint}")]
    WrongType {
        /// What Lix wants there.
        expected: &'static str,
        /// The TOML type found (`string`, `integer`, `array`, ...).
        found: &'static str,
        /// A hint for a common mistake, starting with "; ", or empty.
        hint: &'static str,
    },
    /// A non-empty document without a `machines` table.
    #[error("no `machines` table (each machine is a table `[machines.NAME]`)")]
    MissingMachines,
    /// A machine without `uri`, or with an empty one.
    #[error("`uri` must be present and non-empty")]
    MissingUri,
    /// A `version` other than 1.
    #[error("version {0} is not supported (Lix 2.95 reads version 1 only)")]
    UnsupportedVersion(String),
    /// `jobs` outside 0..=u32::MAX.
    #[error("must be an integer from 0 to 4294967295, not {0}")]
    BadJobs(String),
    /// `speed-factor` negative, NaN or infinite.
    #[error("must be a finite number >= 0, not {0}")]
    BadSpeedFactor(String),
    /// `ssh-public-host-key` is not an OpenSSH public key line.
    #[error(
        "{value:?} is not an OpenSSH public key line \
         (`ssh-ed25519 AAAA... [comment]`, the host's .pub file): {reason}"
    )]
    BadHostKey {
        /// The value as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Both `enable` and its alias `enabled`.
    #[error("both `enable` and `enabled` are set")]
    EnableTwice,
    /// The `uri` of an SSH machine, or one of its parameters, is malformed.
    #[error("{0}")]
    Machine(MachineProblem),
}

/// Any configuration error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A store URL given on its own (not in a machines file) is malformed.
    #[error(transparent)]
    StoreUrl(#[from] StoreUrlError),
    /// One entry of a machines file (or `builders` setting) is malformed.
    #[error("{location}: bad machine specification `{entry}`: {problem}")]
    Machine {
        /// Where the entry is.
        location: Location,
        /// The entry as written (after comment removal).
        entry: String,
        /// What is wrong.
        problem: MachineProblem,
    },
    /// A TOML machines file (Lix >= 2.95's format) is malformed. `key` is the dotted key path
    /// of the offending value (`machines.andesite.jobs`), when there is one.
    #[error("{location}: TOML machines file (Lix format): {}{problem}", key_prefix(.key))]
    MachinesToml {
        /// The line of the offending key or value.
        location: Location,
        /// The key path.
        key: Option<String>,
        /// What is wrong.
        problem: TomlMachinesProblem,
    },
    /// A builder given as a store URL alone (not in a machines file) is unusable.
    #[error("builder `{uri}`: {problem}")]
    Builder {
        /// The URI as given.
        uri: String,
        /// What is wrong.
        problem: MachineProblem,
    },
    /// A store URL was expected to name an SSH builder but names another kind of store.
    #[error("`{uri}` is not an SSH builder ({kind})")]
    NotSsh {
        /// The URI as given.
        uri: String,
        /// What kind of store it is.
        kind: String,
    },
    /// A file could not be read.
    #[error("{}cannot read {}: {source}", at_prefix(.location), .path.display())]
    Read {
        /// The line that asked for the file (an `@file`, `include` or `Include`), if any.
        location: Option<Location>,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// An include (`@file`, `include`, `Include`) includes a file that is already being read.
    #[error("{location}: include loop: {} is already being read", .path.display())]
    IncludeLoop {
        /// The including line.
        location: Location,
        /// The file included again.
        path: PathBuf,
    },
    /// Includes nested too deeply.
    #[error("{location}: includes nested more than {max} deep")]
    IncludeDepth {
        /// The including line.
        location: Location,
        /// The limit.
        max: usize,
    },
    /// A malformed nix.conf line (Nix itself refuses to start with it).
    #[error("{location}: {problem}")]
    NixConf {
        /// Where.
        location: Location,
        /// What is wrong.
        problem: String,
    },
    /// A malformed ssh_config line (OpenSSH refuses it too).
    #[error("{location}: {problem}")]
    SshConfig {
        /// Where.
        location: Location,
        /// What is wrong.
        problem: String,
    },
    /// ssh command-line options (e.g. `NIX_SSHOPTS`) that cannot be parsed.
    #[error("ssh options `{args}`: {problem}")]
    SshOptions {
        /// The options as given.
        args: String,
        /// What is wrong.
        problem: String,
    },
    /// The options that apply to a host cannot be turned into an endpoint (a ProxyCommand, a
    /// ProxyJump loop, an unknown `%` token...).
    #[error("resolving SSH options for `{host}`: {problem}")]
    Resolve {
        /// The host name being resolved.
        host: String,
        /// What went wrong; names the ssh_config line where there is one.
        problem: String,
    },
    /// Neither the password database nor the environment says who we are.
    #[error("cannot determine the local user: {0}")]
    LocalUser(String),
}

fn key_prefix(key: &Option<String>) -> String {
    match key {
        Some(k) => format!("`{k}`: "),
        None => String::new(),
    }
}

fn at_prefix(location: &Option<Location>) -> String {
    match location {
        Some(l) => format!("{l}: "),
        None => String::new(),
    }
}
