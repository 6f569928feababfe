//! `nixmux agent` (run, `machines`, `status`) and `nixmux connect`: the commands around the
//! nixmux-agent crate.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use nixmux::setup::Overrides;
use nixmux_agent::client::{self, DEFAULT_SOCKET, EXIT_AGENT_FAILED};
use nixmux_agent::status::StatusReport;
use nixmux_agent::wire::SessionProtocol;
use nixmux_agent::{AgentConfig, MachinesSource};

use crate::exit_code;

/// `nixmux agent`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct AgentCmd {
    #[command(subcommand)]
    sub: Option<AgentSub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum AgentSub {
    /// Print a machines file that sends Nix's remote builds through the agent (use it as
    /// `builders = @FILE` in nix.conf).
    Machines(MachinesArgs),
    /// The running agent's builders, health, sessions and counters.
    Status(StatusArgs),
}

/// The socket option shared by every agent command.
#[derive(Args, Clone)]
struct SocketArg {
    /// The agent's Unix socket.
    #[arg(long, value_name = "PATH", env = "NIXMUX_AGENT_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The builders (a Nix machines file). Default: the local Nix's `builders` setting.
    /// Reloaded on SIGHUP and when it changes.
    #[arg(long, value_name = "FILE")]
    machines: Option<PathBuf>,
    /// Also allow this user (name or uid) to use the agent; the agent's own user and root
    /// always may. Repeatable.
    #[arg(long = "allow", value_name = "USER")]
    allow: Vec<String>,
    /// Permission bits of the socket, octal.
    #[arg(long, value_name = "MODE", default_value = "600")]
    socket_mode: String,
    /// Remote programs kept started and waiting per builder (0: none).
    #[arg(long, value_name = "N", default_value_t = 2)]
    spares: usize,
    /// Seconds a spare may wait unused before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    spare_idle: u64,
    /// Seconds running sessions get to finish after SIGTERM.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    drain_timeout: u64,
    /// Serve Prometheus metrics on `[ADDR:]PORT` (a bare port binds 127.0.0.1).
    #[arg(long, value_name = "[ADDR:]PORT")]
    metrics: Option<String>,
    /// SSH identity for builders that name none (like `ssh -i`). Repeatable.
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    identity: Vec<PathBuf>,
    /// known_hosts file(s) to check host keys against.
    #[arg(long = "known-hosts", value_name = "FILE")]
    known_hosts: Vec<PathBuf>,
    /// ssh_config file.
    #[arg(long = "ssh-config", value_name = "FILE")]
    ssh_config: Option<PathBuf>,
}

#[derive(Args)]
struct MachinesArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The builders (default: the local Nix's `builders` setting).
    #[arg(long, value_name = "FILE")]
    machines: Option<PathBuf>,
    /// The nixmux program Nix should run (default: this one).
    #[arg(long, value_name = "PATH")]
    program: Option<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Machine-readable output (the schema: nixmux-agent's `status` module).
    #[arg(long)]
    json: bool,
}

/// `nixmux connect`: the remote program Nix runs for a builder of the agent's machines file.
#[derive(Args)]
pub(crate) struct ConnectCmd {
    #[command(flatten)]
    socket: SocketArg,
    /// The builder, as named in the agent's machines file.
    name: String,
    /// Speak the worker protocol (what Nix passes for ssh-ng://).
    #[arg(long)]
    stdio: bool,
    /// Speak the serve protocol (what Nix passes for ssh://, with --write).
    #[arg(long)]
    serve: bool,
    /// Allow writes (always passed with --serve by Nix).
    #[arg(long)]
    write: bool,
    /// A remote store (Nix appends it when the line has `remote-store`): set it on the
    /// agent's builder line instead.
    #[arg(long, value_name = "URI")]
    store: Option<String>,
}

fn source(machines: Option<PathBuf>) -> MachinesSource {
    machines.map_or(MachinesSource::LocalNix, MachinesSource::File)
}

fn parse_uid(user: &str) -> anyhow::Result<u32> {
    if let Ok(uid) = user.parse() {
        return Ok(uid);
    }
    nixmux::config::local_env::user_id(user)
        .with_context(|| format!("--allow {user}: no such user in /etc/passwd"))
}

fn parse_metrics(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .with_context(|| format!("--metrics {s}: expected PORT or ADDR:PORT"))
}

/// Runs `nixmux agent ...`.
pub(crate) fn main(cmd: AgentCmd) -> anyhow::Result<i32> {
    match cmd.sub {
        Some(AgentSub::Machines(a)) => machines(a),
        Some(AgentSub::Status(a)) => status(a),
        None => run(cmd.run),
    }
}

fn run(a: RunArgs) -> anyhow::Result<i32> {
    let mut config = AgentConfig::new(a.socket.socket, source(a.machines));
    for user in &a.allow {
        config.allowed_uids.push(parse_uid(user)?);
    }
    config.socket_mode = u32::from_str_radix(&a.socket_mode, 8)
        .with_context(|| format!("--socket-mode {}: expected octal bits", a.socket_mode))?;
    config.spares = a.spares;
    config.spare_idle = Duration::from_secs(a.spare_idle);
    config.drain_timeout = Duration::from_secs(a.drain_timeout);
    config.metrics = a.metrics.as_deref().map(parse_metrics).transpose()?;
    config.ssh_config = a.ssh_config;
    config.overrides = Overrides {
        identities: a.identity,
        known_hosts: a.known_hosts,
        ..Overrides::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    match rt.block_on(nixmux_agent::run(config)) {
        Ok(()) => Ok(exit_code::OK),
        Err(e @ nixmux_agent::AgentError::Machines(_)) => {
            eprintln!("nixmux agent: {e}");
            Ok(exit_code::CONFIG)
        }
        Err(e) => {
            eprintln!("nixmux agent: {e}");
            Ok(exit_code::FAILURE)
        }
    }
}

fn machines(a: MachinesArgs) -> anyhow::Result<i32> {
    let src = source(a.machines);
    let (specs, skipped) = match nixmux_agent::builders::read_specs(&src) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nixmux agent machines: {e}");
            return Ok(exit_code::CONFIG);
        }
    };
    for s in &skipped {
        eprintln!("nixmux agent machines: skipping {s}");
    }
    if specs.is_empty() {
        eprintln!("nixmux agent machines: no SSH builders in {src}");
        return Ok(exit_code::NO_BUILDERS);
    }
    let program = match a.program {
        Some(p) => p,
        None => std::env::current_exe().context("finding this program's path")?,
    };
    let program = program.to_string_lossy().into_owned();
    let socket = a.socket.socket.to_string_lossy().into_owned();
    let socket = (socket != DEFAULT_SOCKET).then_some(socket);
    match nixmux_agent::machines::render(&specs, &program, socket.as_deref()) {
        Ok(text) => {
            std::io::stdout().write_all(text.as_bytes())?;
            Ok(exit_code::OK)
        }
        Err(e) => {
            eprintln!("nixmux agent machines: {e}");
            Ok(exit_code::CONFIG)
        }
    }
}

fn status(a: StatusArgs) -> anyhow::Result<i32> {
    let report = match client::status(&a.socket.socket) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nixmux agent status: {e}");
            return Ok(exit_code::FAILURE);
        }
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        render(&report, &mut out)?;
    }
    Ok(exit_code::OK)
}

fn render(r: &StatusReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "nixmux agent {} (pid {}), socket {}, builders from {}",
        r.version, r.pid, r.socket, r.machines
    )?;
    writeln!(
        out,
        "up {:.0} s; sessions: {} running, {} served; {} clients refused; {} reloads{}",
        r.uptime_secs,
        r.sessions_active,
        r.sessions_total,
        r.clients_refused,
        r.reloads,
        r.last_reload_error
            .as_deref()
            .map(|e| format!(" (last failed: {e})"))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "\n{:<28} {:<6} {:<9} {:>5} {:>8} {:>7} {:>8} {:>6} {:>11}",
        "builder",
        "proto",
        "health",
        "conns",
        "channels",
        "running",
        "sessions",
        "spares",
        "spare hits"
    )?;
    for b in &r.builders {
        writeln!(
            out,
            "{:<28} {:<6} {:<9} {:>5} {:>8} {:>7} {:>8} {:>6} {:>11}",
            b.name,
            b.protocol,
            b.health,
            b.connections,
            b.channels_open,
            b.sessions_active,
            b.sessions_total,
            b.spares_ready,
            format!("{}/{}", b.spare_hits, b.spare_hits + b.spare_misses),
        )?;
        if let Some(e) = &b.last_error {
            writeln!(out, "  last error: {e}")?;
        }
    }
    Ok(())
}

/// Runs `nixmux connect`: returns the exit code (the remote program's, or 255).
pub(crate) fn connect(c: ConnectCmd) -> i32 {
    let protocol = match (c.stdio, c.serve) {
        (true, false) => SessionProtocol::Worker,
        (false, true) => SessionProtocol::Serve,
        _ => {
            eprintln!("nixmux connect: give --stdio (ssh-ng://) or --serve --write (ssh://)");
            return exit_code::CONFIG;
        }
    };
    if let Some(store) = &c.store {
        eprintln!(
            "nixmux connect: --store {store}: put remote-store on the builder's line in the agent's machines file instead"
        );
        return exit_code::CONFIG;
    }
    match client::run_session(&c.socket.socket, &c.name, protocol) {
        Ok(code) => code,
        Err(e) => {
            client::report(&format!("nixmux connect: {e}"));
            EXIT_AGENT_FAILED
        }
    }
}
