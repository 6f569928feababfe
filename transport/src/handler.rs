//! Our russh client handler (host-key decision, negotiated algorithms, refused channel
//! opens, the end of the session), and [`ConnInner`], the handle to the session it lives in.

use std::sync::Arc;

use russh::client::{DisconnectReason, Handle, Handler, Session};
use russh::keys::PublicKeyOrCertificate;

use crate::config::{Endpoint, TransportConfig};
use crate::error::{ChannelOpenRefusal, DisconnectCause, Stage, TransportError, cause_from_russh};
use crate::host_key::{Verifier, fingerprint};
use crate::observer::{ConnectEventKind, Stopwatch};
use crate::shared::{ConnShared, HostKeyInfo, Reported};

/// Our russh client handler. Lives inside russh's session task; its `Drop` is how we learn
/// that the session is over.
pub(crate) struct ClientHandler {
    pub(crate) shared: Arc<ConnShared>,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) stopwatch: Stopwatch,
}

/// The handler's error type: russh's own, or "we refused the host key" (details are in
/// [`ConnShared::rejection`], so that they survive russh's error plumbing intact).
#[derive(Debug)]
pub(crate) enum HandlerError {
    Russh(russh::Error),
    HostKeyRejected,
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Russh(e)
    }
}

impl Drop for ClientHandler {
    fn drop(&mut self) {
        self.shared.finish();
    }
}

impl Handler for ClientHandler {
    type Error = HandlerError;

    /// The host-key decision. Runs inside the key exchange: a refused key ends the
    /// connection here, before any authentication is attempted and before any channel.
    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                // We never advertise certificate algorithms, so this is a protocol violation.
                if let Ok(mut r) = self.shared.rejection.lock() {
                    *r = Some(TransportError::Protocol {
                        stage: Stage::HostKey,
                        message: "server presented a host certificate we did not ask for".into(),
                    });
                }
                return Err(HandlerError::HostKeyRejected);
            }
        };
        let algorithm = key.algorithm().to_string();
        let fp = fingerprint(key);
        self.stopwatch.emit(ConnectEventKind::KeyExchangeDone {
            host_key_algorithm: algorithm.clone(),
            fingerprint: fp.clone(),
        });
        match self.verifier.verify(key) {
            Ok(source) => {
                let _ = self.shared.host_key.set(HostKeyInfo {
                    algorithm,
                    fingerprint: fp.clone(),
                    source: source.clone(),
                });
                self.stopwatch.emit(ConnectEventKind::HostKeyVerified {
                    fingerprint: fp,
                    source,
                });
                Ok(true)
            }
            Err(e) => {
                tracing::warn!("refusing host key: {e}");
                if let Ok(mut r) = self.shared.rejection.lock() {
                    *r = Some(e);
                }
                Err(HandlerError::HostKeyRejected)
            }
        }
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &russh::Names,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if session.remote_sshid().starts_with(b"SSH-2.0-OpenSSH_") {
            self.shared.note_openssh_server();
        }
        let kex = names.kex.as_ref().to_string();
        let cipher = names.cipher.as_ref().to_string();
        let _ = self.shared.compression.set(match names.client_compression {
            russh::compression::Compression::None => "none",
            russh::compression::Compression::Zlib => "zlib",
            russh::compression::Compression::ZlibOpenSSH => "zlib@openssh.com",
        });
        if self
            .shared
            .negotiated
            .set((kex.clone(), cipher.clone()))
            .is_ok()
        {
            self.stopwatch
                .emit(ConnectEventKind::Negotiated { kex, cipher });
        }
        Ok(())
    }

    async fn channel_open_failure(
        &mut self,
        _channel: russh::ChannelId,
        reason: russh::ChannelOpenFailure,
        description: &str,
        _language: &str,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.shared.push_open_failure(
            ChannelOpenRefusal::from_russh(&reason),
            description.to_string(),
        );
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        match reason {
            DisconnectReason::ReceivedDisconnect(info) => self.shared.report(Reported::Peer {
                reason: format!("{:?}", info.reason_code),
                message: info.message,
            }),
            DisconnectReason::Error(HandlerError::Russh(e)) => {
                self.shared.report(Reported::Error(cause_from_russh(e)));
            }
            DisconnectReason::Error(HandlerError::HostKeyRejected) => {
                self.shared.report(Reported::Error(DisconnectCause::Local));
            }
        }
        Ok(())
    }
}

/// What every clone of an [`crate::SshConnection`] (and every channel) holds.
pub(crate) struct ConnInner {
    pub(crate) handle: Handle<ClientHandler>,
    pub(crate) shared: Arc<ConnShared>,
    pub(crate) endpoint: Endpoint,
    pub(crate) host_key: HostKeyInfo,
    pub(crate) identity: String,
    pub(crate) config: TransportConfig,
    /// The first channel, opened ahead of authentication, until an open takes it.
    pub(crate) ahead:
        std::sync::Mutex<Option<(crate::config::FirstChannel, russh::client::PendingChannel)>>,
    /// Whether that open went out with the authentication request.
    pub(crate) first_channel_pipelined: bool,
}
