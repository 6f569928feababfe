//! Byte-level hostile peers below SSH: a server that trickles its identification (or a
//! whole key exchange) one byte at a time, and a proxy in front of a real server that cuts
//! the server's stream after a chosen number of bytes (in the middle of an SSH packet).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A listener that aborts its accept loop (and every connection task) when dropped.
#[derive(Debug)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A "slowloris" server: on every connection it sends `prefix` one byte every `interval`,
/// then keeps the connection open without sending anything more, reading and discarding
/// what the client sends.
#[derive(Debug)]
pub struct Trickle {
    addr: SocketAddr,
    _tasks: Tasks,
}

impl Trickle {
    /// Starts it on `127.0.0.1:0`.
    pub async fn start(prefix: Vec<u8>, interval: Duration) -> std::io::Result<Trickle> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let prefix = Arc::new(prefix);
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let prefix = prefix.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let (mut rd, mut wr) = tcp.into_split();
                    // Drain the client's bytes so its writes never block.
                    let drain = tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
                    });
                    for b in prefix.iter() {
                        if wr.write_all(&[*b]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(interval).await;
                    }
                    let _ = drain.await;
                });
            }
        });
        Ok(Trickle {
            addr,
            _tasks: Tasks(vec![accept]),
        })
    }

    /// An identification line that never ends: `SSH-2.0-` and then `x` for ever (up to a
    /// megabyte, far beyond anything a test waits for).
    pub fn endless_identification() -> Vec<u8> {
        let mut v = b"SSH-2.0-".to_vec();
        v.resize(1 << 20, b'x');
        v
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A TCP proxy in front of `upstream` that forwards both directions and, once the server
/// has sent [`CutProxy::cut_after`] bytes in total on a connection, sends exactly up to that
/// byte and closes both sockets.
#[derive(Debug)]
pub struct CutProxy {
    addr: SocketAddr,
    cut_at: Arc<AtomicU64>,
    server_bytes: Arc<AtomicU64>,
    _tasks: Tasks,
}

impl CutProxy {
    /// Starts it on `127.0.0.1:0`, forwarding to `upstream`, not cutting.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut_at = Arc::new(AtomicU64::new(u64::MAX));
        let server_bytes = Arc::new(AtomicU64::new(0));
        let (cut, count) = (cut_at.clone(), server_bytes.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (cut, count) = (cut.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut crd, mut cwr) = client.into_split();
                    let (mut srd, mut swr) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut crd, &mut swr).await;
                    });
                    count.store(0, Ordering::SeqCst);
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match srd.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n as u64,
                        };
                        let sent = count.load(Ordering::SeqCst);
                        let limit = cut.load(Ordering::SeqCst);
                        let allowed = limit.saturating_sub(sent).min(n);
                        let allowed_usize = usize::try_from(allowed).unwrap_or(buf.len());
                        if allowed_usize > 0 && cwr.write_all(&buf[..allowed_usize]).await.is_err()
                        {
                            break;
                        }
                        count.fetch_add(allowed, Ordering::SeqCst);
                        if allowed < n {
                            break;
                        }
                    }
                    // Dropping both halves of both sockets closes them: the client sees EOF
                    // right after the partial packet.
                    up.abort();
                });
            }
        });
        Ok(CutProxy {
            addr,
            cut_at,
            server_bytes,
            _tasks: Tasks(vec![accept]),
        })
    }

    /// The proxy's address (connect here instead of the server).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cut the latest connection once the server has sent `n` bytes on it in total (if it
    /// already has, at the next byte it sends).
    pub fn cut_after(&self, n: u64) {
        self.cut_at.store(n, Ordering::SeqCst);
    }

    /// Bytes forwarded from the server on the latest connection.
    pub fn server_bytes(&self) -> u64 {
        self.server_bytes.load(Ordering::SeqCst)
    }
}
