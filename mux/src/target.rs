//! Everything needed to reach one SSH host, in transport terms.

use std::time::Duration;

use nixmux_transport::{Endpoint, HostKeyCheck, Identity, TransportConfig};

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
