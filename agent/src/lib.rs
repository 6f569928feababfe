//! # nixmux-agent: pooled connections for an unmodified Nix or Lix
//!
//! Nix and Lix start one `ssh` per remote build (the build hook, `nix copy`, the daemon).
//! The agent gives them nixmux's pooled connections without a patch:
//!
//! * `nixmux agent` ([`server`]) keeps one nixmux `Pool` for the builders of a machines file
//!   and listens on a Unix socket;
//! * `nixmux agent machines` ([`machines`]) writes a machines file whose lines point Nix at
//!   `localhost` with `remote-program=nixmux connect NAME`: for `localhost`, Nix runs the
//!   remote program itself instead of `ssh`;
//! * `nixmux connect NAME --stdio` (or `--serve --write`) ([`client`]) is that program: it
//!   hands its stdin, stdout and stderr to the agent, which splices them onto a channel of
//!   the builder's pooled connection running `nix-daemon --stdio` (or `nix-store --serve
//!   --write`). Nix speaks its own protocol end to end; the agent moves bytes.
//!
//! [`wire`] is what the client and the agent say to each other; [`status`] is what
//! `nixmux agent status` and `--metrics` show.

pub mod builders;
pub mod client;
mod greeting;
pub mod machines;
pub mod server;
mod spares;
pub mod status;
pub mod wire;

pub use builders::MachinesSource;
pub use server::{AgentConfig, AgentError, run};
