//! Public-key authentication from key files and ssh-agent.
//!
//! Identities are tried in the caller's order and nothing else is offered (OpenSSH
//! `IdentitiesOnly`). A key that cannot be loaded, or an agent that cannot be reached, does
//! not stop the others from being tried; it is listed in the eventual
//! [`TransportError::AuthRejected`]. Only if nothing at all could be offered is the first
//! such problem returned as itself ([`TransportError::KeyLoad`] / [`TransportError::Agent`]).
//!
//! Round trips ([`TransportConfig::fast_auth`](crate::TransportConfig::fast_auth), on by
//! default): the first request goes out with the `ssh-userauth` service request, and key
//! files send their signed request at once instead of asking first whether the key would do
//! (RFC 4252 §7 allows both), so an accepted key file costs one round trip instead of
//! OpenSSH's three (service request, query, signed request; `sshconnect2.c`). Agent keys are
//! queried first, as OpenSSH does, because an agent may ask its user to confirm each
//! signature; once an endpoint has accepted an agent key, later connections to it in this
//! process (or, with [`TransportConfig::accepted_keys_file`], in any process using that file)
//! sign with that key at once ([`Accepted`]). A refused signed request moves on to the next
//! identity exactly like a refused query, and the key is no longer remembered as accepted.
//!
//! [`TransportConfig::accepted_keys_file`]: crate::TransportConfig::accepted_keys_file
//!
//! The first channel ([`TransportConfig::first_channel`](crate::TransportConfig::first_channel))
//! is opened ahead, right behind the first request, only when that request is signed and its
//! key was accepted by the endpoint before, as remembered ([`Accepted`]), key files and agent
//! keys alike: a server that refuses the request drops the open, and Dropbear ends the
//! connection over it, so it is only sent where a refusal is unlikely.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use russh::MethodKind;
use russh::client::{AuthResult, ChannelOpenAhead, Handle, PendingChannel};
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg};

use crate::accepted_file::{self, Entry};
use crate::config::{Endpoint, FirstChannel, Identity};
use crate::error::{Stage, TransportError, classify};
use crate::handler::ClientHandler;
use crate::host_key::fingerprint;
use crate::shared::{CAUSE_GRACE, ConnShared};

/// Signature algorithm for RSA keys: the best rsa-sha2 variant in the server's
/// `server-sig-algs`, cached per connection (russh may wait up to a second for that
/// extension, so ask once).
struct RsaHash(Option<Option<HashAlg>>);

impl RsaHash {
    async fn get(&mut self, handle: &Handle<ClientHandler>) -> Option<HashAlg> {
        if let Some(h) = self.0 {
            return h;
        }
        let h = match handle.best_supported_rsa_hash().await {
            Ok(Some(h)) => h,
            // No server-sig-algs at all: every OpenSSH since 7.2 sends it, and those since
            // 8.8 refuse SHA-1 signatures, so SHA-256 is the best guess.
            Ok(None) | Err(_) => Some(HashAlg::Sha256),
        };
        self.0 = Some(h);
        h
    }
}

/// Keys that endpoints accepted: (host, port, user, key fingerprint). Consulted to skip the
/// query for agent keys and to open the first channel ahead; bounded (the newest
/// [`ACCEPTED_MAX`] are kept), since a long-running process may talk to many builders.
///
/// One memory per process without [`TransportConfig::accepted_keys_file`], and one per file
/// with it: loaded from the file once, when a connection using that file first needs it, and
/// written through to it (`accepted_file.rs`, which also says why remembering an acceptance
/// is safe). A connection with another file, or none, neither sees nor changes this one.
///
/// [`TransportConfig::accepted_keys_file`]: crate::TransportConfig::accepted_keys_file
pub(crate) struct Accepted {
    file: Option<PathBuf>,
    /// Oldest first.
    entries: Mutex<Vec<Entry>>,
    /// Held while the file is re-read and replaced, so that two connections of this process
    /// do not lose each other's change.
    writing: Mutex<()>,
}

/// Entries kept at most, in memory and in the file; past that the oldest are dropped
/// (costing one query or one channel round trip on that endpoint's next connection).
const ACCEPTED_MAX: usize = 4096;

/// How long a connection waits for the accepted-keys file to be read or written.
const ACCEPTED_IO_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Accepted {
    /// The memory for `file` (or the process's own, for `None`), loading the file the first
    /// time it is named. May read a file: call off the runtime.
    pub(crate) fn for_file(file: Option<&Path>) -> Arc<Accepted> {
        static MEMORY: OnceLock<Arc<Accepted>> = OnceLock::new();
        static FILES: OnceLock<Mutex<HashMap<PathBuf, Arc<Accepted>>>> = OnceLock::new();
        let Some(path) = file else {
            return MEMORY
                .get_or_init(|| Arc::new(Accepted::with(None, Vec::new())))
                .clone();
        };
        // Held while loading, so that concurrent first connections load the file once.
        let mut files = FILES
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        files
            .entry(path.to_path_buf())
            .or_insert_with(|| {
                let mut entries = accepted_file::load(path);
                accepted_file::bound(&mut entries, ACCEPTED_MAX);
                tracing::debug!(
                    "{} accepted keys remembered in {}",
                    entries.len(),
                    path.display()
                );
                Arc::new(Accepted::with(Some(path.to_path_buf()), entries))
            })
            .clone()
    }

    fn with(file: Option<PathBuf>, entries: Vec<Entry>) -> Accepted {
        Accepted {
            file,
            entries: Mutex::new(entries),
            writing: Mutex::new(()),
        }
    }

    fn entry(endpoint: &Endpoint, fingerprint: &str) -> Entry {
        Entry {
            host: endpoint.host.clone(),
            port: endpoint.port,
            user: endpoint.user.clone(),
            fingerprint: fingerprint.to_string(),
        }
    }

    fn contains(&self, endpoint: &Endpoint, fingerprint: &str) -> bool {
        let e = Self::entry(endpoint, fingerprint);
        self.entries.lock().map(|s| s.contains(&e)).unwrap_or(false)
    }

    /// Remembers that `endpoint` accepted the key; written to the file if it is new here.
    async fn insert(self: &Arc<Self>, endpoint: &Endpoint, fingerprint: &str) {
        let e = Self::entry(endpoint, fingerprint);
        {
            let Ok(mut s) = self.entries.lock() else {
                return;
            };
            if s.contains(&e) {
                return;
            }
            s.push(e.clone());
            accepted_file::bound(&mut s, ACCEPTED_MAX);
        }
        self.write_through(move |entries| {
            if entries.contains(&e) {
                return false;
            }
            entries.push(e);
            true
        })
        .await;
    }

    /// Forgets that `endpoint` accepted the key (it refused it now), here and in the file.
    async fn remove(self: &Arc<Self>, endpoint: &Endpoint, fingerprint: &str) {
        let e = Self::entry(endpoint, fingerprint);
        if let Ok(mut s) = self.entries.lock() {
            s.retain(|x| *x != e);
        }
        self.write_through(move |entries| {
            let before = entries.len();
            entries.retain(|x| *x != e);
            entries.len() != before
        })
        .await;
    }

    /// Applies `change` to the file, if there is one: re-read, changed, replaced (off the
    /// runtime). Awaited, so that a program that exits right after connecting has written it;
    /// it only happens when an endpoint's answer differs from what was remembered. Failures
    /// are logged: the file is an optimisation.
    async fn write_through(
        self: &Arc<Self>,
        change: impl FnOnce(&mut Vec<Entry>) -> bool + Send + 'static,
    ) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let this = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _writing = this.writing.lock().unwrap_or_else(|e| e.into_inner());
            accepted_file::update(&path, ACCEPTED_MAX, change).map_err(|e| {
                format!(
                    "cannot update the accepted-keys file {}: {e}",
                    path.display()
                )
            })
        });
        match tokio::time::timeout(ACCEPTED_IO_WAIT, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("{e}"),
            Ok(Err(e)) => tracing::warn!("accepted-keys file update task failed: {e}"),
            // Left to finish in the background.
            Err(_) => tracing::warn!("the accepted-keys file takes too long to write; not waiting"),
        }
    }
}

fn sig_name(key_alg: &russh::keys::Algorithm, hash: Option<HashAlg>) -> String {
    if key_alg.clone().is_rsa() {
        match hash {
            Some(HashAlg::Sha512) => "rsa-sha2-512".into(),
            Some(HashAlg::Sha256) => "rsa-sha2-256".into(),
            _ => "ssh-rsa".into(),
        }
    } else {
        key_alg.to_string()
    }
}

fn method_names(methods: &russh::MethodSet) -> Vec<String> {
    methods
        .iter()
        .map(|m: &MethodKind| <&'static str>::from(m).to_string())
        .collect()
}

async fn load_key(path: &Path, passphrase: Option<&str>) -> Result<PrivateKey, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| e.to_string())?;
    let passphrase = passphrase.map(str::to_owned);
    // Decrypting an encrypted key runs bcrypt-pbkdf: CPU-heavy, keep it off the runtime.
    tokio::task::spawn_blocking(move || {
        russh::keys::decode_secret_key(&text, passphrase.as_deref()).or_else(|e| {
            // One OpenSSH P-256 key in 256 has a scalar ssh-key refuses (see key_repair).
            crate::key_repair::pad_short_p256_scalar(&text)
                .and_then(|mended| russh::keys::decode_secret_key(&mended, None).ok())
                .ok_or(e)
        })
    })
    .await
    .map_err(|e| format!("key decoding task failed: {e}"))?
    .map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => {
            "key is encrypted and no passphrase was given".to_string()
        }
        other => other.to_string(),
    })
}

/// Key files loaded (read, decrypted) while the key exchange is on the wire, so that
/// authentication does not wait for them: decrypting an encrypted key (bcrypt-pbkdf) takes
/// tens of milliseconds. One entry per identity, `None` for agents. The memory of accepted
/// keys is made ready alongside (its file read, the first time).
pub(crate) struct Preloaded(tokio::task::JoinHandle<Loaded>);

type Loaded = (Vec<Option<Result<PrivateKey, String>>>, Arc<Accepted>);

impl Drop for Preloaded {
    fn drop(&mut self) {
        // The connection failed before authentication: nothing left to load for.
        self.0.abort();
    }
}

impl Preloaded {
    /// The loaded keys and the memory of accepted keys; if the loading task panicked, no
    /// keys (then each is loaded in turn) and the process's own memory.
    async fn get(mut self) -> Loaded {
        (&mut self.0)
            .await
            .unwrap_or_else(|_| (Vec::new(), Accepted::for_file(None)))
    }
}

/// Starts loading every key file of `identities`, in order, and the memory of accepted keys
/// for `accepted_file`, on tasks of their own.
pub(crate) fn preload(identities: &[Identity], accepted_file: Option<&Path>) -> Preloaded {
    let files: Vec<Option<(PathBuf, Option<String>)>> = identities
        .iter()
        .map(|id| match id {
            Identity::KeyFile { path, passphrase } => Some((path.clone(), passphrase.clone())),
            Identity::Agent { .. } => None,
        })
        .collect();
    let accepted_file = accepted_file.map(Path::to_path_buf);
    Preloaded(tokio::spawn(async move {
        let accepted =
            tokio::task::spawn_blocking(move || Accepted::for_file(accepted_file.as_deref()));
        let mut keys = Vec::with_capacity(files.len());
        for file in files {
            keys.push(match file {
                Some((path, passphrase)) => Some(load_key(&path, passphrase.as_deref()).await),
                None => None,
            });
        }
        // A file system that hangs (a stale network mount) must not hold up authentication:
        // then this connection goes without the file.
        let accepted = match tokio::time::timeout(ACCEPTED_IO_WAIT, accepted).await {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(_)) => Accepted::for_file(None),
            Err(_) => {
                tracing::warn!("the accepted-keys file takes too long to read; not waiting");
                Accepted::for_file(None)
            }
        };
        (keys, accepted)
    }))
}

/// The first channel opened ahead of authentication (see the module docs).
#[derive(Default)]
pub(crate) struct Ahead {
    /// What to open; `None`: nothing.
    pub(crate) open: Option<FirstChannel>,
    /// The open, once asked for.
    pub(crate) pending: Option<PendingChannel>,
    /// The request it was sent behind was refused: the server dropped it, or ended the
    /// connection over it.
    pub(crate) refused: bool,
    /// The request it was sent behind succeeded: the open rode with it.
    pub(crate) rode_with_success: bool,
}

impl Ahead {
    /// Asks for the open ahead if `key` (its fingerprint) was accepted by `endpoint` before
    /// and no request went out yet. Returns whether it was asked for.
    async fn open_if_known(
        &mut self,
        handle: &Handle<ClientHandler>,
        accepted: &Accepted,
        endpoint: &Endpoint,
        fp: &str,
        first_request: bool,
    ) -> bool {
        let Some(open) = &self.open else { return false };
        if !first_request || self.pending.is_some() || !accepted.contains(endpoint, fp) {
            return false;
        }
        let open = match open {
            FirstChannel::Session => ChannelOpenAhead::Session,
            FirstChannel::Streamlocal(path) => ChannelOpenAhead::DirectStreamLocal {
                socket_path: path.clone(),
            },
        };
        // A failed send means the session is gone: the request fails the same way.
        self.pending = handle.channel_open_ahead(open).await.ok();
        self.pending.is_some()
    }
}

/// Tries each identity until one is accepted; returns a description of the one that worked.
/// `ahead` says what to open behind the first request, and gets the open.
pub(crate) async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    endpoint: &Endpoint,
    identities: &[Identity],
    shared: &ConnShared,
    fast_auth: bool,
    preloaded: Preloaded,
    ahead: &mut Ahead,
) -> Result<String, TransportError> {
    let user = endpoint.user.as_str();
    let (preloaded, accepted) = preloaded.get().await;
    let mut preloaded = preloaded.into_iter();
    let mut tried: Vec<String> = Vec::new();
    let mut offered_any = false;
    let mut setup_error: Option<TransportError> = None;
    let mut methods_remaining: Vec<String> = Vec::new();
    let mut rsa = RsaHash(None);

    if identities.is_empty() {
        return Err(TransportError::Config(
            "no identities to authenticate with".into(),
        ));
    }

    for identity in identities {
        let preloaded = preloaded.next().flatten();
        match identity {
            Identity::KeyFile { path, passphrase } => {
                let loaded = match preloaded {
                    Some(loaded) => loaded,
                    None => load_key(path, passphrase.as_deref()).await,
                };
                let key = match loaded {
                    Ok(k) => k,
                    Err(reason) => {
                        tracing::warn!("cannot load key {}: {reason}", path.display());
                        tried.push(format!("{}: not loaded: {reason}", path.display()));
                        setup_error.get_or_insert(TransportError::KeyLoad {
                            path: path.clone(),
                            reason,
                        });
                        continue;
                    }
                };
                let alg = key.algorithm();
                let hash = if alg.clone().is_rsa() {
                    rsa.get(handle).await
                } else {
                    None
                };
                let fp = fingerprint(key.public_key());
                let desc = format!(
                    "key file {} ({} {fp})",
                    path.display(),
                    sig_name(&alg, hash),
                );
                // Key files sign at once with fast_auth: the open can go behind the request.
                let with_open = fast_auth
                    && ahead
                        .open_if_known(handle, &accepted, endpoint, &fp, !offered_any)
                        .await;
                offered_any = true;
                let result = handle
                    .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                    .await;
                match &result {
                    Ok(AuthResult::Success) => {
                        accepted.insert(endpoint, &fp).await;
                        ahead.rode_with_success = with_open;
                    }
                    _ if with_open => {
                        ahead.refused = true;
                        accepted.remove(endpoint, &fp).await;
                    }
                    // Refused though remembered (behind another identity's request, so
                    // without the open): not worth an early open next time either.
                    Ok(AuthResult::Failure { .. }) if accepted.contains(endpoint, &fp) => {
                        accepted.remove(endpoint, &fp).await;
                    }
                    _ => {}
                }
                let result = match result {
                    Ok(r) => r,
                    Err(e) => {
                        return Err(
                            ended(handle, user, tried, methods_remaining, shared, Some(e)).await,
                        );
                    }
                };
                match result {
                    AuthResult::Success => return Ok(desc),
                    AuthResult::Failure { .. } if handle.is_closed() => {
                        tried.push(format!("{desc}: rejected"));
                        return Err(
                            ended(handle, user, tried, methods_remaining, shared, None).await
                        );
                    }
                    AuthResult::Failure {
                        remaining_methods, ..
                    } => {
                        tried.push(format!("{desc}: rejected"));
                        methods_remaining = method_names(&remaining_methods);
                    }
                }
            }
            Identity::Agent { socket } => {
                let socket: Option<PathBuf> = socket
                    .clone()
                    .or_else(|| std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from));
                let Some(socket) = socket else {
                    tried.push("ssh-agent: SSH_AUTH_SOCK is not set".into());
                    setup_error.get_or_insert(TransportError::Agent {
                        socket: None,
                        reason: "SSH_AUTH_SOCK is not set".into(),
                    });
                    continue;
                };
                let mut agent = match AgentClient::connect_uds(&socket).await {
                    Ok(a) => a,
                    Err(e) => {
                        tried.push(format!(
                            "ssh-agent at {}: cannot connect: {e}",
                            socket.display()
                        ));
                        setup_error.get_or_insert(TransportError::Agent {
                            socket: Some(socket.clone()),
                            reason: format!("cannot connect: {e}"),
                        });
                        continue;
                    }
                };
                // OpenSSH agents only use destination-constrained keys for a bound session;
                // binding is harmless otherwise, and older agents refuse it, which is fine.
                if let Some(binding) = handle.agent_session_binding().cloned()
                    && let Err(e) = agent.bind_session(&binding, false).await
                {
                    tracing::debug!("ssh-agent did not accept session-bind: {e}");
                }
                let identities = match agent.request_identities().await {
                    Ok(ids) => ids,
                    Err(e) => {
                        tried.push(format!(
                            "ssh-agent at {}: cannot list keys: {e}",
                            socket.display()
                        ));
                        setup_error.get_or_insert(TransportError::Agent {
                            socket: Some(socket.clone()),
                            reason: format!("cannot list keys: {e}"),
                        });
                        continue;
                    }
                };
                if identities.is_empty() {
                    tried.push(format!("ssh-agent at {}: holds no keys", socket.display()));
                    setup_error.get_or_insert(TransportError::Agent {
                        socket: Some(socket.clone()),
                        reason: "the agent holds no keys".into(),
                    });
                    continue;
                }
                for ident in identities {
                    let (key, comment) = match ident {
                        AgentIdentity::PublicKey { key, comment } => (key, comment),
                        AgentIdentity::Certificate { comment, .. } => {
                            tried.push(format!("agent certificate {comment:?}: skipped (certificates are not supported)"));
                            continue;
                        }
                    };
                    let alg = key.algorithm();
                    let hash = if alg.clone().is_rsa() {
                        rsa.get(handle).await
                    } else {
                        None
                    };
                    let fp = fingerprint(&key);
                    let desc = format!("agent key {comment:?} ({} {fp})", sig_name(&alg, hash));
                    let at_once = fast_auth && accepted.contains(endpoint, &fp);
                    let with_open = at_once
                        && ahead
                            .open_if_known(handle, &accepted, endpoint, &fp, !offered_any)
                            .await;
                    offered_any = true;
                    let result = if at_once {
                        handle
                            .authenticate_publickey_signed_with(user, key, hash, &mut agent)
                            .await
                    } else {
                        handle
                            .authenticate_publickey_with(user, key, hash, &mut agent)
                            .await
                    };
                    if at_once && !matches!(result, Ok(AuthResult::Success)) {
                        // Refused now (or not signed): query it first again next time.
                        accepted.remove(endpoint, &fp).await;
                        ahead.refused |=
                            with_open && matches!(result, Ok(AuthResult::Failure { .. }));
                    }
                    match result {
                        Ok(AuthResult::Success) => {
                            accepted.insert(endpoint, &fp).await;
                            ahead.rode_with_success = with_open;
                            return Ok(desc);
                        }
                        Ok(AuthResult::Failure { .. }) if handle.is_closed() => {
                            tried.push(format!("{desc}: rejected"));
                            return Err(ended(
                                handle,
                                user,
                                tried,
                                methods_remaining,
                                shared,
                                None,
                            )
                            .await);
                        }
                        Ok(AuthResult::Failure {
                            remaining_methods, ..
                        }) => {
                            tried.push(format!("{desc}: rejected"));
                            methods_remaining = method_names(&remaining_methods);
                        }
                        Err(russh::AgentAuthError::Send(_)) => {
                            return Err(ended(
                                handle,
                                user,
                                tried,
                                methods_remaining,
                                shared,
                                Some(russh::Error::SendError),
                            )
                            .await);
                        }
                        Err(russh::AgentAuthError::Key(e)) => {
                            tried.push(format!("{desc}: agent did not sign: {e}"));
                        }
                    }
                }
            }
        }
    }

    if !offered_any && let Some(e) = setup_error {
        return Err(e);
    }
    Err(TransportError::AuthRejected {
        user: user.to_string(),
        tried,
        methods_remaining,
    })
}

/// The connection ended during authentication. If the server had already rejected
/// something, this is an authentication failure with the server's parting words (sshd hangs
/// up after `MaxAuthTries`); retrying would only fail again. Otherwise the connection was
/// lost.
async fn ended(
    handle: &Handle<ClientHandler>,
    user: &str,
    mut tried: Vec<String>,
    methods_remaining: Vec<String>,
    shared: &ConnShared,
    err: Option<russh::Error>,
) -> TransportError {
    let cause = if handle.is_closed() || err.is_some() {
        Some(shared.wait_cause(CAUSE_GRACE).await)
    } else {
        None
    };
    let rejected_before = tried.iter().any(|t| t.ends_with(": rejected"));
    if rejected_before {
        if let Some(cause) = &cause {
            tried.push(format!("then the server ended the connection: {cause}"));
        }
        return TransportError::AuthRejected {
            user: user.to_string(),
            tried,
            methods_remaining,
        };
    }
    match err {
        Some(e) => classify(Stage::Auth, e, cause),
        None => TransportError::Disconnected {
            stage: Stage::Auth,
            cause: cause.unwrap_or_else(|| {
                crate::DisconnectCause::Unknown("connection ended during authentication".into())
            }),
        },
    }
}
