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
        transport: None,
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
