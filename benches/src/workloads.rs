//! The workloads of issue 6, their default sizes and repetitions, the goals they check, and
//! [`run`], which measures a list of them and returns a [`Report`].

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use nixmux::Protocol;
use nixmux::proto::store_path::{StoreDir, StorePath};

use crate::agent_sides::{AgentBuild, AgentConnect, RawHello};
use crate::env::{Env, Targets};
use crate::peers::synthetic_paths;
use crate::report::{
    CaseResult, Environment, Figure, Goal, Report, Role, SCHEMA_VERSION, Settings, Verdict,
    WanSettings, WorkloadResult,
};
use crate::runner::{Case, Event, Progress, case_samples, run_case};
use crate::sides::{
    Before, CmExec, CommandSide, Direction, EnvRef, NixBuild, NixmuxBuild, NixmuxCold, NixmuxExec,
    NixmuxFetch, NixmuxNewChannel, NixmuxPush, NixmuxStream, NixmuxWarm, SshHeld, SshSessions,
    SshStream, Via,
};

const MIB: u64 = 1 << 20;

/// Every workload, in the order run. `push-1gib` is not run unless named.
pub const ALL: &[&str] = &[
    "cold-session",
    "warm-op",
    "new-channel",
    "query",
    "throughput",
    "push-small",
    "push-large",
    "fetch-large",
    "build",
    "concurrency",
    "builders",
    "agent-connect",
    "push-1gib",
    "push-closure-1gib",
    "push-real",
    "graph",
];

/// What `nixmux bench` runs without `--workload`.
pub fn default_workloads(wan: bool) -> Vec<String> {
    ALL.iter()
        .filter(|w| {
            // On demand only: push-1gib (long), push-real (reads system files) and graph
            // (minutes of builds).
            let on_demand = ["push-1gib", "push-closure-1gib", "push-real", "graph"].contains(w);
            !(on_demand || wan && ["push-large", "fetch-large"].contains(w))
        })
        .map(|w| (*w).to_owned())
        .collect()
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Builders.
    pub targets: Targets,
    /// Workload names (see [`ALL`]).
    pub workloads: Vec<String>,
    /// Measured repetitions per side (`None`: each workload's default).
    pub repeat: Option<u32>,
    /// Small sizes, few repetitions.
    pub quick: bool,
    /// Emulated WAN link.
    pub wan: Option<WanSettings>,
}

/// Default number of embedded builders.
pub fn default_builders(quick: bool) -> usize {
    if quick { 2 } else { 4 }
}

struct Plan {
    quick: bool,
    repeat: Option<u32>,
    wan: bool,
    /// The emulated link's rate, Mbit/s, if limited.
    wan_mbit: Option<f64>,
}

impl Plan {
    /// (warm-up, repeat) from the defaults (full, quick, wan).
    fn reps(&self, full: (u32, u32), quick: (u32, u32), wan: (u32, u32)) -> (u32, u32) {
        let (w, r) = if self.quick {
            quick
        } else if self.wan {
            wan
        } else {
            full
        };
        (w, self.repeat.unwrap_or(r).max(1))
    }

    fn timeout(&self) -> Duration {
        if self.wan {
            Duration::from_secs(900)
        } else {
            Duration::from_secs(180)
        }
    }

    fn case(
        &self,
        label: &str,
        param: Option<f64>,
        sides: Vec<Box<dyn crate::runner::Side>>,
        reps: (u32, u32),
    ) -> Case {
        let reference = sides
            .iter()
            .find(|s| s.role() == Role::Subject)
            .map(|s| s.id());
        Case {
            label: label.to_owned(),
            param,
            reference,
            sides,
            warmup: reps.0,
            repeat: reps.1,
            timeout: self.timeout(),
        }
    }
}

struct Spec {
    title: String,
    description: String,
    primary: Figure,
    cases: Vec<Case>,
    notes: Vec<String>,
}

fn both() -> [Protocol; 2] {
    [Protocol::Worker, Protocol::Serve]
}

fn nix_store_ping(env: &EnvRef, builders: Vec<usize>) -> CommandSide {
    let urls: anyhow::Result<Vec<String>> = builders
        .iter()
        .map(|&i| env.nix_url(i, Protocol::Worker))
        .collect();
    let unavailable = urls.as_ref().err().map(|e| format!("{e:#}"));
    let e2 = env.clone();
    CommandSide {
        id: "nix-store-ping-ssh-ng".into(),
        label: "nix store ping --store ssh-ng://builder (Nix's own client)".into(),
        role: Role::Baseline,
        unavailable,
        make: Box::new(move || {
            let urls = urls.as_ref().map_err(|e| anyhow!("{e:#}"))?;
            builders
                .iter()
                .zip(urls)
                .map(|(&i, u)| {
                    e2.nix_command_for(Some(i), "nix", ["store", "ping", "--store", u.as_str()])
                })
                .collect()
        }),
        before: Before::Nothing,
        env: env.clone(),
        timeout: Duration::from_secs(120),
        bytes: 0,
    }
}

fn ssh_true(env: &EnvRef, builder: usize) -> CommandSide {
    let args = env.ssh_args(builder);
    let unavailable = args.as_ref().err().map(|e| format!("{e:#}"));
    CommandSide {
        id: "ssh-true".into(),
        label: "ssh builder true (OpenSSH: new process + connection + exec)".into(),
        role: Role::Reference,
        unavailable,
        make: Box::new(move || {
            let args = args.as_ref().map_err(|e| anyhow!("{e:#}"))?;
            let mut c = tokio::process::Command::new("ssh");
            c.args(["-x", "-a"]).args(args).args(["--", "true"]);
            Ok(vec![c])
        }),
        before: Before::Nothing,
        env: env.clone(),
        timeout: Duration::from_secs(60),
        bytes: 0,
    }
}

/// `nix copy` of `paths` between the client store and builder `builder`: `--to` it
/// (`Direction::Up`, into a builder store emptied before every sample) or `--from` it
/// (`Direction::Down`, into a client store that loses the paths before every sample); the
/// resets are untimed.
fn nix_copy(
    env: &EnvRef,
    builder: usize,
    protocol: Protocol,
    direction: Direction,
    paths: &BTreeSet<StorePath>,
    bytes: u64,
) -> CommandSide {
    let url = env.nix_url(builder, protocol);
    let mut unavailable = url.as_ref().err().map(|e| format!("{e:#}"));
    // Pushes: the daemon enforces require-sigs for untrusted input; these paths are unsigned.
    // Fetches: the local store requires signatures too; the build hook imports unchecked.
    let no_check_sigs = direction == Direction::Down || protocol == Protocol::Worker;
    let (flag, before, needs, label_tail) = match direction {
        Direction::Up => (
            "--to",
            Before::ResetStore(builder),
            "fresh builder stores",
            "Nix's own client",
        ),
        Direction::Down => (
            "--from",
            Before::DeleteLocal(paths.clone()),
            "a client store to empty",
            "Nix's own client; the build hook imports outputs unchecked too",
        ),
    };
    if !env.embedded() {
        unavailable = Some(format!("needs the embedded rig ({needs})"));
    }
    let mut args: Vec<OsString> = vec!["copy".into()];
    if no_check_sigs {
        args.push("--no-check-sigs".into());
    }
    let e2 = env.clone();
    let paths: Vec<OsString> = paths
        .iter()
        .map(|p| OsString::from(p.to_absolute(&StoreDir::default())))
        .collect();
    CommandSide {
        id: format!("nix-copy-{}", protocol.scheme()),
        label: format!(
            "nix copy{} {flag} {}://builder ({label_tail})",
            if no_check_sigs {
                " --no-check-sigs"
            } else {
                ""
            },
            protocol.scheme()
        ),
        role: Role::Baseline,
        unavailable,
        make: Box::new(move || {
            let url = url.as_ref().map_err(|e| anyhow!("{e:#}"))?;
            let mut a = args.clone();
            a.push(flag.into());
            a.push(url.into());
            a.extend(paths.iter().cloned());
            Ok(vec![e2.nix_command("nix", a)?])
        }),
        before,
        env: env.clone(),
        timeout: Duration::from_secs(900),
        bytes,
    }
}

async fn spec(
    name: &str,
    env: &EnvRef,
    plan: &Plan,
    progress: &dyn Progress,
) -> anyhow::Result<Spec> {
    let one: BTreeSet<StorePath> = synthetic_paths(1)?;
    Ok(match name {
        "cold-session" => {
            let reps = plan.reps((1, 10), (0, 2), (1, 5));
            let mut sides: Vec<Box<dyn crate::runner::Side>> = Vec::new();
            for p in both() {
                let mut s = NixmuxCold::new(env.clone(), vec![0], p, 1, 1);
                s.paths = one.clone();
                sides.push(Box::new(s));
            }
            sides.push(Box::new(ssh_true(env, 0)));
            for p in both() {
                sides.push(Box::new(SshSessions::new(
                    env.clone(),
                    vec![0],
                    p,
                    Via::Spawn,
                    1,
                    1,
                )));
            }
            sides.push(Box::new(nix_store_ping(env, vec![0])));
            Spec {
                title: "Cold session: nothing → a ready session that answered one QueryValidPaths".into(),
                description: "Timed: TCP connect, SSH key exchange, host key check, auth, exec, protocol handshake and one QueryValidPaths round trip. nixmux: a new Pool each sample (in-process russh). OpenSSH: a new `ssh` process per session with the remote command, driven over its pipes as Nix does. `ssh true` and `nix store ping` are whole processes. Closing is not timed.".into(),
                primary: Figure::Wall,
                cases: vec![plan.case("", None, sides, reps)],
                notes: Vec::new(),
            }
        }
        "warm-op" => {
            let reps = plan.reps((1, 10), (0, 2), (1, 5));
            let batch = if plan.quick {
                20
            } else if plan.wan {
                10
            } else {
                100
            };
            let mut sides: Vec<Box<dyn crate::runner::Side>> = Vec::new();
            for p in both() {
                sides.push(Box::new(NixmuxWarm::new(
                    env.clone(),
                    0,
                    p,
                    one.clone(),
                    batch,
                )));
            }
            for p in both() {
                sides.push(Box::new(SshHeld::new(
                    env.clone(),
                    0,
                    p,
                    one.clone(),
                    batch,
                )));
            }
            Spec {
                title: "Warm operation: acquire a pooled session + one QueryValidPaths(1 path)"
                    .into(),
                description: format!(
                    "Per operation: nixmux acquires an idle warm session from its pool, sends QueryValidPaths for one path, reads the reply and returns the session; OpenSSH: the same request over the pipes of an `ssh` process held open. {batch} operations per sample."
                ),
                primary: Figure::PerOp,
                cases: vec![plan.case("", None, sides, reps)],
                notes: Vec::new(),
            }
        }
        "new-channel" => {
            let reps = plan.reps((2, 20), (1, 3), (1, 10));
            let mut sides: Vec<Box<dyn crate::runner::Side>> = Vec::new();
            for p in both() {
                sides.push(Box::new(NixmuxNewChannel::new(env.clone(), 0, p)));
            }
            sides.push(Box::new(NixmuxNewChannel::to_daemon_socket(env.clone(), 0)));
            for p in both() {
                sides.push(Box::new(SshSessions::new(
                    env.clone(),
                    vec![0],
                    p,
                    Via::Master,
                    1,
                    0,
                )));
            }
            // Where the time goes: the same channel with a trivial command.
            sides.push(Box::new(NixmuxExec::new(env.clone(), 0, "true")));
            sides.push(Box::new(CmExec::new(env.clone(), 0, "true")));
            Spec {
                title: "New channel on a live connection: open + exec + protocol handshake".into(),
                description: "nixmux: a session channel on an established russh connection, exec of the remote command, handshake (worker: with SetOptions); and for ssh-ng a `direct-streamlocal` channel to the builder's running nix-daemon socket, then the handshake (the default route when the builder allows it). OpenSSH: a new `ssh` client process multiplexed over a running ControlMaster (`-o ControlMaster=auto -o ControlPath=...`), then the same handshake over its pipes. The master is our child in the foreground (`ssh -N -o ControlMaster=yes`), which is the ControlPersist setup without the daemonisation. Yardsticks: the same new channel running `true` to its exit (nixmux's transport; a ControlMaster client), which separates the transport's share from the remote Nix process's start-up.".into(),
                primary: Figure::Wall,
                cases: vec![plan.case("", None, sides, reps)],
                notes: Vec::new(),
            }
        }
        "query" => {
            let mut cases = Vec::new();
            for n in [1usize, 1000] {
                let paths = synthetic_paths(n)?;
                let batch = match (n, plan.quick, plan.wan) {
                    (_, true, _) => 5,
                    (_, _, true) => 5,
                    (1, ..) => 50,
                    _ => 20,
                };
                let reps = plan.reps((1, 5), (0, 2), (1, 3));
                let mut sides: Vec<Box<dyn crate::runner::Side>> = Vec::new();
                for p in both() {
                    sides.push(Box::new(NixmuxWarm::new(
                        env.clone(),
                        0,
                        p,
                        paths.clone(),
                        batch,
                    )));
                }
                for p in both() {
                    sides.push(Box::new(SshHeld::new(
                        env.clone(),
                        0,
                        p,
                        paths.clone(),
                        batch,
                    )));
                }
                cases.push(plan.case(
                    &format!("{n} path{}", if n == 1 { "" } else { "s" }),
                    Some(n as f64),
                    sides,
                    reps,
                ));
            }
            Spec {
                title: "Query latency: QueryValidPaths of 1 and 1000 paths on a warm session".into(),
                description: "One request and its reply on a warm session (nixmux: pooled; OpenSSH: an `ssh` process held open). The paths are syntactically valid and absent, so the builder looks each one up.".into(),
                primary: Figure::PerOp,
                cases,
                notes: Vec::new(),
            }
        }
        "throughput" => {
            let bytes = if plan.quick {
                16 * MIB
            } else if plan.wan {
                32 * MIB
            } else {
                256 * MIB
            };
            let reps = plan.reps((1, 3), (0, 1), (0, 2));
            let cipher = "aes128-gcm@openssh.com";
            let mut cases = Vec::new();
            for dir in [Direction::Down, Direction::Up] {
                let sides: Vec<Box<dyn crate::runner::Side>> = vec![
                    Box::new(NixmuxStream::new(
                        env.clone(),
                        0,
                        dir,
                        bytes,
                        "nixmux-transport",
                        Role::Subject,
                    )),
                    Box::new(SshStream::new(
                        env.clone(),
                        0,
                        dir,
                        bytes,
                        cipher,
                        "openssh",
                        Role::Baseline,
                    )),
                    Box::new(SshStream::new(
                        env.clone(),
                        0,
                        dir,
                        bytes,
                        "chacha20-poly1305@openssh.com",
                        "openssh-chacha20",
                        Role::Reference,
                    )),
                ];
                cases.push(plan.case(
                    match dir {
                        Direction::Down => "builder → client",
                        Direction::Up => "client → builder",
                    },
                    None,
                    sides,
                    reps,
                ));
            }
            Spec {
                title: "One-channel throughput, each direction".into(),
                description: format!(
                    "{} MiB through one exec channel (`head -c N /dev/zero` read locally; `cat > /dev/null` fed locally), timed from the first byte (down) or from the remote `ready` line to the remote exit (up), so connection set-up is excluded on both sides. nixmux's transport negotiates aes128-gcm@openssh.com; OpenSSH is forced to the same cipher with `-c`; chacha20-poly1305 (OpenSSH's default) is shown for reference.",
                    bytes / MIB
                ),
                primary: Figure::Throughput,
                cases,
                notes: Vec::new(),
            }
        }
        "push-small" => {
            progress.event(&Event::Note(
                "making 200 small paths in the client store".into(),
            ));
            let paths = if env.embedded() {
                env.small_paths().await?
            } else {
                Vec::new()
            };
            let roots: BTreeSet<StorePath> = paths.iter().cloned().collect();
            let reps = plan.reps((1, 5), (0, 1), (0, 3));
            let mut sides: Vec<Box<dyn crate::runner::Side>> = Vec::new();
            for p in both() {
                sides.push(Box::new(NixmuxPush::new(
                    env.clone(),
                    0,
                    p,
                    roots.clone(),
                    true,
                )));
            }
            sides.push(Box::new(NixmuxPush::new(
                env.clone(),
                0,
                Protocol::Worker,
                roots.clone(),
                false,
            )));
            for p in [Protocol::Serve, Protocol::Worker] {
                sides.push(Box::new(nix_copy(env, 0, p, Direction::Up, &roots, 0)));
            }
            Spec {
                title: "Closure push: 200 small paths (~1.7 MB) to an empty builder store".into(),
                description: "Before every sample (untimed) the builder's store is emptied (sshd stopped, /nix wiped, store initialised, sshd restarted), so every side pushes all 200 paths. nixmux: push_closure over a connection and session opened before the clock starts (a scheduler's steady state), and once from a cold start; the local store is the client's private store through `nix-daemon --stdio`. nix copy: a whole `nix copy` process in the client's private store (NIX_SSHOPTS=-F <ssh_config>).".into(),
                primary: Figure::Wall,
                cases: vec![plan.case("", None, sides, reps)],
                notes: if paths.is_empty() {
                    Vec::new()
                } else {
                    vec![format!(
                        "{} paths of 7.5-9.5 KB of random bytes (~1.7 MB)",
                        paths.len()
                    )]
                },
            }
        }
        "push-real" => {
            progress.event(&Event::Note(
                "adding real binaries (Nix's shared libraries, GCC's internals) to the client store"
                    .into(),
            ));
            let (paths, bytes) = if env.embedded() {
                env.real_closure().await?
            } else {
                (Vec::new(), 0)
            };
            let roots: BTreeSet<StorePath> = paths.iter().cloned().collect();
            let reps = plan.reps((0, 3), (0, 1), (0, 2));
            let mut sides: Vec<Box<dyn crate::runner::Side>> = Vec::new();
            for p in both() {
                sides.push(Box::new(NixmuxPush::new(
                    env.clone(),
                    0,
                    p,
                    roots.clone(),
                    true,
                )));
                sides.push(Box::new(
                    NixmuxPush::new(env.clone(), 0, p, roots.clone(), true).compressed(),
                ));
                sides.push(Box::new(
                    NixmuxPush::new(env.clone(), 0, p, roots.clone(), true).zstd(),
                ));
            }
            let floor = plan.wan_mbit.map(|m| {
                format!(
                    "link floor (bytes ÷ rate): {:.1} s",
                    bytes as f64 * 8.0 / (m * 1e6)
                )
            });
            Spec {
                title: format!(
                    "Closure push of real store content: {} paths, {:.0} MiB of NARs",
                    paths.len(),
                    bytes as f64 / MIB as f64
                ),
                description: "Nix's shared libraries (each a path, as `ldd nix-store` lists them) and GCC's internal directory (/usr/lib/gcc: cc1, lto1, plugins) added to the client store: binaries as a real closure holds them. Builder store emptied before every sample (untimed). nixmux push_closure on a warm connection, without compression, with SSH zlib (`compress=true`, Nix's `ssh -C`), and through the zstd bulk channel (`bulk-compression=zstd`: `zstd -d | nix-store --serve --write` on the builder).".into(),
                primary: Figure::Wall,
                cases: vec![plan.case("", None, sides, reps)],
                notes: floor.into_iter().collect(),
            }
        }
        "fetch-large" => {
            let size = if plan.quick { 16 * MIB } else { 200 * MIB };
            progress.event(&Event::Note(format!(
                "putting a {0} MiB source and a {0} MiB build output on builder 0",
                size / MIB
            )));
            let paths: BTreeSet<StorePath> = if env.embedded() {
                env.fetch_paths(0, size).await?.into_iter().collect()
            } else {
                BTreeSet::new()
            };
            let reps = plan.reps((1, 5), (0, 1), (0, 1));
            let mut sides: Vec<Box<dyn crate::runner::Side>> = Vec::new();
            for p in both() {
                sides.push(Box::new(NixmuxFetch::new(env.clone(), 0, p, paths.clone())));
            }
            // Two NARs, each a little larger than its file.
            let nar = 2 * (size + 200);
            for p in [Protocol::Serve, Protocol::Worker] {
                sides.push(Box::new(nix_copy(env, 0, p, Direction::Down, &paths, nar)));
            }
            sides.push(Box::new(NixmuxStream::new(
                env.clone(),
                0,
                Direction::Down,
                nar,
                "raw-nixmux",
                Role::Reference,
            )));
            sides.push(Box::new(SshStream::new(
                env.clone(),
                0,
                Direction::Down,
                nar,
                "aes128-gcm@openssh.com",
                "raw-openssh",
                Role::Reference,
            )));
            Spec {
                title: format!(
                    "Fetch: a {0} MiB source and a {0} MiB build output into an empty client store",
                    size / MIB
                ),
                description: "Two paths on the builder: one added with `nix-store --add` (content-addressed) and one built (input-addressed). Before every sample (untimed) the client store loses them. nixmux: fetch_outputs on a warm pooled connection into a local store whose sessions are new for the sample (a session's temporary roots on what it imported last until it ends). The local daemon checks each NAR's hash and size on import. Raw yardsticks: the same byte count out of `head -c N /dev/zero` through one channel of nixmux's transport and through `ssh -c aes128-gcm@openssh.com`.".into(),
                primary: Figure::Throughput,
                cases: vec![plan.case("", Some(nar as f64), sides, reps)],
                notes: Vec::new(),
            }
        }
        "push-large" | "push-1gib" => {
            let big = name == "push-1gib";
            let size = if plan.quick {
                16 * MIB
            } else if big {
                1024 * MIB
            } else {
                200 * MIB
            };
            progress.event(&Event::Note(format!(
                "making a {} MiB path in the client store",
                size / MIB
            )));
            let path = if env.embedded() {
                Some(env.large_path(size).await?)
            } else {
                None
            };
            let roots: BTreeSet<StorePath> = path.iter().cloned().collect();
            let reps = if big {
                plan.reps((0, 1), (0, 1), (0, 1))
            } else {
                plan.reps((1, 3), (0, 1), (0, 1))
            };
            let mut sides: Vec<Box<dyn crate::runner::Side>> = Vec::new();
            for p in both() {
                sides.push(Box::new(NixmuxPush::new(
                    env.clone(),
                    0,
                    p,
                    roots.clone(),
                    true,
                )));
            }
            // The same size built rather than added: input-addressed, no re-hash on import.
            if !big && env.embedded() {
                let output = env.large_output(size).await?;
                let roots: BTreeSet<StorePath> = [output].into_iter().collect();
                for p in both() {
                    sides.push(Box::new(
                        NixmuxPush::new(env.clone(), 0, p, roots.clone(), true)
                            .tagged("output", "a build output (input-addressed)"),
                    ));
                }
                // The same without the send-ahead limit, to show what it does.
                for p in both() {
                    sides.push(Box::new(
                        NixmuxPush::new(env.clone(), 0, p, roots.clone(), true)
                            .tagged(
                                "output-unlimited",
                                "a build output, writing as far ahead as sshd's window allows (no send-ahead limit)",
                            )
                            .unlimited_send_ahead(),
                    ));
                }
            }
            // The NAR is a little larger than the file; raw SSH moves the same byte count.
            let nar = size + 200;
            if !big {
                for p in [Protocol::Serve, Protocol::Worker] {
                    sides.push(Box::new(nix_copy(env, 0, p, Direction::Up, &roots, nar)));
                }
            }
            sides.push(Box::new(NixmuxStream::new(
                env.clone(),
                0,
                Direction::Up,
                nar,
                "raw-nixmux",
                Role::Reference,
            )));
            sides.push(Box::new(SshStream::new(
                env.clone(),
                0,
                Direction::Up,
                nar,
                "aes128-gcm@openssh.com",
                "raw-openssh",
                Role::Reference,
            )));
            Spec {
                title: if big {
                    format!("Closure push: one {} MiB path (peak RSS)", size / MIB)
                } else {
                    format!(
                        "Closure push: one {} MiB path to an empty builder store",
                        size / MIB
                    )
                },
                description: format!(
                    "One {} MiB path, builder store emptied before every sample (untimed): added with `nix-store --add` (content-addressed: given as a NAR, `ssh://` and `nix copy`, the builder's Nix 2.8 reads it back and hashes it again after the import; nixmux over `ssh-ng://` sends it by content, `AddToStore`, which Nix hashes once) and, in the `-output` rows, built by a derivation (input-addressed, as the build outputs a farm pushes mostly are). Raw yardsticks: the same byte count into `cat > /dev/null` through one channel of nixmux's transport and through `ssh -c aes128-gcm@openssh.com`. The push also hashes and writes the path on the builder, which raw transfers do not.",
                    size / MIB
                ),
                primary: Figure::Throughput,
                cases: vec![plan.case("", Some(size as f64), sides, reps)],
                notes: Vec::new(),
            }
        }
        "push-closure-1gib" => {
            // One path cannot be split over channels: a closure of many large paths can.
            let (count, size) = if plan.quick {
                (8, 4 * MIB)
            } else {
                (64, 16 * MIB)
            };
            let total = count as u64 * size;
            progress.event(&Event::Note(format!(
                "making {count} paths of {} MiB in the client store",
                size / MIB
            )));
            let paths = if env.embedded() {
                env.many_paths(count, size).await?
            } else {
                Vec::new()
            };
            let roots: BTreeSet<StorePath> = paths.into_iter().collect();
            let reps = plan.reps((0, 1), (0, 1), (0, 1));
            let mut sides: Vec<Box<dyn crate::runner::Side>> = Vec::new();
            for p in both() {
                sides.push(Box::new(NixmuxPush::new(
                    env.clone(),
                    0,
                    p,
                    roots.clone(),
                    true,
                )));
                sides.push(Box::new(
                    NixmuxPush::new(env.clone(), 0, p, roots.clone(), true).one_channel(),
                ));
            }
            Spec {
                title: format!(
                    "Closure push: {count} paths of {} MiB ({} MiB), parallel lanes against one channel",
                    size / MIB,
                    total / MIB
                ),
                description: format!(
                    "{count} independent paths of {} MiB of random data, builder store emptied before every sample (untimed). `nixmux-*`: the default settings (parallel lanes when one channel's SSH window cannot fill 1 Gbit/s at the measured round trip; details say how many); `nixmux-*-1ch`: the lease's channel alone. zstd off on every side.",
                    size / MIB
                ),
                primary: Figure::Throughput,
                cases: vec![plan.case("", Some(total as f64), sides, reps)],
                notes: Vec::new(),
            }
        }
        "build" => {
            let n = if plan.quick { 4 } else { 20 };
            let reps = plan.reps((0, 2), (0, 1), (0, 1));
            let mut sides: Vec<Box<dyn crate::runner::Side>> = Vec::new();
            for p in both() {
                sides.push(Box::new(NixmuxBuild::new(env.clone(), 0, p, n, 8)));
            }
            for p in both() {
                sides.push(Box::new(AgentBuild::new(env.clone(), p, n, plan.timeout())));
            }
            for p in both() {
                sides.push(Box::new(NixBuild::new(env.clone(), p, n, plan.timeout())));
            }
            Spec {
                title: "Remote build of N trivial derivations, end to end".into(),
                description: format!(
                    "{n} fresh derivations (`echo SALT i > $out`) instantiated in the client store before the clock starts. nixmux: `Builder::build` then `fetch_outputs` per derivation, at most 8 at once (the machines file's max-jobs), over a warm pool; the outputs are then checked valid in the client store (timed too, which only counts against nixmux). Nix through the agent: the same `nix-build` as stock, with the machines file of `nixmux agent machines` (the build hook runs `nixmux connect` instead of ssh; one `nixmux agent` with 2 spares, started before the samples). Nix: `nix-build --builders @machines -j0` of the same number of .drv files with one builder line (max-jobs 8), in the client's private store: a build-hook process and an ssh connection per build, as Nix does today."
                ),
                primary: Figure::Wall,
                cases: vec![plan.case(&format!("{n} derivations"), Some(n as f64), sides, reps)],
                notes: Vec::new(),
            }
        }
        "concurrency" => {
            let points: &[usize] = if plan.quick {
                &[1, 4]
            } else if plan.wan {
                &[1, 16, 64, 128]
            } else {
                &[1, 4, 16, 64, 128]
            };
            let ops = if plan.quick { 2 } else { 10 };
            let mut cases = Vec::new();
            for &c in points {
                let reps = plan.reps((0, 2), (0, 1), (0, 1));
                let mut nm = NixmuxCold::new(env.clone(), vec![0], Protocol::Worker, c, ops);
                nm.paths = one.clone();
                nm.live_connection = true;
                let sides: Vec<Box<dyn crate::runner::Side>> = vec![
                    Box::new(nm),
                    Box::new(SshSessions::new(
                        env.clone(),
                        vec![0],
                        Protocol::Worker,
                        Via::Spawn,
                        c,
                        ops,
                    )),
                    Box::new(SshSessions::new(
                        env.clone(),
                        vec![0],
                        Protocol::Worker,
                        Via::Master,
                        c,
                        ops,
                    )),
                ];
                cases.push(plan.case(&format!("{c} sessions"), Some(c as f64), sides, reps));
            }
            Spec {
                title: "Concurrency sweep: parallel ssh-ng sessions on one builder".into(),
                description: format!(
                    "C sessions started at once on one builder, each doing {ops} QueryValidPaths round trips; timed until all are done. nixmux: a Pool (max sessions C) whose SSH connection is already up (untimed), opening channels on it and more connections (at most 4 connecting at once, retried when sshd drops them at start-up) only when sshd refuses a channel (MaxSessions, 10 by default). OpenSSH ControlMaster: C clients of a running master (MaxSessions refuses the rest). OpenSSH as Nix runs it: C `ssh` processes, each a new connection (sshd's MaxStartups 10:30:100 throttles bursts). Failed sessions are counted, not timed."
                ),
                primary: Figure::Wall,
                cases,
                notes: Vec::new(),
            }
        }
        "agent-connect" => {
            let reps = plan.reps((5, 30), (2, 10), (2, 10));
            let sides: Vec<Box<dyn crate::runner::Side>> = vec![
                Box::new(AgentConnect::new(env.clone())),
                Box::new(RawHello::new(env.clone())),
            ];
            Spec {
                title: "What nixmux connect adds to a session".into(),
                description: "A session as Nix's build hook starts one through the agent: start `nixmux connect NAME --stdio`, which hands its stdio to the agent, which hands it a channel whose remote `nix-daemon --stdio` it started ahead (a spare; the side waits for the refill between samples); timed until the worker hello's answer has come back. A spare has sent the hello ahead (the agent learned it from the first session), so no round trip to the builder is in the figure. Yardstick: the same hello sent ahead on a channel of an in-process pool whose remote daemon was started beforehand; timed: reading its answer. The difference is the cost of the process start, the agent's checks and the splice.".into(),
                primary: Figure::Wall,
                cases: vec![plan.case("", None, sides, reps)],
                notes: Vec::new(),
            }
        }
        "builders" => {
            let max = env.builder_count();
            let mut points = vec![1usize];
            let mut k = 2;
            while k <= max {
                points.push(k);
                k *= 2;
            }
            if points.last() != Some(&max) {
                points.push(max);
            }
            let mut cases = Vec::new();
            for &n in &points {
                let reps = plan.reps((1, 3), (0, 1), (0, 2));
                let idx: Vec<usize> = (0..n).collect();
                let mut nm = NixmuxCold::new(env.clone(), idx.clone(), Protocol::Worker, 1, 1);
                nm.paths = one.clone();
                let sides: Vec<Box<dyn crate::runner::Side>> = vec![
                    Box::new(nm),
                    Box::new(SshSessions::new(
                        env.clone(),
                        idx.clone(),
                        Protocol::Worker,
                        Via::Spawn,
                        1,
                        1,
                    )),
                    Box::new(nix_store_ping(env, idx)),
                ];
                cases.push(plan.case(&format!("{n} builders"), Some(n as f64), sides, reps));
            }
            Spec {
                title: "Builder sweep: ready sessions on 1 → N builders at once".into(),
                description: "From nothing, one ssh-ng session per builder on N builders concurrently (a scheduler starting, or `nixmux ping` of a farm); timed until every builder answered one QueryValidPaths. nixmux: one Pool; OpenSSH: one `ssh` process per builder; Nix: one `nix store ping` per builder, concurrently.".into(),
                primary: Figure::Wall,
                cases,
                notes: Vec::new(),
            }
        }
        "graph" => {
            let shape = crate::graph::Shape::from_env(plan.quick)?;
            let farm = env.builder_count();
            let reps = plan.reps((0, 3), (0, 1), (0, 1));
            let mut case = plan.case(
                &format!("{} derivations", shape.builds()),
                Some(shape.builds() as f64),
                crate::graph::sides(env, farm, shape, Duration::from_secs(1800)),
                reps,
            );
            // Nix's side takes minutes at the default size.
            case.timeout = Duration::from_secs(1800);
            let ideal = |n: usize| shape.ideal(n).as_secs_f64();
            Spec {
                title: format!(
                    "Derivation graph across the farm: {} builds, {farm} builders × {} slots",
                    shape.builds(),
                    shape.max_jobs
                ),
                description: format!(
                    "A fresh graph per sample (salted), instantiated in the client store before the clock starts: {} leaves, {} middle derivations each needing an equal share of the leaves, one top needing every middle one. Each build sleeps {} ms (a build waiting on its builder; the builders share this machine's cores), reads its inputs and writes one line naming the builder that ran it. nixmux: a new Pool per sample (connecting is timed), the scheduling of `nixmux build --machines`: read every .drv, start a derivation when its inputs are built on the builder `Pool::select` picks (max-jobs {} each), `Builder::build` then `fetch_outputs`, at most builders × max-jobs at once; on 1 builder and on all {farm}. Nix: `nix-build -j0 --builders @machines --no-out-link top.drv` in the client's private store, the same ssh:// builders and max-jobs: its build hook starts a process, an `ssh` connection and a remote `nix-store --serve --write` per build. Every side's outputs are then checked valid in the client store (timed, the same for all). Shape: `{}=LEAVES,MIDS,MAX_JOBS,SLEEP_MS`.",
                    shape.leaves,
                    shape.mids,
                    shape.sleep_ms,
                    shape.max_jobs,
                    crate::graph::SHAPE_VAR,
                ),
                primary: Figure::Wall,
                cases: vec![case],
                notes: vec![format!(
                    "Shortest possible time (level by level, no cost per build): {:.2} s on 1 builder, {:.2} s on {farm}: at best {:.2}× faster with {farm}.",
                    ideal(1),
                    ideal(farm),
                    ideal(1) / ideal(farm).max(1e-9)
                )],
            }
        }
        other => {
            return Err(anyhow!(
                "unknown workload {other:?}; known: {}",
                ALL.join(", ")
            ));
        }
    })
}

/// The goals of issues 4, 5, 6, 9, 10, 11 and 12 that `result` speaks to.
pub fn goals(result: &WorkloadResult, wan: Option<WanSettings>) -> Vec<Goal> {
    let med = |case: &CaseResult, id: &str, f: Figure| {
        case.side(id).and_then(|s| s.figure(f)).map(|s| s.median)
    };
    let mut out = Vec::new();
    let mut goal = |text: &str,
                    issue: &str,
                    v: Option<f64>,
                    ok: &dyn Fn(f64) -> bool,
                    fmt: &dyn Fn(f64) -> String| {
        out.push(Goal {
            text: text.to_owned(),
            issue: issue.to_owned(),
            verdict: match v {
                Some(x) if ok(x) => Verdict::Met,
                Some(_) => Verdict::NotMet,
                None => Verdict::Unknown,
            },
            measured: v.map(fmt).unwrap_or_else(|| "no figure".into()),
        });
    };
    let secs = |x: f64| format!("{x:.4} s");
    let ms = |x: f64| format!("{:.3} ms", x * 1e3);
    let Some(case) = result.cases.first() else {
        return Vec::new();
    };
    let lan = wan.is_none();
    let wan_50_100 = wan.is_some_and(|w| (w.rtt_ms - 50.0).abs() < 1e-9 && w.mbit == Some(100.0));
    match result.name.as_str() {
        "cold-session" if lan => {
            for p in ["ssh-ng", "ssh"] {
                goal(
                    &format!("cold session ({p}) ≤ 0.1 s (`ssh true` here: 0.28 s)"),
                    "#6",
                    med(case, &format!("nixmux-{p}"), Figure::Wall),
                    &|x| x <= 0.1,
                    &secs,
                );
            }
        }
        "warm-op" if lan => {
            for p in ["ssh-ng", "ssh"] {
                goal(
                    &format!("warm acquire + QueryValidPaths ({p}) p50 < 1 ms"),
                    "#4, #6",
                    med(case, &format!("nixmux-{p}"), Figure::PerOp),
                    &|x| x < 0.001,
                    &ms,
                );
            }
        }
        "new-channel" if lan => {
            goal(
                "new channel to the daemon socket + handshake (ssh-ng) p50 ≤ 4 ms",
                "#11",
                med(case, "nixmux-ssh-ng-socket", Figure::Wall),
                &|x| x <= 0.004,
                &ms,
            );
            for p in ["ssh-ng", "ssh"] {
                goal(
                    &format!(
                        "new channel + exec + handshake ({p}) ≤ 4 ms (ControlMaster: 11.6 ms)"
                    ),
                    "#4, #6",
                    med(case, &format!("nixmux-{p}"), Figure::Wall),
                    &|x| x <= 0.004,
                    &ms,
                );
            }
        }
        "throughput" if lan => {
            for c in &result.cases {
                let ours = med(c, "nixmux-transport", Figure::Throughput);
                let theirs = med(c, "openssh", Figure::Throughput);
                goal(
                    &format!(
                        "one-channel throughput {} ≥ OpenSSH with the same cipher",
                        c.label
                    ),
                    "#4, #6",
                    ours.zip(theirs).map(|(a, b)| a / b),
                    &|x| x >= 1.0,
                    &|x| {
                        format!(
                            "{x:.2}× OpenSSH ({:.0} vs {:.0} MiB/s)",
                            ours.unwrap_or(0.0) / MIB as f64,
                            theirs.unwrap_or(0.0) / MIB as f64
                        )
                    },
                );
            }
        }
        "push-small" => {
            for p in ["ssh-ng", "ssh"] {
                let v = med(case, &format!("nixmux-{p}"), Figure::Wall);
                if lan {
                    goal(
                        &format!("200-path push ({p}) ≤ 0.15 s (`nix copy`: 0.45 s)"),
                        "#5, #6",
                        v,
                        &|x| x <= 0.15,
                        &secs,
                    );
                } else if wan_50_100 {
                    goal(
                        &format!(
                            "WAN 50 ms / 100 Mbit: 200-path push ({p}) ≤ 0.3 s (`nix copy`: 11.7 s ssh://, 0.97 s ssh-ng://)"
                        ),
                        "#6",
                        v,
                        &|x| x <= 0.3,
                        &secs,
                    );
                }
            }
        }
        "push-large" if lan => {
            for (p, kind) in [
                ("ssh-ng", ""),
                ("ssh", ""),
                ("ssh-ng", "-output"),
                ("ssh", "-output"),
            ] {
                let push = med(case, &format!("nixmux-{p}{kind}"), Figure::Throughput);
                let raw = med(case, "raw-nixmux", Figure::Throughput);
                let what = match (p, kind) {
                    // Nothing but `AddToStoreNar` exists on the serve protocol, and for a
                    // content-addressed path Nix 2.8 reads the path back and hashes it again
                    // after the import (docs/benchmarks.md, "plain sources by content").
                    ("ssh", "") => "`nix-store --add`, hashed twice by the builder",
                    (_, "") => "`nix-store --add`",
                    _ => "build output",
                };
                goal(
                    &format!(
                        "200 MiB push ({p}, {what}) ≥ 0.8× nixmux's raw channel in the same run"
                    ),
                    "#11",
                    push.zip(raw).map(|(a, b)| a / b),
                    &|x| x >= 0.8,
                    &|x| format!("{x:.2}× raw"),
                );
            }
            for p in ["ssh-ng", "ssh"] {
                let push = med(case, &format!("nixmux-{p}"), Figure::Throughput);
                let raw = [
                    med(case, "raw-openssh", Figure::Throughput),
                    med(case, "raw-nixmux", Figure::Throughput),
                ]
                .into_iter()
                .flatten()
                .reduce(f64::max);
                goal(
                    &format!(
                        "200 MiB push ({p}) ≥ 0.95× raw SSH (the faster of OpenSSH and nixmux's channel) in the same run"
                    ),
                    "#5",
                    push.zip(raw).map(|(a, b)| a / b),
                    &|x| x >= 0.95,
                    &|x| format!("{x:.2}× raw"),
                );
            }
        }
        "push-real" => {
            if let Some(mbit) = wan.and_then(|w| w.mbit) {
                let link = mbit * 1e6 / 8.0;
                for p in ["ssh-ng", "ssh"] {
                    for c in ["zlib", "zstd"] {
                        goal(
                            &format!(
                                "real store content at {mbit} Mbit/s ({p}), {c}: faster than the link floor (bytes ÷ rate)"
                            ),
                            "#11",
                            med(case, &format!("nixmux-{p}-{c}"), Figure::Throughput)
                                .map(|t| t / link),
                            &|x| x > 1.0,
                            &|x| format!("{x:.2}× the link rate"),
                        );
                    }
                }
            }
        }
        "push-closure-1gib" => {
            if let Some(mbit) = wan.and_then(|w| w.mbit) {
                let link = mbit * 1e6 / 8.0;
                for p in ["ssh-ng", "ssh"] {
                    goal(
                        &format!(
                            "1 GiB closure of 64 paths at {mbit} Mbit/s ({p}) ≥ 0.8× the link rate"
                        ),
                        "#11",
                        med(case, &format!("nixmux-{p}"), Figure::Throughput).map(|t| t / link),
                        &|x| x >= 0.8,
                        &|x| format!("{x:.2}× the link rate"),
                    );
                }
            }
        }
        "push-1gib" => {
            for p in ["ssh-ng", "ssh"] {
                goal(
                    &format!("peak RSS pushing 1 GiB ({p}) ≤ 64 MiB"),
                    "#5",
                    case.side(&format!("nixmux-{p}"))
                        .and_then(|s| s.peak_rss_bytes)
                        .map(|b| b as f64),
                    &|x| x <= 64.0 * MIB as f64,
                    &|x| format!("{:.1} MiB (whole bench process)", x / MIB as f64),
                );
            }
        }
        "concurrency" => {
            for c in &result.cases {
                let Some(side) = c.side("nixmux-ssh-ng") else {
                    continue;
                };
                let sessions = c.param.unwrap_or(0.0);
                let detail = |k: &str| side.details.get(k).and_then(|v| v.parse::<f64>().ok());
                let conns = detail("connections_opened_max");
                // The channel limit sshd showed (MaxSessions); 8 connections at most.
                let limit = detail("learned_limit").unwrap_or(10.0).max(1.0);
                let bound = ((sessions / limit).ceil() + 2.0).min(8.0 + 2.0);
                let ok =
                    side.failures == 0 && matches!(side.outcome, crate::report::Outcome::Measured);
                goal(
                    &format!(
                        "{}: no failure, connections ≤ ceil(C / limit) + 2 (limit {limit}: ≤ {bound})",
                        c.label
                    ),
                    "#9",
                    conns.map(|n| if ok { n } else { f64::INFINITY }),
                    &|n| n <= bound,
                    &|n| {
                        if n.is_finite() {
                            format!("{n} connections, {} failures", side.failures)
                        } else {
                            format!("{} failures", side.failures)
                        }
                    },
                );
            }
        }
        "agent-connect" => {
            let ours = med(case, "nixmux-connect", Figure::Wall);
            let floor = med(case, "in-process-channel", Figure::Wall);
            goal(
                "p50 cost `nixmux connect` adds per session (process start + agent splice) ≤ 5 ms",
                "#10",
                ours.zip(floor).map(|(a, b)| (a - b).max(0.0)),
                &|x| x <= 0.005,
                &|x| {
                    format!(
                        "{:.2} ms (connect {:.2} ms − in-process {:.2} ms)",
                        x * 1e3,
                        ours.unwrap_or(0.0) * 1e3,
                        floor.unwrap_or(0.0) * 1e3
                    )
                },
            );
        }
        "build" if case.param == Some(20.0) => {
            for p in ["ssh-ng", "ssh"] {
                let agent = med(case, &format!("nix-build-agent-{p}"), Figure::Wall);
                let stock = med(case, &format!("nix-build-{p}"), Figure::Wall);
                goal(
                    &format!(
                        "nix-build of 20 trivial derivations through the agent ({p}) ≥ 5× faster than stock `nix-build --builders`"
                    ),
                    "#10",
                    agent.zip(stock).map(|(a, s)| s / a),
                    &|x| x >= 5.0,
                    &|x| {
                        format!(
                            "{x:.1}× ({:.2} s vs {:.2} s)",
                            agent.unwrap_or(0.0),
                            stock.unwrap_or(0.0)
                        )
                    },
                );
            }
            if !lan {
                return out;
            }
            for p in ["ssh-ng", "ssh"] {
                goal(
                    &format!(
                        "20 trivial remote builds ({p}) ≤ 1 s (`nix-build` with ssh-ng builders: 6.2 s)"
                    ),
                    "#6",
                    med(case, &format!("nixmux-{p}"), Figure::Wall),
                    &|x| x <= 1.0,
                    &secs,
                );
            }
        }
        "graph" if lan => {
            let one = med(case, "nixmux-1", Figure::Wall);
            let four = med(case, "nixmux-4", Figure::Wall);
            let nix = med(case, "nix-build-4", Figure::Wall);
            let builds = case.param.unwrap_or(0.0);
            goal(
                "graph: nixmux on 4 builders ≥ 3× faster than on 1 (same graph)",
                "#12",
                one.zip(four).map(|(a, b)| a / b),
                &|x| x >= 3.0,
                &|x| {
                    format!(
                        "{x:.2}× ({:.2} s vs {:.2} s; {:.1} vs {:.1} builds/s)",
                        one.unwrap_or(0.0),
                        four.unwrap_or(0.0),
                        builds / one.unwrap_or(f64::INFINITY),
                        builds / four.unwrap_or(f64::INFINITY)
                    )
                },
            );
            goal(
                "graph: nixmux on 4 builders ≥ 10× faster than `nix-build -j0 --builders` on the same 4",
                "#12",
                nix.zip(four).map(|(a, b)| a / b),
                &|x| x >= 10.0,
                &|x| {
                    format!(
                        "{x:.2}× ({:.2} s vs {:.2} s; {:.1} vs {:.1} builds/s)",
                        nix.unwrap_or(0.0),
                        four.unwrap_or(0.0),
                        builds / nix.unwrap_or(f64::INFINITY),
                        builds / four.unwrap_or(f64::INFINITY)
                    )
                },
            );
        }
        _ => {}
    }
    out
}

fn cmd_version(program: &str, arg: &str) -> Option<String> {
    let out = std::process::Command::new(program).arg(arg).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().next().map(|l| l.trim().to_owned())
}

/// Runs `options.workloads` and returns the report. Starts (and removes) the rig itself for
/// embedded targets.
///
/// # Errors
/// The environment cannot be set up (rig, relays) or a workload name is unknown. Failures of
/// single sides are recorded in the report instead.
pub async fn run(options: Options, progress: &dyn Progress) -> anyhow::Result<Report> {
    for w in &options.workloads {
        if !ALL.contains(&w.as_str()) {
            return Err(anyhow!("unknown workload {w:?}; known: {}", ALL.join(", ")));
        }
    }
    let t0 = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let load_before = crate::stats::load_average();
    progress.event(&Event::Note(match &options.targets {
        Targets::Embedded {
            builders,
            max_sessions: None,
        } => format!("starting {builders} local rig builders"),
        Targets::Embedded {
            builders,
            max_sessions: Some(m),
        } => format!("starting {builders} local rig builders (sshd MaxSessions {m})"),
        Targets::External(b) => format!("{} builders from the command line", b.len()),
    }));
    let env = Arc::new(Env::start(options.targets.clone(), options.wan).await?);
    let plan = Plan {
        quick: options.quick,
        repeat: options.repeat,
        wan: options.wan.is_some(),
        wan_mbit: options.wan.and_then(|w| w.mbit),
    };
    let mut workloads = Vec::new();
    for name in &options.workloads {
        let spec = match spec(name, &env, &plan, progress).await {
            Ok(s) => s,
            Err(e) => {
                progress.event(&Event::Note(format!("{name}: cannot prepare: {e:#}")));
                workloads.push(WorkloadResult {
                    name: name.clone(),
                    title: name.clone(),
                    description: String::new(),
                    primary: Figure::Wall,
                    cases: Vec::new(),
                    goals: Vec::new(),
                    notes: vec![format!("could not be prepared: {e:#}")],
                });
                continue;
            }
        };
        progress.event(&Event::Workload {
            name: name.clone(),
            title: spec.title.clone(),
            total_samples: spec.cases.iter().map(case_samples).sum(),
        });
        let mut cases = Vec::new();
        for case in spec.cases {
            cases.push(run_case(case, spec.primary, progress).await);
        }
        let mut result = WorkloadResult {
            name: name.clone(),
            title: spec.title.clone(),
            description: spec.description,
            primary: spec.primary,
            cases,
            goals: Vec::new(),
            notes: spec.notes,
        };
        result.goals = goals(&result, options.wan);
        progress.event(&Event::WorkloadDone { name: name.clone() });
        workloads.push(result);
    }
    let targets = crate::report::Targets {
        embedded: env.embedded(),
        builders: env.builder_names(),
    };
    progress.event(&Event::Note("stopping builders".into()));
    match Arc::try_unwrap(env) {
        Ok(env) => env.shutdown().await,
        Err(_) => tracing::warn!("bench environment still referenced at the end"),
    }
    let environment = Environment {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_before,
        load_after: crate::stats::load_average(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        nix_version: cmd_version("nix", "--version"),
        openssh_version: cmd_version("ssh", "-V"),
        targets,
    };
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        nixmux_version: env!("CARGO_PKG_VERSION").to_owned(),
        started_unix,
        duration_s: t0.elapsed().as_secs_f64(),
        environment,
        settings: Settings {
            repeat: options.repeat,
            quick: options.quick,
            wan: options.wan,
            workloads: options.workloads,
        },
        workloads,
    })
}
