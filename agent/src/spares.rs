//! Remote programs started ahead of demand: per builder, a few channels whose
//! `nix-daemon --stdio` / `nix-store --serve --write` is already running, with the part of
//! the handshake that does not depend on the client done (see [`crate::greeting`]). A
//! session handed one does not wait for the remote Nix to start (tens of milliseconds on a
//! fast machine, more on a loaded one), nor for the first round trip of the handshake.
//!
//! Bounded: at most `target` per builder, refilled in the background after each use and
//! only on a connection that has a free session slot (never opening a connection, never
//! taking a slot a waiting session needs: see `Builder::open_spare_raw`). Reaped when
//! unused for `idle`: a quiet agent keeps no remote processes waiting; the next session
//! starts the refill again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixmux::{Builder, RawSession};

use crate::greeting::{self, Answer};
use crate::wire::SessionProtocol;

/// How long a spare's remote program may take to start and answer the greeting.
const GREETING_LIMIT: Duration = Duration::from_secs(30);

/// A session started ahead, and the server's answer to the client's magic.
pub(crate) struct Spare {
    pub(crate) session: RawSession,
    pub(crate) greeting: Answer,
    since: Instant,
}

/// The spares of one builder.
pub(crate) struct Spares {
    protocol: SessionProtocol,
    target: usize,
    idle: Duration,
    ready: Mutex<VecDeque<Spare>>,
    refilling: AtomicBool,
    /// Closed (by a reload or shutdown): nothing is refilled any more.
    closed: AtomicBool,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
}

impl Spares {
    pub(crate) fn new(protocol: SessionProtocol, target: usize, idle: Duration) -> Arc<Self> {
        Arc::new(Spares {
            protocol,
            target,
            idle,
            ready: Mutex::new(VecDeque::new()),
            refilling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
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

    fn push(&self, session: RawSession, greeting: Answer) -> bool {
        match self.ready.lock() {
            Ok(mut r) if !self.closed.load(Ordering::Relaxed) && r.len() < self.target => {
                r.push_back(Spare {
                    session,
                    greeting,
                    since: Instant::now(),
                });
                true
            }
            _ => false,
        }
    }

    /// Tops the spares up in the background, within `builder`'s free session slots. With
    /// `connect`, the first may open the builder's connection (at start, so that the first
    /// session is quick too).
    pub(crate) fn refill(self: &Arc<Self>, builder: Builder, connect: bool) {
        if self.target == 0
            || self.closed.load(Ordering::Relaxed)
            || self.refilling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let spares = self.clone();
        tokio::spawn(async move {
            let mut may_connect = connect;
            while spares.ready() < spares.target && !spares.closed.load(Ordering::Relaxed) {
                let opened = if std::mem::take(&mut may_connect) && spares.ready() == 0 {
                    builder.open_raw().await.map(Some)
                } else {
                    builder.open_spare_raw().await
                };
                match opened {
                    Ok(Some(mut s)) => {
                        match greeting::exchange(&mut s, spares.protocol, GREETING_LIMIT).await {
                            Ok(answer) => {
                                if !spares.push(s, answer) {
                                    break;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(builder = builder.name(), "a spare session: {e}");
                                break;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(builder = builder.name(), "starting a spare session: {e}");
                        break;
                    }
                }
            }
            spares.refilling.store(false, Ordering::Release);
        });
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
