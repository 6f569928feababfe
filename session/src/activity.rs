//! Progress, not duration: the clock behind every session timeout.
//!
//! A timeout that bounds how long a read or an operation may take fails a 1 GiB transfer over
//! a slow link that is moving bytes the whole time. What a session really needs to detect is
//! a peer that stopped: no byte in either direction for a while. [`Activity`] records when a
//! session's bytes last moved (either direction, plus anything else that proves the peer is
//! alive, such as the serve protocol's build log on the channel's stderr), and
//! [`within_idle`] fails a wait only once that clock has been still for the whole limit.
//!
//! Time spent waiting on *our* side (the local source of an upload, the local sink of a
//! download) is not the peer's silence: [`Activity::pause`] stops the clock for as long as
//! such a wait lasts.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::SessionError;

/// Which idle limit a wait on the peer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Patience {
    /// Handshakes, queries and transfers: [`crate::SessionConfig::idle_timeout`].
    Transfer,
    /// Waiting for a build's result: [`crate::SessionConfig::build_idle_timeout`].
    Build,
}

/// When a session's bytes last moved. Cheap to clone; clones share the clock.
#[derive(Clone)]
pub struct Activity {
    inner: Arc<Clock>,
}

struct Clock {
    /// Instants are stored as nanoseconds since this one, so that they fit an atomic.
    base: Instant,
    last: AtomicU64,
    /// Waits on our own side in progress (see [`Activity::pause`]).
    paused: AtomicUsize,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("idle_for", &self.idle_for())
            .field("paused", &self.is_paused())
            .finish()
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A clock that was touched just now.
    pub fn new() -> Self {
        Activity {
            inner: Arc::new(Clock {
                base: Instant::now(),
                last: AtomicU64::new(0),
                paused: AtomicUsize::new(0),
            }),
        }
    }

    /// Records progress now.
    pub fn touch(&self) {
        let nanos = Instant::now()
            .saturating_duration_since(self.inner.base)
            .as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        self.inner.last.fetch_max(nanos, Ordering::Relaxed);
    }

    /// When progress was last recorded.
    pub fn last(&self) -> Instant {
        self.inner.base + Duration::from_nanos(self.inner.last.load(Ordering::Relaxed))
    }

    /// How long since progress was last recorded.
    pub fn idle_for(&self) -> Duration {
        Instant::now().saturating_duration_since(self.last())
    }

    /// Whether a wait on our own side is in progress.
    pub fn is_paused(&self) -> bool {
        self.inner.paused.load(Ordering::Relaxed) > 0
    }

    /// Stops the clock until the guard is dropped: we are waiting on ourselves (reading the
    /// local source of an upload, writing into the local sink of a download), so the peer's
    /// silence meanwhile is our doing. Dropping the guard counts as progress.
    pub fn pause(&self) -> PauseGuard {
        self.inner.paused.fetch_add(1, Ordering::Relaxed);
        PauseGuard {
            activity: self.clone(),
        }
    }
}

/// Keeps an [`Activity`] paused while it lives.
#[derive(Debug)]
pub struct PauseGuard {
    activity: Activity,
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.activity.touch();
        self.activity.inner.paused.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `fut`, a wait on the peer, failing with [`SessionError::Timeout`] only once `activity`
/// has been still (and not paused) for `limit`. `None` waits without bound.
pub async fn within_idle<F: Future>(
    activity: &Activity,
    limit: Option<Duration>,
    during: &'static str,
    fut: F,
) -> Result<F::Output, SessionError> {
    let Some(limit) = limit else {
        return Ok(fut.await);
    };
    tokio::pin!(fut);
    loop {
        let expires = if activity.is_paused() {
            Instant::now() + limit
        } else {
            activity.last() + limit
        };
        tokio::select! {
            biased;
            out = &mut fut => return Ok(out),
            _ = tokio::time::sleep_until(expires) => {
                // Progress may have happened since we armed the timer: only a clock that is
                // still and unpaused for the whole limit is silence.
                if !activity.is_paused() && activity.idle_for() >= limit {
                    return Err(SessionError::Timeout { during, after: limit });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_outlives_the_limit_while_progress_is_made() {
        let a = Activity::new();
        let toucher = {
            let a = a.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    a.touch();
                }
            })
        };
        let start = Instant::now();
        let r = within_idle(
            &a,
            Some(Duration::from_secs(1)),
            "test",
            tokio::time::sleep(Duration::from_secs(40)),
        )
        .await;
        assert!(
            r.is_ok(),
            "40 s of waiting with progress every 0.9 s: {r:?}"
        );
        assert!(start.elapsed() >= Duration::from_secs(40));
        toucher.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn silence_for_the_limit_fails_at_the_limit() {
        let a = Activity::new();
        tokio::time::sleep(Duration::from_secs(3)).await;
        a.touch();
        let start = Instant::now();
        let r = within_idle(
            &a,
            Some(Duration::from_secs(2)),
            "waiting",
            std::future::pending::<()>(),
        )
        .await;
        assert!(matches!(
            r,
            Err(SessionError::Timeout {
                during: "waiting",
                ..
            })
        ));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_is_not_silence() {
        let a = Activity::new();
        let guard = a.pause();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move {
                within_idle(
                    &a,
                    Some(Duration::from_secs(1)),
                    "paused",
                    tokio::time::sleep(Duration::from_secs(30)),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(guard);
        // The clock restarts when the pause ends; the wait then fails a second later.
        let r = waiter.await.expect("join");
        assert!(matches!(r, Err(SessionError::Timeout { .. })));
        assert!(a.idle_for() >= Duration::from_secs(1));
    }
}
