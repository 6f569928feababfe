//! Bulk transfers compressed with zstd, for closures large enough and links slow enough that
//! compressing pays (issue 11, "Compression").
//!
//! The protocol sessions stay as they are; a bulk transfer runs on a channel of its own on the
//! builder's pooled connection, one-way, with the builder's `zstd` on the far end:
//!
//! * **push**: `zstd -d | nix-store --serve --write`. We send, zstd-compressed, the serve
//!   protocol's hello and one `AddToStoreNar` per path (its full metadata, then the NAR),
//!   dependencies first, and close stdin; the builder's plain stdout brings back its hello and
//!   one acknowledgement per path. `nix-store --serve` adds each path with the metadata we
//!   sent (narHash, narSize, references, deriver, signatures, content address) and checks the
//!   NAR's hash and size against it before registering it (src/nix-store/nix-store.cc
//!   `opServe`, `cmdAddToStoreNar`; src/libstore/local-store.cc `LocalStore::addToStore`,
//!   "hash mismatch importing path"). This is better than `nix-store --export | zstd` /
//!   `zstd -d | nix-store --import`: the export format carries neither signatures nor the
//!   content address, and `importPaths` holds each whole NAR in memory before adding it
//!   (src/libstore/export-import.cc).
//! * **fetch**: `nix-store --serve | zstd -c`. We send the hello and one `DumpStorePath` per
//!   path in plain text and close stdin; the compressed stdout carries the builder's hello and
//!   the NARs back to back. We decompress (bounded window), split the NARs with the NAR
//!   parser (every length bounded by the session's limits), check each one's hash and size
//!   against the metadata the builder reported over the protocol session before the transfer,
//!   and stream it into the local store (pipelined `AddToStoreNar`, which checks the hash again).
//!
//! Both directions are strictly one-way because `zstd` reads its input in whole buffers and
//! does not pass on a partial block when its input pauses: a request/response conversation
//! through it would stall.
//!
//! After a push, one batched path-info query on the lease's protocol session checks that
//! every path is valid on the builder with our narHash and narSize. The lease's session had
//! already given every path of the closure a temporary root before anything was sent (serve
//! `QueryValidPaths` with `lock`, worker `AddTempRoot`), so the builder's garbage collector
//! cannot take what the bulk channel's short-lived `nix-store` added.
//!
//! **When.** Only for transfers of at least [`BulkSettings::min_bytes`] of NAR, only when
//! the builder has `zstd` (probed once with `command -v`, remembered for 10 minutes), for
//! pushes only when the builder's Nix does not say the user is untrusted (importing unsigned
//! paths needs trust; the protocol path would be refused the same way), and with
//! [`BulkCompression::Auto`] only when the link is slower than compression: see
//! [`auto_choice`]. Anything else, including no free channel slot on the connection, falls
//! back silently to the protocol path. `nixmux ping` reports whether the builder has `zstd`
//! and what `auto` would choose.
//!
//! **Failures.** A corrupt compressed stream, a NAR that does not parse or does not match
//! its metadata, or a builder that stops acknowledging fails the operation with a typed
//! error ([`ErrorKind::Verification`] for bad data); the path being transferred is not
//! registered (the local store and the builder's `nix-store` register a path only after its
//! whole NAR arrived and matched), the bulk channel is closed (which stops the remote
//! processes), and the lease's session is discarded like after any failed operation.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nixmux_transport::{ChannelObserver, ExecChannel, ExecOptions};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::builder::{Builder, BuilderConfig};
use crate::connections::Opened;
use crate::error::{Error, ErrorKind, Result, from_session};
use crate::pool::PooledSession;
use crate::protocol::Protocol;

mod fetch;
mod push;
mod zstd_io;

pub(crate) use fetch::fetch;
pub(crate) use push::push;
pub use zstd_io::zstd_speed;

/// zstd level used on both sides: zstd's own default, several hundred MB/s per core.
const LEVEL: i32 = 3;
/// Largest zstd window we decode (16 MiB): level 3 uses at most 4 MiB (zstd's
/// `ZSTD_defaultCParameters`), so this bounds our memory without refusing honest streams.
const WINDOW_LOG_MAX: u32 = 24;
/// The SSH channel window OpenSSH's sshd gives us, which bounds an upload to one window per
/// round trip (channels.h `CHAN_SES_WINDOW_DEFAULT`, 64 packets of 32 KiB).
pub(crate) const SSHD_WINDOW: u64 = 2 << 20;
/// How long a `command -v zstd` answer is remembered.
const PROBE_TTL: Duration = Duration::from_secs(600);
/// Chunk of compressed data read or written at a time.
const CHUNK: usize = 64 << 10;
/// In-memory pipe between the decompressing side and the local store, per path.
const PIPE: usize = 1 << 20;

/// Whether bulk transfers use zstd: the `bulk-compression` store-URL parameter (nixmux's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BulkCompression {
    /// zstd when the builder has it, the user may import, and the link is slower than
    /// compression ([`auto_choice`]).
    #[default]
    Auto,
    /// zstd whenever the builder has it and the user may import, whatever the link.
    Zstd,
    /// Never: every transfer uses the protocol session.
    Off,
}

impl BulkCompression {
    /// Parses the parameter's value: `auto` (or empty), `zstd` (`yes`, `true`, `1`), `no`
    /// (`off`, `false`, `0`, `none`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "auto" => Some(BulkCompression::Auto),
            "zstd" | "yes" | "true" | "1" => Some(BulkCompression::Zstd),
            "no" | "off" | "false" | "0" | "none" => Some(BulkCompression::Off),
            _ => None,
        }
    }
}

/// How bulk transfers are chosen and run for one builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkSettings {
    /// When to use zstd.
    pub mode: BulkCompression,
    /// The `zstd` program on the builder (a name looked up in the login's PATH, or a path).
    pub zstd_program: String,
    /// Transfers with less NAR than this stay on the protocol session: opening a channel and
    /// starting two processes costs more than compression saves on them.
    pub min_bytes: u64,
}

impl Default for BulkSettings {
    fn default() -> Self {
        BulkSettings {
            mode: BulkCompression::Auto,
            zstd_program: "zstd".into(),
            min_bytes: 4 << 20,
        }
    }
}

/// What bulk transfers a builder did, and the last choice made (for tests and reports).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BulkStats {
    /// Pushes sent with zstd.
    pub pushes: u64,
    /// Fetches received with zstd.
    pub fetches: u64,
    /// Paths moved with zstd.
    pub paths: u64,
    /// NAR bytes moved with zstd.
    pub nar_bytes: u64,
    /// Compressed bytes that crossed the link for them.
    pub compressed_bytes: u64,
    /// Transfers large enough that stayed on the protocol session.
    pub fallbacks: u64,
    /// The last decision and why, e.g. `zstd: forced` or `protocol: the builder has no zstd`.
    pub last_choice: Option<String>,
}

/// Per-builder state: the probe's answer and the counters.
#[derive(Debug, Default)]
pub(crate) struct BulkState {
    probe: Mutex<Option<(Instant, bool)>>,
    rtt: Mutex<Option<(Instant, Duration)>>,
    stats: Mutex<BulkStats>,
}

impl BulkState {
    fn update(&self, f: impl FnOnce(&mut BulkStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }
}

impl Builder {
    /// What bulk transfers this builder did with zstd, and the last choice made.
    pub fn bulk_stats(&self) -> BulkStats {
        self.inner
            .bulk
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Push,
    Fetch,
}

/// Decides for [`BulkCompression::Auto`]: zstd only when the link is known to be slower than
/// compressing. One SSH channel moves at most one window per round trip, so `window / rtt`
/// bounds the link as this transfer sees it; when that bound is below zstd's speed, the link
/// is the bottleneck and every byte compression saves is time saved. On loopback or a fast
/// LAN the bound is far above zstd's speed and the protocol path is kept. The bound can
/// overestimate a link that is slow for other reasons (a thin pipe with a short round trip):
/// then zstd is not chosen although it would pay; `bulk-compression=zstd` forces it.
pub fn auto_choice(rtt: Duration, window: u64, zstd_bytes_per_sec: f64) -> (bool, String) {
    let secs = rtt.as_secs_f64().max(1e-6);
    let link = window as f64 / secs;
    let mb = |x: f64| x / 1e6;
    let why = format!(
        "link at most {:.0} MB/s (SSH window {} KiB / round trip {:.2} ms), zstd {:.0} MB/s",
        mb(link),
        window >> 10,
        secs * 1e3,
        mb(zstd_bytes_per_sec)
    );
    (link < zstd_bytes_per_sec, why)
}

/// Quotes a word for the remote shell.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The builder's `nix-store` (with its `--store`, if any), derived from the remote command:
/// `None` when the builder runs a program of its own that we cannot map to `nix-store`.
pub(crate) fn nix_store_command(config: &BuilderConfig) -> Option<(String, String)> {
    let cmd = config.remote_command.as_str();
    let (program, rest) = match config.protocol {
        Protocol::Serve => cmd.split_once(" --serve --write")?,
        Protocol::Worker => {
            let (p, rest) = cmd.split_once(" --stdio")?;
            let program = if p == "nix-daemon" {
                "nix-store".to_owned()
            } else {
                format!("{}/nix-store", p.strip_suffix("/nix-daemon")?)
            };
            return Some((program, rest.to_owned()));
        }
    };
    Some((program.to_owned(), rest.to_owned()))
}

/// Whether the builder has zstd, remembered per builder. `None`: could not ask now (no free
/// channel slot).
async fn builder_has_zstd(builder: &Builder) -> Result<Option<bool>> {
    let state = &builder.inner.bulk;
    if let Ok(p) = state.probe.lock()
        && let Some((at, has)) = *p
        && at.elapsed() < PROBE_TTL
    {
        return Ok(Some(has));
    }
    let program = &builder.config().bulk.zstd_program;
    let idle = builder.config().session.idle_timeout;
    let Some(channel) = open_exec(builder, &probe_command(program), None).await? else {
        return Ok(None);
    };
    let has = probe_on(channel, idle).await;
    if let Ok(mut p) = state.probe.lock() {
        *p = Some((Instant::now(), has));
    }
    Ok(Some(has))
}

fn probe_command(program: &str) -> String {
    format!("command -v {}", sh_quote(program))
}

/// Runs the probe on an opened channel: zstd is there if `command -v` printed something and
/// succeeded.
async fn probe_on(mut channel: ExecChannel, idle: Duration) -> bool {
    let _ = channel.stdin().shutdown().await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(idle, async {
        let mut buf = [0u8; 1024];
        loop {
            match channel.stdout().read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) if out.len() < 4096 => out.extend_from_slice(&buf[..n]),
                Ok(_) => {}
            }
        }
    })
    .await;
    if read.is_err() {
        return false;
    }
    let ok = matches!(
        tokio::time::timeout(idle, channel.exit()).await,
        Ok(Ok(status)) if status.success()
    );
    ok && !String::from_utf8_lossy(&out).trim().is_empty()
}

/// Opens an exec channel on the builder's pooled connection if one has a free slot right now
/// (never waiting: the caller holds a session of the same builder, and waiting for a second
/// slot while holding one could deadlock against other such callers).
async fn open_exec(
    builder: &Builder,
    command: &str,
    observer: Option<Arc<dyn ChannelObserver>>,
) -> Result<Option<ExecChannel>> {
    let set = &builder.inner.set;
    let Some(slot) = set.reserve_if_free() else {
        return Ok(None);
    };
    let mut options = ExecOptions::default();
    options.observer = observer.or_else(|| set.target.hooks.channel.clone());
    match slot
        .open(command, options)
        .await
        .map_err(|e| e.on(builder.name()))?
    {
        Opened::Ready(channel, ticket) => {
            ticket.release_on_close(channel.status().closed_signal());
            Ok(Some(channel))
        }
        Opened::Retry => Ok(None),
    }
}

/// Whether a transfer of `bytes` of NAR in `dir` goes through zstd; records the choice.
async fn choose(
    builder: &Builder,
    session: &mut PooledSession,
    dir: Direction,
    bytes: u64,
) -> Result<bool> {
    let settings = &builder.config().bulk;
    if settings.mode == BulkCompression::Off || bytes < settings.min_bytes.max(1) {
        return Ok(false);
    }
    let (yes, why) = decide(builder, session, dir).await?;
    builder.inner.bulk.update(|s| {
        if !yes {
            s.fallbacks += 1;
        }
        s.last_choice = Some(format!("{}: {why}", if yes { "zstd" } else { "protocol" }));
    });
    if !yes {
        tracing::debug!(builder = builder.name(), %why, "bulk transfer without zstd");
    }
    Ok(yes)
}

async fn decide(
    builder: &Builder,
    session: &mut PooledSession,
    dir: Direction,
) -> Result<(bool, String)> {
    let config = builder.config();
    if nix_store_command(config).is_none() {
        return Ok((false, "the builder runs its own remote program".into()));
    }
    if dir == Direction::Push && session.peek().conv.info().trusted == Some(false) {
        return Ok((
            false,
            "the builder does not trust this user (importing unsigned paths needs trust)".into(),
        ));
    }
    // The link first: on a fast link `auto` decides without starting anything remote.
    let why = if config.bulk.mode == BulkCompression::Zstd {
        "forced (bulk-compression=zstd)".to_owned()
    } else {
        let rtt = measure_rtt(builder, session).await?;
        let window = match dir {
            Direction::Push => SSHD_WINDOW,
            Direction::Fetch => u64::from(config.target.transport.window_size),
        };
        let (yes, why) = auto_choice(rtt, window, zstd_speed().await);
        if !yes {
            return Ok((false, why));
        }
        why
    };
    match builder_has_zstd(builder).await? {
        None => Ok((false, "no free channel for the bulk transfer".into())),
        Some(false) => Ok((false, "the builder has no zstd".into())),
        Some(true) => Ok((true, why)),
    }
}

/// How long a measured round trip is reused for `auto` decisions.
const RTT_TTL: Duration = Duration::from_secs(60);

/// The builder's round trip: the smallest of three empty requests on the lease's session,
/// remembered for a minute (so that a stream of transfers does not pay for it each time).
pub(crate) async fn measure_rtt(
    builder: &Builder,
    session: &mut PooledSession,
) -> Result<Duration> {
    if let Ok(r) = builder.inner.bulk.rtt.lock()
        && let Some((at, rtt)) = *r
        && at.elapsed() < RTT_TTL
    {
        return Ok(rtt);
    }
    let best = measure_rtt_now(builder, session).await?;
    if let Ok(mut r) = builder.inner.bulk.rtt.lock() {
        *r = Some((Instant::now(), best));
    }
    Ok(best)
}

async fn measure_rtt_now(builder: &Builder, session: &mut PooledSession) -> Result<Duration> {
    let empty = BTreeSet::new();
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        session
            .get()
            .conv
            .query_valid_paths(&empty, false)
            .await
            .map_err(|e| from_session(e).on(builder.name()))?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

/// What ping reports about bulk compression on a fresh connection.
pub(crate) async fn ping_report(
    config: &BuilderConfig,
    ssh: &nixmux_transport::SshConnection,
    trusted: Option<bool>,
    rtt: Option<Duration>,
) -> (Option<bool>, String) {
    if config.bulk.mode == BulkCompression::Off {
        // Nothing to decide: no channel spent on the probe.
        return (None, "off (bulk-compression=no)".to_owned());
    }
    let has = match ssh
        .exec_with(
            &probe_command(&config.bulk.zstd_program),
            ExecOptions::default(),
        )
        .await
    {
        Ok(ch) => probe_on(ch, config.session.idle_timeout).await,
        Err(_) => return (None, "unknown: could not run `command -v zstd`".into()),
    };
    let what = if !has {
        "off: the builder has no zstd; transfers use the protocol session".to_owned()
    } else if nix_store_command(config).is_none() {
        "off: the builder runs its own remote program".to_owned()
    } else if trusted == Some(false) {
        "fetches only: the builder does not trust this user".to_owned()
    } else if config.bulk.mode == BulkCompression::Zstd {
        format!(
            "zstd for transfers of {} KiB or more (forced)",
            config.bulk.min_bytes >> 10
        )
    } else if let Some(rtt) = rtt {
        let (yes, why) = auto_choice(rtt, SSHD_WINDOW, zstd_speed().await);
        if yes {
            format!(
                "zstd for transfers of {} KiB or more: {why}",
                config.bulk.min_bytes >> 10
            )
        } else {
            format!("auto chooses the protocol session: {why}")
        }
    } else {
        "auto (no round trip measured)".to_owned()
    };
    (Some(has), what)
}

/// A builder-side failure of a bulk transfer, typed by what its stderr says.
fn remote_failure(what: &str, stderr: &str) -> Error {
    let text = stderr.trim();
    let kind = if crate::error::is_trust_refusal(text) {
        ErrorKind::NotTrusted
    } else if text.contains("hash mismatch")
        || text.contains("size mismatch")
        // zstd's own complaints: "Decoding error (36) : Restored data doesn't match
        // checksum", "Unknown frame descriptor", "zstd: ..." (programs/fileio.c).
        || text.contains("zstd")
        || text.contains("Decoding error")
        || text.contains("frame descriptor")
        || text.contains("bad archive")
        || text.contains("not a valid")
        || text.contains("input archive")
    {
        ErrorKind::Verification
    } else {
        ErrorKind::Remote
    };
    let msg = if text.is_empty() {
        format!("{what}: the builder's zstd or nix-store stopped")
    } else {
        format!("{what}: {text}")
    };
    Error::remote(kind, msg)
}

/// Tells the idle watchdog whether we are waiting on the builder, and since when it last
/// showed life. It observes the bulk channel: anything the server sends on it (a window
/// adjustment while we upload, stderr, stdout) is progress, as for protocol sessions.
#[derive(Default)]
struct Stall {
    waiting: AtomicBool,
    since_ms: AtomicU64,
    start: OnceLock<Instant>,
    /// The builder's channel observer (stage hooks), told everything too.
    inner: Option<Arc<dyn ChannelObserver>>,
}

impl ChannelObserver for Stall {
    fn opened(&self) {
        if let Some(i) = &self.inner {
            i.opened();
        }
    }
    fn exec_accepted(&self) {
        if let Some(i) = &self.inner {
            i.exec_accepted();
        }
    }
    fn heard(&self) {
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        if let Some(i) = &self.inner {
            i.heard();
        }
    }
}

impl Stall {
    fn now_ms(&self) -> u64 {
        let start = self.start.get_or_init(Instant::now);
        u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn set(&self, waiting: bool) {
        if waiting && !self.waiting.load(Ordering::Relaxed) {
            self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        self.waiting.store(waiting, Ordering::Relaxed);
    }

    /// Resolves once we have waited on the builder for `idle` without hearing from it.
    async fn watch(&self, idle: Duration) {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self.waiting.load(Ordering::Relaxed)
                && self
                    .now_ms()
                    .saturating_sub(self.since_ms.load(Ordering::Relaxed))
                    >= idle_ms
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_off_on_loopback_and_on_across_a_wan() {
        let zstd = 300e6;
        let (yes, _) = auto_choice(Duration::from_micros(300), SSHD_WINDOW, zstd);
        assert!(!yes, "loopback");
        let (yes, _) = auto_choice(Duration::from_millis(2), SSHD_WINDOW, zstd);
        assert!(!yes, "LAN: 1 GB/s bound");
        let (yes, why) = auto_choice(Duration::from_millis(50), SSHD_WINDOW, zstd);
        assert!(yes, "50 ms: 42 MB/s bound");
        assert!(why.contains("50.00 ms"), "{why}");
    }

    #[test]
    fn parameter_values() {
        assert_eq!(BulkCompression::parse("auto"), Some(BulkCompression::Auto));
        assert_eq!(BulkCompression::parse(""), Some(BulkCompression::Auto));
        assert_eq!(BulkCompression::parse("zstd"), Some(BulkCompression::Zstd));
        assert_eq!(BulkCompression::parse("no"), Some(BulkCompression::Off));
        assert_eq!(BulkCompression::parse("xz"), None);
    }

    #[test]
    fn nix_store_from_the_remote_command() {
        use crate::target::ConnectTarget;
        use nixmux_transport::{Endpoint, HostKeyCheck, TransportConfig};
        let target = ConnectTarget {
            endpoint: Endpoint::new("h", 22, "u"),
            identities: Vec::new(),
            host_keys: HostKeyCheck::insecure_accept_any(),
            transport: TransportConfig::default(),
            jump: None,
            hooks: Default::default(),
        };
        let mut c = BuilderConfig::new("b", Protocol::Worker, target.clone());
        assert_eq!(
            nix_store_command(&c),
            Some(("nix-store".into(), String::new()))
        );
        c.remote_command = "/opt/nix/bin/nix-daemon --stdio --store /x".into();
        assert_eq!(
            nix_store_command(&c),
            Some(("/opt/nix/bin/nix-store".into(), " --store /x".into()))
        );
        c.remote_command = "my-wrapper --stdio".into();
        assert_eq!(nix_store_command(&c), None);
        let s = BuilderConfig::new("b", Protocol::Serve, target);
        assert_eq!(
            nix_store_command(&s),
            Some(("nix-store".into(), String::new()))
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("zstd"), "zstd");
        assert_eq!(sh_quote("/a b/zstd"), "'/a b/zstd'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
