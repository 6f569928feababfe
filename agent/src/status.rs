//! What `nixmux agent status` shows and `--metrics` exports: the schema of the status
//! report (JSON, through the agent's socket) and its Prometheus text rendering.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The agent as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// nixmux version of the agent.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// The socket it listens on.
    pub socket: String,
    /// Where its builders come from (a machines file, or the local Nix's `builders`).
    pub machines: String,
    /// Seconds since it started.
    pub uptime_secs: f64,
    /// Clients refused because their uid is not allowed.
    pub clients_refused: u64,
    /// Sessions running now.
    pub sessions_active: u64,
    /// Sessions served since start (finished or running).
    pub sessions_total: u64,
    /// Reloads of the machines file since start, and the last one's outcome.
    pub reloads: u64,
    /// The last reload's error, if it failed (the builders before it stay in use).
    pub last_reload_error: Option<String>,
    /// One entry per builder (machines-file line).
    pub builders: Vec<BuilderStatus>,
}

/// One builder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuilderStatus {
    /// The name `nixmux connect` uses.
    pub name: String,
    /// `ssh` or `ssh-ng`.
    pub protocol: String,
    /// Its store URI in the machines file.
    pub uri: String,
    /// `idle`, `up`, `degraded` or `down`.
    pub health: String,
    /// The last connection error, if any.
    pub last_error: Option<String>,
    /// Live SSH connections to its host (shared with other lines for the same host).
    pub connections: usize,
    /// Session channels open on them.
    pub channels_open: usize,
    /// sshd's `MaxSessions`, once learned.
    pub learned_channel_limit: Option<usize>,
    /// SSH connections opened since start.
    pub connections_opened: u64,
    /// Connection attempts sshd dropped at start-up (retried).
    pub startup_drops: u64,
    /// Sessions running now.
    pub sessions_active: u64,
    /// Sessions served since start.
    pub sessions_total: u64,
    /// Sessions that could not be started (builder unreachable, ...).
    pub session_failures: u64,
    /// Sessions started on a remote program that was already running.
    pub spare_hits: u64,
    /// Sessions that had to start the remote program first.
    pub spare_misses: u64,
    /// Worker sessions whose client's second message had been sent ahead by their spare.
    #[serde(default)]
    pub hello_hits: u64,
    /// Worker sessions whose client sent another second message than their spare had sent
    /// ahead (the session moved to a freshly started remote program).
    #[serde(default)]
    pub hello_misses: u64,
    /// Remote programs started and waiting now.
    pub spares_ready: usize,
    /// Bytes from clients to the builder.
    pub bytes_to_builder: u64,
    /// Bytes from the builder to clients.
    pub bytes_from_builder: u64,
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl StatusReport {
    /// The report in Prometheus' text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            "nixmux_agent_uptime_seconds",
            "Seconds since the agent started.",
            "gauge",
            self.uptime_secs,
        );
        gauge(
            "nixmux_agent_clients_refused_total",
            "Clients refused because their uid is not allowed.",
            "counter",
            self.clients_refused as f64,
        );
        gauge(
            "nixmux_agent_sessions_active",
            "Sessions running now.",
            "gauge",
            self.sessions_active as f64,
        );
        gauge(
            "nixmux_agent_sessions_total",
            "Sessions served since start.",
            "counter",
            self.sessions_total as f64,
        );
        type Field = fn(&BuilderStatus) -> f64;
        let per_builder: &[(&str, &str, &str, Field)] = &[
            (
                "nixmux_builder_up",
                "1 when the builder is connected and healthy.",
                "gauge",
                |b| f64::from(u8::from(b.health == "up")),
            ),
            (
                "nixmux_builder_connections",
                "Live SSH connections to the builder's host.",
                "gauge",
                |b| b.connections as f64,
            ),
            (
                "nixmux_builder_channels_open",
                "Session channels open to the builder's host.",
                "gauge",
                |b| b.channels_open as f64,
            ),
            (
                "nixmux_builder_connections_opened_total",
                "SSH connections opened.",
                "counter",
                |b| b.connections_opened as f64,
            ),
            (
                "nixmux_builder_sessions_active",
                "Sessions running now.",
                "gauge",
                |b| b.sessions_active as f64,
            ),
            (
                "nixmux_builder_sessions_total",
                "Sessions served.",
                "counter",
                |b| b.sessions_total as f64,
            ),
            (
                "nixmux_builder_session_failures_total",
                "Sessions that could not be started.",
                "counter",
                |b| b.session_failures as f64,
            ),
            (
                "nixmux_builder_spare_hits_total",
                "Sessions handed a remote program already running.",
                "counter",
                |b| b.spare_hits as f64,
            ),
            (
                "nixmux_builder_hello_hits_total",
                "Worker sessions whose handshake the spare had done ahead.",
                "counter",
                |b| b.hello_hits as f64,
            ),
            (
                "nixmux_builder_spares_ready",
                "Remote programs started ahead and waiting.",
                "gauge",
                |b| b.spares_ready as f64,
            ),
            (
                "nixmux_builder_bytes_to_builder_total",
                "Bytes from clients to the builder.",
                "counter",
                |b| b.bytes_to_builder as f64,
            ),
            (
                "nixmux_builder_bytes_from_builder_total",
                "Bytes from the builder to clients.",
                "counter",
                |b| b.bytes_from_builder as f64,
            ),
        ];
        for &(name, help, kind, value) in per_builder {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for b in &self.builders {
                let _ = writeln!(
                    out,
                    "{name}{{builder=\"{}\",protocol=\"{}\"}} {}",
                    label(&b.name),
                    label(&b.protocol),
                    value(b)
                );
            }
        }
        out
    }
}
