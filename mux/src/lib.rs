//! # nixmux: one pooled SSH connection per builder, one API for both Nix protocols
//!
//! A scheduler adds its builders to a [`Pool`] and gets [`Builder`] handles. Every handle
//! offers the same operations whether the builder speaks the serve protocol (`ssh://`,
//! `nix-store --serve --write`) or the worker protocol (`ssh-ng://`, `nix-daemon --stdio`),
//! with the same result types, the same [`LogEvent`]s and the same [`Error`].
//!
//! ## Layout
//! * [`config`]: machines files, store URLs and ssh_config, resolved into [`BuilderConfig`].
//! * `connections`: one shared SSH connection per host (more only when sshd refuses a
//!   channel), reconnect with backoff, health.
//! * `pool`: warm protocol sessions per builder, fair waiting, poisoning on failure.
//! * [`builder`]: the operations.
//! * [`logs`]: bounded, never-blocking log delivery.
//! * [`error`]: one error type with kind, initiator and retryability.

pub mod builder;
pub mod config;
mod connections;
pub mod error;
pub mod local;
pub mod logs;
pub mod ops;
pub mod ping;
mod pool;
mod remote;
pub mod setup;
pub mod stats;
pub mod target;

pub use builder::{Builder, BuilderConfig, MachineInfo, Pool, RemoteInfo};
pub use connections::ConnectionLimits;
pub use error::{Error, ErrorKind, Initiator, Result};
pub use logs::{LogEvent, LogSender, LogStream, log_channel};
pub use pool::PoolSettings;
pub use setup::Overrides;
pub use remote::Protocol;
pub use stats::{BuilderStats, Health, HealthState};
pub use target::ConnectTarget;

pub use nixmux_proto as proto;
pub use nixmux_session as session;
pub use nixmux_transport as transport;
