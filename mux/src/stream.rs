//! NARs streamed between the local store and one builder session, in one pipelined batch:
//! each NAR goes through a bounded in-memory pipe from the side that reads it to the side
//! that writes it (never held whole), its bytes are counted for progress as they go, and
//! every NAR is checked (against local metadata on the way out, against the builder's on the
//! way in). A one-channel transfer (`ops`) is one such batch; a parallel one (`parallel`)
//! runs several on its lanes.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use nixmux_proto::path_info::PathInfo;
use nixmux_proto::store_path::StorePath;
use nixmux_session::{NarHashing, NarSummary, NarsError, Upload};
use tokio::io::{AsyncRead, AsyncWriteExt, DuplexStream, ReadBuf};

use crate::error::{Error, ErrorKind, Result, from_session};
use crate::local::LocalStore;
use crate::nar_pipe::{ChunkReader, ChunkWriter, nar_pipe};
use crate::pool::PooledSession;

/// Progress of a transfer, reported after every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransferProgress {
    /// Paths completely transferred.
    pub paths_done: usize,
    /// Paths to transfer.
    pub paths_total: usize,
    /// NAR bytes transferred.
    pub bytes_done: u64,
    /// NAR bytes to transfer.
    pub bytes_total: u64,
}

/// A progress callback. Called on the transfer's own task: it must return quickly.
pub type ProgressFn = Arc<dyn Fn(TransferProgress) + Send + Sync>;

/// Size of a download's in-memory pipe, between the session reading a NAR from the builder
/// and the local store's session adding it (an upload's pipe is a [`nar_pipe`]).
const PIPE: usize = 1 << 20;

/// Progress of one transfer, shared by its batches (the lanes of a parallel one).
pub(crate) struct Tally {
    bytes: AtomicU64,
    paths: AtomicUsize,
    total_bytes: u64,
    total_paths: usize,
    progress: Option<ProgressFn>,
}

impl Tally {
    /// The tally of a transfer of `infos`.
    pub(crate) fn new(infos: &[PathInfo], progress: Option<ProgressFn>) -> Arc<Tally> {
        Arc::new(Tally {
            bytes: AtomicU64::new(0),
            paths: AtomicUsize::new(0),
            total_bytes: infos.iter().map(|i| i.nar_size).sum(),
            total_paths: infos.len(),
            progress,
        })
    }

    fn tick(&self) {
        if let Some(p) = &self.progress {
            p(TransferProgress {
                paths_done: self.paths.load(Ordering::Relaxed),
                paths_total: self.total_paths,
                bytes_done: self.bytes.load(Ordering::Relaxed),
                bytes_total: self.total_bytes,
            });
        }
    }

    fn path_done(&self) {
        self.paths.fetch_add(1, Ordering::Relaxed);
        self.tick();
    }
}

/// The reading end of a pipe; counts the bytes read through it.
struct Counted<R> {
    inner: R,
    tally: Arc<Tally>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.tally.bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.tally.tick();
        }
        r
    }
}

/// `n` NAR pipes for an upload: their writing ends, and their counted reading ends.
fn nar_pipes(n: usize, tally: &Arc<Tally>) -> (Vec<ChunkWriter>, Vec<Counted<ChunkReader>>) {
    (0..n)
        .map(|_| {
            let (w, r) = nar_pipe();
            let r = Counted {
                inner: r,
                tally: tally.clone(),
            };
            (w, r)
        })
        .unzip()
}

/// `n` pipes for a download: their writing ends, and their counted reading ends.
fn pipes(n: usize, tally: &Arc<Tally>) -> (Vec<DuplexStream>, Vec<Counted<DuplexStream>>) {
    (0..n)
        .map(|_| {
            let (w, r) = tokio::io::duplex(PIPE);
            let r = Counted {
                inner: r,
                tally: tally.clone(),
            };
            (w, r)
        })
        .unzip()
}

/// Sends the NARs of `infos` (dependencies first) from `local` to the builder on `session`:
/// each read from the local store's files or its daemon (`LocalLease::read_nar`), all
/// uploaded in one pipelined batch (`AddToStoreNar` back to back; framed on the worker
/// protocol).
pub(crate) async fn upload(
    local: &LocalStore,
    session: &mut PooledSession,
    infos: &[&PathInfo],
    tally: &Arc<Tally>,
    builder: &str,
) -> Result<()> {
    let (writers, mut readers) = nar_pipes(infos.len(), tally);
    let mut lease = local.lease().await?;
    let producer = async {
        for (info, mut w) in infos.iter().zip(writers) {
            lease.read_nar(info, &mut w).await?;
            let _ = w.shutdown().await;
            tally.path_done();
        }
        Ok::<(), Error>(())
    };
    let consumer = async {
        let mut uploads: Vec<Upload<'_>> = infos
            .iter()
            .zip(readers.iter_mut())
            .map(|(info, r)| Upload {
                info: PathInfo::clone(info),
                nar: r,
            })
            .collect();
        session
            .get()
            .conv
            .add_paths(&mut uploads)
            .await
            .map_err(|e| from_session(e).on(builder))
    };
    // The first failure wins and drops the other side: a producer blocked on a full pipe
    // (or a consumer waiting for bytes) must not outlive its partner. Whatever was cut off
    // half-way poisons its session, which is then closed, so the remote aborts.
    tokio::try_join!(producer, consumer)?;
    lease.succeeded();
    Ok(())
}

/// Fetches the NARs of `infos` (dependencies first, metadata from the builder) from the
/// builder on `session` into `local`: all requested at once (pipelined: a fixed number of
/// round trips whatever their number), each checked against the builder's metadata on
/// arrival, and added locally as they come.
pub(crate) async fn download(
    local: &LocalStore,
    session: &mut PooledSession,
    infos: &[&PathInfo],
    tally: &Arc<Tally>,
    builder: &str,
) -> Result<()> {
    let (mut writers, mut readers) = pipes(infos.len(), tally);
    let mut lease = local.lease().await?;
    let paths: Vec<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    let producer = async {
        let check = |k: usize, sum: NarSummary| {
            check_fetched(infos[k], &sum, builder)?;
            tally.path_done();
            Ok(())
        };
        // Not hashed here: the local store hashes each NAR and refuses one that does not
        // match the builder's record before it registers anything (`add_fetched`).
        let conv = &mut session.get().conv;
        match conv
            .nars(&paths, &mut writers, NarHashing::Skip, check)
            .await
        {
            Ok(()) => Ok::<(), Error>(()),
            Err(NarsError::Session(e)) => Err(from_session(e).on(builder)),
            Err(NarsError::Caller(e)) => Err(e),
        }
    };
    let consumer = async {
        lease
            .add_fetched(infos.iter().copied(), &mut readers)
            .await
            .map_err(|e| {
                if e.kind() == ErrorKind::Verification {
                    e.on(builder)
                } else {
                    e
                }
            })
    };
    // As in `upload`: the first failure drops the other side.
    tokio::try_join!(producer, consumer)?;
    lease.succeeded();
    Ok(())
}

/// Checks the size of a NAR fetched from `builder` against the metadata the builder reported
/// for it (its hash is the local store's to check: see `download`).
fn check_fetched(info: &PathInfo, sum: &NarSummary, builder: &str) -> Result<()> {
    if sum.nar_size == info.nar_size {
        return Ok(());
    }
    Err(Error::remote(
        ErrorKind::Verification,
        format!(
            "the NAR of {} ({} bytes) does not match the builder's metadata ({} bytes)",
            info.path, sum.nar_size, info.nar_size
        ),
    )
    .on(builder))
}
