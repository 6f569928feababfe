//! A throwaway OpenSSH sshd on loopback, owned by one test.
//!
//! Everything lives in a temp dir: config, host key, client key, authorized_keys,
//! known_hosts, log. sshd runs with `-D` as our child; on drop it and every process
//! descended from it (per-connection sshd children call setsid, so a process group would
//! miss them) are killed by pid. No global state is touched: the port is a free ephemeral
//! one, `SetEnv HOME` points sessions at the temp dir (root's real ~/.bashrc is slow).

#![allow(dead_code)]

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixmux_transport::{
    Endpoint, HostKeyCheck, Identity, NoopObserver, SshConnection, TransportConfig, TransportError,
    connect,
};

pub(crate) struct SshdOptions {
    pub(crate) max_sessions: u32,
    /// `start:rate:full`. Its own option because sshd takes the *last* `MaxStartups` line
    /// (unlike most keywords), so an extra line could not override it.
    pub(crate) max_startups: String,
    pub(crate) extra_config: Vec<String>,
}

impl Default for SshdOptions {
    fn default() -> Self {
        SshdOptions {
            max_sessions: 10,
            max_startups: "100:30:200".into(),
            extra_config: Vec::new(),
        }
    }
}

pub(crate) struct Sshd {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) port: u16,
    child: Child,
    /// `ssh-ed25519 AAAA...` of the server.
    pub(crate) host_pub: String,
    pub(crate) client_key: PathBuf,
    pub(crate) known_hosts: PathBuf,
    pub(crate) log: PathBuf,
}

pub(crate) fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn helper");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Generates a key pair; returns the private key path.
pub(crate) fn keygen(dir: &Path, name: &str, kind: &str, passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", name, "-f"])
        .arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    run(&mut cmd);
    path
}

pub(crate) fn pub_line(private_key: &Path) -> String {
    let text = std::fs::read_to_string(private_key.with_extension("pub"))
        .or_else(|_| std::fs::read_to_string(format!("{}.pub", private_key.display())))
        .expect("read .pub");
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits (up to 10 s) until the server `child` started on `port` sends an SSH banner; false
/// if it exited or never did.
fn serves_ssh(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut banner = [0u8; 4];
            if s.read_exact(&mut banner).is_ok() && &banner == b"SSH-" {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Sshd {
    pub(crate) fn start() -> Sshd {
        Self::start_with(SshdOptions::default())
    }

    pub(crate) fn start_with(opts: SshdOptions) -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("nixmux-transport-sshd-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        std::fs::create_dir_all(d.join("home")).expect("home");
        let host_key = keygen(&d, "host_ed25519", "ed25519", "");
        let client_key = keygen(&d, "client_ed25519", "ed25519", "");
        let host_pub = pub_line(&host_key);
        std::fs::write(
            d.join("authorized_keys"),
            format!("{}\n", pub_line(&client_key)),
        )
        .expect("authorized_keys");
        let log = d.join("sshd.log");
        for _attempt in 0..8 {
            let port = free_port();
            let mut cfg = String::new();
            // sshd keeps the first value of a keyword: extras first so they win.
            for l in &opts.extra_config {
                cfg.push_str(l);
                cfg.push('\n');
            }
            cfg.push_str(&format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nMaxSessions {ms}\nMaxStartups {mst}\nLogLevel DEBUG1\n\
                 SetEnv HOME={d}/home\nPrintMotd no\nPrintLastLog no\nAllowTcpForwarding yes\n\
                 UseDNS no\n",
                hk = host_key.display(),
                d = d.display(),
                ms = opts.max_sessions,
                mst = opts.max_startups,
            ));
            let cfg_path = d.join("sshd_config");
            std::fs::write(&cfg_path, cfg).expect("sshd_config");
            let _ = std::fs::remove_file(&log);
            let mut child = Command::new("/usr/sbin/sshd")
                .arg("-D")
                .arg("-f")
                .arg(&cfg_path)
                .arg("-E")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn sshd");
            if !serves_ssh(&mut child, port) {
                let _ = child.kill();
                let _ = child.wait();
                continue;
            }
            let known_hosts = d.join("known_hosts");
            std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_pub}\n"))
                .expect("known_hosts");
            return Sshd {
                dir,
                port,
                child,
                host_pub,
                client_key,
                known_hosts,
                log,
            };
        }
        panic!(
            "sshd did not start; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn endpoint(&self) -> Endpoint {
        Endpoint::new("127.0.0.1", self.port, "root")
    }

    pub(crate) fn identities(&self) -> Vec<Identity> {
        vec![Identity::key_file(&self.client_key)]
    }

    pub(crate) fn host_key_check(&self) -> HostKeyCheck {
        HostKeyCheck::strict([self.known_hosts.clone()])
    }

    /// Authorizes another public key (sshd re-reads authorized_keys on every attempt).
    pub(crate) fn authorize(&self, private_key: &Path) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.path().join("authorized_keys"))
            .expect("open authorized_keys");
        writeln!(f, "{}", pub_line(private_key)).expect("append");
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn count_log(&self, pattern: &str) -> usize {
        self.log_text().matches(pattern).count()
    }

    /// Pids of every live process descended from the sshd listener.
    pub(crate) fn descendants(&self) -> Vec<u32> {
        descendants_of(self.child.id())
    }

    /// SIGSTOP the listener and all its descendants (connection handlers and commands).
    pub(crate) fn freeze(&self) {
        let mut pids = vec![self.child.id()];
        pids.extend(self.descendants());
        signal(&pids, "STOP");
    }

    pub(crate) fn thaw(&self) {
        let mut pids = vec![self.child.id()];
        pids.extend(self.descendants());
        signal(&pids, "CONT");
    }

    /// Kills the per-connection processes (not the listener).
    pub(crate) fn kill_sessions(&self) {
        signal(&self.descendants(), "KILL");
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let desc = self.descendants();
        signal(&desc, "CONT");
        signal(&desc, "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn signal(pids: &[u32], sig: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

pub(crate) fn descendants_of(root: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut found = vec![root];
    let mut changed = true;
    while changed {
        changed = false;
        for &p in &pids {
            if found.contains(&p) {
                continue;
            }
            if let Some(pp) = parent_of(p)
                && found.contains(&pp)
            {
                found.push(p);
                changed = true;
            }
        }
    }
    found.retain(|&p| p != root);
    found
}

/// A Dropbear server on loopback, for checks against a second SSH implementation. It runs in
/// a private mount namespace in which a temp dir is mounted over `/root` (Dropbear reads
/// `~/.ssh/authorized_keys` and has no option to look elsewhere), so nothing outside the temp
/// dir is touched. Killed by pid on drop, with its per-connection children.
pub(crate) struct Dropbear {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) port: u16,
    child: Child,
    pub(crate) client_key: PathBuf,
    pub(crate) known_hosts: PathBuf,
}

impl Dropbear {
    /// `None` if Dropbear is not installed (`apt-get install dropbear-bin`).
    pub(crate) fn start() -> Option<Dropbear> {
        if !Path::new("/usr/sbin/dropbear").exists() {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("nixmux-transport-dropbear-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        let home = d.join("home");
        std::fs::create_dir_all(home.join(".ssh")).expect("home");
        let host_key = d.join("host_ed25519");
        run(Command::new("dropbearkey")
            .args(["-t", "ed25519", "-f"])
            .arg(&host_key)
            .stdout(Stdio::null()));
        let out = Command::new("dropbearkey")
            .args(["-y", "-f"])
            .arg(&host_key)
            .output()
            .expect("dropbearkey -y");
        let host_pub = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("ssh-"))
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .expect("dropbear host key");
        let client_key = keygen(&d, "client_ed25519", "ed25519", "");
        std::fs::write(
            home.join(".ssh/authorized_keys"),
            format!("{}\n", pub_line(&client_key)),
        )
        .expect("authorized_keys");
        run(Command::new("chmod").args(["-R", "go-rwx"]).arg(&home));
        for _attempt in 0..8 {
            let port = free_port();
            let script = format!(
                "mount --bind {home} /root && exec dropbear -F -E -s -p 127.0.0.1:{port} -r {key}",
                home = home.display(),
                key = host_key.display(),
            );
            let mut child = Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("dropbear.log")).expect("log"))
                .spawn()
                .expect("spawn dropbear");
            if !serves_ssh(&mut child, port) {
                let _ = child.kill();
                let _ = child.wait();
                continue;
            }
            let known_hosts = d.join("known_hosts");
            std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_pub}\n"))
                .expect("known_hosts");
            return Some(Dropbear {
                dir,
                port,
                child,
                client_key,
                known_hosts,
            });
        }
        panic!(
            "dropbear did not start: {}",
            std::fs::read_to_string(d.join("dropbear.log")).unwrap_or_default()
        );
    }

    pub(crate) fn endpoint(&self) -> Endpoint {
        Endpoint::new("127.0.0.1", self.port, "root")
    }

    pub(crate) fn identities(&self) -> Vec<Identity> {
        vec![Identity::key_file(&self.client_key)]
    }

    pub(crate) fn host_key_check(&self) -> HostKeyCheck {
        HostKeyCheck::strict([self.known_hosts.clone()])
    }
}

impl Drop for Dropbear {
    fn drop(&mut self) {
        signal(&descendants_of(self.child.id()), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `ssh-agent -D` of our own, killed by pid on drop.
pub(crate) struct Agent {
    child: Child,
    pub(crate) socket: PathBuf,
}

impl Agent {
    pub(crate) fn start(dir: &Path) -> Agent {
        let socket = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ssh-agent");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(socket.exists(), "ssh-agent socket did not appear");
        Agent { child, socket }
    }

    pub(crate) fn add(&self, key: &Path) {
        run(Command::new("ssh-add")
            .env("SSH_AUTH_SOCK", &self.socket)
            .arg("-q")
            .arg(key));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Test config: defaults, with short connect timeouts so failures show quickly.
pub(crate) fn config() -> TransportConfig {
    let mut c = TransportConfig::default();
    c.tcp_connect_timeout = Duration::from_secs(5);
    c.handshake_timeout = Duration::from_secs(10);
    c.auth_timeout = Duration::from_secs(10);
    c
}

/// Connects to `sshd` with `cfg` as the tests' client (its key, its known_hosts).
pub(crate) async fn try_connect(
    sshd: &Sshd,
    cfg: &TransportConfig,
) -> Result<SshConnection, TransportError> {
    connect(
        &sshd.endpoint(),
        &sshd.identities(),
        &sshd.host_key_check(),
        cfg,
        NoopObserver,
    )
    .await
}

/// [`try_connect`], which must succeed.
pub(crate) async fn conn_with(sshd: &Sshd, cfg: &TransportConfig) -> SshConnection {
    try_connect(sshd, cfg).await.expect("connect")
}

/// Reads a channel's stdout to the end with a deadline.
pub(crate) async fn read_all<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    within: Duration,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(within, r.read_to_end(&mut out))
        .await
        .expect("read timed out")
        .expect("read failed");
    out
}
