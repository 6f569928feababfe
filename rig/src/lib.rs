//! Real peers for nixmux's tests, README demo and benchmarks.
//!
//! A [`Rig`] runs N Nix builders on 127.0.0.1, each a real OpenSSH `sshd` (Debian's
//! openssh-server) started inside its own mount namespace where a private directory is
//! bind-mounted over `/nix`. Every SSH session inherits that namespace, so `nix-store --serve`
//! and `nix-daemon --stdio` on a builder see only the builder's store, and copies between the
//! client and a builder really transfer data. Nothing touches the host's `/nix`, `/etc/ssh` or
//! `~/.ssh`.
//!
//! [`RigConfig::ssh_server`] and [`RigConfig::nix`] swap in a second SSH server (Dropbear)
//! and a second Nix (Debian trixie's 2.26, chrooted; `scripts/setup-peers`) for interop tests.
//!
//! ```no_run
//! use nixmux_rig::{Protocol, Rig, RigConfig};
//!
//! let rig = Rig::start(RigConfig::with_builders(2))?;
//! let b = rig.builder(0);
//! println!("{} at {}", b.name(), b.store_url(Protocol::Worker));
//! let out = rig.ssh(0, "nix-store --version").output().expect("ssh runs");
//! assert!(out.status.success());
//! # Ok::<(), nixmux_rig::RigError>(())
//! ```
//!
//! # Layout of a rig directory
//!
//! ```text
//! <rig>/id_ed25519, id_ed25519.pub   client key (no passphrase), authorised on every builder
//! <rig>/authorized_keys              shared by all builders' sshd
//! <rig>/known_hosts                  `[127.0.0.1]:PORT ssh-ed25519 ...` and `builderN ssh-ed25519 ...`
//! <rig>/machines                     ssh:// and ssh-ng://root@127.0.0.1:PORT lines (nixmux syntax)
//! <rig>/machines-ssh-config          the same with root@builderN, for Nix 2.8 + NIX_SSHOPTS=-F
//! <rig>/ssh_config                   Host builderN entries for the real OpenSSH client
//! <rig>/rig.json                     pids, ports, namespaces (see Rig::keep / Rig::stop_dir)
//! <rig>/client/                      a PrivateStore for the test's client side
//! <rig>/builderN/sshd_config, ssh_host_ed25519_key{,.pub}, sshd.log
//! <rig>/builderN/store/{nix,etc/nix.conf,home}   the builder's PrivateStore
//! ```
//!
//! Processes are always found through `/proc/<pid>/ns/mnt` and `/proc/<pid>/root/nix`,
//! never by name: other engineers' rigs run the same programs on the same machine.
//!
//! Everything here needs root (mount namespaces, sshd as root) and blocks; call it from
//! `spawn_blocking` in async tests.

mod builder;
mod daemon;
mod dropbear;
mod error;
mod install;
mod peers;
mod procs;
pub mod relay;
mod rig;
mod sshd;
mod state;
mod store;
mod trixie;
mod untrusted;
mod util;

pub use builder::{Builder, Protocol};
pub use dropbear::dropbear_log_patterns;
pub use error::{Result, RigError};
pub use install::{ensure_peers_installed, missing_programs};
pub use peers::{NixPeer, SshServer, trixie_root};
pub use procs::ProcInfo;
pub use rig::{Rig, RigConfig};
pub use sshd::log_patterns;
pub use state::{BuilderRecord, RigState};
pub use store::PrivateStore;
