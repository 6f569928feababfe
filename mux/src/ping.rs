//! A staged connectivity check of one builder: the path every operation takes (resolve, TCP,
//! SSH key exchange, host key, authentication, exec, protocol handshake), each stage timed,
//! then a few round trips on the established session.
//!
//! It opens a fresh connection (not the pool's), because a connectivity test must show what a
//! cold start costs and must not be fooled by an old connection that happens to be alive.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixmux_transport::{ConnectEvent, ConnectEventKind, TransportError};
use serde::Serialize;

use crate::builder::BuilderConfig;
use crate::daemon_socket::{self, SocketOpenError};
use crate::error::{Error, ErrorKind};
use crate::protocol::{Protocol, SessionPath, WorkerRoute};
use crate::remote;

/// One stage of a ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PingStage {
    /// Name resolution.
    Resolve,
    /// TCP connect.
    Tcp,
    /// SSH version exchange and key exchange, up to receiving the host key.
    KeyExchange,
    /// Checking the host key against known_hosts / the pinned key.
    HostKey,
    /// Public-key authentication.
    Auth,
    /// Public-key authentication with the first channel's open sent right behind the request
    /// (`nixmux_transport::FirstChannel`, once the builder accepted the key in this process):
    /// both in one round trip. The daemon socket / exec stage after it is what was left of
    /// that open (the exec request, sshd's start of the session).
    AuthWithOpen,
    /// Opening a channel to the builder's nix-daemon socket (`ssh-ng://`).
    DaemonSocket,
    /// Opening a session channel and starting the remote command.
    Exec,
    /// The Nix protocol handshake.
    Handshake,
    /// Round trips on the established session.
    RoundTrip,
}

impl std::fmt::Display for PingStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PingStage::Resolve => "resolve",
            PingStage::Tcp => "tcp",
            PingStage::KeyExchange => "key exchange",
            PingStage::HostKey => "host key",
            PingStage::Auth => "auth",
            PingStage::AuthWithOpen => "auth with open",
            PingStage::DaemonSocket => "daemon socket",
            PingStage::Exec => "exec",
            PingStage::Handshake => "handshake",
            PingStage::RoundTrip => "round trip",
        })
    }
}

/// A completed stage and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct StageTiming {
    /// Which stage.
    pub stage: PingStage,
    /// Milliseconds.
    pub ms: f64,
}

/// How the host key was verified.
#[derive(Debug, Clone, Serialize)]
pub struct HostKeyInfo {
    /// `ssh-ed25519`, ...
    pub algorithm: String,
    /// `SHA256:...`.
    pub fingerprint: String,
    /// known_hosts file and line, or "pinned in the machines file".
    pub verified_by: String,
}

/// Trust as the protocol reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustReport {
    /// The remote user is trusted.
    Trusted,
    /// The remote user is not trusted.
    Untrusted,
    /// The protocol does not say (serve, worker below 1.35).
    Unknown,
}

/// Why a ping failed.
#[derive(Debug, Clone, Serialize)]
pub struct PingFailure {
    /// The stage that failed.
    pub stage: PingStage,
    /// The error class.
    pub kind: String,
    /// What happened.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

/// The result of pinging one builder.
#[derive(Debug, Clone, Serialize)]
pub struct PingReport {
    /// The builder's name (store URL as written).
    pub builder: String,
    /// `ssh` or `ssh-ng`.
    pub scheme: String,
    /// `user@host:port` that was contacted.
    pub endpoint: String,
    /// Whether every stage succeeded.
    pub ok: bool,
    /// Completed stages, in order.
    pub stages: Vec<StageTiming>,
    /// From the first byte to a usable session, in milliseconds.
    pub total_ms: f64,
    /// Host key details, once verified.
    pub host_key: Option<HostKeyInfo>,
    /// Negotiated key exchange and cipher.
    pub algorithms: Option<(String, String)>,
    /// Negotiated SSH compression (`none`, `zlib@openssh.com`): see the `compress` parameter.
    pub compression: Option<String>,
    /// `serve` or `worker`.
    pub protocol: String,
    /// Negotiated protocol version (`2.7`, `1.34`...).
    pub protocol_version: Option<String>,
    /// The builder's Nix version, when the protocol says.
    pub remote_nix_version: Option<String>,
    /// How the session reached the builder's Nix: `socket` (a channel to the nix-daemon
    /// socket) or `exec` (a remote command); `None` when it got no further than connecting.
    pub session_path: Option<String>,
    /// Why that path: the socket used, or why exec (configured, or the socket refused).
    pub session_path_reason: Option<String>,
    /// Trust.
    pub trust: TrustReport,
    /// Round-trip latency of a protocol request on the warm session: min / median / max ms.
    pub rtt_ms: Option<[f64; 3]>,
    /// Whether the builder has `zstd` (`command -v`); `None` when it could not be asked.
    pub zstd: Option<bool>,
    /// What bulk transfers would use and why (`bulk-compression`, see `nixmux::bulk`).
    pub bulk_compression: Option<String>,
    /// How far ahead of sshd's acknowledgements a channel writes, and why
    /// (`TransportConfig::send_ahead`).
    pub send_ahead: Option<String>,
    /// The failure, if any.
    pub failure: Option<PingFailure>,
    /// The full error, for programs that want its kind (not serialised).
    #[serde(skip)]
    pub error_kind: Option<ErrorKind>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn stage_of(e: &TransportError) -> PingStage {
    use nixmux_transport::Stage as S;
    match e.stage() {
        S::Setup | S::Resolve => PingStage::Resolve,
        S::TcpConnect => PingStage::Tcp,
        S::Handshake => PingStage::KeyExchange,
        S::HostKey => PingStage::HostKey,
        S::Auth => PingStage::Auth,
        S::ChannelOpen | S::Exec => PingStage::Exec,
        _ => PingStage::Exec,
    }
}

/// Pings one builder: connect (fresh), exec, handshake, `rounds` round trips.
pub async fn ping(config: &BuilderConfig, rounds: usize) -> PingReport {
    let events: Arc<Mutex<Vec<ConnectEvent>>> = Arc::default();
    let sink = events.clone();
    let observer = move |e: &ConnectEvent| {
        if let Ok(mut v) = sink.lock() {
            v.push(e.clone());
        }
    };
    let t = &config.target;
    let mut report = PingReport {
        builder: config.name.clone(),
        scheme: config.protocol.scheme().into(),
        endpoint: format!(
            "{}@{}:{}",
            t.endpoint.user, t.endpoint.host, t.endpoint.port
        ),
        ok: false,
        stages: Vec::new(),
        total_ms: 0.0,
        host_key: None,
        algorithms: None,
        compression: None,
        protocol: match config.protocol {
            Protocol::Serve => "serve".into(),
            Protocol::Worker => "worker".into(),
        },
        protocol_version: None,
        remote_nix_version: None,
        session_path: None,
        session_path_reason: None,
        trust: TrustReport::Unknown,
        rtt_ms: None,
        zstd: None,
        bulk_compression: None,
        send_ahead: None,
        failure: None,
        error_kind: None,
    };
    let start = Instant::now();

    let spec = config.session_spec();
    // The channel opened first below, sent with the authentication request if it can be.
    let mut target = t.clone();
    target.transport.first_channel = Some(spec.first_channel());
    // Jump hosts (if any) are connected first, outside the timed stages of the target.
    let connected = target.connect(observer).await;
    let with_open = connected
        .as_ref()
        .is_ok_and(|c| c.first_channel_pipelined());
    record_events(&mut report, &events, with_open);
    let ssh = match connected {
        Ok(c) => c,
        Err(e) => {
            let stage = stage_of(&e);
            fail(&mut report, stage, Error::from(e).on(&config.name));
            report.total_ms = ms(start.elapsed());
            return report;
        }
    };
    report.algorithms = ssh.algorithms().map(|(k, c)| (k.to_owned(), c.to_owned()));
    report.compression = ssh.compression().map(str::to_owned);

    let activity = nixmux_session::Activity::new();
    let opening = remote::opening(&spec, None);
    let options = || remote::exec_options(spec.protocol, &activity, None, Some(&opening));
    let mut opened = None;
    if spec.route != WorkerRoute::Exec {
        let t0 = Instant::now();
        match daemon_socket::open(ssh.clone(), spec.daemon_socket.clone(), options()).await {
            // Ping opens one channel on a fresh connection: nothing to pace or remember.
            Ok(ch) => {
                report.stages.push(StageTiming {
                    stage: PingStage::DaemonSocket,
                    ms: ms(t0.elapsed()),
                });
                report.session_path_reason =
                    Some(format!("the nix-daemon socket {}", spec.daemon_socket));
                opened = Some((ch, SessionPath::DaemonSocket));
            }
            Err(SocketOpenError::Refused { why, .. }) if spec.route == WorkerRoute::Auto => {
                report.session_path_reason = Some(format!("fell back to exec: {why}"));
            }
            Err(SocketOpenError::Refused { why, .. }) => {
                let e = Error::remote(ErrorKind::Connect, why)
                    .hint("the store URL says `daemon-socket=`: allow stream-local forwarding for this user (sshd AllowStreamLocalForwarding), start nix-daemon on the builder, or drop the parameter to fall back to `nix-daemon --stdio`")
                    .on(&config.name);
                fail(&mut report, PingStage::DaemonSocket, e);
                report.total_ms = ms(start.elapsed());
                ssh.disconnect().await;
                return report;
            }
            Err(SocketOpenError::Failed(e)) => {
                fail(&mut report, PingStage::DaemonSocket, e.on(&config.name));
                report.total_ms = ms(start.elapsed());
                ssh.disconnect().await;
                return report;
            }
        }
    } else if spec.protocol == Protocol::Worker {
        report.session_path_reason = Some(
            "configured: `daemon-socket=no`, an own `remote-program`, or a `remote-store` that is not the daemon's socket".into(),
        );
    }
    let (channel, path) = match opened {
        Some(o) => o,
        None => {
            let t0 = Instant::now();
            match ssh.exec_with(&spec.command, options()).await {
                Ok(c) => {
                    report.stages.push(StageTiming {
                        stage: PingStage::Exec,
                        ms: ms(t0.elapsed()),
                    });
                    (c, SessionPath::Exec)
                }
                Err(e) => {
                    fail(
                        &mut report,
                        PingStage::Exec,
                        Error::from(e).on(&config.name),
                    );
                    report.total_ms = ms(start.elapsed());
                    ssh.disconnect().await;
                    return report;
                }
            }
        }
    };
    report.session_path = Some(path.name().to_owned());
    let t1 = Instant::now();
    let mut session = match remote::start(
        channel,
        None,
        path,
        Some(opening.clone()),
        &spec,
        &config.name,
        activity.clone(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            fail(&mut report, PingStage::Handshake, e);
            report.total_ms = ms(start.elapsed());
            ssh.disconnect().await;
            return report;
        }
    };
    report.stages.push(StageTiming {
        stage: PingStage::Handshake,
        ms: ms(t1.elapsed()),
    });
    report.total_ms = ms(start.elapsed());
    let info = session.conv.info();
    report.protocol_version = Some(info.version.to_string());
    report.remote_nix_version = info.nix_version;
    report.trust = match info.trusted {
        Some(true) => TrustReport::Trusted,
        Some(false) => TrustReport::Untrusted,
        None => TrustReport::Unknown,
    };

    let mut rtts = Vec::new();
    let empty = BTreeSet::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let r = session.conv.query_valid_paths(&empty, false).await;
        if let Err(e) = r {
            fail(
                &mut report,
                PingStage::RoundTrip,
                crate::error::from_session(e).on(&config.name),
            );
            ssh.disconnect().await;
            return report;
        }
        rtts.push(ms(t.elapsed()));
    }
    if !rtts.is_empty() {
        rtts.sort_by(f64::total_cmp);
        report.rtt_ms = Some([rtts[0], rtts[rtts.len() / 2], rtts[rtts.len() - 1]]);
    }
    let rtt = rtts.first().map(|ms| Duration::from_secs_f64(ms / 1e3));
    drop(session);
    let (zstd, bulk) = crate::bulk::ping_report(config, &ssh, info.trusted, rtt).await;
    report.zstd = zstd;
    report.bulk_compression = Some(bulk);
    report.send_ahead = Some(send_ahead_report(&ssh.stats()));
    report.ok = true;
    ssh.disconnect().await;
    report
}

/// The send-ahead limit in words, for `ping`.
fn send_ahead_report(stats: &nixmux_transport::ConnectionStats) -> String {
    match (stats.send_ahead_limit, stats.round_trip) {
        (Some(u32::MAX), Some(rtt)) => format!(
            "the server's window (round trip {:.2} ms: the limit exceeds any window)",
            rtt.as_secs_f64() * 1e3
        ),
        (Some(limit), Some(rtt)) => format!(
            "{} KiB unacknowledged at most (round trip {:.2} ms)",
            limit / 1024,
            rtt.as_secs_f64() * 1e3
        ),
        (Some(limit), None) => format!(
            "{} KiB unacknowledged at most (round trip not measured yet)",
            limit / 1024
        ),
        (None, _) => "the server's window (no limit: off, or not an OpenSSH server)".to_owned(),
    }
}

fn record_events(report: &mut PingReport, events: &Mutex<Vec<ConnectEvent>>, with_open: bool) {
    let Ok(evs) = events.lock() else { return };
    for e in evs.iter() {
        let stage = match &e.kind {
            ConnectEventKind::Resolved { .. } => PingStage::Resolve,
            ConnectEventKind::TcpConnected { .. } => PingStage::Tcp,
            ConnectEventKind::KeyExchangeDone { .. } => PingStage::KeyExchange,
            ConnectEventKind::HostKeyVerified {
                fingerprint,
                source,
            } => {
                let algorithm = evs
                    .iter()
                    .find_map(|e| match &e.kind {
                        ConnectEventKind::KeyExchangeDone {
                            host_key_algorithm, ..
                        } => Some(host_key_algorithm.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                report.host_key = Some(HostKeyInfo {
                    algorithm,
                    fingerprint: fingerprint.clone(),
                    verified_by: source.to_string(),
                });
                PingStage::HostKey
            }
            ConnectEventKind::Authenticated { .. } if with_open => PingStage::AuthWithOpen,
            ConnectEventKind::Authenticated { .. } => PingStage::Auth,
            _ => continue,
        };
        report.stages.push(StageTiming {
            stage,
            ms: ms(e.took),
        });
    }
}

fn fail(report: &mut PingReport, stage: PingStage, e: Error) {
    report.error_kind = Some(e.kind());
    report.failure = Some(PingFailure {
        stage,
        kind: e.kind().to_string(),
        message: e.message().to_owned(),
        hint: e.hint_text().map(str::to_owned).or_else(|| hint_for(&e)),
    });
}

/// An actionable sentence for transport failures that carry no hint of their own.
fn hint_for(e: &Error) -> Option<String> {
    let t = e.transport_error()?;
    if let Some(r) = t.host_key_report() {
        let pinned = r
            .expected
            .iter()
            .any(|l| matches!(l, nixmux_transport::KeyLocation::Pinned { .. }));
        // The key as a `.pub` line (the known_hosts line without its host field).
        let pub_line = r
            .known_hosts_line
            .split_once(' ')
            .map(|(_, k)| k)
            .unwrap_or(&r.known_hosts_line);
        return Some(match r.problem {
            nixmux_transport::HostKeyProblem::Unknown => format!(
                "if {} {} is the builder's real key, add this line to {}: {}",
                r.algorithm,
                r.fingerprint,
                r.searched
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "~/.ssh/known_hosts".into()),
                r.known_hosts_line
            ),
            nixmux_transport::HostKeyProblem::Mismatch if pinned => format!(
                "the machines file pins another key; if the builder was reinstalled and {} is its new key, set field 8 to the base64 of `{pub_line}`",
                r.fingerprint
            ),
            nixmux_transport::HostKeyProblem::Mismatch => format!(
                "if the builder was reinstalled and {} is its new key, replace its known_hosts entry with: {}",
                r.fingerprint, r.known_hosts_line
            ),
            _ => "this key is revoked in known_hosts; the builder needs a new host key".into(),
        });
    }
    match e.kind() {
        ErrorKind::Auth => Some(
            "add the client's public key to the remote user's ~/.ssh/authorized_keys on the builder, or name the right key (machines-file field 3, ?ssh-key=, or -i)".into(),
        ),
        ErrorKind::Connect => Some(
            "check that sshd runs on the builder and that host and port are right".into(),
        ),
        ErrorKind::TimedOut => Some(
            "the builder did not answer in time: is it up, and is the port firewalled (dropping packets)?".into(),
        ),
        _ => None,
    }
}
