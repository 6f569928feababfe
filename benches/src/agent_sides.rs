//! Sides that measure `nixmux agent` with an unmodified Nix: `nix-build` through the agent
//! (beside stock `nix-build --builders`, in the `build` workload), and what `nixmux connect`
//! adds to a session (the `agent-connect` workload).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::future::BoxFuture;
use nixmux::proto::store_path::StorePath;
use nixmux::{Pool, Protocol, RawSession};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::report::Role;
use crate::runner::{Sample, Side, SideResultT};
use crate::sides::{EnvRef, nix_build_with};

/// A `nixmux agent` child serving builder 0 of the run, and the machines file for Nix.
struct AgentProcess {
    child: Child,
    socket: PathBuf,
    machines_for_nix: PathBuf,
    /// The builder's name, for `nixmux connect`.
    name: String,
}

impl AgentProcess {
    async fn start(env: &EnvRef, protocol: Protocol, spares: usize) -> anyhow::Result<Self> {
        let program = env
            .nixmux_program()
            .ok_or_else(|| anyhow!("no nixmux program (set NIXMUX_BIN)"))?;
        let machines = env.nixmux_machines_file(protocol, 1)?;
        let dir = env
            .scratch()
            .join(format!("agent-{}-{}", protocol.scheme(), env.next_seq()));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("agent.sock");
        let child = Command::new(&program)
            .args(["agent", "--machines"])
            .arg(&machines)
            .arg("--socket")
            .arg(&socket)
            .args(["--spares", &spares.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting nixmux agent")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("nixmux agent did not start (see {})", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = Command::new(&program)
            .args(["agent", "machines", "--machines"])
            .arg(&machines)
            .arg("--socket")
            .arg(&socket)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "nixmux agent machines: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let machines_for_nix = dir.join("machines-for-nix");
        std::fs::write(&machines_for_nix, &out.stdout)?;
        let first = std::fs::read_to_string(&machines)?;
        let name = first
            .split_whitespace()
            .next()
            .and_then(|u| u.split_once("://"))
            .map(|(_, rest)| rest.to_owned())
            .ok_or_else(|| anyhow!("no builder line in {}", machines.display()))?;
        Ok(AgentProcess {
            child,
            socket,
            machines_for_nix,
            name,
        })
    }

    /// The agent's status report, if it answers.
    async fn status(&self, env: &EnvRef) -> Option<serde_json::Value> {
        let program = env.nixmux_program()?;
        let out = Command::new(&program)
            .args(["agent", "status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .await
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// What the agent did, for the report: sessions, spare hits and misses, connections.
    async fn details(&self, env: &EnvRef) -> BTreeMap<String, String> {
        let mut d = BTreeMap::new();
        if let Some(b) = self
            .status(env)
            .await
            .and_then(|s| s["builders"].as_array().and_then(|b| b.first().cloned()))
        {
            for k in [
                "sessions_total",
                "spare_hits",
                "spare_misses",
                "hello_hits",
                "hello_misses",
                "connections_opened",
            ] {
                d.insert(format!("agent_{k}"), b[k].to_string());
            }
        }
        d
    }

    /// Waits until the agent has `n` spares of its builder ready (after a sample took one).
    async fn spares_ready(&self, env: &EnvRef, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let ready = self
                .status(env)
                .await
                .and_then(|v| {
                    v["builders"]
                        .as_array()
                        .map(|b| b.iter().filter_map(|b| b["spares_ready"].as_u64()).sum())
                })
                .unwrap_or(0u64);
            if ready >= n as u64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `nix-build --builders @<agent machines> -j0` of `n` fresh trivial derivations, through a
/// `nixmux agent` started for the workload: Nix's build hook runs `nixmux connect` instead of
/// `ssh`.
pub struct AgentBuild {
    env: EnvRef,
    protocol: Protocol,
    n: usize,
    agent: Option<AgentProcess>,
    drvs: Vec<StorePath>,
    timeout: Duration,
    details: BTreeMap<String, String>,
}

/// Spares the build side's agent keeps per builder: the agent's default.
const SPARES: usize = 2;

impl AgentBuild {
    /// A side for builder 0.
    pub fn new(env: EnvRef, protocol: Protocol, n: usize, timeout: Duration) -> Self {
        AgentBuild {
            env,
            protocol,
            n,
            agent: None,
            drvs: Vec::new(),
            timeout,
            details: BTreeMap::new(),
        }
    }
}

impl Side for AgentBuild {
    fn id(&self) -> String {
        format!("nix-build-agent-{}", self.protocol.scheme())
    }
    fn label(&self) -> String {
        format!(
            "nix-build through nixmux agent ({}://, max-jobs 8, {SPARES} spares) -j0 of {} .drv",
            self.protocol.scheme(),
            self.n
        )
    }
    fn role(&self) -> Role {
        Role::Subject
    }
    fn unavailable(&self) -> Option<String> {
        if !self.env.embedded() {
            return Some("needs the embedded rig (a client store for nix-build)".to_owned());
        }
        self.env
            .nixmux_program()
            .is_none()
            .then(|| "no nixmux program to run as the agent (set NIXMUX_BIN)".to_owned())
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            self.agent = Some(AgentProcess::start(&self.env, self.protocol, SPARES).await?);
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
            let agent = self.agent.as_ref().ok_or_else(|| anyhow!("not set up"))?;
            nix_build_with(
                &self.env,
                &agent.machines_for_nix,
                &self.drvs,
                self.n,
                self.timeout,
            )
            .await?;
            Ok(Sample::one())
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(mut a) = self.agent.take() {
                self.details = a.details(&self.env).await;
                let _ = a.child.kill().await;
            }
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        self.details.clone()
    }
}

/// The worker hello (magic, version 1.34, no affinity, no reserved space) and the word its
/// answer ends with (`STDERR_LAST`).
fn worker_hello() -> Vec<u8> {
    [0x6e69_7863_u64, 0x122, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}
const STDERR_LAST: [u8; 8] = 0x616c_7473_u64.to_le_bytes();

/// Sends the hello on `w` and reads `r` until the daemon's answer ends.
async fn hello_round_trip(
    w: &mut (impl AsyncWrite + Unpin),
    r: &mut (impl AsyncRead + Unpin),
) -> anyhow::Result<()> {
    w.write_all(&worker_hello()).await?;
    w.flush().await?;
    hello_answer(r).await
}

/// Reads `r` until the daemon's answer to the hello ends.
async fn hello_answer(r: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<()> {
    let mut got = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !got.ends_with(&STDERR_LAST) {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            bail!("the session ended after {} bytes", got.len());
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() > 4096 {
            bail!("no STDERR_LAST in the daemon's hello answer");
        }
    }
    Ok(())
}

/// `nixmux connect NAME --stdio` started as Nix starts it, then the worker hello and its
/// answer through it; the agent hands it a remote `nix-daemon --stdio` it started ahead
/// (the side waits for the refill between samples), so the remote Nix's start is not in the
/// figure.
pub struct AgentConnect {
    env: EnvRef,
    agent: Option<AgentProcess>,
}

impl AgentConnect {
    /// A side for builder 0, ssh-ng.
    pub fn new(env: EnvRef) -> Self {
        AgentConnect { env, agent: None }
    }
}

impl Side for AgentConnect {
    fn id(&self) -> String {
        "nixmux-connect".into()
    }
    fn label(&self) -> String {
        "nixmux connect (process start + agent + spare channel) + worker hello round trip".into()
    }
    fn role(&self) -> Role {
        Role::Subject
    }
    fn unavailable(&self) -> Option<String> {
        if !self.env.embedded() {
            return Some("needs the embedded rig".to_owned());
        }
        self.env
            .nixmux_program()
            .is_none()
            .then(|| "no nixmux program (set NIXMUX_BIN)".to_owned())
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            self.agent = Some(AgentProcess::start(&self.env, Protocol::Worker, 2).await?);
            Ok(())
        })
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            if let Some(a) = &self.agent {
                a.spares_ready(&self.env, 2).await;
            }
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let agent = self.agent.as_ref().ok_or_else(|| anyhow!("not set up"))?;
            let program = self
                .env
                .nixmux_program()
                .ok_or_else(|| anyhow!("no nixmux"))?;
            let t = Instant::now();
            let mut child = Command::new(program)
                .arg("connect")
                .arg("--socket")
                .arg(&agent.socket)
                .args([agent.name.as_str(), "--stdio"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("stdin"))?;
            let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("stdout"))?;
            hello_round_trip(&mut stdin, &mut stdout).await?;
            let took = t.elapsed();
            // Ending the session (EOF, the remote's exit) is not part of the figure.
            drop(stdin);
            let _ = child.wait().await;
            let mut s = Sample::one();
            s.timed = Some(took);
            Ok(s)
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(mut a) = self.agent.take() {
                let _ = a.child.kill().await;
            }
        })
    }
}

/// The yardstick for [`AgentConnect`]: the same hello on a channel of a warm in-process pool
/// whose remote `nix-daemon --stdio` was started and sent the hello beforehand (untimed), as
/// the agent's spares are; timed: reading the daemon's answer. The difference between the
/// two is what `nixmux connect` and the agent add.
pub struct RawHello {
    env: EnvRef,
    pool: Option<(Pool, nixmux::Builder)>,
    session: Option<RawSession>,
}

impl RawHello {
    /// A side for builder 0.
    pub fn new(env: EnvRef) -> Self {
        RawHello {
            env,
            pool: None,
            session: None,
        }
    }
}

impl Side for RawHello {
    fn id(&self) -> String {
        "in-process-channel".into()
    }
    fn label(&self) -> String {
        "worker hello answer from a remote nix-daemon started and greeted ahead, in process (no connect, no agent)"
            .into()
    }
    fn role(&self) -> Role {
        Role::Reference
    }
    fn setup(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            let pool = Pool::new();
            let b = pool.add(self.env.nixmux_config(0, Protocol::Worker)?);
            self.pool = Some((pool, b));
            Ok(())
        })
    }
    fn before(&mut self) -> BoxFuture<'_, SideResultT<()>> {
        Box::pin(async move {
            let (_, b) = self.pool.as_ref().ok_or_else(|| anyhow!("not set up"))?;
            let mut s = b.open_raw(Some(worker_hello().into())).await?;
            // Let the remote program start and answer, as a spare's has.
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.stdin.flush().await?;
            self.session = Some(s);
            Ok(())
        })
    }
    fn run(&mut self) -> BoxFuture<'_, SideResultT<Sample>> {
        Box::pin(async move {
            let s = self.session.as_mut().ok_or_else(|| anyhow!("no session"))?;
            let t = Instant::now();
            hello_answer(&mut s.stdout).await?;
            let mut sample = Sample::one();
            sample.timed = Some(t.elapsed());
            Ok(sample)
        })
    }
    fn after(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.session = None;
        })
    }
    fn teardown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.session = None;
            if let Some((p, _)) = self.pool.take() {
                p.shutdown().await;
            }
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}
