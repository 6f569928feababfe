//! Protocol sessions over OpenSSH processes, the way Nix runs them (one `ssh` per session,
//! or clients of a ControlMaster), driven by nixmux's session crate over the child's pipes.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use nixmux::Protocol;
use nixmux::proto::store_path::{StoreDir, StorePath};
use nixmux::session::process::{self, ChildGuard};
use nixmux::session::{
    BoxReader, BoxWriter, ServeSession, SessionConfig, WorkerConfig, WorkerSession,
};

use crate::env::Env;

/// The remote command of `protocol`, as Nix runs it.
pub fn remote_command(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Serve => "nix-store --serve --write",
        Protocol::Worker => "nix-daemon --stdio",
    }
}

/// A protocol conversation of either kind.
#[derive(Debug)]
pub enum Conv {
    /// `nix-store --serve --write`.
    Serve(ServeSession),
    /// `nix-daemon --stdio`.
    Worker(WorkerSession),
}

impl Conv {
    /// Performs the handshake over a fresh pipe. Worker sessions send `SetOptions` as nixmux
    /// does (one more message, no extra round trip).
    ///
    /// # Errors
    /// The handshake fails.
    pub async fn handshake(
        protocol: Protocol,
        reader: BoxReader,
        writer: BoxWriter,
        config: SessionConfig,
    ) -> anyhow::Result<Conv> {
        let dir = StoreDir::default();
        Ok(match protocol {
            Protocol::Serve => Conv::Serve(
                ServeSession::handshake(reader, writer, dir, config)
                    .await
                    .context("serve handshake")?,
            ),
            Protocol::Worker => Conv::Worker(
                WorkerSession::handshake(
                    reader,
                    writer,
                    dir,
                    config,
                    &WorkerConfig::default(),
                    &mut |_| {},
                )
                .await
                .context("worker handshake")?,
            ),
        })
    }

    /// One `QueryValidPaths` round trip; returns how many are valid.
    ///
    /// # Errors
    /// The session fails.
    pub async fn query_valid(&mut self, paths: &BTreeSet<StorePath>) -> anyhow::Result<usize> {
        Ok(match self {
            Conv::Serve(s) => s.query_valid_paths(paths, false, false).await?.len(),
            Conv::Worker(w) => w.query_valid_paths(paths, false, &mut |_| {}).await?.len(),
        })
    }

    /// Ends the session (EOF; the remote exits).
    pub async fn close(self) {
        match self {
            Conv::Serve(s) => s.close().await,
            Conv::Worker(w) => w.close().await,
        }
    }
}

/// A session over a spawned `ssh` process.
pub struct ProcSession {
    /// The conversation.
    pub conv: Conv,
    guard: ChildGuard,
    stderr: tokio::sync::mpsc::Receiver<Vec<u8>>,
}

impl std::fmt::Debug for ProcSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcSession").finish_non_exhaustive()
    }
}

impl ProcSession {
    /// Spawns `ssh <args> -- <remote command>` and performs the handshake.
    ///
    /// # Errors
    /// Spawn or handshake failure (with ssh's stderr).
    pub async fn start(ssh_args: &[OsString], protocol: Protocol) -> anyhow::Result<ProcSession> {
        let mut cmd = tokio::process::Command::new("ssh");
        // As Nix's SSHMaster does: no X11 or agent forwarding.
        cmd.args(["-x", "-a"])
            .args(ssh_args)
            .arg("--")
            .arg(remote_command(protocol));
        let pipes = process::spawn(cmd).context("spawning ssh")?;
        let config = SessionConfig {
            idle_timeout: Duration::from_secs(60),
            diagnostics: Some(Arc::new(pipes.stderr.clone())),
            ..SessionConfig::default()
        };
        let tail = pipes.stderr.clone();
        let conv = match Conv::handshake(protocol, pipes.reader, pipes.writer, config).await {
            Ok(c) => c,
            Err(e) => {
                let t = tail.text();
                bail!("{e:#}: {}", t.trim());
            }
        };
        Ok(ProcSession {
            conv,
            guard: pipes.guard,
            stderr: pipes.stderr_chunks,
        })
    }

    /// Closes the session and waits (bounded) for the ssh process to end, so that its
    /// session slot on the server (MaxSessions) is free again.
    pub async fn close(self) {
        let ProcSession {
            conv,
            guard,
            mut stderr,
        } = self;
        conv.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while stderr.recv().await.is_some() {}
        })
        .await;
        drop(guard);
    }
}

/// An OpenSSH ControlMaster for one builder: the master runs in the foreground as our child
/// (killed on drop); clients connect with `-o ControlMaster=auto -o ControlPath=...`.
#[derive(Debug)]
pub struct ControlMaster {
    child: tokio::process::Child,
    path: PathBuf,
    base: Vec<OsString>,
}

impl ControlMaster {
    /// Starts the master and waits (at most 15 s) for its socket.
    ///
    /// # Errors
    /// ssh cannot start or the socket does not appear.
    pub async fn start(env: &Env, builder: usize) -> anyhow::Result<ControlMaster> {
        let base = env.ssh_args(builder)?;
        let path = env
            .scratch()
            .join(format!("cm-{builder}-{}.sock", env.next_seq()));
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(["-x", "-a", "-N", "-o", "ControlMaster=yes", "-o"])
            .arg(format!("ControlPath={}", path.display()))
            .args(["-o", "ControlPersist=no"])
            .args(&base)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning the ssh ControlMaster")?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !path.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                bail!("the ControlMaster exited ({status}): {}", err.trim());
            }
            if Instant::now() > deadline {
                bail!("the ControlMaster socket did not appear within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(ControlMaster { child, path, base })
    }

    /// `ssh` arguments of a client of this master.
    pub fn client_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "-o".into(),
            "ControlMaster=auto".into(),
            "-o".into(),
            format!("ControlPath={}", self.path.display()).into(),
            "-o".into(),
            "ControlPersist=60".into(),
        ];
        v.extend(self.base.iter().cloned());
        v
    }

    /// Whether the master still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the master.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs `ssh <args> -- <command>` to completion (bounded), failing on a non-zero exit.
///
/// # Errors
/// Spawn failure, timeout, non-zero exit.
pub async fn ssh_run(args: &[OsString], command: &str, timeout: Duration) -> anyhow::Result<()> {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(["-x", "-a"]).args(args).arg("--").arg(command);
    crate::env::run_output(&mut cmd, timeout).await.map(drop)
}

/// `n` syntactically valid store paths that no store holds (for query latency).
pub fn synthetic_paths(n: usize) -> anyhow::Result<BTreeSet<StorePath>> {
    let mut rng = crate::env::Rng::seeded();
    (0..n)
        .map(|i| {
            let mut hash = [0u8; 20];
            hash.copy_from_slice(&rng.bytes(20));
            StorePath::new(hash, format!("bench-query-{i}")).map_err(|e| anyhow!("{e}"))
        })
        .collect()
}
