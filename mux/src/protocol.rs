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

/// Where `nix-daemon`'s socket is on a builder that does not say otherwise (Nix's
/// `nix-daemon-socket-file` default, `$NIX_STATE_DIR/daemon-socket/socket`).
pub const DEFAULT_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// How `ssh-ng://` sessions reach the builder's Nix.
///
/// Over the daemon's socket (an SSH `direct-streamlocal@openssh.com` channel to it) no
/// process starts per session and sshd's `MaxSessions` does not apply; over exec each session
/// runs `nix-daemon --stdio`, as Nix itself does. The trust consequences differ: see
/// `docs/architecture.md`, "Reaching the builder's daemon".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WorkerRoute {
    /// The daemon's socket when the builder allows it, else exec; a refusal is remembered
    /// for the builder (and tried again after a while). The default, except that a builder
    /// with its own `remote-program` gets exec (that program is what the user asked for).
    #[default]
    Auto,
    /// Only the daemon's socket: a refusal fails the session.
    Socket,
    /// Always `nix-daemon --stdio`.
    Exec,
}

/// How one session reached the builder's Nix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionPath {
    /// A channel to the daemon's socket.
    DaemonSocket,
    /// A remote command (`nix-daemon --stdio`, `nix-store --serve --write`).
    Exec,
}

impl SessionPath {
    /// Short name for reports: `socket` or `exec`.
    pub fn name(self) -> &'static str {
        match self {
            SessionPath::DaemonSocket => "socket",
            SessionPath::Exec => "exec",
        }
    }
}
