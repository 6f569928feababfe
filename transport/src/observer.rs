//! Stage events of a connection attempt, with timings, for tools like `nixmux ping`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host_key::HostKeySource;

/// One completed stage of [`crate::connect`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectEvent {
    /// Time since the connect call started.
    pub at: Duration,
    /// Time since the previous event (the duration of this stage).
    pub took: Duration,
    /// What happened.
    pub kind: ConnectEventKind,
}

/// The stages, in the order they are reported.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ConnectEventKind {
    /// The host name resolved to these addresses.
    Resolved {
        /// All addresses, in the order they will be tried.
        addrs: Vec<SocketAddr>,
    },
    /// TCP is connected.
    TcpConnected {
        /// The address that answered.
        addr: SocketAddr,
    },
    /// The key exchange produced the server's host key (not yet trusted).
    KeyExchangeDone {
        /// e.g. `ssh-ed25519`.
        host_key_algorithm: String,
        /// `SHA256:...`.
        fingerprint: String,
    },
    /// The host key was accepted.
    HostKeyVerified {
        /// `SHA256:...`.
        fingerprint: String,
        /// What vouched for it.
        source: HostKeySource,
    },
    /// Algorithms negotiated by the key exchange.
    Negotiated {
        /// Key exchange.
        kex: String,
        /// Cipher.
        cipher: String,
    },
    /// Authentication succeeded.
    Authenticated {
        /// The user.
        user: String,
        /// Which identity worked (key file path or agent key, with fingerprint).
        identity: String,
    },
}

/// Receives [`ConnectEvent`]s. Called from the connecting task and from russh's session
/// task, so it must be quick and must not block.
pub trait ConnectObserver: Send + Sync {
    /// One stage finished.
    fn on_event(&self, event: &ConnectEvent);
}

impl<F: Fn(&ConnectEvent) + Send + Sync> ConnectObserver for F {
    fn on_event(&self, event: &ConnectEvent) {
        self(event)
    }
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopObserver;

impl ConnectObserver for NoopObserver {
    fn on_event(&self, _event: &ConnectEvent) {}
}

/// Stamps events with timings and forwards them.
#[derive(Clone)]
pub(crate) struct Stopwatch {
    start: Instant,
    last: Arc<Mutex<Instant>>,
    observer: Arc<dyn ConnectObserver>,
}

impl Stopwatch {
    pub(crate) fn new(observer: Arc<dyn ConnectObserver>) -> Self {
        let now = Instant::now();
        Stopwatch {
            start: now,
            last: Arc::new(Mutex::new(now)),
            observer,
        }
    }

    pub(crate) fn emit(&self, kind: ConnectEventKind) {
        let now = Instant::now();
        let took = match self.last.lock() {
            Ok(mut last) => {
                let took = now.duration_since(*last);
                *last = now;
                took
            }
            Err(_) => Duration::ZERO,
        };
        let event = ConnectEvent {
            at: now.duration_since(self.start),
            took,
            kind,
        };
        tracing::debug!(?event, "connect stage");
        self.observer.on_event(&event);
    }
}

/// Events of one exec channel, for the layer above (to know the other end is alive) and for
/// tools and tests (to act at a precise stage). Called from the connection's tasks: must be
/// quick and must not block. Every method does nothing by default.
pub trait ChannelObserver: Send + Sync {
    /// The server confirmed the channel; the exec request goes out next.
    fn opened(&self) {}
    /// The server accepted the exec request: the command runs.
    fn exec_accepted(&self) {}
    /// A message from the server arrived on the channel (stdout, stderr, a window
    /// adjustment, a request reply, exit status...): the other end is alive. While we
    /// upload, window adjustments are the only sign that the server consumes our data.
    fn heard(&self) {}
}
