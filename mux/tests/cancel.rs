//! Cancellation at every await point of an operation, against real OpenSSH + Nix 2.8
//! builders: the caller's future is dropped while the builder is unreachable at that stage
//! (a link that stalls right there, through the relay; a TCP connect that cannot complete).
//! Then, with the builder back, the next operation succeeds, and neither a channel nor a
//! remote process is left behind.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixmux::transport::{ChannelObserver, ConnectEvent, ConnectEventKind};
use nixmux::{Builder, BuilderConfig, Pool, Protocol, StageHooks};
use nixmux_rig::relay::{Link, Relay, Stall};
use nixmux_rig::{Rig, RigConfig};

use common::*;

/// How long a stalled operation runs before its future is dropped.
const CANCEL_AFTER: Duration = Duration::from_millis(1500);

/// Where to stall the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// From the start: nothing from the server reaches us (its banner and key exchange).
    KeyExchange,
    /// When the key exchange is done, before authentication.
    Auth,
    /// Before a channel open (on a live connection).
    ChannelOpen,
    /// When the server confirmed the channel, before the exec request.
    Exec,
    /// When the command started, before the protocol handshake.
    Handshake,
}

/// The stage events seen, in order.
#[derive(Default)]
struct Trace {
    events: Mutex<Vec<&'static str>>,
}

impl Trace {
    fn push(&self, e: &'static str) {
        if let Ok(mut v) = self.events.lock() {
            v.push(e);
        }
    }

    fn clear(&self) {
        if let Ok(mut v) = self.events.lock() {
            v.clear();
        }
    }

    fn seen(&self, e: &str) -> bool {
        self.events.lock().is_ok_and(|v| v.contains(&e))
    }
}

/// Stalls `relay` at the first event named `at` once armed.
struct Staller {
    relay: Arc<Relay>,
    at: &'static str,
    armed: AtomicBool,
    trace: Arc<Trace>,
}

impl Staller {
    fn event(&self, name: &'static str) {
        self.trace.push(name);
        if name == self.at && self.armed.swap(false, Ordering::SeqCst) {
            self.relay.stall(Stall::Both);
        }
    }
}

struct Hooked(Arc<Staller>);

impl ChannelObserver for Hooked {
    fn opened(&self) {
        self.0.event("opened");
    }
    fn exec_accepted(&self) {
        self.0.event("exec_accepted");
    }
}

struct Case {
    rig: Arc<Rig>,
    relay: Arc<Relay>,
    staller: Arc<Staller>,
    trace: Arc<Trace>,
    pool: Pool,
    builder: Builder,
}

async fn case(protocol: Protocol, at: &'static str, link: Link) -> Case {
    let rig = rig(RigConfig::with_builders(1));
    let relay = Arc::new(
        Relay::start(rig.builder(0).addr(), link)
            .await
            .expect("relay"),
    );
    let trace = Arc::new(Trace::default());
    let staller = Arc::new(Staller {
        relay: relay.clone(),
        at,
        armed: AtomicBool::new(false),
        trace: trace.clone(),
    });
    let mut cfg: BuilderConfig = relayed_config(&rig, 0, protocol, &relay);
    let s = staller.clone();
    cfg.target.hooks = StageHooks {
        connect: Some(Arc::new(move |e: &ConnectEvent| {
            s.event(match e.kind {
                ConnectEventKind::TcpConnected { .. } => "tcp",
                ConnectEventKind::KeyExchangeDone { .. } => "kex",
                ConnectEventKind::HostKeyVerified { .. } => "host_key",
                ConnectEventKind::Negotiated { .. } => "negotiated",
                ConnectEventKind::Authenticated { .. } => "authenticated",
                _ => "other",
            })
        })),
        channel: Some(Arc::new(Hooked(staller.clone()))),
    };
    let pool = Pool::new();
    let builder = pool.add(cfg);
    Case {
        rig,
        relay,
        staller,
        trace,
        pool,
        builder,
    }
}

/// One operation needing a session: a round trip on the builder.
async fn round_trip(b: &Builder) -> nixmux::Result<()> {
    b.query_valid_paths(&BTreeSet::new(), false).await.map(drop)
}

/// With the builder back: the next operation succeeds, and once idle sessions are closed no
/// channel, no busy session and no remote Nix process is left.
async fn recovers_without_leaks(rig: &Rig, b: &Builder) {
    tokio::time::timeout(Duration::from_secs(40), round_trip(b))
        .await
        .expect("the next operation finishes")
        .expect("the next operation succeeds");
    b.close_idle();
    let remote = || matching_processes(rig, 0, &["nix-daemon --stdio", "nix-store --serve"]);
    let clean = wait_until(Duration::from_secs(20), || {
        b.health().channels_open == 0 && b.stats().busy_sessions == 0 && remote().is_empty()
    })
    .await;
    assert!(
        clean.is_some(),
        "left behind: {} channels, {} busy sessions, remote {:?}",
        b.health().channels_open,
        b.stats().busy_sessions,
        remote()
    );
}

/// Cancels a round trip stalled at `at`, then checks recovery.
async fn cancel_at(protocol: Protocol, at: At) {
    let event = match at {
        At::KeyExchange | At::ChannelOpen => "never",
        At::Auth => "negotiated",
        At::Exec => "opened",
        At::Handshake => "exec_accepted",
    };
    let c = case(protocol, event, Link::new(0.0, 0.0)).await;
    if matches!(at, At::ChannelOpen | At::Exec | At::Handshake) {
        // A live connection whose next operation needs a new channel.
        round_trip(&c.builder).await.expect("warm-up");
        c.builder.close_idle();
        let closed = wait_until(Duration::from_secs(10), || {
            c.builder.health().channels_open == 0
        })
        .await;
        assert!(closed.is_some(), "the warm-up channel closed");
    }
    let created = c.builder.stats().sessions_created;
    c.trace.clear();
    match at {
        At::KeyExchange | At::ChannelOpen => c.relay.stall(Stall::Both),
        _ => c.staller.armed.store(true, Ordering::SeqCst),
    }
    let r = tokio::time::timeout(CANCEL_AFTER, round_trip(&c.builder)).await;
    assert!(
        r.is_err(),
        "the operation was still waiting when dropped: {r:?}"
    );
    // It was dropped where it was meant to be.
    match at {
        At::KeyExchange => assert!(!c.trace.seen("kex"), "no key exchange got through"),
        At::Auth => {
            assert!(c.trace.seen("negotiated"));
            assert!(!c.trace.seen("authenticated"));
        }
        At::ChannelOpen => assert!(!c.trace.seen("opened"), "no channel got through"),
        At::Exec => {
            assert!(c.trace.seen("opened"));
            assert!(!c.trace.seen("exec_accepted"));
        }
        At::Handshake => assert!(c.trace.seen("exec_accepted")),
    }
    assert_eq!(
        c.builder.stats().sessions_created,
        created,
        "no session was made"
    );
    c.relay.stall(Stall::None);
    recovers_without_leaks(&c.rig, &c.builder).await;
    c.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_during_the_key_exchange() {
    cancel_at(Protocol::Worker, At::KeyExchange).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_during_authentication() {
    cancel_at(Protocol::Worker, At::Auth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_during_the_channel_open() {
    cancel_at(Protocol::Serve, At::ChannelOpen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_during_the_exec_request() {
    cancel_at(Protocol::Serve, At::Exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_during_the_handshake_over_ssh() {
    cancel_at(Protocol::Serve, At::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_during_the_handshake_over_ssh_ng() {
    cancel_at(Protocol::Worker, At::Handshake).await;
}

/// Cancels a 24 MiB fetch in the middle of its NAR (the link stalled after 4 MiB).
async fn cancel_mid_message(protocol: Protocol) {
    let c = case(protocol, "never", Link::new(2.0, 80.0)).await;
    let p = random_path(c.rig.builder(0).store(), "cancel-mid-nar", 24 << 20, 41);
    let local = local_store(&c.rig);
    let paths = BTreeSet::from([p.clone()]);
    // Boxed, so that dropping it below really drops the future (and its sessions).
    let mut fetch = Box::pin(c.builder.fetch_outputs(&local, &paths, None));
    let stalled = tokio::select! {
        r = &mut fetch => panic!("the fetch ended before the stall: {r:?}"),
        s = wait_until(Duration::from_secs(30), || c.builder.stats().bytes_in > 4 << 20) => s,
    };
    assert!(stalled.is_some(), "the NAR started to flow");
    c.relay.stall(Stall::Both);
    let r = tokio::time::timeout(CANCEL_AFTER, &mut fetch).await;
    assert!(
        r.is_err(),
        "the fetch was still waiting when dropped: {r:?}"
    );
    drop(fetch);
    c.relay.stall(Stall::None);
    // Nothing of the cut NAR is valid locally; the whole fetch then works.
    let abs = p.to_absolute(&nixmux::proto::store_path::StoreDir::default());
    assert!(!c.rig.client_store().is_valid(&abs).expect("query"));
    c.builder
        .fetch_outputs(&local, &paths, None)
        .await
        .expect("the fetch succeeds once the link is back");
    assert!(c.rig.client_store().is_valid(&abs).expect("query"));
    recovers_without_leaks(&c.rig, &c.builder).await;
    c.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_in_the_middle_of_a_nar_over_ssh() {
    cancel_mid_message(Protocol::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_in_the_middle_of_a_nar_over_ssh_ng() {
    cancel_mid_message(Protocol::Worker).await;
}

/// A listener in front of the builder whose accept queue is full until opened: Linux drops
/// SYNs to a full accept queue, so a TCP connect to it hangs in the handshake.
struct Gate {
    port: u16,
    open: Arc<tokio::sync::Notify>,
}

fn gate(builder: SocketAddr) -> Gate {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    sock.bind(&any.into()).expect("bind");
    sock.listen(0).expect("listen");
    let addr = sock.local_addr().expect("addr").as_socket().expect("inet");
    // Fills the queue (one connection with a backlog of 0); nobody accepts it yet.
    let filler = std::net::TcpStream::connect(addr).expect("filler");
    let listener: std::net::TcpListener = sock.into();
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    let open = Arc::new(tokio::sync::Notify::new());
    let o = open.clone();
    tokio::spawn(async move {
        o.notified().await;
        drop(filler);
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(builder).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    Gate {
        port: addr.port(),
        open,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_during_the_tcp_connect() {
    let rig = rig(RigConfig::with_builders(1));
    let g = gate(rig.builder(0).addr());
    let key =
        nixmux::transport::HostPublicKey::from_machines_field(rig.builder(0).host_key_base64())
            .expect("key");
    let mut cfg = config(&rig, 0, Protocol::Worker);
    cfg.target.endpoint.port = g.port;
    cfg.target.host_keys = nixmux::transport::HostKeyCheck::pinned([key]);
    let trace = Arc::new(Trace::default());
    let t = trace.clone();
    cfg.target.hooks.connect = Some(Arc::new(move |e: &ConnectEvent| {
        if matches!(e.kind, ConnectEventKind::TcpConnected { .. }) {
            t.push("tcp");
        }
    }));
    let pool = Pool::new();
    let builder = pool.add(cfg);
    let r = tokio::time::timeout(CANCEL_AFTER, round_trip(&builder)).await;
    assert!(
        r.is_err(),
        "the operation was still connecting when dropped: {r:?}"
    );
    assert!(!trace.seen("tcp"), "TCP did not connect");
    g.open.notify_one();
    recovers_without_leaks(&rig, &builder).await;
    pool.shutdown().await;
}
