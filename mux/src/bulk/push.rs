//! The push side of a bulk transfer: our NARs, zstd-compressed, into
//! `zstd -d | nix-store --serve --write` on the builder (see the module above).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve::{self, Request};
use nixmux_proto::store_path::StorePath;
use nixmux_proto::wire::WireReader;
use nixmux_transport::{ChannelObserver, ExecChannel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::zstd_io::ZstdSink;
use super::{Direction, Stall, choose, nix_store_command, open_exec, remote_failure, sh_quote};
use crate::builder::Builder;
use crate::error::{Error, ErrorKind, Result, from_session};
use crate::local::LocalStore;
use crate::ops::{ProgressFn, TransferProgress};
use crate::pool::PooledSession;

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
                        crate::local::read_failed(&info.path, e)
                    }
                })?;
            if sum.nar_hash != Some(info.nar_hash)
                || sum.nar_size != info.nar_size
                || sink.raw - before != info.nar_size
            {
                return Err(crate::local::nar_mismatch(&info.path));
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
