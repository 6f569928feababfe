//! What `nixmux connect` and the agent say to each other over the Unix socket. No I/O here:
//! encoders write into buffers, decoders answer "a value", "need more" or "corrupt", with
//! every length bounded.
//!
//! The conversation:
//! 1. The client sends one [`Hello`]: a JSON object on one line (at most [`MAX_HELLO`] bytes).
//! 2. For a session, the client then sends its stdin as raw bytes, and half-closes the
//!    socket at its end of input. The agent sends [`Frame`]s: the remote program's stdout and
//!    stderr as they come, and finally its exit code. An [`Frame::Error`] says, for a person,
//!    why the agent could not serve the session.
//! 3. For a status request, the agent answers with one [`Frame::Status`] (JSON).
//!
//! A frame is a kind byte, a little-endian `u32` length and that many bytes of payload (at
//! most [`MAX_PAYLOAD`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Version of this conversation; a client and an agent of different versions refuse each
/// other with a clear error rather than misread each other.
pub const VERSION: u32 = 1;
/// Longest hello line, newline included.
pub const MAX_HELLO: usize = 4096;
/// Largest frame payload.
pub const MAX_PAYLOAD: usize = 1 << 20;
const HEADER: usize = 5;

/// Which Nix protocol the session speaks (from the flags Nix passes to its remote program).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionProtocol {
    /// `--serve --write`: `nix-store --serve`, for `ssh://` builders.
    Serve,
    /// `--stdio`: `nix-daemon --stdio`, for `ssh-ng://` builders.
    Worker,
}

impl SessionProtocol {
    /// The protocol of builder lines with this scheme.
    pub fn of(p: nixmux::Protocol) -> Self {
        match p {
            nixmux::Protocol::Serve => SessionProtocol::Serve,
            nixmux::Protocol::Worker => SessionProtocol::Worker,
        }
    }

    /// The store URL scheme of its builder lines: `ssh` or `ssh-ng`.
    pub fn scheme(self) -> &'static str {
        match self {
            SessionProtocol::Serve => nixmux::Protocol::Serve,
            SessionProtocol::Worker => nixmux::Protocol::Worker,
        }
        .scheme()
    }

    /// The protocol's name: `serve` or `worker`.
    pub fn name(self) -> &'static str {
        match self {
            SessionProtocol::Serve => "serve",
            SessionProtocol::Worker => "worker",
        }
    }
}

/// What a client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    /// A session with the remote program of `builder`.
    Session {
        /// The builder's name, as `nixmux agent machines` wrote it.
        builder: String,
        /// The protocol Nix is about to speak.
        protocol: SessionProtocol,
    },
    /// The agent's status (builders, health, sessions, counters).
    Status,
}

/// The first line a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`VERSION`].
    pub version: u32,
    /// What it wants.
    #[serde(flatten)]
    pub request: Request,
}

/// One message from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes of the remote program's stdout.
    Stdout(Bytes),
    /// Bytes of its stderr.
    Stderr(Bytes),
    /// It ended: the exit code to end with.
    Exit(i32),
    /// The agent cannot serve this (unknown builder, refused uid, builder unreachable).
    Error(String),
    /// The status report, JSON.
    Status(Bytes),
}

/// A violation of the conversation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The hello line is longer than [`MAX_HELLO`].
    #[error("the hello line is longer than {MAX_HELLO} bytes")]
    HelloTooLong,
    /// The hello is not what this version understands.
    #[error("unreadable hello: {0}")]
    BadHello(String),
    /// The status report is not what this version understands.
    #[error("unreadable status report: {0}")]
    BadStatus(String),
    /// The peer speaks another version.
    #[error(
        "the other side speaks version {theirs}, this one {VERSION}: use the same nixmux for the agent and `nixmux connect`"
    )]
    Version {
        /// Their version.
        theirs: u32,
    },
    /// A frame of an unknown kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame longer than [`MAX_PAYLOAD`].
    #[error("a frame of {0} bytes is over the {MAX_PAYLOAD} byte limit")]
    TooLong(u64),
    /// A frame whose payload does not fit its kind.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}

impl Hello {
    /// The hello for `request`.
    pub fn new(request: Request) -> Self {
        Hello {
            version: VERSION,
            request,
        }
    }

    /// Appends the hello line to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        // Serialising these types cannot fail (no maps with non-string keys, no floats).
        let json = serde_json::to_vec(self).unwrap_or_default();
        out.put_slice(&json);
        out.put_u8(b'\n');
    }

    /// Takes a hello line off the front of `buf`: `Ok(None)` until the newline arrived.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Hello>, WireError> {
        let Some(end) = buf.iter().position(|&b| b == b'\n') else {
            return if buf.len() >= MAX_HELLO {
                Err(WireError::HelloTooLong)
            } else {
                Ok(None)
            };
        };
        if end + 1 > MAX_HELLO {
            return Err(WireError::HelloTooLong);
        }
        let line = buf.split_to(end + 1);
        // The version first, so that a newer client gets "version" rather than a parse error.
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let v: VersionOnly =
            serde_json::from_slice(&line[..end]).map_err(|e| WireError::BadHello(e.to_string()))?;
        if v.version != VERSION {
            return Err(WireError::Version { theirs: v.version });
        }
        serde_json::from_slice(&line[..end])
            .map(Some)
            .map_err(|e| WireError::BadHello(e.to_string()))
    }
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Stdout(_) => 1,
            Frame::Stderr(_) => 2,
            Frame::Exit(_) => 3,
            Frame::Error(_) => 4,
            Frame::Status(_) => 5,
        }
    }

    /// Appends the frame to `out`. Payloads longer than [`MAX_PAYLOAD`] must be split by the
    /// caller ([`Frame::encode_data`] does it for stdout and stderr).
    pub fn encode(&self, out: &mut BytesMut) {
        let payload: &[u8] = match self {
            Frame::Stdout(b) | Frame::Stderr(b) | Frame::Status(b) => b,
            Frame::Error(s) => s.as_bytes(),
            Frame::Exit(code) => &code.to_le_bytes(),
        };
        out.reserve(HEADER + payload.len());
        out.put_u8(self.kind());
        out.put_u32_le(u32::try_from(payload.len()).unwrap_or(u32::MAX));
        out.put_slice(payload);
    }

    /// Appends `data` as stdout (`stderr: false`) or stderr frames of at most
    /// [`MAX_PAYLOAD`] bytes each.
    pub fn encode_data(data: &[u8], stderr: bool, out: &mut BytesMut) {
        for chunk in data.chunks(MAX_PAYLOAD) {
            let b = Bytes::copy_from_slice(chunk);
            let f = if stderr {
                Frame::Stderr(b)
            } else {
                Frame::Stdout(b)
            };
            f.encode(out);
        }
    }

    /// Takes one frame off the front of `buf`: `Ok(None)` until it arrived whole.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let kind = buf[0];
        let len = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
        let len_usize = usize::try_from(len).map_err(|_| WireError::TooLong(u64::from(len)))?;
        if len_usize > MAX_PAYLOAD {
            return Err(WireError::TooLong(u64::from(len)));
        }
        if !(1..=5).contains(&kind) {
            return Err(WireError::UnknownKind(kind));
        }
        if buf.len() < HEADER + len_usize {
            return Ok(None);
        }
        buf.advance(HEADER);
        let payload = buf.split_to(len_usize).freeze();
        Ok(Some(match kind {
            1 => Frame::Stdout(payload),
            2 => Frame::Stderr(payload),
            3 => {
                let b: [u8; 4] = payload[..]
                    .try_into()
                    .map_err(|_| WireError::Malformed("exit"))?;
                Frame::Exit(i32::from_le_bytes(b))
            }
            4 => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
            _ => Frame::Status(payload),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame() -> impl Strategy<Value = Frame> {
        let bytes = prop::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        prop_oneof![
            bytes.clone().prop_map(Frame::Stdout),
            bytes.clone().prop_map(Frame::Stderr),
            any::<i32>().prop_map(Frame::Exit),
            "[ -~]{0,80}".prop_map(Frame::Error),
            bytes.prop_map(Frame::Status),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip_in_any_split(frames in prop::collection::vec(frame(), 0..20), cut in 1usize..64) {
            let mut wire = BytesMut::new();
            for f in &frames {
                f.encode(&mut wire);
            }
            // Fed in pieces of `cut` bytes, every prefix is "need more", never an error.
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(cut) {
                buf.extend_from_slice(piece);
                while let Some(f) = Frame::decode(&mut buf).expect("valid") {
                    got.push(f);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2000)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = Frame::decode(&mut buf) {}
            let mut buf = BytesMut::from(&data[..]);
            let _ = Hello::decode(&mut buf);
        }
    }

    #[test]
    fn hello_round_trips_and_checks_the_version() {
        let h = Hello::new(Request::Session {
            builder: "root@build1:2222".into(),
            protocol: SessionProtocol::Worker,
        });
        let mut buf = BytesMut::new();
        h.encode(&mut buf);
        assert_eq!(
            std::str::from_utf8(&buf).expect("utf8"),
            "{\"version\":1,\"request\":\"session\",\"builder\":\"root@build1:2222\",\"protocol\":\"worker\"}\n"
        );
        buf.extend_from_slice(b"stdin bytes");
        assert_eq!(Hello::decode(&mut buf), Ok(Some(h)));
        assert_eq!(&buf[..], b"stdin bytes", "what follows the line stays");

        let mut newer = BytesMut::from(&b"{\"version\":7,\"request\":\"whatever\"}\n"[..]);
        assert_eq!(
            Hello::decode(&mut newer),
            Err(WireError::Version { theirs: 7 })
        );
    }

    #[test]
    fn hostile_lengths_are_refused_before_buffering() {
        let mut buf = BytesMut::from(&[1u8, 0xff, 0xff, 0xff, 0x7f][..]);
        assert!(matches!(
            Frame::decode(&mut buf),
            Err(WireError::TooLong(_))
        ));
        let mut long = BytesMut::from(&vec![b'x'; MAX_HELLO][..]);
        assert_eq!(Hello::decode(&mut long), Err(WireError::HelloTooLong));
        let mut bad = BytesMut::from(&[9u8, 0, 0, 0, 0][..]);
        assert_eq!(Frame::decode(&mut bad), Err(WireError::UnknownKind(9)));
        let mut short_exit = BytesMut::from(&[3u8, 2, 0, 0, 0, 1, 2][..]);
        assert_eq!(
            Frame::decode(&mut short_exit),
            Err(WireError::Malformed("exit"))
        );
    }
}
