//! Test support shared by the fake-peer test binaries. Not every binary uses every helper.
#![allow(dead_code, unreachable_pub)]

/// The fake Nix peers live in `nixmux-testkit`, shared with the in-process SSH server that
/// serves them to the transport and pool tests.
pub use nixmux_testkit::fake;
