//! Channels whose incoming messages are always drained.
//!
//! russh delivers a channel's messages through a bounded queue that its single session task
//! fills; when a queue is full the session task waits, and with it every other channel of the
//! connection. So every channel here gets a drain task that reads that queue promptly, no
//! matter what the application does:
//!
//! * stdout (and forwarded data) go to a per-channel byte queue the reader consumes; above
//!   [`TransportConfig::stdout_memory_limit`](crate::TransportConfig::stdout_memory_limit)
//!   unread bytes, new data goes to an unlinked temporary file (if enabled) and is read back
//!   from there in order;
//! * stderr goes to a tail ring buffer (the last N KiB, what explains a dead remote
//!   process) and, optionally, to a bounded chunk queue for a log consumer that drops and
//!   counts when the consumer is behind;
//! * window adjustments, exit status, EOF and close are recorded.
//!
//! When the [`ExecChannel`] and every part taken from it are dropped, the drain task sends
//! CHANNEL_CLOSE (a dropped russh `Channel` does not, leaking an sshd session slot until the
//! connection ends) and exits.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::task::AtomicWaker;
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{ExecOptions, StdoutSpill};
use crate::connection::{ConnInner, ConnShared, classify_with};
use crate::error::{DisconnectCause, Stage, TransportError};

/// How long the drain task waits to hand CHANNEL_CLOSE to the session task.
const CLOSE_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a channel that lost its connection waits for the connection's end cause.
const LOST_CAUSE_GRACE: Duration = Duration::from_secs(5);

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code (127: command not found, under a POSIX shell).
    Code(u32),
    /// It was killed by a signal.
    Signal {
        /// Signal name without `SIG` (`KILL`, `TERM`, `SEGV`, ...).
        name: String,
        /// Whether it dumped core.
        core_dumped: bool,
        /// The server's message, often empty.
        message: String,
    },
    /// The channel closed without an exit status (the server or the connection went away,
    /// or this is not an exec channel).
    ClosedWithoutStatus,
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal {
                name,
                core_dumped,
                message,
            } => {
                write!(f, "killed by SIG{name}")?;
                if *core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            ExitStatus::ClosedWithoutStatus => f.write_str("closed without exit status"),
        }
    }
}

/// Per-channel statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelStats {
    /// Stdout bytes received.
    pub stdout_bytes: u64,
    /// Stderr bytes received.
    pub stderr_bytes: u64,
    /// Stdin bytes sent.
    pub stdin_bytes: u64,
    /// Unread stdout in memory now.
    pub stdout_buffered: u64,
    /// Unread stdout in the spill file now.
    pub stdout_spilled_pending: u64,
    /// Stdout bytes that ever went to the spill file.
    pub stdout_spilled_total: u64,
    /// Stderr chunks the log consumer missed because its queue was full.
    pub stderr_log_dropped: u64,
}

// ===== stdout buffer =====

enum Segment {
    Mem(Bytes),
    File { off: u64, len: u64 },
}

enum Finish {
    Eof,
    Lost(DisconnectCause),
}

/// The unread stdout of one channel: an ordered queue of in-memory chunks and ranges of a
/// spill file.
struct StdoutBuf {
    segments: VecDeque<Segment>,
    mem_bytes: usize,
    mem_limit: usize,
    spill: StdoutSpill,
    spill_broken: bool,
    file: Option<File>,
    file_write_off: u64,
    file_pending: u64,
    spilled_total: u64,
    finish: Option<Finish>,
    waker: Option<Waker>,
}

impl StdoutBuf {
    fn new(mem_limit: usize, spill: StdoutSpill) -> Self {
        StdoutBuf {
            segments: VecDeque::new(),
            mem_bytes: 0,
            mem_limit,
            spill,
            spill_broken: false,
            file: None,
            file_write_off: 0,
            file_pending: 0,
            spilled_total: 0,
            finish: None,
            waker: None,
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Appends; returns `(bytes kept in memory, bytes spilled)` for the counters.
    ///
    /// Spill writes are synchronous `pwrite`s of at most one SSH packet into an unlinked
    /// file, i.e. page-cache copies; they happen only while the reader is behind by more
    /// than the memory limit.
    fn push(&mut self, data: Bytes) -> (usize, usize) {
        let len = data.len();
        if self.mem_bytes + len > self.mem_limit
            && !self.spill_broken
            && let StdoutSpill::TempFile(dir) = &self.spill
        {
            match self.spill_write(&data, dir.clone()) {
                Ok(()) => {
                    self.wake();
                    return (0, len);
                }
                Err(e) => {
                    tracing::warn!(
                        "stdout spill file failed, keeping unread output in memory: {e}"
                    );
                    self.spill_broken = true;
                }
            }
        }
        self.mem_bytes += len;
        self.segments.push_back(Segment::Mem(data));
        self.wake();
        (len, 0)
    }

    fn spill_write(&mut self, data: &[u8], dir: Option<PathBuf>) -> io::Result<()> {
        if self.file.is_none() {
            let f = match dir {
                Some(d) => tempfile::tempfile_in(d)?,
                None => tempfile::tempfile()?,
            };
            self.file = Some(f);
        }
        let off = self.file_write_off;
        if let Some(f) = &self.file {
            f.write_all_at(data, off)?;
        }
        let len = data.len() as u64;
        self.file_write_off += len;
        self.file_pending += len;
        self.spilled_total += len;
        match self.segments.back_mut() {
            Some(Segment::File { off: o, len: l }) if *o + *l == off => *l += len,
            _ => self.segments.push_back(Segment::File { off, len }),
        }
        Ok(())
    }

    fn finish(&mut self, f: Finish) {
        if self.finish.is_none() {
            self.finish = Some(f);
        }
        self.wake();
    }

    /// Copies as much as fits. Returns bytes copied from memory (for the gauge).
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> (Poll<io::Result<()>>, usize) {
        let mut from_mem = 0usize;
        let mut copied = 0usize;
        while buf.remaining() > 0 {
            match self.segments.front_mut() {
                None => break,
                Some(Segment::Mem(b)) => {
                    let n = b.len().min(buf.remaining());
                    buf.put_slice(&b[..n]);
                    b.advance(n);
                    from_mem += n;
                    copied += n;
                    self.mem_bytes -= n;
                    if b.is_empty() {
                        self.segments.pop_front();
                    }
                }
                // Hand out what came from memory first, so that a failing file read never
                // swallows bytes already copied.
                Some(Segment::File { .. }) if copied > 0 => break,
                Some(Segment::File { off, len }) => {
                    let want = usize::try_from(*len)
                        .unwrap_or(usize::MAX)
                        .min(buf.remaining());
                    let Some(file) = &self.file else {
                        return (
                            Poll::Ready(Err(io::Error::other("spill file missing"))),
                            from_mem,
                        );
                    };
                    let dst = buf.initialize_unfilled_to(want);
                    if let Err(e) = file.read_exact_at(dst, *off) {
                        return (
                            Poll::Ready(Err(io::Error::new(
                                e.kind(),
                                format!("reading stdout spill file: {e}"),
                            ))),
                            from_mem,
                        );
                    }
                    buf.advance(want);
                    copied += want;
                    *off += want as u64;
                    *len -= want as u64;
                    self.file_pending -= want as u64;
                    if *len == 0 {
                        self.segments.pop_front();
                    }
                    if self.file_pending == 0 {
                        // All spilled data consumed: start the file over.
                        self.file_write_off = 0;
                        if let Some(f) = &self.file
                            && let Err(e) = f.set_len(0)
                        {
                            tracing::debug!("truncating stdout spill file: {e}");
                        }
                    }
                }
            }
        }
        if copied > 0 {
            return (Poll::Ready(Ok(())), from_mem);
        }
        match &self.finish {
            Some(Finish::Eof) => (Poll::Ready(Ok(())), 0),
            Some(Finish::Lost(cause)) => (
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("SSH connection lost before end of output: {cause}"),
                ))),
                0,
            ),
            None => {
                self.waker = Some(cx.waker().clone());
                (Poll::Pending, 0)
            }
        }
    }
}

// ===== stderr tail =====

struct TailRing {
    buf: VecDeque<u8>,
    cap: usize,
}

impl TailRing {
    fn push(&mut self, data: &[u8]) {
        if self.cap == 0 {
            return;
        }
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend(&data[data.len() - self.cap..]);
            return;
        }
        self.buf.extend(data);
        let excess = self.buf.len().saturating_sub(self.cap);
        self.buf.drain(..excess);
    }
}

// ===== shared channel state =====

#[derive(Debug, Clone, Default)]
struct ChanState {
    exec_reply: Option<bool>,
    exit: Option<ExitStatus>,
    closed: bool,
    lost: Option<DisconnectCause>,
}

pub(crate) struct ChannelCore {
    conn: Arc<ConnInner>,
    stdout: Mutex<StdoutBuf>,
    stderr: Mutex<TailRing>,
    state: watch::Sender<ChanState>,
    /// Set once nothing more can be written: closed by either side or connection lost.
    write_closed: AtomicBool,
    writer_waker: AtomicWaker,
    eof_sent: AtomicBool,
    stdout_bytes: AtomicU64,
    stderr_bytes: AtomicU64,
    stdin_bytes: AtomicU64,
    stderr_log_dropped: AtomicU64,
}

impl ChannelCore {
    fn shared(&self) -> &ConnShared {
        &self.conn.shared
    }

    fn stats(&self) -> ChannelStats {
        let (buffered, pending, spilled) = self
            .stdout
            .lock()
            .map(|s| (s.mem_bytes as u64, s.file_pending, s.spilled_total))
            .unwrap_or_default();
        ChannelStats {
            stdout_bytes: self.stdout_bytes.load(Ordering::Relaxed),
            stderr_bytes: self.stderr_bytes.load(Ordering::Relaxed),
            stdin_bytes: self.stdin_bytes.load(Ordering::Relaxed),
            stdout_buffered: buffered,
            stdout_spilled_pending: pending,
            stdout_spilled_total: spilled,
            stderr_log_dropped: self.stderr_log_dropped.load(Ordering::Relaxed),
        }
    }

    fn close_for_write(&self) {
        self.write_closed.store(true, Ordering::SeqCst);
        self.writer_waker.wake();
    }
}

impl Drop for ChannelCore {
    fn drop(&mut self) {
        // Release this channel's share of the connection-wide buffered-bytes gauge.
        if let Ok(s) = self.stdout.lock() {
            self.conn
                .shared
                .counters
                .stdout_buffered
                .fetch_sub(s.mem_bytes as u64, Ordering::Relaxed);
        }
    }
}

/// Dropping the last clone tells the drain task that nobody uses the channel any more.
struct Lease {
    _abandon: oneshot::Sender<()>,
}

// ===== drain task =====

enum DrainEnd {
    Closed,
    Abandoned,
    Lost,
}

/// Handles one message; `discard` drops stdout (nobody will read it). Returns true when the
/// channel is closed.
fn handle_msg(
    core: &ChannelCore,
    msg: ChannelMsg,
    log: &mut Option<mpsc::Sender<Bytes>>,
    discard: bool,
) -> bool {
    let shared = core.shared();
    match msg {
        ChannelMsg::Data { data } => {
            let len = data.len() as u64;
            core.stdout_bytes.fetch_add(len, Ordering::Relaxed);
            shared.counters.bytes_in.fetch_add(len, Ordering::Relaxed);
            if discard {
                return false;
            }
            if let Ok(mut out) = core.stdout.lock() {
                let (to_mem, spilled) = out.push(data);
                let c = &shared.counters;
                c.stdout_buffered
                    .fetch_add(to_mem as u64, Ordering::Relaxed);
                c.stdout_spilled
                    .fetch_add(spilled as u64, Ordering::Relaxed);
            }
        }
        ChannelMsg::ExtendedData { data, ext } => {
            if ext != 1 {
                tracing::debug!("extended data type {ext} treated as stderr");
            }
            let len = data.len() as u64;
            core.stderr_bytes.fetch_add(len, Ordering::Relaxed);
            shared.counters.bytes_in.fetch_add(len, Ordering::Relaxed);
            if let Ok(mut tail) = core.stderr.lock() {
                tail.push(&data);
            }
            if let Some(tx) = log {
                match tx.try_send(data) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        core.stderr_log_dropped.fetch_add(1, Ordering::Relaxed);
                        shared
                            .counters
                            .stderr_log_dropped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    // The consumer is gone; stop offering.
                    Err(mpsc::error::TrySendError::Closed(_)) => *log = None,
                }
            }
        }
        ChannelMsg::Eof => {
            if let Ok(mut out) = core.stdout.lock() {
                out.finish(Finish::Eof);
            }
        }
        ChannelMsg::ExitStatus { exit_status } => {
            core.state
                .send_modify(|s| s.exit = Some(ExitStatus::Code(exit_status)));
        }
        ChannelMsg::ExitSignal {
            signal_name,
            core_dumped,
            error_message,
            ..
        } => {
            let name = signal_name_of(&signal_name);
            core.state.send_modify(|s| {
                s.exit = Some(ExitStatus::Signal {
                    name,
                    core_dumped,
                    message: error_message,
                });
            });
        }
        ChannelMsg::Success => core.state.send_modify(|s| s.exec_reply = Some(true)),
        ChannelMsg::Failure => core.state.send_modify(|s| s.exec_reply = Some(false)),
        ChannelMsg::Close => return true,
        // WindowAdjusted (the writer's window lives in russh's shared counter), XonXoff, ...
        _ => {}
    }
    false
}

fn signal_name_of(sig: &russh::Sig) -> String {
    use russh::Sig;
    match sig {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(s) => s.clone(),
    }
}

async fn drain(
    mut rx: ChannelReadHalf,
    write: ChannelWriteHalf<Msg>,
    core: Arc<ChannelCore>,
    mut abandoned: oneshot::Receiver<()>,
    mut log: Option<mpsc::Sender<Bytes>>,
    on_drop: OnDrop,
) {
    let mut end = loop {
        tokio::select! {
            // Checked first so that a channel streaming data non-stop still notices that
            // nobody wants it any more.
            biased;
            _ = &mut abandoned => break DrainEnd::Abandoned,
            msg = rx.wait() => match msg {
                Some(msg) => {
                    if handle_msg(&core, msg, &mut log, false) {
                        break DrainEnd::Closed;
                    }
                }
                None => break DrainEnd::Lost,
            },
        }
    };
    if let DrainEnd::Abandoned = end {
        end = abandon(&mut rx, &write, &core, on_drop).await;
    }
    core.close_for_write();
    // Counted as closed before anyone waiting on the state below is woken, so that
    // `exit()` returning implies `channels_open` no longer includes this channel.
    core.shared()
        .counters
        .channels_open
        .fetch_sub(1, Ordering::Relaxed);
    match end {
        DrainEnd::Closed | DrainEnd::Abandoned => {
            if let Ok(mut out) = core.stdout.lock() {
                out.finish(Finish::Eof);
            }
            core.state.send_modify(|s| s.closed = true);
        }
        DrainEnd::Lost => {
            let cause = core.shared().wait_cause(LOST_CAUSE_GRACE).await;
            if let Ok(mut out) = core.stdout.lock() {
                out.finish(Finish::Lost(cause.clone()));
            }
            core.state.send_modify(|s| s.lost = Some(cause));
        }
    }
}

/// What to do with the remote side when every handle of a channel is dropped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OnDrop {
    /// Signal the remote command (TERM, then KILL after `grace`).
    terminate: bool,
    /// How long to wait for the server to close the channel before closing it ourselves.
    grace: Duration,
}

/// Nobody uses the channel any more. sshd keeps a session (and its `MaxSessions` slot) until
/// the command has exited, whatever we send, so: ask the command to stop (SIGTERM, EOF on
/// its stdin), keep draining until the server closes the channel (which it does once the
/// command has exited and been reaped), and after `grace` escalate to SIGKILL and close the
/// channel ourselves. Output arriving meanwhile is counted and discarded.
async fn abandon(
    rx: &mut ChannelReadHalf,
    write: &ChannelWriteHalf<Msg>,
    core: &ChannelCore,
    on_drop: OnDrop,
) -> DrainEnd {
    let send = |what: &'static str,
                r: Result<Result<(), russh::Error>, tokio::time::error::Elapsed>| {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("sending {what} on an abandoned channel failed: {e}"),
            Err(_) => tracing::warn!("could not send {what} within {CLOSE_SEND_TIMEOUT:?}"),
        }
    };
    let exited = || core.state.borrow().exit.is_some();
    if on_drop.terminate && !exited() {
        send(
            "signal TERM",
            tokio::time::timeout(CLOSE_SEND_TIMEOUT, write.signal(russh::Sig::TERM)).await,
        );
    }
    if !core.eof_sent.swap(true, Ordering::SeqCst) {
        send(
            "EOF",
            tokio::time::timeout(CLOSE_SEND_TIMEOUT, write.eof()).await,
        );
    }
    let mut log = None;
    let deadline = tokio::time::Instant::now() + on_drop.grace;
    loop {
        match tokio::time::timeout_at(deadline, rx.wait()).await {
            Ok(Some(msg)) => {
                if handle_msg(core, msg, &mut log, true) {
                    return DrainEnd::Closed;
                }
            }
            Ok(None) => return DrainEnd::Lost,
            Err(_) => break,
        }
    }
    if on_drop.terminate && !exited() {
        tracing::debug!(
            "remote command ignored SIGTERM for {:?}; sending SIGKILL",
            on_drop.grace
        );
        send(
            "signal KILL",
            tokio::time::timeout(CLOSE_SEND_TIMEOUT, write.signal(russh::Sig::KILL)).await,
        );
    }
    // After our CLOSE russh forgets the channel, so nothing more arrives here (not even the
    // server's CLOSE): stop reading.
    send(
        "CHANNEL_CLOSE",
        tokio::time::timeout(CLOSE_SEND_TIMEOUT, write.close()).await,
    );
    DrainEnd::Abandoned
}

// ===== assembling a channel =====

/// The pieces of a freshly drained channel.
pub(crate) struct ChannelParts {
    stdin: ChannelStdin,
    stdout: ChannelStdout,
    status: ExecStatus,
    log: Option<StderrLog>,
    write: Option<ChannelWriteHalf<Msg>>,
    start: Option<DrainStart>,
}

struct DrainStart {
    rx: ChannelReadHalf,
    abandoned: oneshot::Receiver<()>,
    log_tx: Option<mpsc::Sender<Bytes>>,
    on_drop: OnDrop,
}

impl ChannelParts {
    fn build(
        conn: Arc<ConnInner>,
        channel: russh::Channel<Msg>,
        log_capacity: Option<usize>,
        on_drop: OnDrop,
    ) -> Self {
        let (rx, write) = channel.split();
        let cfg = &conn.config;
        let core = Arc::new(ChannelCore {
            stdout: Mutex::new(StdoutBuf::new(
                cfg.stdout_memory_limit,
                cfg.stdout_spill.clone(),
            )),
            stderr: Mutex::new(TailRing {
                buf: VecDeque::new(),
                cap: cfg.stderr_tail_bytes,
            }),
            state: watch::Sender::new(ChanState::default()),
            write_closed: AtomicBool::new(false),
            writer_waker: AtomicWaker::new(),
            eof_sent: AtomicBool::new(false),
            stdout_bytes: AtomicU64::new(0),
            stderr_bytes: AtomicU64::new(0),
            stdin_bytes: AtomicU64::new(0),
            stderr_log_dropped: AtomicU64::new(0),
            conn,
        });
        let (abandon_tx, abandoned) = oneshot::channel();
        let lease = Arc::new(Lease {
            _abandon: abandon_tx,
        });
        let (log_tx, log) = match log_capacity {
            Some(cap) => {
                let (tx, rx) = mpsc::channel(cap.max(1));
                (Some(tx), Some(StderrLog { rx }))
            }
            None => (None, None),
        };
        ChannelParts {
            stdin: ChannelStdin {
                inner: Box::new(write.make_writer()),
                core: core.clone(),
                _lease: lease.clone(),
            },
            stdout: ChannelStdout {
                core: core.clone(),
                _lease: lease.clone(),
            },
            status: ExecStatus {
                core,
                _lease: lease,
            },
            log,
            write: Some(write),
            start: Some(DrainStart {
                rx,
                abandoned,
                log_tx,
                on_drop,
            }),
        }
    }

    fn start_drain(&mut self) {
        if let (Some(start), Some(write)) = (self.start.take(), self.write.take()) {
            tokio::spawn(drain(
                start.rx,
                write,
                self.status.core.clone(),
                start.abandoned,
                start.log_tx,
                start.on_drop,
            ));
        }
    }

    /// Builds the parts and starts draining at once (direct-tcpip: on drop, EOF and CLOSE
    /// straight away; there is no command to wait for).
    pub(crate) fn spawn(conn: Arc<ConnInner>, channel: russh::Channel<Msg>) -> Self {
        let on_drop = OnDrop {
            terminate: false,
            grace: Duration::ZERO,
        };
        let mut parts = Self::build(conn, channel, None, on_drop);
        parts.start_drain();
        parts
    }
}

/// Sends the exec request, starts draining, and waits for the server's answer.
pub(crate) async fn start_exec(
    conn: Arc<ConnInner>,
    channel: russh::Channel<Msg>,
    command: &str,
    options: ExecOptions,
) -> Result<ExecChannel, TransportError> {
    let exec_timeout = conn.config.exec_timeout;
    let shared = conn.shared.clone();
    let on_drop = OnDrop {
        terminate: options.terminate_on_drop,
        grace: conn.config.close_grace,
    };
    let mut parts = ChannelParts::build(conn, channel, options.stderr_log_capacity, on_drop);
    // The request goes out before the drain task starts; the answer waits in russh's
    // channel queue until it does.
    let sent = match &parts.write {
        Some(w) => tokio::time::timeout(exec_timeout, w.exec(true, command)).await,
        None => Ok(Ok(())),
    };
    parts.start_drain();
    match sent {
        Err(_) => {
            return Err(TransportError::Timeout {
                stage: Stage::Exec,
                after: exec_timeout,
            });
        }
        Ok(Err(e)) => return Err(classify_with(&shared, Stage::Exec, e).await),
        Ok(Ok(())) => {}
    }
    let mut state = parts.status.core.state.subscribe();
    let answered = tokio::time::timeout(
        exec_timeout,
        state.wait_for(|s| s.exec_reply.is_some() || s.closed || s.lost.is_some()),
    )
    .await;
    let s = match answered {
        Err(_) => {
            return Err(TransportError::Timeout {
                stage: Stage::Exec,
                after: exec_timeout,
            });
        }
        Ok(Err(_)) => ChanState::default(),
        Ok(Ok(s)) => s.clone(),
    };
    match (s.exec_reply, s.lost) {
        (Some(true), _) => Ok(ExecChannel {
            stdin: parts.stdin,
            stdout: parts.stdout,
            status: parts.status,
            log: parts.log,
        }),
        (_, Some(cause)) => Err(TransportError::Disconnected {
            stage: Stage::Exec,
            cause,
        }),
        _ => Err(TransportError::ExecRejected {
            command: command.to_string(),
        }),
    }
}

// ===== public channel types =====

/// The remote command's stdin. `shutdown()` sends EOF.
///
/// Writes go out in chunks of at most one SSH packet (russh's writer never sends more than
/// the peer's maximum packet size per message), so no single write can straddle a rekey
/// (russh#761). A write to a channel the server has closed fails with `BrokenPipe` instead of
/// waiting for window that will never come.
pub struct ChannelStdin {
    inner: Box<dyn AsyncWrite + Send + Sync + Unpin>,
    core: Arc<ChannelCore>,
    _lease: Arc<Lease>,
}

impl ChannelStdin {
    fn closed_error(&self) -> io::Error {
        let state = self.core.state.borrow().clone();
        match state.lost {
            Some(cause) => io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("SSH connection lost: {cause}"),
            ),
            None => io::Error::new(
                io::ErrorKind::BrokenPipe,
                "SSH channel closed by the server",
            ),
        }
    }
}

impl AsyncWrite for ChannelStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.core.write_closed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(self.closed_error()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.core.stdin_bytes.fetch_add(n as u64, Ordering::Relaxed);
                this.core
                    .shared()
                    .counters
                    .bytes_out
                    .fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.core.writer_waker.register(cx.waker());
                if this.core.write_closed.load(Ordering::SeqCst) {
                    return Poll::Ready(Err(this.closed_error()));
                }
                Poll::Pending
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.core.eof_sent.load(Ordering::SeqCst)
            || self.core.write_closed.load(Ordering::SeqCst)
        {
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Ready(Ok(())) => {
                this.core.eof_sent.store(true, Ordering::SeqCst);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.core.writer_waker.register(cx.waker());
                if this.core.write_closed.load(Ordering::SeqCst) {
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

/// The remote command's stdout (or a forwarded connection's data). Reads never block the
/// connection: data is already buffered by the drain task. End-of-file means the server sent
/// EOF or closed the channel; a lost connection is an error (`ConnectionAborted`) so it is
/// never mistaken for a complete output.
pub struct ChannelStdout {
    core: Arc<ChannelCore>,
    _lease: Arc<Lease>,
}

impl AsyncRead for ChannelStdout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (poll, from_mem) = match self.core.stdout.lock() {
            Ok(mut out) => out.poll_read(cx, buf),
            Err(_) => (
                Poll::Ready(Err(io::Error::other("stdout buffer poisoned"))),
                0,
            ),
        };
        if from_mem > 0 {
            self.core
                .shared()
                .counters
                .stdout_buffered
                .fetch_sub(from_mem as u64, Ordering::Relaxed);
        }
        poll
    }
}

/// Exit status, stderr tail and statistics of a channel. Cloneable; holding one keeps the
/// channel open (so the exit status can still arrive).
#[derive(Clone)]
pub struct ExecStatus {
    core: Arc<ChannelCore>,
    _lease: Arc<Lease>,
}

impl ExecStatus {
    /// Waits until the channel is closed and returns how the command ended. The wait is
    /// bounded by the connection: if it dies (keepalive, reset), this returns
    /// [`TransportError::Disconnected`] unless the exit status had already arrived.
    pub async fn exit(&self) -> Result<ExitStatus, TransportError> {
        let mut rx = self.core.state.subscribe();
        let s = match rx.wait_for(|s| s.closed || s.lost.is_some()).await {
            Ok(s) => s.clone(),
            Err(_) => self.core.state.borrow().clone(),
        };
        match (s.exit, s.lost) {
            (Some(exit), _) => Ok(exit),
            (None, Some(cause)) => Err(TransportError::Disconnected {
                stage: Stage::Connected,
                cause,
            }),
            (None, None) => Ok(ExitStatus::ClosedWithoutStatus),
        }
    }

    /// The exit status if it has arrived.
    pub fn try_exit(&self) -> Option<ExitStatus> {
        self.core.state.borrow().exit.clone()
    }

    /// Whether the channel is closed (by either side) or its connection is lost.
    pub fn is_closed(&self) -> bool {
        let s = self.core.state.borrow();
        s.closed || s.lost.is_some()
    }

    /// A future that resolves once the channel is closed (by either side; after the last
    /// handle is dropped, once the drain task has ended it, see the crate docs on closing) or
    /// its connection is lost. Unlike `ExecStatus` itself it does not keep the channel open,
    /// so a pool can drop every handle and still learn when the server's session slot is
    /// free again.
    pub fn closed_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.core.state.subscribe();
        async move {
            // An error means the drain task and every handle are gone: closed too.
            let _ = rx.wait_for(|s| s.closed || s.lost.is_some()).await;
        }
    }

    /// The last `stderr_tail_bytes` of stderr.
    pub fn stderr_tail(&self) -> Vec<u8> {
        self.core
            .stderr
            .lock()
            .map(|t| t.buf.iter().copied().collect())
            .unwrap_or_default()
    }

    /// [`stderr_tail`](Self::stderr_tail) as text (invalid UTF-8 replaced).
    pub fn stderr_tail_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr_tail()).into_owned()
    }

    /// Statistics of this channel.
    pub fn stats(&self) -> ChannelStats {
        self.core.stats()
    }
}

/// Stderr chunks for a log consumer, in order, with gaps where the consumer fell behind
/// (see [`ChannelStats::stderr_log_dropped`]). Ends when the channel closes.
pub struct StderrLog {
    rx: mpsc::Receiver<Bytes>,
}

impl StderrLog {
    /// The next chunk, or `None` once the channel is closed and everything was received.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }
}

/// A running remote command: stdin, stdout, stderr tail and exit status.
///
/// It is itself an `AsyncRead` (stdout) + `AsyncWrite` (stdin), so it can be handed to a
/// protocol driver as one byte stream. The channel is closed (CHANNEL_CLOSE sent) when this
/// and every part taken from it are dropped.
pub struct ExecChannel {
    stdin: ChannelStdin,
    stdout: ChannelStdout,
    status: ExecStatus,
    log: Option<StderrLog>,
}

impl ExecChannel {
    /// The stdin writer.
    pub fn stdin(&mut self) -> &mut ChannelStdin {
        &mut self.stdin
    }

    /// The stdout reader.
    pub fn stdout(&mut self) -> &mut ChannelStdout {
        &mut self.stdout
    }

    /// Exit status, stderr and statistics.
    pub fn status(&self) -> &ExecStatus {
        &self.status
    }

    /// Shorthand for `status().exit()`.
    pub async fn exit(&self) -> Result<ExitStatus, TransportError> {
        self.status.exit().await
    }

    /// Shorthand for `status().stderr_tail()`.
    pub fn stderr_tail(&self) -> Vec<u8> {
        self.status.stderr_tail()
    }

    /// Shorthand for `status().stats()`.
    pub fn stats(&self) -> ChannelStats {
        self.status.stats()
    }

    /// The stderr log queue, if [`ExecOptions::stderr_log_capacity`] was set (once).
    pub fn take_stderr_log(&mut self) -> Option<StderrLog> {
        self.log.take()
    }

    /// Splits into independently owned parts (e.g. a writer task and a reader task).
    pub fn into_parts(self) -> (ChannelStdin, ChannelStdout, ExecStatus) {
        (self.stdin, self.stdout, self.status)
    }
}

impl AsyncRead for ExecChannel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for ExecChannel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

/// A `direct-tcpip` channel as a byte stream, drained like an exec channel. Usable as the
/// stream of [`crate::connect_over`].
pub struct TcpipStream {
    stdin: ChannelStdin,
    stdout: ChannelStdout,
    status: ExecStatus,
}

impl TcpipStream {
    pub(crate) fn new(parts: ChannelParts) -> Self {
        TcpipStream {
            stdin: parts.stdin,
            stdout: parts.stdout,
            status: parts.status,
        }
    }

    /// Statistics of the channel.
    pub fn stats(&self) -> ChannelStats {
        self.status.stats()
    }
}

impl AsyncRead for TcpipStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for TcpipStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

// ===== Debug =====

macro_rules! debug_via_core {
    ($($t:ty),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let core = &self.core();
                let state = core.state.borrow().clone();
                f.debug_struct(stringify!($t))
                    .field("exit", &state.exit)
                    .field("closed", &state.closed)
                    .field("lost", &state.lost)
                    .field("stats", &core.stats())
                    .finish()
            }
        }
    )*};
}

impl ChannelStdin {
    fn core(&self) -> &ChannelCore {
        &self.core
    }
}
impl ChannelStdout {
    fn core(&self) -> &ChannelCore {
        &self.core
    }
}
impl ExecStatus {
    fn core(&self) -> &ChannelCore {
        &self.core
    }
}
impl ExecChannel {
    fn core(&self) -> &ChannelCore {
        &self.status.core
    }
}
impl TcpipStream {
    fn core(&self) -> &ChannelCore {
        &self.status.core
    }
}
debug_via_core!(
    ChannelStdin,
    ChannelStdout,
    ExecStatus,
    ExecChannel,
    TcpipStream
);

impl std::fmt::Debug for StderrLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StderrLog").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(buf: &mut StdoutBuf, chunk: usize) -> Vec<u8> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        loop {
            let mut space = vec![0u8; chunk];
            let mut rb = ReadBuf::new(&mut space);
            match buf.poll_read(&mut cx, &mut rb).0 {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return out,
                Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => return out,
            }
        }
    }

    #[test]
    fn spill_keeps_order_and_bounds_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = StdoutBuf::new(10, StdoutSpill::TempFile(Some(dir.path().to_path_buf())));
        let mut expected = Vec::new();
        let mut spilled = 0;
        for i in 0u8..20 {
            let chunk: Vec<u8> = (0..7).map(|j| i.wrapping_mul(7).wrapping_add(j)).collect();
            expected.extend_from_slice(&chunk);
            let (_, s) = b.push(Bytes::from(chunk));
            spilled += s;
            assert!(b.mem_bytes <= 10);
        }
        assert!(spilled > 0);
        // Read part, push more (goes after the spilled data), then read the rest.
        let first = read_all(&mut b, 3).len();
        assert_eq!(first, expected.len());
        b.push(Bytes::from_static(b"tail"));
        expected.extend_from_slice(b"tail");
        b.finish(Finish::Eof);
        let mut again = StdoutBuf::new(10, StdoutSpill::TempFile(Some(dir.path().to_path_buf())));
        let mut all = Vec::new();
        for (i, c) in expected.chunks(5).enumerate() {
            again.push(Bytes::copy_from_slice(c));
            if i % 3 == 0 {
                all.extend(read_all(&mut again, 4));
            }
        }
        again.finish(Finish::Eof);
        all.extend(read_all(&mut again, 64));
        assert_eq!(all, expected);
        assert_eq!(again.file_pending, 0);
    }

    #[test]
    fn without_spill_memory_grows_but_is_counted() {
        let mut b = StdoutBuf::new(4, StdoutSpill::Disabled);
        assert_eq!(b.push(Bytes::from_static(b"0123456789")), (10, 0));
        assert_eq!(b.mem_bytes, 10);
        b.finish(Finish::Eof);
        assert_eq!(read_all(&mut b, 3), b"0123456789");
    }

    #[test]
    fn tail_ring_keeps_last_bytes() {
        let mut t = TailRing {
            buf: VecDeque::new(),
            cap: 5,
        };
        t.push(b"abc");
        t.push(b"defg");
        assert_eq!(t.buf.iter().copied().collect::<Vec<_>>(), b"cdefg");
        t.push(b"0123456789");
        assert_eq!(t.buf.iter().copied().collect::<Vec<_>>(), b"56789");
    }
}
