//! The NBD server: listeners, the accept loop, connection limits and shutdown.
//!
//! Threads, not async: each connection runs its handshake on its own thread and
//! then serves requests on a lazily grown pool of workers (see [`crate::connection`]).
//! Storage I/O is blocking `pread`/`pwrite`/`fdatasync`, so a thread per request in
//! flight is what an async runtime would do on its blocking pool anyway — minus
//! the hand-offs. The rest of ferry (agent, API) can embed a [`Server`] and stop
//! it with [`Server::shutdown`].

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
use std::time::Duration;

use crate::connection::{self, ConnectionError, ConnectionLimits, Ending};
use crate::device::BlockDevice;
use crate::handshake::ExportInfo;

/// Server-wide limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once, over all listeners; more are closed on accept.
    pub max_connections: usize,
    /// A client must pick an export within this time after connecting.
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
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
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
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Listener({})", self.local)
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
                })
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path).map_err(bind_err)?;
                Ok(Listener {
                    kind: ListenerKind::Unix(l, path.clone()),
                    local: addr.clone(),
                })
            }
        }
    }

    pub fn local_addr(&self) -> &ListenAddr {
        &self.local
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
    pub connections_refused: AtomicU64,
    pub connections_active: AtomicUsize,
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
    /// Open connections: the export they use (once chosen) and a handle to close them.
    live: Mutex<HashMap<u64, (Option<String>, Stream)>>,
    listeners: Mutex<Vec<Arc<Listener>>>,
    stats: ServerStats,
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
        for (export, s) in self
            .inner
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if export.as_deref() == Some(name) {
                s.shutdown();
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
        for s in self
            .inner
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            s.1.shutdown();
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
        let active = inner
            .stats
            .connections_active
            .fetch_add(1, Ordering::SeqCst);
        if active >= inner.limits.max_connections {
            inner
                .stats
                .connections_active
                .fetch_sub(1, Ordering::SeqCst);
            inner
                .stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max_connections = inner.limits.max_connections,
                "nbd.connection.refused: max_connections reached");
            stream.shutdown();
            continue;
        }
        inner
            .stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let conn_inner = inner.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                run_connection(&conn_inner, id, stream, &peer);
                conn_inner
                    .stats
                    .connections_active
                    .fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            inner
                .stats
                .connections_active
                .fetch_sub(1, Ordering::SeqCst);
            tracing::error!(error = %e, "nbd.connection.spawn_failed");
        }
    }
    tracing::info!(listen = %listener.local, "nbd.listen.stopped");
}

fn run_connection(inner: &Inner, id: u64, stream: Stream, peer: &str) {
    let result = serve_stream(inner, id, stream, peer);
    inner
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
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
) -> Result<Option<(String, Ending)>, ConnectionError> {
    let control = stream.try_clone()?;
    {
        let mut live = inner.live.lock().unwrap_or_else(|p| p.into_inner());
        if inner.stopping.load(Ordering::SeqCst) {
            return Ok(None);
        }
        live.insert(id, (None, control.try_clone()?));
    }
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let timeout = Duration::from_millis(inner.limits.handshake_timeout_ms.max(1));
    reader.get_ref().set_read_timeout(Some(timeout))?;
    let limits = &inner.limits.connection;
    let catalog = inner.catalog();
    let Some(session) = connection::handshake(&mut reader, &mut writer, &catalog.infos, limits)?
    else {
        return Ok(None);
    };
    reader.get_ref().set_read_timeout(None)?;
    let export = &catalog.exports[session.export];
    if let Some(entry) = inner
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&id)
    {
        entry.0 = Some(export.name.clone());
    }
    // Removed while we negotiated: do not serve it.
    if !inner
        .catalog()
        .exports
        .iter()
        .any(|e| Arc::ptr_eq(e, export))
    {
        return Ok(None);
    }
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
        limits,
        &close,
    )?;
    control.shutdown();
    Ok(Some((export.name.clone(), ending)))
}
