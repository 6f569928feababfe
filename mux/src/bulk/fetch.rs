//! The fetch side of a bulk transfer: `nix-store --serve | zstd -c` on the builder, split into
//! NARs here, each checked against the builder's metadata before the local store takes it.

use std::time::Duration;

use nixmux_proto::nar::NarParser;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::serve::{self, Request};
use nixmux_proto::store_path::StorePath;
use nixmux_proto::wire::WireReader;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use super::{
    CHUNK, Direction, LEVEL, PIPE, WINDOW_LOG_MAX, choose, nix_store_command, open_exec,
    remote_failure, sh_quote,
};
use crate::builder::Builder;
use crate::error::{Error, ErrorKind, Result};
use crate::local::LocalStore;
use crate::ops::{ProgressFn, TransferProgress};
use crate::pool::PooledSession;

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
    let consumer = lease.add_fetched(infos.iter(), &mut readers);
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
            let hash = parser.nar_hash().filter(|_| done);
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
