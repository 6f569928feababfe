//! # nixmux-proto: the Nix remote-store wire protocols, without I/O
//!
//! This crate encodes requests into byte buffers and decodes replies from byte buffers. It
//! never reads a socket, a file or the clock, and it depends on no async runtime: the drivers in
//! `nixmux-session` own all I/O. That keeps every decoder deterministic, fuzzable and usable on
//! either side of a connection (client today, a local proxy later).
//!
//! ## Contract of every decoder
//!
//! A decoder is handed the bytes received so far and returns one of:
//! * a value and the number of bytes it consumed;
//! * "need more bytes" (with a lower bound on how many), never an error for a short read;
//! * a [`ProtoError`]: the stream is corrupt and the session must be closed.
//!
//! Every length prefix is checked against [`Limits`] before anything is allocated.
//!
//! ## Layout
//! * [`wire`]: words, booleans, padded strings, collections.
//! * [`limits`], [`version`], [`error`]: shared vocabulary.
//! * [`hash`], [`store_path`]: nix32/base16 hashes and validated store paths.
//! * [`nar`]: a streaming NAR parser that finds the end of an archive and hashes it on the fly.
//! * [`derivation`]: `.drv` (ATerm) parsing and the `BasicDerivation` sent to builders.
//! * [`ca`]: content-addressed derivations: hashes modulo, realisation ids, resolution.
//! * [`path_info`], [`build_result`], [`derived_path`]: values both protocols carry.
//! * [`serve`] and [`worker`]: the two protocols' handshakes, requests and replies, client
//!   and server side.

pub mod build_result;
pub mod ca;
pub mod derivation;
pub mod derived_path;
pub mod error;
pub mod hash;
pub mod limits;
pub mod log;
pub mod nar;
pub mod path_info;
pub mod serve;
pub mod store_path;
pub mod version;
pub mod wire;
pub mod worker;

pub use error::{Incompatible, Malformed, Misbehaved, ProtoError};
pub use limits::Limits;
pub use version::ProtocolVersion;
