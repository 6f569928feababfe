//! A wrapper around the byte stream russh runs on.
//!
//! It does what russh cannot do for us:
//! * records the first I/O error or end-of-file, so a reset connection is reported as a reset
//!   even when russh's own error path loses it (its session task returns early if shutting
//!   down the socket fails, without telling the handler why);
//! * counts encrypted bytes on the wire;
//! * follows the server's side of the version exchange, so that a connection the server
//!   drops before the key exchange (sshd `MaxStartups`) is recognised as such;
//! * swallows errors from shutting down a dead socket, for the same reason;
//! * has a kill switch: russh's session task is spawned inside `connect_stream` and its join
//!   handle is not reachable, so a handshake that times out would otherwise leave that task
//!   reading a silent socket forever. Killing the stream makes every read and write fail,
//!   which ends the task.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the stream saw first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    Eof,
    Error {
        kind: io::ErrorKind,
        message: String,
    },
    Killed,
}

/// How far the server got before the key exchange, read off the bytes it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Startup {
    /// No identification line (`SSH-2.0-...`) yet; maybe lines of text.
    BeforeIdentification,
    /// The identification arrived, its first binary packet (KEXINIT) not completely.
    Identified,
    /// A complete binary packet arrived: the key exchange is under way.
    KexStarted,
}

/// Text lines kept from before the server's identification, at most.
const STARTUP_TEXT_MAX: usize = 256;

/// Follows RFC 4253 §4.2 from the server's side: lines of text, the line starting with
/// `SSH-`, then binary packets, the first of which (KEXINIT) is in clear, its length in its
/// first four bytes.
#[derive(Debug)]
struct StartupScan {
    phase: Startup,
    /// The current line, up to `STARTUP_TEXT_MAX` bytes.
    line: Vec<u8>,
    /// Lines before the identification, up to `STARTUP_TEXT_MAX` bytes.
    text: Vec<u8>,
    /// The first packet's length field as far as it arrived.
    length: Vec<u8>,
    /// Bytes of the first packet still to come, once its length is known.
    remaining: Option<u64>,
}

impl Default for StartupScan {
    fn default() -> Self {
        StartupScan {
            phase: Startup::BeforeIdentification,
            line: Vec::new(),
            text: Vec::new(),
            length: Vec::new(),
            remaining: None,
        }
    }
}

impl StartupScan {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.phase {
                Startup::BeforeIdentification => {
                    let (part, rest, line_ends) = match data.iter().position(|&b| b == b'\n') {
                        Some(i) => (&data[..=i], &data[i + 1..], true),
                        None => (data, &data[data.len()..], false),
                    };
                    let room = STARTUP_TEXT_MAX.saturating_sub(self.line.len());
                    self.line.extend_from_slice(&part[..part.len().min(room)]);
                    data = rest;
                    if line_ends {
                        if self.line.starts_with(b"SSH-") {
                            self.phase = Startup::Identified;
                        } else {
                            let room = STARTUP_TEXT_MAX.saturating_sub(self.text.len());
                            self.text
                                .extend_from_slice(&self.line[..self.line.len().min(room)]);
                        }
                        self.line.clear();
                    }
                }
                Startup::Identified => match self.remaining {
                    None => {
                        let n = (4 - self.length.len()).min(data.len());
                        self.length.extend_from_slice(&data[..n]);
                        data = &data[n..];
                        if let Ok(len) = <[u8; 4]>::try_from(self.length.as_slice()) {
                            self.remaining = Some(u64::from(u32::from_be_bytes(len)));
                        }
                    }
                    Some(left) => {
                        let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                        self.remaining = Some(left - n as u64);
                        data = &data[n..];
                    }
                },
                Startup::KexStarted => return,
            }
            if self.remaining == Some(0) {
                self.phase = Startup::KexStarted;
            }
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct StreamMonitor {
    killed: AtomicBool,
    /// Set once the key exchange is under way, so reads no longer scan.
    kex_started: AtomicBool,
    startup: Mutex<StartupScan>,
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    end: Mutex<Option<StreamEnd>>,
}

impl StreamMonitor {
    /// Makes every further read and write fail, and wakes whoever is waiting on them.
    pub(crate) fn kill(&self) {
        self.record(StreamEnd::Killed);
        self.killed.store(true, Ordering::SeqCst);
        self.read_waker.wake();
        self.write_waker.wake();
    }

    pub(crate) fn end(&self) -> Option<StreamEnd> {
        self.end.lock().map(|g| g.clone()).unwrap_or(None)
    }

    /// How far the server got before the key exchange, and the text lines it sent before
    /// its identification (lossy UTF-8, line ends trimmed, joined by `; `).
    pub(crate) fn startup(&self) -> (Startup, String) {
        match self.startup.lock() {
            Ok(scan) => {
                let text = String::from_utf8_lossy(&scan.text)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                (scan.phase, text)
            }
            Err(_) => (Startup::KexStarted, String::new()),
        }
    }

    fn scan_startup(&self, data: &[u8]) {
        if self.kex_started.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut scan) = self.startup.lock() {
            scan.feed(data);
            if scan.phase == Startup::KexStarted {
                self.kex_started.store(true, Ordering::Relaxed);
            }
        }
    }

    fn record(&self, end: StreamEnd) {
        if let Ok(mut g) = self.end.lock()
            && g.is_none()
        {
            *g = Some(end);
        }
    }

    fn record_err(&self, e: &io::Error) {
        self.record(StreamEnd::Error {
            kind: e.kind(),
            message: e.to_string(),
        });
    }

    fn killed_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connection aborted by nixmux",
        )
    }

    fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

pub(crate) struct MonitoredStream<S> {
    inner: S,
    mon: std::sync::Arc<StreamMonitor>,
    /// Called after every read that returned data (TCP_QUICKACK, see `connect`).
    after_read: Option<Box<dyn Fn() + Send + Sync>>,
}

impl<S> MonitoredStream<S> {
    pub(crate) fn new(
        inner: S,
        mon: std::sync::Arc<StreamMonitor>,
        after_read: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> Self {
        MonitoredStream {
            inner,
            mon,
            after_read,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MonitoredStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.mon.is_killed() {
            return Poll::Ready(Err(StreamMonitor::killed_error()));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n == 0 && buf.remaining() > 0 {
                    this.mon.record(StreamEnd::Eof);
                } else {
                    this.mon.scan_startup(&buf.filled()[before..]);
                    if let Some(f) = &this.after_read {
                        f();
                    }
                }
                this.mon.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.mon.record_err(&e);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                this.mon.read_waker.register(cx.waker());
                if this.mon.is_killed() {
                    return Poll::Ready(Err(StreamMonitor::killed_error()));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MonitoredStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.mon.is_killed() {
            return Poll::Ready(Err(StreamMonitor::killed_error()));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.mon
                    .bytes_written
                    .fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => {
                this.mon.record_err(&e);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                this.mon.write_waker.register(cx.waker());
                if this.mon.is_killed() {
                    return Poll::Ready(Err(StreamMonitor::killed_error()));
                }
                Poll::Pending
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.mon.is_killed() {
            return Poll::Ready(Err(StreamMonitor::killed_error()));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(Err(e)) => {
                this.mon.record_err(&e);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                this.mon.write_waker.register(cx.waker());
                if this.mon.is_killed() {
                    return Poll::Ready(Err(StreamMonitor::killed_error()));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.mon.is_killed() {
            // Nothing to shut down gracefully any more; let russh finish.
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            // Shutting down a socket the peer already reset fails (ENOTCONN). russh's session
            // task returns that error *instead of* telling the handler why the session
            // ended, so it is swallowed here: the real cause matters, this one does not.
            Poll::Ready(Err(e)) => {
                tracing::debug!("ignoring shutdown error on a finished SSH stream: {e}");
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> StartupScan {
        let mut s = StartupScan::default();
        for c in chunks {
            s.feed(c);
        }
        s
    }

    #[test]
    fn startup_phases_from_server_bytes() {
        let s = scan(&[b"Exceeded Max", b"Startups\r\n"]);
        assert_eq!(s.phase, Startup::BeforeIdentification);
        assert_eq!(s.text, b"Exceeded MaxStartups\r\n");

        // Identification split across reads, then a 12-byte packet (length 8) in pieces.
        let s = scan(&[b"SS", b"H-2.0-OpenSSH_9.2\r\n\0\0", b"\0\x08abcd"]);
        assert_eq!(s.phase, Startup::Identified);
        let s = scan(&[b"hello\nSSH-2.0-x\r\n\0\0\0\x08abcdefgh", b"more"]);
        assert_eq!(s.phase, Startup::KexStarted);
        assert_eq!(s.text, b"hello\n");

        // A long text line is kept only in part.
        let long = vec![b'x'; 1000];
        let s = scan(&[&long, b"\n"]);
        assert_eq!(s.text.len(), STARTUP_TEXT_MAX);
        assert_eq!(s.phase, Startup::BeforeIdentification);
    }

    #[test]
    fn monitor_reports_startup_text() {
        let m = StreamMonitor::default();
        m.scan_startup(b"Exceeded MaxStartups\r\n");
        assert_eq!(
            m.startup(),
            (
                Startup::BeforeIdentification,
                "Exceeded MaxStartups".to_string()
            )
        );
        m.scan_startup(b"SSH-2.0-x\r\n\0\0\0\x01z");
        assert_eq!(m.startup().0, Startup::KexStarted);
        assert!(m.kex_started.load(Ordering::Relaxed));
    }
}
