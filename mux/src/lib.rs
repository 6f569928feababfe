//! # nixmux: one pooled SSH connection per builder, one API for both Nix protocols
//!
//! A scheduler adds its builders to a [`Pool`] and gets [`Builder`] handles. Every handle
//! offers the same operations whether the builder speaks the serve protocol (`ssh://`,
//! `nix-store --serve --write`) or the worker protocol (`ssh-ng://`, `nix-daemon --stdio`),
//! with the same result types, the same [`LogEvent`]s and the same [`Error`].
//!
//! ## Getting started
//!
//! ```no_run
//! use std::collections::BTreeSet;
//! use nixmux::config::{read_machines_file, resolve_endpoint, local_system};
//! use nixmux::local::LocalStore;
//! use nixmux::ops::BuildOptions;
//! use nixmux::proto::store_path::{StoreDir, StorePath};
//! use nixmux::{BuilderConfig, Overrides, Pool, log_channel};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let machines = read_machines_file("/etc/nix/machines".as_ref(), &local_system())?;
//! let pool = Pool::new();
//! let mut builders = Vec::new();
//! for spec in machines.builders() {
//!     let endpoint = resolve_endpoint(spec, None)?; // ~/.ssh/config, known_hosts, keys
//!     builders.push(pool.add(BuilderConfig::from_spec(spec, &endpoint, &Overrides::default())?));
//! }
//! let local = LocalStore::auto();
//! let drv = StorePath::parse(&StoreDir::default(), "/nix/store/...-hello.drv")?;
//! let (logs, mut log_stream) = log_channel(1024);
//! tokio::spawn(async move { while let Some(ev) = log_stream.recv().await { println!("{ev:?}") } });
//! let outcome = builders[0].build(&local, &drv, &BuildOptions::default(), &logs).await?;
//! if outcome.result.status.is_success() {
//!     let outputs: BTreeSet<_> = outcome.result.built_outputs.values().map(|o| o.path.clone()).collect();
//!     builders[0].fetch_outputs(&local, &outputs, None).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! Every operation takes a warm session from the builder's pool (opening the shared SSH
//! connection on first use), and gives it back only if the operation completed; errors say
//! what failed ([`ErrorKind`]), who is to blame ([`Initiator`]) and whether a retry can help
//! ([`Error::is_retryable`]).
//!
//! ## Layout
//! * [`config`]: machines files, store URLs and ssh_config, resolved into [`BuilderConfig`].
//! * `connections`: one shared SSH connection per host (more only when sshd refuses a
//!   channel), reconnect with backoff, health.
//! * `pool`: warm protocol sessions per builder, fair waiting, poisoning on failure.
//! * [`builder`], [`ops`]: the operations (queries, closure push, build, output fetch).
//! * [`local`]: the local store, over the worker protocol (daemon socket or
//!   `nix-daemon --stdio`).
//! * [`setup`]: from configuration to [`BuilderConfig`]; [`ping`]: the staged check.
//! * [`logs`]: bounded, never-blocking log delivery.
//! * [`error`]: one error type with kind, initiator and retryability.

pub mod builder;
pub mod bulk;
mod ca;
pub mod config;
mod connections;
mod conversation;
mod daemon_socket;
pub mod error;
pub mod graph;
pub mod local;
pub mod logs;
mod nar_pipe;
pub mod ops;
mod options;
pub mod parallel;
pub mod ping;
mod pool;
mod protocol;
mod raw;
mod remote;
mod select;
mod serve_log;
pub mod setup;
pub mod stats;
mod store_files;
mod stream;
pub mod target;

pub use builder::{Builder, BuilderConfig, MachineInfo, Pool};
pub use connections::ConnectionLimits;
pub use error::{Error, ErrorKind, Initiator, Result};
pub use logs::{LogEvent, LogSender, LogStream, log_channel};
pub use ops::Lease;
pub use pool::PoolSettings;
pub use protocol::{DEFAULT_DAEMON_SOCKET, Protocol, RemoteInfo, SessionPath, WorkerRoute};
pub use raw::RawSession;
pub use setup::Overrides;
pub use stats::{BuilderStats, Health, HealthState};
pub use target::{ConnectTarget, StageHooks};

pub use nixmux_proto as proto;
pub use nixmux_session as session;
pub use nixmux_transport as transport;
