//! Which builders the local Nix is configured with: the `builders` setting.
//!
//! Nix 2.8 (`loadConfFile` in src/libstore/globals.cc, `applyConfig` in src/libutil/config.cc)
//! builds its settings like this, later sources overriding earlier ones:
//!
//! 1. the default `@$NIX_CONF_DIR/machines` (`NIX_CONF_DIR` defaults to `/etc/nix`), replaced
//!    by `@a @b` when the old `NIX_REMOTE_SYSTEMS=a:b` is set;
//! 2. `$NIX_CONF_DIR/nix.conf`;
//! 3. the user files: `NIX_USER_CONF_FILES` (colon-separated) if set, else
//!    `$XDG_CONFIG_HOME/nix/nix.conf` (default `~/.config`) and `$XDG_CONFIG_DIRS/nix/nix.conf`
//!    (default `/etc/xdg`), applied in *reverse* order so the first one wins;
//! 4. the `NIX_CONFIG` environment variable, as the text of one more nix.conf.
//!
//! A missing or unreadable file is skipped. In each file a line is cut at `#`, split into
//! whitespace-separated words, and is either empty, `include PATH` / `!include PATH` (relative
//! to the including file's directory; a missing `include` is an error, a missing `!include`
//! is not), or `name = value...` (the value's words joined by single spaces). Anything else
//! is an error, as it is for Nix. `builders` is a plain string setting: a later assignment
//! replaces an earlier one and `extra-builders` does not exist.
//!
//! Command-line `--builders` / `--option builders` cannot be seen from here, and with a
//! multi-user install the daemon's own nix.conf is what the daemon uses; this is what
//! `nix show-config` would print for the calling user.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{ConfigError, Location, Origin};
use super::machines::{Machines, parse_builders};

/// How deep `include` may nest.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Where Nix looks for its configuration: the environment's answer, or anything a test sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixConfSources {
    /// `$NIX_CONF_DIR`, default `/etc/nix`.
    pub conf_dir: PathBuf,
    /// The user configuration files in priority order (the first wins).
    pub user_conf_files: Vec<PathBuf>,
    /// `$NIX_CONFIG`.
    pub nix_config: Option<String>,
    /// `$NIX_REMOTE_SYSTEMS` (colon-separated machines files).
    pub remote_systems: Option<String>,
}

impl NixConfSources {
    /// The sources Nix 2.8 uses given this process's environment.
    pub fn from_env() -> NixConfSources {
        let var = |k: &str| std::env::var(k).ok();
        let home = var("HOME").unwrap_or_default();
        let user_conf_files = match var("NIX_USER_CONF_FILES") {
            Some(files) => files
                .split(':')
                .filter(|f| !f.is_empty())
                .map(PathBuf::from)
                .collect(),
            None => {
                let config_home =
                    var("XDG_CONFIG_HOME").unwrap_or_else(|| format!("{home}/.config"));
                let config_dirs = var("XDG_CONFIG_DIRS").unwrap_or_else(|| "/etc/xdg".to_owned());
                std::iter::once(config_home.as_str())
                    .chain(config_dirs.split(':').filter(|d| !d.is_empty()))
                    .map(|d| Path::new(d).join("nix/nix.conf"))
                    .collect()
            }
        };
        NixConfSources {
            conf_dir: var("NIX_CONF_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/etc/nix")),
            user_conf_files,
            nix_config: var("NIX_CONFIG"),
            remote_systems: var("NIX_REMOTE_SYSTEMS"),
        }
    }
}

/// Where the effective `builders` value was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildersOrigin {
    /// Nobody set it: `@<conf_dir>/machines`.
    Default,
    /// `NIX_REMOTE_SYSTEMS`.
    RemoteSystemsEnv,
    /// A `builders = ...` line (in a file, or in `NIX_CONFIG`).
    Line(Location),
}

/// The effective value of the `builders` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildersSetting {
    /// The value, e.g. `@/etc/nix/machines` or `ssh://a x86_64-linux ; ssh://b`.
    pub value: String,
    /// Where it came from.
    pub origin: BuildersOrigin,
}

impl BuildersSetting {
    /// Describes the text for error messages in parsed entries.
    fn text_origin(&self) -> Origin {
        Origin::Text(match &self.origin {
            BuildersOrigin::Default => "the default `builders` setting".to_owned(),
            BuildersOrigin::RemoteSystemsEnv => "`builders` from NIX_REMOTE_SYSTEMS".to_owned(),
            BuildersOrigin::Line(l) => format!("`builders` set at {l}"),
        })
    }

    /// Parses the value (expanding `@file` includes). `local_system` is field 2's default.
    pub fn machines(&self, local_system: &str) -> Result<Machines, ConfigError> {
        parse_builders(&self.value, self.text_origin(), local_system)
    }
}

/// Finds the `builders` setting the local Nix would use, reading the files `sources` names.
pub fn builders_setting(sources: &NixConfSources) -> Result<BuildersSetting, ConfigError> {
    let mut setting = BuildersSetting {
        value: format!("@{}", sources.conf_dir.join("machines").display()),
        origin: BuildersOrigin::Default,
    };
    if let Some(rs) = &sources.remote_systems {
        setting = BuildersSetting {
            value: rs
                .split(':')
                .filter(|p| !p.is_empty())
                .map(|p| format!("@{p}"))
                .collect::<Vec<_>>()
                .join(" "),
            origin: BuildersOrigin::RemoteSystemsEnv,
        };
    }
    apply_file(&sources.conf_dir.join("nix.conf"), &mut setting, 0)?;
    for f in sources.user_conf_files.iter().rev() {
        apply_file(f, &mut setting, 0)?;
    }
    if let Some(text) = &sources.nix_config {
        apply_text(
            text,
            &Arc::new(Origin::Text("NIX_CONFIG".to_owned())),
            // Nix: relative to dirOf("NIX_CONFIG"), i.e. the current directory.
            Path::new(""),
            &mut setting,
            0,
        )?;
    }
    Ok(setting)
}

/// The machines the local Nix is configured with: [`builders_setting`] from the environment,
/// parsed. `local_system` is field 2's default (see [`super::local_system`]).
pub fn configured_machines(local_system: &str) -> Result<Machines, ConfigError> {
    builders_setting(&NixConfSources::from_env())?.machines(local_system)
}

/// `applyConfigFile`: a file that cannot be read is skipped.
fn apply_file(path: &Path, setting: &mut BuildersSetting, depth: usize) -> Result<(), ConfigError> {
    let Ok(bytes) = fs::read(path) else {
        return Ok(());
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    apply_text(
        &String::from_utf8_lossy(&bytes),
        &Arc::new(Origin::File(path.to_owned())),
        dir,
        setting,
        depth,
    )
}

/// `applyConfig`.
fn apply_text(
    text: &str,
    origin: &Arc<Origin>,
    dir: &Path,
    setting: &mut BuildersSetting,
    depth: usize,
) -> Result<(), ConfigError> {
    for (i, line) in text.split('\n').enumerate() {
        let location = Location {
            origin: origin.clone(),
            line: i + 1,
        };
        let line = line.split('#').next().unwrap_or_default();
        let words: Vec<&str> = line
            .split([' ', '\t', '\n', '\r'])
            .filter(|w| !w.is_empty())
            .collect();
        let illegal = || ConfigError::NixConf {
            location: location.clone(),
            problem: format!("illegal configuration line `{}`", line.trim()),
        };
        match words.as_slice() {
            [] => {}
            [kw @ ("include" | "!include"), path] => {
                let p = dir.join(path);
                match fs::metadata(&p) {
                    Ok(_) => {
                        if depth >= MAX_INCLUDE_DEPTH {
                            return Err(ConfigError::IncludeDepth {
                                location,
                                max: MAX_INCLUDE_DEPTH,
                            });
                        }
                        apply_file(&p, setting, depth + 1)?;
                    }
                    Err(e) if *kw == "include" && e.kind() == io::ErrorKind::NotFound => {
                        return Err(ConfigError::NixConf {
                            location,
                            problem: format!("included file {} not found", p.display()),
                        });
                    }
                    Err(_) => {}
                }
            }
            ["include" | "!include", ..] => return Err(illegal()),
            [name, "=", value @ ..] => {
                if *name == "builders" {
                    *setting = BuildersSetting {
                        value: value.join(" "),
                        origin: BuildersOrigin::Line(location),
                    };
                }
            }
            _ => return Err(illegal()),
        }
    }
    Ok(())
}
