//! A session's first request, sent with its handshake.
//!
//! On a new session the first operation otherwise waits for the handshake's answer, then
//! sends its request and waits again: one round trip more than needed, a whole 50–100 ms on
//! a long link. A [`Lead`] goes out as early as the protocol allows, and its answer comes
//! back with (or right behind) the handshake's:
//!
//! * serve: in the opening itself, with the hello. `nix-store --serve` reads the command
//!   right after the client's version (`opServe` in src/nix-store/nix-store.cc), and
//!   `QueryValidPaths` is encoded the same at every serve version we accept (2.4–2.7).
//! * worker: in the write that follows the daemon's version (its features at 1.38, the rest
//!   of the handshake, `SetOptions`): the version is known by then, so the request is
//!   encoded for the version actually spoken.
//!
//! The operation that asks the same thing first takes the answer; any other operation first
//! reads and drops it, so a lead never changes what a caller sees.
//!
//! Only small requests lead ([`MAX_LEAD_BYTES`]): the opening goes out with the SSH exec
//! request (or right behind a channel's confirmation) under a timeout meant for the server's
//! answer, which must not come to measure how long our upload takes on a slow link; and a
//! large request gains little from one round trip less. A larger one is sent by its
//! operation as usual.

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use nixmux_proto::ProtocolVersion;
use nixmux_proto::store_path::{StoreDir, StorePath};
use nixmux_proto::{serve, worker};

/// Largest encoded request that goes with a handshake (about 200 store paths).
pub(crate) const MAX_LEAD_BYTES: usize = 16 << 10;

/// A request sent with the handshake (given to [`crate::ServeSession::opening`] or
/// [`crate::WorkerSession::opening`]). Only requests whose encoding does not depend
/// on anything the handshake has yet to tell: the serve version, the worker features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lead {
    /// `QueryValidPaths` (serve: without `lock`).
    QueryValidPaths {
        /// The paths asked about.
        paths: BTreeSet<StorePath>,
        /// Let the builder substitute missing ones first (worker: honoured from 1.27).
        substitute: bool,
    },
}

impl Lead {
    pub(crate) fn worker_request(&self) -> worker::Request {
        match self {
            Lead::QueryValidPaths { paths, substitute } => worker::Request::QueryValidPaths {
                paths: paths.clone(),
                substitute: *substitute,
            },
        }
    }

    /// The worker request encoded for `neg`, if the version has it and it is small enough.
    pub(crate) fn worker_bytes(&self, dir: &StoreDir, neg: &worker::Negotiated) -> Option<Bytes> {
        let req = self.worker_request();
        neg.check_request(&req).ok()?;
        let mut buf = BytesMut::new();
        req.write(&mut buf, dir, neg);
        (buf.len() <= MAX_LEAD_BYTES).then(|| buf.freeze())
    }

    /// The serve request encoded for `version`, if it is small enough.
    pub(crate) fn serve_bytes(&self, dir: &StoreDir, version: ProtocolVersion) -> Option<Bytes> {
        let mut buf = BytesMut::new();
        self.serve_request().write(&mut buf, dir, version);
        (buf.len() <= MAX_LEAD_BYTES).then(|| buf.freeze())
    }

    pub(crate) fn serve_request(&self) -> serve::Request {
        match self {
            Lead::QueryValidPaths { paths, substitute } => serve::Request::QueryValidPaths {
                lock: false,
                substitute: *substitute,
                paths: paths.clone(),
            },
        }
    }
}

/// The first bytes of a handshake, sent ahead by the caller (with the SSH exec request, or
/// right behind a socket channel's confirmation: see [`crate::WorkerSession::opening`],
/// [`crate::ServeSession::opening`]), and the [`Lead`] if one was given: among these bytes
/// (serve), or for the handshake to send once the daemon's version is known (worker).
#[derive(Debug, Clone)]
pub struct Opening {
    pub(crate) bytes: Bytes,
    pub(crate) lead: Option<Lead>,
}

impl Opening {
    pub(crate) fn new(bytes: Bytes, lead: Option<Lead>) -> Self {
        Opening { bytes, lead }
    }

    /// The bytes to send.
    pub fn bytes(&self) -> Bytes {
        self.bytes.clone()
    }
}
