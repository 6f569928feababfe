//! Builder configuration: Nix machines files and store URLs, and OpenSSH's ssh_config.
//!
//! Pure parsing. The only I/O is reading the files the configuration names (machines files
//! and their `@file` includes, nix.conf and its includes, ssh_config and its `Include`s) and,
//! for [`LocalEnv::current`], `/etc/passwd` and `/proc`.
//!
//! # Pipeline
//!
//! 1. [`parse_builders`] / [`read_machines_file`] / [`configured_machines`] (or
//!    [`BuilderSpec::from_store_url`] for one URL) give [`BuilderSpec`]s: what Nix knows about
//!    a builder (protocol, host as written, user, port, key, pinned host key, remote command,
//!    systems, jobs, speed, features). Entries that are not SSH stores come back as
//!    [`NotSshBuilder`] so tools can say they skip them.
//! 2. [`SshConfig::resolve`] (or [`resolve_endpoint`]) merges a spec with ssh_config into a
//!    [`ResolvedEndpoint`]: address, port, user, identities, known_hosts files, host-key policy,
//!    ProxyJump hops, timeouts. Explicit machines-file / URL values win over ssh_config.
//!
//! Nothing here depends on the transport crate; the caller maps [`ResolvedEndpoint`] onto it.
//!
//! The rules, and the Nix and OpenSSH sources they come from, are documented on each module:
//! [`store_url`] (URL syntax, percent-decoding, shell escaping), [`machines`] (machines-file
//! syntax, legacy and Lix's TOML, defaults, field-over-parameter precedence), [`nix_conf`]
//! (where `builders` comes from), [`ssh_config`] (OpenSSH semantics), [`command_line`]
//! (`NIX_SSHOPTS`) and [`resolve`] (how they combine).

mod b64;
pub mod command_line;
pub mod error;
pub mod local_env;
pub mod machines;
mod machines_toml;
pub mod nix_conf;
pub mod resolve;
pub mod ssh_config;
pub mod store_url;

pub use command_line::SshCommandLine;
pub use error::{
    ConfigError, Location, MachineProblem, Origin, StoreUrlError, StoreUrlProblem,
    TomlMachinesProblem,
};
pub use local_env::LocalEnv;
pub use machines::{
    BuilderSpec, DaemonSocketParam, MachineEntry, Machines, NotSshBuilder, PinnedHostKey,
    local_system, parse_builders, read_machines_file,
};
pub use nix_conf::{
    BuildersOrigin, BuildersSetting, NixConfSources, builders_setting, configured_machines,
};
pub use resolve::{JumpHost, Keepalive, ResolvedEndpoint, resolve_endpoint, resolve_endpoint_with};
pub use ssh_config::{
    ConfigKind, HostOptions, JumpSpec, Located, ProxySetting, SshConfig, StrictPolicy,
};
pub use store_url::{StoreKind, StoreUrl, effective_store_uri, shell_escape, store_kind};
