//! nixmux-transport: an embedded SSH client for build machines, built on russh. It opens
//! one authenticated connection per host and hands out byte streams for remote commands. It
//! knows nothing about Nix.
//!
//! # Getting started
//!
//! ```no_run
//! use nixmux_transport::{connect, Endpoint, HostKeyCheck, Identity, NoopObserver, TransportConfig};
//! use tokio::io::AsyncReadExt;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let conn = connect(
//!     &Endpoint::new("builder1", 22, "nix"),
//!     &[Identity::key_file("/etc/nix/id_builder")],
//!     &HostKeyCheck::strict(["/etc/ssh/ssh_known_hosts".into()]),
//!     &TransportConfig::default(),
//!     NoopObserver,
//! )
//! .await?;
//! let mut ch = conn.exec("nix-store --version").await?;
//! let mut out = String::new();
//! ch.stdout().read_to_string(&mut out).await?;
//! println!("{out} ({})", ch.exit().await?);
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! **Host keys.** The server's key is checked inside the key exchange, before authentication
//! and before any channel exists, against OpenSSH known_hosts files (plain, `[host]:port`,
//! patterns, hashed entries, `@revoked`) and/or keys pinned in a Nix machines file. The
//! default policy is Strict; AcceptNew learns unknown hosts but still refuses a changed key;
//! accepting anything needs the explicitly named [`HostKeyCheck::insecure_accept_any`].
//! A refusal says what the server offered, what was expected where (file and line), and the
//! exact known_hosts line that would accept the key. See [`host_key`].
//!
//! **Round trips.** A new connection costs the key exchange (two round trips: the server's
//! KEXINIT, then its key-exchange reply) and one for authentication with an accepted key
//! file: the `ssh-userauth` service request and the signed public-key request go out together
//! with our NEWKEYS, without the query OpenSSH's client makes first
//! ([`TransportConfig::fast_auth`]; a small patch to russh, `vendor/README.md`). Key files
//! are read and decrypted while the key exchange is on the wire. Agent keys are queried first
//! unless the endpoint accepted that key before in this process.
//!
//! **Draining.** russh gives each channel a bounded message queue filled by the connection's
//! single session task, and refills the SSH window when data *arrives*, not when it is read.
//! One unread channel therefore stalls every channel of its connection. Here every channel
//! has a task that reads its queue promptly whatever the application does: stdout goes to a
//! per-channel buffer (in memory up to [`TransportConfig::stdout_memory_limit`], then to an
//! unlinked temporary file), stderr to a bounded tail plus an optional log queue that drops
//! what does not fit and reports it in place ([`StderrEvent::Dropped`]). A slow or absent
//! reader costs memory or disk for *its* channel, never progress of others.
//! The spill file is written and read back by a per-channel worker on tokio's blocking pool,
//! in order, so no file I/O runs on the async worker threads; the drain task waits for it
//! only when more than 4 MiB of writes are queued (a disk slower than the network), and a
//! reader whose next bytes are in the file waits for a read-back of up to 1 MiB.
//!
//! Why spill to disk rather than keep everything in memory: the only real flow control
//! would be to stop reading, which is exactly the stall above; so buffering is unbounded by
//! construction, bounded only by what the remote command sends. For `nix-store --serve`
//! that is a requested NAR, which can be many GiB when a consumer is stuck. A file keeps the
//! process's memory bounded; set [`StdoutSpill::Disabled`] to keep it in memory (counted in
//! [`ConnectionStats::stdout_buffered_bytes`]).
//!
//! **Closing.** A dropped russh `Channel` sends nothing, and sshd keeps its session, and a
//! `MaxSessions` slot, until the connection ends. Here, dropping an [`ExecChannel`] (and
//! every part taken from it) makes its drain task end the channel: SIGTERM to the command
//! (an SSH `signal` request; see [`ExecOptions::terminate_on_drop`]) and EOF on its stdin,
//! then it waits up to [`TransportConfig::close_grace`] for the server to close the channel,
//! which sshd does once the command has exited; russh's CLOSE reply then goes out before
//! any later channel open, so when [`ConnectionStats::channels_open`] goes down (or
//! [`ExecStatus::closed_signal`] fires) the next open usually finds the slot free. Not
//! always: sshd frees the session only after handling its input, so an open arriving right
//! behind our CLOSE reply can still be refused at `MaxSessions` (seen: 1 to 10 of 18
//! replacement opens at `MaxSessions 2` in nixmux's pool tests); retry such a refusal after
//! a few milliseconds rather than take it for the limit. After the grace
//! it sends SIGKILL and closes the channel itself; a command still running then gets EOF
//! and SIGPIPE from sshd and its slot frees a moment later. sshd refuses `signal` requests
//! for **root** logins ("session signalling requires privilege separation"), so there a
//! command that ignores stdin EOF and never writes keeps its slot until it finishes;
//! commands that stop on EOF (`nix-store --serve`, `nix-daemon --stdio`) are unaffected.
//!
//! **Ordering between stdout and stderr.** They travel as separate streams, so a reply read
//! on stdout says nothing about whether the stderr written before it has arrived.
//! [`ExecStatus::barrier`] settles it: a channel request the server answers only after
//! everything it sent before (RFC 4254 §5.4), marked in the log queue by
//! [`StderrEvent::Barrier`].
//!
//! **Classification.** `russh::Error` never leaves this crate. Every failure is a
//! [`TransportError`] with a [`Stage`], an [`ErrorKind`] and
//! [`is_retryable`](TransportError::is_retryable). A connection the server drops before the
//! key exchange (sshd `MaxStartups` shedding a burst, a TCP wrapper) is
//! [`TransportError::ClosedAtStartup`], for a retry with backoff
//! ([`is_startup_drop`](TransportError::is_startup_drop)). When a connection dies, its real
//! cause (keepalive timeout, reset, DISCONNECT from the server) is captured once from
//! russh's session task and given to every waiter ([`SshConnection::closed`]) and every
//! channel.
//!
//! **Timeouts.** Resolve, TCP connect, handshake, authentication, channel open and exec each
//! have their own timeout; an established connection is watched by keepalives, which bound
//! everything that waits on the remote side ([`ExecStatus::exit`], [`ExecStatus::barrier`],
//! stdout reads, stdin writes waiting for window): a dead or frozen peer ends them with
//! [`TransportError::Disconnected`] within `keepalive_interval * (keepalive_max_misses + 1)`.
//! A live peer that is merely slow (a long build, a command not reading stdin) is not a
//! timeout at this layer.
//!
//! # Known limits (russh 0.65.1)
//!
//! * A rekey does not re-check the host key (russh calls the check only for the first key
//!   exchange). The rekey runs inside the authenticated encrypted channel, so a third party
//!   cannot inject one.
//! * While russh waits for the server to answer a rekey it started (every 1 GiB in either
//!   direction), it accepts at most 2 × `window_size` of channel data in flight, summed
//!   over all channels, and drops the connection beyond that. With the 16 MiB default that
//!   is 32 MiB; many channels each streaming at full speed over a high bandwidth-delay link
//!   could exceed it (tested: four channels at full speed on loopback are fine).
//! * A channel open that times out may still be confirmed later; russh does not say which
//!   channel it was, so it cannot be closed and holds a session slot until the connection
//!   ends. A timed-out open usually means a dead connection anyway.
//! * sshd leaves Nagle's algorithm on for non-interactive sessions, so two small packets
//!   in a row from it stall until we ACK the first; Linux delays that ACK by up to 40 ms.
//!   It happens right after authentication (the first channel took 45 ms instead of 1 ms).
//!   [`connect`] therefore sets TCP_QUICKACK after every read; [`connect_over`] has no socket
//!   to do that on, so tunnelled connections may still see it.
//!
//! # Layout
//!
//! * [`config`]: [`Endpoint`], [`Identity`], [`TransportConfig`], [`ExecOptions`]
//! * [`host_key`]: policy and known_hosts matching
//! * [`connect`], [`connect_over`], [`SshConnection`]
//! * [`ExecChannel`] and its parts, [`TcpipStream`]
//! * [`TransportError`] and friends
//! * [`ConnectObserver`]: stage events with timings

#![warn(missing_docs, missing_debug_implementations)]

pub mod config;
pub mod host_key;

mod accepted_file;
mod auth;
mod connection;
mod error;
mod exec;
mod handler;
mod key_repair;
mod observer;
mod shared;
mod stream;

pub use config::{
    Endpoint, ExecOptions, FirstChannel, Identity, SendAhead, StdoutSpill, TransportConfig,
};
pub use connection::{ConnectionStats, SshConnection, connect, connect_over};
pub use error::{ChannelOpenRefusal, DisconnectCause, ErrorKind, Stage, TransportError};
pub use exec::{
    ChannelStats, ChannelStdin, ChannelStdout, ExecChannel, ExecStatus, ExitStatus, StderrEvent,
    StderrLog, TcpipStream,
};
pub use host_key::{
    HostKeyCheck, HostKeyPolicy, HostKeyProblem, HostKeyReport, HostKeySource, HostPublicKey,
    InsecureMarker, KeyLocation,
};
pub use observer::{
    ChannelObserver, ConnectEvent, ConnectEventKind, ConnectObserver, NoopObserver,
};
