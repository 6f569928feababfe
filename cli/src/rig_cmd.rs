//! `nixmux rig`: local builders for demos, tests and benchmarks (see the nixmux-rig crate).

use std::path::PathBuf;

use anyhow::Context;
use nixmux_rig::{Rig, RigConfig};

/// Starts `builders` builders in `dir` (created if needed) and leaves them running; with
/// `nix_daemon`, each runs a nix-daemon (a multi-user builder: ssh-ng sessions use its
/// socket).
pub(crate) fn up(
    dir: PathBuf,
    builders: usize,
    max_sessions: u32,
    nix_daemon: bool,
) -> anyhow::Result<()> {
    nixmux_rig::ensure_peers_installed().context("installing nix-bin and openssh-server")?;
    let config = RigConfig {
        max_sessions,
        nix_daemon,
        ..RigConfig::with_builders(builders)
    };
    let rig = Rig::start_in(&dir, config).context("starting the rig")?;
    let machines = rig.machines();
    let known_hosts = rig.known_hosts();
    let key = rig.client_key();
    let ssh_config = rig.ssh_config();
    let ports: Vec<u16> = rig.builders().iter().map(|b| b.port()).collect();
    let dir = rig.keep();
    println!("rig running in {}", dir.display());
    println!(
        "  builders on 127.0.0.1 ports {ports:?}, each with its own /nix store{}",
        if nix_daemon { " and nix-daemon" } else { "" }
    );
    println!("  machines file: {}", machines.display());
    println!("  client key:    {}", key.display());
    println!("  known_hosts:   {}", known_hosts.display());
    println!("  ssh_config:    {}", ssh_config.display());
    println!("try:  nixmux ping --machines {}", machines.display());
    println!("stop: nixmux rig down {}", dir.display());
    Ok(())
}

/// Stops a rig started with [`up`] and removes its directory.
pub(crate) fn down(dir: PathBuf) -> anyhow::Result<()> {
    Rig::stop_dir(&dir).with_context(|| format!("stopping the rig in {}", dir.display()))?;
    println!("rig in {} stopped and removed", dir.display());
    Ok(())
}
