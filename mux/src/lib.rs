//! # nixmux: one pooled SSH connection per builder, one API for both Nix protocols
//!
//! Being written.

pub mod config;
