//! The first exchange of both Nix protocols, which does not depend on the client: the
//! client's magic number, then the server's magic number and protocol version. The server
//! answers the magic before it reads anything else (Nix's `nix-store.cc`, `opServe`, and
//! `daemon.cc`, `processConnection`; the same in newer Nix and in Lix), so a spare session
//! can do it ahead of time. The agent then answers a client's magic itself with the
//! server's recorded answer, which is byte for byte what the server would send: the session
//! saves a round trip to the builder, and the client still negotiates its version with the
//! real server.

use std::time::Duration;

use nixmux::RawSession;
use nixmux::proto::{serve, worker};
use tokio::io::AsyncReadExt;

use crate::wire::SessionProtocol;

/// The server's answer: magic and version, two 64-bit words.
pub(crate) type Answer = [u8; 16];

/// The client's magic, as it appears on the wire.
pub(crate) fn client_magic(p: SessionProtocol) -> [u8; 8] {
    match p {
        SessionProtocol::Serve => serve::MAGIC_1,
        SessionProtocol::Worker => worker::MAGIC_1,
    }
    .to_le_bytes()
}

fn server_magic(p: SessionProtocol) -> [u8; 8] {
    match p {
        SessionProtocol::Serve => serve::MAGIC_2,
        SessionProtocol::Worker => worker::MAGIC_2,
    }
    .to_le_bytes()
}

/// Reads the server's answer to the client's magic, which went out as the session's first
/// input ([`client_magic`]), within `limit` (the remote Nix has to start first).
pub(crate) async fn answer(
    raw: &mut RawSession,
    protocol: SessionProtocol,
    limit: Duration,
) -> Result<Answer, String> {
    let mut answer = [0u8; 16];
    let io = raw.stdout.read_exact(&mut answer);
    match tokio::time::timeout(limit, io).await {
        Ok(Ok(_)) if answer[..8] == server_magic(protocol) => Ok(answer),
        Ok(Ok(_)) => Err(format!(
            "the remote program answered {:02x?} instead of the protocol's magic number",
            &answer[..8]
        )),
        Ok(Err(e)) => Err(format!("greeting the remote program: {e}")),
        Err(_) => Err(format!(
            "the remote program did not answer within {limit:?}"
        )),
    }
}
