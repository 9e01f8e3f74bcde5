//! The replica's side: accept links from registered primaries and apply their
//! stream in order (std threads, blocking TLS: the replica only reacts).
//!
//! Frames are applied strictly in stream order, and a Flush is acknowledged as
//! durable only after `fdatasync`, so the image is crash-consistent whenever it
//! is up to date; while resyncing it is marked `inconsistent` in its metadata
//! (persisted) until the primary says it has caught up.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::generation::Relation;
use ferry_core::GenerationHistory;
use ferry_nbd::device::{BlockDevice, FileDevice, ZeroMode};
use ferry_wire::{FrameHeader, Hello, HelloReply, Kind, PROTOCOL_VERSION};

use super::link::{tag_flags, tag_of, FLAG_SNAPSHOT, FLAG_UP_TO_DATE, GROUP_VOLUMES_MAX};
use super::meta::MetaFile;
use crate::transport::inbound::{refuse, Inbound};
use crate::transport::settings::ReplicationSettings;
use crate::transport::tls_io::SharedTls;

/// A replica held on this node.
pub struct ReplicaVolume {
    pub name: String,
    pub id: String,
    pub dev: FileDevice,
    pub meta: Mutex<MetaFile>,
    /// The socket of the current link, to close it when a newer one arrives.
    current: Mutex<Option<TcpStream>>,
    /// Held by the link whose frames are being applied.
    stream: Mutex<()>,
    pub received_seq: AtomicU64,
    /// Durable up to (set by the flusher after `fdatasync`).
    pub durable_seq: AtomicU64,
    pub bytes_applied: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Merkle leaves kept current as the stream applies.
    pub leaves: super::verify::LeafCache,
    /// The volume's directory (metadata, snapshot files).
    pub dir: std::path::PathBuf,
    pub granularity_bytes: u64,
    /// A test cutover's copy-before-write snapshot of this replica.
    pub snapshot: super::snapshot::Snapshot,
    /// When the primary last sent anything (HA: a sign of life).
    pub last_rx: Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for ReplicaVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaVolume")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ReplicaVolume {
    pub fn new(
        name: String,
        id: String,
        dir: std::path::PathBuf,
        dev: FileDevice,
        meta: MetaFile,
        granularity_bytes: u64,
    ) -> ReplicaVolume {
        let leaves = super::verify::LeafCache::new(dev.size(), granularity_bytes);
        super::snapshot::Snapshot::clear_leftovers(&dir);
        ReplicaVolume {
            leaves,
            dir,
            granularity_bytes,
            snapshot: Default::default(),
            last_rx: Mutex::new(None),
            name,
            id,
            dev,
            meta: Mutex::new(meta),
            current: Mutex::new(None),
            stream: Mutex::new(()),
            received_seq: AtomicU64::new(0),
            durable_seq: AtomicU64::new(0),
            bytes_applied: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }
}

impl ReplicaVolume {
    /// Ends the current inbound link, if any.
    pub fn close_link(&self) {
        if let Some(s) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Ends the current inbound link and waits (up to `timeout`) until its
    /// threads stopped writing the image. False if they did not in time.
    /// A link the primary opens again meanwhile (its reconnect racing a
    /// handover: it took the stream as the old one let go) is ended too, at
    /// every look: otherwise the wait ran out on a stream nobody closed.
    pub fn close_link_and_wait(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.close_link();
            match self.stream.try_lock() {
                Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => return true,
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// What the replica side needs from the node it runs in (the agent
/// implements it).
pub trait Host: Send + Sync {
    fn node_name(&self) -> &str;
    fn link_settings(&self) -> &ReplicationSettings;
    /// The replica of `volume` held here.
    fn replica(&self, volume: &str) -> Option<Arc<ReplicaVolume>>;
    /// Why a link to `volume` must be refused now (this node asked the
    /// witness to take its workload over: its copy must not change until it
    /// answers), if it must.
    fn refuse_link(&self, volume: &str) -> Option<String>;
}

impl<T: Host + ?Sized> Host for Arc<T> {
    crate::sys::forward_to_arc! {
        node_name(&self) -> &str;
        link_settings(&self) -> &ReplicationSettings;
        replica(&self, volume: &str) -> Option<Arc<ReplicaVolume>>;
        refuse_link(&self, volume: &str) -> Option<String>;
    }
}

/// Serves an inbound volume stream (its first frame a Hello): one Hello per
/// volume of the stream, then the frames, applied in order.
pub fn serve_stream(ctx: &dyn Host, inbound: Inbound) -> Result<()> {
    let Inbound {
        peer,
        mut reader,
        control,
        first,
        first_body,
    } = inbound;
    let max = ctx.link_settings().frame_bytes_max;
    let me = ctx.node_name().to_string();
    // One Hello per volume of the stream, in tag order.
    let mut hellos: Vec<Hello> = Vec::new();
    let mut next = Some((first, first_body));
    loop {
        let (hdr, body) = match next.take() {
            Some(f) => f,
            None => {
                let mut body = Vec::new();
                let hdr = ferry_wire::read_frame(&mut reader, max, &mut body)?;
                (hdr, body)
            }
        };
        if hdr.kind != Kind::Hello {
            bail!("expected Hello, got {:?}", hdr.kind);
        }
        let hello = Hello::from_bytes(&body[..hdr.len as usize])?;
        let size = usize::from(hello.group_size);
        if size == 0 || size > GROUP_VOLUMES_MAX {
            return refuse(
                reader.get_mut(),
                &me,
                format!("a stream carries 1 to {GROUP_VOLUMES_MAX} volumes, not {size}"),
            );
        }
        hellos.push(hello);
        if hellos.len() >= size {
            break;
        }
    }
    for (i, h) in hellos.iter().enumerate() {
        if hellos[..i].iter().any(|o| o.volume == h.volume) {
            return refuse(
                reader.get_mut(),
                &me,
                format!("volume {:?} appears twice in one stream", h.volume),
            );
        }
    }
    let mut members = Vec::new();
    for hello in &hellos {
        match accept(ctx, &peer.name, hello) {
            Ok(m) => members.push(m),
            Err(why) => return refuse(reader.get_mut(), &me, why),
        }
    }
    // Take over from older links of the same volumes, then wait until their
    // queued frames are applied: one stream applies to a volume at a time
    // (locked in name order, so two streams never wait on each other).
    for m in &members {
        if let Some(old) = m
            .vol
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(control.try_clone()?)
        {
            let _ = old.shutdown(Shutdown::Both);
        }
    }
    let mut order: Vec<&Member> = members.iter().collect();
    order.sort_by(|a, b| a.vol.name.cmp(&b.vol.name));
    let _streams: Vec<_> = order
        .iter()
        .map(|m| m.vol.stream.lock().unwrap_or_else(|p| p.into_inner()))
        .collect();
    let w = reader.get_mut();
    for m in &members {
        let in_sync = m.in_sync;
        {
            let mut meta = m.vol.meta.lock().unwrap_or_else(|p| p.into_inner());
            meta.update(|s| {
                s.generation.adopt(&m.theirs);
                s.consistent = in_sync;
                s.peer = Some(peer.name.clone());
            })?;
        }
        let reply = HelloReply {
            protocol_version: PROTOCOL_VERSION,
            node_name: me.clone(),
            refused: None,
            generation: m.mine.current(),
            ancestors: m.mine.ancestors().collect(),
            // An old primary demoted by a failover: the blocks it may hold
            // alone, for the new primary to resend.
            dirty_map: super::meta::load_suspect_map(&m.vol.dir),
        };
        w.write_all(&ferry_wire::encode_frame(
            Kind::HelloReply,
            0,
            0,
            &reply.to_bytes(),
        ))?;
        tracing::info!(volume = %m.vol.name, peer = %peer.name, group = ?hellos[0].group,
            consistent = in_sync, "replication.inbound.up");
    }
    w.flush()?;
    control.set_read_timeout(None)?;
    let leftover = reader.buffer().to_vec();
    let rustls::StreamOwned { conn, sock } = reader.into_inner();
    let wire = ServerWire {
        tls: SharedTls::new(conn, &sock)?,
        ctl: control.try_clone()?,
    };
    let vols: Vec<Arc<ReplicaVolume>> = members.iter().map(|m| m.vol.clone()).collect();
    let writeback = Writeback {
        bytes: ctx.link_settings().replica_writeback_bytes,
        interval: Duration::from_millis(ctx.link_settings().replica_writeback_interval_ms),
    };
    let result = apply_stream(sock, &wire, leftover, &vols, max, writeback);
    if let Err(e) = &result {
        let msg = format!("{e:#}");
        for v in &vols {
            *v.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
        }
        let _ = wire.send(&ferry_wire::encode_frame(Kind::Error, 0, 0, msg.as_bytes()));
    }
    // Close the connection for real (a clone of the socket is kept to replace
    // stale links), so the primary sees the end at once.
    let _ = control.shutdown(Shutdown::Both);
    for v in &vols {
        let mut current = v.current.lock().unwrap_or_else(|p| p.into_inner());
        if current
            .as_ref()
            .and_then(|s| s.local_addr().ok().zip(s.peer_addr().ok()))
            == control.local_addr().ok().zip(control.peer_addr().ok())
        {
            *current = None;
        }
    }
    result
}

/// A volume of an accepted stream.
struct Member {
    vol: Arc<ReplicaVolume>,
    mine: GenerationHistory,
    theirs: GenerationHistory,
    /// Same history and a consistent image: nothing to resync.
    in_sync: bool,
}

/// Checks one Hello; `Err` is the refusal, in words an operator can act on.
fn accept(ctx: &dyn Host, peer: &str, hello: &Hello) -> std::result::Result<Member, String> {
    let me = ctx.node_name();
    if hello.node_name != peer {
        return Err(format!(
            "your certificate belongs to {peer:?}, not {:?}",
            hello.node_name
        ));
    }
    if !hello.protocol_versions.contains(&PROTOCOL_VERSION) {
        return Err(format!(
            "no common protocol version (I speak {PROTOCOL_VERSION})"
        ));
    }
    if let Some(why) = ctx.refuse_link(&hello.volume) {
        return Err(why);
    }
    let Some(vol) = ctx.replica(&hello.volume) else {
        return Err(format!("node {me} holds no replica of volume {:?}; start it with `ferry replicate start {} --to {me}`", hello.volume, hello.volume));
    };
    if vol.id != hello.volume_id || vol.dev.size() != hello.size_bytes {
        return Err(format!(
            "volume {:?} here is id {} with {} bytes, yours is id {} with {} bytes: not the same volume",
            hello.volume, vol.id, vol.dev.size(), hello.volume_id, hello.size_bytes));
    }
    let theirs = GenerationHistory::from_parts(hello.generation, hello.ancestors.clone(), 16);
    let (mine, was_consistent) = {
        let m = vol.meta.lock().unwrap_or_else(|p| p.into_inner());
        (m.state().generation.clone(), m.state().consistent)
    };
    let relation = mine.relate(&theirs);
    match relation {
        Relation::Ahead => Err(format!(
            "this replica of {:?} holds newer data than the primary",
            hello.volume
        )),
        Relation::SplitBrain => {
            let why = format!(
                "split brain: this replica of {:?} and the primary were written separately (ferry cluster resolve-split-brain WORKLOAD --keep NODE)",
                hello.volume
            );
            *vol.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
            Err(why)
        }
        _ => Ok(Member {
            vol,
            mine,
            theirs,
            in_sync: relation == Relation::InSync && was_consistent,
        }),
    }
}

/// The replica's TLS connection after the handshake, shared by the apply
/// loop (reads) and whoever sends acknowledgements (the apply loop and the flusher).
struct ServerWire {
    tls: SharedTls,
    /// To end the link without waiting for a sender.
    ctl: TcpStream,
}

impl ServerWire {
    fn send(&self, plain: &[u8]) -> Result<()> {
        Ok(self.tls.send(plain)?)
    }

    /// Acknowledges the members `tags` of the stream, in one TLS record.
    fn ack(&self, vols: &[Arc<ReplicaVolume>], tags: impl Iterator<Item = usize>) -> Result<()> {
        let mut plain = Vec::new();
        for tag in tags {
            let vol = &vols[tag];
            let mut h = FrameHeader::new(
                Kind::Ack,
                vol.received_seq.load(Ordering::SeqCst),
                vol.durable_seq.load(Ordering::SeqCst),
                0,
            );
            h.flags = tag_flags(tag as u16);
            plain.extend_from_slice(&h.encode());
        }
        self.send(&plain)
    }
}

/// A flush the apply loop has reached: make it durable off the apply path.
#[derive(Default)]
struct FlushState {
    /// Per member: newest flush seq applied up to, and the generation at
    /// which it declared the member up to date, if it did.
    pending: Vec<Option<(u64, Option<u64>)>>,
    /// Resync bytes applied since writeback was last started; past
    /// [`WRITEBACK_KICK_BYTES`] the flusher starts it (see [`flusher`]).
    copied: u64,
    /// Bytes of writes applied (through the page cache) since writeback was
    /// last started: past `Writeback::bytes`, or older than
    /// `Writeback::interval`, the flusher starts it.
    written: u64,
    writeback: Writeback,
    kick: bool,
    closed: bool,
}

/// When the replica starts writeback of what it applied, so that the link
/// flush a cutover or switchover ends its drain with (inside the downtime)
/// finds little left to write, however long the primary waits between
/// flushes (`link_flush_interval_ms`). `sync_file_range(WRITE)` only: no
/// durability point, no extra `fdatasync`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Writeback {
    /// `replication.replica_writeback_bytes`; 0 = off.
    pub bytes: u64,
    /// `replication.replica_writeback_interval_ms`.
    pub interval: Duration,
}

impl FlushState {
    /// Counts `len` bytes of writes applied; wakes the flusher when enough
    /// piled up to start their writeback.
    fn wrote(&mut self, len: u64, cv: &std::sync::Condvar) {
        if self.writeback.bytes == 0 {
            return;
        }
        let was = self.written;
        self.written += len;
        if self.written >= self.writeback.bytes {
            self.written = 0;
            self.kick = true;
            cv.notify_all();
        } else if was == 0 {
            // The first since the last kick: the flusher's timer starts.
            cv.notify_all();
        }
    }
}

/// A resync's copies start writeback on the replica every this many bytes,
/// so the flush that ends the resync (durable before the replica counts as
/// up to date) finds little left to write: the disk works while the link
/// copies instead of after it.
const WRITEBACK_KICK_BYTES: u64 = 64 * 1024 * 1024;

/// Makes flushes durable (`fdatasync`) on its own thread, so the apply loop
/// keeps applying the frames that follow, then acknowledges them as durable.
/// Safe because the sync starts after every frame up to the flush was written.
///
/// A flush of any member syncs every volume of the stream, so the replica's
/// durable state is one cut of the whole stream, never one volume ahead of
/// another.
fn flusher(
    vols: &[Arc<ReplicaVolume>],
    wire: &ServerWire,
    state: &(Mutex<FlushState>, std::sync::Condvar),
) -> Result<()> {
    // When the oldest write not yet written back was applied (about).
    let mut written_since = std::time::Instant::now();
    loop {
        let pending: Vec<(usize, u64, Option<u64>)> = {
            let mut st = state.0.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let p: Vec<(usize, u64, Option<u64>)> = st
                    .pending
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(i, p)| p.take().map(|(seq, up)| (i, seq, up)))
                    .collect();
                if !p.is_empty() {
                    // The flush writes back everything applied so far.
                    st.kick = false;
                    st.written = 0;
                    break p;
                }
                if st.closed {
                    return Ok(());
                }
                if std::mem::take(&mut st.kick) {
                    break p;
                }
                if st.written == 0 || st.writeback.interval.is_zero() {
                    st = state.1.wait(st).unwrap_or_else(|p| p.into_inner());
                    written_since = std::time::Instant::now();
                    continue;
                }
                let due = written_since + st.writeback.interval;
                let now = std::time::Instant::now();
                if now >= due {
                    st.written = 0;
                    break p;
                }
                st = state
                    .1
                    .wait_timeout(st, due - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        if pending.is_empty() {
            // Only a writeback kick: best effort, a failure shows at the flush.
            written_since = std::time::Instant::now();
            for v in vols {
                if let Err(e) = v.dev.start_writeback() {
                    tracing::debug!(volume = %v.name, error = %e, "replication.replica.writeback_failed");
                }
            }
            continue;
        }
        let started = std::time::Instant::now();
        written_since = started;
        for v in vols {
            v.dev
                .flush()
                .with_context(|| format!("fdatasync of {}", v.name))?;
        }
        tracing::debug!(
            volumes = vols.len(),
            ms = started.elapsed().as_millis() as u64,
            "replication.replica.flushed"
        );
        for &(tag, seq, up_to_date) in &pending {
            let vol = &vols[tag];
            if let Some(generation) = up_to_date {
                // Up to date at the primary's generation of that moment: it
                // may have recorded a new one since the handshake (a write
                // it acknowledged that this copy lacked, resent since).
                // Keeping the handshake's would make the next promotion of
                // this copy a split brain with the primary's history.
                let mut m = vol.meta.lock().unwrap_or_else(|p| p.into_inner());
                m.update(|s| {
                    if generation != ferry_core::generation::BLANK
                        && s.generation.current() != generation
                    {
                        s.generation.bump(generation);
                    }
                    s.consistent = true;
                })?;
                super::meta::clear_suspect_map(&vol.dir);
                tracing::info!(volume = %vol.name, generation = format!("{generation:016x}"), "replication.replica.up_to_date");
            }
            vol.durable_seq.fetch_max(seq, Ordering::SeqCst);
        }
        wire.ack(vols, pending.iter().map(|p| p.0))?;
    }
}

/// Received batches queued for the apply thread. A batch is one read's
/// whole frames: usually about [`RECEIVE_READ_BYTES`], at most one frame
/// more than that (`frame_bytes_max`), so the replica holds at most 16 such
/// batches received but not yet applied per link.
const APPLY_QUEUE_BATCHES: usize = 16;
/// Received frames up to this many bytes are applied by the receiver itself
/// when the apply thread has nothing queued (a few small sync writes).
const INLINE_APPLY_BYTES_MAX: usize = 64 * 1024;
/// Resync copies received are acknowledged at least this often (bytes of
/// frames), and whenever the receiver has nothing more to read; every other
/// frame (a sync write waits for its receipt) at once.
const COPY_ACK_BYTES_MAX: usize = 1024 * 1024;

/// Reads what the socket holds now without waiting (`WouldBlock` when
/// nothing); the socket itself stays blocking (its clone writes).
fn recv_ready(sock: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole
    // call and the fd is owned by `sock`, open for the duration of the call.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Ciphertext read from the socket at a time.
const RECEIVE_READ_BYTES: usize = 256 * 1024;

/// The receiver's side of the hand-off to the apply thread.
struct Pipe<'a> {
    tx: std::sync::mpsc::SyncSender<Batch>,
    /// Applied batches' buffers, back for reuse.
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    /// Batches queued or being applied.
    pending: &'a AtomicUsize,
}

/// Whole frames received together: `frames` index into `buf`.
struct Batch {
    buf: Vec<u8>,
    /// (header, payload start, payload length)
    frames: Vec<(FrameHeader, usize, usize)>,
}

/// Receives on this thread (decrypt, check, acknowledge receipt) and applies on
/// another, in stream order, so the two overlap; a third makes flushes durable.
fn apply_stream(
    mut sock: TcpStream,
    wire: &ServerWire,
    leftover: Vec<u8>,
    vols: &[Arc<ReplicaVolume>],
    max: u32,
    writeback: Writeback,
) -> Result<()> {
    for vol in vols {
        vol.received_seq.store(0, Ordering::SeqCst);
        vol.durable_seq.store(0, Ordering::SeqCst);
    }
    let state = (
        Mutex::new(FlushState {
            pending: vec![None; vols.len()],
            writeback,
            ..FlushState::default()
        }),
        std::sync::Condvar::new(),
    );
    // Batches queued or being applied: the receiver applies a small batch
    // itself when none is (no thread hop for a lone sync write).
    let pending = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let flush = scope.spawn(|| {
            let r = flusher(vols, wire, &state);
            if r.is_err() {
                // Unblock the receiver's read: the link is over (writing stays
                // open for the Error frame that says why).
                let _ = wire.ctl.shutdown(Shutdown::Read);
            }
            r
        });
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(APPLY_QUEUE_BATCHES);
        let pending = &pending;
        // Applied batches' buffers go back to the receiver for reuse.
        let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let state = &state;
        let applier = std::thread::Builder::new()
            .name("repl-apply".into())
            .spawn_scoped(scope, move || {
                let r = rx.iter().try_for_each(|b| {
                    // On failure `pending` stays up, so the receiver never
                    // applies later frames itself: nothing after a failed
                    // write is applied, flushed or acknowledged as durable.
                    apply_batch(vols, &b, state)?;
                    pending.fetch_sub(1, Ordering::SeqCst);
                    let _ = spare_tx.send(b.buf);
                    Ok(())
                });
                if r.is_err() {
                    let _ = wire.ctl.shutdown(Shutdown::Read);
                }
                r
            });
        let (received, applied) = match applier {
            Ok(applier) => {
                let received = receive_frames(
                    &mut sock,
                    wire,
                    leftover,
                    vols,
                    max,
                    Pipe {
                        tx,
                        spare: spare_rx,
                        pending,
                    },
                    state,
                );
                let applied = applier
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("the apply thread panicked")));
                (received, applied)
            }
            Err(e) => (Err(anyhow!("cannot start the apply thread: {e}")), Ok(())),
        };
        {
            let mut st = state.0.lock().unwrap_or_else(|p| p.into_inner());
            st.closed = true;
            state.1.notify_all();
        }
        let flushed = flush
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the flusher thread panicked")));
        // The apply or flush failure (say, disk full) is the cause; the
        // receiver's error is then only the socket we shut down.
        applied.and(flushed).and(received)
    })
}

/// Reads, decrypts and checks frames; acknowledges receipt of every read's
/// frames at once (sync mode answers a write once the replica has it in
/// order) — reads of resync copies only every [`COPY_ACK_BYTES_MAX`] or when
/// the socket runs dry — then queues them for the apply thread. Durability is acknowledged
/// separately, by the flusher, after the frames up to a flush were applied and
/// synced.
fn receive_frames(
    sock: &mut TcpStream,
    wire: &ServerWire,
    leftover: Vec<u8>,
    vols: &[Arc<ReplicaVolume>],
    max: u32,
    pipe: Pipe<'_>,
    state: &(Mutex<FlushState>, std::sync::Condvar),
) -> Result<()> {
    let Pipe { tx, spare, pending } = pipe;
    let mut plain = leftover;
    let mut raw = vec![0u8; RECEIVE_READ_BYTES];
    // Bytes of frames received but not yet acknowledged.
    let mut unacked = 0usize;
    loop {
        let mut frames = Vec::new();
        let mut used = 0;
        while let Some((hdr, payload, len)) = ferry_wire::split_frame(&plain[used..], max)? {
            if hdr.kind != Kind::Ping {
                let vol = vols.get(tag_of(&hdr)).ok_or_else(|| {
                    anyhow!(
                        "frame for member {} of a stream of {} volumes",
                        tag_of(&hdr),
                        vols.len()
                    )
                })?;
                vol.received_seq.store(hdr.seq, Ordering::SeqCst);
            }
            frames.push((hdr, used + ferry_wire::HEADER_BYTES, payload.len()));
            used += len;
        }
        if !frames.is_empty() {
            let now = std::time::Instant::now();
            for v in vols {
                *v.last_rx.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
            }
            // Copies only: nothing on the primary waits for their receipt
            // at once (flow control, the end of a resync and the ack
            // timeout only need it soon), so they are acknowledged every
            // COPY_ACK_BYTES_MAX, or before the receiver would wait.
            unacked += used;
            if unacked >= COPY_ACK_BYTES_MAX || frames.iter().any(|(h, _, _)| h.kind != Kind::Copy)
            {
                wire.ack(vols, 0..vols.len())?;
                unacked = 0;
            }
            if used <= INLINE_APPLY_BYTES_MAX && pending.load(Ordering::SeqCst) == 0 {
                // Nothing is queued ahead of these frames: apply them here,
                // in order, without a hop to the apply thread.
                let batch = Batch { buf: plain, frames };
                apply_batch(vols, &batch, state)?;
                plain = batch.buf;
                plain.drain(..used);
            } else {
                // Hand the whole frames over; keep the partial one that follows.
                let mut tail = spare
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(2 * RECEIVE_READ_BYTES));
                tail.clear();
                tail.extend_from_slice(&plain[used..]);
                plain.truncate(used);
                let buf = std::mem::replace(&mut plain, tail);
                pending.fetch_add(1, Ordering::SeqCst);
                if tx.send(Batch { buf, frames }).is_err() {
                    // The apply thread stopped; its error is the one reported.
                    return Ok(());
                }
            }
        }
        if unacked > 0 {
            match recv_ready(sock, &mut raw) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    wire.tls.open(&raw[..n], &mut plain)?;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wire.ack(vols, 0..vols.len())?;
                    unacked = 0;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let n = match sock.read(&mut raw) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        wire.tls.open(&raw[..n], &mut plain)?;
    }
}

fn apply_batch(
    vols: &[Arc<ReplicaVolume>],
    b: &Batch,
    state: &(Mutex<FlushState>, std::sync::Condvar),
) -> Result<()> {
    let mut run = CopyRun::default();
    for (hdr, start, len) in &b.frames {
        if hdr.kind == Kind::Ping {
            continue;
        }
        // The receiver checked every tag.
        let tag = tag_of(hdr);
        let payload = &b.buf[*start..*start + *len];
        if hdr.kind == Kind::Copy && run.extends(tag, hdr.offset) {
            run.pieces.push(payload);
            continue;
        }
        run.write(vols, state)?;
        if hdr.kind == Kind::Copy {
            check_range(&vols[tag], hdr.offset, payload.len() as u64)?;
            run = CopyRun {
                tag,
                offset: hdr.offset,
                pieces: vec![payload],
            };
            continue;
        }
        apply_one(&vols[tag], tag, hdr, payload, state)?;
    }
    run.write(vols, state)
}

/// Resync copies of one member that follow one another on the volume in one
/// received batch (one socket read: about [`RECEIVE_READ_BYTES`], four 64 KiB
/// copies), written together ([`FileDevice::write_through_at`]: one direct
/// write instead of a page-cache write per block).
#[derive(Default)]
struct CopyRun<'a> {
    tag: usize,
    offset: u64,
    pieces: Vec<&'a [u8]>,
}

/// Longest run of contiguous resync copies written at once (a bound: a batch
/// is smaller).
const COPY_RUN_BYTES_MAX: u64 = 4 * 1024 * 1024;

impl CopyRun<'_> {
    fn len(&self) -> u64 {
        self.pieces.iter().map(|p| p.len() as u64).sum()
    }

    /// Whether a copy of member `tag` at `offset` continues this run.
    fn extends(&self, tag: usize, offset: u64) -> bool {
        let len = self.len();
        !self.pieces.is_empty()
            && self.tag == tag
            && self.offset + len == offset
            && len < COPY_RUN_BYTES_MAX
    }

    fn write(
        &mut self,
        vols: &[Arc<ReplicaVolume>],
        state: &(Mutex<FlushState>, std::sync::Condvar),
    ) -> Result<()> {
        if self.pieces.is_empty() {
            return Ok(());
        }
        let vol = &vols[self.tag];
        let len = self.len();
        check_range(vol, self.offset, len)?;
        let _snap = vol.snapshot.before_write(&vol.dev, self.offset, len);
        let wrote = vol.dev.write_through_at(&self.pieces, self.offset);
        vol.leaves.invalidate(self.offset, len);
        wrote.with_context(|| format!("writing {len} bytes at {}", self.offset))?;
        self.pieces.clear();
        vol.bytes_applied.fetch_add(len, Ordering::Relaxed);
        let mut st = state.0.lock().unwrap_or_else(|p| p.into_inner());
        st.copied += len;
        if st.copied >= WRITEBACK_KICK_BYTES {
            st.copied = 0;
            st.kick = true;
            state.1.notify_all();
        }
        Ok(())
    }
}

fn apply_one(
    vol: &ReplicaVolume,
    tag: usize,
    hdr: &FrameHeader,
    payload: &[u8],
    state: &(Mutex<FlushState>, std::sync::Condvar),
) -> Result<()> {
    match hdr.kind {
        Kind::Write => {
            check_range(vol, hdr.offset, payload.len() as u64)?;
            let _snap = vol
                .snapshot
                .before_write(&vol.dev, hdr.offset, payload.len() as u64);
            let wrote = vol.dev.write_at(payload, hdr.offset, false);
            vol.leaves.invalidate(hdr.offset, payload.len() as u64);
            wrote.with_context(|| format!("writing {} bytes at {}", payload.len(), hdr.offset))?;
            vol.bytes_applied
                .fetch_add(payload.len() as u64, Ordering::Relaxed);
            state
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .wrote(payload.len() as u64, &state.1);
        }
        Kind::Zero => {
            let len =
                u64::from_be_bytes(payload.try_into().map_err(|_| anyhow!("bad Zero frame"))?);
            check_range(vol, hdr.offset, len)?;
            let _snap = vol.snapshot.before_write(&vol.dev, hdr.offset, len);
            let zeroed = vol.dev.write_zeroes(
                hdr.offset,
                len,
                ZeroMode {
                    may_punch: true,
                    fast_only: false,
                },
                false,
            );
            vol.leaves.invalidate(hdr.offset, len);
            zeroed?;
        }
        Kind::Flush => {
            if hdr.flags & FLAG_SNAPSHOT != 0
                && vol.snapshot.take_if_armed(
                    &vol.dir.join(super::snapshot::SNAPSHOT_FILE),
                    vol.dev.size(),
                    vol.granularity_bytes,
                    hdr.offset,
                )?
            {
                tracing::info!(volume = %vol.name, seq = hdr.seq, "replication.replica.snapshot_taken");
            }
            let mut st = state.0.lock().unwrap_or_else(|p| p.into_inner());
            let p = &mut st.pending[tag];
            // An up-to-date flush carries the primary's generation in `offset`.
            let up = if hdr.flags & FLAG_UP_TO_DATE != 0 {
                Some(hdr.offset)
            } else {
                p.and_then(|(_, u)| u)
            };
            *p = Some((hdr.seq, up));
            state.1.notify_all();
        }
        Kind::Ping => return Ok(()),
        other => bail!("unexpected {other:?} frame in the stream"),
    }
    Ok(())
}

fn check_range(vol: &ReplicaVolume, offset: u64, len: u64) -> Result<()> {
    ferry_core::Extent::within(offset, len, vol.dev.size())
        .map_err(|e| anyhow!("peer sent a range outside the volume: {e}"))?;
    Ok(())
}

/// Secondary volumes by name.
pub type Replicas = Mutex<HashMap<String, Arc<ReplicaVolume>>>;
