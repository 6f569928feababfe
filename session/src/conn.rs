//! The buffered byte pipe under a session: decode-or-read-more, bounded waits, poisoning.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use nixmux_proto::Limits;
use nixmux_proto::hash::Hash;
use nixmux_proto::nar::NarParser;
use nixmux_proto::wire::{ReadResult, WireReader, try_decode_hint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::SessionError;

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
#[derive(Clone)]
pub struct SessionConfig {
    /// Bounds on every length read from the peer.
    pub limits: Limits,
    /// Longest wait for bytes during an operation that is not a build (handshake, queries,
    /// transfers). A build may be silent for hours, so builds use [`SessionConfig::build_timeout`].
    pub io_timeout: Duration,
    /// Longest wait for the result of a build (`None`: rely on the builder's own
    /// `max-silent-time` / `timeout` and on transport keepalives).
    pub build_timeout: Option<Duration>,
    /// Explains remote deaths (stderr tail, exit status).
    pub diagnostics: Option<Arc<dyn RemoteDiagnostics>>,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("limits", &self.limits)
            .field("io_timeout", &self.io_timeout)
            .field("build_timeout", &self.build_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            limits: Limits::DEFAULT,
            io_timeout: Duration::from_secs(60),
            build_timeout: None,
            diagnostics: None,
        }
    }
}

/// Size of one socket read. Large, so that big replies are re-decoded rarely.
const READ_CHUNK: usize = 256 << 10;
/// Largest piece written at once. Small enough to interleave with other channels on a shared
/// connection and to stay well under SSH packet limits across a rekey.
pub(crate) const WRITE_CHUNK: usize = 64 << 10;

/// The buffered pipe. Only the session types touch it.
pub(crate) struct Conn {
    reader: BoxReader,
    writer: BoxWriter,
    rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
    pub(crate) config: SessionConfig,
    /// Set while an operation is in flight and cleared when it completes; still set on entry
    /// means the previous operation was dropped half-way (cancelled).
    busy: bool,
    /// Set by any fatal error.
    poisoned: bool,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

impl Conn {
    pub(crate) fn new(reader: BoxReader, writer: BoxWriter, config: SessionConfig) -> Self {
        Conn {
            reader,
            writer,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(4096),
            config,
            busy: false,
            poisoned: false,
            bytes_in: 0,
            bytes_out: 0,
        }
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
        Ok(())
    }

    /// Marks the end of an operation, poisoning the session on fatal errors.
    pub(crate) fn end<T>(&mut self, r: Result<T, SessionError>) -> Result<T, SessionError> {
        self.busy = false;
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
        let timeout = self.config.io_timeout;
        match write_chunked(&mut self.writer, data, flush, timeout).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io_error(self.config.diagnostics.clone(), during, e).await),
            Err(_) => Err(SessionError::Timeout {
                during,
                after: timeout,
            }),
        }
    }

    /// Flushes the underlying writer.
    pub(crate) async fn flush_writer(&mut self, during: &'static str) -> Result<(), SessionError> {
        self.flush(during).await
    }

    /// Closes our sending side (EOF to the remote).
    pub(crate) async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(self.config.io_timeout, self.writer.shutdown()).await;
    }

    /// Reads more bytes into `rbuf`, at least `min` (or fails).
    async fn fill(
        &mut self,
        min: usize,
        during: &'static str,
        timeout: Option<Duration>,
    ) -> Result<(), SessionError> {
        let target = self.rbuf.len() + min;
        while self.rbuf.len() < target {
            self.rbuf.reserve(READ_CHUNK.max(target - self.rbuf.len()));
            let read = self.reader.read_buf(&mut self.rbuf);
            let n = match timeout {
                Some(t) => match tokio::time::timeout(t, read).await {
                    Ok(r) => r,
                    Err(_) => return Err(SessionError::Timeout { during, after: t }),
                },
                None => read.await,
            };
            match n {
                Ok(0) => {
                    return Err(SessionError::Closed {
                        during,
                        explanation: explain(self.config.diagnostics.clone()).await,
                    });
                }
                Ok(n) => self.bytes_in += n as u64,
                Err(e) => return Err(io_error(self.config.diagnostics.clone(), during, e).await),
            }
        }
        Ok(())
    }

    /// Decodes one value, reading as needed.
    pub(crate) async fn read_with<T>(
        &mut self,
        during: &'static str,
        timeout: Option<Duration>,
        decode: impl Fn(&mut WireReader<'_>) -> ReadResult<T>,
    ) -> Result<T, SessionError> {
        loop {
            match try_decode_hint(&self.rbuf, &self.config.limits, &decode) {
                Ok(Ok((v, used))) => {
                    self.rbuf.advance(used);
                    return Ok(v);
                }
                Ok(Err(needed)) => self.fill(needed.max(1), during, timeout).await?,
                Err(source) => return Err(SessionError::Protocol { during, source }),
            }
        }
    }

    /// Decodes one value with the default I/O timeout.
    pub(crate) async fn read<T>(
        &mut self,
        during: &'static str,
        decode: impl Fn(&mut WireReader<'_>) -> ReadResult<T>,
    ) -> Result<T, SessionError> {
        let t = Some(self.config.io_timeout);
        self.read_with(during, t, decode).await
    }

    /// Streams one self-delimiting NAR from the peer into `sink`, returning its size and hash.
    /// Only the NAR's bytes are consumed; what follows stays buffered for the next message.
    pub(crate) async fn read_nar(
        &mut self,
        sink: &mut (dyn AsyncWrite + Unpin + Send),
        during: &'static str,
    ) -> Result<(u64, Hash), SessionError> {
        let mut parser = NarParser::new(self.config.limits);
        let timeout = Some(self.config.io_timeout);
        loop {
            if !self.rbuf.is_empty() {
                let used = parser
                    .feed(&self.rbuf)
                    .map_err(|source| SessionError::Protocol { during, source })?;
                let chunk = self.rbuf.split_to(used);
                sink.write_all(&chunk).await.map_err(SessionError::Sink)?;
            }
            if parser.is_done() {
                sink.flush().await.map_err(SessionError::Sink)?;
                return Ok((parser.nar_size(), parser.nar_hash()));
            }
            self.fill(1, during, timeout).await?;
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
        let mut buf = vec![0u8; WRITE_CHUNK];
        while left > 0 {
            let chunk = read_upload_chunk(source, &mut buf, left).await?;
            self.write_raw(chunk, during).await?;
            left -= chunk.len() as u64;
        }
        Ok(())
    }

    /// Splits into the two halves for operations that read and write concurrently.
    pub(crate) fn halves(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        (
            ReadHalf {
                reader: &mut self.reader,
                rbuf: &mut self.rbuf,
                limits: &self.config.limits,
                diagnostics: self.config.diagnostics.clone(),
                bytes_in: &mut self.bytes_in,
            },
            WriteHalf {
                writer: &mut self.writer,
                io_timeout: self.config.io_timeout,
                bytes_out: &mut self.bytes_out,
            },
        )
    }
}

/// Writes `data` in pieces of at most [`WRITE_CHUNK`] (so other channels of a shared
/// connection get their turn), then flushes if asked, all within `timeout`.
async fn write_chunked(
    w: &mut BoxWriter,
    data: &[u8],
    flush: bool,
    timeout: Duration,
) -> Result<std::io::Result<()>, tokio::time::error::Elapsed> {
    tokio::time::timeout(timeout, async {
        for chunk in data.chunks(WRITE_CHUNK) {
            w.write_all(chunk).await?;
        }
        if flush {
            w.flush().await?;
        }
        Ok(())
    })
    .await
}

/// Reads the next piece (at most `buf.len()` bytes) of an upload with `left` bytes still
/// announced. A source that ends early is the local side's fault, not the peer's.
pub(crate) async fn read_upload_chunk<'b>(
    src: &mut (dyn AsyncRead + Unpin + Send),
    buf: &'b mut [u8],
    left: u64,
) -> Result<&'b [u8], SessionError> {
    let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
    let n = src
        .read(&mut buf[..want])
        .await
        .map_err(SessionError::Source)?;
    if n == 0 {
        return Err(SessionError::Source(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the NAR ended {left} bytes before its announced size"),
        )));
    }
    Ok(&buf[..n])
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
    reader: &'a mut BoxReader,
    rbuf: &'a mut BytesMut,
    limits: &'a Limits,
    diagnostics: Option<Arc<dyn RemoteDiagnostics>>,
    bytes_in: &'a mut u64,
}

impl ReadHalf<'_> {
    /// Decodes one value, reading as needed. `timeout` `None` waits without bound (the
    /// transport's keepalive still detects a dead peer).
    pub(crate) async fn read<T>(
        &mut self,
        during: &'static str,
        timeout: Option<Duration>,
        decode: impl Fn(&mut WireReader<'_>) -> ReadResult<T>,
    ) -> Result<T, SessionError> {
        loop {
            match try_decode_hint(self.rbuf, self.limits, &decode) {
                Ok(Ok((v, used))) => {
                    self.rbuf.advance(used);
                    return Ok(v);
                }
                Ok(Err(needed)) => {
                    let target = self.rbuf.len() + needed.max(1);
                    while self.rbuf.len() < target {
                        self.rbuf.reserve(READ_CHUNK);
                        let read = self.reader.read_buf(self.rbuf);
                        let n = match timeout {
                            Some(t) => tokio::time::timeout(t, read)
                                .await
                                .map_err(|_| SessionError::Timeout { during, after: t })?,
                            None => read.await,
                        };
                        match n {
                            Ok(0) => {
                                let explanation = explain(self.diagnostics.clone()).await;
                                return Err(SessionError::Closed {
                                    during,
                                    explanation,
                                });
                            }
                            Ok(n) => *self.bytes_in += n as u64,
                            Err(e) => return Err(SessionError::Io { during, source: e }),
                        }
                    }
                }
                Err(source) => return Err(SessionError::Protocol { during, source }),
            }
        }
    }
}

/// Write side during a concurrent operation.
pub(crate) struct WriteHalf<'a> {
    writer: &'a mut BoxWriter,
    io_timeout: Duration,
    bytes_out: &'a mut u64,
}

impl WriteHalf<'_> {
    /// Writes and flushes `data`.
    pub(crate) async fn send(
        &mut self,
        data: &[u8],
        during: &'static str,
    ) -> Result<(), SessionError> {
        let t = self.io_timeout;
        *self.bytes_out += data.len() as u64;
        match write_chunked(self.writer, data, true, t).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SessionError::Io { during, source: e }),
            Err(_) => Err(SessionError::Timeout { during, after: t }),
        }
    }
}
