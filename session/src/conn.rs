//! The buffered byte pipe under a session: decode-or-read-more, bounded waits, poisoning.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use nixmux_proto::Limits;
use nixmux_proto::hash::Hash;
use nixmux_proto::nar::NarParser;
use nixmux_proto::wire::{ReadResult, WireReader, try_decode_hint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::activity::{Activity, Patience, within_idle};
use crate::error::SessionError;

/// A downloaded NAR's size and hash, as computed while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarSummary {
    /// Bytes.
    pub nar_size: u64,
    /// SHA-256; `None` when the download was asked not to hash ([`NarHashing::Skip`]).
    pub nar_hash: Option<Hash>,
}

/// Whether a NAR download hashes what it streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarHashing {
    /// Hash it (the summary carries `nar_hash`).
    Hash,
    /// Only delimit and size it, for a NAR whose receiver hashes it anyway: a local Nix
    /// store checks `narHash` before it registers a path (`LocalStore::addToStore`,
    /// NixOS/nix `src/libstore/local-store.cc`), and hashing here too would double the CPU a
    /// fetch costs.
    Skip,
}

/// Explains why a remote went away: the stderr tail and exit status of the remote command.
/// The serve protocol has no error frames, so this is the only error text it ever gives.
pub trait RemoteDiagnostics: Send + Sync {
    /// Text describing how the remote ended, waiting briefly for the remote to finish writing
    /// its stderr and exit status. `None` when there is nothing useful to say.
    fn explain(&self) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>>;
}

/// A boxed reader half.
pub type BoxReader = Box<dyn AsyncRead + Unpin + Send>;
/// A boxed writer half.
pub type BoxWriter = Box<dyn AsyncWrite + Unpin + Send>;

/// Settings shared by both session kinds.
///
/// Timeouts measure silence, never length: a wait on the peer fails only when no byte has
/// moved in either direction of the session for the whole limit (see [`Activity`]). A 1 GiB
/// NAR over a slow link may take an hour and never time out; a peer that stops reading and
/// writing for `idle_timeout` does. An overall bound on an operation, if a caller wants one,
/// belongs to the caller (dropping the future is safe: the session is poisoned).
#[derive(Clone)]
pub struct SessionConfig {
    /// Bounds on every length read from the peer.
    pub limits: Limits,
    /// Longest silence tolerated while we wait on the peer during anything that is not a
    /// build: handshake, queries, transfers (each direction's bytes count as progress for
    /// both). Default 60 s.
    pub idle_timeout: Duration,
    /// Longest silence tolerated while waiting for a build's result; log output counts as
    /// progress. `None` (default): a build may be silent for as long as the builder's own
    /// `max-silent-time` / `timeout` allow; a dead connection is still noticed by the
    /// transport's keepalives.
    pub build_idle_timeout: Option<Duration>,
    /// Explains remote deaths (stderr tail, exit status).
    pub diagnostics: Option<Arc<dyn RemoteDiagnostics>>,
    /// The session's clock, when the transport under it can see progress the session
    /// cannot (an SSH window adjustment while we upload, the serve protocol's log on the
    /// channel's stderr) and touches it. `None`: a clock of its own.
    pub activity: Option<Activity>,
    /// Where the session counts its round trips (shared, e.g. by every session of one
    /// builder). `None`: a counter of its own.
    pub round_trips: Option<RoundTrips>,
}

/// Round trips: how many times a session waited for its peer's answer to something it had
/// sent, i.e. the first wait for bytes after a write. Pipelined requests answered together
/// count once. Clones share the count.
#[derive(Debug, Clone, Default)]
pub struct RoundTrips(Arc<AtomicU64>);

impl RoundTrips {
    /// Round trips so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One session's side of the count: whether it sent something since it last waited, and
/// whether counting is suspended (see [`Conn::concurrent_turn`]).
struct TurnTaker<'a> {
    sent: &'a AtomicBool,
    quiet: &'a AtomicBool,
    round_trips: &'a RoundTrips,
}

impl TurnTaker<'_> {
    fn waiting(&self) {
        if !self.quiet.load(Ordering::Relaxed) && self.sent.swap(false, Ordering::Relaxed) {
            self.round_trips.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sent(&self) {
        if !self.quiet.load(Ordering::Relaxed) {
            self.sent.store(true, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("limits", &self.limits)
            .field("idle_timeout", &self.idle_timeout)
            .field("build_idle_timeout", &self.build_idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            limits: Limits::DEFAULT,
            idle_timeout: Duration::from_secs(60),
            build_idle_timeout: None,
            diagnostics: None,
            activity: None,
            round_trips: None,
        }
    }
}

impl SessionConfig {
    /// The silence tolerated by a wait of this kind (`None`: unbounded).
    pub(crate) fn idle_limit(&self, patience: Patience) -> Option<Duration> {
        match patience {
            Patience::Transfer => Some(self.idle_timeout),
            Patience::Build => self.build_idle_timeout,
        }
    }
}

/// Size of one socket read. Large, so that big replies are re-decoded rarely.
const READ_CHUNK: usize = 256 << 10;
/// Largest piece written at once. Small enough to interleave with other channels on a shared
/// connection and to stay well under SSH packet limits across a rekey.
pub(crate) const WRITE_CHUNK: usize = 64 << 10;

/// A reader or writer that records every byte it moves on the session's [`Activity`].
struct Metered<T> {
    inner: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The buffered pipe. Only the session types touch it.
pub(crate) struct Conn {
    reader: Metered<BoxReader>,
    writer: Metered<BoxWriter>,
    rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
    pub(crate) config: SessionConfig,
    /// When bytes last moved, in either direction.
    pub(crate) activity: Activity,
    /// Set while an operation is in flight and cleared when it completes; still set on entry
    /// means the previous operation was dropped half-way (cancelled).
    busy: bool,
    /// Set by any fatal error.
    poisoned: bool,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// Sent something since the last wait for the peer (see [`RoundTrips`]).
    sent: AtomicBool,
    /// Counting suspended for the rest of the operation ([`Conn::concurrent_turn`]).
    quiet: AtomicBool,
    round_trips: RoundTrips,
}

impl Conn {
    pub(crate) fn new(reader: BoxReader, writer: BoxWriter, config: SessionConfig) -> Self {
        let activity = config.activity.clone().unwrap_or_default();
        activity.touch();
        let round_trips = config.round_trips.clone().unwrap_or_default();
        Conn {
            reader: Metered {
                inner: reader,
                activity: activity.clone(),
            },
            writer: Metered {
                inner: writer,
                activity: activity.clone(),
            },
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(4096),
            config,
            activity,
            busy: false,
            poisoned: false,
            bytes_in: 0,
            bytes_out: 0,
            sent: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            round_trips,
        }
    }

    /// Counts the rest of the operation as one round trip: it writes while it reads, so its
    /// writes never wait for the peer's answers and the reads' waits are not turns.
    pub(crate) fn concurrent_turn(&mut self) {
        self.round_trips.0.fetch_add(1, Ordering::Relaxed);
        self.sent.store(false, Ordering::Relaxed);
        self.quiet.store(true, Ordering::Relaxed);
    }

    /// Round trips counted so far (by this session, or by all sharing its counter).
    pub(crate) fn round_trips(&self) -> u64 {
        self.round_trips.count()
    }

    /// Whether the session can take another operation.
    pub(crate) fn is_usable(&self) -> bool {
        !self.poisoned && !self.busy
    }

    /// Marks the start of an operation; fails when the session is unusable.
    pub(crate) fn begin(&mut self) -> Result<(), SessionError> {
        if !self.is_usable() {
            self.poisoned = true;
            return Err(SessionError::Poisoned);
        }
        self.busy = true;
        // The peer had no reason to talk between operations: silence starts counting now.
        self.activity.touch();
        Ok(())
    }

    /// Marks the end of an operation, poisoning the session on fatal errors.
    pub(crate) fn end<T>(&mut self, r: Result<T, SessionError>) -> Result<T, SessionError> {
        self.busy = false;
        self.quiet.store(false, Ordering::Relaxed);
        if let Err(e) = &r
            && e.is_fatal()
        {
            self.poisoned = true;
        }
        r
    }

    /// Poisons the session explicitly.
    pub(crate) fn poison(&mut self) {
        self.poisoned = true;
    }

    /// Sends what is buffered in `wbuf`.
    pub(crate) async fn flush(&mut self, during: &'static str) -> Result<(), SessionError> {
        let data = self.wbuf.split().freeze();
        self.send(&data, true, during).await
    }

    /// Writes raw bytes straight through (payloads), in bounded chunks.
    pub(crate) async fn write_raw(
        &mut self,
        data: &[u8],
        during: &'static str,
    ) -> Result<(), SessionError> {
        if !self.wbuf.is_empty() {
            self.flush(during).await?;
        }
        self.send(data, false, during).await
    }

    async fn send(
        &mut self,
        data: &[u8],
        flush: bool,
        during: &'static str,
    ) -> Result<(), SessionError> {
        self.bytes_out += data.len() as u64;
        if !self.quiet.load(Ordering::Relaxed) {
            self.sent.store(true, Ordering::Relaxed);
        }
        let limit = self.config.idle_limit(Patience::Transfer);
        let written = within_idle(
            &self.activity,
            limit,
            during,
            write_chunked(&mut self.writer, data, flush),
        )
        .await?;
        match written {
            Ok(()) => Ok(()),
            Err(e) => Err(io_error(self.config.diagnostics.clone(), during, e).await),
        }
    }

    /// Closes our sending side (EOF to the remote).
    pub(crate) async fn shutdown(&mut self) {
        let limit = self.config.idle_limit(Patience::Transfer);
        let _ = within_idle(&self.activity, limit, "shutdown", self.writer.shutdown()).await;
    }

    /// Decodes one value, reading as needed; the peer may stay silent for the idle limit of
    /// `patience` between bytes.
    pub(crate) async fn read_with<T>(
        &mut self,
        during: &'static str,
        patience: Patience,
        decode: impl Fn(&mut WireReader<'_>) -> ReadResult<T>,
    ) -> Result<T, SessionError> {
        let (mut rh, _) = self.halves();
        rh.read(during, patience, decode).await
    }

    /// Decodes one value (a transfer's patience).
    pub(crate) async fn read<T>(
        &mut self,
        during: &'static str,
        decode: impl Fn(&mut WireReader<'_>) -> ReadResult<T>,
    ) -> Result<T, SessionError> {
        self.read_with(during, Patience::Transfer, decode).await
    }

    /// Streams one self-delimiting NAR from the peer into `sink`, returning its size and
    /// (unless `hashing` says to skip it) its hash. Only the NAR's bytes are consumed; what
    /// follows stays buffered for the next message. Time spent waiting on `sink` does not count
    /// as the peer's silence.
    pub(crate) async fn read_nar(
        &mut self,
        sink: &mut (dyn AsyncWrite + Unpin + Send),
        during: &'static str,
        hashing: NarHashing,
    ) -> Result<NarSummary, SessionError> {
        let mut parser = match hashing {
            NarHashing::Hash => NarParser::new(self.config.limits),
            NarHashing::Skip => NarParser::without_hash(self.config.limits),
        };
        let (mut rh, _) = self.halves();
        loop {
            if !rh.rbuf.is_empty() {
                let used = parser
                    .feed(rh.rbuf)
                    .map_err(|source| SessionError::Protocol { during, source })?;
                let chunk = rh.rbuf.split_to(used);
                let _ours = rh.activity.pause();
                sink.write_all(&chunk).await.map_err(SessionError::Sink)?;
            }
            if parser.is_done() {
                let _ours = rh.activity.pause();
                sink.flush().await.map_err(SessionError::Sink)?;
                return Ok(NarSummary {
                    nar_size: parser.nar_size(),
                    nar_hash: parser.nar_hash(),
                });
            }
            rh.fill(1, during, Patience::Transfer).await?;
        }
    }

    /// Copies exactly `len` bytes from `source` to the peer (serve `AddToStoreNar`).
    pub(crate) async fn copy_exact(
        &mut self,
        source: &mut (dyn AsyncRead + Unpin + Send),
        len: u64,
        during: &'static str,
    ) -> Result<(), SessionError> {
        let mut left = len;
        let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
        // A handle of its own: `write_raw` borrows the whole connection.
        let activity = self.activity.clone();
        while left > 0 {
            buf.clear();
            let n =
                read_upload_piece(source, &mut buf, WRITE_CHUNK as u64, left, &activity).await?;
            self.write_raw(&buf, during).await?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Splits into the two halves for operations that read and write concurrently.
    pub(crate) fn halves(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        (
            ReadHalf {
                reader: &mut self.reader,
                rbuf: &mut self.rbuf,
                config: &self.config,
                activity: &self.activity,
                bytes_in: &mut self.bytes_in,
                turns: TurnTaker {
                    sent: &self.sent,
                    quiet: &self.quiet,
                    round_trips: &self.round_trips,
                },
            },
            WriteHalf {
                writer: &mut self.writer,
                config: &self.config,
                activity: &self.activity,
                bytes_out: &mut self.bytes_out,
                turns: TurnTaker {
                    sent: &self.sent,
                    quiet: &self.quiet,
                    round_trips: &self.round_trips,
                },
            },
        )
    }
}

/// Writes `data` in pieces of at most [`WRITE_CHUNK`] (so other channels of a shared
/// connection get their turn), then flushes if asked.
async fn write_chunked(
    w: &mut Metered<BoxWriter>,
    data: &[u8],
    flush: bool,
) -> std::io::Result<()> {
    for chunk in data.chunks(WRITE_CHUNK) {
        w.write_all(chunk).await?;
    }
    if flush {
        w.flush().await?;
    }
    Ok(())
}

/// Reads the next piece of an upload with `left` bytes still announced, at most `max` bytes,
/// appended to `buf`; returns its size. A source that ends early is the local side's fault,
/// not the peer's; the time spent waiting on it is not the peer's silence.
pub(crate) async fn read_upload_piece<B: BufMut + Send>(
    src: &mut (dyn AsyncRead + Unpin + Send),
    buf: &mut B,
    max: u64,
    left: u64,
    activity: &Activity,
) -> Result<usize, SessionError> {
    let n = {
        let _ours = activity.pause();
        (&mut *src)
            .take(max.min(left))
            .read_buf(buf)
            .await
            .map_err(SessionError::Source)?
    };
    if n == 0 {
        return Err(SessionError::Source(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the NAR ended {left} bytes before its announced size"),
        )));
    }
    Ok(n)
}

/// What the remote has to say about its death, if anything.
pub(crate) async fn explain(diagnostics: Option<Arc<dyn RemoteDiagnostics>>) -> Option<String> {
    match diagnostics {
        Some(d) => d.explain().await,
        None => None,
    }
}

/// A broken pipe or reset usually means the remote died; ask the diagnostics why.
async fn io_error(
    diagnostics: Option<Arc<dyn RemoteDiagnostics>>,
    during: &'static str,
    e: std::io::Error,
) -> SessionError {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        BrokenPipe | ConnectionReset | UnexpectedEof | NotConnected
    ) {
        SessionError::Closed {
            during,
            explanation: explain(diagnostics).await,
        }
    } else {
        SessionError::Io { during, source: e }
    }
}

/// Read side during a concurrent operation.
pub(crate) struct ReadHalf<'a> {
    reader: &'a mut Metered<BoxReader>,
    rbuf: &'a mut BytesMut,
    config: &'a SessionConfig,
    activity: &'a Activity,
    bytes_in: &'a mut u64,
    turns: TurnTaker<'a>,
}

impl ReadHalf<'_> {
    /// Decodes one value, reading as needed; the peer may stay silent for the idle limit of
    /// `patience` (while bytes move in either direction, it is not silent).
    pub(crate) async fn read<T>(
        &mut self,
        during: &'static str,
        patience: Patience,
        decode: impl Fn(&mut WireReader<'_>) -> ReadResult<T>,
    ) -> Result<T, SessionError> {
        loop {
            match try_decode_hint(self.rbuf, &self.config.limits, &decode) {
                Ok(Ok((v, used))) => {
                    self.rbuf.advance(used);
                    return Ok(v);
                }
                Ok(Err(needed)) => self.fill(needed.max(1), during, patience).await?,
                Err(source) => return Err(SessionError::Protocol { during, source }),
            }
        }
    }

    /// Reads more bytes into the buffer, at least `min` (or fails).
    async fn fill(
        &mut self,
        min: usize,
        during: &'static str,
        patience: Patience,
    ) -> Result<(), SessionError> {
        let target = self.rbuf.len() + min;
        self.turns.waiting();
        let limit = self.config.idle_limit(patience);
        while self.rbuf.len() < target {
            self.rbuf.reserve(READ_CHUNK.max(target - self.rbuf.len()));
            let read = self.reader.read_buf(self.rbuf);
            match within_idle(self.activity, limit, during, read).await? {
                Ok(0) => {
                    return Err(SessionError::Closed {
                        during,
                        explanation: explain(self.config.diagnostics.clone()).await,
                    });
                }
                Ok(n) => *self.bytes_in += n as u64,
                Err(e) => return Err(io_error(self.config.diagnostics.clone(), during, e).await),
            }
        }
        Ok(())
    }
}

/// Write side during a concurrent operation.
pub(crate) struct WriteHalf<'a> {
    writer: &'a mut Metered<BoxWriter>,
    config: &'a SessionConfig,
    activity: &'a Activity,
    bytes_out: &'a mut u64,
    turns: TurnTaker<'a>,
}

impl WriteHalf<'_> {
    /// Writes and flushes `data`.
    pub(crate) async fn send(
        &mut self,
        data: &[u8],
        during: &'static str,
    ) -> Result<(), SessionError> {
        *self.bytes_out += data.len() as u64;
        self.turns.sent();
        let limit = self.config.idle_limit(Patience::Transfer);
        let written = within_idle(
            self.activity,
            limit,
            during,
            write_chunked(self.writer, data, true),
        )
        .await?;
        written.map_err(|source| SessionError::Io { during, source })
    }

    /// The session's clock (an upload's source reads pause it).
    pub(crate) fn activity(&self) -> &Activity {
        self.activity
    }
}
