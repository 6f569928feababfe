//! The contenders: nixmux through its pool and transport, and the baselines (OpenSSH per
//! session, OpenSSH ControlMaster, Nix's own commands).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::future::BoxFuture;
use nixmux::local::LocalStore;
use nixmux::ops::BuildOptions;
use nixmux::proto::build_result::BuildStatus;
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::session::SessionConfig;
use nixmux::transport::{ExecOptions, ExecStatus, NoopObserver, SshConnection};
use nixmux::{Builder, BuilderConfig, Pool, PoolSettings, Protocol, log_channel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::env::{Env, run_output};
use crate::peers::{ControlMaster, Conv, ProcSession, remote_command};
use crate::report::Role;
use crate::runner::{Sample, Side, SideResultT};

/// Shared environment handle.
pub type EnvRef = Arc<Env>;

fn scheme(p: Protocol) -> &'static str {
    p.scheme()
}

// ===================================================================== nixmux: cold pool

/// nixmux from nothing: a new [`Pool`] per sample; `sessions` concurrent tasks on each of
/// `builders`, each doing `ops` `QueryValidPaths` round trips (at least the first one opens
/// the connection, a channel and the handshake).
pub struct NixmuxCold {
    /// Environment.
    pub env: EnvRef,
    /// Builder indices.
    pub builders: Vec<usize>,
    /// Protocol.
    pub protocol: Protocol,
    /// Concurrent sessions per builder.
    pub sessions: usize,
    /// Round trips per session.
    pub ops: usize,
    /// Paths queried.
    pub paths: BTreeSet<StorePath>,
    /// Open the SSH connection before the clock starts (sessions still start cold).
    pub live_connection: bool,
    pool: Option<Pool>,
    stats: BTreeMap<String, String>,
}

impl NixmuxCold {
    /// A cold side.
    pub fn new(
        env: EnvRef,
        builders: Vec<usize>,
        protocol: Protocol,
        sessions: usize,
        ops: usize,
    ) -> Self {
        NixmuxCold {
            env,
            builders,
            protocol,
            sessions,
            ops,
            paths: BTreeSet::new(),
            live_connection: false,
            pool: None,
            stats: BTreeMap::new(),
        }
    }

    fn new_pool(&self) -> anyhow::Result<(Pool, Vec<Builder>)> {
        let pool = Pool::new();
        let mut builders = Vec::new();
        for &i in &self.builders {
            let mut c = self.env.nixmux_config(i, self.protocol)?;
            c.pool = PoolSettings {
                max_sessions: self.sessions.max(1),
                ..PoolSettings::default()
            };
            builders.push(pool.add(c));
        }
        Ok((pool, builders))
    }
}

impl Side for NixmuxCold {
    fn id(&self) -> String {
        format!("nixmux-{}", scheme(self.protocol))
    }
    fn label(&self) -> String {
        if self.live_connection {
            format!(
                "nixmux {}: pool with a live connection, channel + exec + handshake + round trips",
                scheme(self.protocol)
            )
        } else {
            format!(
                "nixmux {}: new pool, connect + exec + handshake + round trip",
                scheme(self.protocol)
            )
        }
    }
    fn role(&self) -> Role {
        Role::Subject
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            // Where a cold start spends its time: one staged ping (untimed), stage by stage.
            if !self.live_connection && self.builders.len() == 1 && self.sessions == 1 {
                let c = self.env.nixmux_config(self.builders[0], self.protocol)?;
                let r = nixmux::ping::ping(&c, 1).await;
                for st in &r.stages {
                    self.stats.insert(
                        format!("ping_{}_ms", st.stage.to_string().replace(' ', "_")),
                        format!("{:.1}", st.ms),
                    );
                }
                if let Some(rtt) = r.rtt_ms {
                    self.stats
                        .insert("ping_round_trip_ms".into(), format!("{:.2}", rtt[1]));
                }
            }
            Ok(())
        })
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            if self.live_connection {
                let (pool, builders) = self.new_pool()?;
                for b in &builders {
                    b.query_valid_paths(&BTreeSet::new(), false).await?;
                    // Keep the connection, close the session: sessions start cold.
                    b.close_idle();
                }
                // Let sshd see the channel close before the clock starts.
                tokio::time::sleep(Duration::from_millis(50)).await;
                self.pool = Some(pool);
            }
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let builders = match &self.pool {
                Some(p) => p.builders(),
                None => {
                    let (pool, builders) = self.new_pool()?;
                    self.pool = Some(pool);
                    builders
                }
            };
            let mut tasks = tokio::task::JoinSet::new();
            for b in builders {
                for _ in 0..self.sessions {
                    let b = b.clone();
                    let paths = self.paths.clone();
                    let ops = self.ops.max(1);
                    tasks.spawn(async move {
                        let mut lat = Vec::with_capacity(ops);
                        let mut fails = 0u32;
                        let mut last = None;
                        for _ in 0..ops {
                            let t = Instant::now();
                            match b.query_valid_paths(&paths, false).await {
                                Ok(_) => lat.push(t.elapsed()),
                                Err(e) => {
                                    fails += 1;
                                    last = Some(e.to_string());
                                }
                            }
                        }
                        (lat, fails, last)
                    });
                }
            }
            let mut s = Sample::one();
            let mut last_err = None;
            while let Some(r) = tasks.join_next().await {
                let (lat, fails, last) = r.map_err(|e| anyhow!("task: {e}"))?;
                s.ops.extend(lat);
                s.failures += fails;
                last_err = last.or(last_err);
            }
            if s.ops.is_empty() {
                bail!("every operation failed: {}", last_err.unwrap_or_default());
            }
            if let Some(pool) = &self.pool
                && let Some(b) = pool.builders().first()
            {
                let st = b.stats();
                self.stats.insert(
                    "connections_opened".into(),
                    st.connections_opened.to_string(),
                );
                // The worst sample decides whether the pool over-connects.
                let max = self
                    .stats
                    .get("connections_opened_max")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    .max(st.connections_opened);
                self.stats
                    .insert("connections_opened_max".into(), max.to_string());
                if let Some(l) = b.health().learned_channel_limit {
                    self.stats.insert("learned_limit".into(), l.to_string());
                }
                self.stats
                    .insert("startup_drops".into(), st.startup_drops.to_string());
                self.stats
                    .insert("channels_opened".into(), st.channels_opened.to_string());
                self.stats
                    .insert("channel_refusals".into(), st.channel_refusals.to_string());
            }
            Ok(s)
        })
    }
    fn after(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(p) = self.pool.take() {
                p.shutdown().await;
            }
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        self.stats.clone()
    }
}

// ===================================================================== nixmux: warm pool

/// nixmux warm: one pool for all samples (connected and warmed in setup); a sample is
/// `batch` acquire + `QueryValidPaths` round trips, each timed.
pub struct NixmuxWarm {
    env: EnvRef,
    builder: usize,
    protocol: Protocol,
    paths: BTreeSet<StorePath>,
    batch: usize,
    pool: Option<(Pool, Builder)>,
    round_trips_per_op: Option<f64>,
}

impl NixmuxWarm {
    /// A warm side.
    pub fn new(
        env: EnvRef,
        builder: usize,
        protocol: Protocol,
        paths: BTreeSet<StorePath>,
        batch: usize,
    ) -> Self {
        NixmuxWarm {
            env,
            builder,
            protocol,
            paths,
            batch,
            pool: None,
            round_trips_per_op: None,
        }
    }
}

impl Side for NixmuxWarm {
    fn id(&self) -> String {
        format!("nixmux-{}", scheme(self.protocol))
    }
    fn label(&self) -> String {
        format!(
            "nixmux {}: warm pooled session, acquire + QueryValidPaths({})",
            scheme(self.protocol),
            self.paths.len()
        )
    }
    fn role(&self) -> Role {
        Role::Subject
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            let pool = Pool::new();
            let b = pool.add(self.env.nixmux_config(self.builder, self.protocol)?);
            b.query_valid_paths(&self.paths, false).await?;
            self.pool = Some((pool, b));
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let (_, b) = self.pool.as_ref().ok_or_else(|| anyhow!("not set up"))?;
            let mut s = Sample::one();
            let before = b.stats().round_trips;
            for _ in 0..self.batch {
                let t = Instant::now();
                b.query_valid_paths(&self.paths, false).await?;
                s.ops.push(t.elapsed());
            }
            let per_op = (b.stats().round_trips - before) as f64 / self.batch.max(1) as f64;
            self.round_trips_per_op = Some(per_op);
            Ok(s)
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some((p, _)) = self.pool.take() {
                p.shutdown().await;
            }
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        self.round_trips_per_op
            .map(|r| BTreeMap::from([("round_trips_per_op".to_owned(), format!("{r:.2}"))]))
            .unwrap_or_default()
    }
}

// ===================================================================== OpenSSH sessions

/// How an OpenSSH side reaches the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A new `ssh` process and connection per session (what Nix does).
    Spawn,
    /// A client of a ControlMaster started in setup.
    Master,
}

/// OpenSSH sessions from nothing: per sample, `sessions` concurrent `ssh` processes per
/// builder, each doing the handshake and `ops` round trips (0: handshake only).
pub struct SshSessions {
    env: EnvRef,
    builders: Vec<usize>,
    protocol: Protocol,
    via: Via,
    sessions: usize,
    ops: usize,
    paths: BTreeSet<StorePath>,
    masters: Vec<ControlMaster>,
    open: Vec<ProcSession>,
}

impl SshSessions {
    /// An OpenSSH side.
    pub fn new(
        env: EnvRef,
        builders: Vec<usize>,
        protocol: Protocol,
        via: Via,
        sessions: usize,
        ops: usize,
    ) -> Self {
        SshSessions {
            env,
            builders,
            protocol,
            via,
            sessions,
            ops,
            paths: BTreeSet::new(),
            masters: Vec::new(),
            open: Vec::new(),
        }
    }
}

impl Side for SshSessions {
    fn id(&self) -> String {
        match self.via {
            Via::Spawn => format!("openssh-{}", scheme(self.protocol)),
            Via::Master => format!("openssh-cm-{}", scheme(self.protocol)),
        }
    }
    fn label(&self) -> String {
        let what = if self.ops == 0 {
            "handshake"
        } else {
            "handshake + round trip"
        };
        match self.via {
            Via::Spawn => format!(
                "ssh builder {} (new process + connection) + {what}",
                remote_command(self.protocol)
            ),
            Via::Master => format!(
                "ssh via ControlMaster: {} + {what}",
                remote_command(self.protocol)
            ),
        }
    }
    fn unavailable(&self) -> Option<String> {
        self.builders
            .iter()
            .find_map(|&i| self.env.ssh_args(i).err().map(|e| format!("{e:#}")))
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            if self.via == Via::Master {
                for &i in &self.builders {
                    self.masters.push(ControlMaster::start(&self.env, i).await?);
                }
            }
            Ok(())
        })
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            // A store reset by another side kills the masters' connections: restart them.
            if self.via == Via::Master {
                for k in 0..self.masters.len() {
                    if !self.masters[k].alive() {
                        self.masters[k] = ControlMaster::start(&self.env, self.builders[k]).await?;
                    }
                }
            }
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for (k, &i) in self.builders.iter().enumerate() {
                let args = match self.via {
                    Via::Spawn => self.env.ssh_args(i)?,
                    Via::Master => self
                        .masters
                        .get(k)
                        .ok_or_else(|| anyhow!("no master"))?
                        .client_args(),
                };
                for _ in 0..self.sessions {
                    let args = args.clone();
                    let protocol = self.protocol;
                    let paths = self.paths.clone();
                    let ops = self.ops;
                    tasks.spawn(async move {
                        let t = Instant::now();
                        let mut s = ProcSession::start(&args, protocol).await?;
                        let mut lat = Vec::new();
                        if ops == 0 {
                            lat.push(t.elapsed());
                        }
                        for _ in 0..ops {
                            let t = Instant::now();
                            s.conv.query_valid(&paths).await?;
                            lat.push(t.elapsed());
                        }
                        Ok::<_, anyhow::Error>((s, lat))
                    });
                }
            }
            let mut s = Sample::one();
            let mut last_err = None;
            while let Some(r) = tasks.join_next().await {
                match r.map_err(|e| anyhow!("task: {e}"))? {
                    Ok((sess, lat)) => {
                        self.open.push(sess);
                        s.ops.extend(lat);
                    }
                    Err(e) => {
                        s.failures += 1;
                        last_err = Some(format!("{e:#}"));
                    }
                }
            }
            if s.ops.is_empty() {
                bail!("every session failed: {}", last_err.unwrap_or_default());
            }
            Ok(s)
        })
    }
    fn after(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let open = std::mem::take(&mut self.open);
            futures::future::join_all(open.into_iter().map(ProcSession::close)).await;
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for m in self.masters.drain(..) {
                m.stop().await;
            }
        })
    }
}

/// One OpenSSH session held open across samples (spawned in setup): a sample is `batch`
/// `QueryValidPaths` round trips over the ssh process's pipes.
pub struct SshHeld {
    env: EnvRef,
    builder: usize,
    protocol: Protocol,
    paths: BTreeSet<StorePath>,
    batch: usize,
    session: Option<ProcSession>,
}

impl SshHeld {
    /// A held-session side.
    pub fn new(
        env: EnvRef,
        builder: usize,
        protocol: Protocol,
        paths: BTreeSet<StorePath>,
        batch: usize,
    ) -> Self {
        SshHeld {
            env,
            builder,
            protocol,
            paths,
            batch,
            session: None,
        }
    }
}

impl Side for SshHeld {
    fn id(&self) -> String {
        format!("openssh-{}", scheme(self.protocol))
    }
    fn label(&self) -> String {
        format!(
            "ssh builder {} held open: QueryValidPaths({}) over the pipes",
            remote_command(self.protocol),
            self.paths.len()
        )
    }
    fn unavailable(&self) -> Option<String> {
        self.env
            .ssh_args(self.builder)
            .err()
            .map(|e| format!("{e:#}"))
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            let args = self.env.ssh_args(self.builder)?;
            let mut s = ProcSession::start(&args, self.protocol).await?;
            s.conv.query_valid(&self.paths).await?;
            self.session = Some(s);
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let sess = self.session.as_mut().ok_or_else(|| anyhow!("not set up"))?;
            let mut s = Sample::one();
            for _ in 0..self.batch {
                let t = Instant::now();
                sess.conv.query_valid(&self.paths).await?;
                s.ops.push(t.elapsed());
            }
            Ok(s)
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(s) = self.session.take() {
                s.close().await;
            }
        })
    }
}

// ===================================================================== nixmux: new channel

/// nixmux: a new channel on a live connection (connected in setup): exec + handshake, or
/// for [`NixmuxNewChannel::to_daemon_socket`] a channel to the builder's nix-daemon socket
/// (`direct-streamlocal`, no process start) + handshake.
pub struct NixmuxNewChannel {
    env: EnvRef,
    builder: usize,
    protocol: Protocol,
    socket: bool,
    conn: Option<SshConnection>,
    last: Option<(Conv, ExecStatus)>,
}

impl NixmuxNewChannel {
    /// A new-channel side.
    pub fn new(env: EnvRef, builder: usize, protocol: Protocol) -> Self {
        NixmuxNewChannel {
            env,
            builder,
            protocol,
            socket: false,
            conn: None,
            last: None,
        }
    }

    /// The worker protocol over a channel to the daemon's socket.
    pub fn to_daemon_socket(env: EnvRef, builder: usize) -> Self {
        NixmuxNewChannel {
            socket: true,
            ..Self::new(env, builder, Protocol::Worker)
        }
    }
}

/// Connects with nixmux's transport to builder `i` of `env`.
async fn transport_connect(env: &Env, i: usize) -> anyhow::Result<SshConnection> {
    let c: BuilderConfig = env.nixmux_config(i, Protocol::Worker)?;
    c.target
        .connect(NoopObserver)
        .await
        .map_err(|e| anyhow!("connecting: {e}"))
}

impl Side for NixmuxNewChannel {
    fn id(&self) -> String {
        if self.socket {
            "nixmux-ssh-ng-socket".into()
        } else {
            format!("nixmux-{}", scheme(self.protocol))
        }
    }
    fn label(&self) -> String {
        if self.socket {
            "nixmux ssh-ng: channel to the daemon socket + handshake on a live connection".into()
        } else {
            format!(
                "nixmux {}: channel open + exec + handshake on a live connection",
                scheme(self.protocol)
            )
        }
    }
    fn role(&self) -> Role {
        Role::Subject
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            self.conn = Some(transport_connect(&self.env, self.builder).await?);
            Ok(())
        })
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            if self.conn.as_ref().is_none_or(SshConnection::is_closed) {
                self.conn = Some(transport_connect(&self.env, self.builder).await?);
            }
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let conn = self.conn.as_ref().ok_or_else(|| anyhow!("not set up"))?;
            let ch = if self.socket {
                conn.open_streamlocal(nixmux::DEFAULT_DAEMON_SOCKET, ExecOptions::default())
                    .await
                    .map_err(|e| anyhow!("channel to the daemon socket: {e}"))?
            } else {
                conn.exec_with(remote_command(self.protocol), ExecOptions::default())
                    .await
                    .map_err(|e| anyhow!("exec: {e}"))?
            };
            let (stdin, stdout, status) = ch.into_parts();
            let conv = Conv::handshake(
                self.protocol,
                Box::new(stdout),
                Box::new(stdin),
                SessionConfig::default(),
            )
            .await?;
            self.last = Some((conv, status));
            Ok(Sample::one())
        })
    }
    fn after(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some((conv, status)) = self.last.take() {
                conv.close().await;
                // Wait for the remote exit (or the socket's close) so the next open does not
                // meet MaxSessions.
                let _ = tokio::time::timeout(Duration::from_secs(5), status.closed_signal()).await;
            }
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(c) = self.conn.take() {
                c.disconnect().await;
            }
        })
    }
}

/// A plain remote command on a new channel of a live connection, to the remote exit: the
/// transport's part of [`NixmuxNewChannel`] without the Nix process (a yardstick).
pub struct NixmuxExec {
    env: EnvRef,
    builder: usize,
    command: String,
    conn: Option<SshConnection>,
}

impl NixmuxExec {
    /// An exec side.
    pub fn new(env: EnvRef, builder: usize, command: &str) -> Self {
        NixmuxExec {
            env,
            builder,
            command: command.to_owned(),
            conn: None,
        }
    }
}

impl Side for NixmuxExec {
    fn id(&self) -> String {
        format!("nixmux-exec-{}", self.command.replace(' ', "-"))
    }
    fn label(&self) -> String {
        format!(
            "nixmux transport: channel open + exec `{}` + exit on a live connection",
            self.command
        )
    }
    fn role(&self) -> Role {
        Role::Reference
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            if self.conn.as_ref().is_none_or(SshConnection::is_closed) {
                self.conn = Some(transport_connect(&self.env, self.builder).await?);
            }
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let conn = self.conn.as_ref().ok_or_else(|| anyhow!("not set up"))?;
            let mut ch = conn
                .exec_with(&self.command, ExecOptions::default())
                .await
                .map_err(|e| anyhow!("exec: {e}"))?;
            let mut sink = Vec::new();
            ch.stdout().read_to_end(&mut sink).await?;
            let exit = ch.exit().await.map_err(|e| anyhow!("{e}"))?;
            if !exit.success() {
                bail!("`{}`: {exit}", self.command);
            }
            Ok(Sample::one())
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(c) = self.conn.take() {
                c.disconnect().await;
            }
        })
    }
}

/// A plain remote command through a ControlMaster client (`ssh -o ControlPath=... CMD`).
pub struct CmExec {
    env: EnvRef,
    builder: usize,
    command: String,
    master: Option<ControlMaster>,
}

impl CmExec {
    /// A ControlMaster exec side.
    pub fn new(env: EnvRef, builder: usize, command: &str) -> Self {
        CmExec {
            env,
            builder,
            command: command.to_owned(),
            master: None,
        }
    }
}

impl Side for CmExec {
    fn id(&self) -> String {
        format!("openssh-cm-exec-{}", self.command.replace(' ', "-"))
    }
    fn label(&self) -> String {
        format!(
            "ssh via ControlMaster `{}` (new client process, multiplexed)",
            self.command
        )
    }
    fn role(&self) -> Role {
        Role::Reference
    }
    fn unavailable(&self) -> Option<String> {
        self.env
            .ssh_args(self.builder)
            .err()
            .map(|e| format!("{e:#}"))
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            if !self.master.as_mut().is_some_and(ControlMaster::alive) {
                self.master = Some(ControlMaster::start(&self.env, self.builder).await?);
            }
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let m = self.master.as_ref().ok_or_else(|| anyhow!("no master"))?;
            crate::peers::ssh_run(&m.client_args(), &self.command, Duration::from_secs(30)).await?;
            Ok(Sample::one())
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(m) = self.master.take() {
                m.stop().await;
            }
        })
    }
}

// ===================================================================== throughput

/// Direction of a bulk transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Builder to client (`head -c N /dev/zero` read locally).
    Down,
    /// Client to builder (written locally into `cat > /dev/null`).
    Up,
}

impl Direction {
    fn command(self, bytes: u64) -> String {
        match self {
            Direction::Down => format!("head -c {bytes} /dev/zero"),
            Direction::Up => "echo ready && exec cat > /dev/null".to_owned(),
        }
    }
    /// `down` or `up`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Down => "down",
            Direction::Up => "up",
        }
    }
}

/// Reads until EOF, timing from the first byte; returns (bytes, time since first byte).
async fn drain_timed<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> anyhow::Result<(u64, Duration)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut first: Option<Instant> = None;
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    Ok((total, first.map(|t| t.elapsed()).unwrap_or_default()))
}

/// Waits for the `ready` line, then writes `bytes` zeros and closes; returns when the write
/// side is done (the caller then waits for the remote exit) and when writing started.
async fn feed<R, W>(r: &mut R, w: &mut W, bytes: u64) -> anyhow::Result<Instant>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut ready = [0u8; 6];
    r.read_exact(&mut ready)
        .await
        .context("waiting for the remote `ready`")?;
    if &ready != b"ready\n" {
        bail!("unexpected remote output {ready:?}");
    }
    let t = Instant::now();
    let chunk = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(chunk.len(), |l| l.min(chunk.len()));
        w.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    w.shutdown().await?;
    Ok(t)
}

/// nixmux transport: one exec channel on a live connection moving `bytes` one way.
pub struct NixmuxStream {
    env: EnvRef,
    builder: usize,
    dir: Direction,
    bytes: u64,
    id: String,
    role: Role,
    conn: Option<SshConnection>,
    cipher: Option<String>,
}

impl NixmuxStream {
    /// A stream side with an id and role (also used as the raw yardstick of pushes).
    pub fn new(
        env: EnvRef,
        builder: usize,
        dir: Direction,
        bytes: u64,
        id: &str,
        role: Role,
    ) -> Self {
        NixmuxStream {
            env,
            builder,
            dir,
            bytes,
            id: id.to_owned(),
            role,
            conn: None,
            cipher: None,
        }
    }
}

impl Side for NixmuxStream {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn label(&self) -> String {
        format!(
            "nixmux transport: one exec channel, `{}` ({})",
            self.dir.command(self.bytes),
            self.cipher.as_deref().unwrap_or("negotiated cipher")
        )
    }
    fn role(&self) -> Role {
        self.role
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            if self.conn.as_ref().is_none_or(SshConnection::is_closed) {
                let c = transport_connect(&self.env, self.builder).await?;
                self.cipher = c.algorithms().map(|(_, c)| c.to_owned());
                self.conn = Some(c);
            }
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let conn = self.conn.as_ref().ok_or_else(|| anyhow!("not connected"))?;
            let ch = conn
                .exec_with(&self.dir.command(self.bytes), ExecOptions::default())
                .await
                .map_err(|e| anyhow!("exec: {e}"))?;
            let (mut stdin, mut stdout, status) = ch.into_parts();
            let (bytes, took) = match self.dir {
                Direction::Down => drain_timed(&mut stdout).await?,
                Direction::Up => {
                    let t = feed(&mut stdout, &mut stdin, self.bytes).await?;
                    let exit = status.exit().await.map_err(|e| anyhow!("{e}"))?;
                    if !exit.success() {
                        bail!("remote cat: {exit}");
                    }
                    (self.bytes, t.elapsed())
                }
            };
            if bytes != self.bytes {
                bail!("moved {bytes} bytes, expected {}", self.bytes);
            }
            Ok(Sample {
                timed: Some(took),
                bytes,
                ..Sample::default()
            })
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(c) = self.conn.take() {
                c.disconnect().await;
            }
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        self.cipher
            .iter()
            .map(|c| ("cipher".to_owned(), c.clone()))
            .collect()
    }
}

/// OpenSSH: `ssh -c CIPHER builder CMD` moving `bytes` one way through the process's pipes.
pub struct SshStream {
    env: EnvRef,
    builder: usize,
    dir: Direction,
    bytes: u64,
    cipher: String,
    id: String,
    role: Role,
}

impl SshStream {
    /// A stream side.
    pub fn new(
        env: EnvRef,
        builder: usize,
        dir: Direction,
        bytes: u64,
        cipher: &str,
        id: &str,
        role: Role,
    ) -> Self {
        SshStream {
            env,
            builder,
            dir,
            bytes,
            cipher: cipher.to_owned(),
            id: id.to_owned(),
            role,
        }
    }
}

impl Side for SshStream {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn label(&self) -> String {
        format!(
            "ssh -c {} builder `{}` (through its pipes)",
            self.cipher,
            self.dir.command(self.bytes)
        )
    }
    fn role(&self) -> Role {
        self.role
    }
    fn unavailable(&self) -> Option<String> {
        self.env
            .ssh_args(self.builder)
            .err()
            .map(|e| format!("{e:#}"))
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let mut cmd = tokio::process::Command::new("ssh");
            cmd.args(["-x", "-a", "-c", &self.cipher])
                .args(self.env.ssh_args(self.builder)?)
                .arg("--")
                .arg(self.dir.command(self.bytes))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            let mut child = cmd.spawn().context("spawning ssh")?;
            let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
            let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
            let mut stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
            let err_task = tokio::spawn(async move {
                let mut s = String::new();
                let _ = stderr.read_to_string(&mut s).await;
                s
            });
            let r = async {
                match self.dir {
                    Direction::Down => {
                        drop(stdin);
                        let (bytes, took) = drain_timed(&mut stdout).await?;
                        let st = child.wait().await?;
                        Ok::<_, anyhow::Error>((bytes, took, st))
                    }
                    Direction::Up => {
                        let t = feed(&mut stdout, &mut stdin, self.bytes).await?;
                        drop(stdin);
                        let st = child.wait().await?;
                        Ok((self.bytes, t.elapsed(), st))
                    }
                }
            }
            .await;
            let (bytes, took, st) = match r {
                Ok(x) => x,
                Err(e) => {
                    let _ = child.start_kill();
                    let err = err_task.await.unwrap_or_default();
                    bail!("{e:#}: {}", err.trim());
                }
            };
            if !st.success() || bytes != self.bytes {
                let err = err_task.await.unwrap_or_default();
                bail!("ssh {st}, {bytes} bytes: {}", err.trim());
            }
            Ok(Sample {
                timed: Some(took),
                bytes,
                ..Sample::default()
            })
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        [("cipher".to_owned(), self.cipher.clone())].into()
    }
}

// ===================================================================== commands

/// What to do before each sample of a command side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Before {
    /// Nothing.
    Nothing,
    /// Empty builder `i`'s store.
    ResetStore(usize),
    /// Delete these paths from the client store.
    DeleteLocal(BTreeSet<StorePath>),
}

/// A command run to completion per sample (`ssh true`, `nix store ping`, `nix copy`),
/// `parallel` copies at once (one per entry).
pub struct CommandSide {
    /// Id.
    pub id: String,
    /// Label.
    pub label: String,
    /// Role.
    pub role: Role,
    /// Why it cannot run, if it cannot.
    pub unavailable: Option<String>,
    /// Builds the commands of one sample (all run concurrently).
    pub make: Box<dyn Fn() -> anyhow::Result<Vec<tokio::process::Command>> + Send>,
    /// Untimed step before each sample.
    pub before: Before,
    /// Env (for resets).
    pub env: EnvRef,
    /// Per-command timeout.
    pub timeout: Duration,
    /// Bytes a sample moves (for throughput figures), if known.
    pub bytes: u64,
}

impl Side for CommandSide {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn label(&self) -> String {
        self.label.clone()
    }
    fn role(&self) -> Role {
        self.role
    }
    fn unavailable(&self) -> Option<String> {
        self.unavailable.clone()
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            match &self.before {
                Before::Nothing => Ok(()),
                Before::ResetStore(i) => self.env.reset_store(*i).await,
                Before::DeleteLocal(paths) => self.env.delete_from_client(paths).await,
            }
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let cmds = (self.make)()?;
            let timeout = self.timeout;
            let runs = cmds
                .into_iter()
                .map(|mut c| async move { run_output(&mut c, timeout).await });
            for r in futures::future::join_all(runs).await {
                r?;
            }
            Ok(Sample::bytes(self.bytes))
        })
    }
}

// ===================================================================== push

/// nixmux: push a closure to a freshly emptied builder store.
pub struct NixmuxPush {
    env: EnvRef,
    builder: usize,
    protocol: Protocol,
    roots: BTreeSet<StorePath>,
    warm: bool,
    compress: bool,
    zstd: bool,
    /// One channel only (`parallel.max_extra_lanes = 0`): the yardstick for parallel lanes.
    one_channel: bool,
    /// No send-ahead limit (`TransportConfig::send_ahead = None`): the yardstick for it.
    unlimited_send_ahead: bool,
    /// What the roots are, when a case pushes more than one kind (`nixmux-ssh-ng-<tag>`).
    tag: Option<(&'static str, &'static str)>,
    pool: Option<(Pool, Builder)>,
    details: BTreeMap<String, String>,
}

impl NixmuxPush {
    /// The same side, told apart by `tag` in its id and `what` in its label (what its roots
    /// are).
    pub fn tagged(mut self, tag: &'static str, what: &'static str) -> Self {
        self.tag = Some((tag, what));
        self
    }

    /// The same side writing as far ahead as sshd's window allows (no send-ahead limit).
    pub fn unlimited_send_ahead(mut self) -> Self {
        self.unlimited_send_ahead = true;
        self
    }

    /// The same side on the lease's channel alone (no parallel lanes, issue 11).
    pub fn one_channel(mut self) -> Self {
        self.one_channel = true;
        self
    }

    /// The same side with SSH zlib compression (`compress=true`).
    pub fn compressed(mut self) -> Self {
        self.compress = true;
        self
    }

    /// The same side with the closure sent through the zstd bulk channel
    /// (`bulk-compression=zstd`). Without it, a side never uses that channel, whatever the
    /// link (`bulk-compression=no`), so that each side measures one path.
    pub fn zstd(mut self) -> Self {
        self.zstd = true;
        self
    }

    /// A push side; `warm`: the connection and a session exist before the clock starts.
    pub fn new(
        env: EnvRef,
        builder: usize,
        protocol: Protocol,
        roots: BTreeSet<StorePath>,
        warm: bool,
    ) -> Self {
        NixmuxPush {
            env,
            builder,
            protocol,
            roots,
            warm,
            compress: false,
            zstd: false,
            one_channel: false,
            unlimited_send_ahead: false,
            tag: None,
            pool: None,
            details: BTreeMap::new(),
        }
    }
}

impl Side for NixmuxPush {
    fn id(&self) -> String {
        if let Some((tag, _)) = self.tag {
            format!("nixmux-{}-{tag}", scheme(self.protocol))
        } else if self.one_channel {
            format!("nixmux-{}-1ch", scheme(self.protocol))
        } else if self.zstd {
            format!("nixmux-{}-zstd", scheme(self.protocol))
        } else if self.compress {
            format!("nixmux-{}-zlib", scheme(self.protocol))
        } else if self.warm {
            format!("nixmux-{}", scheme(self.protocol))
        } else {
            format!("nixmux-{}-cold", scheme(self.protocol))
        }
    }
    fn label(&self) -> String {
        if let Some((_, what)) = self.tag {
            format!(
                "nixmux {}: push_closure over a warm pooled connection, {what}",
                scheme(self.protocol)
            )
        } else if self.one_channel {
            format!(
                "nixmux {}: push_closure over a warm pooled connection, one channel (no parallel lanes)",
                scheme(self.protocol)
            )
        } else if self.zstd {
            format!(
                "nixmux {}: push_closure over a warm pooled connection, zstd bulk channel",
                scheme(self.protocol)
            )
        } else if self.compress {
            format!(
                "nixmux {}: push_closure over a warm pooled connection, SSH zlib",
                scheme(self.protocol)
            )
        } else if self.warm {
            format!(
                "nixmux {}: push_closure over a warm pooled connection",
                scheme(self.protocol)
            )
        } else {
            format!(
                "nixmux {}: push_closure from a cold start (connect included)",
                scheme(self.protocol)
            )
        }
    }
    fn role(&self) -> Role {
        Role::Subject
    }
    fn unavailable(&self) -> Option<String> {
        self.env
            .local()
            .is_none()
            .then(|| "needs the embedded rig (fresh builder stores)".to_owned())
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            self.env.reset_store(self.builder).await?;
            let pool = Pool::new();
            let mut config = self.env.nixmux_config(self.builder, self.protocol)?;
            config.target.transport.compression = self.compress;
            if self.unlimited_send_ahead {
                config.target.transport.send_ahead = None;
            }
            config.bulk.mode = if self.zstd {
                nixmux::bulk::BulkCompression::Zstd
            } else {
                nixmux::bulk::BulkCompression::Off
            };
            if self.one_channel {
                config.parallel.max_extra_lanes = 0;
            }
            let b = pool.add(config);
            if self.warm {
                b.query_valid_paths(&BTreeSet::new(), false).await?;
            }
            // The local side is warm in both cases (as a daemon's would be).
            if let Some(l) = self.env.local() {
                l.query_valid_paths(&BTreeSet::new()).await?;
            }
            self.pool = Some((pool, b));
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let (_, b) = self.pool.as_ref().ok_or_else(|| anyhow!("not prepared"))?;
            let local = self.env.local().ok_or_else(|| anyhow!("no local store"))?;
            let before = b.stats().round_trips;
            let r = b.push_closure(&local, &self.roots, false, None).await?;
            // Protocol round trips of this push (the handshake's too when cold): the figure
            // that must not grow with the closure.
            self.details.insert(
                "round_trips_per_push".into(),
                format!(
                    "{} ({} paths)",
                    b.stats().round_trips - before,
                    r.transferred.len()
                ),
            );
            if r.transferred.len() != r.closure {
                bail!(
                    "pushed {} of {} paths: the builder store was not empty",
                    r.transferred.len(),
                    r.closure
                );
            }
            Ok(Sample::bytes(r.bytes))
        })
    }
    fn after(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some((p, b)) = self.pool.take() {
                let st = b.stats();
                self.details
                    .insert("channels_opened".into(), st.channels_opened.to_string());
                if let Some(choice) = b.parallel_stats().last_choice {
                    self.details.insert("parallel".into(), choice);
                }
                p.shutdown().await;
            }
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        self.details.clone()
    }
}

// ===================================================================== fetch

/// nixmux: fetch paths from a builder into a client store that lacks them.
pub struct NixmuxFetch {
    env: EnvRef,
    builder: usize,
    protocol: Protocol,
    paths: BTreeSet<StorePath>,
    /// A local store of this sample's own: its sessions' temporary roots on the fetched
    /// paths end with it, so the next sample can delete them.
    local: Option<LocalStore>,
    pool: Option<(Pool, Builder)>,
    details: BTreeMap<String, String>,
}

impl NixmuxFetch {
    /// A fetch side: `paths` are on builder `builder` (and deleted here before each sample).
    pub fn new(
        env: EnvRef,
        builder: usize,
        protocol: Protocol,
        paths: BTreeSet<StorePath>,
    ) -> Self {
        NixmuxFetch {
            env,
            builder,
            protocol,
            paths,
            local: None,
            pool: None,
            details: BTreeMap::new(),
        }
    }
}

impl Side for NixmuxFetch {
    fn id(&self) -> String {
        format!("nixmux-{}", scheme(self.protocol))
    }
    fn label(&self) -> String {
        format!(
            "nixmux {}: fetch_outputs over a warm pooled connection into the client store",
            scheme(self.protocol)
        )
    }
    fn role(&self) -> Role {
        Role::Subject
    }
    fn unavailable(&self) -> Option<String> {
        self.env
            .local()
            .is_none()
            .then(|| "needs the embedded rig (a client store to empty)".to_owned())
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            // The previous sample's local store went in `after`, with its temporary roots.
            self.env.delete_from_client(&self.paths).await?;
            let local = self
                .env
                .fresh_local()
                .ok_or_else(|| anyhow!("no local store"))?;
            // Both ends warm, as a daemon's would be.
            local.query_valid_paths(&BTreeSet::new()).await?;
            let pool = Pool::new();
            let b = pool.add(self.env.nixmux_config(self.builder, self.protocol)?);
            b.query_valid_paths(&BTreeSet::new(), false).await?;
            self.local = Some(local);
            self.pool = Some((pool, b));
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let (_, b) = self.pool.as_ref().ok_or_else(|| anyhow!("not prepared"))?;
            let local = self.local.as_ref().ok_or_else(|| anyhow!("not prepared"))?;
            let before = b.stats().round_trips;
            let r = b.fetch_outputs(local, &self.paths, None).await?;
            self.details.insert(
                "round_trips_per_fetch".into(),
                format!(
                    "{} ({} paths)",
                    b.stats().round_trips - before,
                    r.transferred.len()
                ),
            );
            if r.transferred.len() != self.paths.len() {
                bail!(
                    "fetched {} of {} paths: the client store was not empty",
                    r.transferred.len(),
                    self.paths.len()
                );
            }
            Ok(Sample::bytes(r.bytes))
        })
    }
    fn after(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some((p, b)) = self.pool.take() {
                self.details.insert(
                    "channels_opened".into(),
                    b.stats().channels_opened.to_string(),
                );
                p.shutdown().await;
            }
            // Its sessions' temporary roots go with it.
            self.local = None;
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        self.details.clone()
    }
}

// ===================================================================== build

/// nixmux: build `n` fresh trivial derivations on a warm builder, at most `jobs` at once
/// (the machines file's max-jobs, as Nix's hook honours), each `build` then `fetch_outputs`.
pub struct NixmuxBuild {
    env: EnvRef,
    builder: usize,
    protocol: Protocol,
    n: usize,
    jobs: usize,
    pool: Option<(Pool, Builder)>,
    drvs: Vec<StorePath>,
    details: BTreeMap<String, String>,
}

impl NixmuxBuild {
    /// A build side.
    pub fn new(env: EnvRef, builder: usize, protocol: Protocol, n: usize, jobs: usize) -> Self {
        NixmuxBuild {
            env,
            builder,
            protocol,
            n,
            jobs,
            pool: None,
            drvs: Vec::new(),
            details: BTreeMap::new(),
        }
    }
}

impl Side for NixmuxBuild {
    fn id(&self) -> String {
        format!("nixmux-{}", scheme(self.protocol))
    }
    fn label(&self) -> String {
        format!(
            "nixmux {}: {} × (build + fetch_outputs), {} at once, warm pool",
            scheme(self.protocol),
            self.n,
            self.jobs
        )
    }
    fn role(&self) -> Role {
        Role::Subject
    }
    fn unavailable(&self) -> Option<String> {
        self.env
            .local()
            .is_none()
            .then(|| "needs the embedded rig (a client store to build from)".to_owned())
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            let pool = Pool::new();
            let mut c = self.env.nixmux_config(self.builder, self.protocol)?;
            c.pool.max_sessions = self.jobs.max(1) * 2;
            let b = pool.add(c);
            b.query_valid_paths(&BTreeSet::new(), false).await?;
            self.pool = Some((pool, b));
            Ok(())
        })
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            self.drvs = self.env.trivial_derivations(self.n).await?;
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let (_, b) = self.pool.as_ref().ok_or_else(|| anyhow!("not set up"))?;
            let local = self.env.local().ok_or_else(|| anyhow!("no local store"))?;
            let sem = Arc::new(tokio::sync::Semaphore::new(self.jobs.max(1)));
            let (logs, mut stream) = log_channel(10_000);
            // Drain logs as a scheduler would.
            let drain = tokio::spawn(async move { while stream.recv().await.is_some() {} });
            let mut tasks = tokio::task::JoinSet::new();
            for drv in self.drvs.clone() {
                let b = b.clone();
                let local = local.clone();
                let sem = sem.clone();
                let logs = logs.clone();
                tasks.spawn(async move {
                    let _permit = sem.acquire_owned().await?;
                    let o = b
                        .build(&local, &drv, &BuildOptions::default(), &logs)
                        .await?;
                    if o.result.status != BuildStatus::Built {
                        bail!("{drv}: {:?}: {}", o.result.status, o.log_tail.join(" | "));
                    }
                    let outs: BTreeSet<StorePath> = o
                        .result
                        .built_outputs
                        .values()
                        .map(|x| x.path.clone())
                        .collect();
                    b.fetch_outputs(&local, &outs, None).await?;
                    Ok::<_, anyhow::Error>(())
                });
            }
            drop(logs);
            let mut first_err = None;
            while let Some(r) = tasks.join_next().await {
                if let Err(e) = r.map_err(|e| anyhow!("task: {e}")).and_then(|x| x) {
                    first_err.get_or_insert(e);
                }
            }
            drain.abort();
            if let Some(e) = first_err {
                return Err(e);
            }
            // Outputs must really be in the client store now.
            let mut outs = BTreeSet::new();
            for d in &self.drvs {
                outs.extend(self.env.drv_outputs(d).await?);
            }
            let valid = local.query_valid_paths(&outs).await?;
            if valid.len() != outs.len() {
                bail!("{} of {} outputs valid locally", valid.len(), outs.len());
            }
            Ok(Sample::one())
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some((p, b)) = self.pool.take() {
                let st = b.stats();
                self.details.insert(
                    "connections_opened".into(),
                    st.connections_opened.to_string(),
                );
                self.details
                    .insert("channels_opened".into(), st.channels_opened.to_string());
                p.shutdown().await;
            }
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        self.details.clone()
    }
}

/// `nix-build --builders @machines -j0 --no-out-link DRV...` of `n` fresh trivial
/// derivations, in the client's private store.
pub struct NixBuild {
    env: EnvRef,
    protocol: Protocol,
    n: usize,
    machines: Option<std::path::PathBuf>,
    drvs: Vec<StorePath>,
    timeout: Duration,
}

impl NixBuild {
    /// A nix-build side using builder 0.
    pub fn new(env: EnvRef, protocol: Protocol, n: usize, timeout: Duration) -> Self {
        NixBuild {
            env,
            protocol,
            n,
            machines: None,
            drvs: Vec::new(),
            timeout,
        }
    }
}

impl Side for NixBuild {
    fn id(&self) -> String {
        format!("nix-build-{}", scheme(self.protocol))
    }
    fn label(&self) -> String {
        format!(
            "nix-build --builders @machines ({}://, max-jobs 8) -j0 of {} .drv",
            scheme(self.protocol),
            self.n
        )
    }
    fn unavailable(&self) -> Option<String> {
        (!self.env.embedded()).then(|| {
            "needs the embedded rig (a client store and a machines file Nix 2.8 can use)".to_owned()
        })
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            self.machines = Some(self.env.machines_file(self.protocol, 1)?);
            Ok(())
        })
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            self.drvs = self.env.trivial_derivations(self.n).await?;
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let machines = self
                .machines
                .as_ref()
                .ok_or_else(|| anyhow!("not set up"))?;
            nix_build_with(&self.env, machines, &self.drvs, self.n, self.timeout).await?;
            Ok(Sample::one())
        })
    }
}

/// `nix-build --builders @machines -j0 --no-out-link DRV...` in the client's private store;
/// fails unless it printed `n` outputs.
pub(crate) async fn nix_build_with(
    env: &EnvRef,
    machines: &std::path::Path,
    drvs: &[StorePath],
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut args: Vec<OsString> = vec![
        "--builders".into(),
        format!("@{}", machines.display()).into(),
        "-j0".into(),
        "--no-out-link".into(),
    ];
    args.extend(
        drvs.iter()
            .map(|d| OsString::from(d.to_absolute(&StoreDir::default()))),
    );
    let mut cmd = env.nix_command("nix-build", args)?;
    let out = run_output(&mut cmd, timeout).await?;
    let printed = String::from_utf8_lossy(&out).lines().count();
    if printed != n {
        bail!("nix-build printed {printed} outputs, not {n}");
    }
    Ok(())
}
