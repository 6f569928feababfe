//! Warm protocol sessions of one builder.
//!
//! A session (an exec channel with its handshake done) is used by one operation at a time.
//! `acquire` hands out an idle warm session if there is one, else opens a channel on the
//! builder's shared connection. The number of sessions per builder is bounded by a FIFO
//! semaphore, so waiters are served in arrival order, each with a timeout. A session goes
//! back to the idle list only if its last operation succeeded completely; one whose
//! operation failed, was cancelled half-way (the future dropped), or whose connection died is
//! closed, which makes the remote Nix stop whatever it was doing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::connections::ConnectionSet;
use crate::error::{Error, ErrorKind, Initiator, Result};
use crate::remote::{self, RemoteSession, SessionSpec};

/// Limits of a session pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most sessions (busy or idle) to the builder.
    pub max_sessions: usize,
    /// Idle sessions older than this are closed.
    pub max_idle: Duration,
    /// Longest wait for a session (slot, channel and handshake included).
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_sessions: 16,
            max_idle: Duration::from_secs(300),
            acquire_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct PoolCounters {
    pub(crate) created: AtomicU64,
    pub(crate) discarded: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) acquires: AtomicU64,
    pub(crate) waited: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) wait_micros: AtomicU64,
}

/// The sessions of one builder.
pub(crate) struct SessionPool {
    pub(crate) name: String,
    pub(crate) set: Arc<ConnectionSet>,
    pub(crate) spec: SessionSpec,
    settings: PoolSettings,
    idle: Mutex<Vec<RemoteSession>>,
    permits: Arc<Semaphore>,
    pub(crate) counters: PoolCounters,
}

/// A session checked out of the pool. Dropping it returns the session when it is healthy and
/// its last operation completed ([`PooledSession::succeeded`]); otherwise the session is closed.
pub(crate) struct PooledSession {
    session: Option<RemoteSession>,
    pool: Arc<SessionPool>,
    ok: bool,
    _permit: OwnedSemaphorePermit,
}

impl PooledSession {
    pub(crate) fn get(&mut self) -> &mut RemoteSession {
        // Present from acquire until drop.
        self.session
            .as_mut()
            .expect("a pooled session holds its session until dropped")
    }

    /// The operation completed: the session may be reused.
    pub(crate) fn succeeded(&mut self) {
        self.ok = true;
    }
}

impl Drop for PooledSession {
    fn drop(&mut self) {
        let Some(mut s) = self.session.take() else {
            return;
        };
        s.route.set(None);
        if self.ok && s.is_usable() {
            s.last_used = Instant::now();
            if let Ok(mut idle) = self.pool.idle.lock() {
                idle.push(s);
                return;
            }
        }
        self.pool.counters.discarded.fetch_add(1, Ordering::Relaxed);
        // Dropping closes the channel: the remote process sees EOF / hang-up and stops.
        drop(s);
    }
}

impl SessionPool {
    pub(crate) fn new(
        name: String,
        set: Arc<ConnectionSet>,
        spec: SessionSpec,
        settings: PoolSettings,
    ) -> Arc<Self> {
        let pool = Arc::new(SessionPool {
            name,
            set,
            spec,
            permits: Arc::new(Semaphore::new(settings.max_sessions.max(1))),
            settings,
            idle: Mutex::new(Vec::new()),
            counters: PoolCounters::default(),
        });
        let weak = Arc::downgrade(&pool);
        let evict: Weak<dyn crate::connections::IdleEvict> = weak.clone();
        pool.set.register_evictor(evict);
        spawn_reaper(weak, pool.settings.max_idle);
        pool
    }

    /// A session for one operation.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Result<PooledSession> {
        let start = Instant::now();
        let timeout = self.settings.acquire_timeout;
        self.counters.acquires.fetch_add(1, Ordering::Relaxed);
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.counters.waited.fetch_add(1, Ordering::Relaxed);
                match tokio::time::timeout(timeout, self.permits.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => {
                        return Err(Error::local(ErrorKind::Cancelled, "the pool was closed")
                            .on(&self.name));
                    }
                    Err(_) => {
                        self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(Error::new(
                            ErrorKind::PoolExhausted,
                            Initiator::Local,
                            format!(
                                "all {} sessions stayed busy for {timeout:?}",
                                self.settings.max_sessions
                            ),
                        )
                        .on(&self.name));
                    }
                }
            }
        };
        let waited = start.elapsed();
        self.counters.wait_micros.fetch_add(
            u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if let Some(s) = self.take_idle() {
            return Ok(PooledSession {
                session: Some(s),
                pool: self.clone(),
                ok: false,
                _permit: permit,
            });
        }
        let left = timeout.saturating_sub(waited);
        let s = match tokio::time::timeout(left, remote::open(&self.set, &self.spec, &self.name))
            .await
        {
            Ok(r) => r?,
            Err(_) => {
                self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    Initiator::Builder,
                    format!("opening a session took longer than {timeout:?}"),
                )
                .on(&self.name));
            }
        };
        self.counters.created.fetch_add(1, Ordering::Relaxed);
        Ok(PooledSession {
            session: Some(s),
            pool: self.clone(),
            ok: false,
            _permit: permit,
        })
    }

    /// The most recently used healthy idle session (warmest first), closing stale ones.
    fn take_idle(&self) -> Option<RemoteSession> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(s) = idle.pop() {
            if s.last_used.elapsed() > self.settings.max_idle {
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !s.is_usable() {
                self.counters.discarded.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            return Some(s);
        }
        None
    }

    /// Closes idle sessions past `max_idle` or broken.
    fn reap(&self) {
        let expired: Vec<RemoteSession> = match self.idle.lock() {
            Ok(mut idle) => {
                let max = self.settings.max_idle;
                let (keep, drop): (Vec<_>, Vec<_>) = idle
                    .drain(..)
                    .partition(|s| s.last_used.elapsed() <= max && s.is_usable());
                *idle = keep;
                drop
            }
            Err(_) => Vec::new(),
        };
        self.counters
            .expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    pub(crate) fn busy_count(&self) -> usize {
        self.settings
            .max_sessions
            .saturating_sub(self.permits.available_permits())
    }

    /// Closes every idle session.
    pub(crate) fn clear_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

impl crate::connections::IdleEvict for SessionPool {
    fn evict_one(&self) -> bool {
        // The oldest idle session goes first.
        match self.idle.lock() {
            Ok(mut idle) if !idle.is_empty() => {
                idle.remove(0);
                true
            }
            _ => false,
        }
    }
}

fn spawn_reaper(pool: Weak<SessionPool>, max_idle: Duration) {
    let every = (max_idle / 2).max(Duration::from_millis(100));
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match pool.upgrade() {
                    Some(p) => p.reap(),
                    None => return,
                }
            }
        });
    }
}
