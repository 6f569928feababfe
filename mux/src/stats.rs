//! Health and statistics per builder. Both serialise (serde) for status pages and metrics;
//! instants are left out (they mean nothing outside this process), durations are kept.

use std::time::{Duration, Instant};

use serde::Serialize;

/// How a builder is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Never contacted yet.
    Idle,
    /// Connected, no recent connection failures.
    Up,
    /// Connected, but recent connection attempts failed.
    Degraded,
    /// Unreachable since [`Health::down_since`].
    Down,
}

/// Health of a builder.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// Overall state.
    pub state: HealthState,
    /// When it went down.
    #[serde(skip)]
    pub down_since: Option<Instant>,
    /// The last connection error.
    pub last_error: Option<String>,
    /// Live SSH connections.
    pub connections: usize,
    /// Session channels open across them, counting a dropped one until the server has
    /// closed it (until then sshd still counts it against `MaxSessions`).
    pub channels_open: usize,
    /// sshd's per-connection session limit, once learned from a refusal.
    pub learned_channel_limit: Option<usize>,
    /// While backing off after failed connection attempts: how long until the next attempt
    /// may start (the circuit breaker's next try).
    pub retry_in: Option<Duration>,
}

/// Counters of a builder.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BuilderStats {
    /// SSH connections opened so far.
    pub connections_opened: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Connection attempts the server dropped at start-up (sshd `MaxStartups` throttling a
    /// burst), retried after a short jittered delay; not failures.
    pub startup_drops: u64,
    /// Session channels opened so far.
    pub channels_opened: u64,
    /// Channel opens sshd refused (at its limit, or racing the release of a just-closed
    /// session).
    pub channel_refusals: u64,
    /// Of those, refusals right after a channel closed, taken for sshd not having freed that
    /// session yet: they pause the connection briefly and teach no limit.
    pub channel_refusals_transient: u64,
    /// Most session channels open at once on any one connection so far (never more than
    /// the learned limit once there is one).
    pub peak_channels_per_connection: usize,
    /// Connections that ended other than by [`crate::Pool::shutdown`] (dead peer, keepalive
    /// timeout, server restart).
    pub connections_lost: u64,
    /// Protocol sessions created (channel + handshake).
    pub sessions_created: u64,
    /// Of those, sessions over a channel to the builder's nix-daemon socket (`ssh-ng://`;
    /// the rest ran a remote command).
    pub sessions_via_socket: u64,
    /// Channels to the daemon's socket the builder refused (each sends the builder's
    /// sessions to exec for a while, see [`crate::WorkerRoute::Auto`]).
    pub daemon_socket_refusals: u64,
    /// Why the builder last refused its daemon's socket, while that still decides the route.
    pub daemon_socket_refused: Option<String>,
    /// Sessions closed because they were broken, poisoned or cancelled.
    pub sessions_discarded: u64,
    /// Sessions closed for being idle too long.
    pub sessions_expired: u64,
    /// Idle sessions now.
    pub idle_sessions: usize,
    /// Sessions in use now.
    pub busy_sessions: usize,
    /// Operations that got a session.
    pub acquires: u64,
    /// Acquires that had to wait for a free slot.
    pub acquires_waited: u64,
    /// Acquires that timed out.
    pub acquire_timeouts: u64,
    /// Total time spent waiting in acquire.
    pub wait_time: Duration,
    /// Payload bytes received over this builder's connections (ended ones included).
    pub bytes_in: u64,
    /// Payload bytes sent.
    pub bytes_out: u64,
    /// Builds running now (each holds a build slot).
    pub builds_running: u64,
    /// Builds waiting for a build slot.
    pub builds_waiting: u64,
    /// Build slots (`max_jobs`; 0: unlimited).
    pub build_slots: u32,
    /// Round trips of this builder's protocol sessions so far: each wait for the builder's
    /// answer after sending (pipelined requests answered together count once). Handshakes
    /// count; channel opens and SSH's own exchanges do not.
    pub round_trips: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_and_stats_serialise_without_instants() {
        let h = Health {
            state: HealthState::Down,
            down_since: Some(Instant::now()),
            last_error: Some("connection refused".into()),
            connections: 0,
            channels_open: 0,
            learned_channel_limit: Some(10),
            retry_in: Some(Duration::from_millis(1500)),
        };
        let v = serde_json::to_value(&h).expect("health serialises");
        assert_eq!(v["state"], "down");
        assert!(v.get("down_since").is_none(), "{v}");
        assert_eq!(v["retry_in"]["secs"], 1);
        let s = serde_json::to_value(BuilderStats {
            builds_running: 2,
            ..BuilderStats::default()
        })
        .expect("stats serialise");
        assert_eq!(s["builds_running"], 2);
    }
}
