//! The local store: the Nix store on the machine nixmux runs on, reached with the worker
//! protocol (its daemon socket, or `nix-daemon --stdio` when running as root without a
//! daemon). Closure pushes read NARs from it and fetched outputs are written into it; nixmux
//! never shells out to `nix copy`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixmux_proto::derivation::Derivation;
use nixmux_proto::path_info::PathInfo;
use nixmux_proto::store_path::{StoreDir, StorePath};
use nixmux_session::process::{self, ChildGuard};
use nixmux_session::{
    BoxReader, BoxWriter, SessionConfig, SessionError, Upload, WorkerConfig, WorkerSession,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use crate::error::{Error, ErrorKind, Result, from_session};
use crate::nar_pipe::ChunkWriter;
use crate::store_files::{FilesError, StoreFiles};

/// The default daemon socket of a multi-user Nix installation.
pub const DEFAULT_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// How to reach the local store.
#[derive(Clone)]
pub enum LocalStoreAccess {
    /// A daemon socket.
    Socket(PathBuf),
    /// A command speaking the worker protocol on its stdio (`nix-daemon --stdio`), built by
    /// the given function for every session.
    Command(Arc<dyn Fn() -> tokio::process::Command + Send + Sync>),
}

impl std::fmt::Debug for LocalStoreAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalStoreAccess::Socket(p) => write!(f, "Socket({})", p.display()),
            LocalStoreAccess::Command(_) => f.write_str("Command(..)"),
        }
    }
}

struct LocalSession {
    session: WorkerSession,
    _guard: Option<ChildGuard>,
    _counted: CountGuard,
}

/// Counts one in a counter for as long as it lives (a local session in [`LocalStore::open`]
/// from the moment it starts; a start in [`LocalStore::starting`]).
struct CountGuard(Arc<AtomicUsize>);

impl CountGuard {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        CountGuard(open.clone())
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// With this many local sessions open (or on their way), a caller finding none idle waits for
/// one to come back before it opens another: most local operations (a query, a `.drv`, a log)
/// take well under a millisecond, while a new session may be a `nix-daemon --stdio` process
/// to start (tens of milliseconds, more when a wave of builds starts or ends together and
/// every one of them asks at once). It waits as long as sessions are still starting (they
/// come back soon after their first use), and [`LOCAL_SESSION_WAIT`] more; then it opens its
/// own, so long operations (a NAR streamed for minutes) never hold anyone up for long.
const LOCAL_SESSIONS_BEFORE_WAITING: usize = 4;
const LOCAL_SESSION_WAIT: Duration = Duration::from_millis(20);

/// The local store, with a few warm worker sessions.
pub struct LocalStore {
    access: LocalStoreAccess,
    dir: StoreDir,
    config: SessionConfig,
    idle: Mutex<Vec<LocalSession>>,
    /// Signalled when a session goes back to `idle`.
    returned: Notify,
    /// Sessions open, idle or leased, or starting.
    open: Arc<AtomicUsize>,
    /// Sessions starting.
    starting: Arc<AtomicUsize>,
    /// Derivations already read and parsed ([`LocalStore::read_derivation`]).
    derivations: Mutex<HashMap<StorePath, Arc<Derivation>>>,
    /// Where the store's files are on this machine, for pushes to read NARs from them
    /// ([`crate::store_files`]); `None`: always through the daemon.
    files: Option<StoreFiles>,
}

/// Most parsed derivations [`LocalStore`] keeps. A `.drv` is a few KiB parsed; a build graph
/// of a whole NixOS system is some tens of thousands of them.
const DERIVATION_CACHE_CAP: usize = 65_536;

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("access", &self.access)
            .field("files", &self.files.as_ref().map(StoreFiles::dir))
            .finish_non_exhaustive()
    }
}

/// A local session checked out for one operation; returned when the operation succeeded.
pub(crate) struct LocalLease<'a> {
    store: &'a LocalStore,
    session: Option<LocalSession>,
    ok: bool,
}

impl LocalLease<'_> {
    /// Streams the NAR of `info.path` into `out`, checked against `info`: read from the
    /// store's files when it can be ([`LocalStore::with_store_files`]; the daemon still
    /// serves a path missing there), else from the daemon.
    pub(crate) async fn read_nar(&mut self, info: &PathInfo, out: &mut ChunkWriter) -> Result<()> {
        if let Some(files) = self.store.files()
            && let Some(tx) = out.sender()
        {
            match files.send(info, tx).await {
                Ok(()) => return Ok(()),
                Err(FilesError::Unavailable(e)) => {
                    tracing::debug!(path = %info.path, error = %e, "not in the store's files: asking the daemon");
                }
                Err(e) => return Err(e.into_error(info)),
            }
        }
        self.read_nar_checked(info, out).await
    }

    /// Streams the NAR of `info.path` from the daemon into `sink` and checks it against
    /// `info`, the local store's own metadata (the builder checks it again).
    async fn read_nar_checked(
        &mut self,
        info: &PathInfo,
        sink: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<()> {
        let sum = self
            .get()
            .nar_from_path(&info.path, sink, &mut |_| {})
            .await
            .map_err(|e| read_failed(&info.path, e))?;
        if sum.nar_hash != Some(info.nar_hash) || sum.nar_size != info.nar_size {
            return Err(nar_mismatch(&info.path));
        }
        Ok(())
    }

    /// Adds paths fetched from a builder (dependencies first), the NAR of `infos[i]` read
    /// from `readers[i]`, as pipelined `AddToStoreNar`s; the local daemon checks each NAR
    /// against its narHash and narSize.
    pub(crate) async fn add_fetched<'i, R: AsyncRead + Unpin + Send>(
        &mut self,
        infos: impl Iterator<Item = &'i PathInfo>,
        readers: &mut [R],
    ) -> Result<()> {
        let mut uploads: Vec<Upload<'_>> = infos
            .zip(readers.iter_mut())
            .map(|(info, r)| Upload {
                info: PathInfo {
                    // The builder's signatures and trust do not carry over; the local store
                    // trusts what we fetched because we asked for it.
                    ultimate: false,
                    ..info.clone()
                },
                nar: r,
            })
            .collect();
        self.get()
            .add_paths(&mut uploads, false, true, &mut |_| {})
            .await
            .map_err(|e| {
                // The local store hashes every NAR before it registers the path; a NAR it
                // finds to be something else came from the builder so.
                let fetched_wrong = match &e {
                    SessionError::UploadMismatch { .. } => Some(e.to_string()),
                    SessionError::Remote(r) => {
                        let text = r.plain_message();
                        (text.contains("hash mismatch importing path")
                            || text.contains("size mismatch importing path"))
                        .then(|| text.trim_end().to_owned())
                    }
                    _ => None,
                };
                match fetched_wrong {
                    Some(said) => Error::remote(
                        ErrorKind::Verification,
                        format!(
                            "a fetched NAR does not match the builder's metadata; the local store says: {said}"
                        ),
                    ),
                    None => Error::local(
                        ErrorKind::LocalStore,
                        format!(
                            "adding fetched paths to the local store: {}",
                            from_session(e).message()
                        ),
                    ),
                }
            })
    }

    pub(crate) fn get(&mut self) -> &mut WorkerSession {
        &mut self
            .session
            .as_mut()
            .expect("a lease holds its session until dropped")
            .session
    }

    pub(crate) fn succeeded(&mut self) {
        self.ok = true;
    }
}

impl Drop for LocalLease<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take()
            && self.ok
            && s.session.is_usable()
            && let Ok(mut idle) = self.store.idle.lock()
        {
            idle.push(s);
            drop(idle);
            self.store.returned.notify_waiters();
        }
    }
}

impl LocalStore {
    /// A local store reached through `access`.
    pub fn new(access: LocalStoreAccess) -> Self {
        LocalStore {
            access,
            dir: StoreDir::default(),
            config: SessionConfig::default(),
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            open: Arc::new(AtomicUsize::new(0)),
            starting: Arc::new(AtomicUsize::new(0)),
            derivations: Mutex::new(HashMap::new()),
            files: Some(StoreFiles::new(PathBuf::from(StoreDir::default().as_str()))),
        }
    }

    /// Where this store's paths are on this machine's file system, for pushes to read their
    /// NARs directly as Nix does for a local store, instead of through the daemon (a third
    /// of a loopback push's CPU). Default: the store directory itself (`/nix/store`). A
    /// store whose files are elsewhere (a chroot store `local?root=DIR`, a private mount
    /// namespace) names its real directory here; `None` always asks the daemon.
    ///
    /// NARs read from files are hashed and checked against the daemon's records until one
    /// matches (then only their sizes are: the builder checks hashes); files that do not match
    /// fail that transfer and are not read again; a path missing there is asked of the daemon.
    #[must_use]
    pub fn with_store_files(mut self, dir: Option<PathBuf>) -> Self {
        self.files = dir.map(StoreFiles::new);
        self
    }

    /// NARs pushes read from the store's files so far (the rest came through the daemon).
    pub fn nars_read_from_files(&self) -> u64 {
        self.files.as_ref().map_or(0, StoreFiles::sent)
    }

    /// The store's files, while NARs are read from them.
    pub(crate) fn files(&self) -> Option<&StoreFiles> {
        self.files.as_ref().filter(|f| f.usable())
    }

    /// The daemon socket if there is one, else `nix-daemon --stdio` (which serves the store
    /// directly when run as root).
    pub fn auto() -> Self {
        let socket = std::env::var_os("NIX_DAEMON_SOCKET_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DAEMON_SOCKET));
        if socket.exists() {
            Self::new(LocalStoreAccess::Socket(socket))
        } else {
            Self::new(LocalStoreAccess::Command(Arc::new(|| {
                let mut c = tokio::process::Command::new("nix-daemon");
                c.arg("--stdio");
                c
            })))
        }
    }

    /// The store directory.
    pub fn store_dir(&self) -> &StoreDir {
        &self.dir
    }

    async fn connect(&self) -> Result<LocalSession> {
        // Counted while it starts too: a burst of callers must see the sessions on their way.
        let counted = CountGuard::new(&self.open);
        let _starting = CountGuard::new(&self.starting);
        let (reader, writer, guard, config): (BoxReader, BoxWriter, _, _) = match &self.access {
            LocalStoreAccess::Socket(path) => {
                let s = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                    Error::local(
                        ErrorKind::LocalStore,
                        format!(
                            "cannot connect to the Nix daemon at {}: {e}",
                            path.display()
                        ),
                    )
                })?;
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w), None, self.config.clone())
            }
            LocalStoreAccess::Command(make) => {
                let pipes = process::spawn(make()).map_err(|e| {
                    Error::local(
                        ErrorKind::LocalStore,
                        format!("cannot start the local nix-daemon --stdio: {e}"),
                    )
                })?;
                let mut config = self.config.clone();
                config.diagnostics = Some(Arc::new(pipes.stderr.clone()));
                (pipes.reader, pipes.writer, Some(pipes.guard), config)
            }
        };
        let wc = WorkerConfig {
            options: None,
            ..WorkerConfig::default()
        };
        let session =
            WorkerSession::handshake(reader, writer, self.dir.clone(), config, &wc, &mut |_| {})
                .await
                .map_err(|e| local_err(e, "handshake with the local store"))?;
        Ok(LocalSession {
            session,
            _guard: guard,
            _counted: counted,
        })
    }

    pub(crate) async fn lease(&self) -> Result<LocalLease<'_>> {
        let session = match self.take_idle() {
            Some(s) => s,
            None if self.open.load(Ordering::Relaxed) >= LOCAL_SESSIONS_BEFORE_WAITING => {
                match self.wait_for_returned().await {
                    Some(s) => s,
                    None => self.connect().await?,
                }
            }
            None => self.connect().await?,
        };
        Ok(LocalLease {
            store: self,
            session: Some(session),
            ok: false,
        })
    }

    /// A session coming back, waited for while others are starting and
    /// [`LOCAL_SESSION_WAIT`] beyond; `None`: open one.
    async fn wait_for_returned(&self) -> Option<LocalSession> {
        let returned = self.next_returned();
        tokio::pin!(returned);
        loop {
            tokio::select! {
                s = &mut returned => return Some(s),
                () = tokio::time::sleep(LOCAL_SESSION_WAIT) => {
                    if self.starting.load(Ordering::Relaxed) == 0 {
                        return None;
                    }
                }
            }
        }
    }

    fn take_idle(&self) -> Option<LocalSession> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(s) = idle.pop() {
            if s.session.is_usable() {
                return Some(s);
            }
        }
        None
    }

    /// The next session returned to the idle list (waits for ever: the caller bounds it).
    async fn next_returned(&self) -> LocalSession {
        loop {
            let notified = self.returned.notified();
            tokio::pin!(notified);
            // Registered before looking, so a return between the look and the wait counts.
            notified.as_mut().enable();
            if let Some(s) = self.take_idle() {
                return s;
            }
            notified.await;
        }
    }

    /// Which of `paths` are valid locally.
    pub async fn query_valid_paths(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>> {
        let mut l = self.lease().await?;
        let r = l
            .get()
            .query_valid_paths(paths, false, &mut |_| {})
            .await
            .map_err(|e| local_err(e, "QueryValidPaths"));
        if r.is_ok() {
            l.succeeded();
        }
        r
    }

    /// Metadata of the valid ones among `paths` (pipelined: one round trip).
    pub async fn query_path_infos(&self, paths: &BTreeSet<StorePath>) -> Result<Vec<PathInfo>> {
        let mut l = self.lease().await?;
        let r = l
            .get()
            .query_path_infos(paths, &mut |_| {})
            .await
            .map_err(|e| local_err(e, "QueryPathInfo"));
        if r.is_ok() {
            l.succeeded();
        }
        r
    }

    /// The closure of `roots` with metadata, dependencies first. One round trip per level
    /// of the reference graph. A root that is not valid is an error.
    pub async fn closure(&self, roots: &BTreeSet<StorePath>) -> Result<Vec<PathInfo>> {
        if roots.is_empty() {
            return Ok(Vec::new());
        }
        let mut l = self.lease().await?;
        let r = closure_with(roots, &mut LocalInfos(l.get())).await;
        if r.is_ok() {
            l.succeeded();
        }
        let infos = r?;
        Ok(topo_sort(infos))
    }

    /// Stores `log` as the whole build log of `drv` (`AddBuildLog`), where `nix log` finds
    /// it: the daemon writes it to its log directory (`/nix/var/log/nix/drvs`). Needs a
    /// local user the daemon trusts (root when nixmux starts `nix-daemon --stdio` itself).
    pub async fn add_build_log(&self, drv: &StorePath, log: &[u8]) -> Result<()> {
        let mut l = self.lease().await?;
        let r = l
            .get()
            .add_build_log(drv, log, &mut |_| {})
            .await
            .map_err(|e| local_err(e, "AddBuildLog"));
        if r.is_ok() {
            l.succeeded();
        }
        r
    }

    /// The paths this store knows for the outputs of the derivation `drv`
    /// (`QueryDerivationOutputMap`): fixed ones from the `.drv`, and with `ca-derivations`
    /// enabled, the realised ones of floating outputs. Never sends `QueryRealisation`, which
    /// Nix 2.8 without `ca-derivations` answers by aborting.
    pub async fn query_derivation_output_map(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, Option<StorePath>>> {
        let mut l = self.lease().await?;
        let r = l
            .get()
            .query_derivation_output_map(drv, &mut |_| {})
            .await
            .map_err(|e| local_err(e, "QueryDerivationOutputMap"));
        if r.is_ok() {
            l.succeeded();
        }
        r
    }

    /// Records a realisation (`RegisterDrvOutput`): which path an output of a
    /// content-addressed derivation got. The path must be valid here. A local Nix without
    /// `ca-derivations` refuses it: [`ErrorKind::Unsupported`].
    pub async fn register_drv_output(
        &self,
        realisation: &nixmux_proto::worker::Realisation,
    ) -> Result<()> {
        let mut l = self.lease().await?;
        let r = l
            .get()
            .register_drv_output(realisation, &mut |_| {})
            .await
            .map_err(|e| local_err(e, "RegisterDrvOutput"));
        if r.is_ok() {
            l.succeeded();
        }
        r.map_err(|e| {
            if crate::ca::lacks_ca_feature(e.message()) {
                Error::local(
                    ErrorKind::Unsupported,
                    format!(
                        "the local store's Nix does not have the experimental feature ca-derivations enabled: {}",
                        e.message()
                    ),
                )
            } else {
                e
            }
        })
    }

    /// Reads and parses a derivation (`.drv`) of this store.
    ///
    /// Each one is read from the store once and then kept (up to [`DERIVATION_CACHE_CAP`]): a
    /// `.drv`'s store path is the hash of its text (Nix's `writeDerivation` adds it as a text
    /// file with `makeTextPath`), so what a path held once is what it holds whenever it is
    /// valid. A scheduler reads every `.drv` of its graph to plan it, and each build reads
    /// its own and its inputs' again: from the cache, a burst of builds starting together
    /// needs no local session (each of which may be a `nix-daemon` process to start).
    pub async fn read_derivation(&self, path: &StorePath) -> Result<Derivation> {
        if !path.is_derivation() {
            return Err(Error::caller(
                ErrorKind::InvalidInput,
                format!("{path} is not a derivation (.drv)"),
            ));
        }
        if let Some(d) = self
            .derivations
            .lock()
            .ok()
            .and_then(|c| c.get(path).cloned())
        {
            return Ok(Derivation::clone(&d));
        }
        let text = self.read_file(path).await?;
        let drv =
            Derivation::parse(&text, &self.dir, &nixmux_proto::Limits::DEFAULT).map_err(|e| {
                Error::local(ErrorKind::LocalStore, format!("cannot parse {path}: {e}"))
            })?;
        if let Ok(mut cache) = self.derivations.lock() {
            if cache.len() >= DERIVATION_CACHE_CAP {
                // Rare enough (a graph larger than the cap) that starting over is simpler
                // than tracking use.
                cache.clear();
            }
            cache.insert(path.clone(), Arc::new(drv.clone()));
        }
        Ok(drv)
    }

    /// The contents of a store path that is a single regular file (a `.drv`), read through
    /// the protocol so that it works whatever the local store's location.
    pub async fn read_file(&self, path: &StorePath) -> Result<Vec<u8>> {
        let mut l = self.lease().await?;
        let mut nar = Vec::new();
        let r = l
            .get()
            .nar_from_path(path, &mut nar, &mut |_| {})
            .await
            .map_err(|e| local_err(e, "NarFromPath"));
        if r.is_ok() {
            l.succeeded();
        }
        r?;
        single_file_contents(&nar).ok_or_else(|| {
            Error::local(
                ErrorKind::LocalStore,
                format!("{path} is not a single regular file"),
            )
        })
    }
}

/// Extracts the contents of a NAR holding one regular file.
fn single_file_contents(nar: &[u8]) -> Option<Vec<u8>> {
    use nixmux_proto::nar::{NarEvent, NarParser};
    let mut p = NarParser::new(nixmux_proto::Limits::DEFAULT);
    let mut out = Vec::new();
    let mut regular = false;
    let mut other = false;
    p.feed_with(nar, |ev| match ev {
        NarEvent::File { .. } => regular = true,
        NarEvent::Contents(c) => out.extend_from_slice(c),
        NarEvent::Directory | NarEvent::Symlink { .. } => other = true,
        _ => {}
    })
    .ok()?;
    (p.is_done() && regular && !other).then_some(out)
}

/// Reading a path's NAR from the local store failed.
pub(crate) fn read_failed(path: &StorePath, e: nixmux_session::SessionError) -> Error {
    Error::local(
        ErrorKind::LocalStore,
        format!(
            "reading {path} from the local store: {}",
            from_session(e).message()
        ),
    )
}

/// A NAR the local store sent does not match its own metadata.
pub(crate) fn nar_mismatch(path: &StorePath) -> Error {
    Error::local(
        ErrorKind::Verification,
        format!("local store: the NAR of {path} does not match its recorded hash or size"),
    )
}

fn local_err(e: nixmux_session::SessionError, what: &str) -> Error {
    let inner = from_session(e);
    Error::local(
        ErrorKind::LocalStore,
        format!("local store: {what}: {}", inner.message()),
    )
}

/// Something that answers "metadata of these paths" (a local or remote session).
pub(crate) trait InfoSource: Send {
    /// Metadata of the valid ones among `batch`.
    fn infos<'a>(
        &'a mut self,
        batch: &'a BTreeSet<StorePath>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<PathInfo>>> + Send + 'a>>;
}

struct LocalInfos<'a>(&'a mut WorkerSession);

impl InfoSource for LocalInfos<'_> {
    fn infos<'a>(
        &'a mut self,
        batch: &'a BTreeSet<StorePath>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<PathInfo>>> + Send + 'a>>
    {
        Box::pin(async move {
            self.0
                .query_path_infos(batch, &mut |_| {})
                .await
                .map_err(|e| local_err(e, "QueryPathInfo"))
        })
    }
}

/// Walks the reference graph from `roots`, asking `source` for one level at a time.
pub(crate) async fn closure_with(
    roots: &BTreeSet<StorePath>,
    source: &mut dyn InfoSource,
) -> Result<Vec<PathInfo>> {
    let mut seen: BTreeMap<StorePath, PathInfo> = BTreeMap::new();
    let mut frontier: BTreeSet<StorePath> = roots.clone();
    while !frontier.is_empty() {
        let infos = source.infos(&frontier).await?;
        let got: BTreeSet<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
        if let Some(missing) = frontier.difference(&got).next() {
            return Err(Error::caller(
                ErrorKind::InvalidInput,
                format!("{missing} is not valid in the store it was asked from"),
            ));
        }
        let mut next = BTreeSet::new();
        for info in infos {
            for r in &info.references {
                if !seen.contains_key(r) && !got.contains(r) {
                    next.insert(r.clone());
                }
            }
            seen.insert(info.path.clone(), info);
        }
        frontier = next;
    }
    Ok(seen.into_values().collect())
}

/// Orders path infos so that every path comes after its references (Nix's order for copies).
pub(crate) fn topo_sort(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let mut by_path: BTreeMap<StorePath, PathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut out = Vec::with_capacity(by_path.len());
    let mut done: BTreeSet<StorePath> = BTreeSet::new();
    let keys: Vec<StorePath> = by_path.keys().cloned().collect();
    for k in keys {
        visit(&k, &mut by_path, &mut done, &mut out);
    }
    out
}

fn visit(
    p: &StorePath,
    by_path: &mut BTreeMap<StorePath, PathInfo>,
    done: &mut BTreeSet<StorePath>,
    out: &mut Vec<PathInfo>,
) {
    // Iterative depth-first search: closures can be deep (long chains of references).
    let mut stack: Vec<(StorePath, bool)> = vec![(p.clone(), false)];
    while let Some((node, expanded)) = stack.pop() {
        if done.contains(&node) {
            continue;
        }
        if expanded {
            done.insert(node.clone());
            if let Some(info) = by_path.remove(&node) {
                out.push(info);
            }
            continue;
        }
        let Some(info) = by_path.get(&node) else {
            continue;
        };
        stack.push((node.clone(), true));
        for r in &info.references {
            if r != &node && !done.contains(r) && by_path.contains_key(r) {
                stack.push((r.clone(), false));
            }
        }
    }
}
