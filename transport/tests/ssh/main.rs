//! Integration tests of nixmux-transport against a real OpenSSH sshd on loopback.
//!
//! One test binary (modules below) to keep link time down. Every test starts its own sshd
//! in a temp dir (see `support`), so tests run in parallel and clean up on failure.

mod support;

mod accepted_file;
mod bulk;
mod channels;
mod connect;
mod host_keys;
mod liveness;
mod measure;
mod rig;
mod round_trips;
mod send_ahead;
mod startup;
mod stderr_log;
