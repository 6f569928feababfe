//! Large transfers over several SSH channels at once (issue 11, "Bulk transfer").
//!
//! **Why.** One SSH channel moves at most one window of data per round trip. OpenSSH's sshd
//! gives each session channel a fixed 2 MiB window (`CHAN_SES_WINDOW_DEFAULT` in OpenSSH's
//! channels.h), so one channel's upload is capped at 2 MiB ÷ RTT, about 20 MiB/s at 100 ms,
//! whatever the link. Our own receive window (fetches) is `TransportConfig::window_size`,
//! 16 MiB by default: 160 MiB/s at 100 ms, already above 1 Gbit/s. russh does not allocate
//! the window up front (it is a counter; what arrives goes through each channel's bounded
//! message queue and its drain task, see the transport crate), so a large window costs no
//! memory until data is actually in flight.
//!
//! **How.** The paths to move (dependencies first) are split over *lanes*: the lease's own
//! session and up to [`ParallelSettings::max_extra_lanes`] more sessions of the same builder,
//! taken from its pool only if they can be had without waiting (a caller holding a session
//! must never wait for a second one). Every lane runs on the builder's shared connection, a
//! channel each, so `n` lanes keep `n` windows in flight. Each extra lane opens its own
//! session and starts as soon as it has one, while the lease's lane is already sending: a new
//! session costs a few round trips (channel, handshake), and seven of them one after the
//! other held a 1 GiB push at 100 ms back by about two seconds.
//!
//! Nix registers a path only when every path it references is valid already
//! (`LocalStore::registerValidPaths` in Nix's src/libstore/local-store.cc looks up each
//! reference's id and fails on an invalid one), on the builder as in the local store. The
//! lanes therefore follow the closure's reference graph: a lane takes a batch of paths whose
//! references inside the transfer are all acknowledged (largest first), extended by paths
//! that depend only on acknowledged paths and paths earlier in the same batch (one session
//! handles its requests in order, so those are registered first), and sends the batch in one
//! pipelined conversation (`AddToStoreNar`s back to back, framed on the worker protocol; for
//! fetches `DumpStorePath` / `NarFromPath` into the local store's pipelined
//! `AddToStoreNar`s). A batch's paths are done when the far side acknowledged all of them.
//! Batches shrink as the transfer nears its end (a share of what is left per lane), so the
//! lanes finish together; with one lane the whole transfer is one batch, which is exactly
//! the single-session path.
//!
//! **When.** Only for at least [`ParallelSettings::min_bytes`] of NAR over at least two paths
//! (a single path cannot be split), and with [`ParallelMode::Auto`] only when one channel
//! cannot fill the link: the round trip (measured on the lease's session, as `bulk` does)
//! gives one channel's bound `window ÷ RTT`, of which a lane moves about three quarters; the
//! lanes needed are `⌈link_rate ÷ (0.75 × window ÷ RTT)⌉`, at most `1 + max_extra_lanes`. On
//! loopback or a LAN that is one lane, and nothing changes. Fetches use at most two lanes in `Auto`: while russh
//! waits for the server's answer to a key re-exchange it started (every 1 GiB), it accepts at
//! most 2 × `window_size` of channel data summed over all channels before dropping the
//! connection (see the transport crate's known limits), and two 16 MiB windows already cover
//! 1 Gbit/s up to a 260 ms round trip.
//!
//! **Safety.** Every NAR is checked as on one session: the builder's Nix checks each pushed
//! NAR against the narHash and narSize sent with it, a fetched NAR is checked against the
//! builder's metadata on arrival and again by the local store. The lease's session has
//! given every path of the closure a temporary root before anything moves (serve
//! `QueryValidPaths` with `lock`, worker `AddTempRoot`), so the builder's garbage collector
//! cannot take what another lane's session added once that session is gone; after a push,
//! one query on the lease's session checks that every path is valid. A lane that fails fails
//! the transfer with its error: the other lanes are dropped at once (dropping is safe; a
//! session cut off half-way is poisoned and closed, which stops the remote Nix), and no path
//! whose NAR did not arrive whole is registered.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use nixmux_proto::path_info::PathInfo;
use nixmux_proto::store_path::StorePath;
use serde::Serialize;
use tokio::sync::Notify;

use crate::builder::Builder;
use crate::error::{Error, ErrorKind, Result, from_session};
use crate::local::LocalStore;
use crate::pool::PooledSession;
use crate::stream::{self, ProgressFn, Tally};

/// Whether large transfers use several channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParallelMode {
    /// When one channel's window cannot fill [`ParallelSettings::link_rate`] at the measured
    /// round trip.
    #[default]
    Auto,
    /// Always `1 + max_extra_lanes` lanes (as many as can be had without waiting), whatever
    /// the link: for tests and measurements.
    Always,
}

/// How large transfers are split over channels, per builder.
#[derive(Debug, Clone, PartialEq)]
pub struct ParallelSettings {
    /// When to use more than one lane.
    pub mode: ParallelMode,
    /// Most sessions used besides the lease's own; 0 disables parallel transfers. Each is a
    /// channel (and, unless it goes to the daemon's socket, a remote Nix process and one of
    /// sshd's `MaxSessions`), and counts against the builder's `max_sessions`.
    pub max_extra_lanes: usize,
    /// Transfers with less NAR than this use one lane: a few round trips of scheduling cost
    /// more than a second window saves.
    pub min_bytes: u64,
    /// The link rate (bytes per second) the lanes should be able to fill in `Auto`. Lanes on
    /// a slower link cost a channel each and nothing else. Default 1 Gbit/s.
    pub link_rate: f64,
}

impl Default for ParallelSettings {
    fn default() -> Self {
        ParallelSettings {
            mode: ParallelMode::Auto,
            max_extra_lanes: 7,
            min_bytes: 16 << 20,
            link_rate: 125e6,
        }
    }
}

/// What parallel transfers a builder did (for tests and reports).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ParallelStats {
    /// Pushes that ran on more than one lane.
    pub pushes: u64,
    /// Fetches that ran on more than one lane.
    pub fetches: u64,
    /// Extra sessions used, summed over those transfers.
    pub extra_sessions: u64,
    /// Lanes of the last parallel transfer.
    pub last_lanes: usize,
    /// Batches sent, summed over every lane of those transfers.
    pub batches: u64,
    /// The last decision and why, e.g. `5 lanes: one channel at most 21 MB/s (...)`.
    pub last_choice: Option<String>,
}

/// Per-builder counters.
#[derive(Debug, Default)]
pub(crate) struct ParallelState {
    stats: Mutex<ParallelStats>,
}

impl ParallelState {
    fn update(&self, f: impl FnOnce(&mut ParallelStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    /// A transfer that ran on `lanes` lanes. One whose extra lanes all went without a session
    /// ran on one, like any other transfer: not counted.
    fn record(&self, dir: Direction, lanes: usize, batches: u64) {
        if lanes < 2 {
            return;
        }
        self.update(|s| {
            match dir {
                Direction::Push => s.pushes += 1,
                Direction::Fetch => s.fetches += 1,
            }
            s.extra_sessions += (lanes - 1) as u64;
            s.last_lanes = lanes;
            s.batches += batches;
        });
    }
}

impl Builder {
    /// What transfers of this builder used several channels, and the last choice made.
    pub fn parallel_stats(&self) -> ParallelStats {
        self.inner
            .parallel
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

/// Which way the NARs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Push,
    Fetch,
}

/// What a lane moves of its `window ÷ RTT` bound, measured at 100 ms / 1 Gbit/s
/// (docs/benchmarks.md, "parallel channels"): sshd tops a window up only once half of it was
/// consumed, and each batch waits one round trip for its acknowledgements.
const LANE_EFFICIENCY: f64 = 0.75;

/// Lanes wanted for a link: one channel moves at most `window` per `rtt` (in practice
/// [`LANE_EFFICIENCY`] of that), so filling `link_rate` takes
/// `⌈link_rate × rtt ÷ (window × efficiency)⌉` channels, clamped to `1..=max_lanes`. Returns
/// the lanes and why.
pub fn lanes_for(rtt: Duration, window: u64, link_rate: f64, max_lanes: usize) -> (usize, String) {
    let secs = rtt.as_secs_f64().max(1e-6);
    let per_lane = window.max(1) as f64 / secs * LANE_EFFICIENCY;
    let want = (link_rate / per_lane).ceil().max(1.0);
    // Counted up rather than cast: `want` may be huge (a tiny window) or NaN.
    let lanes = (1..max_lanes)
        .find(|&n| n as f64 >= want)
        .unwrap_or(max_lanes)
        .max(1);
    let why = format!(
        "one channel at most {:.0} MB/s (window {} KiB / round trip {:.2} ms), link {:.0} MB/s",
        per_lane / 1e6,
        window >> 10,
        secs * 1e3,
        link_rate / 1e6
    );
    (lanes, why)
}

/// How many lanes a transfer of `infos` gets (1: the single-session path).
async fn plan_lanes(
    builder: &Builder,
    session: &mut PooledSession,
    dir: Direction,
    infos: &[PathInfo],
) -> Result<usize> {
    let settings = &builder.config().parallel;
    let bytes: u64 = infos.iter().map(|i| i.nar_size).sum();
    if settings.max_extra_lanes == 0 || infos.len() < 2 || bytes < settings.min_bytes {
        return Ok(1);
    }
    let max = 1 + settings.max_extra_lanes;
    let (lanes, why) = match settings.mode {
        ParallelMode::Always => (max, "forced (parallel mode always)".to_owned()),
        ParallelMode::Auto => {
            let rtt = crate::bulk::measure_rtt(builder, session).await?;
            let (window, cap) = match dir {
                Direction::Push => (crate::bulk::SSHD_WINDOW, max),
                Direction::Fetch => (
                    u64::from(builder.config().target.transport.window_size),
                    max.min(2),
                ),
            };
            lanes_for(rtt, window, settings.link_rate, cap)
        }
    };
    let lanes = lanes.min(infos.len());
    builder.inner.parallel.update(|s| {
        let plural = if lanes == 1 { "" } else { "s" };
        s.last_choice = Some(format!("{lanes} lane{plural}: {why}"));
    });
    tracing::debug!(builder = builder.name(), lanes, %why, "parallel transfer plan");
    Ok(lanes)
}

/// Another session of the builder for a lane, only if it can be had without waiting for
/// the pool (opening one still takes its round trips). `None`: one lane fewer; the transfer
/// goes on with the others.
async fn extra_session(builder: &Builder) -> Option<PooledSession> {
    match builder.inner.pool.try_acquire().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(builder = builder.name(), error = %e, "no extra session for a parallel transfer");
            None
        }
    }
}

// ===== scheduling =====

/// What a lane gets from the scheduler.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    /// Send these (indices into the transfer, in order).
    Batch(Vec<usize>),
    /// Nothing is ready: wait for another lane's batch to finish.
    Wait,
    /// Everything is started.
    Finished,
}

#[derive(Debug)]
struct DagState {
    started: Vec<bool>,
    done: Vec<bool>,
    unstarted: usize,
    unstarted_bytes: u64,
    in_flight: usize,
    /// Lanes sharing the work (a batch is a share of what is left per lane).
    lanes: usize,
}

/// The reference graph of a transfer and what is started and acknowledged.
#[derive(Debug)]
struct Dag {
    sizes: Vec<u64>,
    /// For each path, the paths of the transfer it references (never itself).
    deps: Vec<Vec<usize>>,
    state: Mutex<DagState>,
    changed: Notify,
}

impl Dag {
    /// `infos` in dependency order (references first).
    fn new(infos: &[PathInfo], lanes: usize) -> Dag {
        let index: BTreeMap<&StorePath, usize> = infos
            .iter()
            .enumerate()
            .map(|(i, p)| (&p.path, i))
            .collect();
        let deps: Vec<Vec<usize>> = infos
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut d: Vec<usize> = p
                    .references
                    .iter()
                    .filter_map(|r| index.get(r).copied())
                    .filter(|&j| j != i)
                    .collect();
                d.sort_unstable();
                d.dedup();
                d
            })
            .collect();
        let sizes: Vec<u64> = infos.iter().map(|i| i.nar_size).collect();
        let n = infos.len();
        Dag {
            state: Mutex::new(DagState {
                started: vec![false; n],
                done: vec![false; n],
                unstarted: n,
                unstarted_bytes: sizes.iter().sum(),
                in_flight: 0,
                lanes: lanes.max(1),
            }),
            sizes,
            deps,
            changed: Notify::new(),
        }
    }

    fn take(&self) -> Result<Take> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| Error::local(ErrorKind::Protocol, "the transfer scheduler failed"))?;
        if st.unstarted == 0 {
            return Ok(Take::Finished);
        }
        let n = self.sizes.len();
        // A share of what is left per lane: large batches early (fewer round trips waiting
        // for acknowledgements), small ones at the end (the lanes finish together).
        let budget = if st.lanes == 1 {
            u64::MAX
        } else {
            (st.unstarted_bytes / (2 * st.lanes as u64)).max(1)
        };
        let mut ready: Vec<usize> = (0..n)
            .filter(|&i| !st.started[i] && self.deps[i].iter().all(|&d| st.done[d]))
            .collect();
        if ready.is_empty() {
            if st.in_flight == 0 {
                return Err(Error::local(
                    ErrorKind::InvalidInput,
                    "the paths to transfer reference each other in a cycle",
                ));
            }
            return Ok(Take::Wait);
        }
        ready.sort_by(|&a, &b| self.sizes[b].cmp(&self.sizes[a]).then(a.cmp(&b)));
        let mut in_batch = vec![false; n];
        let mut bytes = 0u64;
        for (count, i) in ready.into_iter().enumerate() {
            if count > 0 && bytes >= budget {
                break;
            }
            in_batch[i] = true;
            bytes += self.sizes[i];
        }
        // Paths that depend only on acknowledged ones and on paths before them in this batch:
        // the lane's session registers its batch in order.
        for i in 0..n {
            if bytes >= budget {
                break;
            }
            if !st.started[i]
                && !in_batch[i]
                && self.deps[i].iter().all(|&d| st.done[d] || in_batch[d])
            {
                in_batch[i] = true;
                bytes += self.sizes[i];
            }
        }
        let batch: Vec<usize> = (0..n).filter(|&i| in_batch[i]).collect();
        for &i in &batch {
            st.started[i] = true;
        }
        st.unstarted -= batch.len();
        st.unstarted_bytes -= bytes;
        st.in_flight += 1;
        Ok(Take::Batch(batch))
    }

    /// A lane that was counted on will not run (it got no session): the others' batches
    /// grow accordingly, up to the whole rest in one batch for a lane left alone.
    fn lane_lost(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.lanes = st.lanes.saturating_sub(1).max(1);
        }
    }

    /// A batch was acknowledged.
    fn finish(&self, batch: &[usize]) {
        if let Ok(mut st) = self.state.lock() {
            for &i in batch {
                st.done[i] = true;
            }
            st.in_flight = st.in_flight.saturating_sub(1);
        }
        self.changed.notify_waiters();
    }
}

/// Everything a lane needs besides its session.
#[derive(Clone, Copy)]
struct Job<'a> {
    dir: Direction,
    dag: &'a Dag,
    local: &'a LocalStore,
    infos: &'a [PathInfo],
    tally: &'a Arc<Tally>,
    name: &'a str,
}

/// Runs one lane: takes batches and sends them on `session` until everything is started;
/// returns the number of batches it sent.
async fn lane(job: Job<'_>, session: &mut PooledSession) -> Result<u64> {
    let mut batches = 0;
    loop {
        // Registered before looking, so a batch finishing in between still wakes us.
        let changed = job.dag.changed.notified();
        match job.dag.take()? {
            Take::Finished => return Ok(batches),
            Take::Wait => changed.await,
            Take::Batch(batch) => {
                match job.dir {
                    Direction::Push => push_batch(session, job, &batch).await?,
                    Direction::Fetch => fetch_batch(session, job, &batch).await?,
                }
                batches += 1;
                job.dag.finish(&batch);
            }
        }
    }
}

/// A running lane: what it returns is how many lanes ran (1, or 0 for one that got no
/// session) and how many batches it sent.
type LaneFuture<'a> = Pin<Box<dyn Future<Output = Result<(usize, u64)>> + Send + 'a>>;

/// Runs a transfer on the lease's session and on up to `extra` more, each opened by its own
/// lane while the others already send: opened one after the other they would hold the
/// transfer back by a few round trips each (channel open, handshake), seconds on a long link.
/// An extra session goes back to the pool only if its lane completed. Returns the lanes that
/// ran and the batches sent.
async fn run_lanes(
    builder: &Builder,
    job: Job<'_>,
    session: &mut PooledSession,
    extra: usize,
) -> Result<(usize, u64)> {
    let mut futs: Vec<LaneFuture<'_>> = Vec::new();
    futs.push(Box::pin(async move { Ok((1, lane(job, session).await?)) }));
    for _ in 0..extra {
        futs.push(Box::pin(async move {
            let Some(mut s) = extra_session(builder).await else {
                job.dag.lane_lost();
                return Ok((0, 0));
            };
            let n = lane(job, &mut s).await?;
            s.succeeded();
            Ok((1, n))
        }));
    }
    all_lanes(futs).await
}

/// Runs every lane at once; the first failure wins and drops the others. Sums what they
/// return (lanes that ran, batches).
async fn all_lanes<'a>(mut lanes: Vec<LaneFuture<'a>>) -> Result<(usize, u64)> {
    let mut finished = vec![false; lanes.len()];
    let mut total = (0, 0);
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, lane) in lanes.iter_mut().enumerate() {
            if finished[i] {
                continue;
            }
            match lane.as_mut().poll(cx) {
                Poll::Ready(Ok((ran, n))) => {
                    finished[i] = true;
                    total.0 += ran;
                    total.1 += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(total))
        }
    })
    .await
}

// ===== progress =====

/// Runs a transfer of `infos` over the lease's `session` and the extra sessions it gets, when
/// the transfer and the link call for more than one lane. Returns the lanes and batches used,
/// or `None` when one lane will do (the caller sends everything over `session` as usual).
async fn transfer(
    builder: &Builder,
    session: &mut PooledSession,
    local: &LocalStore,
    infos: &[PathInfo],
    progress: Option<ProgressFn>,
    dir: Direction,
) -> Result<Option<(usize, u64)>> {
    let want = plan_lanes(builder, session, dir, infos).await?;
    if want < 2 {
        return Ok(None);
    }
    let name = builder.name().to_owned();
    let dag = Dag::new(infos, want);
    let tally = Tally::new(infos, progress);
    let job = Job {
        dir,
        dag: &dag,
        local,
        infos,
        tally: &tally,
        name: &name,
    };
    let (lanes, batches) = run_lanes(builder, job, session, want - 1).await?;
    Ok(Some((lanes, batches)))
}

// ===== push =====

/// Pushes `infos` (dependencies first, all missing on the builder, the whole closure
/// protected by `session`) over several lanes when the transfer and the link call for it.
/// `Ok(false)`: one lane; send them over `session` as usual.
pub(crate) async fn push(
    builder: &Builder,
    session: &mut PooledSession,
    local: &LocalStore,
    infos: &[PathInfo],
    progress: Option<ProgressFn>,
) -> Result<bool> {
    let Some((lanes, batches)) =
        transfer(builder, session, local, infos, progress, Direction::Push).await?
    else {
        return Ok(false);
    };
    let name = builder.name();
    // Each NAR was checked by the builder's Nix against what we sent with it; this checks
    // that nothing was skipped, on the session that protects the closure.
    let paths: BTreeSet<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    let valid = session
        .get()
        .conv
        .query_valid_paths(&paths, false)
        .await
        .map_err(|e| from_session(e).on(name))?;
    if let Some(missing) = paths.iter().find(|p| !valid.contains(*p)) {
        return Err(Error::remote(
            ErrorKind::Verification,
            format!("after the parallel push, {missing} is not valid on the builder although it was acknowledged"),
        )
        .on(name));
    }
    builder
        .inner
        .parallel
        .record(Direction::Push, lanes, batches);
    Ok(true)
}

/// Sends one batch on one lane: NARs read from the local store stream through pipes into the
/// lane's pipelined upload.
async fn push_batch(session: &mut PooledSession, job: Job<'_>, batch: &[usize]) -> Result<()> {
    let infos: Vec<&PathInfo> = batch.iter().map(|&i| &job.infos[i]).collect();
    stream::upload(job.local, session, &infos, job.tally, job.name).await
}

// ===== fetch =====

/// Fetches `infos` (dependencies first, all missing locally, metadata from the builder) over
/// several lanes when the transfer and the link call for it. `Ok(false)`: one lane; fetch
/// them over `session` as usual.
pub(crate) async fn fetch(
    builder: &Builder,
    session: &mut PooledSession,
    local: &LocalStore,
    infos: &[PathInfo],
    progress: Option<ProgressFn>,
) -> Result<bool> {
    let Some((lanes, batches)) =
        transfer(builder, session, local, infos, progress, Direction::Fetch).await?
    else {
        return Ok(false);
    };
    builder
        .inner
        .parallel
        .record(Direction::Fetch, lanes, batches);
    Ok(true)
}

/// Receives one batch on one lane: the builder's NARs, pipelined, each checked against the
/// builder's metadata on arrival, stream into the local store's pipelined `AddToStoreNar`s.
async fn fetch_batch(session: &mut PooledSession, job: Job<'_>, batch: &[usize]) -> Result<()> {
    let infos: Vec<&PathInfo> = batch.iter().map(|&i| &job.infos[i]).collect();
    stream::download(job.local, session, &infos, job.tally, job.name).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixmux_proto::store_path::StoreDir;

    fn sp(name: &str) -> StorePath {
        // A valid hash part (nix32 letters) per name.
        let c = match name.len() {
            1 => 'a',
            2 => 'b',
            3 => 'c',
            4 => 'd',
            _ => 'f',
        };
        StorePath::parse(
            &StoreDir::default(),
            &format!("/nix/store/{}-{name}", c.to_string().repeat(32)),
        )
        .expect("path")
    }

    fn info(name: &str, size: u64, refs: &[&str]) -> PathInfo {
        let mut references: BTreeSet<StorePath> = refs.iter().map(|r| sp(r)).collect();
        // Self-references are common and must not block a path.
        references.insert(sp(name));
        PathInfo {
            path: sp(name),
            deriver: None,
            nar_hash: nixmux_proto::hash::Hash::sha256_of(name.as_bytes()),
            references,
            registration_time: 0,
            nar_size: size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }

    #[test]
    fn lanes_follow_the_bandwidth_delay_product() {
        let w = 2 << 20;
        // Loopback: one lane.
        assert_eq!(lanes_for(Duration::from_micros(200), w, 125e6, 5).0, 1);
        // 100 ms at 1 Gbit/s: 12.5 MB in flight, 2 MiB per channel of which a lane moves
        // three quarters: 8, capped at 5.
        assert_eq!(lanes_for(Duration::from_millis(100), w, 125e6, 5).0, 5);
        assert_eq!(lanes_for(Duration::from_millis(100), w, 125e6, 9).0, 8);
        // 10 ms: 1.25 MB in flight: one channel suffices.
        assert_eq!(lanes_for(Duration::from_millis(10), w, 125e6, 5).0, 1);
        // Our 16 MiB receive window covers 100 ms at 1 Gbit/s.
        assert_eq!(
            lanes_for(Duration::from_millis(100), 16 << 20, 125e6, 2).0,
            1
        );
        assert_eq!(
            lanes_for(Duration::from_millis(200), 16 << 20, 125e6, 2).0,
            2
        );
    }

    fn run_all(dag: &Dag, order: &mut Vec<Vec<usize>>) {
        // Take everything one batch at a time, acknowledging at once.
        loop {
            match dag.take().expect("take") {
                Take::Finished => break,
                Take::Wait => panic!("nothing in flight, nothing ready"),
                Take::Batch(b) => {
                    dag.finish(&b);
                    order.push(b);
                }
            }
        }
    }

    #[test]
    fn one_lane_sends_everything_in_one_batch() {
        let infos = vec![
            info("a", 10, &[]),
            info("b", 10, &["a"]),
            info("c", 10, &["b"]),
        ];
        let dag = Dag::new(&infos, 1);
        let mut order = Vec::new();
        run_all(&dag, &mut order);
        assert_eq!(order, vec![vec![0, 1, 2]]);
    }

    #[test]
    fn lanes_that_get_no_session_leave_their_share_to_the_others() {
        let infos: Vec<PathInfo> = (0..8).map(|i| info(&format!("p{i}"), 10, &[])).collect();
        // Four lanes planned: a batch is an eighth of what is left.
        let dag = Dag::new(&infos, 4);
        let Take::Batch(first) = dag.take().expect("take") else {
            panic!("a batch")
        };
        assert_eq!(first.len(), 1);
        dag.finish(&first);
        // Three extra lanes got no session: the lease's lane, alone, sends the rest at once.
        for _ in 0..3 {
            dag.lane_lost();
        }
        let mut order = Vec::new();
        run_all(&dag, &mut order);
        assert_eq!(order, vec![(1..8).collect::<Vec<_>>()]);
    }

    #[test]
    fn references_are_acknowledged_before_a_path_starts_on_another_batch() {
        // Fan-out: a <- {b, c, d}; e depends on b and c.
        let infos = vec![
            info("a", 100, &[]),
            info("bb", 100, &["a"]),
            info("ccc", 100, &["a"]),
            info("dddd", 100, &["a"]),
            info("eeeee", 100, &["bb", "ccc"]),
        ];
        let dag = Dag::new(&infos, 4);
        // Budget 500 / 8 = 62: one path per batch.
        let first = dag.take().expect("take");
        assert_eq!(first, Take::Batch(vec![0]));
        // a is in flight: nobody else may start.
        assert_eq!(dag.take().expect("take"), Take::Wait);
        dag.finish(&[0]);
        let mut got = Vec::new();
        for _ in 0..3 {
            match dag.take().expect("take") {
                Take::Batch(b) => got.extend(b),
                other => panic!("{other:?}"),
            }
        }
        got.sort_unstable();
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(dag.take().expect("take"), Take::Wait);
        dag.finish(&[1]);
        assert_eq!(dag.take().expect("take"), Take::Wait);
        dag.finish(&[2]);
        assert_eq!(dag.take().expect("take"), Take::Batch(vec![4]));
        dag.finish(&[3]);
        dag.finish(&[4]);
        assert_eq!(dag.take().expect("take"), Take::Finished);
    }

    #[test]
    fn a_batch_takes_the_largest_ready_paths_and_their_dependents() {
        let infos = vec![
            info("a", 10, &[]),
            info("bb", 1000, &[]),
            info("ccc", 10, &["bb"]),
            info("dddd", 10, &["a"]),
        ];
        // Budget 1030 / 4 = 257: the largest ready path alone reaches it.
        let dag = Dag::new(&infos, 2);
        assert_eq!(dag.take().expect("take"), Take::Batch(vec![1]));
        // Then 30 / 4 = 7: a, and then nothing more.
        assert_eq!(dag.take().expect("take"), Take::Batch(vec![0]));
        assert_eq!(dag.take().expect("take"), Take::Wait);
        dag.finish(&[1]);
        dag.finish(&[0]);
        let mut order = Vec::new();
        run_all(&dag, &mut order);
        let all: BTreeSet<usize> = order.into_iter().flatten().collect();
        assert_eq!(all, BTreeSet::from([2, 3]));
    }
}
