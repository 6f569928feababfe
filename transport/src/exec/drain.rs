//! The drain task: reads a channel's russh queue promptly whatever the application does,
//! answers barrier requests, and ends the channel once nobody uses it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::{mpsc, oneshot};

use super::state::{BarrierReply, ChannelCore, ExitStatus};
use super::stderr::{LogSender, Offered};
use super::stdout::Finish;

/// How long the drain task waits to hand CHANNEL_CLOSE to the session task.
const CLOSE_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a channel that lost its connection waits for the connection's end cause.
const LOST_CAUSE_GRACE: Duration = Duration::from_secs(5);

/// The variable a barrier's `env` request names (its value is the barrier's id). Once the
/// command runs, OpenSSH refuses `env` (`session.c` `session_input_channel_req` accepts it
/// only while the session is LARVAL), so the request changes nothing.
const BARRIER_ENV: &str = "NIXMUX_BARRIER";

enum DrainEnd {
    Closed,
    Abandoned,
    Lost,
}

/// What one message meant for the drain loop.
enum Handled {
    Open,
    /// EOF from the server.
    Eof,
    Closed,
    /// CHANNEL_SUCCESS (true) or CHANNEL_FAILURE: the answer to our oldest unanswered
    /// request (RFC 4254 §5.4: answers come in request order).
    Reply(bool),
}

/// Handles one message; `discard` drops stdout (nobody will read it).
async fn handle_msg(
    core: &ChannelCore,
    msg: ChannelMsg,
    log: &mut Option<LogSender>,
    discard: bool,
) -> Handled {
    if let Some(o) = &core.observer {
        o.heard();
    }
    let shared = core.shared();
    match msg {
        ChannelMsg::Data { data } => {
            let len = data.len() as u64;
            core.stdout_bytes.fetch_add(len, Ordering::Relaxed);
            shared.counters.bytes_in.fetch_add(len, Ordering::Relaxed);
            if discard {
                return Handled::Open;
            }
            core.stdout.push(data).await;
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
                match tx.data(data) {
                    Offered::Queued => {}
                    Offered::Dropped { bytes, lines } => {
                        core.stderr_log_dropped_bytes
                            .fetch_add(bytes, Ordering::Relaxed);
                        core.stderr_log_dropped_lines
                            .fetch_add(lines, Ordering::Relaxed);
                        let c = &shared.counters;
                        c.stderr_log_dropped_bytes
                            .fetch_add(bytes, Ordering::Relaxed);
                        c.stderr_log_dropped_lines
                            .fetch_add(lines, Ordering::Relaxed);
                    }
                    Offered::ConsumerGone => *log = None,
                }
            }
        }
        ChannelMsg::Eof => {
            core.stdout.finish(Finish::Eof);
            return Handled::Eof;
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
        ChannelMsg::Success => return Handled::Reply(true),
        ChannelMsg::Failure => return Handled::Reply(false),
        ChannelMsg::Close => return Handled::Closed,
        // WindowAdjusted (the writer's window lives in russh's shared counter), XonXoff, ...
        _ => {}
    }
    Handled::Open
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

/// Everything the drain task of one channel needs besides the shared core.
pub(super) struct DrainStart {
    pub(super) rx: ChannelReadHalf,
    pub(super) abandoned: oneshot::Receiver<()>,
    pub(super) log: Option<LogSender>,
    pub(super) barriers: mpsc::UnboundedReceiver<BarrierReply>,
    /// An exec request was sent before the drain started: the first CHANNEL_SUCCESS or
    /// CHANNEL_FAILURE answers it.
    pub(super) exec_reply_pending: bool,
    pub(super) on_drop: OnDrop,
}

type Sending<'w> = Pin<Box<dyn Future<Output = Result<(), russh::Error>> + Send + 'w>>;

/// Barrier requests, in the order the server answers them.
///
/// A request is handed to russh's session task by a send that can wait: its input queue
/// is short, and the session task may itself be waiting for room in this channel's queue.
/// So the send is polled alongside the channel's messages instead of awaited.
struct Barriers<'w> {
    write: &'w ChannelWriteHalf<Msg>,
    next_id: u64,
    /// Sent or being sent, oldest first: what the next replies answer.
    awaiting: VecDeque<(u64, BarrierReply)>,
    /// Asked for, not yet being sent.
    queued: VecDeque<BarrierReply>,
    sending: Option<Sending<'w>>,
}

impl<'w> Barriers<'w> {
    fn new(write: &'w ChannelWriteHalf<Msg>) -> Self {
        Barriers {
            write,
            next_id: 1,
            awaiting: VecDeque::new(),
            queued: VecDeque::new(),
            sending: None,
        }
    }

    fn request(&mut self, reply: BarrierReply) {
        self.queued.push_back(reply);
        self.send_next();
    }

    fn send_next(&mut self) {
        if self.sending.is_some() {
            return;
        }
        let Some(reply) = self.queued.pop_front() else {
            return;
        };
        let id = self.next_id;
        self.next_id += 1;
        // Awaiting from now on: its answer cannot come before the send completes.
        self.awaiting.push_back((id, reply));
        self.sending = Some(Box::pin(self.write.set_env(
            true,
            BARRIER_ENV,
            id.to_string(),
        )));
    }

    /// Completes when the current send has been handed to the session task.
    async fn sent(&mut self) {
        // Only a gone session task fails a send; the drain loop ends right after and
        // answers every waiter with the connection's end cause.
        if let Some(send) = &mut self.sending
            && let Err(e) = send.await
        {
            tracing::debug!("sending a barrier request failed: {e}");
        }
        self.sending = None;
        self.send_next();
    }

    /// Fails every request not answered yet.
    fn fail_all(
        &mut self,
        core: &ChannelCore,
        requests: &mut mpsc::UnboundedReceiver<BarrierReply>,
    ) {
        // Closed first, so that a request arriving from now on fails at once.
        requests.close();
        while let Ok(reply) = requests.try_recv() {
            self.queued.push_back(reply);
        }
        self.sending = None;
        let waiters = self.awaiting.drain(..).map(|(_, r)| r);
        for reply in waiters.chain(self.queued.drain(..)) {
            let _ = reply.send(Err(core.end_error("barrier")));
        }
    }
}

pub(super) async fn drain(start: DrainStart, write: ChannelWriteHalf<Msg>, core: Arc<ChannelCore>) {
    let DrainStart {
        mut rx,
        mut abandoned,
        mut log,
        barriers: mut barrier_requests,
        mut exec_reply_pending,
        on_drop,
    } = start;
    let mut barriers = Barriers::new(&write);
    // A server that sent EOF and the exit status but never closes the channel would leave
    // `exit()` waiting forever (RFC 4254 §5.3 only says it SHOULD close): after `grace` we
    // close it ourselves.
    let mut eof = false;
    let mut close_by: Option<tokio::time::Instant> = None;
    let grace = on_drop.grace.max(Duration::from_millis(500));
    let mut end = loop {
        if close_by.is_none() && eof && core.state.borrow().exit.is_some() {
            close_by = Some(tokio::time::Instant::now() + grace);
        }
        tokio::select! {
            // Checked first so that a channel streaming data non-stop still notices that
            // nobody wants it any more.
            biased;
            _ = &mut abandoned => break DrainEnd::Abandoned,
            () = barriers.sent(), if barriers.sending.is_some() => {}
            () = sleep_until_opt(close_by) => {
                tracing::debug!("the server sent EOF and an exit status but did not close the channel within {grace:?}; closing it");
                if let Err(e) = tokio::time::timeout(CLOSE_SEND_TIMEOUT, write.close()).await.unwrap_or(Ok(())) {
                    tracing::debug!("sending CHANNEL_CLOSE failed: {e}");
                }
                break DrainEnd::Closed;
            }
            msg = rx.wait() => match msg {
                Some(msg) => match handle_msg(&core, msg, &mut log, false).await {
                    Handled::Open => {}
                    Handled::Eof => eof = true,
                    Handled::Closed => break DrainEnd::Closed,
                    Handled::Reply(ok) if exec_reply_pending => {
                        exec_reply_pending = false;
                        core.state.send_modify(|s| s.exec_reply = Some(ok));
                    }
                    // Success or failure alike: the server has sent everything it sent
                    // before answering, and all of it has been handled above.
                    Handled::Reply(accepted) => match barriers.awaiting.pop_front() {
                        Some((id, reply)) => {
                            tracing::trace!(id, accepted, "barrier answered");
                            if let Some(l) = &log
                                && !l.barrier(id)
                            {
                                log = None;
                            }
                            let _ = reply.send(Ok(id));
                        }
                        None => tracing::debug!("channel request answer nobody asked for"),
                    },
                },
                None => break DrainEnd::Lost,
            },
            Some(reply) = barrier_requests.recv() => barriers.request(reply),
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
            core.stdout.finish(Finish::Eof);
            core.state.send_modify(|s| s.closed = true);
        }
        DrainEnd::Lost => {
            let cause = core.shared().wait_cause(LOST_CAUSE_GRACE).await;
            core.stdout.finish(Finish::Lost(cause.clone()));
            core.state.send_modify(|s| s.lost = Some(cause));
        }
    }
    // After the state above, which says why they failed.
    barriers.fail_all(&core, &mut barrier_requests);
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// What to do with the remote side when every handle of a channel is dropped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OnDrop {
    /// Signal the remote command (TERM, then KILL after `grace`).
    pub(super) terminate: bool,
    /// How long to wait for the server to close the channel before closing it ourselves.
    pub(super) grace: Duration,
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
                if let Handled::Closed = handle_msg(core, msg, &mut log, true).await {
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
