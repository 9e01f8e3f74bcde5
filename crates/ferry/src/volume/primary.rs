//! The primary's side: a volume exported over NBD whose writes are replicated.
//!
//! [`PrimaryVolume`] is the `BlockDevice` the NBD server serves (the IO filter).
//! For every write, on the NBD worker thread that carries it:
//!
//! 1. wait for in-flight writes that overlap it (ordering on the primary);
//! 2. make sure its activity-log extent is durably recorded;
//! 3. write it locally;
//! 4. hand it to the [`Replicator`] under the link lock, which sequences it and
//!    queues its frame (or marks it dirty when the peer is away or behind);
//! 5. in sync mode, wait until the peer has received it (FUA: made it durable);
//!    an NBD WRITE does not park its worker for this: it is *deferred*
//!    ([`BlockDevice::write_at_deferred`]) and answered by the link's ack reader,
//!    which answers every write an acknowledgement covers with one socket write;
//! 6. if it could not reach the peer, make sure a new generation is recorded
//!    before answering (DESIGN: a node persists a new generation before the
//!    first write it acknowledges while its peer is disconnected).
//!
//! The link's network side (TLS connection, frame writer, ack reader) lives in
//! [`super::link`]; the background copier is a thread per volume here.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_core::link::{CopyTask, LinkConfig, Mode, WriteDecision};
use ferry_core::{DirtyMap, Extent, Replicator};
use ferry_nbd::device::{Allocation, BlockDevice, Completion, FileDevice, ZeroMode};

use super::meta::{MetaFile, AL_EXTENT_SHIFT};
use crate::transport::settings::ReplicationSettings;

/// Contiguous dirty blocks the copier reads with one `pread`.
const COPY_BATCH_BLOCKS: usize = 16;

/// A frame waiting to be sent.
#[derive(Debug)]
pub enum Out {
    Data {
        kind: ferry_wire::Kind,
        seq: u64,
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        seq: u64,
        offset: u64,
        length: u64,
    },
    Flush {
        seq: u64,
        up_to_date_generation: Option<u64>,
        /// Takes the replica's snapshot armed with this token (a test cutover).
        snapshot: Option<u64>,
    },
}

impl Out {
    pub fn wire_bytes(&self) -> u64 {
        match self {
            Out::Data { data, .. } => Out::data_wire_bytes(data.len()),
            Out::Zero { .. } => Out::ZERO_WIRE_BYTES,
            Out::Flush { .. } => ferry_wire::HEADER_BYTES as u64,
        }
    }

    /// Bytes on the wire of a Data frame carrying `len` bytes (header, payload, CRC).
    pub const fn data_wire_bytes(len: usize) -> u64 {
        (ferry_wire::HEADER_BYTES + len + 4) as u64
    }

    /// Bytes on the wire of a Zero frame (header, u64 length, CRC).
    pub const ZERO_WIRE_BYTES: u64 = (ferry_wire::HEADER_BYTES + 8 + 4) as u64;
}

/// An NBD write waiting for the peer's acknowledgement of frame `seq`.
#[derive(Debug)]
pub struct Deferred {
    pub epoch: u64,
    pub seq: u64,
    pub durable: bool,
    pub started: Instant,
    pub done: Completion,
}

/// Whether a write or flush the peer did not confirm on connection `since`
/// is on the peer after all: a later connection resynced every block dirty
/// then (its blocks were) and announced the peer up to date with a flush
/// made durable there. It then needs no new generation — one recorded now
/// would be one the up-to-date replica never learns, and its next
/// promotion a split brain with this node (seen in the fault soak: an NBD
/// flush begun while the link was down ended after it was back). A verdict
/// of the current connection (an async overflow) still records one.
fn covered_by_later_resync(l: &LinkInner, since: u64) -> bool {
    l.announced_up_to_date && l.rep.epoch() != since
}

/// How far a write got before it needs the peer.
enum Begun {
    /// Nothing to wait for; `confirmed` when the peer has (or will get) it
    /// in order; `epoch`: the link's connection when that was decided.
    Answered { confirmed: bool, epoch: u64 },
    /// Wait for frame `seq` of connection `epoch` (`durable`: made durable).
    Wait { epoch: u64, seq: u64, durable: bool },
}

/// Counters and the last error of a link, for status and metrics.
#[derive(Debug, Default, Clone)]
pub struct LinkStats {
    pub bytes_sent: u64,
    pub copy_bytes_sent: u64,
    pub write_bytes_sent: u64,
    pub frames_sent: u64,
    pub last_error: Option<String>,
    pub split_brain: bool,
    pub connected_since: Option<Instant>,
    /// Bytes to copy when the current resync started (for % and ETA).
    pub resync_total_bytes: u64,
    /// Smoothed bytes/s sent (copy + writes), updated once a second.
    pub rate_bytes_per_s: f64,
    /// When the peer last sent anything on the link (HA: a sign of life).
    pub last_rx: Option<Instant>,
}

/// Auto-converge's pacing state of a volume.
#[derive(Debug, Default)]
struct ThrottlePace {
    /// The last rate probe: when, and the bytes written then.
    probe: Option<(Instant, u64)>,
    /// The write rate while not throttled (smoothed), bytes/s.
    rate_bytes_per_s: f64,
    /// The rate the throttle holds back a share of (0: none measured).
    base_bytes_per_s: f64,
    /// When the next write may be answered.
    next_free: Option<Instant>,
}

/// Everything guarded by the link lock.
#[derive(Debug)]
pub struct LinkInner {
    pub rep: Replicator,
    /// The stream this volume's frames go out on while connected, and this
    /// volume's tag in it.
    pub group: Option<Arc<Group>>,
    pub tag: u16,
    pub peer: Option<String>,
    pub max_rate_bytes_per_s: Option<u64>,
    /// A generation was recorded since the peer went away.
    pub bumped_while_down: bool,
    /// The peer was told it is up to date for the current streaming phase.
    pub announced_up_to_date: bool,
    pub stats: LinkStats,
    pub stop: bool,
    /// The dirty map was computed by comparing block hashes with the peer's
    /// existing copy: a blank peer needs only those blocks, not a full sync.
    pub checksum_baseline: bool,
    /// Writers waiting for an acknowledgement: (seq, durable?, thread to unpark).
    pub waiters: Vec<(u64, bool, std::thread::Thread)>,
    /// Deferred NBD writes waiting for an acknowledgement.
    pub deferred: Vec<Deferred>,
    /// A link task is running for this volume…
    pub task_running: bool,
    /// …as a member of this group (its workload, or the volume alone).
    pub link_group: Option<String>,
    /// Asks that task to end so the volume can join another group.
    pub regroup: bool,
    /// The live connection to the peer, if any.
    pub wire: Option<Arc<super::link::Wire>>,
}

/// The volumes replicated over one connection as **one ordered stream**: a
/// workload's volumes (a volume alone is a group of one). Every member's
/// frames go out in the order they were sequenced, each tagged with the
/// member's index, so the replica applies writes to different volumes in the
/// order the primary acknowledged them.
///
/// Sending happens on the calling thread: one thread sends at a time (the
/// wire's send token); a thread that finds the token taken leaves its frames
/// to the holder, which looks at the queue again before it lets go.
pub struct Group {
    pub name: String,
    pub members: Vec<Arc<PrimaryVolume>>,
    queue: Mutex<VecDeque<(u16, Out)>>,
    wire: Mutex<Option<Arc<super::link::Wire>>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Group {
    pub fn new(name: String, members: Vec<Arc<PrimaryVolume>>) -> Arc<Group> {
        Arc::new(Group {
            name,
            members,
            queue: Mutex::new(VecDeque::new()),
            wire: Mutex::new(None),
        })
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<(u16, Out)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_wire(&self, wire: Option<Arc<super::link::Wire>>) {
        *self.wire.lock().unwrap_or_else(|p| p.into_inner()) = wire;
    }

    /// Frames of member `tag` still queued.
    pub fn has_frames(&self, tag: u16) -> bool {
        self.queue().iter().any(|(t, _)| *t == tag)
    }

    /// Forgets member `tag`'s queued frames (its dirty map covers them).
    pub fn drop_frames(&self, tag: u16) {
        self.queue().retain(|(t, _)| *t != tag);
    }

    pub fn pump(&self) {
        loop {
            let Some(wire) = self.wire.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
                return;
            };
            let Ok(token) = wire.send_token.try_lock() else {
                return;
            };
            loop {
                let batch: Vec<(u16, Out)> = self.queue().drain(..).collect();
                if batch.is_empty() {
                    break;
                }
                match wire.send(&batch) {
                    Ok(()) => {
                        let mut sent = vec![LinkStats::default(); self.members.len()];
                        for (t, o) in &batch {
                            let Some(st) = sent.get_mut(usize::from(*t)) else {
                                continue;
                            };
                            st.frames_sent += 1;
                            st.bytes_sent += o.wire_bytes();
                            match o {
                                Out::Data {
                                    kind: ferry_wire::Kind::Copy,
                                    data,
                                    ..
                                } => st.copy_bytes_sent += data.len() as u64,
                                Out::Data { data, .. } => st.write_bytes_sent += data.len() as u64,
                                _ => {}
                            }
                        }
                        for (m, st) in self.members.iter().zip(sent) {
                            if st.frames_sent > 0 {
                                let mut l = m.link.lock();
                                l.stats.frames_sent += st.frames_sent;
                                l.stats.bytes_sent += st.bytes_sent;
                                l.stats.copy_bytes_sent += st.copy_bytes_sent;
                                l.stats.write_bytes_sent += st.write_bytes_sent;
                            }
                        }
                    }
                    Err(e) => {
                        wire.fail(&format!("sending to the peer failed: {e}"));
                        return;
                    }
                }
            }
            drop(token);
            if self.queue().is_empty() {
                return;
            }
        }
    }
}

/// The link lock and its wake-ups.
#[derive(Debug)]
pub struct Link {
    pub inner: Mutex<LinkInner>,
    /// Work for the copier.
    pub copier: Condvar,
}

impl Link {
    pub fn lock(&self) -> MutexGuard<'_, LinkInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame on the stream (dropped when not connected: the write
    /// is then tracked in the dirty map).
    pub fn push(&self, inner: &mut LinkInner, out: Out) {
        if let Some(g) = &inner.group {
            g.queue().push_back((inner.tag, out));
        }
    }

    /// Sends the queued frames of this volume's stream (see [`Group::pump`]).
    pub fn pump(&self) {
        let g = self.lock().group.clone();
        if let Some(g) = g {
            g.pump();
        }
    }

    /// Queues a link-level flush if unconfirmed extents piled up or aged.
    pub fn maybe_flush(&self, inner: &mut LinkInner, now_ms: u64) {
        if inner.rep.flush_due(now_ms) {
            if let Some(seq) = inner.rep.on_flush(now_ms) {
                self.push(
                    inner,
                    Out::Flush {
                        seq,
                        up_to_date_generation: None,
                        snapshot: None,
                    },
                );
            }
        }
    }

    /// The link is gone: unconfirmed extents to the dirty map, waiters
    /// released. Returns the deferred writes it did not confirm, for
    /// [`PrimaryVolume::finish_unconfirmed`].
    #[must_use]
    pub fn disconnected(&self, error: Option<String>) -> Vec<Deferred> {
        let mut l = self.lock();
        l.rep.on_disconnect();
        if let Some(g) = l.group.take() {
            g.drop_frames(l.tag);
        }
        l.announced_up_to_date = false;
        l.stats.connected_since = None;
        if error.is_some() {
            l.stats.last_error = error;
        }
        if let Some(w) = l.wire.take() {
            w.fail("stopped");
        }
        for (_, _, t) in l.waiters.drain(..) {
            t.unpark();
        }
        let unconfirmed = std::mem::take(&mut l.deferred);
        drop(l);
        self.copier.notify_all();
        unconfirmed
    }

    /// Blocks until the peer has received (or, with `durable`, made durable)
    /// frame `seq` of connection `epoch`, or that connection is gone. Only the
    /// writers whose acknowledgement arrived are woken ([`Link::wake_acked`]).
    pub fn wait_for<'a>(
        &'a self,
        mut l: MutexGuard<'a, LinkInner>,
        epoch: u64,
        seq: u64,
        durable: bool,
    ) -> MutexGuard<'a, LinkInner> {
        loop {
            let done = if durable {
                l.rep.is_durable(epoch, seq)
            } else {
                l.rep.is_received(epoch, seq)
            };
            if done {
                return l;
            }
            l.waiters.push((seq, durable, std::thread::current()));
            drop(l);
            // The timeout is a safety net only; wake_acked unparks us.
            std::thread::park_timeout(Duration::from_millis(200));
            l = self.lock();
        }
    }

    /// Wakes the writers whose acknowledgement has arrived, and returns the
    /// deferred writes it confirmed (to answer once the lock is released).
    #[must_use]
    pub fn wake_acked(&self, l: &mut LinkInner) -> Vec<Deferred> {
        let epoch = l.rep.epoch();
        let mut confirmed = Vec::new();
        let mut i = 0;
        while i < l.deferred.len() {
            let d = &l.deferred[i];
            let done = if d.durable {
                l.rep.is_durable(d.epoch, d.seq)
            } else {
                l.rep.is_received(d.epoch, d.seq)
            };
            if done && d.epoch == epoch {
                confirmed.push(l.deferred.swap_remove(i));
            } else {
                i += 1;
            }
        }
        // Answer in stream order.
        confirmed.sort_unstable_by_key(|d| d.seq);
        let mut i = 0;
        while i < l.waiters.len() {
            let (seq, durable, _) = l.waiters[i];
            let done = if durable {
                l.rep.is_durable(epoch, seq)
            } else {
                l.rep.is_received(epoch, seq)
            };
            if done {
                l.waiters.swap_remove(i).2.unpark();
            } else {
                i += 1;
            }
        }
        confirmed
    }
}

/// In-flight write ranges; a new write overlapping one waits for it.
#[derive(Debug, Default)]
struct Overlap {
    ranges: Mutex<Vec<(u64, u64, u64)>>,
    cv: Condvar,
    next_id: std::sync::atomic::AtomicU64,
    /// Writers waiting on `cv` (guarded by `ranges`): a notify is a syscall,
    /// so it is made only when someone waits.
    waiting: std::sync::atomic::AtomicUsize,
}

struct OverlapGuard<'a> {
    o: &'a Overlap,
    id: u64,
}

impl Overlap {
    fn acquire(&self, e: Extent) -> OverlapGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut r = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        while r.iter().any(|&(_, s, end)| s < e.end() && e.offset < end) {
            self.waiting.fetch_add(1, Ordering::Relaxed);
            r = self.cv.wait(r).unwrap_or_else(|p| p.into_inner());
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        r.push((id, e.offset, e.end()));
        OverlapGuard { o: self, id }
    }

    fn busy(&self, start: u64, end: u64) -> bool {
        let r = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().any(|&(_, s, e)| s < end && start < e)
    }
}

impl Drop for OverlapGuard<'_> {
    fn drop(&mut self) {
        let mut r = self.o.ranges.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|&(id, _, _)| id != self.id);
        let waiting = self.o.waiting.load(Ordering::Relaxed) > 0;
        drop(r);
        if waiting {
            self.o.cv.notify_all();
        }
    }
}

/// Upper bounds (µs) of the write latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

/// A Prometheus-style latency histogram: cumulative counts are computed on export.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    pub buckets: [std::sync::atomic::AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub sum_us: std::sync::atomic::AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, us: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// A volume this node is primary for.
pub struct PrimaryVolume {
    pub name: String,
    pub id: String,
    pub dir: PathBuf,
    pub local: FileDevice,
    pub link: Arc<Link>,
    pub meta: Mutex<MetaFile>,
    pub settings: ReplicationSettings,
    overlap: Overlap,
    /// Client write latency (NBD WRITE/WRITE_ZEROES/TRIM, replication included).
    pub write_latency: LatencyHistogram,
    epoch_start: Instant,
    copier_started: AtomicBool,
    /// One dirty-map save at a time (they share a temporary file, and a later
    /// snapshot must not be overwritten by an earlier one).
    dirty_save: Mutex<()>,
    /// Activity-log extents writers wait to have recorded (group commit).
    al_pending: Mutex<std::collections::BTreeSet<u64>>,
    /// Cutover: `GATE_OPEN`, `GATE_FROZEN` (new writes wait) or `GATE_CLOSED`
    /// (this node is no longer primary: writes fail).
    gate: std::sync::atomic::AtomicU8,
    /// Writes between their gate check and their hand-off to the link.
    active_writes: std::sync::atomic::AtomicUsize,
    /// An archive's barrier holds new writes (apart from the gate, so a
    /// fence or cutover freezing the gate meanwhile is never undone by it).
    barrier_hold: AtomicBool,
    gate_lock: Mutex<()>,
    gate_cv: Condvar,
    /// Bytes clients wrote (the foreground write rate of a migration).
    bytes_written: std::sync::atomic::AtomicU64,
    /// Auto-converge: percent of the write rate held back by delaying replies.
    throttle_pct: std::sync::atomic::AtomicU8,
    /// Auto-converge's pacing of writes (see [`PrimaryVolume::throttle`]).
    throttle_pace: Mutex<ThrottlePace>,
    /// Merkle leaves kept current for cutovers and verify.
    pub leaves: super::verify::LeafCache,
    /// The estimator's view of the writes and reads (off unless an
    /// estimate observes this volume).
    pub tap: crate::estimate::tap::WriteTap,
    /// An archive's copy-before-write snapshot at a flush barrier (off
    /// unless an archive of this volume is being taken).
    pub archive_snap: super::snapshot::Snapshot,
    /// Offline seeding: blocks written since each archive's barrier.
    pub seeds: super::seeds::SeedMaps,
    /// HA: may a write the peer did not confirm be acknowledged?
    pub alone: AlonePermit,
    /// HA: writes enter only before this instant ([`mono_ms`]); the cluster
    /// manager moves it forward with the node's lease. `u64::MAX` when no
    /// lease applies. The gate checks it on every write, so a stalled
    /// heartbeat thread cannot let writes outlive the lease.
    pub lease_until_ms: std::sync::atomic::AtomicU64,
    /// Local disk I/O errors seen by client reads and writes (HA hands the
    /// workload over when this grows).
    pub io_errors: std::sync::atomic::AtomicU64,
    /// Unconfirmed writes the link dropped while going alone was not yet
    /// permitted: answered once it is, or once the peer has them again.
    parked: Mutex<Vec<Deferred>>,
    /// Writes answered at once (async mode, or the peer away) while their
    /// connection had more requests at hand: replied to together at the
    /// next write without more at hand, or at `settle`.
    held_answers: Mutex<Vec<(Completion, io::Result<()>)>>,
}

/// Outdate before going alone (DESIGN invariant 2): in an HA cluster with a
/// witness, a sync primary acknowledges nothing its peer did not confirm
/// until the witness has recorded the peer outdated. The cluster manager
/// sets `required` for such volumes and `granted` from its state machine.
#[derive(Debug, Default)]
pub struct AlonePermit {
    required: AtomicBool,
    granted: Mutex<bool>,
    cv: Condvar,
    /// The peer is up to date again: a write still waiting for the permit
    /// was resent to it meanwhile, so it may be answered (without a new
    /// generation: nothing was acknowledged alone).
    peer_in_sync: AtomicBool,
}

impl AlonePermit {
    /// The link's view, from the cluster manager.
    pub fn set_peer_in_sync(&self, in_sync: bool) {
        if self.peer_in_sync.swap(in_sync, Ordering::SeqCst) != in_sync && in_sync {
            let _g = self.granted.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_all();
        }
    }

    pub fn set(&self, required: bool, granted: bool) {
        self.required.store(required, Ordering::SeqCst);
        let mut g = self.granted.lock().unwrap_or_else(|p| p.into_inner());
        if *g != granted {
            *g = granted;
            self.cv.notify_all();
        }
    }

    pub fn permitted(&self) -> bool {
        !self.required.load(Ordering::SeqCst)
            || *self.granted.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Milliseconds on the process's monotonic clock (shared by the write gate
/// and the HA cluster manager).
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

const GATE_OPEN: u8 = 0;
const GATE_FROZEN: u8 = 1;
const GATE_CLOSED: u8 = 2;

/// Leaves the gate's count of active writes when dropped.
struct Active<'a>(&'a PrimaryVolume);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if self.0.active_writes.fetch_sub(1, Ordering::SeqCst) == 1
            && (self.0.gate.load(Ordering::SeqCst) != GATE_OPEN
                || self.0.barrier_hold.load(Ordering::SeqCst))
        {
            let _g = self.0.gate_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.0.gate_cv.notify_all();
        }
    }
}

impl std::fmt::Debug for PrimaryVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryVolume")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The error a write gets once its volume was handed over to another node.
fn handed_over(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "volume {name} was handed over to another node (cutover); this copy is now a replica"
        ),
    )
}

fn io_other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl PrimaryVolume {
    pub fn new(
        name: String,
        id: String,
        dir: PathBuf,
        local: FileDevice,
        meta: MetaFile,
        dirty: DirtyMap,
        settings: ReplicationSettings,
    ) -> PrimaryVolume {
        let st = meta.state().clone();
        let cfg = LinkConfig {
            mode: st.mode,
            backlog_bytes_max: settings.backlog_bytes_max,
            peer_ack_timeout_ms: settings.peer_ack_timeout_ms,
            copies_in_flight_max: settings.copies_in_flight_max,
            flush_interval_ms: settings.link_flush_interval_ms,
            flush_bytes: settings.link_flush_bytes,
            unconfirmed_blocks_max: settings.link_unconfirmed_blocks_max,
        };
        let rep = Replicator::new(cfg, dirty, st.consistent);
        let leaves = super::verify::LeafCache::new(local.size(), settings.granularity_bytes);
        PrimaryVolume {
            name,
            id,
            dir,
            local,
            link: Arc::new(Link {
                inner: Mutex::new(LinkInner {
                    rep,
                    group: None,
                    tag: 0,
                    peer: st.peer.clone(),
                    max_rate_bytes_per_s: None,
                    bumped_while_down: false,
                    announced_up_to_date: false,
                    stats: LinkStats::default(),
                    stop: false,
                    waiters: Vec::new(),
                    deferred: Vec::new(),
                    checksum_baseline: false,
                    wire: None,
                    task_running: false,
                    link_group: None,
                    regroup: false,
                }),
                copier: Condvar::new(),
            }),
            meta: Mutex::new(meta),
            settings,
            overlap: Overlap::default(),
            write_latency: LatencyHistogram::default(),
            epoch_start: Instant::now(),
            copier_started: AtomicBool::new(false),
            dirty_save: Mutex::new(()),
            al_pending: Mutex::new(std::collections::BTreeSet::new()),
            gate: std::sync::atomic::AtomicU8::new(GATE_OPEN),
            active_writes: std::sync::atomic::AtomicUsize::new(0),
            barrier_hold: AtomicBool::new(false),
            gate_lock: Mutex::new(()),
            gate_cv: Condvar::new(),
            bytes_written: std::sync::atomic::AtomicU64::new(0),
            throttle_pct: std::sync::atomic::AtomicU8::new(0),
            throttle_pace: Mutex::new(ThrottlePace::default()),
            leaves,
            tap: crate::estimate::tap::WriteTap::new(),
            archive_snap: super::snapshot::Snapshot::default(),
            seeds: super::seeds::SeedMaps::default(),
            alone: AlonePermit::default(),
            lease_until_ms: std::sync::atomic::AtomicU64::new(u64::MAX),
            io_errors: std::sync::atomic::AtomicU64::new(0),
            parked: Mutex::new(Vec::new()),
            held_answers: Mutex::new(Vec::new()),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch_start.elapsed().as_millis() as u64
    }

    fn meta(&self) -> MutexGuard<'_, MetaFile> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// Auto-converge: slow client writes by `pct` percent (0 = off, ≤ 95).
    /// Called about once a second (each migration sample): while off, it
    /// measures the volume's write rate; the rate when the throttle goes on
    /// is the one it holds `pct` percent of back.
    pub fn set_throttle_pct(&self, pct: u8) {
        let pct = pct.min(95);
        let now = Instant::now();
        let written = self.bytes_written();
        let mut p = self.throttle_pace.lock().unwrap_or_else(|e| e.into_inner());
        if pct == 0 {
            if let Some((t, b)) = p.probe {
                let sec = now.duration_since(t).as_secs_f64();
                if sec > 0.2 {
                    let r = written.saturating_sub(b) as f64 / sec;
                    p.rate_bytes_per_s = if p.rate_bytes_per_s > 0.0 {
                        0.5 * r + 0.5 * p.rate_bytes_per_s
                    } else {
                        r
                    };
                }
            }
            p.base_bytes_per_s = 0.0;
        } else if p.base_bytes_per_s == 0.0 {
            p.base_bytes_per_s = p.rate_bytes_per_s;
        }
        p.probe = Some((now, written));
        drop(p);
        self.throttle_pct.store(pct, Ordering::Relaxed);
    }

    /// Bytes the image really occupies (sparse files).
    pub fn allocated_bytes(&self) -> u64 {
        let mut runs = Vec::new();
        let size = self.local.size();
        let (mut pos, mut used) = (0u64, 0u64);
        while pos < size {
            runs.clear();
            if self
                .local
                .block_status(pos, size - pos, 1024, &mut runs)
                .is_err()
                || runs.is_empty()
            {
                return size;
            }
            for r in &runs {
                if !r.hole {
                    used += r.length;
                }
                pos += r.length;
            }
        }
        used
    }

    /// Auto-converge: a write of `len` bytes that took `spent` waits a
    /// little more, so the volume's writes come `throttle_pct` percent
    /// slower: paced to that share of the write rate measured when the
    /// throttle went on (a client writing at a fixed rate, whose writes are
    /// fast enough to leave gaps, is slowed too), and at least by the same
    /// share of the write's own time (a client that waits for each write).
    fn throttle(&self, len: usize, spent: Duration) {
        let pct = u32::from(self.throttle_pct.load(Ordering::Relaxed));
        if pct == 0 {
            return;
        }
        let base = spent.max(Duration::from_micros(200));
        let mut wait = base * pct / (100 - pct);
        let mut p = self.throttle_pace.lock().unwrap_or_else(|e| e.into_inner());
        if p.base_bytes_per_s > 0.0 {
            let cap = p.base_bytes_per_s * f64::from(100 - pct) / 100.0;
            let now = Instant::now();
            let free = p.next_free.filter(|&t| t > now).unwrap_or(now);
            // At most one second of writes waits its turn.
            let free = free.min(now + Duration::from_secs(1));
            p.next_free = Some(free + Duration::from_secs_f64(len as f64 / cap));
            wait = wait.max(free - now);
        }
        drop(p);
        std::thread::sleep(wait);
    }

    /// Lets a write in: waits while the volume is frozen, fails once it was
    /// handed over to another node.
    fn enter(&self) -> io::Result<Active<'_>> {
        loop {
            self.active_writes.fetch_add(1, Ordering::SeqCst);
            let active = Active(self);
            match self.gate.load(Ordering::SeqCst) {
                GATE_OPEN if self.lease_holds() && !self.barrier_hold.load(Ordering::SeqCst) => {
                    return Ok(active)
                }
                GATE_CLOSED => return Err(handed_over(&self.name)),
                _ => {}
            }
            drop(active);
            let mut g = self.gate_lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match self.gate.load(Ordering::SeqCst) {
                    GATE_FROZEN => {}
                    GATE_OPEN
                        if !self.lease_holds() || self.barrier_hold.load(Ordering::SeqCst) => {}
                    _ => break,
                }
                g = self
                    .gate_cv
                    .wait_timeout(g, Duration::from_millis(5))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }

    /// Whether the HA lease (if any) still covers a write entering now.
    fn lease_holds(&self) -> bool {
        let until = self.lease_until_ms.load(Ordering::Relaxed);
        until == u64::MAX || mono_ms() < until
    }

    /// Cutover: new writes wait; returns once no write is between its gate
    /// and the link (deferred ones may still wait for their ack: see
    /// [`PrimaryVolume::drain`]).
    pub fn freeze(&self) {
        self.gate.store(GATE_FROZEN, Ordering::SeqCst);
        let mut g = self.gate_lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.active_writes.load(Ordering::SeqCst) > 0 {
            g = self
                .gate_cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// An archive's barrier: new writes wait and the ones inside finish, the
    /// gate left as it is (see `barrier_hold`). Ends with
    /// [`PrimaryVolume::release_barrier`].
    pub fn hold_for_barrier(&self) {
        self.barrier_hold.store(true, Ordering::SeqCst);
        let mut g = self.gate_lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.active_writes.load(Ordering::SeqCst) > 0 {
            g = self
                .gate_cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The barrier is taken: held writes go on (unless the gate holds them).
    pub fn release_barrier(&self) {
        self.barrier_hold.store(false, Ordering::SeqCst);
        let _g = self.gate_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.gate_cv.notify_all();
    }

    /// HA fencing: new writes wait from now on, without waiting for the
    /// writes already inside (some may wait for a permit that only the
    /// caller's thread would grant).
    pub fn freeze_nowait(&self) {
        let _ =
            self.gate
                .compare_exchange(GATE_OPEN, GATE_FROZEN, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The volume's persisted replication state.
    pub fn meta_state(&self) -> super::meta::MetaState {
        self.meta().state().clone()
    }

    /// Cutover aborted: writes flow again.
    pub fn unfreeze(&self) {
        self.gate.store(GATE_OPEN, Ordering::SeqCst);
        let _g = self.gate_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.gate_cv.notify_all();
    }

    /// The volume now belongs to another node: held and new writes fail.
    pub fn close_gate(&self) {
        self.gate.store(GATE_CLOSED, Ordering::SeqCst);
        let _g = self.gate_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.gate_cv.notify_all();
    }

    /// Cutover, once frozen: waits until the peer holds everything durably —
    /// no dirty block, nothing unacknowledged, a flush after the last write
    /// made durable. Fails if the link is down or `timeout` passes.
    pub fn drain(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.now_ms();
            let mut l = self.link.lock();
            if l.rep.phase() != ferry_core::link::Phase::Streaming {
                if Instant::now() > deadline {
                    return Err(format!(
                        "the link is not streaming ({:?}) after {} ms",
                        l.rep.phase(),
                        timeout.as_millis()
                    ));
                }
                drop(l);
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let st = l.rep.status();
            if st.dirty_bytes > 0 || !l.deferred.is_empty() {
                drop(l);
                if Instant::now() > deadline {
                    return Err("the replica did not catch up in time".into());
                }
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let seq = self.queue_flush(&mut l, now, None)?;
            let epoch = l.rep.epoch();
            drop(l);
            self.link.pump();
            let mut l = self.link.lock();
            l = self.link.wait_for(l, epoch, seq, true);
            if l.rep.epoch() != epoch {
                return Err(l
                    .stats
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the link dropped while draining".into()));
            }
            let st = l.rep.status();
            if st.dirty_bytes == 0 && st.backlog_bytes == 0 && st.unconfirmed_blocks == 0 {
                return Ok(());
            }
            drop(l);
            if Instant::now() > deadline {
                return Err("the replica did not confirm everything in time".into());
            }
        }
    }

    /// Before a cutover's or switchover's freeze, with writes still flowing:
    /// asks the replica to make everything it has durable and waits for it
    /// (at most `timeout`), so the flush that ends the drain inside the
    /// freeze has only what was written since. Not a guarantee of anything:
    /// the drain's own flush is; a link that is not streaming is skipped.
    /// Returns how long the replica took, if it flushed.
    pub fn flush_link(&self, timeout: Duration) -> Result<Option<Duration>, String> {
        let started = Instant::now();
        let now = self.now_ms();
        let mut l = self.link.lock();
        if l.rep.phase() != ferry_core::link::Phase::Streaming {
            return Ok(None);
        }
        let seq = self.queue_flush(&mut l, now, None)?;
        let epoch = l.rep.epoch();
        drop(l);
        self.link.pump();
        let deadline = started + timeout;
        let mut l = self.link.lock();
        loop {
            if l.rep.epoch() != epoch {
                return Err(l
                    .stats
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the link dropped while flushing".into()));
            }
            if l.rep.is_durable(epoch, seq) {
                return Ok(Some(started.elapsed()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the replica did not flush within {} ms",
                    timeout.as_millis()
                ));
            }
            l.waiters.push((seq, true, std::thread::current()));
            drop(l);
            // wake_acked unparks us; the timeout bounds the wait.
            std::thread::park_timeout(Duration::from_millis(20));
            l = self.link.lock();
        }
    }

    /// Queues a link flush (with `snapshot`, one that takes the replica's
    /// armed snapshot); returns its sequence number.
    fn queue_flush(
        &self,
        l: &mut LinkInner,
        now: u64,
        snapshot: Option<u64>,
    ) -> Result<u64, String> {
        let seq = l
            .rep
            .on_flush(now)
            .ok_or("the link cannot take a flush (it fell behind)")?;
        self.link.push(
            l,
            Out::Flush {
                seq,
                up_to_date_generation: None,
                snapshot,
            },
        );
        Ok(seq)
    }

    /// Test cutover, once frozen: queues a Flush frame that takes the
    /// replica's armed snapshot — every write that began before it is ahead of
    /// it in the stream, none after. Fails unless the replica is up to date
    /// and the link streams.
    pub fn snapshot_barrier(&self, token: u64) -> Result<(), String> {
        let now = self.now_ms();
        let mut l = self.link.lock();
        let st = l.rep.status();
        if st.phase != ferry_core::link::Phase::Streaming {
            return Err(format!(
                "the link of {} is not streaming ({:?})",
                self.name, st.phase
            ));
        }
        if st.replica != ferry_core::link::ReplicaState::UpToDate {
            return Err(format!(
                "the replica of {} is {}, not up-to-date",
                self.name,
                st.replica.as_str()
            ));
        }
        self.queue_flush(&mut l, now, Some(token))?;
        // Sent by the caller once the volumes are unfrozen: a large async
        // backlog ahead of the barrier must not hold writes up.
        Ok(())
    }

    /// Is the write gate open (no cutover or fence holds writes)?
    pub fn gate_open(&self) -> bool {
        self.gate.load(Ordering::SeqCst) == GATE_OPEN
    }

    /// An archive's barrier, the volume frozen: starts a new generation `g`
    /// (offline seeding names the copy by it). A peer that is up to date
    /// and streaming is told at once, in stream order (every write before
    /// the barrier precedes it), so both copies keep one history.
    pub fn mint_generation(&self, g: u64) -> io::Result<()> {
        // Lock order: meta, then link (as every bump).
        let mut meta = self.meta();
        meta.update(|s| s.generation.bump(g)).map_err(io_other)?;
        let now = self.now_ms();
        let mut l = self.link.lock();
        if l.rep.phase() == ferry_core::link::Phase::Streaming && l.announced_up_to_date {
            if let Some(seq) = l.rep.announce_up_to_date(now) {
                self.link.push(
                    &mut l,
                    Out::Flush {
                        seq,
                        up_to_date_generation: Some(g),
                        snapshot: None,
                    },
                );
            }
        }
        drop(l);
        drop(meta);
        self.link.pump();
        tracing::info!(volume = %self.name, generation = format!("{g:016x}"), "volume.generation.minted: an archive's barrier");
        Ok(())
    }

    /// The generation history (current first, then ancestors).
    pub fn generations(&self) -> Vec<u64> {
        let meta = self.meta();
        let g = &meta.state().generation;
        std::iter::once(g.current()).chain(g.ancestors()).collect()
    }

    /// Records the activity-log extents `e` touches before a write into them.
    ///
    /// Group commit: a writer that finds its extents missing first posts them
    /// in `al_pending`; whoever then holds the metadata lock records every
    /// posted extent with one durable write, so writers missing at the same
    /// time share one `fdatasync` (a cold volume under random writes would
    /// otherwise pay one each, in a row).
    fn activity_log(&self, e: Extent) -> io::Result<()> {
        let first = e.offset >> AL_EXTENT_SHIFT;
        let last = (e.end().max(e.offset + 1) - 1) >> AL_EXTENT_SHIFT;
        let missing = |meta: &MetaFile| -> Vec<u64> {
            (first..=last)
                .filter(|x| !meta.state().al_extents.contains(x))
                .collect()
        };
        let mine = missing(&self.meta());
        if mine.is_empty() {
            return Ok(());
        }
        self.al_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(mine.iter().copied());
        let mut meta = self.meta();
        let mut todo: std::collections::BTreeSet<u64> = missing(&meta).into_iter().collect();
        if todo.is_empty() {
            // Another writer's commit recorded ours.
            return Ok(());
        }
        todo.extend(std::mem::take(
            &mut *self.al_pending.lock().unwrap_or_else(|p| p.into_inner()),
        ));
        todo.retain(|x| !meta.state().al_extents.contains(x));
        let max = self.settings.al_extents_max.min(super::meta::AL_SLOTS);
        let mut al = meta.state().al_extents.clone();
        let mut evicted = false;
        for m in todo {
            while al.len() >= max {
                // Evict the oldest extent with no write in flight.
                let pos = al
                    .iter()
                    .position(|&x| {
                        !self
                            .overlap
                            .busy(x << AL_EXTENT_SHIFT, (x + 1) << AL_EXTENT_SHIFT)
                    })
                    .unwrap_or(0);
                al.remove(pos);
                evicted = true;
            }
            al.push(m);
        }
        if evicted {
            // What the evicted extents may still differ in must survive a crash
            // without them: save a pessimistic dirty map first (and the
            // seed maps, which a crash also recovers from the log).
            self.save_dirty_map(true)?;
            self.seeds.save()?;
        }
        meta.update(|s| s.al_extents = al).map_err(io_other)
    }

    /// Saves the dirty map; `pessimistic` adds everything not yet confirmed on the peer.
    pub fn save_dirty_map(&self, pessimistic: bool) -> io::Result<()> {
        let _one = self.dirty_save.lock().unwrap_or_else(|p| p.into_inner());
        let map = {
            let l = self.link.lock();
            if pessimistic {
                l.rep.pessimistic_dirty_map()
            } else {
                l.rep.dirty_map().clone()
            }
        };
        super::meta::save_dirty_map(&self.dir, &map)
    }

    /// Records a new generation once per disconnection, before acknowledging a
    /// write the peer did not confirm; `since`: the link's connection
    /// (`Replicator::epoch`) when the write or flush found the peer missing.
    fn ensure_generation_bumped(&self, since: u64) -> io::Result<()> {
        {
            let l = self.link.lock();
            if l.bumped_while_down || l.peer.is_none() || covered_by_later_resync(&l, since) {
                return Ok(());
            }
        }
        if !self.wait_alone_permit()? {
            // The peer has it after all: not acknowledged alone.
            return Ok(());
        }
        let mut meta = self.meta();
        let mut l = self.link.lock();
        // Under meta and link, the locks the announcement takes: either it
        // was made (the peer holds this) or it will carry the new id.
        if l.bumped_while_down || covered_by_later_resync(&l, since) {
            return Ok(());
        }
        let id = crate::transport::identity::random_u64();
        meta.update(|s| s.generation.bump(id)).map_err(io_other)?;
        l.bumped_while_down = true;
        tracing::info!(volume = %self.name, generation = format!("{id:016x}"), "replication.generation.bump: peer not confirming writes");
        Ok(())
    }

    fn write_common(
        &self,
        extent: Extent,
        local: impl FnOnce() -> io::Result<()>,
        wire: u64,
        out: impl FnOnce(u64) -> Out,
        fua: bool,
    ) -> io::Result<()> {
        let started = Instant::now();
        let result = self
            .write_begin(extent, local, wire, out, fua, true)
            .and_then(|b| self.finish_blocking(b));
        self.write_latency
            .record(started.elapsed().as_micros() as u64);
        result
    }

    /// Steps 1–4 of an NBD WRITE of `buf` at `offset`; its frame waits in
    /// the queue unless `send_now` (see [`BlockDevice::settle`]).
    fn begin_data_write(
        &self,
        buf: &[u8],
        offset: u64,
        fua: bool,
        send_now: bool,
    ) -> io::Result<Begun> {
        let e = Extent {
            offset,
            length: buf.len() as u64,
        };
        self.write_begin(
            e,
            || self.local.write_at(buf, offset, false),
            Out::data_wire_bytes(buf.len()),
            |seq| Out::Data {
                kind: ferry_wire::Kind::Write,
                seq,
                offset,
                data: buf.to_vec(),
            },
            fua,
            send_now,
        )
    }

    /// Step 5–6 on the calling thread: waits for the peer if needed.
    fn finish_blocking(&self, b: Begun) -> io::Result<()> {
        match b {
            Begun::Answered { confirmed, epoch } => self.answer(confirmed, epoch),
            Begun::Wait {
                epoch,
                seq,
                durable,
            } => {
                let mut l = self.link.lock();
                l = self.link.wait_for(l, epoch, seq, durable);
                let confirmed = l.rep.epoch() == epoch;
                drop(l);
                self.answer(confirmed, epoch)
            }
        }
    }

    /// The result of a write that got as far as it will: a write the peer did
    /// not confirm (on connection `epoch`) is acknowledged only once a new
    /// generation is recorded.
    fn answer(&self, confirmed: bool, epoch: u64) -> io::Result<()> {
        if confirmed {
            Ok(())
        } else {
            self.ensure_generation_bumped(epoch)
        }
    }

    /// Answers deferred writes the peer confirmed.
    pub fn finish_confirmed(&self, done: Vec<Deferred>) {
        if done.is_empty() {
            return;
        }
        let batch = done
            .into_iter()
            .map(|d| {
                self.write_latency
                    .record(d.started.elapsed().as_micros() as u64);
                (d.done, Ok(()))
            })
            .collect();
        Completion::complete_batch(batch);
    }

    /// Waits until acknowledging alone is permitted (HA: the witness
    /// recorded the peer outdated): `Ok(true)`; or until the peer is up to
    /// date again, so the write need not go alone: `Ok(false)`. Fails if
    /// the volume is handed over.
    fn wait_alone_permit(&self) -> io::Result<bool> {
        let mut g = self.alone.granted.lock().unwrap_or_else(|p| p.into_inner());
        let mut logged = false;
        while self.alone.required.load(Ordering::SeqCst) && !*g {
            if self.gate.load(Ordering::SeqCst) == GATE_CLOSED {
                return Err(handed_over(&self.name));
            }
            if logged && self.alone.peer_in_sync.load(Ordering::SeqCst) {
                return Ok(false);
            }
            if !logged {
                logged = true;
                // Not under the permit's lock: writing the log line may
                // wait on stderr, and the HA heartbeat thread sets the
                // permit.
                drop(g);
                tracing::warn!(volume = %self.name, "replication.writes_held: the peer is gone; writes wait until the witness records it outdated");
                g = self.alone.granted.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            g = self
                .alone
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(true)
    }

    /// HA: answers the parked unconfirmed writes once going alone is
    /// permitted, or — `peer_has_them` — once the peer is up to date again
    /// (their blocks were resent from the dirty map).
    pub fn release_parked(&self, peer_has_them: bool) {
        if !peer_has_them && !self.alone.permitted() {
            return;
        }
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|p| p.into_inner()));
        if parked.is_empty() {
            return;
        }
        if peer_has_them {
            self.finish_confirmed(parked);
        } else {
            self.finish_unconfirmed(parked);
        }
    }

    /// Answers deferred writes the link dropped: a new generation first.
    pub fn finish_unconfirmed(&self, pending: Vec<Deferred>) {
        if pending.is_empty() {
            return;
        }
        if !self.alone.permitted() {
            // Not on the link thread's time: the cluster manager answers
            // them (release_parked).
            self.parked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(pending);
            return;
        }
        let since = pending.iter().map(|d| d.epoch).min().unwrap_or(0);
        let result = self.ensure_generation_bumped(since);
        let batch = pending
            .into_iter()
            .map(|d| {
                self.write_latency
                    .record(d.started.elapsed().as_micros() as u64);
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                (d.done, r)
            })
            .collect();
        Completion::complete_batch(batch);
    }

    /// The link is gone (or stopped): see [`Link::disconnected`].
    pub fn link_down(&self, error: Option<String>) {
        let pending = self.link.disconnected(error);
        self.finish_unconfirmed(pending);
    }

    /// Steps 1–4 of a write (see the module documentation). Its frame is
    /// sent before this returns only if `send_now`; otherwise the caller
    /// pumps the link later (a batch of writes goes out in one send).
    fn write_begin(
        &self,
        extent: Extent,
        local: impl FnOnce() -> io::Result<()>,
        wire: u64,
        out: impl FnOnce(u64) -> Out,
        fua: bool,
        send_now: bool,
    ) -> io::Result<Begun> {
        let _active = self.enter()?;
        self.bytes_written
            .fetch_add(extent.length, Ordering::Relaxed);
        self.tap.write_extent(extent.offset, extent.length);
        let guard = self.overlap.acquire(extent);
        self.activity_log(extent)?;
        self.seeds.mark(extent);
        let wrote = {
            let _snap =
                self.archive_snap
                    .before_write_if_on(&self.local, extent.offset, extent.length);
            local()
        };
        // Even a failed write may have changed some bytes.
        self.leaves.invalidate(extent.offset, extent.length);
        if wrote.is_err() {
            self.io_errors.fetch_add(1, Ordering::Relaxed);
        }
        wrote?;
        if fua {
            self.local.flush().inspect_err(|_| {
                self.io_errors.fetch_add(1, Ordering::Relaxed);
            })?;
        }
        // Sequencing happens while the overlap guard is held, so overlapping
        // writes reach the peer in the order they completed here.
        let now = self.now_ms();
        let mut l = self.link.lock();
        let decision = l.rep.on_write(extent, wire, now);
        let l_epoch = l.rep.epoch();
        let mut wait = None;
        match decision {
            WriteDecision::Stream { seq, wait: w } => {
                self.link.push(&mut l, out(seq));
                let mut target = (seq, false);
                if fua {
                    if let Some(f) = l.rep.on_flush(now) {
                        self.link.push(
                            &mut l,
                            Out::Flush {
                                seq: f,
                                up_to_date_generation: None,
                                snapshot: None,
                            },
                        );
                        target = (f, true);
                    }
                }
                self.link.maybe_flush(&mut l, now);
                if w {
                    wait = Some(Begun::Wait {
                        epoch: l.rep.epoch(),
                        seq: target.0,
                        durable: target.1,
                    });
                }
            }
            WriteDecision::Overflow => {
                if let Some(g) = &l.group {
                    g.drop_frames(l.tag);
                }
                tracing::warn!(volume = %self.name, "replication.backlog.overflow: peer falls behind, resync from the dirty map");
            }
            WriteDecision::Dirty => {}
        }
        drop(guard);
        drop(l);
        if send_now {
            self.link.pump();
        }
        Ok(wait.unwrap_or(Begun::Answered {
            confirmed: matches!(decision, WriteDecision::Stream { .. }),
            epoch: l_epoch,
        }))
    }

    /// An NBD WRITE up to its answer: `None` when parked for the replica's
    /// acknowledgement (the ack reader answers it), else the answer due now.
    fn begin_deferred(
        &self,
        buf: &[u8],
        offset: u64,
        fua: bool,
        started: Instant,
        done: Completion,
    ) -> Option<(Completion, io::Result<()>)> {
        let result = match self.begin_data_write(buf, offset, fua, false) {
            Err(e) => Err(e),
            Ok(Begun::Answered { confirmed, epoch }) => self.answer(confirmed, epoch),
            Ok(Begun::Wait {
                epoch,
                seq,
                durable,
            }) => {
                let mut l = self.link.lock();
                let arrived = if durable {
                    l.rep.is_durable(epoch, seq)
                } else {
                    l.rep.is_received(epoch, seq)
                };
                if !arrived {
                    l.deferred.push(Deferred {
                        epoch,
                        seq,
                        durable,
                        started,
                        done,
                    });
                    drop(l);
                    self.throttle(buf.len(), started.elapsed());
                    return None;
                }
                let confirmed = l.rep.epoch() == epoch;
                drop(l);
                self.answer(confirmed, epoch)
            }
        };
        self.throttle(buf.len(), started.elapsed());
        self.write_latency
            .record(started.elapsed().as_micros() as u64);
        Some((done, result))
    }

    fn take_held_answers(&self) -> Vec<(Completion, io::Result<()>)> {
        std::mem::take(&mut *self.held_answers.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Starts the background copier thread (once).
    pub fn start_copier(self: &Arc<Self>) {
        if self.copier_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name(format!("copier-{}", self.name))
            .spawn(move || me.copier_loop());
    }

    fn copier_loop(&self) {
        let mut next_send = Instant::now();
        let copy_backlog_bytes_max = (self.settings.backlog_bytes_max / 2).clamp(1 << 20, 32 << 20);
        loop {
            // Take a run of contiguous dirty blocks (up to COPY_BATCH_BLOCKS) at once.
            let tasks: Vec<CopyTask> = {
                let mut l = self.link.lock();
                loop {
                    if l.stop {
                        return;
                    }
                    if l.rep.status().backlog_bytes < copy_backlog_bytes_max {
                        if let Some(first) = l.rep.next_copy() {
                            let mut v = vec![first];
                            while v.len() < COPY_BATCH_BLOCKS {
                                let want = v[v.len() - 1].block + 1;
                                if !l.rep.dirty_map().is_dirty(want) {
                                    break;
                                }
                                match l.rep.next_copy() {
                                    Some(t) if t.block == want => v.push(t),
                                    Some(t) => {
                                        // Not contiguous after all: keep it for the next batch.
                                        l.rep.copy_failed(t);
                                        break;
                                    }
                                    None => break,
                                }
                            }
                            break v;
                        }
                    }
                    let (guard, _) = self
                        .link
                        .copier
                        .wait_timeout(l, Duration::from_millis(200))
                        .unwrap_or_else(|p| p.into_inner());
                    l = guard;
                }
            };
            let start = tasks[0].extent.offset;
            let len: u64 = tasks.iter().map(|t| t.extent.length).sum();
            let whole = Extent {
                offset: start,
                length: len,
            };
            let blocks = match self.read_for_copy(whole, &tasks) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(volume = %self.name, offset = start, error = %e, "replication.copy.read_failed");
                    let mut l = self.link.lock();
                    for t in tasks {
                        l.rep.copy_failed(t);
                    }
                    drop(l);
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let rate = self.link.lock().max_rate_bytes_per_s;
            if let Some(rate) = rate.filter(|&r| r > 0) {
                let now = Instant::now();
                if next_send > now {
                    std::thread::sleep(next_send - now);
                }
                next_send = next_send.max(now) + Duration::from_secs_f64(len as f64 / rate as f64);
            }
            // The frames' payloads are made before taking the link lock
            // (writers wait on it). `None` is a block of zeroes.
            let blocks: Vec<(CopyTask, Option<Vec<u8>>)> = tasks.into_iter().zip(blocks).collect();
            let now = self.now_ms();
            let mut l = self.link.lock();
            for (t, data) in blocks {
                let wire = data
                    .as_ref()
                    .map_or(Out::ZERO_WIRE_BYTES, |d| Out::data_wire_bytes(d.len()));
                if let Some(seq) = l.rep.copy_ready(t, wire, now) {
                    let offset = t.extent.offset;
                    let o = match data {
                        Some(data) => Out::Data {
                            kind: ferry_wire::Kind::Copy,
                            seq,
                            offset,
                            data,
                        },
                        None => Out::Zero {
                            seq,
                            offset,
                            length: t.extent.length,
                        },
                    };
                    self.link.push(&mut l, o);
                }
            }
            self.link.maybe_flush(&mut l, now);
            drop(l);
            self.link.pump();
        }
    }

    /// Reads a run for the copier; `Ok(true)` when all of it is a hole (not read).
    /// The copies of `tasks` (contiguous blocks making up `e`), each read
    /// straight into its own frame payload; `None` for a block of zeroes (a
    /// hole is not even read).
    fn read_for_copy(&self, e: Extent, tasks: &[CopyTask]) -> io::Result<Vec<Option<Vec<u8>>>> {
        let mut runs = Vec::new();
        self.local.block_status(e.offset, e.length, 2, &mut runs)?;
        if runs.len() == 1 && runs[0].hole && runs[0].length == e.length {
            return Ok(vec![None; tasks.len()]);
        }
        let lens: Vec<usize> = tasks.iter().map(|t| t.extent.length as usize).collect();
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); tasks.len()];
        self.local.read_into_at(&mut bufs, &lens, e.offset)?;
        Ok(bufs
            .into_iter()
            .map(|b| b.iter().any(|&x| x != 0).then_some(b))
            .collect())
    }
}

impl BlockDevice for PrimaryVolume {
    fn size(&self) -> u64 {
        self.local.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.tap.read();
        self.local.read_at(buf, offset).inspect_err(|_| {
            self.io_errors.fetch_add(1, Ordering::Relaxed);
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let started = Instant::now();
        let result = self
            .begin_data_write(buf, offset, fua, true)
            .and_then(|b| self.finish_blocking(b));
        self.write_latency
            .record(started.elapsed().as_micros() as u64);
        result
    }

    fn write_at_deferred(&self, buf: &[u8], offset: u64, fua: bool, more: bool, done: Completion) {
        let started = Instant::now();
        // Its frame waits in the queue, and an answer due now waits with the
        // others: a burst goes out in one send and one reply write, at the
        // first write without more at hand (whatever became of it: an early
        // error must not strand what earlier writes held) or at `settle`.
        if let Some(answer) = self.begin_deferred(buf, offset, fua, started, done) {
            self.held_answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(answer);
        }
        if !more {
            self.settle();
        }
    }

    fn settle(&self) {
        self.link.pump();
        let held = self.take_held_answers();
        if !held.is_empty() {
            Completion::complete_batch(held);
        }
    }

    fn flush(&self) -> io::Result<()> {
        let _active = self.enter()?;
        let now = self.now_ms();
        let mut l = self.link.lock();
        let Some(seq) = l.rep.on_flush(now) else {
            let peer_away = l.peer.is_some();
            let since = l.rep.epoch();
            drop(l);
            self.local.flush()?;
            if peer_away {
                self.ensure_generation_bumped(since)?;
            }
            return Ok(());
        };
        // Every write answered before this call is sequenced before `seq`,
        // so the replica's flush covers them: it is sent first and its sync
        // overlaps the local one (the slower of the two, not their sum).
        self.link.push(
            &mut l,
            Out::Flush {
                seq,
                up_to_date_generation: None,
                snapshot: None,
            },
        );
        let sync_mode = l.rep.config().mode == Mode::Sync;
        let epoch = l.rep.epoch();
        drop(l);
        self.link.pump();
        self.local.flush()?;
        if !sync_mode {
            return Ok(());
        }
        let mut l = self.link.lock();
        l = self.link.wait_for(l, epoch, seq, true);
        let confirmed = l.rep.epoch() == epoch;
        drop(l);
        if !confirmed {
            self.ensure_generation_bumped(epoch)?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        // Replicated as its effect: the range reads as zeroes on both nodes.
        self.write_zeroes(
            offset,
            length,
            ZeroMode {
                may_punch: true,
                fast_only: false,
            },
            fua,
        )
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        let e = Extent { offset, length };
        self.write_common(
            e,
            || self.local.write_zeroes(offset, length, mode, false),
            Out::ZERO_WIRE_BYTES,
            |seq| Out::Zero {
                seq,
                offset,
                length,
            },
            fua,
        )
    }

    fn block_status(
        &self,
        offset: u64,
        length: u64,
        max_runs: usize,
        out: &mut Vec<Allocation>,
    ) -> io::Result<()> {
        self.local.block_status(offset, length, max_runs, out)
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.local.cache(offset, length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::meta::MetaState;
    use ferry_core::generation::Relation;

    fn volume(dir: &std::path::Path) -> PrimaryVolume {
        let size = 1 << 20;
        let local = FileDevice::create(&dir.join("data.raw"), size).unwrap();
        let mut meta =
            MetaFile::open_or_create(&dir.join("meta.bin"), MetaState::new_primary()).unwrap();
        meta.update(|s| {
            s.generation.bump(7);
            s.peer = Some("b".into());
        })
        .unwrap();
        let settings = ReplicationSettings::default();
        let dirty = DirtyMap::new(size, settings.granularity_bytes).unwrap();
        PrimaryVolume::new(
            "vol".into(),
            "id".into(),
            dir.to_path_buf(),
            local,
            meta,
            dirty,
            settings,
        )
    }

    /// Found by the fault soak (a split brain after a failover): an NBD
    /// flush begun while the link was down ended after the link was back and
    /// the replica announced up to date, and recorded a new generation the
    /// replica never learned. The race itself hangs on an fdatasync's
    /// timing; this drives the same steps on the link's state machine.
    #[test]
    fn a_write_or_flush_the_peer_got_by_a_later_resync_records_no_generation() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(dir.path());
        let generation = || v.meta_state().generation.current();
        {
            let mut l = v.link.lock();
            assert!(l.rep.on_connect(Relation::InSync, 0));
            l.rep.on_disconnect();
        }
        // The link is down: the first write acknowledged alone records one.
        let down = v.link.lock().rep.epoch();
        v.ensure_generation_bumped(down).unwrap();
        let alone = generation();
        assert_ne!(alone, 7);
        // A flush begins now (the peer is away). Meanwhile the link comes
        // back (as member_up and on_ack do it): resync, peer up to date.
        {
            let mut l = v.link.lock();
            l.bumped_while_down = false;
            assert!(l.rep.on_connect(Relation::Ahead, 0));
            l.announced_up_to_date = true;
        }
        // The flush ends: the peer holds everything it covers.
        v.ensure_generation_bumped(down).unwrap();
        assert_eq!(
            generation(),
            alone,
            "a generation recorded after the peer was announced up to date at the previous one"
        );
        // A write this connection did not get to the peer (an async
        // overflow) still records one.
        let now = v.link.lock().rep.epoch();
        v.ensure_generation_bumped(now).unwrap();
        assert_ne!(generation(), alone);
    }
}
