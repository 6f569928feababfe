//! The client side: `nixmux connect` (a session spliced onto this process's stdin, stdout
//! and stderr) and `nixmux agent status`.
//!
//! Plain blocking I/O on two threads, no async runtime: it starts in about a millisecond,
//! and it touches the descriptors it was given only by reading and writing them. It never
//! closes or reconfigures them, because with Lix stdin and stdout are one socket, where
//! closing "stdin" at the end of input would cut the output direction too. At the end of
//! input it half-closes its own socket to the agent, and goes on delivering output until the
//! remote program has ended.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;

use crate::status::StatusReport;
use crate::wire::{Frame, Hello, Request, SessionProtocol, WireError};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/nixmux/agent.sock";
/// The exit code for failures of the agent or of reaching the builder (what `ssh` uses for
/// its own errors, so Nix treats it the same way).
pub const EXIT_AGENT_FAILED: i32 = 255;

/// Why a client could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket is not there or refuses us.
    #[error("cannot reach the nixmux agent at {}: {source} (is `nixmux agent` running with this socket, and may this user open it?)", path.display())]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// What connecting said.
        source: io::Error,
    },
    /// The agent answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The agent went away before the session ended.
    #[error(
        "the nixmux agent went away in the middle of the session (it was stopped or killed); the remote Nix was stopped with it"
    )]
    Lost,
    /// The agent sent something this client does not understand.
    #[error("garbled answer from the nixmux agent: {0}")]
    Wire(#[from] WireError),
    /// Reading or writing failed locally.
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        path: socket.to_owned(),
        source,
    })
}

fn send_hello(stream: &mut UnixStream, request: Request) -> Result<(), ClientError> {
    let mut buf = BytesMut::new();
    Hello::new(request).encode(&mut buf);
    let Err(e) = stream.write_all(&buf) else {
        return Ok(());
    };
    // An agent that refuses us may answer and close before reading our hello: its answer
    // says why, the broken pipe does not.
    let refusal = read_frames(stream, |f| match f {
        Frame::Error(msg) => Ok(Some(msg)),
        _ => Ok(None),
    });
    match refusal {
        Ok(Some(msg)) => Err(ClientError::Refused(msg)),
        _ => Err(e.into()),
    }
}

/// Reads frames off `stream`, handing each to `on`, until `on` returns a value or the stream
/// ends (`Ok(None)`).
fn read_frames<T>(
    stream: &mut UnixStream,
    mut on: impl FnMut(Frame) -> Result<Option<T>, ClientError>,
) -> Result<Option<T>, ClientError> {
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        while let Some(frame) = Frame::decode(&mut buf)? {
            if let Some(v) = on(frame)? {
                return Ok(Some(v));
            }
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Runs one session of `builder`'s remote program, spliced onto this process's stdin,
/// stdout and stderr. Returns the code to exit with: the remote program's own, or
/// [`EXIT_AGENT_FAILED`] when it did not end by itself (the error says why).
pub fn run_session(
    socket: &Path,
    builder: &str,
    protocol: SessionProtocol,
) -> Result<i32, ClientError> {
    let mut stream = connect(socket)?;
    send_hello(
        &mut stream,
        Request::Session {
            builder: builder.to_owned(),
            protocol,
        },
    )?;
    let mut up = stream.try_clone()?;
    // Our input to the agent. Never joined: when the session ends the process exits, also
    // if this thread is still waiting for input that will not come.
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if up.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // End of input: the remote program gets EOF; our output keeps flowing.
        let _ = up.shutdown(Shutdown::Write);
    });
    let mut stdout = io::stdout().lock();
    let mut stderr = io::stderr().lock();
    let end = read_frames(&mut stream, |frame| match frame {
        Frame::Stdout(b) => {
            stdout.write_all(&b)?;
            stdout.flush()?;
            Ok(None)
        }
        Frame::Stderr(b) => {
            stderr.write_all(&b)?;
            Ok(None)
        }
        Frame::Exit(code) => Ok(Some(Ok(code))),
        Frame::Error(msg) => Ok(Some(Err(ClientError::Refused(msg)))),
        Frame::Status(_) => Err(WireError::Malformed("status (in a session)").into()),
    })?;
    match end {
        Some(r) => r,
        None => Err(ClientError::Lost),
    }
}

/// Whether this process runs under Nix's build hook (`nix __build-remote`, which Nix 2.8
/// starts as `build-remote`; our parent, or further up through `bash -c`): the build loop
/// passes only structured `@nix` lines of the hook's stderr on for ssh-ng:// builders (Nix's
/// `DerivationGoal::handleChildOutput`), so a plain message would never reach the user.
fn under_build_hook() -> bool {
    fn parent(pid: u32) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
    let mut pid = std::process::id();
    for _ in 0..3 {
        let Some(p) = parent(pid) else { return false };
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let mut args = cmdline.split(|&b| b == 0);
        let argv0 = args.next().unwrap_or_default();
        if argv0.ends_with(b"build-remote") || args.any(|a| a == b"__build-remote") {
            return true;
        }
        pid = p;
    }
    false
}

/// Says `message` on stderr so that its reader shows it: a plain line, and under Nix's
/// build hook also as a Nix log message.
pub fn report(message: &str) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "{message}");
    if under_build_hook() {
        let json = serde_json::json!({ "action": "msg", "level": 0, "msg": message });
        let _ = writeln!(err, "@nix {json}");
    }
}

/// The agent's status report.
pub fn status(socket: &Path) -> Result<StatusReport, ClientError> {
    let mut stream = connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    send_hello(&mut stream, Request::Status)?;
    let report = read_frames(&mut stream, |frame| match frame {
        Frame::Status(json) => serde_json::from_slice(&json)
            .map(Some)
            .map_err(|e| ClientError::Wire(WireError::BadStatus(e.to_string()))),
        Frame::Error(msg) => Err(ClientError::Refused(msg)),
        _ => Err(WireError::Malformed("session data (in a status answer)").into()),
    })?;
    report.ok_or(ClientError::Lost)
}
