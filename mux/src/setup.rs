//! From configuration (machines file, store URL, ssh_config) to a ready [`BuilderConfig`].

use std::path::PathBuf;
use std::time::Duration;

use nixmux_transport::{Endpoint, HostKeyCheck, HostPublicKey, Identity, TransportConfig};

use crate::builder::{BuilderConfig, MachineInfo};
use crate::config::{BuilderSpec, ResolvedEndpoint, StrictPolicy};
use crate::error::{Error, ErrorKind, Result};
use crate::target::ConnectTarget;

/// Choices the caller makes for every builder (command-line flags, daemon settings). Values
/// in the machines file or store URL win over these; these win over ssh_config.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Identities to offer when the builder's entry names none.
    pub identities: Vec<PathBuf>,
    /// known_hosts files to use instead of ssh_config's / the defaults.
    pub known_hosts: Vec<PathBuf>,
    /// Per-stage connect timeout.
    pub connect_timeout: Option<Duration>,
    /// Base transport settings (window, ciphers, keepalive...).
    pub transport: Option<TransportConfig>,
}

impl BuilderConfig {
    /// Builds a configuration from a parsed builder entry and its resolved endpoint.
    ///
    /// Identities, in the order OpenSSH tries them: the entry's own key (`ssh-key`, machines
    /// field 3) or else `overrides.identities`; then the ssh-agent (unless IdentitiesOnly);
    /// then the identity files ssh_config or OpenSSH's defaults name, those that exist. Host
    /// keys: a key pinned in the entry is authoritative (as Nix does, which writes it alone
    /// into a temporary known_hosts); otherwise known_hosts files under ssh_config's
    /// `StrictHostKeyChecking` (`ask` behaves as `yes`: nothing here can prompt).
    pub fn from_spec(
        spec: &BuilderSpec,
        ep: &ResolvedEndpoint,
        overrides: &Overrides,
    ) -> Result<BuilderConfig> {
        let mut target = target_for(ep, overrides, spec.identity.is_none())?;
        // Jump hosts: the first hop is reached directly, each later hop through the one
        // before it, and the builder through the last.
        let mut jump: Option<Box<ConnectTarget>> = None;
        for hop in &ep.proxy_jump {
            let mut t = target_for(&hop.endpoint, overrides, true)?;
            t.jump = jump.take();
            jump = Some(Box::new(t));
        }
        target.jump = jump;
        let mut cfg = BuilderConfig::new(readable_name(&spec.name), spec.protocol, target);
        cfg.remote_command = spec.remote_command();
        (cfg.worker_route, cfg.daemon_socket) = spec.worker_route();
        cfg.bulk.mode = spec.bulk_compression;
        cfg.machine = MachineInfo {
            systems: spec.systems.clone(),
            max_jobs: spec.max_jobs,
            speed_factor: spec.speed_factor,
            supported_features: spec.supported_features.iter().cloned().collect(),
            mandatory_features: spec.mandatory_features.iter().cloned().collect(),
        };
        Ok(cfg)
    }
}

fn target_for(
    ep: &ResolvedEndpoint,
    overrides: &Overrides,
    use_override_identities: bool,
) -> Result<ConnectTarget> {
    let mut transport = overrides.transport.clone().unwrap_or_default();
    if let Some(t) = overrides.connect_timeout.or(ep.connect_timeout) {
        transport.tcp_connect_timeout = t;
        transport.handshake_timeout = t;
        transport.auth_timeout = t;
        transport.channel_open_timeout = t;
        transport.exec_timeout = t;
    }
    // ssh -C, as Nix passes for `compress=true`; ssh_config `Compression yes` too.
    transport.compression = transport.compression || ep.compress;
    if let Some(i) = ep.keepalive.interval {
        transport.keepalive_interval = Some(i);
        transport.keepalive_max_misses =
            usize::try_from(ep.keepalive.count_max.max(1)).unwrap_or(3);
    }

    let mut identities = Vec::new();
    let explicit: Vec<PathBuf> = if ep.identities_are_defaults && use_override_identities {
        overrides.identities.clone()
    } else {
        Vec::new()
    };
    for p in &explicit {
        identities.push(Identity::key_file(p.clone()));
    }
    if !ep.identities_only && std::env::var_os("SSH_AUTH_SOCK").is_some() {
        identities.push(Identity::agent());
    }
    for p in &ep.identities {
        // OpenSSH silently skips default identity files that do not exist.
        if ep.identities_are_defaults && !p.exists() {
            continue;
        }
        if !explicit.contains(p) {
            identities.push(Identity::key_file(p.clone()));
        }
    }
    if identities.is_empty() {
        return Err(Error::local(
            ErrorKind::Config,
            format!(
                "no SSH identity for {}@{}: no key file exists and no ssh-agent is running",
                ep.user, ep.host
            ),
        )
        .hint(
            "name a key in the machines file (field 3), the store URL (?ssh-key=...), or with -i",
        ));
    }

    let host_keys = if let Some(pin) = &ep.pinned_host_key {
        let key = HostPublicKey::from_openssh(&pin.openssh_line())
            .map_err(|e| Error::local(ErrorKind::Config, format!("pinned host key: {e}")))?;
        HostKeyCheck::pinned([key])
    } else {
        let files = if overrides.known_hosts.is_empty() {
            ep.known_hosts_files.clone()
        } else {
            overrides.known_hosts.clone()
        };
        match ep.strict {
            StrictPolicy::No => {
                tracing::warn!(
                    host = %ep.host,
                    "StrictHostKeyChecking=no: the builder's host key is NOT verified"
                );
                HostKeyCheck::insecure_accept_any()
            }
            StrictPolicy::AcceptNew => {
                let learn = ep
                    .learn_known_hosts_file
                    .clone()
                    .or_else(|| files.first().cloned())
                    .unwrap_or_else(|| PathBuf::from("known_hosts"));
                HostKeyCheck::accept_new(files, learn)
            }
            _ => HostKeyCheck::strict(files),
        }
    };
    Ok(ConnectTarget {
        endpoint: Endpoint::new(ep.host.clone(), ep.port, ep.user.clone()),
        identities,
        host_keys,
        transport,
        jump: None,
        hooks: Default::default(),
    })
}

/// A builder's name in messages, stats and `--builder`: field 1 of its machines line or its
/// store URL, without the query, which may carry a base64 host key hundreds of characters long
/// (`?base64-ssh-public-host-key=...`); the settings in it are applied all the same.
pub fn readable_name(name: &str) -> String {
    name.split('?').next().unwrap_or(name).to_owned()
}

#[cfg(test)]
mod readable_name_tests {
    #[test]
    fn the_query_is_left_out() {
        assert_eq!(
            super::readable_name(
                "ssh-ng://nix@box?base64-ssh-public-host-key=c3NoLWVk&compress=true"
            ),
            "ssh-ng://nix@box"
        );
        assert_eq!(super::readable_name("nix@box"), "nix@box");
    }
}
