//! The drain task: reads a channel's russh queue promptly whatever the application does,
//! and ends the channel once nobody uses it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::{mpsc, oneshot};

use super::state::{ChannelCore, ExitStatus};
use super::stdout::Finish;

/// How long the drain task waits to hand CHANNEL_CLOSE to the session task.
const CLOSE_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a channel that lost its connection waits for the connection's end cause.
const LOST_CAUSE_GRACE: Duration = Duration::from_secs(5);

enum DrainEnd {
    Closed,
    Abandoned,
    Lost,
}

/// Handles one message; `discard` drops stdout (nobody will read it). Returns true when the
/// channel is closed.
async fn handle_msg(
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
            core.stdout.finish(Finish::Eof);
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

/// Everything the drain task of one channel needs besides the shared core.
pub(super) struct DrainStart {
    pub(super) rx: ChannelReadHalf,
    pub(super) abandoned: oneshot::Receiver<()>,
    pub(super) log_tx: Option<mpsc::Sender<Bytes>>,
    pub(super) on_drop: OnDrop,
}

pub(super) async fn drain(start: DrainStart, write: ChannelWriteHalf<Msg>, core: Arc<ChannelCore>) {
    let DrainStart {
        mut rx,
        mut abandoned,
        log_tx: mut log,
        on_drop,
    } = start;
    let mut end = loop {
        tokio::select! {
            // Checked first so that a channel streaming data non-stop still notices that
            // nobody wants it any more.
            biased;
            _ = &mut abandoned => break DrainEnd::Abandoned,
            msg = rx.wait() => match msg {
                Some(msg) => {
                    if handle_msg(&core, msg, &mut log, false).await {
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
            core.stdout.finish(Finish::Eof);
            core.state.send_modify(|s| s.closed = true);
        }
        DrainEnd::Lost => {
            let cause = core.shared().wait_cause(LOST_CAUSE_GRACE).await;
            core.stdout.finish(Finish::Lost(cause.clone()));
            core.state.send_modify(|s| s.lost = Some(cause));
        }
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
                if handle_msg(core, msg, &mut log, true).await {
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
