//! Command-line arguments to builder configurations.

use anyhow::Context;
use nixmux::BuilderConfig;
use nixmux::config::{
    BuilderSpec, MachineEntry, Machines, configured_machines, local_system, read_machines_file,
    resolve_endpoint,
};
use nixmux::setup::Overrides;

use crate::BuilderArgs;

/// The builders to work on.
pub(crate) struct Resolved {
    /// Ready to use.
    pub(crate) builders: Vec<BuilderConfig>,
    /// Entries that are not SSH builders, described for the user.
    pub(crate) skipped: Vec<String>,
    /// Where the builders came from, for messages.
    pub(crate) source: String,
}

/// Builder configurations from store URLs, a machines file, or the local Nix's settings.
pub(crate) fn builders(args: &BuilderArgs) -> anyhow::Result<Resolved> {
    let system = local_system();
    let mut specs: Vec<BuilderSpec> = Vec::new();
    let mut skipped = Vec::new();
    let mut add = |m: Machines| {
        for e in m.entries {
            match e {
                MachineEntry::Ssh(s) => specs.push(s),
                MachineEntry::NotSsh(n) => skipped.push(format!(
                    "{} ({}: not an SSH builder, {})",
                    n.name, n.location, n.kind
                )),
            }
        }
    };
    let source = if !args.urls.is_empty() || args.machines.is_some() {
        if let Some(path) = &args.machines {
            add(read_machines_file(path, &system)
                .with_context(|| format!("reading {}", path.display()))?);
        }
        for url in &args.urls {
            specs.push(
                BuilderSpec::from_store_url(url, &system)
                    .with_context(|| format!("store URL {url}"))?,
            );
        }
        "from the command line".to_owned()
    } else {
        add(configured_machines(&system).context("reading the local Nix's `builders` setting")?);
        "the local Nix's `builders` setting is empty".to_owned()
    };
    let overrides = Overrides {
        identities: args.identity.clone(),
        known_hosts: args.known_hosts.clone(),
        connect_timeout: Some(std::time::Duration::from_secs_f64(
            args.connect_timeout.max(0.1),
        )),
        transport: Some(transport_config()),
    };
    let mut builders = Vec::new();
    for spec in &specs {
        let ep = resolve_endpoint(spec, args.ssh_config.as_deref())
            .with_context(|| format!("resolving {} with ssh_config", spec.name))?;
        for w in &ep.warnings {
            tracing::warn!("{}: {w}", spec.name);
        }
        builders.push(
            BuilderConfig::from_spec(spec, &ep, &overrides)
                .with_context(|| format!("configuring {}", spec.name))?,
        );
    }
    Ok(Resolved {
        builders,
        skipped,
        source,
    })
}

/// The transport defaults, plus the memory of accepted keys kept between runs (see
/// [`accepted_keys_file`]).
fn transport_config() -> nixmux::transport::TransportConfig {
    let mut t = nixmux::transport::TransportConfig::default();
    t.accepted_keys_file = accepted_keys_file(|name| std::env::var_os(name));
    t
}

/// Where a run remembers which keys each builder accepted, so that the next run's first
/// connection to it opens its channel with the authentication request (one round trip
/// less; an agent key is also signed at once instead of queried first: one more):
/// `$XDG_STATE_HOME/nixmux/accepted-keys`, else `~/.local/state/nixmux/accepted-keys` (the
/// XDG Base Directory specification's state directory: data that should persist between
/// runs but is not worth backing up). `NIXMUX_NO_STATE=1` turns it off. No private material
/// is stored, and host keys are checked as always (`nixmux::transport::TransportConfig::
/// accepted_keys_file`).
fn accepted_keys_file(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    if var("NIXMUX_NO_STATE").is_some_and(|v| !v.is_empty() && v != "0") {
        return None;
    }
    // The specification says a relative path in an XDG variable is invalid and to be ignored.
    let state = var("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            var("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|home| home.join(".local/state"))
        })?;
    Some(state.join("nixmux/accepted-keys"))
}

#[cfg(test)]
mod tests {
    use super::accepted_keys_file;
    use std::path::PathBuf;

    fn with(vars: &[(&str, &str)]) -> Option<PathBuf> {
        accepted_keys_file(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.into()))
    }

    #[test]
    fn accepted_keys_file_location() {
        assert_eq!(
            with(&[("XDG_STATE_HOME", "/s"), ("HOME", "/h")]),
            Some("/s/nixmux/accepted-keys".into())
        );
        assert_eq!(
            with(&[("XDG_STATE_HOME", "rel"), ("HOME", "/h")]),
            Some("/h/.local/state/nixmux/accepted-keys".into())
        );
        assert_eq!(with(&[("HOME", "")]), None);
        assert_eq!(with(&[]), None);
        assert_eq!(with(&[("HOME", "/h"), ("NIXMUX_NO_STATE", "1")]), None);
        assert_eq!(
            with(&[("HOME", "/h"), ("NIXMUX_NO_STATE", "0")]),
            Some("/h/.local/state/nixmux/accepted-keys".into())
        );
    }
}
