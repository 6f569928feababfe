//! `nixmux agent` and `nixmux connect` through the real binary, with an unmodified Nix 2.8
//! (`nix-build`, and a `nix-daemon` whose build hook goes through the agent) and real
//! OpenSSH builders from the rig.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nixmux_rig::{PrivateStore, Rig, RigConfig};

const NIXMUX: &str = env!("CARGO_BIN_EXE_nixmux");
const GRAPH: &str = include_str!("../../mux/tests/data/graph.nix");
/// N trivial derivations, salted so that every run builds afresh.
const TRIVIAL: &str = r#"{ salt, n ? 20 }:
builtins.genList (i: derivation { name = "trivial-${toString i}"; system = builtins.currentSystem;
  builder = "/bin/sh"; args = [ "-c" "echo ${salt} ${toString i} > $out" ]; }) n
"#;
/// One derivation that runs for a while (`secs`), leaving a marker process on the builder.
const SLOW: &str = r#"{ salt, secs }:
derivation { name = "slow-${salt}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "PATH=/usr/bin:/bin; sleep ${secs}; echo ${salt} > $out" ]; }
"#;

fn rig(builders: usize) -> Rig {
    nixmux_rig::ensure_peers_installed().expect("peers");
    Rig::start(RigConfig::with_builders(builders)).expect("rig")
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `nixmux agent`, killed when dropped.
struct Agent {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(dir: &Path, machines: &Path, extra: &[&str]) -> Agent {
        let socket = dir.join("agent.sock");
        let log = dir.join(format!("agent-{}.log", std::process::id()));
        let child = Command::new(NIXMUX)
            .env("NIXMUX_NO_STATE", "1")
            .args(["agent", "-vv", "--machines"])
            .arg(machines)
            .arg("--socket")
            .arg(&socket)
            .args(["--spare-idle", "600"])
            .args(extra)
            .env_remove("SSH_AUTH_SOCK")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start the agent");
        let agent = Agent { child, socket, log };
        wait_for("the agent to answer", Duration::from_secs(20), || {
            agent.status().is_some()
        });
        agent
    }

    fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(NIXMUX)
            .env("NIXMUX_NO_STATE", "1")
            .args(["agent", "status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())?
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The machines file for Nix, from the agent's machines file `machines`; written as
    /// `machines-for-nix` beside it.
    fn machines_for_nix(&self, machines: &Path) -> PathBuf {
        let o = Command::new(NIXMUX)
            .env("NIXMUX_NO_STATE", "1")
            .args(["agent", "machines", "--machines"])
            .arg(machines)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("agent machines");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = machines.with_file_name("machines-for-nix");
        std::fs::write(&out, &o.stdout).expect("write");
        out
    }

    fn sessions_served(&self) -> u64 {
        self.status()
            .and_then(|s| s["sessions_total"].as_u64())
            .unwrap_or(0)
    }
}

/// Starts `nix-build` of [`SLOW`] (salted with `salt`, sleeping `secs`) through the machines
/// file `for_nix`, with stdout and stderr piped, and waits until it runs on builder `on`.
fn start_slow_build(
    rig: &Rig,
    on: usize,
    for_nix: &Path,
    fake: &Path,
    slow: &Path,
    salt: &str,
    secs: u32,
) -> Child {
    let secs = secs.to_string();
    let build = nix_build(
        rig.client_store(),
        for_nix,
        fake,
        slow,
        &["--argstr", "salt", salt, "--argstr", "secs", &secs],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("nix-build");
    let marker = format!("sleep {secs}");
    wait_for(
        &format!("the build on builder {on}"),
        Duration::from_secs(60),
        || {
            rig.builder(on)
                .processes()
                .iter()
                .any(|p| p.cmdline.contains(&marker))
        },
    );
    build
}

/// The rig's machines lines of one scheme (`ssh://` or `ssh-ng://`), for builders `which`.
fn machines_of(rig: &Rig, scheme: &str, which: &[usize], out: &Path) {
    let all = std::fs::read_to_string(rig.machines()).expect("machines");
    let ports: Vec<String> = which
        .iter()
        .map(|&i| format!(":{} ", rig.builder(i).port()))
        .collect();
    let lines: Vec<&str> = all
        .lines()
        .filter(|l| l.starts_with(&format!("{scheme}://")))
        .filter(|l| ports.iter().any(|p| l.contains(p.as_str())))
        .collect();
    assert_eq!(lines.len(), which.len());
    std::fs::write(out, lines.join("\n") + "\n").expect("write");
}

/// A directory holding an `ssh` that records being run and fails: on PATH first, it proves
/// that no ssh process is started.
fn fake_ssh(dir: &Path) -> (PathBuf, PathBuf) {
    let bin = dir.join("fake-ssh-bin");
    std::fs::create_dir_all(&bin).expect("dir");
    let log = dir.join("ssh-was-run");
    let script = format!("#!/bin/sh\necho \"$@\" >> {}\nexit 255\n", log.display());
    let path = bin.join("ssh");
    std::fs::write(&path, script).expect("write");
    let exec = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&path, exec).expect("chmod");
    (bin, log)
}

fn path_with(first: &Path) -> String {
    format!(
        "{}:{}",
        first.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn expr_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, text).expect("write");
    f
}

/// `nix-build -j0 --builders @machines FILE ARGS...` in the client store, with the fake ssh
/// first on PATH.
fn nix_build(
    client: &PrivateStore,
    machines: &Path,
    fake: &Path,
    file: &Path,
    args: &[&str],
) -> Command {
    let mut builders = String::from("@");
    builders.push_str(machines.to_str().expect("utf8"));
    let mut c = client.command(
        "nix-build",
        [
            "-j0",
            "--builders",
            &builders,
            "--no-out-link",
            file.to_str().expect("utf8"),
        ]
        .into_iter()
        .chain(args.iter().copied()),
    );
    c.env("PATH", path_with(fake));
    c
}

fn ok(o: &Output, what: &str) -> Vec<String> {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn verify(client: &PrivateStore, paths: &[String]) {
    assert!(!paths.is_empty());
    for p in paths {
        client
            .run("nix-store", ["--verify-path", p])
            .unwrap_or_else(|e| panic!("{p} valid locally: {e}"));
    }
}

fn salt() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

/// nix-build of the graph and of 20 trivial derivations, every build remote (-j0), through
/// the agent: outputs valid locally, no ssh run, one SSH connection to the builder.
fn builds_through_the_agent(scheme: &str) {
    let rig = rig(1);
    let dir = tempfile::tempdir().expect("tmp");
    let machines = dir.path().join("machines");
    machines_of(&rig, scheme, &[0], &machines);
    let agent = Agent::start(dir.path(), &machines, &[]);
    let for_nix = agent.machines_for_nix(&machines);
    let (fake, ssh_log) = fake_ssh(dir.path());
    let client = rig.client_store();

    let graph = expr_file(dir.path(), "graph.nix", GRAPH);
    let o = nix_build(client, &for_nix, &fake, &graph, &[])
        .output()
        .expect("nix-build");
    verify(client, &ok(&o, "nix-build of the graph"));

    let trivial = expr_file(dir.path(), "trivial.nix", TRIVIAL);
    let s = salt();
    let t = Instant::now();
    let o = nix_build(client, &for_nix, &fake, &trivial, &["--argstr", "salt", &s])
        .output()
        .expect("nix-build");
    let outs = ok(&o, "nix-build of 20 derivations");
    eprintln!(
        "20 trivial derivations through the agent ({scheme}): {:?}",
        t.elapsed()
    );
    assert_eq!(outs.len(), 20);
    verify(client, &outs);

    assert!(
        !ssh_log.exists(),
        "ssh was run: {:?}",
        std::fs::read_to_string(&ssh_log)
    );
    assert_eq!(
        rig.builder(0).accepted_connections(),
        1,
        "one SSH connection for every session: {}",
        rig.builder(0).sshd_log()
    );
    let served = agent.sessions_served();
    assert!(served >= 31, "a session per build (11 + 20): {served}");
    if scheme == "ssh-ng" {
        // Nix 2.8's client sends the same second message every time: after the first
        // session, spares have sent it ahead, and no client sent another.
        let b = &agent.status().expect("status")["builders"][0];
        assert!(b["hello_hits"].as_u64() > Some(0), "{b}");
        assert_eq!(b["hello_misses"].as_u64(), Some(0), "{b}");
    }
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&agent.status()).unwrap_or_default()
    );
}

#[test]
fn nix_build_goes_through_the_agent_over_ssh() {
    builds_through_the_agent("ssh");
}

#[test]
fn nix_build_goes_through_the_agent_over_ssh_ng() {
    builds_through_the_agent("ssh-ng");
}

/// A local nix-daemon with `builders` set: its build hook goes through the agent.
#[test]
fn a_nix_daemons_build_hook_goes_through_the_agent() {
    let rig = rig(1);
    let dir = tempfile::tempdir().expect("tmp");
    let machines = dir.path().join("machines");
    machines_of(&rig, "ssh-ng", &[0], &machines);
    let agent = Agent::start(dir.path(), &machines, &[]);
    let for_nix = agent.machines_for_nix(&machines);
    let (fake, ssh_log) = fake_ssh(dir.path());
    let client = rig.client_store();
    let builders = format!("@{}", for_nix.display());
    let mut daemon = client.command(
        "nix-daemon",
        [
            "--option", "builders", &builders, "--option", "max-jobs", "0",
        ],
    );
    daemon
        .env("PATH", path_with(&fake))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut daemon = KillOnDrop(daemon.spawn().expect("nix-daemon"));
    let socket = client.nix_dir().join("var/nix/daemon-socket/socket");
    wait_for("the daemon's socket", Duration::from_secs(20), || {
        socket.exists()
    });

    let trivial = expr_file(dir.path(), "trivial.nix", TRIVIAL);
    let s = salt();
    let mut c = client.command(
        "nix-build",
        [
            "--no-out-link",
            trivial.to_str().expect("utf8"),
            "--argstr",
            "salt",
            &s,
            "--arg",
            "n",
            "5",
        ],
    );
    c.env("NIX_REMOTE", "daemon").env("PATH", path_with(&fake));
    let o = c.output().expect("nix-build");
    let outs = ok(&o, "nix-build through the daemon");
    assert_eq!(outs.len(), 5);
    verify(client, &outs);
    assert!(agent.sessions_served() >= 5, "the hook used the agent");
    assert!(!ssh_log.exists(), "ssh was run");
    assert_eq!(rig.builder(0).accepted_connections(), 1);
    let _ = daemon.0.kill();
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `nixmux connect` as user nobody.
fn connect_as_nobody(socket: &Path, name: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            NIXMUX,
            "connect",
        ])
        .arg("--socket")
        .arg(socket)
        .args([name, "--stdio"])
        .stdin(Stdio::null())
        .output()
        .expect("setpriv")
}

/// A uid not on the allow-list is refused with a clear message, the refusal is logged, and
/// nothing reaches a builder. With the default socket mode it cannot even connect.
#[test]
fn a_user_that_is_not_allowed_is_refused() {
    let rig = rig(1);
    let dir = tempfile::tempdir().expect("tmp");
    // nobody must reach the binary and the socket's directory.
    let open = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(dir.path(), open).expect("chmod");
    let machines = dir.path().join("machines");
    machines_of(&rig, "ssh-ng", &[0], &machines);
    let name = format!("root@127.0.0.1:{}", rig.builder(0).port());

    let agent = Agent::start(
        dir.path(),
        &machines,
        &["--spares", "0", "--socket-mode", "666"],
    );
    let opens = rig.builder(0).session_opens();
    let o = connect_as_nobody(&agent.socket, &name);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(255), "{stderr}");
    assert!(stderr.contains("not allowed"), "{stderr}");
    assert!(stderr.contains("uid 65534"), "{stderr}");
    assert!(o.stdout.is_empty(), "nothing on stdout");
    wait_for("the refusal in the log", Duration::from_secs(5), || {
        agent.log().contains("refused a client")
    });
    assert_eq!(rig.builder(0).session_opens(), opens, "no channel opened");
    assert_eq!(
        agent.status().and_then(|s| s["clients_refused"].as_u64()),
        Some(1)
    );
    drop(agent);

    let agent = Agent::start(dir.path(), &machines, &["--spares", "0"]);
    let o = connect_as_nobody(&agent.socket, &name);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(255), "{stderr}");
    assert!(stderr.contains("cannot reach the nixmux agent"), "{stderr}");
    assert!(stderr.contains("ermission denied"), "{stderr}");
    assert_eq!(rig.builder(0).session_opens(), opens, "no channel opened");
}

/// The agent killed in the middle of a build: Nix fails with a clear message, no partial
/// output is valid on either side, and after a restart the next build succeeds.
#[test]
fn the_agent_killed_mid_build() {
    let rig = rig(1);
    let dir = tempfile::tempdir().expect("tmp");
    let machines = dir.path().join("machines");
    machines_of(&rig, "ssh-ng", &[0], &machines);
    let mut agent = Agent::start(dir.path(), &machines, &[]);
    let for_nix = agent.machines_for_nix(&machines);
    let (fake, _) = fake_ssh(dir.path());
    let client = rig.client_store();
    let slow = expr_file(dir.path(), "slow.nix", SLOW);
    let s = salt();
    let out_path = {
        let o = client
            .run(
                "nix-instantiate",
                [
                    slow.to_str().expect("utf8"),
                    "--argstr",
                    "salt",
                    &s,
                    "--argstr",
                    "secs",
                    "30",
                ],
            )
            .expect("instantiate");
        let drv = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        let o = client
            .run("nix-store", ["--query", "--outputs", &drv])
            .expect("outputs");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let build = start_slow_build(&rig, 0, &for_nix, &fake, &slow, &s, 30);
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let o = build.wait_with_output().expect("nix-build ends");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the build cannot succeed: {stderr}");
    assert!(
        stderr.contains("the nixmux agent went away"),
        "the build log says why: {stderr}"
    );
    eprintln!("nix-build said:\n{stderr}");
    wait_for("the remote build to stop", Duration::from_secs(30), || {
        !rig.builder(0)
            .processes()
            .iter()
            .any(|p| p.cmdline.contains("sleep 30"))
    });
    assert!(
        !client.is_valid(&out_path).expect("query"),
        "not valid locally"
    );
    assert!(
        !rig.builder(0).store().is_valid(&out_path).expect("query"),
        "not valid on the builder"
    );

    let agent = Agent::start(dir.path(), &machines, &[]);
    let o = nix_build(
        client,
        &for_nix,
        &fake,
        &slow,
        &["--argstr", "salt", &s, "--argstr", "secs", "1"],
    )
    .output()
    .expect("nix-build");
    verify(client, &ok(&o, "the build after a restart"));
    assert!(agent.sessions_served() > 0);
}

/// Removing one builder from the machines file while a build runs on another leaves that
/// build (and its connection) untouched.
#[test]
fn a_reload_leaves_other_builders_alone() {
    let rig = rig(2);
    let dir = tempfile::tempdir().expect("tmp");
    let both = dir.path().join("machines");
    machines_of(&rig, "ssh-ng", &[0, 1], &both);
    let agent = Agent::start(dir.path(), &both, &["--spares", "1"]);
    // Nix only knows builder 1, where the build must run.
    let only1 = dir.path().join("machines-1");
    machines_of(&rig, "ssh-ng", &[1], &only1);
    let for_nix = agent.machines_for_nix(&only1);
    let (fake, _) = fake_ssh(dir.path());
    let client = rig.client_store();
    let slow = expr_file(dir.path(), "slow.nix", SLOW);
    let s = salt();
    let build = start_slow_build(&rig, 1, &for_nix, &fake, &slow, &s, 6);
    // Builder 0 goes away (the file changes; the agent notices within 2 s).
    std::fs::copy(&only1, &both).expect("rewrite");
    wait_for("the reload", Duration::from_secs(20), || {
        agent
            .status()
            .and_then(|s| s["builders"].as_array().map(Vec::len))
            == Some(1)
    });
    let o = build.wait_with_output().expect("nix-build");
    verify(client, &ok(&o, "the build on the builder that stayed"));
    assert_eq!(
        rig.builder(1).accepted_connections(),
        1,
        "its connection stayed"
    );
    let st = agent.status().expect("status");
    assert_eq!(st["reloads"].as_u64(), Some(1), "{st}");
    assert!(agent.log().contains("1 removed"), "{}", agent.log());
}

/// What a client sends first, how the answer starts and ends, and how many bytes of it to
/// read before ending the input (0: end it at once).
///
/// Serve: the hello and a request, then the input ends; `nix-store --serve` answers the
/// request, then sees the end. Worker: Nix 2.8's daemon watches its input for hang-up and
/// abandons whatever it is doing when it comes (`MonitorFdHup`), so ending the input early
/// only tests Nix; there the whole hello answer is read first, as Nix's client does.
fn hello_and_request(protocol: &str) -> (Vec<u8>, [u8; 8], [u8; 8], usize) {
    let mut w = Vec::new();
    let mut put = |v: u64| w.extend_from_slice(&v.to_le_bytes());
    match protocol {
        "--stdio" => {
            // Worker: magic, version 1.34, then the obsolete affinity and reserve words.
            put(0x6e69_7863);
            put(0x122);
            put(0);
            put(0);
            // The daemon answers magic 2, its version, its Nix version ("2.8.0", padded),
            // then STDERR_LAST: 40 bytes.
            (
                w,
                0x6478_696f_u64.to_le_bytes(),
                0x616c_7473_u64.to_le_bytes(),
                40,
            )
        }
        _ => {
            // Serve: magic, version 2.6, then QueryValidPaths(lock 0, substitute 0, no paths).
            put(0x390c_9deb);
            put(0x206);
            put(1);
            put(0);
            put(0);
            put(0);
            // Magic 2, version, and an empty path set.
            (w, 0x5452_eecb_u64.to_le_bytes(), 0u64.to_le_bytes(), 0)
        }
    }
}

/// `nixmux connect` with stdin and stdout separate pipes (as Nix runs it) or one socket (as
/// Lix does): the input ends right after the request, and the answer still arrives whole
/// (the end of input must not close the output direction).
fn connect_relays_after_end_of_input(protocol: &str, one_socket: bool) {
    let rig = rig(1);
    let dir = tempfile::tempdir().expect("tmp");
    let machines = dir.path().join("machines");
    let scheme = if protocol == "--stdio" {
        "ssh-ng"
    } else {
        "ssh"
    };
    machines_of(&rig, scheme, &[0], &machines);
    let agent = Agent::start(dir.path(), &machines, &[]);
    let name = format!("root@127.0.0.1:{}", rig.builder(0).port());
    let mut args = vec!["connect", "--socket"];
    let socket = agent.socket.to_str().expect("utf8").to_owned();
    args.push(&socket);
    args.push(&name);
    args.extend(protocol.split(' '));
    if protocol == "--serve" {
        args.push("--write");
    }
    let (request, first, last, before_eof) = hello_and_request(protocol);
    let mut cmd = Command::new(NIXMUX);
    cmd.env("NIXMUX_NO_STATE", "1");
    cmd.args(&args).stderr(Stdio::piped());
    let (mut child, reply) = if one_socket {
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        let theirs2 = theirs.try_clone().expect("dup");
        cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(OwnedFd::from(theirs2)));
        let child = cmd.spawn().expect("connect");
        // The command holds our copies of the child's socket: only the child may keep it
        // open, or the end of its output never shows.
        drop(cmd);
        ours.write_all(&request).expect("write");
        let mut reply = vec![0u8; before_eof];
        ours.read_exact(&mut reply).expect("read");
        ours.shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        ours.read_to_end(&mut reply).expect("read");
        (child, reply)
    } else {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("connect");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        stdin.write_all(&request).expect("write");
        let mut reply = vec![0u8; before_eof];
        stdout.read_exact(&mut reply).expect("read");
        drop(stdin);
        stdout.read_to_end(&mut reply).expect("read");
        (child, reply)
    };
    let status = child.wait().expect("wait");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    // The exit status is the remote program's: Nix 2.8's `nix-daemon --stdio` sometimes
    // dies of SIGSEGV on EOF after a complete session (seen with plain ssh too), which ends
    // in 255 as with ssh. What matters: no error of ours, and the whole answer.
    assert!(
        status.success() || status.code() == Some(255),
        "connect: {status}: {err}"
    );
    assert!(!err.contains("nixmux"), "connect: {status}: {err}");
    assert!(reply.len() >= 24, "{reply:?}");
    assert_eq!(&reply[..8], first, "the remote program's hello");
    assert_eq!(&reply[reply.len() - 8..], last, "the answer, whole");
}

#[test]
fn connect_with_pipes_over_ssh_ng() {
    connect_relays_after_end_of_input("--stdio", false);
}

#[test]
fn connect_with_one_socket_over_ssh_ng() {
    connect_relays_after_end_of_input("--stdio", true);
}

#[test]
fn connect_with_pipes_over_ssh() {
    connect_relays_after_end_of_input("--serve", false);
}

#[test]
fn connect_with_one_socket_over_ssh() {
    connect_relays_after_end_of_input("--serve", true);
}

/// One worker handshake through `nixmux connect`, as a client announcing `version` sends it
/// (magic, version, affinity 0, reserve 0): returns everything the daemon answered. The
/// input ends once `expect` bytes have arrived.
fn worker_handshake(agent: &Agent, name: &str, version: u64, expect: usize) -> Vec<u8> {
    let mut child = Command::new(NIXMUX)
        .env("NIXMUX_NO_STATE", "1")
        .args(["connect", "--socket"])
        .arg(&agent.socket)
        .args([name, "--stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("connect");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let hello: Vec<u8> = [0x6e69_7863_u64, version, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    stdin.write_all(&hello).expect("write");
    let mut reply = vec![0u8; expect];
    stdout.read_exact(&mut reply).expect("read the answer");
    drop(stdin);
    stdout.read_to_end(&mut reply).expect("read");
    let _ = child.wait();
    reply
}

/// The agent learns a worker client's second message and sends it ahead with its spares;
/// a client that sends another one must still get the daemon's answer to its own: a 1.32
/// client gets no Nix version string (that is 1.33), a 1.34 client does.
#[test]
fn spares_send_the_learned_hello_ahead_and_other_clients_get_their_own_answer() {
    let rig = rig(1);
    let dir = tempfile::tempdir().expect("tmp");
    let machines = dir.path().join("machines");
    machines_of(&rig, "ssh-ng", &[0], &machines);
    let agent = Agent::start(dir.path(), &machines, &[]);
    let name = format!("root@127.0.0.1:{}", rig.builder(0).port());
    let builder_stat = |k: &str| {
        agent
            .status()
            .and_then(|s| s["builders"][0][k].as_u64())
            .unwrap_or(0)
    };
    let spares_ready = || {
        wait_for("two spares", Duration::from_secs(30), || {
            builder_stat("spares_ready") == 2
        })
    };
    let last = 0x616c_7473_u64.to_le_bytes();
    // Magic 2 and version (16), "2.8.0" as a padded string (16), STDERR_LAST (8).
    let with_version = 40;
    // Magic 2 and version, STDERR_LAST.
    let without_version = 24;
    for (i, (version, expect)) in [
        (0x122, with_version),
        (0x122, with_version),
        (0x120, without_version),
        (0x120, without_version),
        (0x122, with_version),
    ]
    .into_iter()
    .enumerate()
    {
        spares_ready();
        let reply = worker_handshake(&agent, &name, version, expect);
        assert_eq!(
            reply.len(),
            expect,
            "session {i} (version {version:#x}): {reply:02x?}"
        );
        assert_eq!(reply[..8], 0x6478_696f_u64.to_le_bytes(), "session {i}");
        assert_eq!(reply[expect - 8..], last, "session {i}");
        if expect == with_version {
            assert_eq!(&reply[24..29], b"2.8.0", "session {i}");
        }
    }
    // Learned from the first; sent ahead and matched by the second and fourth; the third
    // and fifth changed version and moved to a fresh remote program.
    assert_eq!(builder_stat("hello_hits"), 2, "{}", agent.log());
    assert_eq!(builder_stat("hello_misses"), 2, "{}", agent.log());
    assert_eq!(builder_stat("session_failures"), 0, "{}", agent.log());
}

/// Without an agent, or for a builder it does not know: a clear message on stderr, nothing
/// on stdout, exit 255.
#[test]
fn connect_says_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tmp");
    let o = Command::new(NIXMUX)
        .env("NIXMUX_NO_STATE", "1")
        .args(["connect", "--socket"])
        .arg(dir.path().join("none.sock"))
        .args(["b1", "--stdio"])
        .stdin(Stdio::null())
        .output()
        .expect("connect");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(255), "{err}");
    assert!(o.stdout.is_empty());
    assert!(err.contains("cannot reach the nixmux agent"), "{err}");
    assert!(err.contains("is `nixmux agent` running"), "{err}");

    let rig = rig(1);
    let machines = dir.path().join("machines");
    machines_of(&rig, "ssh-ng", &[0], &machines);
    let agent = Agent::start(dir.path(), &machines, &["--spares", "0"]);
    let o = Command::new(NIXMUX)
        .env("NIXMUX_NO_STATE", "1")
        .args(["connect", "--socket"])
        .arg(&agent.socket)
        .args(["no-such-builder", "--stdio"])
        .stdin(Stdio::null())
        .output()
        .expect("connect");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(255), "{err}");
    assert!(o.stdout.is_empty());
    assert!(
        err.contains("no ssh-ng:// builder named \"no-such-builder\""),
        "{err}"
    );
    assert!(
        err.contains(&format!("root@127.0.0.1:{}", rig.builder(0).port())),
        "{err}"
    );
}

/// SIGTERM: the agent stops accepting at once and lets the running build finish; the
/// status and the Prometheus metrics say what it served.
#[test]
fn sigterm_drains_and_metrics_report() {
    let rig = rig(1);
    let dir = tempfile::tempdir().expect("tmp");
    let machines = dir.path().join("machines");
    machines_of(&rig, "ssh-ng", &[0], &machines);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut agent = Agent::start(dir.path(), &machines, &["--metrics", &port.to_string()]);
    let for_nix = agent.machines_for_nix(&machines);
    let (fake, _) = fake_ssh(dir.path());
    let client = rig.client_store();
    let slow = expr_file(dir.path(), "slow.nix", SLOW);
    let s = salt();
    let build = start_slow_build(&rig, 0, &for_nix, &fake, &slow, &s, 3);

    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics");
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut page = String::new();
    http.read_to_string(&mut page).expect("response");
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("nixmux_agent_sessions_active 1"), "{page}");
    assert!(
        page.contains("nixmux_builder_up{builder=\"root@127.0.0.1:"),
        "{page}"
    );

    let pid = agent.child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    wait_for("the socket to go away", Duration::from_secs(5), || {
        !agent.socket.exists()
    });
    let o = build.wait_with_output().expect("nix-build");
    verify(client, &ok(&o, "the build that was running at SIGTERM"));
    let status = agent.child.wait().expect("agent exits");
    assert!(status.success(), "{status}: {}", agent.log());
    assert!(
        agent.log().contains("waiting for 1 running sessions"),
        "{}",
        agent.log()
    );
}
