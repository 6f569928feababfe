//! The first exchange of both Nix protocols, which does not depend on the client: the
//! client's magic number, then the server's magic number and protocol version. The server
//! answers the magic before it reads anything else (Nix's `nix-store.cc`, `opServe`, and
//! `daemon.cc`, `processConnection`; the same in newer Nix and in Lix), so a spare session
//! can do it ahead of time. The agent then answers a client's magic itself with the
//! server's recorded answer, which is byte for byte what the server would send: the session
//! saves a round trip to the builder, and the client still negotiates its version with the
//! real server.
//!
//! The worker protocol has a second client message that needs a round trip before the
//! session is ready: the client's version and the obsolete affinity and reserve words, which
//! the daemon answers with its Nix version, trust byte and `STDERR_LAST` (Nix's
//! `remote-store.cc`, `RemoteStore::initConnection`, and `daemon.cc`, `processConnection`).
//! A given Nix client sends the same bytes every time, so the agent learns them from one
//! session ([`worker_hello_end`] finds where they end) and sends them to later spares right
//! behind the magic. A session then checks that its client sent exactly those bytes: if so,
//! the daemon's answer is already on its way; if not, the spare is set aside and the session
//! starts on a fresh one. Either way the daemon sees the very bytes the client sent.

use std::time::Duration;

use nixmux::RawSession;
use nixmux::proto::version::ProtocolVersion;
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

/// Where the worker client's second message ends, given the server's answer and what the
/// client sent after its magic so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HelloEnd {
    /// The client has not sent enough to tell.
    NeedMore,
    /// The message is the first `n` bytes.
    At(usize),
    /// A version whose handshake has a round trip inside this message (the feature
    /// exchange of 1.38) or that the daemon reads differently from the client: not learned.
    Unsupported,
}

/// The worker client's second message: its version, then, at a negotiated 1.14 or later,
/// the affinity word (followed by a CPU number when non-zero), then, at 1.11 or later, the
/// reserve-space word; the client then waits for the daemon. From 1.38 the client waits
/// for the daemon's features after its own instead (Nix's `worker-protocol-connection.cc`),
/// so that range is not learned; nor is anything below 1.14, where Nix 2.8's client and
/// daemon gate these words on different versions.
pub(crate) fn worker_hello_end(server_answer: &Answer, after_magic: &[u8]) -> HelloEnd {
    let word = |at: usize| -> Option<u64> {
        let b = after_magic.get(at..at + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    };
    let server_word = u64::from_le_bytes(server_answer[8..].try_into().unwrap_or([0; 8]));
    let Some(client_word) = word(0) else {
        return HelloEnd::NeedMore;
    };
    let (Some(server), Some(client)) = (
        ProtocolVersion::from_wire(server_word),
        ProtocolVersion::from_wire(client_word),
    ) else {
        return HelloEnd::Unsupported;
    };
    if server.major != 1 || client.major != 1 {
        return HelloEnd::Unsupported;
    }
    let v = client.negotiate(server);
    if !v.at_least(1, 14) || v.at_least(1, 38) {
        return HelloEnd::Unsupported;
    }
    let Some(affinity) = word(8) else {
        return HelloEnd::NeedMore;
    };
    let end = if affinity == 0 { 24 } else { 32 };
    if after_magic.len() < end {
        HelloEnd::NeedMore
    } else {
        HelloEnd::At(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(minor: u64) -> Answer {
        let mut a = [0u8; 16];
        a[..8].copy_from_slice(&worker::MAGIC_2.to_le_bytes());
        a[8..].copy_from_slice(&(0x100 | minor).to_le_bytes());
        a
    }

    fn words(ws: &[u64]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn nix_2_8_hello_is_version_affinity_reserve() {
        let hello = words(&[0x122, 0, 0]);
        for n in 0..hello.len() {
            assert_eq!(
                worker_hello_end(&answer(34), &hello[..n]),
                HelloEnd::NeedMore
            );
        }
        assert_eq!(worker_hello_end(&answer(34), &hello), HelloEnd::At(24));
        // What follows (the first request) is not part of it.
        let mut more = hello.clone();
        more.extend(words(&[31, 0]));
        assert_eq!(worker_hello_end(&answer(34), &more), HelloEnd::At(24));
    }

    #[test]
    fn a_cpu_number_follows_a_non_zero_affinity() {
        let hello = words(&[0x122, 1, 3, 0]);
        assert_eq!(
            worker_hello_end(&answer(34), &hello[..24]),
            HelloEnd::NeedMore
        );
        assert_eq!(worker_hello_end(&answer(34), &hello), HelloEnd::At(32));
    }

    #[test]
    fn versions_with_other_shapes_are_not_learned() {
        // A 1.38 client and daemon exchange features first.
        assert_eq!(
            worker_hello_end(&answer(38), &words(&[0x126])),
            HelloEnd::Unsupported
        );
        // A 1.38 client with a 1.34 daemon negotiates 1.34: learned.
        assert_eq!(
            worker_hello_end(&answer(34), &words(&[0x126, 0, 0])),
            HelloEnd::At(24)
        );
        assert_eq!(
            worker_hello_end(&answer(34), &words(&[0x10d, 0])),
            HelloEnd::Unsupported
        );
        assert_eq!(
            worker_hello_end(&answer(34), &words(&[0x222, 0, 0])),
            HelloEnd::Unsupported
        );
    }
}
