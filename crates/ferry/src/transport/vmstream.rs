//! A byte tunnel for a VM's live-migration stream: between a Unix socket on
//! the source node (QEMU's `migrate uri=unix:…` connects to it) and a Unix
//! socket on the target node (QEMU's `-incoming`/`migrate-incoming`
//! listener), carried over the mutual-TLS replication transport (the
//! listener and dialer volume links use). Never plain TCP between nodes.
//!
//! ```text
//!  source agent (dials)                              target agent (listener)
//!   VmStream{JSON {workload, token}}            ─▶   resolve(hello) → local socket path,
//!                                                    connect to it (retried briefly)
//!                                              ◀─   VmStream{JSON {refused: null | reason}}
//!   then, both ways, until either end closes:
//!   VmStream{payload = stream bytes}            ─▶ / ◀─
//!   VmStream{empty} = "this direction ended"    ─▶ / ◀─
//!   Error{reason}   = the sender failed          ─▶ / ◀─
//! ```
//!
//! The stream's bytes travel in `VmStream` frames (at most
//! [`VMSTREAM_CHUNK_BYTES`] of payload each, CRC-checked like every frame).
//! When one end's local socket reaches EOF, its side sends the empty frame
//! after every byte before it; the other side writes what it received to its
//! local socket, shuts that socket down and answers with its own empty frame;
//! both sides then close everything (bytes still travelling the other way
//! are dropped: a migration stream ends when either QEMU closes it). A side
//! that does not hear the peer's end within `drain_timeout_ms`, or no byte
//! either way within `idle_timeout_ms`, closes with an error. Nothing here
//! knows about VMs, QEMU or workloads beyond the session's name and token.

// The live move (issue 23) calls these; until it is wired in, only tests do.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_wire::{FrameHeader, Kind};
use serde::{Deserialize, Serialize};

use super::dial::Dialer;
use super::inbound::Inbound;
use super::tls_io::SharedTls;

/// Largest hello or reply frame payload (bytes).
pub const VMSTREAM_HELLO_BYTES_MAX: u32 = 4096;
/// Longest workload name and token in a hello (bytes each).
pub const VMSTREAM_FIELD_BYTES_MAX: usize = 256;
/// A refusal's reason is cut to this many characters.
pub const VMSTREAM_REASON_CHARS_MAX: usize = 500;
/// Stream bytes per frame at most.
pub const VMSTREAM_CHUNK_BYTES: usize = 256 * 1024;
/// How often blocked reads look at the stop flag and the idle clock.
const POLL: Duration = Duration::from_millis(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The source's first frame: which session it is.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStreamHello {
    pub workload: String,
    /// The session token the target handed out for this move.
    pub token: String,
}

impl std::fmt::Debug for VmStreamHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmStreamHello")
            .field("workload", &self.workload)
            .finish_non_exhaustive()
    }
}

/// The target's answer: `refused: None` is "ready".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStreamReply {
    pub refused: Option<String>,
}

/// The tunnel's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelLimits {
    /// Source: how long the local listener waits for QEMU's one connection.
    pub accept_timeout_ms: u64,
    /// Target: how long connecting to the local socket is retried.
    pub connect_timeout_ms: u64,
    /// Either side: no byte either way for this long ends the tunnel.
    pub idle_timeout_ms: u64,
    /// Source: how long the target's ready/refused answer may take.
    pub ready_timeout_ms: u64,
    /// Either side: once one direction ended, how long the peer may take to
    /// confirm the end.
    pub drain_timeout_ms: u64,
    /// Largest frame payload accepted from the peer
    /// (`replication.frame_bytes_max`; at least [`VMSTREAM_CHUNK_BYTES`]).
    pub frame_bytes_max: u32,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        TunnelLimits {
            accept_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            ready_timeout_ms: 10_000,
            drain_timeout_ms: 30_000,
            frame_bytes_max: 8 * 1024 * 1024,
        }
    }
}

/// What a tunnel carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TunnelStats {
    /// Bytes read from the local socket and sent to the peer.
    pub bytes_out: u64,
    /// Bytes received from the peer and written to the local socket.
    pub bytes_in: u64,
    /// From the handshake's end to the tunnel's end.
    pub elapsed: Duration,
}

/// Why a tunnel could not be set up, or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach {peer}'s replication listener: {why}")]
    Unreachable { peer: String, why: String },
    #[error("{peer} refused the VM stream: {why}")]
    Refused { peer: String, why: String },
    #[error("VM stream handshake with {peer} failed: {why}")]
    Handshake { peer: String, why: String },
    #[error("local socket {}: {why}", path.display())]
    Socket { path: PathBuf, why: String },
    #[error("nothing connected to {} within {ms} ms (accept_timeout_ms)", path.display())]
    AcceptTimeout { path: PathBuf, ms: u64 },
    #[error("cannot connect to {} within {ms} ms (connect_timeout_ms): {why}", path.display())]
    LocalConnect { path: PathBuf, ms: u64, why: String },
    #[error("VM stream with {peer}: no byte either way for {ms} ms (idle_timeout_ms)")]
    Idle { peer: String, ms: u64 },
    #[error("VM stream with {peer}: the peer did not confirm the stream's end within {ms} ms (drain_timeout_ms)")]
    Drain { peer: String, ms: u64 },
    #[error("VM stream with {peer} failed: {why}")]
    Failed { peer: String, why: String },
    #[error("VM stream with {peer} was aborted")]
    Aborted { peer: String },
    #[error("VM stream with {peer} did not end within {ms} ms: aborted")]
    FinishTimeout { peer: String, ms: u64 },
}

/// State both pump threads and the owner share.
#[derive(Default)]
struct Shared {
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    /// Milliseconds since `started` of the last byte either way.
    last_activity_ms: AtomicU64,
    stop: AtomicBool,
    aborted: AtomicBool,
    done: AtomicBool,
    /// This side's end frame was sent (at most once), and when (ms).
    end_sent: AtomicBool,
    end_sent_ms: AtomicU64,
    error: Mutex<Option<TunnelError>>,
    tcp: Mutex<Option<TcpStream>>,
    local: Mutex<Option<UnixStream>>,
    /// Source: the listening socket's file was removed (by accept or drop).
    socket_removed: AtomicBool,
}

impl Shared {
    /// Ends everything at once: blocked reads and writes return.
    fn close_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = lock(&self.tcp).as_ref() {
            let _ = t.shutdown(Shutdown::Both);
        }
        if let Some(l) = lock(&self.local).as_ref() {
            let _ = l.shutdown(Shutdown::Both);
        }
    }

    fn fail(&self, e: TunnelError) {
        lock(&self.error).get_or_insert(e);
        self.close_all();
    }
}

fn encode_json<T: Serialize>(v: &T) -> Vec<u8> {
    ferry_wire::encode_frame(
        Kind::VmStream,
        0,
        0,
        &serde_json::to_vec(v).unwrap_or_default(),
    )
}

/// The source side: a local Unix socket for QEMU's `migrate`, tunnelled to
/// the target. Dropping it aborts the tunnel and removes the socket file.
pub struct Outgoing {
    shared: Arc<Shared>,
    result: mpsc::Receiver<Result<TunnelStats, TunnelError>>,
    thread: Option<std::thread::JoinHandle<()>>,
    listen_path: PathBuf,
    peer: String,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("peer", &self.peer)
            .field("listen_path", &self.listen_path)
            .finish_non_exhaustive()
    }
}

impl Outgoing {
    /// Dials `peer`, asks it for session (`workload`, `token`) and waits for
    /// its answer (a refusal is an error here), then listens at
    /// `listen_path` (mode 0600; a stale socket file there is replaced, any
    /// other file refused) and, on a thread, accepts ONE connection within
    /// `accept_timeout_ms` and pumps it both ways through the tunnel.
    pub fn open(
        dialer: &Dialer,
        peer: &str,
        workload: &str,
        token: &str,
        listen_path: &Path,
        limits: TunnelLimits,
    ) -> Result<Outgoing, TunnelError> {
        let p = || peer.to_string();
        let handshake = |why: String| TunnelError::Handshake { peer: p(), why };
        if workload.len() > VMSTREAM_FIELD_BYTES_MAX || token.len() > VMSTREAM_FIELD_BYTES_MAX {
            return Err(handshake(format!(
                "workload name or token longer than {VMSTREAM_FIELD_BYTES_MAX} bytes"
            )));
        }
        let (_, mut tls) = dialer.connect(peer).map_err(|e| TunnelError::Unreachable {
            peer: p(),
            why: format!("{e:#}"),
        })?;
        let ready = Duration::from_millis(limits.ready_timeout_ms.max(1));
        tls.sock
            .set_read_timeout(Some(ready))
            .and_then(|()| tls.sock.set_write_timeout(Some(ready)))
            .map_err(|e| handshake(e.to_string()))?;
        let hello = VmStreamHello {
            workload: workload.to_string(),
            token: token.to_string(),
        };
        tls.write_all(&encode_json(&hello))
            .and_then(|()| tls.flush())
            .map_err(|e| handshake(format!("sending the hello: {e}")))?;
        let mut body = Vec::new();
        let h =
            ferry_wire::read_frame(&mut tls, VMSTREAM_HELLO_BYTES_MAX, &mut body).map_err(|e| {
                match e {
                ferry_wire::ReadFrameError::Io(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    handshake(format!(
                        "no answer within {} ms (ready_timeout_ms)",
                        limits.ready_timeout_ms
                    ))
                }
                ferry_wire::ReadFrameError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    handshake(
                        "the peer closed the link (does it run a ferry that tunnels VM streams?)"
                            .into(),
                    )
                }
                e => handshake(e.to_string()),
            }
            })?;
        let payload = &body[..h.len as usize];
        match h.kind {
            Kind::VmStream => {
                let reply: VmStreamReply = serde_json::from_slice(payload)
                    .map_err(|e| handshake(format!("bad reply: {e}")))?;
                if let Some(why) = reply.refused {
                    return Err(TunnelError::Refused { peer: p(), why });
                }
            }
            Kind::Error => {
                return Err(TunnelError::Refused {
                    peer: p(),
                    why: String::from_utf8_lossy(payload).into_owned(),
                })
            }
            other => return Err(handshake(format!("answered with a {other:?} frame"))),
        }

        let listener = bind_private(listen_path)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let rustls::StreamOwned { conn, sock } = tls;
        let (sh, path, peer_name) = (shared.clone(), listen_path.to_path_buf(), p());
        *lock(&shared.tcp) = sock.try_clone().ok();
        let thread = std::thread::Builder::new()
            .name("vmstream-out".into())
            .spawn(move || {
                let r = accept_one(&listener, &path, &sh, limits, &peer_name).and_then(|local| {
                    pump(
                        &sh,
                        conn.into(),
                        sock,
                        Vec::new(),
                        local,
                        limits,
                        &peer_name,
                    )
                });
                sh.done.store(true, Ordering::SeqCst);
                let _ = tx.send(r);
            })
            .map_err(|e| TunnelError::Failed {
                peer: p(),
                why: format!("cannot start the tunnel's thread: {e}"),
            })?;
        Ok(Outgoing {
            shared,
            result: rx,
            thread: Some(thread),
            listen_path: listen_path.to_path_buf(),
            peer: p(),
        })
    }

    /// Bytes sent toward the target so far.
    pub fn bytes_out(&self) -> u64 {
        self.shared.bytes_out.load(Ordering::Relaxed)
    }

    /// Bytes received from the target so far.
    #[cfg(test)]
    pub fn bytes_in(&self) -> u64 {
        self.shared.bytes_in.load(Ordering::Relaxed)
    }

    /// The tunnel has ended (either way).
    #[cfg(test)]
    pub fn is_done(&self) -> bool {
        self.shared.done.load(Ordering::SeqCst)
    }

    /// The socket QEMU is to connect to.
    #[cfg(test)]
    pub fn listen_path(&self) -> &Path {
        &self.listen_path
    }

    /// Waits up to `timeout` for the tunnel to end (aborting it after).
    pub fn finish(mut self, timeout: Duration) -> Result<TunnelStats, TunnelError> {
        let r = match self.result.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => {
                self.abort();
                let _ = self.result.recv_timeout(Duration::from_secs(5));
                Err(TunnelError::FinishTimeout {
                    peer: self.peer.clone(),
                    ms: timeout.as_millis() as u64,
                })
            }
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        r
    }

    /// Closes everything at once (the pump ends with `Aborted`).
    pub fn abort(&self) {
        self.shared.aborted.store(true, Ordering::SeqCst);
        self.shared.close_all();
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.abort();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if !self.shared.socket_removed.swap(true, Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.listen_path);
        }
    }
}

/// Binds a Unix listener at `path`, mode 0600, replacing a stale socket.
fn bind_private(path: &Path) -> Result<UnixListener, TunnelError> {
    let err = |why: String| TunnelError::Socket {
        path: path.to_path_buf(),
        why,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?,
        Ok(_) => return Err(err("exists and is not a socket: refused".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let l = UnixListener::bind(path).map_err(|e| err(format!("cannot listen: {e}")))?;
    let made = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| l.set_nonblocking(true));
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(err(e.to_string()));
    }
    Ok(l)
}

/// Source: the one connection, within `accept_timeout_ms`; the socket file
/// is removed once it is taken (nobody else can connect).
fn accept_one(
    l: &UnixListener,
    path: &Path,
    shared: &Shared,
    limits: TunnelLimits,
    peer: &str,
) -> Result<UnixStream, TunnelError> {
    let deadline = Instant::now() + Duration::from_millis(limits.accept_timeout_ms);
    let remove = || {
        if !shared.socket_removed.swap(true, Ordering::SeqCst) {
            let _ = std::fs::remove_file(path);
        }
    };
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            remove();
            return Err(TunnelError::Aborted {
                peer: peer.to_string(),
            });
        }
        match l.accept() {
            Ok((s, _)) => {
                remove();
                s.set_nonblocking(false).map_err(|e| TunnelError::Socket {
                    path: path.to_path_buf(),
                    why: e.to_string(),
                })?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    remove();
                    return Err(TunnelError::AcceptTimeout {
                        path: path.to_path_buf(),
                        ms: limits.accept_timeout_ms,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                remove();
                return Err(TunnelError::Socket {
                    path: path.to_path_buf(),
                    why: format!("accept: {e}"),
                });
            }
        }
    }
}

/// The target side, for an inbound link whose first frame is `VmStream`:
/// asks `resolve` for the session's local socket (`Err` = refuse with that
/// reason, which the source sees), connects to it (retried while it is not
/// there yet, up to `connect_timeout_ms`), answers "ready" and pumps both
/// ways until either end closes.
pub fn serve(
    inbound: Inbound,
    resolve: impl FnOnce(&VmStreamHello) -> Result<PathBuf, String>,
    limits: TunnelLimits,
) -> Result<TunnelStats, TunnelError> {
    let Inbound {
        peer,
        mut reader,
        control,
        first,
        first_body,
    } = inbound;
    let peer = peer.name;
    let handshake = |why: String| TunnelError::Handshake {
        peer: peer.clone(),
        why,
    };
    let _ = control.set_write_timeout(Some(Duration::from_millis(limits.ready_timeout_ms.max(1))));
    let answer = |reader: &mut std::io::BufReader<super::inbound::InboundTls>,
                  refused: Option<String>|
     -> io::Result<()> {
        // The answer stays within VMSTREAM_HELLO_BYTES_MAX (JSON escapes included).
        let refused = refused.map(|why| why.chars().take(VMSTREAM_REASON_CHARS_MAX).collect());
        let w = reader.get_mut();
        w.write_all(&encode_json(&VmStreamReply { refused }))?;
        w.flush()
    };
    let refuse = |reader: &mut std::io::BufReader<super::inbound::InboundTls>, why: String| {
        let _ = answer(reader, Some(why.clone()));
        let _ = control.shutdown(Shutdown::Both);
        why
    };
    if first.kind != Kind::VmStream {
        return Err(handshake(format!("not a VM stream: {:?}", first.kind)));
    }
    if first.len > VMSTREAM_HELLO_BYTES_MAX {
        let why = format!(
            "VM stream hello of {} bytes, above {VMSTREAM_HELLO_BYTES_MAX}",
            first.len
        );
        return Err(handshake(refuse(&mut reader, why)));
    }
    let hello: VmStreamHello = match serde_json::from_slice(&first_body[..first.len as usize]) {
        Ok(h) => h,
        Err(e) => {
            return Err(handshake(refuse(
                &mut reader,
                format!("bad VM stream hello: {e}"),
            )))
        }
    };
    if hello.workload.len() > VMSTREAM_FIELD_BYTES_MAX
        || hello.token.len() > VMSTREAM_FIELD_BYTES_MAX
    {
        let why = format!("workload name or token longer than {VMSTREAM_FIELD_BYTES_MAX} bytes");
        return Err(handshake(refuse(&mut reader, why)));
    }
    let path = match resolve(&hello) {
        Ok(p) => p,
        Err(why) => {
            let why = refuse(&mut reader, why);
            return Err(TunnelError::Refused { peer, why });
        }
    };
    let local = match connect_retrying(&path, limits) {
        Ok(s) => s,
        Err(e) => {
            refuse(&mut reader, e.to_string());
            return Err(e);
        }
    };
    if !reader.buffer().is_empty() {
        return Err(handshake(refuse(
            &mut reader,
            "stream bytes sent before the ready answer".into(),
        )));
    }
    answer(&mut reader, None).map_err(|e| handshake(format!("sending ready: {e}")))?;
    tracing::info!(%peer, workload = %hello.workload, path = %path.display(), "vmstream.inbound.start");
    let rustls::StreamOwned { conn, sock } = reader.into_inner();
    let shared = Shared::default();
    *lock(&shared.tcp) = Some(control);
    let started = Instant::now();
    let r = pump(&shared, conn.into(), sock, Vec::new(), local, limits, &peer);
    tracing::info!(%peer, workload = %hello.workload, bytes_out = shared.bytes_out.load(Ordering::Relaxed),
        bytes_in = shared.bytes_in.load(Ordering::Relaxed), secs = started.elapsed().as_secs_f64(),
        ok = r.is_ok(), "vmstream.inbound.end");
    r
}

/// Target: connects to `path`, retrying while it is missing or refusing.
fn connect_retrying(path: &Path, limits: TunnelLimits) -> Result<UnixStream, TunnelError> {
    let deadline = Instant::now() + Duration::from_millis(limits.connect_timeout_ms);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(TunnelError::LocalConnect {
                    path: path.to_path_buf(),
                    ms: limits.connect_timeout_ms,
                    why: e.to_string(),
                })
            }
        }
    }
}

/// Pumps both ways until either end closes, an error, idleness or abort.
fn pump(
    shared: &Shared,
    mut conn: rustls::Connection,
    sock: TcpStream,
    mut plain: Vec<u8>,
    local: UnixStream,
    limits: TunnelLimits,
    peer: &str,
) -> Result<TunnelStats, TunnelError> {
    let started = Instant::now();
    let failed = |why: String| TunnelError::Failed {
        peer: peer.to_string(),
        why,
    };
    // Plaintext rustls already holds (read along with the handshake).
    let mut tmp = [0u8; 16 * 1024];
    loop {
        match conn.reader().read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => plain.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(failed(format!("TLS: {e}"))),
        }
    }
    let idle = Duration::from_millis(limits.idle_timeout_ms.max(1));
    let setup = sock
        .set_read_timeout(Some(POLL))
        .and_then(|()| sock.set_write_timeout(Some(idle)))
        .and_then(|()| local.set_write_timeout(Some(idle)));
    if let Err(e) = setup {
        return Err(failed(e.to_string()));
    }
    let wire = SharedTls::new(conn, &sock).map_err(|e| failed(e.to_string()))?;
    let local_r = local.try_clone().map_err(|e| failed(e.to_string()))?;
    if lock(&shared.tcp).is_none() {
        *lock(&shared.tcp) = sock.try_clone().ok();
    }
    *lock(&shared.local) = local.try_clone().ok();
    // An abort that came before the streams were registered.
    if shared.stop.load(Ordering::SeqCst) {
        shared.close_all();
    }
    std::thread::scope(|s| {
        let up = std::thread::Builder::new()
            .name("vmstream-up".into())
            .spawn_scoped(s, || up(&wire, local_r, shared, started, peer));
        if let Err(e) = up {
            shared.fail(failed(format!("cannot start the tunnel's thread: {e}")));
            return;
        }
        down(&wire, sock, plain, &local, shared, limits, started, peer);
    });
    shared.close_all();
    let stats = TunnelStats {
        bytes_out: shared.bytes_out.load(Ordering::SeqCst),
        bytes_in: shared.bytes_in.load(Ordering::SeqCst),
        elapsed: started.elapsed(),
    };
    if let Some(e) = lock(&shared.error).take() {
        return Err(e);
    }
    if shared.aborted.load(Ordering::SeqCst) {
        return Err(TunnelError::Aborted {
            peer: peer.to_string(),
        });
    }
    Ok(stats)
}

fn touch(shared: &Shared, started: Instant) {
    shared
        .last_activity_ms
        .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
}

/// Sends this side's end frame, once.
fn send_end(wire: &SharedTls, shared: &Shared, started: Instant) -> io::Result<()> {
    if shared.end_sent.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    shared
        .end_sent_ms
        .store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
    wire.send(&FrameHeader::new(Kind::VmStream, 0, 0, 0).encode())
}

/// Local socket → peer.
fn up(wire: &SharedTls, mut local: UnixStream, shared: &Shared, started: Instant, peer: &str) {
    let failed = |why: String| TunnelError::Failed {
        peer: peer.to_string(),
        why,
    };
    let mut buf = vec![0u8; VMSTREAM_CHUNK_BYTES];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match local.read(&mut buf) {
            Ok(0) => {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                // The local end closed: the peer learns it after every byte.
                if let Err(e) = send_end(wire, shared, started) {
                    shared.fail(failed(format!("sending the end: {e}")));
                }
                return;
            }
            Ok(n) => {
                let chunk = &buf[..n];
                let sent = wire.send_with(|w| {
                    w.write_all(&FrameHeader::new(Kind::VmStream, 0, 0, n as u32).encode())?;
                    w.write_all(chunk)?;
                    w.write_all(&ferry_wire::trailer(chunk))
                });
                if let Err(e) = sent {
                    if !shared.stop.load(Ordering::SeqCst) {
                        shared.fail(failed(format!("sending to the peer: {e}")));
                    }
                    return;
                }
                shared.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                touch(shared, started);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if !shared.stop.load(Ordering::SeqCst) {
                    let why = format!("reading the local socket: {e}");
                    let _ = wire.send(&ferry_wire::encode_frame(Kind::Error, 0, 0, why.as_bytes()));
                    shared.fail(failed(why));
                }
                return;
            }
        }
    }
}

/// Peer → local socket; also watches the idle and drain clocks.
#[allow(clippy::too_many_arguments)]
fn down(
    wire: &SharedTls,
    mut sock: TcpStream,
    mut plain: Vec<u8>,
    mut local: &UnixStream,
    shared: &Shared,
    limits: TunnelLimits,
    started: Instant,
    peer: &str,
) {
    let failed = |why: String| TunnelError::Failed {
        peer: peer.to_string(),
        why,
    };
    let frame_max = limits.frame_bytes_max.max(VMSTREAM_CHUNK_BYTES as u32);
    let mut raw = vec![0u8; 256 * 1024];
    loop {
        let mut used = 0;
        loop {
            let (hdr, payload, len) = match ferry_wire::split_frame(&plain[used..], frame_max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    let why = e.to_string();
                    let _ = wire.send(&ferry_wire::encode_frame(Kind::Error, 0, 0, why.as_bytes()));
                    return shared.fail(failed(why));
                }
            };
            used += len;
            match hdr.kind {
                Kind::VmStream if !payload.is_empty() => {
                    if let Err(e) = local.write_all(payload) {
                        if shared.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let why = format!("writing the local socket: {e}");
                        let _ =
                            wire.send(&ferry_wire::encode_frame(Kind::Error, 0, 0, why.as_bytes()));
                        return shared.fail(failed(why));
                    }
                    shared
                        .bytes_in
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                    touch(shared, started);
                }
                Kind::VmStream => {
                    // The peer's end closed: ours closes too, after every
                    // byte; the peer hears our end (it may be waiting for it).
                    let _ = local.shutdown(Shutdown::Both);
                    let _ = send_end(wire, shared, started);
                    shared.close_all();
                    return;
                }
                Kind::Error => {
                    return shared.fail(failed(format!(
                        "the peer reported: {}",
                        String::from_utf8_lossy(payload)
                    )))
                }
                other => {
                    let why = format!("unexpected {other:?} frame in a VM stream");
                    let _ = wire.send(&ferry_wire::encode_frame(Kind::Error, 0, 0, why.as_bytes()));
                    return shared.fail(failed(why));
                }
            }
        }
        plain.drain(..used);
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let now_ms = started.elapsed().as_millis() as u64;
        if shared.end_sent.load(Ordering::SeqCst)
            && now_ms.saturating_sub(shared.end_sent_ms.load(Ordering::SeqCst))
                > limits.drain_timeout_ms
        {
            return shared.fail(TunnelError::Drain {
                peer: peer.to_string(),
                ms: limits.drain_timeout_ms,
            });
        }
        if now_ms.saturating_sub(shared.last_activity_ms.load(Ordering::Relaxed))
            > limits.idle_timeout_ms
        {
            let why = format!("no byte either way for {} ms", limits.idle_timeout_ms);
            let _ = wire.send(&ferry_wire::encode_frame(Kind::Error, 0, 0, why.as_bytes()));
            return shared.fail(TunnelError::Idle {
                peer: peer.to_string(),
                ms: limits.idle_timeout_ms,
            });
        }
        match sock.read(&mut raw) {
            Ok(0) => {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                return shared.fail(failed(
                    "the peer closed the link before the stream's end".into(),
                ));
            }
            Ok(n) => {
                if let Err(e) = wire.open(&raw[..n], &mut plain) {
                    return shared.fail(failed(e.to_string()));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                return shared.fail(failed(format!("reading from the peer: {e}")));
            }
        }
    }
}

/// Two nodes in one process: node `a` dials, node `b` runs the real
/// replication listener (mutual TLS, pinned certificates) and serves VM
/// streams of the sessions in `sessions`.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::HashMap;
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::sync::{mpsc, Arc, Mutex};

    use super::{serve, TunnelError, TunnelLimits, TunnelStats};
    use crate::transport::dial::Dialer;
    use crate::transport::identity::{constant_time_eq, Identity};
    use crate::transport::peers::{Peer, Peers};

    pub(crate) type Sessions = Arc<Mutex<HashMap<String, (String, PathBuf)>>>;

    pub(crate) struct Pair {
        pub dialer: Dialer,
        /// The listening node's name ("b").
        pub peer: String,
        /// Each served stream's outcome, at the listener.
        pub served: mpsc::Receiver<Result<TunnelStats, TunnelError>>,
        pub sessions: Sessions,
        _dirs: (tempfile::TempDir, tempfile::TempDir),
    }

    fn peer_of(id: &Identity, replication: String) -> Peer {
        Peer {
            name: id.node_name.clone(),
            api: "127.0.0.1:9".into(),
            replication,
            fingerprint: id.fingerprint(),
            cert_pem: id.cert_pem(),
            token: String::new(),
            previous_fingerprint: None,
            heartbeat: vec![],
            heartbeat_key: String::new(),
        }
    }

    pub(crate) fn pair(limits: TunnelLimits) -> Pair {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ia = Arc::new(Identity::load_or_create(da.path(), "a").unwrap());
        let ib = Arc::new(Identity::load_or_create(db.path(), "b").unwrap());
        let pa = Arc::new(Peers::load(da.path()).unwrap().0);
        let pb = Arc::new(Peers::load(db.path()).unwrap().0);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        pa.upsert(peer_of(&ib, addr)).unwrap();
        pb.upsert(peer_of(&ia, "127.0.0.1:9".into())).unwrap();
        let l = crate::transport::inbound::Listener {
            conns: crate::transport::conns::ConnTable::new("replication", 16, 16),
            tls_server: crate::transport::tls::server_config(&ib, pb.clone()).unwrap(),
            peers: pb,
            frame_bytes_max: limits.frame_bytes_max,
        };
        let sessions: Sessions = Arc::default();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let s2 = sessions.clone();
        std::thread::spawn(move || {
            crate::transport::inbound::serve(
                listener,
                l,
                Arc::new(move |inbound| {
                    let r = serve(
                        inbound,
                        |h| {
                            let map = s2.lock().unwrap();
                            match map.get(&h.workload) {
                                None => {
                                    Err(format!("no VM move of {} is expected here", h.workload))
                                }
                                Some((token, _))
                                    if !constant_time_eq(token.as_bytes(), h.token.as_bytes()) =>
                                {
                                    Err(format!("wrong session token for {}", h.workload))
                                }
                                Some((_, path)) => Ok(path.clone()),
                            }
                        },
                        limits,
                    );
                    let _ = tx.lock().unwrap().send(r);
                    Ok(())
                }),
            )
        });
        Pair {
            dialer: Dialer {
                identity: ia,
                peers: pa,
            },
            peer: "b".into(),
            served: rx,
            sessions,
            _dirs: (da, db),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::{Duration, Instant};

    use super::testing::pair;
    use super::*;

    /// Deterministic, incompressible-looking bytes.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn vmstream_bytes_both_ways_exact_and_source_close_ends_both() {
        let limits = TunnelLimits::default();
        let p = pair(limits);
        let dir = tempfile::tempdir().unwrap();
        let target_sock = dir.path().join("incoming.sock");
        let out_sock = dir.path().join("outgoing.sock");
        p.sessions
            .lock()
            .unwrap()
            .insert("w1".into(), ("tok-1".into(), target_sock.clone()));
        // The "target QEMU": writes 1 MiB back first, then reads to EOF.
        let incoming = UnixListener::bind(&target_sock).unwrap();
        let back = pattern(7, 1 << 20);
        let back2 = back.clone();
        let target = std::thread::spawn(move || {
            let (mut s, _) = incoming.accept().unwrap();
            s.write_all(&back2).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        let out = Outgoing::open(&p.dialer, &p.peer, "w1", "tok-1", &out_sock, limits).unwrap();
        assert_eq!(out.listen_path(), out_sock);
        assert!(!out.is_done());
        let mode = std::fs::metadata(&out_sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let data = pattern(3, 64 << 20);
        let t = Instant::now();
        let mut c = UnixStream::connect(&out_sock).unwrap();
        let mut r = c.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 1 << 20];
            r.read_exact(&mut got).unwrap();
            // Then EOF: the tunnel ends once this side closed.
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).unwrap();
            (got, rest)
        });
        c.write_all(&data).unwrap();
        // Close only once the bytes coming back are in (they would be
        // dropped otherwise: the stream ends when either end closes).
        while out.bytes_in() < 1 << 20 {
            assert!(t.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(5));
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let got = target.join().unwrap();
        assert!(
            got == data,
            "the target received {} bytes, not the 64 MiB sent",
            got.len()
        );
        let (back_got, rest) = reader.join().unwrap();
        assert!(back_got == back && rest.is_empty());
        let stats = out.finish(Duration::from_secs(30)).unwrap();
        let secs = t.elapsed().as_secs_f64();
        eprintln!("vmstream: 64 MiB in {secs:.2} s = {:.0} MiB/s", 64.0 / secs);
        assert_eq!((stats.bytes_out, stats.bytes_in), (64 << 20, 1 << 20));
        let served = p
            .served
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!((served.bytes_in, served.bytes_out), (64 << 20, 1 << 20));
        assert!(!out_sock.exists(), "the socket file is removed once taken");
    }

    #[test]
    fn vmstream_refusals_at_open() {
        let limits = TunnelLimits {
            connect_timeout_ms: 300,
            ..TunnelLimits::default()
        };
        let p = pair(limits);
        let dir = tempfile::tempdir().unwrap();
        let out_sock = dir.path().join("outgoing.sock");
        p.sessions.lock().unwrap().insert(
            "w1".into(),
            ("right".into(), dir.path().join("nobody-listens.sock")),
        );
        let e = Outgoing::open(&p.dialer, &p.peer, "w1", "wrong", &out_sock, limits).unwrap_err();
        match &e {
            TunnelError::Refused { peer, why } => {
                assert_eq!(peer, "b");
                assert_eq!(why, "wrong session token for w1");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(!out_sock.exists(), "nothing listens after a refusal");
        let e = Outgoing::open(&p.dialer, &p.peer, "w2", "x", &out_sock, limits).unwrap_err();
        assert!(
            matches!(&e, TunnelError::Refused { why, .. } if why.contains("no VM move of w2")),
            "{e:?}"
        );
        // The right token, but the target's socket never appears.
        let t = Instant::now();
        let e = Outgoing::open(&p.dialer, &p.peer, "w1", "right", &out_sock, limits).unwrap_err();
        assert!(
            matches!(&e, TunnelError::Refused { why, .. } if why.contains("nobody-listens.sock")),
            "{e:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        // A peer that is not registered.
        let e = Outgoing::open(&p.dialer, "nobody", "w1", "right", &out_sock, limits).unwrap_err();
        assert!(matches!(e, TunnelError::Unreachable { .. }), "{e:?}");
        // The listen path is a regular file: refused, left alone.
        let target_sock = dir.path().join("incoming.sock");
        let _l = UnixListener::bind(&target_sock).unwrap();
        p.sessions
            .lock()
            .unwrap()
            .insert("w3".into(), ("t3".into(), target_sock));
        std::fs::write(&out_sock, b"keep me").unwrap();
        let e = Outgoing::open(&p.dialer, &p.peer, "w3", "t3", &out_sock, limits).unwrap_err();
        assert!(
            matches!(&e, TunnelError::Socket { why, .. } if why.contains("not a socket")),
            "{e:?}"
        );
        assert_eq!(std::fs::read(&out_sock).unwrap(), b"keep me");
    }

    #[test]
    fn vmstream_target_close_ends_source_and_abort_and_accept_timeout() {
        let limits = TunnelLimits {
            accept_timeout_ms: 500,
            ..TunnelLimits::default()
        };
        let p = pair(limits);
        let dir = tempfile::tempdir().unwrap();
        let target_sock = dir.path().join("incoming.sock");
        let out_sock = dir.path().join("outgoing.sock");
        p.sessions
            .lock()
            .unwrap()
            .insert("w1".into(), ("t".into(), target_sock.clone()));
        let incoming = UnixListener::bind(&target_sock).unwrap();
        // The target end sends a little and closes.
        let target = std::thread::spawn(move || {
            let (mut s, _) = incoming.accept().unwrap();
            s.write_all(b"bye").unwrap();
            drop(s);
            incoming
        });
        // A stale socket file at the listen path is replaced.
        let _stale = UnixListener::bind(&out_sock).unwrap();
        let out = Outgoing::open(&p.dialer, &p.peer, "w1", "t", &out_sock, limits).unwrap();
        let mut c = UnixStream::connect(&out_sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
        let incoming = target.join().unwrap();
        let stats = out.finish(Duration::from_secs(10)).unwrap();
        assert_eq!((stats.bytes_in, stats.bytes_out), (3, 0));
        assert!(p
            .served
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .is_ok());

        // Abort mid-stream: both local ends see the end at once.
        let target = std::thread::spawn(move || {
            let (mut s, _) = incoming.accept().unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            (got.len(), incoming)
        });
        let out = Outgoing::open(&p.dialer, &p.peer, "w1", "t", &out_sock, limits).unwrap();
        let mut c = UnixStream::connect(&out_sock).unwrap();
        c.write_all(&[1u8; 100_000]).unwrap();
        let t = Instant::now();
        while out.bytes_out() < 100_000 {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        out.abort();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        let (n, _incoming) = target.join().unwrap();
        assert_eq!(n, 100_000);
        assert!(matches!(
            out.finish(Duration::from_secs(10)),
            Err(TunnelError::Aborted { .. })
        ));
        assert!(p
            .served
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .is_err());

        // Nobody connects: the accept times out, the socket file goes.
        let out = Outgoing::open(&p.dialer, &p.peer, "w1", "t", &out_sock, limits).unwrap();
        let e = out.finish(Duration::from_secs(10)).unwrap_err();
        assert!(matches!(e, TunnelError::AcceptTimeout { .. }), "{e:?}");
        assert!(!out_sock.exists());
    }
}
