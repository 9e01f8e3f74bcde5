//! The NBD server: listeners, the accept loop, connection limits and shutdown.
//!
//! Threads, not async: each connection runs its handshake on its own thread and
//! then serves requests on a lazily grown pool of workers (see [`crate::connection`]).
//! Storage I/O is blocking `pread`/`pwrite`/`fdatasync`, so a thread per request in
//! flight is what an async runtime would do on its blocking pool anyway — minus
//! the hand-offs. The rest of ferry (agent, API) can embed a [`Server`] and stop
//! it with [`Server::shutdown`].
//!
//! **Who gets in.** A listener made with [`Listener::require_tls`] is a
//! FORCEDTLS server: nothing but `NBD_OPT_STARTTLS` is answered before the TLS
//! session is up, and the rustls config decides whose client certificate is
//! good. A Unix socket without TLS trusts whoever can connect (its directory's
//! permissions are the authentication); a plain TCP listener trusts everyone
//! and is meant for tests and fuzzing only.
//!
//! **Handshake deadline and slots.** Every connection must reach transmission
//! within `handshake_timeout_ms` of being accepted, TLS handshake included:
//! a reaper thread closes the socket of any that has not (a per-read timeout
//! would let a client sending one byte at a time stay forever). At most
//! `max_connections` connections are open; when full, a new connection takes
//! the slot of the oldest one still negotiating without a certificate (TLS
//! not up on a TLS listener; on a Unix socket, anything before transmission:
//! even a flood by a local user allowed to connect only delays clients by
//! one handshake), and is refused only if every slot is held by clients in
//! transmission or with a checked certificate — so a flood of idle
//! connections cannot keep clients out.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::connection::{self, Buffered, ConnectionError, ConnectionLimits, Ending, Negotiated};
use crate::device::BlockDevice;
use crate::handshake::{ExportInfo, Negotiator, Session, TlsMode};

/// Server-wide limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections open at once, over all listeners; when full, a new one
    /// takes the slot of the oldest unauthenticated handshake, or is closed.
    pub max_connections: usize,
    /// A client must pick an export within this time after connecting (the
    /// TLS handshake included); the socket is closed at the deadline.
    pub handshake_timeout_ms: u64,
    pub connection: ConnectionLimits,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 64,
            handshake_timeout_ms: 10_000,
            connection: ConnectionLimits::default(),
        }
    }
}

/// One export: a name and the device behind it.
pub struct Export {
    pub name: String,
    pub description: String,
    pub read_only: bool,
    pub device: Arc<dyn BlockDevice>,
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .field("size", &self.device.size())
            .finish()
    }
}

/// Where to listen: `HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Errors of the server API.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("`{0}` is not a listen address: use HOST:PORT (e.g. 127.0.0.1:10809) or unix:PATH")]
    BadListenAddr(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("unix socket path {path} exists and is not a socket; remove it or pick another path")]
    SocketPathInUse { path: PathBuf },
    #[error("export name {0:?} is used twice")]
    DuplicateExport(String),
    #[error("invalid limit: {0}")]
    BadLimit(&'static str),
    #[error("cannot start a thread: {0}")]
    Spawn(io::Error),
}

impl FromStr for ListenAddr {
    type Err = ServerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ServerError::BadListenAddr(s.to_string()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        use std::net::ToSocketAddrs;
        // Resolve names like localhost:10809 too; take the first address.
        s.to_socket_addrs()
            .ok()
            .and_then(|mut it| it.next())
            .map(ListenAddr::Tcp)
            .ok_or_else(|| ServerError::BadListenAddr(s.to_string()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl ListenAddr {
    /// The `nbd://` URI a client uses to reach `export` here.
    pub fn uri(&self, export: &str) -> String {
        match self {
            ListenAddr::Tcp(SocketAddr::V4(a)) => {
                format!("nbd://{}:{}/{}", a.ip(), a.port(), export)
            }
            ListenAddr::Tcp(SocketAddr::V6(a)) => {
                format!("nbd://[{}]:{}/{}", a.ip(), a.port(), export)
            }
            ListenAddr::Unix(p) => format!("nbd+unix:///{}?socket={}", export, p.display()),
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Tcp(_) => "Stream::Tcp",
            Stream::Unix(_) => "Stream::Unix",
        })
    }
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum ListenerKind {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound listener, not yet accepting.
pub struct Listener {
    kind: ListenerKind,
    local: ListenAddr,
    /// TLS with this config is required before any option is answered.
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Listener({}{})",
            self.local,
            if self.tls.is_some() { ", TLS" } else { "" }
        )
    }
}

impl Listener {
    /// Binds `addr`. Port 0 picks a free port; [`Listener::local_addr`] tells which.
    /// A stale unix socket file (no one listening) is replaced.
    pub fn bind(addr: &ListenAddr) -> Result<Listener, ServerError> {
        let bind_err = |source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(bind_err)?;
                let local = ListenAddr::Tcp(l.local_addr().map_err(bind_err)?);
                Ok(Listener {
                    kind: ListenerKind::Tcp(l),
                    local,
                    tls: None,
                })
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path).map_err(bind_err)?;
                Ok(Listener {
                    kind: ListenerKind::Unix(l, path.clone()),
                    local: addr.clone(),
                    tls: None,
                })
            }
        }
    }

    pub fn local_addr(&self) -> &ListenAddr {
        &self.local
    }

    /// Requires TLS on this listener (FORCEDTLS): every option before
    /// `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_TLS_REQD`, and `config` (its
    /// client-certificate verifier) decides who gets in.
    pub fn require_tls(mut self, config: Arc<rustls::ServerConfig>) -> Listener {
        self.tls = Some(config);
        self
    }

    pub fn requires_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The URI a client uses to reach `export` here: `nbds://` when TLS is
    /// required (the client adds its certificates, e.g. libnbd's
    /// `?tls-certificates=DIR`).
    pub fn uri(&self, export: &str) -> String {
        let plain = self.local.uri(export);
        if self.tls.is_none() {
            return plain;
        }
        if let Some(rest) = plain.strip_prefix("nbd+unix://") {
            format!("nbds+unix://{rest}")
        } else if let Some(rest) = plain.strip_prefix("nbd://") {
            format!("nbds://{rest}")
        } else {
            plain
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match &self.kind {
            ListenerKind::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            ListenerKind::Unix(l, path) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), format!("unix:{}", path.display())))
            }
        }
    }

    /// Makes a blocked `accept` return (Linux answers `EINVAL` after `shutdown`).
    fn wake(&self) {
        let fd = match &self.kind {
            ListenerKind::Tcp(l) => l.as_raw_fd(),
            ListenerKind::Unix(l, _) => l.as_raw_fd(),
        };
        // SAFETY: shutdown(2) on a listening socket we own; it only changes the
        // socket's state and does not touch memory.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerKind::Unix(_, path) = &self.kind {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::SocketPathInUse {
            path: path.to_path_buf(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ServerError::Bind {
            addr: format!("unix:{}", path.display()),
            source: io::Error::new(
                io::ErrorKind::AddrInUse,
                "another server is listening there",
            ),
        });
    }
    std::fs::remove_file(path).map_err(|source| ServerError::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    })
}

/// Counters of one server, readable at any time.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections_accepted: AtomicU64,
    /// Closed on accept: every slot held by an authenticated client.
    pub connections_refused: AtomicU64,
    /// Unauthenticated handshakes closed to make room for a new connection.
    pub connections_evicted: AtomicU64,
    /// Handshakes closed at `handshake_timeout_ms`.
    pub handshakes_timed_out: AtomicU64,
    pub connections_active: AtomicUsize,
}

/// Where a connection stands, for the handshake deadline and eviction.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Negotiating without a certificate: before the TLS session is up on a
    /// TLS listener, anything before transmission on another. Evictable,
    /// and evicted first while the client has not said a word (not even its
    /// flags after the greeting): an idle flood then evicts itself, never a
    /// client in the middle of its handshake.
    Unauthenticated,
    /// Unauthenticated, but the client answered the greeting. Evicted only
    /// when no silent connection is left.
    Talking,
    /// The TLS session is up (the client's certificate checked), still
    /// negotiating.
    Negotiating,
    /// In transmission on this export: no deadline any more.
    Serving(String),
}

/// One open connection.
struct Live {
    phase: Phase,
    accepted: Instant,
    /// A handle to close it.
    control: Stream,
}

/// The exports at one moment; connections keep the snapshot they negotiated with.
struct Catalog {
    exports: Vec<Arc<Export>>,
    infos: Vec<ExportInfo>,
}

struct Inner {
    catalog: std::sync::RwLock<Arc<Catalog>>,
    limits: ServerLimits,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Open connections; a connection no longer in it (evicted, timed out)
    /// goes no further.
    live: Mutex<HashMap<u64, Live>>,
    listeners: Mutex<Vec<Arc<Listener>>>,
    stats: ServerStats,
    reaper_started: AtomicBool,
    /// When a refusal or eviction was last logged (ms since `epoch`), so a
    /// flood of connections does not flood the log.
    last_flood_log_ms: AtomicU64,
    epoch: Instant,
}

/// An NBD server over a set of exports that can change while it runs. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.catalog().exports)
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl Server {
    pub fn new(exports: Vec<Export>, limits: ServerLimits) -> Result<Server, ServerError> {
        if limits.max_connections == 0 {
            return Err(ServerError::BadLimit("max_connections must be at least 1"));
        }
        if limits.connection.max_in_flight_per_connection == 0 {
            return Err(ServerError::BadLimit(
                "max_in_flight_per_connection must be at least 1",
            ));
        }
        if limits.connection.max_request_bytes < 512
            || limits.connection.max_request_bytes > (1 << 30)
        {
            return Err(ServerError::BadLimit(
                "max_request_bytes must be between 512 B and 1 GiB",
            ));
        }
        let catalog = build_catalog(exports.into_iter().map(Arc::new).collect(), &limits)?;
        Ok(Server {
            inner: Arc::new(Inner {
                catalog: std::sync::RwLock::new(Arc::new(catalog)),
                limits,
                stopping: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                live: Mutex::new(HashMap::new()),
                listeners: Mutex::new(Vec::new()),
                stats: ServerStats::default(),
                reaper_started: AtomicBool::new(false),
                last_flood_log_ms: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        })
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.inner.catalog()
    }

    /// Names of the current exports.
    pub fn export_names(&self) -> Vec<String> {
        self.catalog()
            .exports
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// Adds an export; new connections can pick it at once.
    pub fn add_export(&self, export: Export) -> Result<(), ServerError> {
        let mut guard = self
            .inner
            .catalog
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut exports = guard.exports.clone();
        exports.push(Arc::new(export));
        *guard = Arc::new(build_catalog(exports, &self.inner.limits)?);
        Ok(())
    }

    /// Removes an export from new connections and closes the connections using it.
    /// Returns whether it existed.
    pub fn remove_export(&self, name: &str) -> bool {
        let mut guard = self
            .inner
            .catalog
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let before = guard.exports.len();
        let exports: Vec<_> = guard
            .exports
            .iter()
            .filter(|e| e.name != name)
            .cloned()
            .collect();
        if exports.len() == before {
            return false;
        }
        if let Ok(c) = build_catalog(exports, &self.inner.limits) {
            *guard = Arc::new(c);
        }
        drop(guard);
        for c in self
            .inner
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if matches!(&c.phase, Phase::Serving(e) if e == name) {
                c.control.shutdown();
            }
        }
        true
    }

    pub fn stats(&self) -> &ServerStats {
        &self.inner.stats
    }

    /// Starts accepting on `listener` in a new thread; returns when it is accepting.
    pub fn serve(&self, listener: Listener) -> Result<JoinHandle<()>, ServerError> {
        let listener = Arc::new(listener);
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener.clone());
        if !self.inner.reaper_started.swap(true, Ordering::SeqCst) {
            let weak = Arc::downgrade(&self.inner);
            let spawned = std::thread::Builder::new()
                .name("nbd-deadline".into())
                .spawn(move || reaper(weak));
            if let Err(e) = spawned {
                self.inner.reaper_started.store(false, Ordering::SeqCst);
                return Err(ServerError::Spawn(e));
            }
        }
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(inner, listener))
            .map_err(ServerError::Spawn)
    }

    /// Stops accepting, closes every connection. In-flight requests finish first.
    pub fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        // Taken out of the list: once its accept thread ends, a listener's
        // last reference is gone and a Unix socket file is removed — not
        // only when the last connection thread lets go of the server.
        let listeners = std::mem::take(
            &mut *self
                .inner
                .listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for l in &listeners {
            l.wake();
        }
        drop(listeners);
        for c in self
            .inner
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            c.control.shutdown();
        }
    }
}

impl Inner {
    fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves connection `id` on; `false` when it was closed meanwhile
    /// (evicted, timed out, server stopping): it must go no further.
    fn advance(&self, id: u64, phase: Phase) -> bool {
        match self.live().get_mut(&id) {
            Some(c) if !self.stopping.load(Ordering::SeqCst) => {
                c.phase = phase;
                true
            }
            _ => false,
        }
    }

    /// Whether a refusal or eviction may be logged now (once a second).
    fn may_log_flood(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_flood_log_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .last_flood_log_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Closes every connection still negotiating `handshake_timeout_ms` after
/// it was accepted. Ends with the server.
fn reaper(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let timeout = Duration::from_millis(inner.limits.handshake_timeout_ms.max(1));
        let tick = (timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(100));
        {
            let mut live = inner.live();
            let late: Vec<u64> = live
                .iter()
                .filter(|(_, c)| {
                    !matches!(c.phase, Phase::Serving(_)) && c.accepted.elapsed() >= timeout
                })
                .map(|(id, _)| *id)
                .collect();
            for id in late {
                if let Some(c) = live.remove(&id) {
                    c.control.shutdown();
                    inner
                        .stats
                        .handshakes_timed_out
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        conn = id,
                        timeout_ms = inner.limits.handshake_timeout_ms,
                        "nbd.handshake.timed_out"
                    );
                }
            }
            inner
                .stats
                .connections_active
                .store(live.len(), Ordering::SeqCst);
        }
        drop(inner);
        std::thread::sleep(tick);
    }
}

fn build_catalog(exports: Vec<Arc<Export>>, limits: &ServerLimits) -> Result<Catalog, ServerError> {
    let mut infos: Vec<ExportInfo> = Vec::with_capacity(exports.len());
    for e in &exports {
        if infos.iter().any(|i| i.name == e.name) {
            return Err(ServerError::DuplicateExport(e.name.clone()));
        }
        infos.push(ExportInfo {
            name: e.name.clone(),
            description: e.description.clone(),
            size: e.device.size(),
            read_only: e.read_only,
            min_block_bytes: 1,
            preferred_block_bytes: 4096,
            max_block_bytes: limits.connection.max_request_bytes,
        });
    }
    Ok(Catalog { exports, infos })
}

fn accept_loop(inner: Arc<Inner>, listener: Arc<Listener>) {
    tracing::info!(listen = %listener.local, "nbd.listen");
    loop {
        let accepted = listener.accept();
        if inner.stopping.load(Ordering::SeqCst) {
            break;
        }
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "nbd.accept.failed");
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let control = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "nbd.accept.failed");
                continue;
            }
        };
        {
            let mut live = inner.live();
            if inner.stopping.load(Ordering::SeqCst) {
                break;
            }
            if live.len() >= inner.limits.max_connections {
                // The oldest connection that has not authenticated gives
                // way: a silent one first, then one that is talking.
                let oldest = |phase: Phase| {
                    live.iter()
                        .filter(|(_, c)| c.phase == phase)
                        .min_by_key(|(_, c)| c.accepted)
                        .map(|(id, _)| *id)
                };
                let victim = oldest(Phase::Unauthenticated).or_else(|| oldest(Phase::Talking));
                match victim.and_then(|v| live.remove(&v)) {
                    Some(old) => {
                        old.control.shutdown();
                        inner
                            .stats
                            .connections_evicted
                            .fetch_add(1, Ordering::Relaxed);
                        if inner.may_log_flood() {
                            tracing::warn!(%peer, max_connections = inner.limits.max_connections,
                                evicted_total = inner.stats.connections_evicted.load(Ordering::Relaxed),
                                "nbd.connection.evicted: max_connections reached; the oldest unauthenticated handshake was closed");
                        }
                    }
                    None => {
                        inner
                            .stats
                            .connections_refused
                            .fetch_add(1, Ordering::Relaxed);
                        if inner.may_log_flood() {
                            tracing::warn!(%peer, max_connections = inner.limits.max_connections,
                                refused_total = inner.stats.connections_refused.load(Ordering::Relaxed),
                                "nbd.connection.refused: max_connections reached by authenticated clients");
                        }
                        stream.shutdown();
                        continue;
                    }
                }
            }
            live.insert(
                id,
                Live {
                    phase: Phase::Unauthenticated,
                    accepted: Instant::now(),
                    control,
                },
            );
            inner
                .stats
                .connections_active
                .store(live.len(), Ordering::SeqCst);
        }
        inner
            .stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let conn_inner = inner.clone();
        let tls = listener.tls.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || run_connection(&conn_inner, id, stream, &peer, tls));
        if let Err(e) = spawned {
            if let Some(c) = inner.live().remove(&id) {
                c.control.shutdown();
            }
            tracing::error!(error = %e, "nbd.connection.spawn_failed");
        }
    }
    tracing::info!(listen = %listener.local, "nbd.listen.stopped");
}

fn run_connection(
    inner: &Inner,
    id: u64,
    stream: Stream,
    peer: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let result = serve_stream(inner, id, stream, peer, tls);
    {
        let mut live = inner.live();
        live.remove(&id);
        inner
            .stats
            .connections_active
            .store(live.len(), Ordering::SeqCst);
    }
    match result {
        Ok(Some((export, Ending::Disconnect))) => {
            tracing::info!(conn = id, %peer, export, "nbd.connection.closed: client disconnected")
        }
        Ok(Some((export, Ending::Closed))) => {
            tracing::info!(conn = id, %peer, export, "nbd.connection.closed: socket closed")
        }
        Ok(None) => tracing::debug!(conn = id, %peer, "nbd.connection.closed during handshake"),
        Err(e) => tracing::warn!(conn = id, %peer, error = %e, "nbd.connection.dropped"),
    }
}

fn serve_stream(
    inner: &Inner,
    id: u64,
    stream: Stream,
    peer: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<Option<(String, Ending)>, ConnectionError> {
    let control = stream.try_clone()?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let limits = &inner.limits.connection;
    let catalog = inner.catalog();
    let mode = if tls.is_some() {
        TlsMode::Required
    } else {
        TlsMode::Off
    };
    let mut n = Negotiator::with_tls(&catalog.infos, limits.negotiation, mode);
    // In transmission (no deadline, not evictable) before the client hears
    // so: else a client that got its reply could still lose its slot.
    let mut ready = |session: &Session| {
        let export = &catalog.exports[session.export];
        // Serving first, then the check: remove_export changes the catalog,
        // then closes the connections serving the export.
        inner.advance(id, Phase::Serving(export.name.clone()))
            // Removed while we negotiated: do not serve it.
            && inner
                .catalog()
                .exports
                .iter()
                .any(|e| Arc::ptr_eq(e, export))
    };
    // No timeouts on the socket: the reaper closes it at the handshake deadline.
    if !connection::greet(&mut reader, &mut writer, &mut n)? {
        return Ok(None);
    }
    if !inner.advance(id, Phase::Talking) {
        return Ok(None);
    }
    let session = match connection::negotiate(&mut reader, &mut writer, &mut n, &mut ready)? {
        Negotiated::Ended => return Ok(None),
        Negotiated::Session(session) => session,
        Negotiated::StartTls => {
            let Some(config) = tls else {
                // A negotiator without TLS never asks for it.
                return Err(ConnectionError::Handshake(
                    crate::handshake::HandshakeError::TlsRequired,
                ));
            };
            // A client must wait for the ACK before its ClientHello: bytes
            // already here were sent in clear and must not be taken as if
            // they had come through TLS.
            if !reader.buffer().is_empty() {
                return Err(ConnectionError::PlaintextAfterStartTls);
            }
            let mut sock = reader.into_inner();
            let conn = crate::tls::accept(config, &mut sock).map_err(ConnectionError::Tls)?;
            if !inner.advance(id, Phase::Negotiating) {
                return Ok(None);
            }
            tracing::debug!(conn = id, %peer, version = ?conn.protocol_version(), "nbd.tls.established");
            let (mut reader, mut writer) = crate::tls::split(conn, sock, writer);
            n.tls_started();
            return match connection::negotiate(&mut reader, &mut writer, &mut n, &mut ready)? {
                Negotiated::Session(session) => {
                    serve_session(inner, id, peer, &catalog, session, reader, writer, &control)
                }
                // A second STARTTLS is answered NBD_REP_ERR_INVALID, never StartTls.
                Negotiated::Ended | Negotiated::StartTls => Ok(None),
            };
        }
    };
    serve_session(inner, id, peer, &catalog, session, reader, writer, &control)
}

/// The transmission phase of a negotiated session, over either transport.
#[allow(clippy::too_many_arguments)]
fn serve_session<R, W>(
    inner: &Inner,
    id: u64,
    peer: &str,
    catalog: &Catalog,
    session: Session,
    reader: R,
    writer: W,
    control: &Stream,
) -> Result<Option<(String, Ending)>, ConnectionError>
where
    R: Buffered + Send,
    W: Write + Send + 'static,
{
    // `ready` (in serve_stream) moved it to Phase::Serving already.
    let export = &catalog.exports[session.export];
    tracing::info!(conn = id, %peer, export = %export.name,
        structured = session.structured_replies, base_allocation = session.base_allocation,
        "nbd.connection.open");
    let close = || control.shutdown();
    let ending = connection::transmission(
        reader,
        writer,
        &*export.device,
        &catalog.infos[session.export],
        session,
        &inner.limits.connection,
        &close,
    )?;
    control.shutdown();
    Ok(Some((export.name.clone(), ending)))
}
