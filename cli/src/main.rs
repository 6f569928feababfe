//! `nixmux`: connectivity tester, remote builds and benchmarks over pooled SSH connections.
//! A thin layer over the `nixmux` library: argument parsing, rendering, exit codes.

mod agent_cmd;
mod bench;
mod build;
mod copy;
mod exit_code;
mod ping;
mod resolve;
mod rig_cmd;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nixmux",
    version,
    about = "Pooled, multiplexed SSH transport for Nix build farms"
)]
struct Cli {
    /// More output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check builders: resolve, TCP, SSH key exchange, host key, auth, exec, protocol
    /// handshake, round trip. Exit codes: see docs/exit-codes.md.
    Ping(PingArgs),
    /// Build local derivations on a builder: copy inputs, build with the log streamed here,
    /// copy outputs back.
    Build(BuildCmd),
    /// Copy the closure of store paths to a builder (`--to`) or from it (`--from`), as
    /// `nix copy` does, over a pooled connection; `--json` for programs.
    Copy(CopyCmd),
    /// Measure nixmux against OpenSSH and Nix on the same builders (default: local rig
    /// builders started for the run): table, --json, SVG charts.
    Bench(bench::BenchArgs),
    /// Local builders on loopback (real sshd + Nix, each with its own store).
    #[command(subcommand)]
    Rig(RigCommand),
    /// Give an unmodified Nix or Lix pooled connections: serve builders on a Unix socket
    /// (`agent`), print the machines file for Nix (`agent machines`), show its state
    /// (`agent status`). See docs/agent.md.
    Agent(agent_cmd::AgentCmd),
    /// The remote program of the agent's machines file: hands this process's stdin, stdout
    /// and stderr to the agent's session with builder NAME. Nix runs it as
    /// `nixmux connect NAME --stdio` (ssh-ng://) or `--serve --write` (ssh://).
    Connect(agent_cmd::ConnectCmd),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("direction").required(true).args(["to", "from"])))]
struct CopyCmd {
    /// Store paths (or symlinks to them, like `./result`).
    #[arg(value_name = "PATH", required = true)]
    paths: Vec<String>,
    /// Copy to this builder (store URL, or its name in --machines).
    #[arg(long, value_name = "STORE-URL")]
    to: Option<String>,
    /// Copy from this builder (store URL, or its name in --machines).
    #[arg(long, value_name = "STORE-URL")]
    from: Option<String>,
    /// A machines file naming the builder.
    #[arg(long, value_name = "FILE")]
    machines: Option<PathBuf>,
    /// SSH identity for builders that don't name one.
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    identity: Vec<PathBuf>,
    /// known_hosts file(s).
    #[arg(long = "known-hosts", value_name = "FILE")]
    known_hosts: Vec<PathBuf>,
    /// ssh_config file.
    #[arg(long = "ssh-config", value_name = "FILE")]
    ssh_config: Option<PathBuf>,
    /// The local store: `auto` (daemon socket, else `nix-daemon --stdio`), `stdio`, or a
    /// daemon socket path.
    #[arg(long, value_name = "auto|stdio|SOCKET")]
    local_store: Option<String>,
    /// Where the local store's paths are on this machine, for pushes to read NARs from
    /// directly (default: the store directory, checked against the daemon on first use);
    /// `none`: every NAR through the daemon.
    #[arg(long, value_name = "DIR|none")]
    local_store_files: Option<PathBuf>,
    /// Machine-readable report on stdout.
    #[arg(long)]
    json: bool,
}

/// Where builders come from, shared by every command that talks to builders.
#[derive(Args, Clone, Debug)]
pub(crate) struct BuilderArgs {
    /// Store URLs (`ssh://[user@]host[:port]`, `ssh-ng://...`, with Nix's query parameters).
    /// With none and no --machines, the builders the local Nix is configured with.
    #[arg(value_name = "STORE-URL")]
    pub(crate) urls: Vec<String>,
    /// A Nix machines file.
    #[arg(long, value_name = "FILE")]
    pub(crate) machines: Option<PathBuf>,
    /// SSH identity for URLs that don't name one (like `ssh -i`).
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    pub(crate) identity: Vec<PathBuf>,
    /// known_hosts file(s) to check host keys against (default: ~/.ssh/known_hosts and
    /// /etc/ssh/ssh_known_hosts, or what ssh_config says).
    #[arg(long = "known-hosts", value_name = "FILE")]
    pub(crate) known_hosts: Vec<PathBuf>,
    /// ssh_config file (default: ~/.ssh/config, then /etc/ssh/ssh_config).
    #[arg(long = "ssh-config", value_name = "FILE")]
    pub(crate) ssh_config: Option<PathBuf>,
    /// Seconds allowed for each connection stage.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub(crate) connect_timeout: f64,
}

#[derive(Args)]
struct PingArgs {
    #[command(flatten)]
    builders: BuilderArgs,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Protocol round trips to time on the established session.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Args)]
struct BuildCmd {
    /// `.drv` paths in the local store.
    #[arg(value_name = "DRV", required = true)]
    drvs: Vec<String>,
    /// Restrict the builds to this builder (its store URL as configured, or its host name);
    /// repeat for several. Without it, every configured builder that can take a derivation
    /// (system, features, free slots) may get it.
    #[arg(long)]
    builder: Vec<String>,
    /// Builds at once, over all builders (default: their max-jobs summed; each builder also
    /// keeps to its own).
    #[arg(short = 'j', long, value_name = "N")]
    jobs: Option<usize>,
    /// Go on building what does not depend on a failed build.
    #[arg(short = 'k', long)]
    keep_going: bool,
    /// Where to write each build's log (default: a new directory under $TMPDIR).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Builders: a machines file (default: the local Nix's `builders` setting).
    #[arg(long, value_name = "FILE")]
    machines: Option<PathBuf>,
    /// Store URL of the builder (instead of a machines file).
    #[arg(long = "url", value_name = "STORE-URL")]
    urls: Vec<String>,
    /// SSH identity for builders that don't name one.
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    identity: Vec<PathBuf>,
    /// known_hosts file(s).
    #[arg(long = "known-hosts", value_name = "FILE")]
    known_hosts: Vec<PathBuf>,
    /// ssh_config file.
    #[arg(long = "ssh-config", value_name = "FILE")]
    ssh_config: Option<PathBuf>,
    /// The local store: `auto` (daemon socket, else `nix-daemon --stdio`), `stdio`, or a
    /// daemon socket path.
    #[arg(long, value_name = "auto|stdio|SOCKET")]
    local_store: Option<String>,
    /// Where the local store's paths are on this machine, for pushes to read NARs from
    /// directly (default: the store directory, checked against the daemon on first use);
    /// `none`: every NAR through the daemon.
    #[arg(long, value_name = "DIR|none")]
    local_store_files: Option<PathBuf>,
    /// Kill the build after this many seconds without output.
    #[arg(long, value_name = "SECS")]
    max_silent_time: Option<u64>,
    /// Kill the build after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Kill the build after this many bytes of log.
    #[arg(long, value_name = "BYTES")]
    max_log_size: Option<u64>,
    /// Keep the build directory of a failed build on the builder.
    #[arg(long)]
    keep_failed: bool,
    /// `cores` for the build.
    #[arg(long)]
    cores: Option<u64>,
    /// Let the builder substitute inputs from its own caches (builders-use-substitutes).
    #[arg(long)]
    substitute: bool,
    /// Do not store each build's whole log in the local store (by default it is stored
    /// there, where `nix log DRV` finds it).
    #[arg(long)]
    no_local_log: bool,
}

#[derive(Subcommand)]
enum RigCommand {
    /// Start builders and leave them running.
    Up {
        /// Directory for keys, configs, stores and logs (must not exist or be empty).
        #[arg(long, default_value = "/tmp/nixmux-rig")]
        dir: PathBuf,
        /// Number of builders.
        #[arg(long, default_value_t = 2)]
        builders: usize,
        /// sshd MaxSessions of each builder.
        #[arg(long, default_value_t = 10)]
        max_sessions: u32,
        /// Run a nix-daemon on each builder, as a multi-user install does (ssh-ng sessions
        /// then reach it over a channel to its socket).
        #[arg(long)]
        nix_daemon: bool,
    },
    /// Stop the builders of a rig and remove its directory.
    Down {
        /// The rig directory.
        #[arg(default_value = "/tmp/nixmux-rig")]
        dir: PathBuf,
    },
}

fn init_tracing(verbose: u8) {
    // By default the command's own output says everything; library warnings would repeat it.
    let level = match verbose {
        0 => "error",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    if let Command::Connect(c) = cli.command {
        // Started by Nix for every remote session: nothing but the session on stdout, and
        // nothing that costs start-up time.
        std::process::exit(agent_cmd::connect(c));
    }
    init_tracing(cli.verbose);
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nixmux: {e:#}");
            exit_code::FAILURE
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Rig(RigCommand::Up {
            dir,
            builders,
            max_sessions,
            nix_daemon,
        }) => rig_cmd::up(dir, builders, max_sessions, nix_daemon).map(|()| exit_code::OK),
        Command::Rig(RigCommand::Down { dir }) => rig_cmd::down(dir).map(|()| exit_code::OK),
        Command::Ping(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(run_ping(args))
        }
        Command::Build(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(run_build(args))
        }
        Command::Copy(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(run_copy(args))
        }
        Command::Bench(args) => bench::main(args),
        Command::Agent(cmd) => agent_cmd::main(cmd),
        // Handled in `main`, before anything else starts.
        Command::Connect(c) => Ok(agent_cmd::connect(c)),
    }
}

async fn run_ping(args: PingArgs) -> anyhow::Result<i32> {
    let resolved = match resolve::builders(&args.builders) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nixmux: {e:#}");
            return Ok(exit_code::CONFIG);
        }
    };
    for skipped in &resolved.skipped {
        eprintln!("nixmux: skipping {skipped}");
    }
    if resolved.builders.is_empty() {
        eprintln!("nixmux: no SSH builders to ping ({})", resolved.source);
        return Ok(exit_code::NO_BUILDERS);
    }
    let reports = ping::run_all(resolved.builders, args.rounds).await;
    let mut out = std::io::stdout().lock();
    if args.json {
        ping::render_json(&reports, &mut out)?;
    } else {
        ping::render_table(&reports, &mut out)?;
    }
    Ok(ping::exit_code(&reports))
}

async fn run_copy(cmd: CopyCmd) -> anyhow::Result<i32> {
    let (direction, target) = match (&cmd.to, &cmd.from) {
        (Some(t), None) => (copy::Direction::To, t.clone()),
        (None, Some(f)) => (copy::Direction::From, f.clone()),
        // clap's group makes exactly one of them present.
        _ => {
            eprintln!("nixmux: give exactly one of --to and --from");
            return Ok(exit_code::CONFIG);
        }
    };
    // A builder named in the machines file, else a store URL.
    let (urls, wanted) = if cmd.machines.is_some() {
        (Vec::new(), Some(target.as_str()))
    } else {
        (vec![target.clone()], None)
    };
    let builder_args = BuilderArgs {
        urls,
        machines: cmd.machines.clone(),
        identity: cmd.identity.clone(),
        known_hosts: cmd.known_hosts.clone(),
        ssh_config: cmd.ssh_config.clone(),
        connect_timeout: 10.0,
    };
    let resolved = match resolve::builders(&builder_args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nixmux: {e:#}");
            return Ok(exit_code::CONFIG);
        }
    };
    let builder = match build::pick(resolved.builders, wanted) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("nixmux: {e:#}");
            return Ok(exit_code::NO_BUILDERS);
        }
    };
    let args = copy::CopyArgs {
        direction,
        paths: cmd.paths,
        local_store: cmd.local_store,
        local_store_files: cmd.local_store_files,
        json: cmd.json,
    };
    copy::run(args, builder).await
}

async fn run_build(cmd: BuildCmd) -> anyhow::Result<i32> {
    let builder_args = BuilderArgs {
        urls: cmd.urls.clone(),
        machines: cmd.machines.clone(),
        identity: cmd.identity.clone(),
        known_hosts: cmd.known_hosts.clone(),
        ssh_config: cmd.ssh_config.clone(),
        connect_timeout: 10.0,
    };
    let resolved = match resolve::builders(&builder_args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nixmux: {e:#}");
            return Ok(exit_code::CONFIG);
        }
    };
    let builders = match build::restrict(resolved.builders, &cmd.builder) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("nixmux: {e:#}");
            return Ok(exit_code::NO_BUILDERS);
        }
    };
    let secs = |s: Option<u64>| s.map(std::time::Duration::from_secs);
    let args = build::BuildArgs {
        drvs: cmd.drvs,
        local_store: cmd.local_store,
        local_store_files: cmd.local_store_files,
        options: nixmux::ops::BuildOptions {
            max_silent_time: secs(cmd.max_silent_time),
            timeout: secs(cmd.timeout),
            max_log_size: cmd.max_log_size,
            keep_failed: cmd.keep_failed,
            cores: cmd.cores,
            substitute: cmd.substitute,
            no_local_log: cmd.no_local_log,
        },
        jobs: cmd.jobs,
        keep_going: cmd.keep_going,
        log_dir: cmd.log_dir,
    };
    build::run(args, builders).await
}
