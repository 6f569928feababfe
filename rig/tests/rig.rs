//! End-to-end tests of the rig against the real peers: Debian's Nix 2.8 and OpenSSH 9.2.
//! They need root. Every test creates its own rig/stores under temp dirs and checks that the
//! host's /nix/store gains nothing.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use nixmux_rig::{
    PrivateStore, Protocol, Rig, RigConfig, RigError, ensure_peers_installed, log_patterns,
};

/// A string unique to this test run, put into store path names and contents so that the
/// host-store check cannot be confused by other tests.
fn nonce(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{}-{nanos}", std::process::id())
}

/// Asserts that nothing whose name contains `nonce` is in the host's /nix/store.
fn assert_host_store_clean(nonce: &str) {
    if let Ok(entries) = std::fs::read_dir("/nix/store") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains(nonce),
                "host /nix/store was modified: {name}"
            );
        }
    }
}

/// Writes a file with unique content for `nix-store --add`.
fn nonce_file(dir: &Path, nonce: &str) -> std::path::PathBuf {
    let p = dir.join(nonce);
    std::fs::write(&p, format!("content {nonce}\n")).unwrap();
    p
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `(pid, namespace)` of every process in namespace `ns`, to check later that exactly these
/// processes are gone. (Checking "the namespace is empty" later would be wrong: the kernel
/// reuses a freed namespace's inode number for the next namespace, e.g. a parallel test's.)
fn snapshot_ns(ns: u64) -> Vec<(u32, u64)> {
    pids_in_ns(ns).into_iter().map(|p| (p, ns)).collect()
}

/// Asserts that none of the processes of a snapshot still runs in its namespace.
fn assert_gone(snapshot: &[(u32, u64)]) {
    assert!(!snapshot.is_empty());
    for &(pid, ns) in snapshot {
        let still = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .map(|l| l.to_string_lossy() == format!("mnt:[{ns}]"))
            .unwrap_or(false);
        assert!(
            !still,
            "pid {pid} still alive in mnt:[{ns}]: {:?} root {:?} {}",
            std::fs::read_to_string(format!("/proc/{pid}/cmdline")),
            std::fs::read_link(format!("/proc/{pid}/root")),
            std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
        );
    }
}

/// Pids whose mount namespace is `ns` (independent of the rig's own bookkeeping).
fn pids_in_ns(ns: u64) -> Vec<u32> {
    let want = format!("mnt:[{ns}]");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .map(|l| l.to_string_lossy() == want)
                .unwrap_or(false)
        })
        .collect()
}

/// Reads the SSH identification line, or `None` if nothing arrives within `timeout`.
fn banner(port: u16, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn rig_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Rig>();
    assert_send_sync::<PrivateStore>();
}

#[test]
fn peers_check_is_fast_when_installed() {
    ensure_peers_installed().unwrap();
    let t = Instant::now();
    for _ in 0..10 {
        ensure_peers_installed().unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert!(nixmux_rig::missing_programs().is_empty());
}

#[test]
fn private_store_is_isolated_from_the_host() {
    let n = nonce("ps");
    let store = PrivateStore::temp().unwrap();
    let other = PrivateStore::temp().unwrap();
    let root = store.path().to_owned();

    let file = nonce_file(&store.home(), &n);
    let path = store.add(&file).unwrap();
    assert!(
        path.starts_with("/nix/store/") && path.ends_with(&n),
        "{path}"
    );
    assert!(store.is_valid(&path).unwrap());
    let base = path.trim_start_matches("/nix/store/");
    assert!(store.store_dir().join(base).exists());
    assert!(!Path::new(&path).exists(), "visible on the host: {path}");
    assert!(!other.is_valid(&path).unwrap());

    // A real build, with the store's nix.conf (no substituters, no build users, no sandbox).
    let expr = format!(
        r#"derivation {{ name = "{n}-drv"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo built {n} > $out" ]; }}"#
    );
    let out = store
        .run("nix-build", ["--no-out-link", "-E", expr.as_str()])
        .unwrap();
    let built = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(built.ends_with(&format!("{n}-drv")), "{built}");
    let content = store.run("cat", [built.as_str()]).unwrap();
    assert_eq!(
        String::from_utf8(content.stdout).unwrap(),
        format!("built {n}\n")
    );

    // Environment inside: clean HOME, private NIX_CONF_DIR, the store's /nix.
    let env = store
        .run("/bin/sh", ["-c", "echo $HOME; echo $NIX_CONF_DIR"])
        .unwrap();
    assert_eq!(
        String::from_utf8(env.stdout).unwrap(),
        format!(
            "{}\n{}\n",
            store.home().display(),
            store.conf_dir().display()
        )
    );

    assert_host_store_clean(&n);
    drop(store);
    assert!(!root.exists(), "temp store dir left behind");
}

#[test]
fn two_builders_behind_real_sshd() {
    let n = nonce("rig");
    let rig = Rig::start(RigConfig::with_builders(2)).unwrap();
    let (b0, b1) = (rig.builder(0), rig.builder(1));
    assert_ne!(b0.port(), b1.port());
    assert_ne!(b0.host_key(), b1.host_key());
    assert_ne!(b0.mount_ns(), b1.mount_ns());

    // Client files.
    let machines = std::fs::read_to_string(rig.machines()).unwrap();
    let lines: Vec<&str> = machines.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 4, "{machines}");
    let fields: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(fields[0], format!("ssh-ng://root@127.0.0.1:{}", b0.port()));
    assert_eq!(fields[0], b0.store_url(Protocol::Worker));
    assert_eq!(lines[0], b0.machines_line(Protocol::Serve));
    assert_eq!(fields[2], rig.client_key().to_str().unwrap());
    assert_eq!(&fields[4..7], ["1", "-", "-"]);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(fields[7])
        .unwrap();
    assert_eq!(
        decoded,
        std::fs::read(b0.dir().join("ssh_host_ed25519_key.pub")).unwrap()
    );
    let known_hosts = std::fs::read_to_string(rig.known_hosts()).unwrap();
    assert!(known_hosts.contains(&format!(
        "[127.0.0.1]:{} {}\n",
        b1.port(),
        b1.host_key_entry()
    )));
    assert!(
        std::fs::read_to_string(rig.ssh_config())
            .unwrap()
            .contains(&format!(
                "Host builder1\n  HostName 127.0.0.1\n  Port {}\n",
                b1.port()
            ))
    );

    // The real OpenSSH client, through the rig's ssh_config (strict host key checking).
    let version = run_ok(&mut rig.ssh(0, "nix-store --version"));
    assert!(version.starts_with("nix-store (Nix) "), "{version}");

    // Sessions get the builder's clean HOME and NIX_CONF_DIR; root's ~/.bashrc (pyenv) is not
    // read.
    let env = run_ok(&mut rig.ssh(
        1,
        "echo $HOME; echo $NIX_CONF_DIR; echo ${PYENV_ROOT:-no-pyenv}; pwd",
    ));
    let env: Vec<&str> = env.lines().collect();
    assert_eq!(env[0], b1.store().home().to_str().unwrap());
    assert_eq!(env[1], b1.store().conf_dir().to_str().unwrap());
    assert_eq!(env[2], "no-pyenv");

    assert_eq!(
        b0.wait_for_log(log_patterns::ACCEPTED, 1, Duration::from_secs(5)),
        1
    );
    assert_eq!(
        b0.wait_for_log(log_patterns::SESSION_OPEN, 1, Duration::from_secs(5)),
        1
    );
    assert_eq!(
        b0.wait_for_log(log_patterns::EXEC, 1, Duration::from_secs(5)),
        1
    );
    assert!(b0.count_log(log_patterns::CONNECTION) >= 2); // readiness probe + ssh

    // A path added on the client side is not on the builders until copied.
    let file = nonce_file(&rig.client_store().home(), &n);
    let path = rig.client_store().add(&file).unwrap();
    assert!(!b0.store().is_valid(&path).unwrap());
    let check = format!("nix-store --check-validity {path}");
    assert!(!rig.ssh(0, &check).status().unwrap().success());

    // Copy for real: export from the client store, import through sshd on builder0.
    let export = rig
        .client_store()
        .run("nix-store", ["--export", path.as_str()])
        .unwrap()
        .stdout;
    let mut import = rig.ssh(0, "nix-store --import");
    import.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = import.spawn().unwrap();
    child.stdin.take().unwrap().write_all(&export).unwrap();
    let imported = child.wait_with_output().unwrap();
    assert!(imported.status.success());
    assert_eq!(String::from_utf8_lossy(&imported.stdout).trim(), path);

    run_ok(&mut rig.ssh(0, &check));
    assert!(b0.store().is_valid(&path).unwrap());
    let in_ns = b0
        .exec_in_namespace("nix-store", ["--check-validity", path.as_str()])
        .unwrap();
    assert!(in_ns.status.success());
    assert!(
        !b1.store().is_valid(&path).unwrap(),
        "builders share a store"
    );

    // Unmodified Nix 2.8 reaches the builders through ssh_config aliases, with the host key
    // pinned the machines-file way (field 8 becomes base64-ssh-public-host-key).
    let ping_url = format!(
        "ssh-ng://root@{}?base64-ssh-public-host-key={}",
        b1.name(),
        b1.host_key_base64()
    );
    let mut ping = rig
        .client_store()
        .command("nix", ["store", "ping", "--store", ping_url.as_str()]);
    ping.env("NIX_SSHOPTS", format!("-F {}", rig.ssh_config().display()));
    let pinged = ping.stdin(Stdio::null()).output().unwrap();
    let pinged = format!(
        "{}{}",
        String::from_utf8_lossy(&pinged.stdout),
        String::from_utf8_lossy(&pinged.stderr)
    );
    assert!(pinged.contains("Version: 2.8"), "{pinged}");
    let alias_machines = std::fs::read_to_string(rig.machines_ssh_config()).unwrap();
    assert!(alias_machines.contains(&format!("ssh-ng://root@builder1 {}", fields[1])));

    // The builder's processes: at least the listener.
    let procs = b0.processes();
    let listener = b0.sshd_pid().unwrap();
    assert!(
        procs
            .iter()
            .any(|p| p.pid == listener && p.cmdline.contains("sshd")),
        "{procs:?}"
    );

    assert_host_store_clean(&n);
}

#[test]
fn fault_controls() {
    let n = nonce("faults");
    let rig = Rig::start(RigConfig::with_builders(1)).unwrap();
    let b = rig.builder(0);
    let listener = b.sshd_pid().unwrap();

    // kill_sessions: a running remote command dies, the listener stays.
    let mut long = rig.ssh(0, "exec sleep 60");
    long.stdin(Stdio::null()).stderr(Stdio::null());
    let mut long = long.spawn().unwrap();
    wait_until("the remote sleep", Duration::from_secs(10), || {
        b.processes().iter().any(|p| p.cmdline == "sleep 60")
    });
    assert!(b.kill_sessions().unwrap() >= 2); // sshd session process(es) + sleep
    assert!(!long.wait().unwrap().success());
    let left = b.processes();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].pid, listener);

    // freeze/thaw: TCP still connects, but no banner until thawed.
    b.freeze().unwrap();
    assert_eq!(banner(b.port(), Duration::from_millis(300)), None);
    b.thaw().unwrap();
    let greeting = banner(b.port(), Duration::from_secs(5)).unwrap();
    assert!(greeting.starts_with("SSH-2.0-OpenSSH_"), "{greeting}");

    // A path imported before a restart survives it (same store directory).
    let file = nonce_file(&rig.client_store().home(), &n);
    let path = rig.client_store().add(&file).unwrap();
    let export = rig
        .client_store()
        .run("nix-store", ["--export", path.as_str()])
        .unwrap()
        .stdout;
    b.store()
        .run_with_stdin("nix-store", ["--import"], &export)
        .unwrap();

    // stop: listener and sessions gone, namespace empty, port closed.
    let old = snapshot_ns(b.mount_ns().unwrap());
    let port = b.port();
    b.stop_sshd().unwrap();
    assert!(!b.is_running());
    assert_eq!(b.sshd_pid(), None);
    assert!(b.processes().is_empty());
    assert_gone(&old);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(b.freeze().is_err());
    b.stop_sshd().unwrap(); // idempotent

    // start: same port, same host key (strict checking against known_hosts), same store.
    b.start_sshd().unwrap();
    assert_eq!(b.port(), port);
    assert_ne!(b.sshd_pid(), Some(listener));
    // (The namespace inode may be the old one: the kernel reuses freed inode numbers.)
    run_ok(&mut rig.ssh(0, &format!("nix-store --check-validity {path}")));
    assert!(b.sshd_log().contains("Server listening on 127.0.0.1 port"));

    // A crashed listener (killed behind the rig's back) can be restarted too.
    let pid = b.sshd_pid().unwrap();
    run_ok(Command::new("kill").args(["-KILL", &pid.to_string()]));
    wait_until("the listener to die", Duration::from_secs(5), || {
        !b.is_running()
    });
    b.start_sshd().unwrap();
    run_ok(&mut rig.ssh(0, "true"));

    let state = Rig::read_state(rig.dir()).unwrap();
    assert_eq!(state.builders[0].sshd_pid, b.sshd_pid());
    assert_eq!(state.builders[0].mount_ns, b.mount_ns());
    assert_host_store_clean(&n);
}

#[test]
fn max_sessions_refusals_are_logged() {
    let config = RigConfig {
        max_sessions: 1,
        ..RigConfig::with_builders(1)
    };
    let rig = Rig::start(config).unwrap();
    let b = rig.builder(0);
    let control = rig.dir().join("cm.sock");
    let mux = |extra: &[&str], remote: Option<&str>| {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(rig.ssh_config())
            .arg("-o")
            .arg(format!("ControlPath={}", control.display()))
            .args(extra)
            .arg(b.name());
        if let Some(r) = remote {
            c.arg("--").arg(r);
        }
        c
    };
    // A master connection with no session, then two sessions through it.
    run_ok(&mut mux(&["-o", "ControlMaster=yes", "-N", "-f"], None));
    let mut first = mux(&["-o", "ControlMaster=no"], Some("sleep 1"));
    let mut first = first.stdin(Stdio::null()).spawn().unwrap();
    b.wait_for_log(log_patterns::EXEC, 1, Duration::from_secs(5));
    // Port=1: when the master's session open is refused, ssh falls back to a connection of
    // its own; make that fallback fail instead of hiding the refusal.
    let second = mux(&["-o", "ControlMaster=no", "-o", "Port=1"], Some("true"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!second.status.success(), "{}", b.sshd_log());
    assert!(first.wait().unwrap().success());
    run_ok(&mut mux(&["-O", "exit"], None));

    assert_eq!(b.accepted_connections(), 1);
    assert_eq!(
        b.wait_for_log(log_patterns::SESSION_OPEN, 2, Duration::from_secs(5)),
        2
    );
    assert_eq!(b.refused_sessions(), 1);
    assert_eq!(b.count_log(log_patterns::SESSION_CONFIRMED), 1);
}

#[test]
fn drop_kills_every_builder_process_and_removes_the_dir() {
    let rig = Rig::start(RigConfig::with_builders(2)).unwrap();
    let dir = rig.dir().to_owned();
    let mut long = rig.ssh(1, "exec sleep 60");
    let mut long = long
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the remote sleep", Duration::from_secs(10), || {
        rig.builder(1).processes().len() >= 3
    });
    rig.builder(0).freeze().unwrap(); // frozen processes must die too
    let procs: Vec<(u32, u64)> = rig
        .builders()
        .iter()
        .flat_map(|b| snapshot_ns(b.mount_ns().unwrap()))
        .collect();
    assert!(procs.len() >= 4, "{procs:?}");
    drop(rig);
    assert_gone(&procs);
    assert!(!dir.exists());
    assert!(!long.wait().unwrap().success());
}

#[test]
fn drop_cleans_up_after_a_panicking_test() {
    let seen = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let rig = Rig::start(RigConfig::with_builders(1)).unwrap();
        let procs = snapshot_ns(rig.builder(0).mount_ns().unwrap());
        *seen.lock().unwrap() = Some((rig.dir().to_owned(), procs));
        panic!("test failure while the rig runs");
    }));
    assert!(result.is_err());
    let (dir, procs) = seen.lock().unwrap().take().unwrap();
    assert_gone(&procs);
    assert!(!dir.exists());
}

#[test]
fn keep_then_stop_dir() {
    let rig = Rig::start(RigConfig::with_builders(1)).unwrap();
    let port = rig.builder(0).port();
    let dir = rig.keep();

    let state = Rig::read_state(&dir).unwrap();
    assert_eq!(state.dir, dir);
    let record = &state.builders[0];
    assert_eq!(record.port, port);
    let ns = record.mount_ns.unwrap();
    let procs = snapshot_ns(ns);
    assert!(procs.contains(&(record.sshd_pid.unwrap(), ns)));
    assert!(
        banner(port, Duration::from_secs(5)).is_some(),
        "kept rig not running"
    );

    Rig::stop_dir(&dir).unwrap();
    assert_gone(&procs);
    assert!(!dir.exists());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());

    // Not a rig directory: refused, nothing removed.
    let not_a_rig = tempfile::tempdir().unwrap();
    assert!(matches!(
        Rig::stop_dir(not_a_rig.path()),
        Err(RigError::State { .. })
    ));
    assert!(not_a_rig.path().exists());
}

#[test]
fn start_in_requires_an_empty_dir() {
    let parent = tempfile::tempdir().unwrap();
    std::fs::write(parent.path().join("x"), "x").unwrap();
    assert!(matches!(
        Rig::start_in(parent.path(), RigConfig::with_builders(0)),
        Err(RigError::UnsuitablePath { .. })
    ));
    assert!(parent.path().join("x").exists());

    let dir = parent.path().join("rig");
    let rig = Rig::start_in(&dir, RigConfig::with_builders(0)).unwrap();
    assert!(rig.client_key().exists());
    drop(rig);
    assert!(!dir.exists());
}

/// Nix 2.8's `nix-store --serve` unshares a mount namespace of its own at start, so it is
/// not in sshd's; `processes()` still lists it (its /nix is the builder's store), and
/// `kill_sessions` and `stop_sshd` kill it.
#[test]
fn nix_processes_in_their_own_namespace_are_the_builders() {
    let rig = Rig::start(RigConfig::with_builders(1)).unwrap();
    let b = rig.builder(0);
    let sshd_ns = b.mount_ns().unwrap();
    let serve = || {
        let mut c = rig.ssh(0, "nix-store --serve --write");
        // stdin stays open (piped, never written) so that the server waits for commands.
        c.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c.spawn().unwrap()
    };
    let is_serve = |p: &nixmux_rig::ProcInfo| p.cmdline == "nix-store --serve --write";
    let ns_of = |pid: u32| {
        std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut client = serve();
    // Nix unshares a moment after it starts.
    wait_until(
        "the remote nix-store in its own namespace",
        Duration::from_secs(10),
        || {
            b.processes()
                .iter()
                .any(|p| is_serve(p) && ns_of(p.pid) != format!("mnt:[{sshd_ns}]"))
        },
    );
    let pid = b.processes().into_iter().find(is_serve).unwrap().pid;

    b.kill_sessions().unwrap();
    // Gone, or a zombie waiting for its reaper (which has no namespace link any more).
    assert_eq!(ns_of(pid), "");
    let _ = client.kill();
    let _ = client.wait();

    let mut client = serve();
    wait_until("the remote nix-store", Duration::from_secs(10), || {
        b.processes().iter().any(is_serve)
    });
    let pid = b.processes().into_iter().find(is_serve).unwrap().pid;
    b.stop_sshd().unwrap();
    assert_eq!(ns_of(pid), "");
    assert!(b.processes().is_empty());
    let _ = client.kill();
    let _ = client.wait();
}
