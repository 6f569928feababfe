//! Sessions over a local child process's pipes: `nix-daemon --stdio` as the local store when
//! running as root without a daemon, and real Nix peers in tests.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::conn::{BoxReader, BoxWriter, RemoteDiagnostics};

/// The last bytes a process wrote to stderr, kept for error messages, plus its exit status.
#[derive(Debug, Default)]
struct TailState {
    tail: VecDeque<u8>,
    closed: bool,
    exit: Option<String>,
}

/// Shared view of a child's stderr tail and exit, used as [`RemoteDiagnostics`].
#[derive(Debug, Clone)]
pub struct StderrTail {
    state: Arc<Mutex<TailState>>,
    notify: Arc<tokio::sync::Notify>,
    cap: usize,
}

impl StderrTail {
    /// An empty tail keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        StderrTail {
            state: Arc::new(Mutex::new(TailState::default())),
            notify: Arc::new(tokio::sync::Notify::new()),
            cap,
        }
    }

    /// Appends bytes, dropping the oldest beyond the cap.
    pub fn push(&self, data: &[u8]) {
        if let Ok(mut s) = self.state.lock() {
            s.tail.extend(data);
            let excess = s.tail.len().saturating_sub(self.cap);
            s.tail.drain(..excess);
        }
    }

    /// Records the end of the stream and, when known, how the process ended.
    pub fn close(&self, exit: Option<String>) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
            if exit.is_some() {
                s.exit = exit;
            }
        }
        self.notify.notify_waiters();
    }

    /// The tail as text.
    pub fn text(&self) -> String {
        self.state
            .lock()
            .map(|s| {
                let (a, b) = s.tail.as_slices();
                let mut v = a.to_vec();
                v.extend_from_slice(b);
                String::from_utf8_lossy(&v).into_owned()
            })
            .unwrap_or_default()
    }

    fn is_closed(&self) -> bool {
        self.state.lock().map(|s| s.closed).unwrap_or(true)
    }
}

impl RemoteDiagnostics for StderrTail {
    fn explain(&self) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
        Box::pin(async move {
            // The remote closed stdout; its last words may still be in flight on stderr.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while !self.is_closed() {
                let notified = self.notify.notified();
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    break;
                }
            }
            let text = self.text();
            let text = text.trim();
            let exit = self.state.lock().ok().and_then(|s| s.exit.clone());
            match (text.is_empty(), exit) {
                (true, None) => None,
                (true, Some(e)) => Some(e),
                (false, None) => Some(text.to_owned()),
                (false, Some(e)) => Some(format!("{text} ({e})")),
            }
        })
    }
}

/// A spawned peer process: its pipes, ready for a session, and its stderr tail.
pub struct ChildPipes {
    /// The child's stdout.
    pub reader: BoxReader,
    /// The child's stdin.
    pub writer: BoxWriter,
    /// Stderr tail and exit status (drained by a background task, so the child never blocks
    /// on a full stderr pipe).
    pub stderr: StderrTail,
    /// Receives every stderr chunk as it arrives (for serve build logs); bounded, and chunks
    /// are dropped rather than blocking when nobody reads.
    pub stderr_chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
    /// Kills the child when dropped.
    pub guard: ChildGuard,
}

/// Kills and reaps the child on drop, so a cancelled session never leaves a process behind.
pub struct ChildGuard {
    kill: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
    }
}

/// Spawns `cmd` with piped stdio and starts draining its stderr.
pub fn spawn(mut cmd: Command) -> std::io::Result<ChildPipes> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child: Child = cmd.spawn()?;
    let missing = |what| std::io::Error::other(format!("child has no {what} pipe"));
    let stdin = child.stdin.take().ok_or_else(|| missing("stdin"))?;
    let stdout = child.stdout.take().ok_or_else(|| missing("stdout"))?;
    let mut stderr = child.stderr.take().ok_or_else(|| missing("stderr"))?;
    let tail = StderrTail::new(16 << 10);
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let t = tail.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    t.push(&buf[..n]);
                    let _ = tx.try_send(buf[..n].to_vec());
                }
            }
        }
        t.close(None);
    });
    let t = tail.clone();
    tokio::spawn(async move {
        let status = tokio::select! {
            s = child.wait() => s.ok(),
            _ = kill_rx => {
                let _ = child.start_kill();
                child.wait().await.ok()
            }
        };
        let exit = status.map(|s| match s.code() {
            Some(c) => format!("exit status {c}"),
            None => format!("terminated: {s}"),
        });
        t.close(exit);
    });
    Ok(ChildPipes {
        reader: Box::new(stdout),
        writer: Box::new(stdin),
        stderr: tail,
        stderr_chunks: rx,
        guard: ChildGuard {
            kill: Some(kill_tx),
        },
    })
}
