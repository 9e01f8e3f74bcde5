//! A share this node is primary for: the ordered stream of its file
//! operations, the replies waiting on the replica, and the journal of changed
//! paths kept while the replica cannot be told.
//!
//! Ordering: a mutation is applied to the tree and sequenced on the stream
//! while holding [`PrimaryShare::order`], so the replica applies operations in
//! the order they took effect here. The reply to the application waits
//! (outside that lock) for the replica's acknowledgement: "received" for
//! sync-mode mutations, "durable" for `fsync`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use ferry_wire::{FileOp, Kind, SharePath, Stamp, StampedOp};

use super::tree::Tree;
use super::{ShareRecord, ShareStore};
use crate::transport::tls_io::SharedTls;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Called once the replica has what the caller waits for (or the link is
/// gone and the change is journaled): `Ok` to answer the application.
pub type Done = Box<dyn FnOnce(std::io::Result<()>) + Send>;

/// Frames queued for the sender, and the sequence counter.
#[derive(Debug, Default)]
pub struct Order {
    next_seq: u64,
}

/// Wall-clock unix seconds (file ctimes are compared with it).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The write gate of a primary share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    /// Fenced or switching over: mutating calls wait.
    Frozen,
    /// Demoted: mutating calls fail.
    Closed,
}

/// What the async watcher saw in one batch.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Subtrees to compare (files in it by content).
    pub deep: Vec<SharePath>,
    /// Directories whose own attributes changed.
    pub shallow: Vec<SharePath>,
    /// Renames seen whole (both ends inside the share).
    pub renames: Vec<(SharePath, SharePath)>,
    /// Events were lost: compare by content what changed since then.
    pub unsure_since: Option<i64>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.deep.is_empty()
            && self.shallow.is_empty()
            && self.renames.is_empty()
            && self.unsure_since.is_none()
    }
}

/// The link's view, under one lock.
#[derive(Default)]
pub struct LinkState {
    pub connected: bool,
    /// The link's connection while connected (queued frames go out on it).
    wire: Option<Arc<SharedTls>>,
    /// A thread is sending queued frames (one at a time keeps them in order).
    sending: bool,
    /// Counts links brought up (a send that outlived its link sees it moved).
    epoch: u64,
    /// A resync is running: paths touched meanwhile are compared again.
    pub resyncing: bool,
    /// Paths touched by live operations during a resync.
    pub again: BTreeSet<SharePath>,
    /// Directories whose times changed during a resync.
    pub again_shallow: BTreeSet<SharePath>,
    /// Files a live operation changed while a delta of them was being
    /// made (the delta may have reused stale blocks): sent whole next pass.
    pub again_by_content: BTreeSet<SharePath>,
    /// Streamed and not yet durable on the replica: (seq, paths, parent dirs).
    pub unconfirmed: VecDeque<(u64, Vec<SharePath>, Vec<SharePath>)>,
    pub received_seq: u64,
    /// Applied on the replica (its apply thread acknowledges it after the
    /// receipt): what a resync pass or the async pump waits for.
    pub applied_seq: u64,
    pub durable_seq: u64,
    /// Encoded frames waiting for the sender.
    pub queue: VecDeque<Vec<u8>>,
    pub queued_bytes: u64,
    /// Bytes sent and not yet acknowledged as received.
    pub inflight: VecDeque<(u64, u64)>,
    pub inflight_bytes: u64,
    waiting_received: BTreeMap<u64, Vec<Done>>,
    waiting_durable: BTreeMap<u64, Vec<Done>>,
    /// The replica is an up-to-date copy (set when a resync ends).
    pub up_to_date: bool,
    pub last_error: Option<String>,
    /// The link asked to stop (replication stopped, share removed).
    pub stop: bool,
    /// Link threads running (at most one; a new one waits for 0).
    pub threads: u32,
    /// Async: renames the watcher saw, sent before the paths are compared.
    pub renames: Vec<(SharePath, SharePath)>,
    /// Async: the watcher lost events (queue overflow); files changed since
    /// this unix second are compared by content.
    pub unsure_since: Option<i64>,
    /// Async: when the oldest change not yet on the replica was seen.
    pub pending_since: Option<std::time::Instant>,
    /// Async: when the oldest change of the pass being sent was seen (the
    /// pass took it from `pending_since`); `None` between passes.
    pub pass_since: Option<std::time::Instant>,
    /// Async: change-to-replica time of the last pass, in ms.
    pub last_lag_ms: u64,
    /// Async: lags of recent passes (for p50/p99 in status), ms.
    pub lags_ms: VecDeque<u64>,
    /// The replica's free bytes as last reported, and the data bytes
    /// streamed since that report.
    pub replica_free: Option<u64>,
    pub since_free_report: u64,
    /// Flushes not yet durable: (seq, unix second it was sequenced). Once
    /// one is durable on an up-to-date replica, the replica was level with
    /// the tree as of that second.
    flush_times: VecDeque<(u64, i64)>,
    /// Sequence numbers sampled with the second they were sequenced (one
    /// per second): once one is received, everything sequenced before that
    /// second is on the replica.
    push_times: VecDeque<(u64, i64)>,
}

impl std::fmt::Debug for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkState")
            .field("connected", &self.connected)
            .field("up_to_date", &self.up_to_date)
            .finish_non_exhaustive()
    }
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct ShareStats {
    pub ops_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub resync_files: AtomicU64,
    pub resync_bytes: AtomicU64,
    /// Bytes of changed files found already on the replica (deltas).
    pub delta_reused_bytes: AtomicU64,
    /// Files the primary could not read (reported, skipped).
    pub unreadable: AtomicU64,
    /// Async watcher: directories watched / not watchable (limit).
    pub watched_dirs: AtomicU64,
    pub unwatched_dirs: AtomicU64,
    /// Async watcher: events read, queue overflows, rescans.
    pub watch_events: AtomicU64,
    pub overflows: AtomicU64,
    pub rescans: AtomicU64,
    /// Sync mount: read-only opens the kernel served by passthrough, and
    /// bytes of reads this daemon served (passthrough reads are not).
    pub passthrough_opens: AtomicU64,
    pub fuse_read_bytes: AtomicU64,
    /// Async: file data the pump sent once the replica was level (the
    /// application's changes; counted in `resync_bytes` too).
    pub pumped_bytes: AtomicU64,
}

pub struct PrimaryShare {
    pub name: String,
    /// The estimator's view of the changes (off unless an estimate
    /// observes this share): one event per file an op changes.
    pub tap: crate::estimate::tap::WriteTap,
    pub rec: Mutex<ShareRecord>,
    pub store: ShareStore,
    pub tree: Tree,
    /// Held while a mutation is applied locally and sequenced.
    pub order: Mutex<Order>,
    pub link: Mutex<LinkState>,
    /// Resync and waiters wait here for acks and link changes.
    pub cv: Condvar,
    /// The sender thread waits here for frames to send.
    send_cv: Condvar,
    /// Paths changed while the replica could not be told (persisted in `journal`).
    journal: Mutex<Journal>,
    pub stats: ShareStats,
    /// Async mode: bytes queued or unacknowledged before the stream is cut
    /// and the journal takes over.
    pub backlog_bytes_max: u64,
    /// Orphan numbers (unlinked-but-open files).
    pub next_orphan: AtomicU64,
    /// Sync: the replica's free space kept in reserve (ENOSPC here first).
    pub replica_free_bytes_min: u64,
    /// Outdate before going alone (HA with a witness, sync mode): replies
    /// the replica did not confirm wait for this permit.
    pub alone: crate::volume::primary::AlonePermit,
    /// Replies waiting for the permit (or for the replica to be level again).
    parked: Mutex<Vec<Done>>,
    /// Fenced: mutating calls wait until it opens.
    frozen: Mutex<Gate>,
    gate_cv: Condvar,
    /// When the levels were last written to the record.
    level_saved: Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for PrimaryShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryShare")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Paths a pass compares (taken from the journal).
#[derive(Debug, Default, Clone)]
pub struct Taken {
    /// Subtrees to compare.
    pub deep: BTreeSet<SharePath>,
    /// Directories whose own attributes (times) changed: compared alone.
    pub shallow: BTreeSet<SharePath>,
    /// Of `deep`: changed without the replica being told (files compared by
    /// content: size and mtime can be restored). The others were streamed
    /// and not confirmed durable: compared by type, size and mtime.
    pub by_content: BTreeSet<SharePath>,
}

/// The paths the journal at `path` says changed here without the replica
/// being told (tag 0: subtrees): what this copy holds that its peer never
/// received.
pub fn untold_paths(path: &std::path::Path) -> BTreeSet<SharePath> {
    Journal::open(path.to_path_buf()).sets.by_content
}

/// The journal: an append-only file of tagged, length-prefixed paths,
/// loaded into sets. Tags: 0 deep by content, 1 shallow, 2 deep streamed.
#[derive(Debug)]
struct Journal {
    sets: Taken,
    file: Option<std::fs::File>,
    path: std::path::PathBuf,
}

const TAG_BY_CONTENT: u8 = 0;
const TAG_SHALLOW: u8 = 1;
const TAG_STREAMED: u8 = 2;

impl Journal {
    fn open(path: std::path::PathBuf) -> Journal {
        let mut sets = Taken::default();
        if let Ok(b) = std::fs::read(&path) {
            let mut rest = &b[..];
            while rest.len() >= 5 {
                let n = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                if rest.len() < 5 + n {
                    break; // a torn last record: the unclean-stop rule covers it
                }
                if let Ok(p) = SharePath::new(rest[5..5 + n].to_vec()) {
                    match rest[0] {
                        TAG_SHALLOW => {
                            sets.shallow.insert(p);
                        }
                        TAG_STREAMED => {
                            sets.deep.insert(p);
                        }
                        _ => {
                            sets.deep.insert(p.clone());
                            sets.by_content.insert(p);
                        }
                    }
                }
                rest = &rest[5 + n..];
            }
        }
        Journal {
            sets,
            file: None,
            path,
        }
    }

    fn len(&self) -> usize {
        self.sets.deep.len() + self.sets.shallow.len()
    }

    fn add(&mut self, p: &SharePath, by_content: bool) {
        let new = self.sets.deep.insert(p.clone());
        if by_content {
            if self.sets.by_content.insert(p.clone()) {
                self.append(TAG_BY_CONTENT, p);
            }
        } else if new {
            self.append(TAG_STREAMED, p);
        }
    }

    /// An op's changed paths and the directories whose entries it changed.
    fn add_op(&mut self, paths: &[SharePath], parents: &[SharePath], by_content: bool) {
        for p in paths {
            self.add(p, by_content);
        }
        for p in parents {
            self.add_shallow(p);
        }
    }

    fn add_shallow(&mut self, p: &SharePath) {
        if !self.sets.shallow.insert(p.clone()) {
            return;
        }
        self.append(TAG_SHALLOW, p);
    }

    fn append(&mut self, tag: u8, p: &SharePath) {
        if self.file.is_none() {
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
        }
        if let Some(f) = &mut self.file {
            let mut rec = vec![tag];
            rec.extend_from_slice(&(p.as_bytes().len() as u32).to_le_bytes());
            rec.extend_from_slice(p.as_bytes());
            if let Err(e) = f.write_all(&rec) {
                tracing::warn!(error = %e, "share.journal.write_failed");
            }
        }
    }

    /// Takes every path out of the in-memory sets (they stay in the file
    /// until [`Journal::reset_file`]).
    fn take(&mut self) -> Taken {
        std::mem::take(&mut self.sets)
    }

    /// Puts taken paths back (the pass that took them failed).
    fn put_back(&mut self, taken: Taken) {
        self.sets.deep.extend(taken.deep);
        self.sets.shallow.extend(taken.shallow);
        self.sets.by_content.extend(taken.by_content);
    }

    /// Rewrites the file from the sets.
    fn reset_file(&mut self) {
        self.file = None;
        let _ = std::fs::remove_file(&self.path);
        let sets = std::mem::take(&mut self.sets);
        for p in &sets.deep {
            self.add(p, sets.by_content.contains(p));
        }
        for p in &sets.shallow {
            self.add_shallow(p);
        }
    }

    fn sync(&mut self) {
        if let Some(f) = &self.file {
            let _ = f.sync_all();
        }
    }
}

/// Bytes an op changes, for the estimator (an op not sent: the journal).
fn op_bytes(op: &FileOp) -> u64 {
    match op {
        FileOp::Write { data, .. } => data.len() as u64,
        FileOp::Fallocate { length, .. } => *length,
        _ => 0,
    }
}

impl PrimaryShare {
    pub fn open(
        store: ShareStore,
        mut rec: ShareRecord,
        backlog_bytes_max: u64,
        replica_free_bytes_min: u64,
    ) -> std::io::Result<Arc<PrimaryShare>> {
        // A sync share's tree is its private directory behind the FUSE mount,
        // as is a promoted async replica's (bind-mounted at its path); an
        // async share is used in place.
        let root = if rec.mode == "sync" || rec.bind_data {
            store.data_dir(&rec.name)
        } else {
            rec.path.clone()
        };
        let tree = Tree::open(&root, &store.orphans_dir(&rec.name))?;
        let journal = Journal::open(store.journal_path(&rec.name));
        if !rec.clean {
            // The journal may lack what changed just before the stop: the next
            // resync compares the whole tree.
            rec.generation = super::random_u64();
            rec.level_exact = false;
            tracing::warn!(share = %rec.name, "share.unclean_stop.full_compare_next");
        }
        rec.clean = false;
        store
            .save(&rec)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // Orphans left by the last run are no longer open by anyone.
        for e in std::fs::read_dir(store.orphans_dir(&rec.name))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        Ok(Arc::new(PrimaryShare {
            name: rec.name.to_string(),
            tap: crate::estimate::tap::WriteTap::new(),
            rec: Mutex::new(rec),
            store,
            tree,
            order: Mutex::new(Order { next_seq: 1 }),
            link: Mutex::new(LinkState::default()),
            cv: Condvar::new(),
            send_cv: Condvar::new(),
            journal: Mutex::new(journal),
            stats: ShareStats::default(),
            backlog_bytes_max,
            next_orphan: AtomicU64::new(1),
            replica_free_bytes_min,
            alone: Default::default(),
            parked: Mutex::new(Vec::new()),
            frozen: Mutex::new(Gate::Open),
            gate_cv: Condvar::new(),
            level_saved: Mutex::new(None),
        }))
    }

    /// Paths the journal holds (changed while the replica could not be told).
    pub fn pending_paths(&self) -> u64 {
        let j = lock(&self.journal);
        j.len() as u64
    }

    pub fn mode_sync(&self) -> bool {
        lock(&self.rec).mode == "sync"
    }

    pub fn generation(&self) -> u64 {
        lock(&self.rec).generation
    }

    pub fn order(&self) -> MutexGuard<'_, Order> {
        lock(&self.order)
    }

    pub fn link(&self) -> MutexGuard<'_, LinkState> {
        lock(&self.link)
    }

    /// Records a clean stop (the journal is complete on disk).
    pub fn close_clean(&self) {
        let mut j = lock(&self.journal);
        // Unconfirmed changes go to the journal first.
        let l = self.link();
        for (_, paths, parents) in &l.unconfirmed {
            j.add_op(paths, parents, false);
        }
        drop(l);
        j.sync();
        let mut rec = lock(&self.rec);
        rec.clean = true;
        let _ = self.store.save(&rec);
    }

    /// Sequences `op` (the caller holds `order` and has applied it locally).
    /// Returns the sequence number when it went on the stream, `None` when
    /// it went to the journal. The caller sends it ([`Self::send_queued`],
    /// once it let go of `order`): the sender thread is not woken.
    pub fn push(&self, o: &mut Order, op: FileOp, stamps: Vec<Stamp>) -> Option<u64> {
        self.push_op(o, op, stamps, true)
    }

    /// [`Self::push`] of an op the resync itself sends: it does not make
    /// its paths "touched meanwhile" (which would compare them again).
    /// The sender thread sends it.
    pub fn push_resync(&self, o: &mut Order, op: FileOp, stamps: Vec<Stamp>) -> Option<u64> {
        self.push_op(o, op, stamps, false)
    }

    fn push_op(&self, o: &mut Order, op: FileOp, stamps: Vec<Stamp>, live: bool) -> Option<u64> {
        let touched: Vec<SharePath> = op.touched().into_iter().cloned().collect();
        let parents = op.parents();
        if !self.link().connected {
            if live {
                self.tap_op(&touched, op_bytes(&op));
            }
            lock(&self.journal).add_op(&touched, &parents, true);
            return None;
        }
        let payload = StampedOp { op, stamps }.encode();
        if live {
            self.tap_op(&touched, payload.len() as u64);
        }
        let frame = ferry_wire::encode_frame(Kind::FileOp, 0, 0, &payload);
        // Live ops are sent by their caller, a resync's by the sender thread.
        self.push_encoded(o, frame, touched, parents, live, !live)
    }

    /// [`Self::push`] of a write whose frame the caller encoded
    /// ([`StampedOp::encode_write_frame`], seq 0): `op` is the same write
    /// without its data (for the paths it touches).
    /// `wake_sender`: the link's sender thread sends it (while the caller
    /// goes on with the order lock held).
    pub fn push_write(
        &self,
        o: &mut Order,
        op: &FileOp,
        frame: Vec<u8>,
        wake_sender: bool,
    ) -> Option<u64> {
        let touched: Vec<SharePath> = op.touched().into_iter().cloned().collect();
        self.tap_op(&touched, frame.len() as u64);
        self.push_encoded(o, frame, touched, op.parents(), true, wake_sender)
    }

    /// The estimator's event per file an op changed (`bytes`: the op's
    /// size on the wire, shared among its paths).
    fn tap_op(&self, touched: &[SharePath], bytes: u64) {
        let n = touched.len().max(1) as u64;
        for p in touched {
            self.tap
                .write_key(ferry_core::estimate::file_key(p.as_bytes()), bytes / n);
        }
    }

    /// `op` went on the stream but failed here: the replica may apply what
    /// this copy lacks. Its paths are compared by content at the next
    /// resync, which the link's end brings about.
    pub fn diverged(&self, op: &FileOp, why: &str) {
        let touched: Vec<SharePath> = op.touched().into_iter().cloned().collect();
        lock(&self.journal).add_op(&touched, &op.parents(), true);
        self.link_lost(why);
    }

    fn push_encoded(
        &self,
        o: &mut Order,
        mut frame: Vec<u8>,
        touched: Vec<SharePath>,
        parents: Vec<SharePath>,
        live: bool,
        wake_sender: bool,
    ) -> Option<u64> {
        let mut l = self.link();
        if !l.connected {
            drop(l);
            lock(&self.journal).add_op(&touched, &parents, true);
            return None;
        }
        let seq = o.next_seq;
        o.next_seq += 1;
        ferry_wire::set_frame_seq(&mut frame, seq);
        let payload_len = frame
            .len()
            .saturating_sub(ferry_wire::HEADER_BYTES + ferry_wire::TRAILER_BYTES);
        if l.resyncing && live {
            l.again.extend(touched.iter().cloned());
            l.again_shallow.extend(parents.iter().cloned());
        }
        l.unconfirmed.push_back((seq, touched, parents));
        l.queued_bytes += frame.len() as u64;
        l.inflight.push_back((seq, frame.len() as u64));
        let now = now_unix();
        if l.push_times.back().is_none_or(|(_, t)| *t < now) {
            l.push_times.push_back((seq, now));
        }
        l.inflight_bytes += frame.len() as u64;
        l.queue.push_back(frame);
        self.stats.ops_sent.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_sent
            .fetch_add(payload_len as u64, Ordering::Relaxed);
        let over = !self.mode_sync() && l.inflight_bytes > self.backlog_bytes_max;
        drop(l);
        self.cv.notify_all();
        if wake_sender {
            self.send_cv.notify_all();
        }
        if over {
            self.link_lost("async backlog above backlog_bytes_max: the journal takes over");
        }
        Some(seq)
    }

    /// Sequences a flush barrier; returns its seq when connected. The caller
    /// sends it ([`Self::send_queued`]).
    pub fn push_flush(&self, o: &mut Order, up_to_date: bool) -> Option<u64> {
        self.push_flush_of(o, up_to_date, false)
    }

    /// [`Self::push_flush`]; `data_only`: of file data alone (an
    /// fdatasync: the replica syncs its files' data, not their times).
    pub fn push_flush_of(&self, o: &mut Order, up_to_date: bool, data_only: bool) -> Option<u64> {
        let mut l = self.link();
        if !l.connected {
            return None;
        }
        let seq = o.next_seq;
        o.next_seq += 1;
        l.flush_times.push_back((seq, now_unix()));
        let mut h = ferry_wire::FrameHeader::new(Kind::Flush, seq, self.generation(), 0);
        if up_to_date {
            h.flags = crate::volume::link::FLAG_UP_TO_DATE;
        }
        if data_only {
            h.flags |= super::link::FLAG_DATA_ONLY;
        }
        l.queue.push_back(h.encode().to_vec());
        Some(seq)
    }

    /// Sequences a frame that is not an op (a manifest request).
    pub fn push_raw(&self, o: &mut Order, kind: Kind, payload: &[u8]) -> Option<u64> {
        let mut l = self.link();
        if !l.connected {
            return None;
        }
        let seq = o.next_seq;
        o.next_seq += 1;
        l.queue
            .push_back(ferry_wire::encode_frame(kind, seq, 0, payload));
        drop(l);
        self.send_cv.notify_all();
        Some(seq)
    }

    /// Calls `done` once the replica received `seq` (sync) — at once when
    /// `seq` is `None` (journaled) or the share is async.
    pub fn wait_received(&self, seq: Option<u64>, done: Done) {
        let Some(seq) = seq else {
            return self.answer_unconfirmed(vec![done]);
        };
        if !self.mode_sync() {
            return done(Ok(()));
        }
        let mut l = self.link();
        if !l.connected {
            drop(l);
            return self.answer_unconfirmed(vec![done]);
        }
        if l.received_seq >= seq {
            drop(l);
            return done(Ok(()));
        }
        l.waiting_received.entry(seq).or_default().push(done);
    }

    /// Calls `done` once everything up to flush `seq` is durable on the replica.
    pub fn wait_durable(&self, seq: Option<u64>, done: Done) {
        let Some(seq) = seq else {
            return self.answer_unconfirmed(vec![done]);
        };
        let mut l = self.link();
        if !l.connected {
            drop(l);
            return self.answer_unconfirmed(vec![done]);
        }
        if l.durable_seq >= seq {
            drop(l);
            return done(Ok(()));
        }
        l.waiting_durable.entry(seq).or_default().push(done);
    }

    /// The replica acknowledged: received up to `received` (also applied
    /// with `applied`), durable up to `durable`.
    pub fn on_ack(&self, received: u64, durable: u64, applied: bool) {
        let mut ready = Vec::new();
        let mut level = None;
        let mut got = None;
        {
            let mut l = self.link();
            while l.flush_times.front().is_some_and(|(s, _)| *s <= durable) {
                level = l.flush_times.pop_front().map(|(_, t)| t);
            }
            while l.push_times.front().is_some_and(|(s, _)| *s <= received) {
                got = l.push_times.pop_front().map(|(_, t)| t);
            }
            if !l.up_to_date {
                level = None;
                got = None;
            }
            if received > l.received_seq {
                l.received_seq = received;
            }
            if applied && received > l.applied_seq {
                l.applied_seq = received;
            }
            if durable > l.durable_seq {
                l.durable_seq = durable;
            }
            while let Some(&(s, b)) = l.inflight.front() {
                if s > l.received_seq {
                    break;
                }
                l.inflight.pop_front();
                l.inflight_bytes -= b;
            }
            while l
                .unconfirmed
                .front()
                .is_some_and(|(s, _, _)| *s <= l.durable_seq)
            {
                l.unconfirmed.pop_front();
            }
            let r = l.received_seq;
            let later = l.waiting_received.split_off(&(r + 1));
            ready.extend(
                std::mem::replace(&mut l.waiting_received, later)
                    .into_values()
                    .flatten(),
            );
            let d = l.durable_seq;
            let later = l.waiting_durable.split_off(&(d + 1));
            ready.extend(
                std::mem::replace(&mut l.waiting_durable, later)
                    .into_values()
                    .flatten(),
            );
        }
        self.cv.notify_all();
        for done in ready {
            done(Ok(()));
        }
        if level.is_some() || got.is_some() {
            self.note_level(level, got, false);
        }
    }

    /// The link is gone: unconfirmed changes go to the journal, and every
    /// waiting reply is answered (the change is here and journaled; the
    /// replica is out of date until the next resync).
    pub fn link_lost(&self, why: &str) {
        let mut ready = Vec::new();
        {
            let mut l = self.link();
            if !l.connected {
                return;
            }
            l.connected = false;
            l.up_to_date = false;
            l.last_error = Some(why.to_string());
            let mut j = lock(&self.journal);
            for (_, paths, parents) in l.unconfirmed.drain(..) {
                j.add_op(&paths, &parents, false);
            }
            let again: Vec<SharePath> = std::mem::take(&mut l.again).into_iter().collect();
            let again_shallow: Vec<SharePath> =
                std::mem::take(&mut l.again_shallow).into_iter().collect();
            j.add_op(&again, &again_shallow, false);
            for (from, to) in std::mem::take(&mut l.renames) {
                j.add(&from, false);
                j.add(&to, false);
            }
            l.queue.clear();
            l.queued_bytes = 0;
            l.inflight.clear();
            l.inflight_bytes = 0;
            l.flush_times.clear();
            l.push_times.clear();
            l.replica_free = None;
            l.wire = None;
            ready.extend(
                std::mem::take(&mut l.waiting_received)
                    .into_values()
                    .flatten(),
            );
            ready.extend(
                std::mem::take(&mut l.waiting_durable)
                    .into_values()
                    .flatten(),
            );
        }
        tracing::warn!(share = %self.name, reason = why, "share.link.lost");
        self.cv.notify_all();
        self.send_cv.notify_all();
        self.answer_unconfirmed(ready);
    }

    /// Answers replies the replica did not confirm (the change is here and
    /// journaled) — unless this sync share may not go on alone yet (HA with
    /// a witness: the peer must be outdated first), then they wait.
    fn answer_unconfirmed(&self, dones: Vec<Done>) {
        if dones.is_empty() {
            return;
        }
        if self.mode_sync() && !self.alone.permitted() {
            lock(&self.parked).extend(dones);
            return;
        }
        for done in dones {
            done(Ok(()));
        }
    }

    /// From the cluster manager: answers parked replies once going alone is
    /// permitted, or once the replica is level again (`peer_has_them`).
    pub fn release_parked(&self, peer_has_them: bool) {
        if !peer_has_them && !self.alone.permitted() {
            return;
        }
        let parked = std::mem::take(&mut *lock(&self.parked));
        for done in parked {
            done(Ok(()));
        }
    }

    /// The replica could not apply an op on `path`: compared again by
    /// content — in this resync, by the async pump, or (a sync replica that
    /// should have taken every op) after a reconnect.
    pub fn replica_failed(&self, path: SharePath) {
        let mut l = self.link();
        if l.resyncing {
            l.again.insert(path.clone());
            l.again_by_content.insert(path);
            return;
        }
        lock(&self.journal).add(&path, true);
        if self.mode_sync() {
            drop(l);
            self.link_lost("the replica could not apply an operation: comparing again");
        } else {
            l.pending_since.get_or_insert_with(std::time::Instant::now);
            drop(l);
            self.cv.notify_all();
        }
    }

    /// The replica's copy differs where nothing says it should (a digest
    /// compared unequal at a cutover): a new history, so the next resync
    /// compares the whole tree, every file by content; the link restarts.
    pub fn distrust_replica(&self, why: &str) {
        {
            let mut r = lock(&self.rec);
            r.generation = super::random_u64();
            r.level_at = 0;
            r.received_at = 0;
            r.level_exact = false;
            if let Err(e) = self.store.save(&r) {
                tracing::error!(share = %self.name, error = %e, "share.record.save_failed");
            }
        }
        self.link_lost(why);
    }

    /// Ends the link (it does not reconnect): replication stopped, or the
    /// share stops serving here.
    pub fn stop_link(&self, why: &str) {
        self.link().stop = true;
        self.cv.notify_all();
        self.link_lost(why);
    }

    /// Whether every change not yet on the replica (waiting, or in the pass
    /// being sent) was seen less than `lag` ago: an async share whose
    /// application keeps writing follows it closely without ever being
    /// [`Self::caught_up`].
    pub fn lag_within(&self, lag: std::time::Duration) -> bool {
        let l = self.link();
        [l.pending_since, l.pass_since]
            .iter()
            .flatten()
            .all(|t| t.elapsed() <= lag)
    }

    /// Nothing changed is waiting to be sent: no change the watcher
    /// reported is still pending, no rename, no path in the journal, and no
    /// pass is still sending (a pass takes what was pending when it starts).
    pub fn caught_up(&self) -> bool {
        let pending = self.pending_paths();
        let l = self.link();
        pending == 0 && l.pending_since.is_none() && l.pass_since.is_none() && l.renames.is_empty()
    }

    /// Once frozen (a switchover): waits until everything sequenced is
    /// durable on an up-to-date replica — a flush, and no op after it.
    pub fn drain(&self, timeout: std::time::Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if !self.link().up_to_date {
                return Err("the replica is not up to date".into());
            }
            let seq = {
                let mut o = self.order();
                self.push_flush(&mut o, false)
            }
            .ok_or("the link is down")?;
            self.send_queued();
            let (tx, rx) = std::sync::mpsc::channel();
            self.wait_durable(
                Some(seq),
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("not drained within {timeout:?}")),
            }
            let l = self.link();
            if !l.connected || l.durable_seq < seq {
                return Err("the link went down while draining".into());
            }
            drop(l);
            // An op that passed the gate before the freeze may follow the flush.
            if self.last_seq() == seq {
                return Ok(());
            }
        }
    }

    /// The replica reported its free space.
    pub fn replica_free_report(&self, free: u64) {
        let mut l = self.link();
        l.replica_free = Some(free);
        l.since_free_report = 0;
    }

    /// Sync shares: would `bytes` more leave the replica's filesystem below
    /// `replica_free_bytes_min`? Then the caller fails with ENOSPC. Counts
    /// them against the estimate when not.
    pub fn replica_space_short(&self, bytes: u64) -> bool {
        if !self.mode_sync() {
            return false;
        }
        let mut l = self.link();
        let Some(free) = l.replica_free.filter(|_| l.connected) else {
            return false;
        };
        let left = free.saturating_sub(l.since_free_report + bytes);
        if left < self.replica_free_bytes_min {
            return true;
        }
        l.since_free_report += bytes;
        false
    }

    /// Fencing: mutating calls wait at [`Self::wait_open`].
    pub fn freeze(&self) {
        let mut g = lock(&self.frozen);
        if *g == Gate::Open {
            *g = Gate::Frozen;
        }
    }

    pub fn unfreeze(&self) {
        let mut g = lock(&self.frozen);
        if *g == Gate::Frozen {
            *g = Gate::Open;
        }
        self.gate_cv.notify_all();
    }

    /// Demoted: waiting and new mutating calls fail (EROFS).
    pub fn close_gate(&self) {
        *lock(&self.frozen) = Gate::Closed;
        self.gate_cv.notify_all();
    }

    /// Waits while the share is frozen; fails once it is closed.
    pub fn wait_open(&self) -> std::io::Result<()> {
        let mut g = lock(&self.frozen);
        loop {
            match *g {
                Gate::Open => return Ok(()),
                Gate::Closed => return Err(std::io::Error::from_raw_os_error(libc::EROFS)),
                Gate::Frozen => g = self.gate_cv.wait(g).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }

    /// The link came up: sequencing starts (under `order`, so no op is
    /// half-journaled, half-streamed).
    pub fn link_up(&self, wire: Arc<SharedTls>) {
        let _o = self.order();
        let mut l = self.link();
        l.connected = true;
        l.wire = Some(wire);
        l.sending = false;
        l.epoch += 1;
        l.resyncing = true;
        l.up_to_date = false;
        l.last_error = None;
        l.again.clear();
        l.again_shallow.clear();
        l.again_by_content.clear();
        l.renames.clear();
    }

    /// The sequence number of the last frame put on the stream.
    pub fn last_seq(&self) -> u64 {
        self.order().next_seq - 1
    }

    /// Takes the journal's paths for a pass (they stay on disk until
    /// [`Self::journal_compact`]; [`Self::journal_put_back`] if it fails).
    pub fn journal_take(&self) -> Taken {
        lock(&self.journal).take()
    }

    pub fn journal_put_back(&self, taken: Taken) {
        lock(&self.journal).put_back(taken);
    }

    /// Paths to compare later (a pass that carried them failed).
    pub fn journal_add(&self, paths: &[SharePath]) {
        lock(&self.journal).add_op(paths, &[], false);
    }

    /// A pass covered what it took: the file keeps only what came since.
    pub fn journal_compact(&self) {
        lock(&self.journal).reset_file();
    }

    /// The watcher saw changes (async shares): into the journal, which the
    /// link's pump drains; renames go first when the link can carry them.
    pub fn note_changes(&self, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        if self.tap.is_on() {
            // The watcher knows paths, not bytes: a changed file counts its
            // size (what the pump sends again), a directory 0.
            for p in &changes.deep {
                let bytes = self
                    .tree
                    .lstat(&ferry_wire::Target::Path(p.clone()))
                    .ok()
                    .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
                    .map_or(0, |st| st.st_size as u64);
                self.tap
                    .write_key(ferry_core::estimate::file_key(p.as_bytes()), bytes);
            }
        }
        let mut l = self.link();
        {
            let mut j = lock(&self.journal);
            if !l.connected {
                // No link to carry the rename: both ends are compared later.
                for (from, to) in &changes.renames {
                    j.add(from, false);
                    j.add(to, false);
                }
            }
            j.add_op(&changes.deep, &changes.shallow, true);
        }
        if l.connected {
            l.renames.extend(changes.renames);
        }
        if changes.unsure_since.is_some() {
            l.unsure_since = match (l.unsure_since, changes.unsure_since) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        l.pending_since.get_or_insert_with(std::time::Instant::now);
        drop(l);
        self.cv.notify_all();
    }

    /// Records that the replica was level with the tree at `at` (unix
    /// seconds; durable there) and/or had received everything sequenced
    /// before `received`. Written to the record at most every second unless
    /// `force` (older values are only more cautious).
    pub fn note_level(&self, at: Option<i64>, received: Option<i64>, force: bool) {
        let mut r = lock(&self.rec);
        if let Some(t) = at {
            r.level_at = r.level_at.max(t);
            r.received_at = r.received_at.max(t);
        }
        if let Some(t) = received {
            r.received_at = r.received_at.max(t);
        }
        let mut last = lock(&self.level_saved);
        if force || last.is_none_or(|l| l.elapsed() >= std::time::Duration::from_secs(1)) {
            *last = Some(std::time::Instant::now());
            let _ = self.store.save(&r);
        }
    }

    pub fn set_level_at(&self, at: i64, force: bool) {
        self.note_level(Some(at), None, force);
    }

    pub fn level_at(&self) -> i64 {
        lock(&self.rec).level_at
    }

    /// See [`ShareRecord::level_exact`].
    pub fn level_exact(&self) -> bool {
        lock(&self.rec).level_exact
    }

    /// The first resync after a verified cutover ended (saved with the
    /// level that follows).
    pub fn clear_level_exact(&self) {
        lock(&self.rec).level_exact = false;
    }

    /// Waits until the replica acknowledged applying `seq` (and so reported
    /// any op up to it that failed there), in either mode.
    pub fn wait_acked(&self, seq: u64) -> bool {
        let mut l = self.link();
        loop {
            if !l.connected {
                return false;
            }
            if l.applied_seq >= seq {
                return true;
            }
            l = self
                .cv
                .wait_timeout(l, std::time::Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Sends what is queued on the calling thread (one batch, its own frame
    /// among them), unless another thread is sending (which then sends it:
    /// a sender hands what was queued meanwhile to the sender thread). A
    /// sync call sends its own op this way, without a hand-off.
    pub fn send_queued(&self) {
        self.send_batches(false);
    }

    /// The sender thread's [`Self::send_queued`]: until the queue is empty.
    pub fn send_until_empty(&self) {
        self.send_batches(true);
    }

    fn send_batches(&self, until_empty: bool) {
        let mut l = self.link();
        if l.sending || l.queue.is_empty() || !l.connected {
            return;
        }
        let Some(wire) = l.wire.clone() else {
            return;
        };
        // A send that outlives its link must not touch the next one's state.
        let epoch = l.epoch;
        l.sending = true;
        loop {
            let frames: Vec<Vec<u8>> = l.queue.drain(..).collect();
            l.queued_bytes = 0;
            drop(l);
            let r = wire.send_with(|w| frames.iter().try_for_each(|f| w.write_all(f)));
            l = self.link();
            if l.epoch != epoch {
                return;
            }
            if let Err(e) = r {
                l.sending = false;
                drop(l);
                self.send_cv.notify_all();
                self.link_lost(&format!("sending to the replica failed: {e}"));
                return;
            }
            if l.queue.is_empty() || !l.connected {
                // Nothing for the sender thread to be woken for.
                l.sending = false;
                return;
            }
            if !until_empty {
                // Others' frames came meanwhile: the sender thread sends them.
                l.sending = false;
                drop(l);
                self.send_cv.notify_all();
                return;
            }
        }
    }

    /// Waits until the queue has frames no other thread is sending; `false`
    /// when the link is down or stopping.
    pub fn wait_frames(&self) -> bool {
        let mut l = self.link();
        loop {
            if l.stop || !l.connected {
                return false;
            }
            if !l.queue.is_empty() && !l.sending {
                return true;
            }
            l = self
                .send_cv
                .wait_timeout(l, std::time::Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
