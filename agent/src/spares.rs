//! Remote programs started ahead of demand: per builder, a few channels whose
//! `nix-daemon --stdio` / `nix-store --serve --write` is already running, with the part of
//! the handshake that does not depend on the client done (see [`crate::greeting`]). A
//! session handed one does not wait for the remote Nix to start (tens of milliseconds on a
//! fast machine, more on a loaded one), nor for the first round trip of the handshake.
//!
//! Worker spares also get the client's second message ahead, once a session has shown what
//! this agent's clients send ([`Spares::learn`]): a session that takes one finds the daemon's
//! answer to it waiting.
//!
//! Bounded: at most `target` per builder, and never more than the builder's free build
//! slots (its max-jobs less the sessions running): Nix runs at most max-jobs sessions on a
//! machine, so spares beyond that would only hold sshd session slots (`MaxSessions`) that
//! running sessions need. Refilled in the background after a session takes one or ends, and
//! only on a connection that has a free session slot (never opening a connection, never
//! taking a slot a waiting session needs: see `Builder::open_spare_raw`). Reaped when
//! unused for `idle`: a quiet agent keeps no remote processes waiting; the next session
//! starts the refill again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nixmux::{Builder, RawSession};

use crate::greeting::{self, Answer};
use crate::wire::SessionProtocol;

/// The client's magic, sent right behind the exec request of a session.
pub(crate) fn magic(p: SessionProtocol) -> Bytes {
    Bytes::copy_from_slice(&greeting::client_magic(p))
}

/// How long a spare's remote program may take to start and answer the greeting.
const GREETING_LIMIT: Duration = Duration::from_secs(30);

/// A session started ahead, and the server's answer to the client's magic.
pub(crate) struct Spare {
    pub(crate) session: RawSession,
    pub(crate) greeting: Answer,
    /// The client's second message, sent ahead behind the magic (worker, once learned).
    pub(crate) sent_hello: Option<Bytes>,
    since: Instant,
}

/// The spares of one builder.
pub(crate) struct Spares {
    protocol: SessionProtocol,
    target: usize,
    idle: Duration,
    ready: Mutex<VecDeque<Spare>>,
    /// The client's second message, as this agent's clients send it (worker only).
    hello: Mutex<Option<Bytes>>,
    /// Spares being started now.
    starting: AtomicUsize,
    /// Closed (by a reload or shutdown): nothing is refilled any more.
    closed: AtomicBool,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    /// Sessions whose client sent the second message the spare had sent ahead, and those
    /// whose client sent another (the session then moved to a fresh channel).
    pub(crate) hello_hits: AtomicU64,
    pub(crate) hello_misses: AtomicU64,
}

impl Spares {
    pub(crate) fn new(protocol: SessionProtocol, target: usize, idle: Duration) -> Arc<Self> {
        Arc::new(Spares {
            protocol,
            target,
            idle,
            ready: Mutex::new(VecDeque::new()),
            hello: Mutex::new(None),
            starting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            hello_hits: AtomicU64::new(0),
            hello_misses: AtomicU64::new(0),
        })
    }

    /// A spare whose remote program is still running, if any (oldest first: the others stay
    /// fresh for the reaper).
    pub(crate) fn take(&self) -> Option<Spare> {
        let mut ready = self.ready.lock().ok()?;
        while let Some(s) = ready.pop_front() {
            if !s.session.status.is_closed() {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Some(s);
            }
        }
        if self.target > 0 {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// Spares ready now.
    pub(crate) fn ready(&self) -> usize {
        self.ready.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Records the client's second message as a session's client sent it (`None`: one this
    /// agent does not send ahead). Spares that sent another one ahead are closed: the next
    /// refill starts them again with this one.
    pub(crate) fn learn(&self, hello: Option<Bytes>) {
        if self.protocol != SessionProtocol::Worker {
            return;
        }
        let Ok(mut learned) = self.hello.lock() else {
            return;
        };
        if *learned == hello {
            return;
        }
        tracing::debug!(hello = ?hello.as_deref(), "learned the client's second message");
        *learned = hello;
        let stale: Vec<Spare> = match self.ready.lock() {
            Ok(mut r) => {
                let (keep, stale) = r.drain(..).partition(|s| s.sent_hello == *learned);
                *r = keep;
                stale.into()
            }
            Err(_) => Vec::new(),
        };
        drop(stale);
    }

    /// What a new spare sends behind its exec request: the magic, and the learned second
    /// message if there is one.
    fn first_input(&self) -> (Bytes, Option<Bytes>) {
        let hello = self.hello.lock().ok().and_then(|h| h.clone());
        let mut first = BytesMut::from(&magic(self.protocol)[..]);
        if let Some(h) = &hello {
            first.extend_from_slice(h);
        }
        (first.freeze(), hello)
    }

    fn push(&self, session: RawSession, greeting: Answer, sent_hello: Option<Bytes>) -> bool {
        match self.ready.lock() {
            Ok(mut r) if !self.closed.load(Ordering::Relaxed) && r.len() < self.target => {
                r.push_back(Spare {
                    session,
                    greeting,
                    sent_hello,
                    since: Instant::now(),
                });
                true
            }
            _ => false,
        }
    }

    /// Tops the spares up in the background, within `builder`'s free session slots and its
    /// `room` (free build slots), all the missing ones at once (a burst of sessions can take
    /// them faster than one remote Nix starts). With `connect`, the first may open the
    /// builder's connection (at start, so that the first session is quick too); the others
    /// follow once it is up.
    pub(crate) fn refill(self: &Arc<Self>, builder: Builder, connect: bool, room: usize) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let missing = move |s: &Self| {
            s.target
                .min(room)
                .saturating_sub(s.ready() + s.starting.load(Ordering::Acquire))
        };
        if connect {
            if missing(self) == 0 {
                return;
            }
            self.starting.fetch_add(1, Ordering::AcqRel);
            let spares = self.clone();
            tokio::spawn(async move {
                let (input, hello) = spares.first_input();
                let first = builder.open_raw(Some(input)).await.map(Some);
                let ok = spares.start_one(&builder, first, hello).await;
                spares.starting.fetch_sub(1, Ordering::AcqRel);
                if ok {
                    spares.refill(builder, false, room);
                }
            });
            return;
        }
        for _ in 0..missing(self) {
            self.starting.fetch_add(1, Ordering::AcqRel);
            let spares = self.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let (input, hello) = spares.first_input();
                let opened = builder.open_spare_raw(Some(input)).await;
                spares.start_one(&builder, opened, hello).await;
                spares.starting.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    /// Greets a freshly opened session and keeps it; false when there was none or it failed.
    async fn start_one(
        &self,
        builder: &Builder,
        opened: nixmux::Result<Option<RawSession>>,
        sent_hello: Option<Bytes>,
    ) -> bool {
        match opened {
            Ok(Some(mut s)) => {
                match greeting::answer(&mut s, self.protocol, GREETING_LIMIT).await {
                    Ok(answer) => self.push(s, answer, sent_hello),
                    Err(e) => {
                        tracing::warn!(builder = builder.name(), "a spare session: {e}");
                        false
                    }
                }
            }
            // No free slot on a live connection: the spares wait for the next refill.
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(builder = builder.name(), "starting a spare session: {e}");
                false
            }
        }
    }

    /// A session started now, greeted with the magic only: for a session whose client sent
    /// another second message than its spare had sent ahead. Its answer must be the one the
    /// client already has.
    pub(crate) async fn fresh(
        &self,
        builder: &Builder,
        answered: &Answer,
    ) -> Result<RawSession, String> {
        let mut s = builder
            .open_raw(Some(magic(self.protocol)))
            .await
            .map_err(|e| format!("cannot start a session on {}: {e}", builder.name()))?;
        let answer = greeting::answer(&mut s, self.protocol, GREETING_LIMIT).await?;
        if answer != *answered {
            return Err(format!(
                "the builder answered {answer:02x?} where another session answered {answered:02x?}"
            ));
        }
        Ok(s)
    }

    /// Closes spares unused for longer than the idle limit.
    pub(crate) fn reap(&self) {
        let old: Vec<Spare> = match self.ready.lock() {
            Ok(mut r) => {
                let (keep, old): (VecDeque<Spare>, VecDeque<Spare>) =
                    r.drain(..).partition(|s| s.since.elapsed() < self.idle);
                *r = keep;
                old.into()
            }
            Err(_) => Vec::new(),
        };
        drop(old);
    }

    /// Closes every spare and stops refilling.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Ok(mut r) = self.ready.lock() {
            r.clear();
        }
    }
}
