//! Connection parameters: where to connect ([`Endpoint`]), who we are ([`Identity`]) and how
//! the connection behaves ([`TransportConfig`]).

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::Algorithm;

use crate::error::TransportError;
use crate::observer::ChannelObserver;

/// An SSH server and the user to log in as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Remote user name.
    pub user: String,
}

impl Endpoint {
    /// Builds an endpoint.
    pub fn new(host: impl Into<String>, port: u16, user: impl Into<String>) -> Self {
        Endpoint {
            host: host.into(),
            port,
            user: user.into(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

/// One way to authenticate. A list of identities is tried in order, and only those (like
/// OpenSSH `IdentitiesOnly yes`): nothing is picked up implicitly from `~/.ssh`.
#[derive(Clone, PartialEq, Eq)]
pub enum Identity {
    /// A private key file in OpenSSH, PKCS#8 or PEM format: Ed25519, ECDSA or RSA (RSA signs
    /// with rsa-sha2-512/256 as the server's `server-sig-algs` allows).
    KeyFile {
        /// Path of the private key.
        path: PathBuf,
        /// Passphrase for an encrypted key. Never printed by `Debug`.
        passphrase: Option<String>,
    },
    /// Every key an ssh-agent holds, in the agent's order.
    Agent {
        /// The agent socket; `None` means `$SSH_AUTH_SOCK` at connect time.
        socket: Option<PathBuf>,
    },
}

impl Identity {
    /// An unencrypted key file.
    pub fn key_file(path: impl Into<PathBuf>) -> Self {
        Identity::KeyFile {
            path: path.into(),
            passphrase: None,
        }
    }

    /// The agent at `$SSH_AUTH_SOCK`.
    pub fn agent() -> Self {
        Identity::Agent { socket: None }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::KeyFile { path, passphrase } => f
                .debug_struct("KeyFile")
                .field("path", path)
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
            Identity::Agent { socket } => f.debug_struct("Agent").field("socket", socket).finish(),
        }
    }
}

/// Where stdout data goes when a channel's reader falls behind by more than
/// [`TransportConfig::stdout_memory_limit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdoutSpill {
    /// Into an unlinked temporary file in this directory (`None`: the system temp dir). If
    /// the file cannot be created or written, data stays in memory (logged and counted).
    TempFile(Option<PathBuf>),
    /// Nowhere: keep everything in memory (unbounded, but counted in the stats).
    Disabled,
}

/// Everything tunable about a connection. Start from `default()` and change fields.
///
/// The defaults suit a build farm on a LAN or a WAN: fail fast on unreachable hosts, notice
/// a frozen builder within a minute, and keep one connection fast enough to move NARs at
/// several hundred MiB/s.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransportConfig {
    /// Timeout of name resolution and, separately, of the TCP connect to each resolved
    /// address. Default 10 s.
    pub tcp_connect_timeout: Duration,
    /// Timeout from TCP connected to host key verified (banner, key exchange). A listener
    /// that never sends an SSH banner fails here. Default 15 s.
    pub handshake_timeout: Duration,
    /// Timeout for authentication, all identities together. Default 15 s.
    pub auth_timeout: Duration,
    /// Send a keepalive when nothing was received for this long; `None` disables (then a
    /// silently dead peer is only noticed by TCP, possibly after hours). Default 15 s.
    /// Maps to russh `keepalive_interval`.
    pub keepalive_interval: Option<Duration>,
    /// Give up after this many unanswered keepalives in a row: a dead peer is detected within
    /// `keepalive_interval * (keepalive_max_misses + 1)`. Default 3 (so 60 s). Maps to russh
    /// `keepalive_max`; 0 would mean "never give up", so it is rejected.
    pub keepalive_max_misses: usize,
    /// Timeout for the server to confirm or refuse a channel open. Default 15 s.
    pub channel_open_timeout: Duration,
    /// Timeout for the server to accept or refuse an exec request. Default 15 s.
    pub exec_timeout: Duration,
    /// Receive window per channel. russh refills it as data *arrives*, so it only bounds
    /// what is in flight, and must cover bandwidth × RTT. Default 16 MiB.
    pub window_size: u32,
    /// Largest data packet we accept from the server. Default 65 535 bytes ("64 KiB": russh
    /// logs an error for anything above 65 535).
    pub max_packet_size: u32,
    /// Disable Nagle's algorithm on the TCP socket: request/response protocols over SSH
    /// otherwise wait up to 40 ms for delayed ACKs. Default true.
    pub nodelay: bool,
    /// Key exchange algorithms, most preferred first (RFC names). Default: curve25519 first
    /// (cheapest), then mlkem768x25519 and the rest of russh's safe list.
    pub preferred_kex: Vec<String>,
    /// Ciphers, most preferred first. Default: aes128-gcm, aes256-gcm (fast with AES-NI),
    /// then chacha20-poly1305 and the CTR modes.
    pub preferred_ciphers: Vec<String>,
    /// Messages russh buffers per channel before it blocks the connection's session task.
    /// Every channel here has a task that drains promptly, so this only absorbs scheduling
    /// jitter. Default 100 (russh's default).
    pub channel_buffer_size: usize,
    /// Bytes of unread stdout kept in memory per channel before spilling (see
    /// [`StdoutSpill`]). Default 32 MiB.
    pub stdout_memory_limit: usize,
    /// What happens to stdout above `stdout_memory_limit`. Default:
    /// `StdoutSpill::TempFile(None)`; see the crate docs for why.
    pub stdout_spill: StdoutSpill,
    /// Bytes of stderr kept per channel (the tail; older bytes are dropped). Default 64 KiB.
    pub stderr_tail_bytes: usize,
    /// When every handle of an exec channel is dropped: how long to wait for the remote
    /// command to exit (after SIGTERM, see [`ExecOptions::terminate_on_drop`]) and the server
    /// to close the channel, before sending SIGKILL and closing it ourselves. sshd holds a
    /// `MaxSessions` slot until the command has exited, so this is what frees it. Default 2 s.
    pub close_grace: Duration,
    /// Offer zlib compression (`zlib@openssh.com`, which starts after authentication, then
    /// `zlib`), as `ssh -C` and a machines file's `compress=true` ask for; the server decides.
    /// It pays on slow links with compressible data (NARs of text, uncompressed binaries) and
    /// costs CPU on fast ones. Default false.
    pub compression: bool,
    /// Authenticate in fewer round trips: the first authentication request goes out right
    /// behind the `ssh-userauth` service request instead of after its acceptance, and key
    /// files send their signed request at once instead of asking whether the key would do
    /// (RFC 4252 §7 allows both; a refused key costs the same one round trip either way).
    /// Agent keys ask first unless the same key was accepted by the same endpoint before, in
    /// this process or as [`accepted_keys_file`](Self::accepted_keys_file) remembers (an
    /// agent may ask its user to confirm every signature). Saves 2 round trips per new
    /// connection. Default true; false gives OpenSSH's client sequence (service request,
    /// query, signed request), for a server that mishandles pipelining.
    pub fast_auth: bool,
    /// The channel this connection will open first, if the caller knows (a pool opening a
    /// connection for an `ssh-ng://` session over the daemon's socket, or for an exec). With
    /// [`fast_auth`](Self::fast_auth), and when the endpoint accepted the first identity to be
    /// tried before in this process (or as [`accepted_keys_file`](Self::accepted_keys_file)
    /// remembers), its `SSH_MSG_CHANNEL_OPEN` goes out right behind the
    /// signed authentication request, so authentication and the open cost one round trip
    /// together (RFC 4252 §5.1: the server passes what follows the successful request to the
    /// connection service). The first open asked of the connection takes it if it is the
    /// same kind (and socket path); any other first open closes it unused. If the server
    /// refuses that request after all, the open is sent again once another identity
    /// succeeds (OpenSSH drops the early one); a server that ends the connection over it
    /// (Dropbear does) gets one new connection without the early open ([`connect`] only;
    /// [`connect_over`] reports the refusal). Default `None`.
    ///
    /// [`connect`]: crate::connect
    /// [`connect_over`]: crate::connect_over
    pub first_channel: Option<FirstChannel>,
    /// A file that remembers which keys endpoints accepted, across processes: loaded once per
    /// path and process, while the first connection using it exchanges keys, and updated when
    /// an endpoint accepts a key not in it or refuses one that is. Without it, that memory
    /// lasts as long as the process, so a short-lived program (one command-line run) pays
    /// for each builder's first connection what [`fast_auth`](Self::fast_auth) and
    /// [`first_channel`](Self::first_channel) otherwise save: an agent key's query and the
    /// first channel's own round trip. Plain text, one line per (host, port, user, SHA-256
    /// fingerprint of the public key), no private material; written atomically, mode 0600;
    /// the newest 4096 entries are kept. It changes how the client authenticates, never
    /// whether it trusts a host: host keys are checked as always. A file that cannot be read
    /// or written is ignored (logged), never an error. Default `None`: no file I/O.
    pub accepted_keys_file: Option<PathBuf>,
    /// How far ahead of the server's acknowledgements a channel writes, on a link whose
    /// round trip is known. `None`: as far as the server's window allows (russh's own rule).
    /// Default: [`SendAhead::default`].
    pub send_ahead: Option<SendAhead>,
}

/// A limit on the data a channel has sent and the server has not yet acknowledged (by
/// adjusting the window), below the window the server offers.
///
/// **Why.** OpenSSH's sshd keeps channel data its consumer has not taken yet (a
/// `nix-daemon` writing a NAR to disk, slower than the link) in a buffer that grows by
/// reallocation: each growth allocates the new size, copies the old buffer and zeroes it
/// (`sshbuf_allocate` and `recallocarray` in OpenSSH's `sshbuf.c`). Filling its whole window
/// (2 MiB per channel, `CHAN_SES_WINDOW_DEFAULT` in `channels.h`) that way made sshd spend
/// more CPU on page faults and copies than on forwarding, on a loopback push. The data a
/// fast link needs in flight is far less than the window; the rest then waits in our
/// process, where it costs nothing.
///
/// The limit is `max(floor, 2 × link_rate × round trip)`, the round trip being the
/// connection's shortest `keepalive@openssh.com` answer (measured by the transport shortly
/// after connecting). It applies only to OpenSSH servers, whose window adjustments
/// (`channel_check_window` in `channels.c`: as soon as more than three packets are
/// unacknowledged and some were consumed) keep a writer below the limit moving; on links
/// slow enough that the limit exceeds the server's window, it changes nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct SendAhead {
    /// The least data allowed in flight, whatever the round trip. Default 256 KiB: eight of
    /// sshd's 32 KiB packets, well above the three it waits for before acknowledging.
    pub floor: u32,
    /// The link rate the limit must sustain at the measured round trip, in bytes per second.
    /// Default 125 000 000 (1 Gbit/s).
    pub link_rate: f64,
}

impl Default for SendAhead {
    fn default() -> Self {
        SendAhead {
            floor: 256 * 1024,
            link_rate: 125e6,
        }
    }
}

impl SendAhead {
    /// The limit for a link with round trip `rtt`.
    pub fn limit(&self, rtt: Duration) -> u32 {
        let bdp = 2.0 * self.link_rate * rtt.as_secs_f64();
        if bdp.is_nan() {
            return self.floor;
        }
        if bdp >= f64::from(u32::MAX) {
            // A long round trip: more than any window.
            return u32::MAX;
        }
        // In range: checked above.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let bdp = bdp as u32;
        bdp.max(self.floor)
    }
}

/// A channel a connection will open first: see [`TransportConfig::first_channel`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FirstChannel {
    /// A session channel, for [`SshConnection::exec`](crate::SshConnection::exec).
    Session,
    /// A channel to the Unix socket at this path, for
    /// [`SshConnection::open_streamlocal`](crate::SshConnection::open_streamlocal).
    Streamlocal(String),
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            tcp_connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(15),
            auth_timeout: Duration::from_secs(15),
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max_misses: 3,
            channel_open_timeout: Duration::from_secs(15),
            exec_timeout: Duration::from_secs(15),
            window_size: 16 * 1024 * 1024,
            max_packet_size: 65_535,
            nodelay: true,
            preferred_kex: [
                "curve25519-sha256",
                "curve25519-sha256@libssh.org",
                "mlkem768x25519-sha256",
                "diffie-hellman-group-exchange-sha256",
                "diffie-hellman-group16-sha512",
                "diffie-hellman-group14-sha256",
            ]
            .map(String::from)
            .to_vec(),
            preferred_ciphers: [
                "aes128-gcm@openssh.com",
                "aes256-gcm@openssh.com",
                "chacha20-poly1305@openssh.com",
                "aes128-ctr",
                "aes256-ctr",
            ]
            .map(String::from)
            .to_vec(),
            channel_buffer_size: 100,
            stdout_memory_limit: 32 * 1024 * 1024,
            stdout_spill: StdoutSpill::TempFile(None),
            stderr_tail_bytes: 64 * 1024,
            close_grace: Duration::from_secs(2),
            compression: false,
            fast_auth: true,
            first_channel: None,
            accepted_keys_file: None,
            send_ahead: Some(SendAhead::default()),
        }
    }
}

/// Per-exec options.
#[derive(Clone)]
#[non_exhaustive]
pub struct ExecOptions {
    /// If set, stderr is also sent to a log queue holding at most this many bytes of
    /// undelivered stderr, taken with [`crate::ExecChannel::take_stderr_log`]. When the
    /// queue is full, stderr is dropped and reported in the queue
    /// ([`crate::StderrEvent::Dropped`]) and in the statistics, never waited for.
    pub stderr_log_max_bytes: Option<usize>,
    /// When the channel is dropped before the command exited, send it SIGTERM (and SIGKILL
    /// after [`TransportConfig::close_grace`]) with an SSH `signal` request. Without this,
    /// a command that does not stop on stdin EOF keeps running, and keeps its sshd session
    /// slot, until it finishes. Default true.
    pub terminate_on_drop: bool,
    /// Told of the channel's stages and of everything the server sends on it.
    pub observer: Option<Arc<dyn ChannelObserver>>,
    /// Bytes sent on the command's stdin right behind the exec request, without waiting for
    /// the server's answer: a command that reads them at start gets them a round trip
    /// earlier.
    pub first_input: Option<bytes::Bytes>,
}

impl fmt::Debug for ExecOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecOptions")
            .field("stderr_log_max_bytes", &self.stderr_log_max_bytes)
            .field("terminate_on_drop", &self.terminate_on_drop)
            .field("observer", &self.observer.as_ref().map(|_| "..."))
            .field("first_input", &self.first_input.as_ref().map(|b| b.len()))
            .finish()
    }
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            stderr_log_max_bytes: None,
            terminate_on_drop: true,
            observer: None,
            first_input: None,
        }
    }
}

impl ExecOptions {
    /// Options with a stderr log queue holding at most `max_bytes` of undelivered stderr.
    pub fn with_stderr_log(max_bytes: usize) -> Self {
        ExecOptions {
            stderr_log_max_bytes: Some(max_bytes),
            ..Self::default()
        }
    }

    /// These options, with `observer` told of the channel's stages and traffic.
    pub fn observed(mut self, observer: Arc<dyn ChannelObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Options that leave the remote command running when the channel is dropped.
    pub fn keep_running_on_drop() -> Self {
        ExecOptions {
            terminate_on_drop: false,
            ..Self::default()
        }
    }
}

impl TransportConfig {
    /// Builds the russh configuration, validating our fields. `known_host_algorithms` are
    /// the key types we hold keys for; they go first in the host-key preference so the
    /// server presents a key we can check.
    pub(crate) fn to_russh(
        &self,
        known_host_algorithms: &[Algorithm],
    ) -> Result<russh::client::Config, TransportError> {
        if self.window_size < 32 * 1024 {
            return Err(TransportError::Config(format!(
                "window_size {} is below 32 KiB",
                self.window_size
            )));
        }
        if !(1024..=65_535).contains(&self.max_packet_size) {
            return Err(TransportError::Config(format!(
                "max_packet_size {} is outside 1024..=65535",
                self.max_packet_size
            )));
        }
        if self.keepalive_interval.is_some() && self.keepalive_max_misses == 0 {
            return Err(TransportError::Config(
                "keepalive_max_misses must be at least 1 (0 would never give up)".into(),
            ));
        }
        if self.channel_buffer_size == 0 {
            return Err(TransportError::Config(
                "channel_buffer_size must be positive".into(),
            ));
        }

        let mut kex: Vec<russh::kex::Name> = Vec::new();
        for name in &self.preferred_kex {
            let n = russh::kex::Name::try_from(name.as_str()).map_err(|()| {
                TransportError::Config(format!("unknown key exchange algorithm {name:?}"))
            })?;
            kex.push(n);
        }
        if kex.is_empty() {
            return Err(TransportError::Config("preferred_kex is empty".into()));
        }
        // The pseudo-algorithms announcing extension negotiation and strict kex (the
        // Terrapin fix) travel in the kex list; they must always be there.
        kex.push(russh::kex::EXTENSION_SUPPORT_AS_CLIENT);
        kex.push(russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT);

        let mut cipher: Vec<russh::cipher::Name> = Vec::new();
        for name in &self.preferred_ciphers {
            let n = russh::cipher::Name::try_from(name.as_str())
                .map_err(|()| TransportError::Config(format!("unknown cipher {name:?}")))?;
            cipher.push(n);
        }
        if cipher.is_empty() {
            return Err(TransportError::Config("preferred_ciphers is empty".into()));
        }

        let defaults = russh::Preferred::default();
        let mut key: Vec<Algorithm> = Vec::new();
        for known in known_host_algorithms {
            for alg in defaults.key.iter() {
                let same = match (known, alg) {
                    (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
                    (a, b) => a == b,
                };
                if same && !key.contains(alg) {
                    key.push(alg.clone());
                }
            }
        }
        for alg in defaults.key.iter() {
            if !key.contains(alg) {
                key.push(alg.clone());
            }
        }

        let preferred = russh::Preferred {
            kex: Cow::Owned(kex),
            key: Cow::Owned(key),
            cipher: Cow::Owned(cipher),
            compression: if self.compression {
                Cow::Borrowed(&[
                    russh::compression::ZLIB_LEGACY,
                    russh::compression::ZLIB,
                    russh::compression::NONE,
                ])
            } else {
                Cow::Borrowed(&[russh::compression::NONE])
            },
            ..defaults
        };
        Ok(russh::client::Config {
            client_id: russh::SshId::Standard(Cow::Borrowed(concat!(
                "SSH-2.0-nixmux_",
                env!("CARGO_PKG_VERSION")
            ))),
            window_size: self.window_size,
            maximum_packet_size: self.max_packet_size,
            channel_buffer_size: self.channel_buffer_size,
            preferred,
            inactivity_timeout: None,
            keepalive_interval: self.keepalive_interval,
            keepalive_max: self.keepalive_max_misses,
            nodelay: self.nodelay,
            // A patch of ours (vendor/README.md): all three are false upstream.
            pipeline_auth_request: self.fast_auth,
            publickey_sign_at_once: self.fast_auth,
            pipeline_channel_open: self.fast_auth,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_ahead_covers_twice_the_bandwidth_delay_product_above_its_floor() {
        let s = SendAhead::default();
        // Loopback and LAN round trips: the floor.
        assert_eq!(s.limit(Duration::from_micros(100)), 256 * 1024);
        assert_eq!(s.limit(Duration::ZERO), 256 * 1024);
        assert_eq!(s.limit(Duration::from_millis(1)), 256 * 1024);
        // 10 ms at 1 Gbit/s: 1.25 MB in flight, twice.
        assert_eq!(s.limit(Duration::from_millis(10)), 2_500_000);
        // Past any window: no limit in effect.
        assert_eq!(s.limit(Duration::from_secs(100)), u32::MAX);
        let odd = SendAhead {
            floor: 1000,
            link_rate: f64::NAN,
        };
        assert_eq!(odd.limit(Duration::from_millis(10)), 1000);
        let infinite = SendAhead {
            floor: 1000,
            link_rate: f64::INFINITY,
        };
        assert_eq!(infinite.limit(Duration::from_millis(10)), u32::MAX);
    }

    #[test]
    fn defaults_translate() {
        let c = TransportConfig::default();
        let r = c.to_russh(&[Algorithm::Rsa { hash: None }]).expect("valid");
        assert_eq!(r.preferred.kex[0].as_ref(), "curve25519-sha256");
        assert_eq!(r.preferred.cipher[0].as_ref(), "aes128-gcm@openssh.com");
        assert!(
            r.preferred
                .kex
                .iter()
                .any(|k| k.as_ref() == "kex-strict-c-v00@openssh.com")
        );
        assert!(matches!(r.preferred.key[0], Algorithm::Rsa { .. }));
        assert_eq!(r.window_size, 16 * 1024 * 1024);
        assert_eq!(r.keepalive_max, 3);
    }

    #[test]
    fn rejects_unknown_names_and_zero_misses() {
        let c = TransportConfig {
            preferred_ciphers: vec!["rot13".into()],
            ..Default::default()
        };
        assert!(matches!(c.to_russh(&[]), Err(TransportError::Config(_))));
        let c = TransportConfig {
            keepalive_max_misses: 0,
            ..Default::default()
        };
        assert!(c.to_russh(&[]).is_err());
    }

    #[test]
    fn identity_debug_redacts_passphrase() {
        let id = Identity::KeyFile {
            path: "/k".into(),
            passphrase: Some("hunter2".into()),
        };
        assert!(!format!("{id:?}").contains("hunter2"));
    }
}
