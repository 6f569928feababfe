//! Everything needed to reach one SSH host, in transport terms.

use std::sync::Arc;
use std::time::Duration;

use nixmux_transport::{
    ChannelObserver, ConnectEvent, ConnectObserver, Endpoint, HostKeyCheck, Identity, NoopObserver,
    SshConnection, TransportConfig, TransportError, connect, connect_over,
};
use tokio::io::{AsyncRead, AsyncWrite};

/// How to reach a host: endpoint, keys to offer, host keys to accept, transport tuning, and
/// an optional jump host (ProxyJump) whose own pooled connection carries this one.
#[derive(Debug, Clone)]
pub struct ConnectTarget {
    /// Host, port and user.
    pub endpoint: Endpoint,
    /// Identities to try, in order.
    pub identities: Vec<Identity>,
    /// Host-key policy and sources.
    pub host_keys: HostKeyCheck,
    /// Timeouts, keepalive, window sizes, algorithms.
    pub transport: TransportConfig,
    /// The previous hop, if this host is reached through another.
    pub jump: Option<Box<ConnectTarget>>,
    /// Callbacks at the stages of pooled connections and channels to this host.
    pub hooks: StageHooks,
}

/// Callbacks at the stages of reaching a host, for diagnostics and tests (which act at a
/// precise stage, e.g. stall a link right after the key exchange). They run on the
/// connection's tasks: quick, never blocking.
#[derive(Clone, Default)]
pub struct StageHooks {
    /// Every stage of every pooled connection attempt (TCP, key exchange, host key, auth).
    pub connect: Option<Arc<dyn ConnectObserver>>,
    /// Every session channel: opened, command started, and everything the server sends.
    pub channel: Option<Arc<dyn ChannelObserver>>,
}

impl std::fmt::Debug for StageHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageHooks")
            .field("connect", &self.connect.is_some())
            .field("channel", &self.channel.is_some())
            .finish()
    }
}

/// A [`ConnectObserver`] that forwards to [`StageHooks::connect`], if any.
pub(crate) struct ConnectHook(pub(crate) Option<Arc<dyn ConnectObserver>>);

impl ConnectObserver for ConnectHook {
    fn on_event(&self, event: &ConnectEvent) {
        if let Some(o) = &self.0 {
            o.on_event(event);
        }
    }
}

impl ConnectTarget {
    /// A key identifying the SSH connection this target needs: builders that share it share
    /// one pooled connection (an `ssh://` and an `ssh-ng://` line for the same host, say).
    pub fn connection_key(&self) -> String {
        let mut key = format!(
            "{}@{}:{}",
            self.endpoint.user, self.endpoint.host, self.endpoint.port
        );
        for id in &self.identities {
            key.push('|');
            key.push_str(&format!("{id:?}"));
        }
        if let Some(j) = &self.jump {
            key.push_str(" via ");
            key.push_str(&j.connection_key());
        }
        key
    }

    /// Opens a fresh connection, outside any pool: through each jump host in turn (each one
    /// fresh too), then to this host, reporting this host's stages to `observer`.
    pub async fn connect(
        &self,
        observer: impl ConnectObserver + 'static,
    ) -> Result<SshConnection, TransportError> {
        match &self.jump {
            None => {
                connect(
                    &self.endpoint,
                    &self.identities,
                    &self.host_keys,
                    &self.transport,
                    observer,
                )
                .await
            }
            Some(jump) => {
                // Boxed: a jump host may itself be reached through another jump host. The
                // hop's connection lives as long as the tunnel channel through it.
                let hop = Box::pin(jump.connect(NoopObserver)).await?;
                let stream = hop
                    .open_direct_tcpip(&self.endpoint.host, self.endpoint.port)
                    .await?;
                self.connect_over(stream, observer).await
            }
        }
    }

    /// Connects to this host over an already open byte stream (a tunnel through a jump host).
    pub async fn connect_over<S>(
        &self,
        stream: S,
        observer: impl ConnectObserver + 'static,
    ) -> Result<SshConnection, TransportError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        connect_over(
            stream,
            &self.endpoint,
            &self.identities,
            &self.host_keys,
            &self.transport,
            observer,
        )
        .await
    }

    /// Bound on establishing the connection, all stages together (for pool waits).
    pub fn connect_budget(&self) -> Duration {
        let t = &self.transport;
        let own = t.tcp_connect_timeout * 2 + t.handshake_timeout + t.auth_timeout;
        own + self
            .jump
            .as_ref()
            .map(|j| j.connect_budget())
            .unwrap_or_default()
    }
}
