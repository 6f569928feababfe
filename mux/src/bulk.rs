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

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nixmux_proto::nar::NarParser;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve::{self, Request};
use nixmux_proto::store_path::StorePath;
use nixmux_proto::wire::WireReader;
use nixmux_session::Upload;
use nixmux_transport::{ChannelObserver, ExecChannel, ExecOptions};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use crate::builder::{Builder, BuilderConfig};
use crate::connections::Opened;
use crate::error::{Error, ErrorKind, Result, from_session};
use crate::local::LocalStore;
use crate::ops::{ProgressFn, TransferProgress};
use crate::pool::PooledSession;
use crate::protocol::Protocol;

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

/// zstd's compression speed on this machine at [`LEVEL`] (input bytes per second), measured
/// once per process on 4 MiB of text-like data.
pub async fn zstd_speed() -> f64 {
    static SPEED: OnceLock<f64> = OnceLock::new();
    if let Some(s) = SPEED.get() {
        return *s;
    }
    let measured = tokio::task::spawn_blocking(|| {
        let sample = sample_data(4 << 20);
        let t = Instant::now();
        let _ = zstd::bulk::compress(&sample, LEVEL);
        sample.len() as f64 / t.elapsed().as_secs_f64().max(1e-6)
    })
    .await
    .unwrap_or(300e6);
    *SPEED.get_or_init(|| measured)
}

/// Words from a small vocabulary with numbers: compresses about like source code and logs.
fn sample_data(len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "store",
        "path",
        "derivation",
        "output",
        "the",
        "nix",
        "build",
        "/lib/",
        "0x1f",
        "return",
        "struct",
        "{\n",
        "}\n",
        "include",
        "error",
        "  ",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[usize::try_from(x % 16).unwrap_or(0)];
        out.extend_from_slice(w.as_bytes());
        if x & 0x30 == 0 {
            out.extend_from_slice(format!("{}", x % 10_000).as_bytes());
        }
        out.push(b' ');
    }
    out.truncate(len);
    out
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

// ===== push =====

/// Pushes `infos` (dependencies first, all missing on the builder) through zstd when the
/// builder and the link call for it. `Ok(false)`: not used, send them over the protocol.
pub(crate) async fn push(
    builder: &Builder,
    session: &mut PooledSession,
    local: &LocalStore,
    infos: &[PathInfo],
    progress: Option<ProgressFn>,
) -> Result<bool> {
    let bytes: u64 = infos.iter().map(|i| i.nar_size).sum();
    if !choose(builder, session, Direction::Push, bytes).await? {
        return Ok(false);
    }
    let config = builder.config();
    let name = builder.name().to_owned();
    let Some((nix_store, store)) = nix_store_command(config) else {
        return Ok(false);
    };
    let command = format!(
        "{} -d -q -c | {nix_store} --serve --write{store}",
        sh_quote(&config.bulk.zstd_program)
    );
    let stall = Arc::new(Stall {
        inner: builder.inner.set.target.hooks.channel.clone(),
        ..Stall::default()
    });
    let observer: Arc<dyn ChannelObserver> = stall.clone();
    let Some(channel) = open_exec(builder, &command, Some(observer)).await? else {
        builder.inner.bulk.update(|s| s.fallbacks += 1);
        return Ok(false);
    };
    let compressed = send_push(builder, channel, stall, local, infos, progress).await?;
    // The builder checked every NAR against the metadata we sent; this checks that what it
    // registered is what we have (and that nothing was skipped).
    let paths: BTreeSet<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    let theirs: BTreeMap<StorePath, PathInfo> = session
        .get()
        .conv
        .query_path_infos(&paths)
        .await
        .map_err(|e| from_session(e).on(&name))?
        .into_iter()
        .map(|i| (i.path.clone(), i))
        .collect();
    for info in infos {
        match theirs.get(&info.path) {
            Some(t) if t.nar_hash == info.nar_hash && t.nar_size == info.nar_size => {}
            Some(t) => {
                return Err(Error::remote(
                    ErrorKind::Verification,
                    format!(
                        "after the zstd push, the builder has {} with {} bytes, {} (we sent {} bytes, {})",
                        info.path, t.nar_size, t.nar_hash, info.nar_size, info.nar_hash
                    ),
                )
                .on(&name));
            }
            None => {
                return Err(Error::remote(
                    ErrorKind::Verification,
                    format!(
                        "after the zstd push, {} is not valid on the builder although it was acknowledged",
                        info.path
                    ),
                )
                .on(&name));
            }
        }
    }
    builder.inner.bulk.update(|s| {
        s.pushes += 1;
        s.paths += infos.len() as u64;
        s.nar_bytes += bytes;
        s.compressed_bytes += compressed;
    });
    Ok(true)
}

/// Streams the requests and NARs through the compressor into the channel, then reads the
/// acknowledgements. Returns the compressed size.
async fn send_push(
    builder: &Builder,
    channel: ExecChannel,
    stalled: Arc<Stall>,
    local: &LocalStore,
    infos: &[PathInfo],
    progress: Option<ProgressFn>,
) -> Result<u64> {
    let name = builder.name().to_owned();
    let config = builder.config();
    let idle = config.session.idle_timeout;
    let (stdin, mut stdout, status) = channel.into_parts();
    let mut sink = ZstdSink::new(stdin, stalled.clone())
        .map_err(|e| Error::local(ErrorKind::LocalStore, format!("zstd: {e}")))?;
    let total_bytes: u64 = infos.iter().map(|i| i.nar_size).sum();
    let mut lease = local.lease().await?;
    let remote_gone = |e: std::io::Error| {
        let tail = status.stderr_tail_lossy();
        remote_failure(&format!("sending the compressed stream: {e}"), &tail).on(&name)
    };
    let send = async {
        let mut head = Vec::new();
        serve::write_client_hello(&mut head, serve::OUR_VERSION);
        sink.write_all(&head).await.map_err(remote_gone)?;
        let mut done_bytes = 0u64;
        for (n, info) in infos.iter().enumerate() {
            head.clear();
            Request::AddToStoreNar { info: info.clone() }.write(
                &mut head,
                &config.store_dir,
                serve::OUR_VERSION,
            );
            sink.write_all(&head).await.map_err(remote_gone)?;
            let before = sink.raw;
            let sum = lease
                .get()
                .nar_from_path(&info.path, &mut sink, &mut |_| {})
                .await
                .map_err(|e| {
                    if sink.failed {
                        remote_gone(std::io::Error::other(from_session(e).message().to_owned()))
                    } else {
                        Error::local(
                            ErrorKind::LocalStore,
                            format!(
                                "reading {} from the local store: {}",
                                info.path,
                                from_session(e).message()
                            ),
                        )
                    }
                })?;
            if sum.nar_hash != info.nar_hash
                || sum.nar_size != info.nar_size
                || sink.raw - before != info.nar_size
            {
                return Err(Error::local(
                    ErrorKind::Verification,
                    format!(
                        "local store: the NAR of {} does not match its recorded hash or size",
                        info.path
                    ),
                ));
            }
            done_bytes += info.nar_size;
            if let Some(p) = &progress {
                p(TransferProgress {
                    paths_done: n + 1,
                    paths_total: infos.len(),
                    bytes_done: done_bytes,
                    bytes_total: total_bytes,
                });
            }
        }
        sink.shutdown().await.map_err(remote_gone)?;
        Ok::<(), Error>(())
    };
    tokio::select! {
        r = send => r?,
        () = stalled.watch(idle) => {
            return Err(Error::remote(
                ErrorKind::TimedOut,
                format!("the builder took no compressed data for {idle:?}"),
            )
            .on(&name));
        }
    }
    lease.succeeded();
    drop(lease);
    // The hello and one `u64 1` per path, then EOF when nix-store has seen ours.
    let expect = 16 + 8 * infos.len();
    let mut out = Vec::with_capacity(expect);
    // What we sent may still be on its way (a window's worth, and the last NAR's import):
    // the builder is silent only when nothing at all arrives on the channel.
    stalled.set(true);
    stalled.heard();
    let read_acks = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stdout.read(&mut buf).await.map_err(|e| {
                remote_failure(&format!("reading acknowledgements: {e}"), "").on(&name)
            })?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.len() > expect {
                return Err(Error::remote(
                    ErrorKind::Protocol,
                    "the builder's nix-store --serve answered more than the zstd push asked for",
                )
                .on(&name));
            }
            if out.len() == expect {
                break;
            }
        }
        Ok::<(), Error>(())
    };
    tokio::select! {
        r = read_acks => r?,
        () = stalled.watch(idle) => {
            return Err(Error::remote(
                ErrorKind::TimedOut,
                format!("the builder was silent for {idle:?} after the zstd push"),
            )
            .on(&name));
        }
    }
    let limits = nixmux_proto::Limits::DEFAULT;
    let mut r = WireReader::new(&out, &limits);
    let acked = serve::read_server_hello(&mut r, serve::OUR_VERSION)
        .ok()
        .map(|_| {
            let mut k = 0;
            while k < infos.len() && serve::read_ack(&mut r, "AddToStoreNar").is_ok() {
                k += 1;
            }
            k
        })
        .unwrap_or(0);
    if acked < infos.len() {
        // Let the remote finish writing its complaint.
        let _ = tokio::time::timeout(Duration::from_secs(5), status.exit()).await;
        let tail = status.stderr_tail_lossy();
        let path = &infos[acked].path;
        return Err(
            remote_failure(&format!("importing {path} from the zstd stream"), &tail).on(&name),
        );
    }
    Ok(sink.compressed)
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

/// An `AsyncWrite` that zstd-compresses into another one.
struct ZstdSink<W> {
    inner: W,
    enc: Encoder<'static>,
    out: Vec<u8>,
    pos: usize,
    /// Uncompressed bytes taken.
    raw: u64,
    /// Compressed bytes written to `inner`.
    compressed: u64,
    finished: bool,
    /// Writing to `inner` failed (the builder went away).
    failed: bool,
    stall: Arc<Stall>,
}

impl<W: AsyncWrite + Unpin> ZstdSink<W> {
    fn new(inner: W, stall: Arc<Stall>) -> std::io::Result<Self> {
        let mut enc = Encoder::new(LEVEL)?;
        // A checksum per frame: a stream corrupted in transit fails at the far end even if
        // every block still decodes.
        enc.set_parameter(zstd::stream::raw::CParameter::ChecksumFlag(true))?;
        Ok(ZstdSink {
            inner,
            enc,
            out: Vec::with_capacity(CHUNK * 2),
            pos: 0,
            raw: 0,
            compressed: 0,
            finished: false,
            failed: false,
            stall,
        })
    }

    /// Writes out what is pending.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.pos < self.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.pos..]) {
                Poll::Ready(Ok(0)) => {
                    self.failed = true;
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.stall.set(false);
                    self.pos += n;
                    self.compressed += n as u64;
                }
                Poll::Ready(Err(e)) => {
                    self.failed = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    self.stall.set(true);
                    return Poll::Pending;
                }
            }
        }
        self.out.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Runs `step` (flush or finish) until zstd has nothing more to emit, writing as it goes.
    fn poll_emit(&mut self, cx: &mut Context<'_>, finish: bool) -> Poll<std::io::Result<()>> {
        loop {
            if self.poll_drain(cx)?.is_pending() {
                return Poll::Pending;
            }
            if finish && self.finished {
                return Poll::Ready(Ok(()));
            }
            self.out.resize(CHUNK * 2, 0);
            let mut ob = OutBuffer::around(&mut self.out[..]);
            let left = if finish {
                self.enc.finish(&mut ob, true)?
            } else {
                self.enc.flush(&mut ob)?
            };
            let n = ob.pos();
            self.out.truncate(n);
            if left == 0 {
                if finish {
                    self.finished = true;
                }
                if self.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ZstdSink<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.out.resize(CHUNK * 2, 0);
        let mut ib = InBuffer::around(buf);
        let mut ob = OutBuffer::around(&mut this.out[..]);
        this.enc.run(&mut ib, &mut ob)?;
        let (used, n) = (ib.pos(), ob.pos());
        this.out.truncate(n);
        this.raw += used as u64;
        // Start sending right away; what does not fit now goes out on the next call.
        let _ = this.poll_drain(cx)?;
        Poll::Ready(Ok(used))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // A flush of the NAR writer is not a reason to end a zstd block: the far side does
        // not read before its buffer is full anyway.
        self.poll_drain(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.poll_emit(cx, true)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

// ===== fetch =====

/// Fetches `infos` (dependencies first, all missing locally, metadata from the builder's
/// protocol session) through zstd when the builder and the link call for it. `Ok(false)`:
/// not used, fetch them over the protocol.
pub(crate) async fn fetch(
    builder: &Builder,
    session: &mut PooledSession,
    local: &LocalStore,
    infos: &[PathInfo],
    progress: Option<ProgressFn>,
) -> Result<bool> {
    let bytes: u64 = infos.iter().map(|i| i.nar_size).sum();
    if !choose(builder, session, Direction::Fetch, bytes).await? {
        return Ok(false);
    }
    let config = builder.config();
    let name = builder.name().to_owned();
    let Some((nix_store, store)) = nix_store_command(config) else {
        return Ok(false);
    };
    let command = format!(
        "{nix_store} --serve{store} | {} -q -c -{LEVEL}",
        sh_quote(&config.bulk.zstd_program)
    );
    let Some(channel) = open_exec(builder, &command, None).await? else {
        builder.inner.bulk.update(|s| s.fallbacks += 1);
        return Ok(false);
    };
    let (mut stdin, stdout, status) = channel.into_parts();
    let mut requests = Vec::new();
    serve::write_client_hello(&mut requests, serve::OUR_VERSION);
    for info in infos {
        Request::DumpStorePath {
            path: info.path.clone(),
        }
        .write(&mut requests, &config.store_dir, serve::OUR_VERSION);
    }
    let idle = config.session.idle_timeout;
    let sent = async {
        stdin.write_all(&requests).await?;
        stdin.shutdown().await
    };
    match tokio::time::timeout(idle, sent).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(remote_failure(
                &format!("sending the requests: {e}"),
                &status.stderr_tail_lossy(),
            )
            .on(&name));
        }
        Err(_) => {
            return Err(Error::remote(
                ErrorKind::TimedOut,
                format!("the builder took no requests for {idle:?}"),
            )
            .on(&name));
        }
    }

    let mut writers = Vec::with_capacity(infos.len());
    let mut readers = Vec::with_capacity(infos.len());
    for _ in infos {
        let (w, r) = tokio::io::duplex(PIPE);
        writers.push(w);
        readers.push(r);
    }
    let mut lease = local.lease().await?;
    let limits = config.session.limits;
    let mut splitter = Splitter {
        infos,
        writers,
        limits,
        hello: Vec::new(),
        current: None,
        next: 0,
        progress,
        bytes_done: 0,
        bytes_total: bytes,
        name: &name,
    };
    let producer = async {
        let compressed = decompress_into(stdout, idle, &mut splitter, &name, &status).await?;
        if splitter.next < infos.len() || splitter.current.is_some() {
            let tail = status.stderr_tail_lossy();
            let at = &infos[splitter.next.min(infos.len() - 1)].path;
            return Err(remote_failure(
                &format!("the compressed stream ended before {at} was complete"),
                &tail,
            )
            .on(&name));
        }
        Ok::<u64, Error>(compressed)
    };
    let consumer = async {
        let mut uploads: Vec<Upload<'_>> = infos
            .iter()
            .zip(readers.iter_mut())
            .map(|(info, r)| Upload {
                info: PathInfo {
                    // As for protocol fetches: the builder's trust does not carry over.
                    ultimate: false,
                    ..info.clone()
                },
                nar: r,
            })
            .collect();
        lease
            .get()
            .add_to_store_nars(&mut uploads, false, true, &mut |_| {})
            .await
            .map_err(|e| {
                Error::local(
                    ErrorKind::LocalStore,
                    format!(
                        "adding fetched paths to the local store: {}",
                        from_session(e).message()
                    ),
                )
            })
    };
    // The first failure drops the other side: a half-sent NAR is never registered locally.
    let (compressed, ()) = tokio::try_join!(producer, consumer)?;
    lease.succeeded();
    builder.inner.bulk.update(|s| {
        s.fetches += 1;
        s.paths += infos.len() as u64;
        s.nar_bytes += bytes;
        s.compressed_bytes += compressed;
    });
    Ok(true)
}

/// Splits the decompressed stream (serve hello, then the NARs back to back) into the paths'
/// pipes, checking each NAR against its metadata.
struct Splitter<'a> {
    infos: &'a [PathInfo],
    writers: Vec<tokio::io::DuplexStream>,
    limits: nixmux_proto::Limits,
    hello: Vec<u8>,
    current: Option<NarParser>,
    next: usize,
    progress: Option<ProgressFn>,
    bytes_done: u64,
    bytes_total: u64,
    name: &'a str,
}

impl Splitter<'_> {
    async fn feed(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.hello.len() < 16 {
                let n = (16 - self.hello.len()).min(data.len());
                self.hello.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.hello.len() == 16 {
                    let mut r = WireReader::new(&self.hello, &self.limits);
                    serve::read_server_hello(&mut r, serve::OUR_VERSION).map_err(|e| {
                        Error::remote(
                            ErrorKind::Verification,
                            format!("the zstd stream does not start with a serve hello: {e:?}"),
                        )
                        .on(self.name)
                    })?;
                }
                continue;
            }
            if self.current.is_none() {
                if self.next >= self.infos.len() {
                    return Err(Error::remote(
                        ErrorKind::Verification,
                        "the zstd stream goes on after the last NAR",
                    )
                    .on(self.name));
                }
                self.current = Some(NarParser::new(self.limits));
            }
            let idx = self.next;
            let infos = self.infos;
            let info = &infos[idx];
            let Some(parser) = self.current.as_mut() else {
                continue;
            };
            let fed = parser.feed(data);
            let done = parser.is_done();
            let size = parser.nar_size();
            let hash = done.then(|| parser.nar_hash());
            let used = fed.map_err(|e| {
                Error::remote(
                    ErrorKind::Verification,
                    format!(
                        "the NAR of {} in the zstd stream is corrupt: {e}",
                        info.path
                    ),
                )
                .on(self.name)
            })?;
            if size > info.nar_size {
                return Err(self.mismatch(idx, size, None));
            }
            // The local store checks the hash too; ours comes first so that a bad NAR's last
            // bytes never reach it.
            if let Some(hash) = hash
                && (size != info.nar_size || hash != info.nar_hash)
            {
                return Err(self.mismatch(idx, size, Some(hash)));
            }
            let w = &mut self.writers[idx];
            w.write_all(&data[..used])
                .await
                .map_err(|e| local_gone(e, &info.path))?;
            self.bytes_done += used as u64;
            data = &data[used..];
            if done {
                w.shutdown().await.map_err(|e| local_gone(e, &info.path))?;
                self.current = None;
                self.next += 1;
            }
            if let Some(p) = &self.progress {
                p(TransferProgress {
                    paths_done: self.next,
                    paths_total: self.infos.len(),
                    bytes_done: self.bytes_done,
                    bytes_total: self.bytes_total,
                });
            }
        }
        Ok(())
    }

    fn mismatch(&self, idx: usize, size: u64, hash: Option<nixmux_proto::hash::Hash>) -> Error {
        let info = &self.infos[idx];
        Error::remote(
            ErrorKind::Verification,
            format!(
                "the NAR of {} from the zstd stream ({} bytes{}) does not match the builder's metadata ({} bytes, {})",
                info.path,
                size,
                hash.map(|h| format!(", {h}")).unwrap_or_default(),
                info.nar_size,
                info.nar_hash
            ),
        )
        .on(self.name)
    }
}

fn local_gone(e: std::io::Error, path: &StorePath) -> Error {
    Error::local(
        ErrorKind::LocalStore,
        format!("the local store stopped taking {path}: {e}"),
    )
}

/// Reads the compressed stdout to its end, decompressing into `splitter`. Returns the
/// compressed size.
async fn decompress_into(
    mut stdout: impl AsyncRead + Unpin,
    idle: Duration,
    splitter: &mut Splitter<'_>,
    name: &str,
    status: &nixmux_transport::ExecStatus,
) -> Result<u64> {
    let corrupt = |e: std::io::Error| {
        Error::remote(
            ErrorKind::Verification,
            format!("the zstd stream from the builder is corrupt: {e}"),
        )
        .on(name)
    };
    let mut dec = Decoder::new().map_err(corrupt)?;
    dec.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(WINDOW_LOG_MAX))
        .map_err(corrupt)?;
    let mut input = vec![0u8; CHUNK];
    let mut output = vec![0u8; CHUNK * 2];
    let mut compressed = 0u64;
    // Whether the last frame is complete (zstd's hint is 0 at a frame's end).
    let mut frame_done = true;
    loop {
        let n = match tokio::time::timeout(idle, stdout.read(&mut input)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                return Err(remote_failure(
                    &format!("reading the compressed stream: {e}"),
                    &status.stderr_tail_lossy(),
                )
                .on(name));
            }
            Err(_) => {
                return Err(Error::remote(
                    ErrorKind::TimedOut,
                    format!("the builder sent nothing for {idle:?} during the zstd fetch"),
                )
                .on(name));
            }
        };
        if n == 0 {
            break;
        }
        compressed += n as u64;
        let mut ib = InBuffer::around(&input[..n]);
        while ib.pos() < n {
            let mut ob = OutBuffer::around(&mut output[..]);
            let hint = dec.run(&mut ib, &mut ob).map_err(corrupt)?;
            let produced = ob.pos();
            frame_done = hint == 0;
            splitter.feed(&output[..produced]).await?;
        }
        // Drain what the decoder still holds for this input.
        loop {
            let mut ob = OutBuffer::around(&mut output[..]);
            let mut empty = InBuffer::around(&[][..]);
            let hint = dec.run(&mut empty, &mut ob).map_err(corrupt)?;
            let produced = ob.pos();
            if hint == 0 {
                frame_done = true;
            }
            if produced == 0 {
                break;
            }
            splitter.feed(&output[..produced]).await?;
        }
    }
    if !frame_done {
        return Err(remote_failure(
            "the zstd stream from the builder ended inside a frame",
            &status.stderr_tail_lossy(),
        )
        .on(name));
    }
    Ok(compressed)
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

    #[test]
    fn compressing_sink_round_trips() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let data = sample_data(3 << 20);
            let mut out = Vec::new();
            let stall = Arc::new(Stall::default());
            let mut sink = ZstdSink::new(&mut out, stall).expect("encoder");
            for chunk in data.chunks(10_000) {
                sink.write_all(chunk).await.expect("write");
            }
            sink.shutdown().await.expect("finish");
            let compressed = sink.compressed;
            drop(sink);
            assert_eq!(compressed, out.len() as u64);
            assert!(out.len() < data.len() / 2);
            assert_eq!(zstd::decode_all(&out[..]).expect("decodes"), data);
        });
    }
}
