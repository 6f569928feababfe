//! # nixmux-benches: nixmux measured against what users run today, in one run
//!
//! Workloads ([`workloads::ALL`]), each run against nixmux and its baselines on the same
//! builders in the same run: OpenSSH spawned per session the way Nix does it, OpenSSH
//! ControlMaster clients, and Nix's own `nix copy`, `nix store ping` and `nix-build
//! --builders`. The [`runner`] warms up, then interleaves the sides (A B C, B C A, ...) so a
//! noisy shared machine treats them alike; [`stats`] keeps latencies in HdrHistograms and
//! measures CPU time and peak RSS of this process. [`relay`] emulates a WAN link (RTT and
//! rate) in-process. [`report`] holds the serde types that are the JSON schema of
//! `nixmux bench --json`, and [`render`] turns a report into a table and SVG charts.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use nixmux_benches::{runner::Quiet, workloads};
//! let report = workloads::run(
//!     workloads::Options {
//!         targets: nixmux_benches::env::Targets::Embedded { builders: 1, max_sessions: None },
//!         workloads: vec!["cold-session".into()],
//!         repeat: Some(3),
//!         quick: true,
//!         wan: None,
//!     },
//!     &Quiet,
//! )
//! .await?;
//! println!("{}", nixmux_benches::render::table(&report));
//! # Ok(()) }
//! ```

pub mod agent_sides;
pub mod env;
pub mod graph;
pub mod peers;
pub use nixmux_rig::relay;
pub mod render;
pub mod report;
pub mod runner;
pub mod sides;
pub mod soak;
pub mod stats;
pub mod workloads;

pub use report::Report;
