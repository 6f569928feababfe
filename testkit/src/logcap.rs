//! Capturing every log line, at TRACE, of our crates (`tracing`) and of russh (`log`,
//! forwarded to `tracing`), into a buffer a test can search.

use std::io;
use std::sync::{Arc, Mutex};

use tracing::subscriber::DefaultGuard;
use tracing_subscriber::fmt::MakeWriter;

/// The shared buffer the subscriber writes into.
#[derive(Debug, Clone, Default)]
pub struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffer {
    type Writer = Buffer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn subscriber(buf: Buffer) -> impl tracing::Subscriber + Send + Sync {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_target(true)
        .with_writer(buf)
        .finish()
}

/// Forwards `log` records (russh's) to `tracing`. Process-wide and idempotent.
fn forward_log() {
    // Fails only if a logger is already installed (another capture in this process did it).
    let _ = tracing_log::LogTracer::init();
}

/// A capture for the current thread only (a current-thread tokio runtime runs every task
/// there; `spawn_blocking` threads are not captured). Ends when dropped.
#[derive(Debug)]
pub struct ScopedCapture {
    /// What was captured.
    pub buffer: Buffer,
    _guard: DefaultGuard,
}

impl ScopedCapture {
    /// Starts capturing.
    pub fn start() -> ScopedCapture {
        forward_log();
        let buffer = Buffer::default();
        let guard = tracing::subscriber::set_default(subscriber(buffer.clone()));
        ScopedCapture {
            buffer,
            _guard: guard,
        }
    }
}

/// Captures every thread of the process from now on, or `None` if a global subscriber is
/// already installed (use one test binary per global capture).
pub fn capture_globally() -> Option<Buffer> {
    forward_log();
    let buffer = Buffer::default();
    tracing::subscriber::set_global_default(subscriber(buffer.clone()))
        .ok()
        .map(|()| buffer)
}
