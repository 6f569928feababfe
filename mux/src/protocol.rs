//! What every layer of the crate says about the two Nix protocols: which one a builder
//! speaks, and what a session's handshake told about the builder. A leaf: it imports
//! nothing from the crate.

use nixmux_proto::ProtocolVersion;

/// Which protocol a builder speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `ssh://`: `nix-store --serve --write`.
    Serve,
    /// `ssh-ng://`: `nix-daemon --stdio`.
    Worker,
}

impl Protocol {
    /// The URL scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Serve => "ssh",
            Protocol::Worker => "ssh-ng",
        }
    }
}

/// What a session learned about the builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteInfo {
    /// The protocol.
    pub protocol: Protocol,
    /// Negotiated version.
    pub version: ProtocolVersion,
    /// The builder's Nix version, when the protocol tells (worker 1.33+).
    pub nix_version: Option<String>,
    /// Trust, when the protocol tells (worker 1.35+); `None` is unknown.
    pub trusted: Option<bool>,
}
