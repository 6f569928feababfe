//! nixmux-testkit: in-process peers for tests that need neither root nor real Nix/OpenSSH.
//!
//! * [`fake`]: the server side of the serve and worker protocols over an in-memory pipe,
//!   with fault knobs (used by `nixmux-session`'s tests directly).
//! * [`server`]: a russh SSH server on `127.0.0.1:0` with a generated host key that
//!   authenticates one client key, serves the fake Nix peers on `nix-store --serve --write`
//!   and `nix-daemon --stdio`, runs scripted commands, and misbehaves on request (channel
//!   opens never answered, zero or huge windows, endless or out-of-order output, rekey
//!   storms).
//!
//!   What russh's server API cannot express is not here yet: malformed channel requests
//!   (an `exit-status` of the wrong length, unknown requests), window adjustments whose
//!   sum overflows `u32` (russh's server keeps exact accounts; only ~4 GiB top-ups are
//!   possible), data after CLOSE (russh drops it), and a different host key at a rekey
//!   (russh's server signs every exchange with the first configured key of the negotiated
//!   type, and the negotiation repeats the first one). Those need an SSH server written
//!   below russh.
//! * [`tcp`]: byte-level hostility: a trickling identification (slowloris), a proxy that
//!   cuts the server's stream in the middle of a packet.
//! * [`keys`]: host and client keys, key files (optionally passphrase-encrypted).
//! * [`logcap`]: every log line at TRACE (ours and russh's) into a searchable buffer.

pub mod fake;
pub mod keys;
pub mod logcap;
pub mod server;
pub mod tcp;
