//! An emulated WAN link: a TCP relay in this process that delays every byte by half the
//! round-trip time in each direction and limits the rate with a token bucket (this kernel has
//! no netem). It can also stall on demand ([`Relay::stall`]): a link that stops delivering
//! in one or both directions, as a frozen peer or a black-holed route looks from the other
//! end, while every TCP connection stays open.
//!
//! Each direction of each relayed connection is a queue, not a sleep per read: a reader task
//! stamps every chunk with the instant its last byte leaves the emulated link (the token
//! bucket serialises chunks at the configured rate, allowing a small burst) plus the one-way
//! delay, and a writer task delivers chunks at those instants, in order. Chunks therefore
//! overlap in flight as on a real link (a 50 ms RTT does not cap throughput at one chunk per
//! 50 ms), and a bulk transfer that outruns the rate builds a queue whose delay is bounded
//! ([`MAX_QUEUE_DELAY`]); beyond it the relay stops reading, so TCP backpressure reaches the
//! sender, as a router's finite buffer would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Largest chunk read at once (about one TCP segment train).
const CHUNK: usize = 16 * 1024;
/// Longest queueing delay before the relay stops reading from the sender.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_millis(50);
/// Chunks in flight per direction (bounds memory: 4096 × 16 KiB = 64 MiB at most).
const IN_FLIGHT: usize = 4096;
/// How long to wait for the real server's TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The link: added round trip and rate limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Added round-trip time (half each direction).
    pub rtt: Duration,
    /// Bytes per second per direction (`None`: unlimited).
    pub rate: Option<f64>,
}

impl Link {
    /// A link of `rtt_ms` milliseconds and `mbit` Mbit/s (0 or less: unlimited).
    pub fn new(rtt_ms: f64, mbit: f64) -> Self {
        Link {
            rtt: Duration::from_secs_f64(rtt_ms.max(0.0) / 1e3),
            rate: (mbit > 0.0).then_some(mbit * 1e6 / 8.0),
        }
    }
}

/// A token bucket that may go into debt: the debt is the queue in front of the link.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` bytes per second, up to `burst` bytes at once.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` bytes' worth of tokens at `now`; returns when the last of them leaves.
    pub fn reserve(&mut self, n: usize, now: Instant) -> Instant {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Which directions of a relay deliver nothing for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stall {
    /// Everything flows.
    #[default]
    None,
    /// Client to server bytes are held.
    Upstream,
    /// Server to client bytes are held.
    Downstream,
    /// Nothing is delivered either way.
    Both,
}

impl Stall {
    fn holds(self, upstream: bool) -> bool {
        match self {
            Stall::None => false,
            Stall::Both => true,
            Stall::Upstream => upstream,
            Stall::Downstream => !upstream,
        }
    }
}

/// Byte counters of a relay.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Connections relayed.
    pub connections: AtomicU64,
    /// Bytes client to server.
    pub up: AtomicU64,
    /// Bytes server to client.
    pub down: AtomicU64,
}

/// A running relay; dropping it stops it and every connection through it.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    counters: Arc<RelayCounters>,
    stall: Arc<watch::Sender<Stall>>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Listens on 127.0.0.1 (a free port) and relays every connection to `target` over
    /// `link`.
    ///
    /// # Errors
    /// The listener cannot be bound.
    pub async fn start(target: SocketAddr, link: Link) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(RelayCounters::default());
        let c = counters.clone();
        let stall = Arc::new(watch::Sender::new(Stall::None));
        let st = stall.clone();
        let task = tokio::spawn(async move {
            // Dropped (and every connection task aborted) when the accept loop is aborted.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        conns.spawn(relay_one(stream, target, link, c.clone(), st.subscribe()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Relay {
            addr,
            counters,
            stall,
            task,
        })
    }

    /// Holds the bytes of the given directions (of every connection, present and future)
    /// until called again with [`Stall::None`]. Bytes read meanwhile queue up to the relay's
    /// bound, then TCP backpressure reaches the sender. Safe to call from any thread, also
    /// from a callback that must not block.
    pub fn stall(&self, how: Stall) {
        self.stall.send_replace(how);
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Counters.
    pub fn counters(&self) -> &RelayCounters {
        &self.counters
    }
}

async fn relay_one(
    client: TcpStream,
    target: SocketAddr,
    link: Link,
    c: Arc<RelayCounters>,
    stall: watch::Receiver<Stall>,
) {
    let server = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        _ => return,
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::join!(
        direction(cr, sw, link, &c.up, stall.clone(), true),
        direction(sr, cw, link, &c.down, stall, false)
    );
}

/// One direction: read, stamp, queue; deliver at the stamped instants.
async fn direction(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    link: Link,
    bytes: &AtomicU64,
    mut stall: watch::Receiver<Stall>,
    upstream: bool,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let one_way = link.rtt / 2;
    let reader = async move {
        let mut bucket = link
            .rate
            .map(|rate| TokenBucket::new(rate, (CHUNK * 4) as f64, Instant::now()));
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            let now = Instant::now();
            let leaves = match &mut bucket {
                Some(b) => b.reserve(n, now),
                None => now,
            };
            if leaves > now + MAX_QUEUE_DELAY {
                // The queue is full: stop reading until it drains (backpressure).
                tokio::time::sleep_until(leaves - MAX_QUEUE_DELAY).await;
            }
            if tx.send((leaves + one_way, buf)).await.is_err() {
                break;
            }
        }
        // Dropping `tx` ends the writer once everything queued is delivered.
    };
    let writer = async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            // An error means the relay is gone: deliver nothing more.
            if stall.wait_for(|s| !s.holds(upstream)).await.is_err() {
                return;
            }
            if w.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_at_rate_after_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 100.0, t0);
        assert_eq!(b.reserve(100, t0), t0);
        let t = b.reserve(500, t0);
        assert!((t - t0).as_secs_f64() > 0.49 && (t - t0).as_secs_f64() < 0.51);
        // Half a second later the debt is paid: the next 100 bytes leave 0.1 s later.
        let t1 = t0 + Duration::from_millis(500);
        let t = b.reserve(100, t1);
        assert!(((t - t1).as_secs_f64() - 0.1).abs() < 1e-6);
    }

    /// A TCP server on loopback that sends back whatever it reads.
    async fn echo_server() -> SocketAddr {
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn relay_adds_round_trip_and_limits_rate() {
        let target = echo_server().await;
        let relay = Relay::start(target, Link::new(40.0, 8.0))
            .await
            .expect("relay");
        let mut s = TcpStream::connect(relay.addr()).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        // Round trip of one byte: ~40 ms added (through the relay twice: there and back).
        let t = std::time::Instant::now();
        s.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.expect("read");
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(38), "{rtt:?}");
        assert!(rtt < Duration::from_secs(5), "{rtt:?}");
        // 200 kB at 1 MB/s each way: about 0.2 s (plus the burst allowance), not instant.
        let payload = vec![7u8; 200_000];
        let t = std::time::Instant::now();
        let (mut r, mut w) = s.into_split();
        let send = tokio::spawn(async move { w.write_all(&payload).await });
        let mut got = vec![0u8; 200_000];
        r.read_exact(&mut got).await.expect("echo");
        let took = t.elapsed();
        let _ = send.await;
        assert!(took >= Duration::from_millis(150), "{took:?}");
        assert!(took < Duration::from_secs(20), "{took:?}");
        assert!(relay.counters().up.load(Ordering::Relaxed) >= 200_001);
    }

    #[tokio::test]
    async fn a_stalled_relay_holds_bytes_until_released() {
        let target = echo_server().await;
        let relay = Relay::start(target, Link::new(0.0, 0.0))
            .await
            .expect("relay");
        let mut s = TcpStream::connect(relay.addr()).await.expect("connect");
        relay.stall(Stall::Downstream);
        s.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        let held = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut got)).await;
        assert!(held.is_err(), "nothing comes back while stalled");
        relay.stall(Stall::None);
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("released")
            .expect("read");
        assert_eq!(&got, b"ping");
    }
}
