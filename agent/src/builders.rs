//! The agent's builders: loaded from a machines file (or the local Nix's `builders`), named
//! for `nixmux connect`, and replaced on reload only where they changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use nixmux::config::{
    BuilderSpec, MachineEntry, Machines, configured_machines, local_system, read_machines_file,
    resolve_endpoint,
};
use nixmux::setup::Overrides;
use nixmux::{Builder, BuilderConfig};

use crate::spares::Spares;
use crate::wire::SessionProtocol;

/// Where the builders come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachinesSource {
    /// A machines file (`/etc/nix/machines` syntax).
    File(PathBuf),
    /// The local Nix's `builders` setting.
    LocalNix,
}

impl std::fmt::Display for MachinesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MachinesSource::File(p) => write!(f, "{}", p.display()),
            MachinesSource::LocalNix => f.write_str("the local Nix's `builders` setting"),
        }
    }
}

/// The name `nixmux connect` uses for a builder line: `[user@]host[:port]` as written.
/// Lines for the same host with both protocols share it (the protocol comes from the flags
/// Nix passes); a second line with the same name and protocol gets `#2`, and so on. Names
/// depend only on the lines, so a machines file generated once stays valid across reloads
/// as long as the lines it was made from are there.
pub fn builder_names(specs: &[BuilderSpec]) -> Vec<String> {
    let mut seen: BTreeMap<(String, SessionProtocol), usize> = BTreeMap::new();
    specs
        .iter()
        .map(|s| {
            let mut base = String::new();
            if let Some(u) = &s.user {
                base.push_str(u);
                base.push('@');
            }
            base.push_str(&s.host);
            if let Some(p) = s.port {
                base.push(':');
                base.push_str(&p.to_string());
            }
            let n = seen
                .entry((base.clone(), SessionProtocol::of(s.protocol)))
                .or_insert(0);
            *n += 1;
            if *n == 1 { base } else { format!("{base}#{n}") }
        })
        .collect()
}

/// Whether `spec` is a line of a machines file `nixmux agent machines` wrote (a loop back
/// to the agent itself).
pub fn is_agent_line(spec: &BuilderSpec) -> bool {
    spec.host == "localhost"
        && spec
            .remote_program
            .windows(2)
            .any(|w| w[0].ends_with("nixmux") && w[1] == "connect")
}

/// The SSH builders of `source`, with what was skipped and why.
pub fn read_specs(source: &MachinesSource) -> Result<(Vec<BuilderSpec>, Vec<String>), String> {
    let system = local_system();
    let machines: Machines = match source {
        MachinesSource::File(p) => read_machines_file(p, &system),
        MachinesSource::LocalNix => configured_machines(&system),
    }
    .map_err(|e| format!("reading {source}: {e}"))?;
    let mut specs = Vec::new();
    let mut skipped = Vec::new();
    for e in machines.entries {
        match e {
            MachineEntry::Ssh(s) if is_agent_line(&s) => skipped.push(format!(
                "{}: a line of the agent's own machines file (give the agent the real builders)",
                s.name
            )),
            MachineEntry::Ssh(s) => specs.push(s),
            MachineEntry::NotSsh(n) => {
                skipped.push(format!("{} ({}: not an SSH builder)", n.name, n.kind))
            }
        }
    }
    Ok((specs, skipped))
}

/// One builder line, ready to serve sessions.
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) protocol: SessionProtocol,
    pub(crate) uri: String,
    /// Everything that defines the builder: a reload keeps the entry when this is equal.
    pub(crate) fingerprint: String,
    pub(crate) builder: Builder,
    pub(crate) spares: Arc<Spares>,
    pub(crate) sessions_active: AtomicU64,
    pub(crate) sessions_total: AtomicU64,
    pub(crate) session_failures: AtomicU64,
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
}

impl Entry {
    /// Tops up the spares within the builder's free build slots (see `Spares`).
    pub(crate) fn refill_spares(&self, connect: bool) {
        let max_jobs = usize::try_from(self.builder.config().machine.max_jobs).unwrap_or(1);
        let active = usize::try_from(
            self.sessions_active
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .unwrap_or(usize::MAX);
        self.spares.refill(
            self.builder.clone(),
            connect,
            max_jobs.max(1).saturating_sub(active),
        );
    }
}

/// A builder line resolved into a configuration.
pub(crate) struct Resolved {
    pub(crate) name: String,
    pub(crate) protocol: SessionProtocol,
    pub(crate) uri: String,
    pub(crate) config: BuilderConfig,
    pub(crate) fingerprint: String,
}

/// Resolves the lines of `source` (ssh_config, keys, known_hosts): blocking file I/O.
pub(crate) fn resolve(
    source: &MachinesSource,
    overrides: &Overrides,
    ssh_config: Option<&Path>,
) -> Result<(Vec<Resolved>, Vec<String>), String> {
    let (specs, mut skipped) = read_specs(source)?;
    let names = builder_names(&specs);
    let mut out = Vec::new();
    for (spec, name) in specs.iter().zip(names) {
        let resolved = resolve_endpoint(spec, ssh_config)
            .map_err(|e| e.to_string())
            .and_then(|ep| {
                BuilderConfig::from_spec(spec, &ep, overrides).map_err(|e| e.to_string())
            });
        match resolved {
            Ok(config) => out.push(Resolved {
                fingerprint: format!("{config:?}"),
                name,
                protocol: SessionProtocol::of(spec.protocol),
                uri: spec.uri.clone(),
                config,
            }),
            Err(e) => skipped.push(format!("{}: {e}", spec.name)),
        }
    }
    Ok((out, skipped))
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ReloadReport {
    pub(crate) added: Vec<String>,
    pub(crate) replaced: Vec<String>,
    pub(crate) removed: Vec<String>,
    pub(crate) unchanged: usize,
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} added {:?}, {} replaced {:?}, {} removed {:?}, {} unchanged",
            self.added.len(),
            self.added,
            self.replaced.len(),
            self.replaced,
            self.removed.len(),
            self.removed,
            self.unchanged
        )
    }
}

/// The key of a builder line: its name and protocol.
pub(crate) type Key = (String, SessionProtocol);

/// Plans a reload: which of `new` to add (absent or changed) and which current keys to
/// drop (gone or changed).
pub(crate) fn diff(
    current: &BTreeMap<Key, Arc<Entry>>,
    new: Vec<Resolved>,
) -> (Vec<Resolved>, Vec<Key>, ReloadReport) {
    let mut report = ReloadReport::default();
    let mut add = Vec::new();
    let mut keep = std::collections::BTreeSet::new();
    for r in new {
        let key = (r.name.clone(), r.protocol);
        match current.get(&key) {
            Some(e) if e.fingerprint == r.fingerprint => {
                report.unchanged += 1;
                keep.insert(key);
            }
            Some(_) => {
                report.replaced.push(label(&key));
                add.push(r);
            }
            None => {
                report.added.push(label(&key));
                add.push(r);
            }
        }
    }
    let replaced: std::collections::BTreeSet<Key> =
        add.iter().map(|r| (r.name.clone(), r.protocol)).collect();
    let mut drop = Vec::new();
    for key in current.keys() {
        if keep.contains(key) {
            continue;
        }
        if !replaced.contains(key) {
            report.removed.push(label(key));
        }
        drop.push(key.clone());
    }
    (add, drop, report)
}

fn label(key: &Key) -> String {
    format!("{} ({})", key.0, key.1.scheme())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> BuilderSpec {
        BuilderSpec::from_store_url(url, "x86_64-linux").expect("url")
    }

    #[test]
    fn names_are_user_host_port_and_unique_per_protocol() {
        let specs = [
            spec("ssh-ng://nix@build1:2222"),
            spec("ssh://nix@build1:2222"),
            spec("ssh-ng://build2"),
            spec("ssh-ng://build2?remote-store=local%3Froot%3D%2Fx"),
        ];
        assert_eq!(
            builder_names(&specs),
            ["nix@build1:2222", "nix@build1:2222", "build2", "build2#2"]
        );
    }

    #[test]
    fn the_agents_own_lines_are_recognised() {
        assert!(is_agent_line(&spec(
            "ssh-ng://localhost?remote-program=/usr/bin/nixmux%20connect%20build1"
        )));
        assert!(!is_agent_line(&spec("ssh-ng://localhost")));
        assert!(!is_agent_line(&spec(
            "ssh-ng://build1?remote-program=nixmux%20connect%20x"
        )));
    }
}
