//! The primary's side of a replication link, sans I/O.
//!
//! One [`Replicator`] per replication group (today: one volume). The agent's I/O
//! edge calls it under one lock, in this order for every client write:
//! local write done → [`Replicator::on_write`] → send the frame (if told to) →
//! in `sync` mode wait until [`Replicator::is_received`] (FUA:
//! [`Replicator::is_durable`]) → answer the client. Nothing here touches a
//! socket, a file or a clock: time comes in as `now_ms`.
//!
//! ```text
//!                 connect(relation)            dirty map empty, no copy in flight
//!  Disconnected ───────────────────▶ Resyncing ─────────────────────────────▶ Streaming
//!       ▲   ▲                           │  ▲                                      │
//!       │   └──── link lost / ack ──────┘  └──── async backlog overflow ─────────┤
//!       │         timeout (unconfirmed                (writes only mark dirty:    │
//!       │         extents → dirty map)                 "behind")                  │
//!       └────────────────────────────────── link lost / ack timeout ─────────────┘
//! ```
//!
//! Rules kept here (DESIGN invariants 1, 3, 4, 6):
//! - every write is sequenced; the peer acknowledges cumulatively ("received up
//!   to N", "durable up to M");
//! - each written block stays *unconfirmed* until the peer says a flush covering
//!   its newest write is durable; on link loss every unconfirmed block goes to
//!   the dirty map (a block written many times is kept once, so the link
//!   flush that bounds them follows the data a replica crash would resend,
//!   not the number of writes);
//! - the background copier takes dirty blocks one at a time; a live write landing
//!   on a block being copied marks it dirty again;
//! - in `async` mode the bytes sent but not yet acknowledged are bounded by
//!   `backlog_bytes_max`; past it the link falls "behind": the unsent queue is
//!   dropped, its extents are dirty, and the peer is `inconsistent` until the
//!   copier has caught up;
//! - a peer that acknowledges nothing for `peer_ack_timeout_ms` while something is
//!   outstanding is declared failed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::dirty::DirtyMap;
use crate::extent::Extent;
use crate::generation::Relation;

/// How writes are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answered once the peer has received the write in order (FUA: durable).
    Sync,
    /// Answered after the local write; the peer trails within `backlog_bytes_max`.
    Async,
}

/// Limits and mode of one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    pub mode: Mode,
    /// Async: most bytes sent or queued but not yet acknowledged by the peer.
    pub backlog_bytes_max: u64,
    /// A peer silent this long while acknowledgements are due is failed.
    pub peer_ack_timeout_ms: u64,
    /// Blocks the copier may have in flight at once.
    pub copies_in_flight_max: usize,
    /// Distinct blocks kept until the peer confirms them durable; past half of
    /// it the edge sends a link flush ([`Replicator::flush_due`]) so memory
    /// stays bounded.
    pub unconfirmed_blocks_max: usize,
    /// Unconfirmed blocks older than this get a link flush, so a crash of the
    /// peer re-sends at most this much of the stream.
    pub flush_interval_ms: u64,
    /// …or once the unconfirmed blocks hold this many bytes (what a crash of
    /// the peer would re-send).
    pub flush_bytes: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            mode: Mode::Sync,
            backlog_bytes_max: 64 * 1024 * 1024,
            peer_ack_timeout_ms: 5_000,
            copies_in_flight_max: 8,
            unconfirmed_blocks_max: 131_072,
            flush_interval_ms: 30_000,
            flush_bytes: 4 * 1024 * 1024 * 1024,
        }
    }
}

/// The state of the peer's copy as the primary sees it (JSON: kebab-case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Being resynced: not a usable image.
    Inconsistent,
    /// Was equal once, but missed writes while disconnected.
    Outdated,
    /// Equal to the primary up to the writes in flight.
    UpToDate,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Inconsistent => "inconsistent",
            ReplicaState::Outdated => "outdated",
            ReplicaState::UpToDate => "up-to-date",
        }
    }
}

/// Where the link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Disconnected,
    /// Connected; the copier is walking the dirty map.
    Resyncing,
    /// Connected and caught up: every write is streamed.
    Streaming,
    /// Histories diverged: nothing is sent until an operator resolves it.
    SplitBrain,
}

/// What to do with a client write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteDecision {
    /// Send it as frame `seq`; in sync mode wait for the peer before answering.
    Stream { seq: u64, wait: bool },
    /// Not sent: the extent is marked dirty. Answer the client now.
    Dirty,
    /// Async backlog overflow: drop the unsent queue; the extent is dirty.
    Overflow,
}

/// A block the copier should read and send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyTask {
    pub block: u64,
    pub extent: Extent,
}

/// Something the edge must do because time passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickAction {
    /// The peer has not acknowledged for `peer_ack_timeout_ms`: drop the link.
    PeerFailed { silent_ms: u64 },
}

/// A snapshot of the link for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStatus {
    pub phase: Phase,
    pub replica: ReplicaState,
    pub dirty_bytes: u64,
    pub backlog_bytes: u64,
    /// Distinct blocks written and not yet confirmed durable on the peer.
    pub unconfirmed_blocks: usize,
    pub copies_in_flight: usize,
    pub sent_seq: u64,
    pub received_seq: u64,
    pub durable_seq: u64,
    pub behind: bool,
}

/// The primary's side of one link.
#[derive(Debug, Clone)]
pub struct Replicator {
    cfg: LinkConfig,
    dirty: DirtyMap,
    phase: Phase,
    /// Was the peer ever equal to us (so a gap makes it outdated, not inconsistent)?
    peer_consistent: bool,
    behind: bool,
    /// Connection number; waiters of an older connection are released.
    epoch: u64,
    next_seq: u64,
    received_seq: u64,
    durable_seq: u64,
    /// Blocks written this connection and not yet durable on the peer.
    unconfirmed: Unconfirmed,
    /// Bytes of frames not yet received by the peer, by seq.
    backlog: VecDeque<(u64, u64)>,
    backlog_bytes: u64,
    /// Blocks being copied → re-dirtied by a write during the copy.
    copying: BTreeMap<u64, bool>,
    copy_cursor: u64,
    /// Seq of the newest flush frame sent this connection, and when.
    flush_seq: u64,
    flush_sent_ms: u64,
    /// Seq of the newest copy frame: the resync is done once the peer has it.
    last_copy_seq: u64,
    /// When the oldest acknowledgement became due (first unacked frame sent).
    ack_due_since_ms: Option<u64>,
    /// A resync made the peer equal, but it does not know yet: it is
    /// consistent once the flush announcing it (`announce_seq`) is durable.
    announce_wait: bool,
    announce_seq: Option<u64>,
}

impl Replicator {
    /// A replicator for a peer whose copy differs from ours in `dirty`.
    pub fn new(cfg: LinkConfig, dirty: DirtyMap, peer_consistent: bool) -> Replicator {
        Replicator {
            cfg,
            dirty,
            phase: Phase::Disconnected,
            peer_consistent,
            behind: false,
            epoch: 0,
            next_seq: 1,
            received_seq: 0,
            durable_seq: 0,
            unconfirmed: Unconfirmed::default(),
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            copying: BTreeMap::new(),
            copy_cursor: 0,
            flush_seq: 0,
            flush_sent_ms: 0,
            last_copy_seq: 0,
            ack_due_since_ms: None,
            announce_wait: false,
            announce_seq: None,
        }
    }

    pub fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.cfg.mode = mode;
    }

    pub fn dirty_map(&self) -> &DirtyMap {
        &self.dirty
    }

    /// The dirty map, for a caller that knows better what differs (a checksum
    /// comparison while disconnected). Never while connected.
    pub fn dirty_map_mut(&mut self) -> Option<&mut DirtyMap> {
        (!self.connected()).then_some(&mut self.dirty)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The link came up after a handshake that found `relation` (from our side).
    /// Returns `false` (and stays disconnected) when we must not be the source.
    pub fn on_connect(&mut self, relation: Relation, now_ms: u64) -> bool {
        self.reset_connection();
        match relation {
            Relation::InSync => {}
            Relation::Ahead => {
                // The peer holds an older history: whatever moves (maybe
                // nothing), it records itself consistent only when told it
                // is up to date at this generation.
                self.peer_consistent = false;
            }
            Relation::PeerBlank => {
                // Everything the peer lacks: the whole device.
                self.dirty.mark(0, self.dirty.size_bytes());
                self.peer_consistent = false;
            }
            Relation::SplitBrain => {
                self.phase = Phase::SplitBrain;
                return false;
            }
            Relation::Behind | Relation::SelfBlank => return false,
        }
        self.epoch += 1;
        self.phase = Phase::Resyncing;
        self.ack_due_since_ms = None;
        self.maybe_streaming(now_ms);
        true
    }

    /// The link is gone (closed, failed, or declared failed).
    pub fn on_disconnect(&mut self) {
        for block in self.unconfirmed.drain() {
            self.dirty.mark_block(block);
        }
        for (block, _) in std::mem::take(&mut self.copying) {
            self.dirty.mark_block(block);
        }
        if self.phase != Phase::SplitBrain {
            self.phase = Phase::Disconnected;
        }
        self.reset_connection();
        self.epoch += 1;
    }

    fn reset_connection(&mut self) {
        self.next_seq = 1;
        self.received_seq = 0;
        self.durable_seq = 0;
        self.backlog.clear();
        self.backlog_bytes = 0;
        self.behind = false;
        self.copy_cursor = 0;
        self.flush_seq = 0;
        self.last_copy_seq = 0;
        self.ack_due_since_ms = None;
        self.announce_wait = false;
        self.announce_seq = None;
    }

    fn connected(&self) -> bool {
        matches!(self.phase, Phase::Resyncing | Phase::Streaming)
    }

    fn sequence(&mut self, extent: Extent, wire_bytes: u64, now_ms: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some((first, last)) = self.dirty.blocks_of(extent.offset, extent.length) {
            self.unconfirmed.add(seq, first, last);
        }
        self.backlog.push_back((seq, wire_bytes));
        self.backlog_bytes += wire_bytes;
        self.ack_due_since_ms.get_or_insert(now_ms);
        seq
    }

    /// Re-dirties blocks being copied that `extent` touches.
    fn redirty_copies(&mut self, extent: Extent) {
        if self.copying.is_empty() {
            return;
        }
        if let Some((first, last)) = self.dirty.blocks_of(extent.offset, extent.length) {
            for (_, hit) in self.copying.range_mut(first..=last) {
                *hit = true;
            }
        }
    }

    /// A client write (or zero/trim, by its effect) of `extent` completed locally;
    /// `wire_bytes` is what its frame would carry.
    pub fn on_write(&mut self, extent: Extent, wire_bytes: u64, now_ms: u64) -> WriteDecision {
        self.redirty_copies(extent);
        if !self.connected() || self.behind {
            self.dirty.mark(extent.offset, extent.length);
            return WriteDecision::Dirty;
        }
        if self.cfg.mode == Mode::Async
            && self.backlog_bytes.saturating_add(wire_bytes) > self.cfg.backlog_bytes_max
        {
            self.fall_behind();
            self.dirty.mark(extent.offset, extent.length);
            return WriteDecision::Overflow;
        }
        let seq = self.sequence(extent, wire_bytes, now_ms);
        WriteDecision::Stream {
            seq,
            wait: self.cfg.mode == Mode::Sync,
        }
    }

    fn fall_behind(&mut self) {
        self.behind = true;
        for block in self.unconfirmed.drain() {
            self.dirty.mark_block(block);
        }
        self.backlog.clear();
        self.backlog_bytes = 0;
        self.phase = Phase::Resyncing;
        self.peer_consistent = false;
    }

    /// A client FLUSH: `Some(seq)` of a flush frame to send (and, in sync mode,
    /// to wait for durable) when connected.
    pub fn on_flush(&mut self, now_ms: u64) -> Option<u64> {
        if !self.connected() || self.behind {
            return None;
        }
        let seq = self.sequence(
            Extent {
                offset: 0,
                length: 0,
            },
            0,
            now_ms,
        );
        self.flush_seq = seq;
        Some(seq)
    }

    /// Enough unconfirmed extents have piled up (no client flush lately) that the
    /// edge should send a flush of its own, so the peer confirms and they go.
    pub fn flush_due(&self, now_ms: u64) -> bool {
        self.connected()
            && !self.behind
            && self.flush_seq <= self.durable_seq
            && !self.unconfirmed.is_empty()
            && (self.unconfirmed.len() >= self.cfg.unconfirmed_blocks_max / 2
                || self.unconfirmed.len() as u64 * self.dirty.granularity_bytes()
                    >= self.cfg.flush_bytes
                || now_ms.saturating_sub(self.flush_sent_ms) >= self.cfg.flush_interval_ms)
    }

    /// The peer acknowledged: received (applied in order) up to `received`,
    /// durable up to `durable`. Stale or out-of-range acks are ignored.
    pub fn on_ack(&mut self, received: u64, durable: u64, now_ms: u64) {
        let sent = self.next_seq - 1;
        let received = received.min(sent).max(self.received_seq);
        let durable = durable.min(received).max(self.durable_seq);
        self.received_seq = received;
        self.durable_seq = durable;
        while let Some(&(seq, bytes)) = self.backlog.front() {
            if seq > received {
                break;
            }
            self.backlog.pop_front();
            self.backlog_bytes -= bytes;
        }
        self.unconfirmed.confirm(durable);
        // Still waiting for something: the timer restarts from this sign of life.
        self.ack_due_since_ms = (received < sent || durable < self.flush_seq).then_some(now_ms);
        if self.announce_wait && self.announce_seq.is_some_and(|s| durable >= s) {
            self.announce_wait = false;
            self.peer_consistent = true;
        }
        self.maybe_streaming(now_ms);
    }

    /// A comparison found the peer's copy different in `extent`: it is
    /// resent like any dirty range, and the peer is inconsistent until that
    /// resync is announced durable.
    pub fn resync_extent(&mut self, extent: Extent) {
        self.dirty.mark(extent.offset, extent.length);
        self.peer_consistent = false;
        self.announce_wait = false;
        self.announce_seq = None;
        if self.phase == Phase::Streaming {
            self.phase = Phase::Resyncing;
        }
    }

    /// Sequences the flush that tells the peer it is up to date (the edge
    /// flags it); the peer counts as up to date once that flush is durable.
    pub fn announce_up_to_date(&mut self, now_ms: u64) -> Option<u64> {
        let seq = self.on_flush(now_ms)?;
        self.announce_seq = Some(seq);
        Some(seq)
    }

    /// The dirty map plus every block being copied or written and not yet
    /// confirmed durable on the peer: what must be resent if this side crashes now.
    pub fn pessimistic_dirty_map(&self) -> DirtyMap {
        let mut m = self.dirty.clone();
        for block in self.unconfirmed.blocks() {
            m.mark_block(block);
        }
        for &b in self.copying.keys() {
            m.mark_block(b);
        }
        m
    }

    /// Whether block `block` is known to (possibly) differ on the peer: dirty,
    /// being copied, or written and not yet confirmed durable there.
    pub fn tracks(&self, block: u64) -> bool {
        self.dirty.is_dirty(block)
            || self.copying.contains_key(&block)
            || self.unconfirmed.contains(block)
    }

    pub fn is_received(&self, epoch: u64, seq: u64) -> bool {
        epoch != self.epoch || self.received_seq >= seq
    }

    pub fn is_durable(&self, epoch: u64, seq: u64) -> bool {
        epoch != self.epoch || self.durable_seq >= seq
    }

    /// Next block for the background copier, if any (and if under the limit).
    pub fn next_copy(&mut self) -> Option<CopyTask> {
        if !self.connected() || self.copying.len() >= self.cfg.copies_in_flight_max {
            return None;
        }
        // A dirty block whose earlier copy is still in flight (dirtied again
        // meanwhile, e.g. by falling behind) waits for that copy to finish:
        // handing it out twice would let the older copy's frame, sent
        // last, win on the peer while the newer one was dropped.
        let pick = |from: u64, before: Option<u64>| {
            let mut at = from;
            while let Some(b) = self.dirty.next_dirty(at) {
                if before.is_some_and(|e| b >= e) {
                    return None;
                }
                if !self.copying.contains_key(&b) {
                    return Some(b);
                }
                at = b + 1;
            }
            None
        };
        let block = pick(self.copy_cursor, None).or_else(|| pick(0, Some(self.copy_cursor)))?;
        self.dirty.clear_block(block);
        self.copying.insert(block, false);
        self.copy_cursor = block + 1;
        Some(CopyTask {
            block,
            extent: self.dirty.block_extent(block),
        })
    }

    /// The copier read `task`'s block; its frame of `wire_bytes` is about to be
    /// sent. Returns its seq, or `None` if the link went away meanwhile.
    pub fn copy_ready(&mut self, task: CopyTask, wire_bytes: u64, now_ms: u64) -> Option<u64> {
        let redirtied = self.copying.remove(&task.block)?;
        if redirtied {
            // A write landed during the read: the copy may be stale; do it again.
            self.dirty.mark_block(task.block);
        }
        let seq = self.sequence(task.extent, wire_bytes, now_ms);
        self.last_copy_seq = seq;
        Some(seq)
    }

    /// The peer is known to already hold `extent` as we do (e.g. holes of a
    /// fresh, all-zero replica): blocks fully inside it are no longer dirty.
    pub fn assume_equal(&mut self, extent: Extent) {
        if let Some((first, last)) = self.dirty.blocks_of(extent.offset, extent.length) {
            for b in first..=last {
                let be = self.dirty.block_extent(b);
                if be.offset >= extent.offset && be.end() <= extent.end() {
                    self.dirty.clear_block(b);
                }
            }
        }
    }

    /// The copier could not read the block: it stays dirty.
    pub fn copy_failed(&mut self, task: CopyTask) {
        if self.copying.remove(&task.block).is_some() {
            self.dirty.mark_block(task.block);
        }
    }

    fn maybe_streaming(&mut self, _now_ms: u64) {
        if self.phase == Phase::Resyncing
            && self.dirty.is_clean()
            && self.copying.is_empty()
            && self.received_seq >= self.last_copy_seq
        {
            self.phase = Phase::Streaming;
            self.behind = false;
            if !self.peer_consistent {
                self.announce_wait = true;
            }
        }
    }

    /// Lets time pass; returns what the edge must do.
    pub fn tick(&mut self, now_ms: u64) -> Option<TickAction> {
        self.maybe_streaming(now_ms);
        let since = self.ack_due_since_ms?;
        let silent_ms = now_ms.saturating_sub(since);
        (self.connected() && silent_ms > self.cfg.peer_ack_timeout_ms)
            .then_some(TickAction::PeerFailed { silent_ms })
    }

    /// The peer's state as this side knows it.
    pub fn replica_state(&self) -> ReplicaState {
        match self.phase {
            Phase::Streaming if !self.behind && !self.announce_wait => ReplicaState::UpToDate,
            _ if !self.peer_consistent => ReplicaState::Inconsistent,
            Phase::Resyncing => ReplicaState::Inconsistent,
            _ if self.dirty.is_clean() && self.unconfirmed.is_empty() => ReplicaState::UpToDate,
            _ => ReplicaState::Outdated,
        }
    }

    pub fn status(&self) -> LinkStatus {
        LinkStatus {
            phase: self.phase,
            replica: self.replica_state(),
            dirty_bytes: self.dirty.dirty_bytes(),
            backlog_bytes: self.backlog_bytes,
            unconfirmed_blocks: self.unconfirmed.len(),
            copies_in_flight: self.copying.len(),
            sent_seq: self.next_seq - 1,
            received_seq: self.received_seq,
            durable_seq: self.durable_seq,
            behind: self.behind,
        }
    }
}

/// Blocks written and not yet durable on the peer, each kept once with the
/// seq of the newest frame that wrote it: a block is confirmed when that
/// frame is durable. Memory follows the distinct blocks, not the writes.
#[derive(Debug, Clone, Default)]
struct Unconfirmed {
    /// block → seq of its newest write.
    newest: HashMap<u64, u64>,
    /// (seq, block), oldest first: what a durable seq confirms.
    by_seq: BTreeSet<(u64, u64)>,
}

impl Unconfirmed {
    fn add(&mut self, seq: u64, first: u64, last: u64) {
        for block in first..=last {
            if let Some(old) = self.newest.insert(block, seq) {
                self.by_seq.remove(&(old, block));
            }
            self.by_seq.insert((seq, block));
        }
    }

    /// Everything written by frames up to `durable` is durable on the peer.
    fn confirm(&mut self, durable: u64) {
        while let Some(&(seq, block)) = self.by_seq.first() {
            if seq > durable {
                break;
            }
            self.by_seq.pop_first();
            self.newest.remove(&block);
        }
    }

    fn len(&self) -> usize {
        self.newest.len()
    }

    fn is_empty(&self) -> bool {
        self.newest.is_empty()
    }

    fn contains(&self, block: u64) -> bool {
        self.newest.contains_key(&block)
    }

    fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_seq.iter().map(|&(_, block)| block)
    }

    fn drain(&mut self) -> impl Iterator<Item = u64> {
        self.newest.clear();
        std::mem::take(&mut self.by_seq)
            .into_iter()
            .map(|(_, block)| block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 4096;

    fn rep(mode: Mode, backlog: u64) -> Replicator {
        let cfg = LinkConfig {
            mode,
            backlog_bytes_max: backlog,
            peer_ack_timeout_ms: 1000,
            copies_in_flight_max: 2,
            unconfirmed_blocks_max: 8,
            flush_interval_ms: 1_000_000,
            flush_bytes: u64::MAX,
        };
        Replicator::new(cfg, DirtyMap::new(16 * G, G).unwrap(), true)
    }

    fn ext(block: u64) -> Extent {
        Extent {
            offset: block * G,
            length: G,
        }
    }

    #[test]
    fn sync_write_waits_for_receipt_and_stays_unconfirmed_until_a_durable_flush() {
        let mut r = rep(Mode::Sync, 1 << 20);
        assert!(r.on_connect(Relation::InSync, 0));
        assert_eq!(r.phase(), Phase::Streaming);
        assert_eq!(r.replica_state(), ReplicaState::UpToDate);
        let e = r.epoch();
        assert_eq!(
            r.on_write(ext(3), G, 1),
            WriteDecision::Stream { seq: 1, wait: true }
        );
        assert!(!r.is_received(e, 1));
        r.on_ack(1, 0, 2);
        assert!(r.is_received(e, 1) && !r.is_durable(e, 1));
        assert!(r.tracks(3), "received but not durable: still tracked");
        let f = r.on_flush(3).unwrap();
        r.on_ack(f, f, 4);
        assert!(r.is_durable(e, f));
        assert!(!r.tracks(3));
        assert_eq!(r.status().unconfirmed_blocks, 0);
    }

    #[test]
    fn link_loss_moves_unconfirmed_extents_to_the_dirty_map_and_releases_waiters() {
        let mut r = rep(Mode::Sync, 1 << 20);
        r.on_connect(Relation::InSync, 0);
        let e = r.epoch();
        r.on_write(ext(1), G, 0);
        r.on_write(ext(2), G, 0);
        r.on_ack(2, 0, 1);
        r.on_disconnect();
        assert!(r.is_received(e, 99), "waiters of a dead link are released");
        assert_eq!(r.dirty_map().iter().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(r.replica_state(), ReplicaState::Outdated);
        assert_eq!(r.on_write(ext(5), G, 2), WriteDecision::Dirty);
        // Reconnect: only the dirty blocks are copied, then it streams again.
        assert!(r.on_connect(Relation::Ahead, 3));
        assert_eq!(r.replica_state(), ReplicaState::Inconsistent);
        let mut copied = vec![];
        while let Some(t) = r.next_copy() {
            let seq = r.copy_ready(t, G, 4).unwrap();
            r.on_ack(seq, 0, 4);
            copied.push(t.block);
        }
        assert_eq!(copied, vec![1, 2, 5]);
        assert_eq!(r.phase(), Phase::Streaming);
    }

    #[test]
    fn a_write_during_a_copy_marks_the_block_dirty_again() {
        let mut r = rep(Mode::Sync, 1 << 20);
        r.dirty.mark_block(7);
        r.on_connect(Relation::Ahead, 0);
        let t = r.next_copy().unwrap();
        assert_eq!(t.block, 7);
        assert!(!r.dirty_map().is_dirty(7));
        r.on_write(
            Extent {
                offset: 7 * G + 100,
                length: 10,
            },
            10,
            1,
        );
        r.copy_ready(t, G, 2).unwrap();
        assert!(r.dirty_map().is_dirty(7), "the copy may be stale");
        assert_eq!(r.phase(), Phase::Resyncing);
    }

    #[test]
    fn a_range_found_different_is_resent_then_announced() {
        let mut r = rep(Mode::Sync, 64 * G);
        r.on_connect(Relation::InSync, 0);
        assert_eq!(r.replica_state(), ReplicaState::UpToDate);
        r.resync_extent(ext(3));
        assert_eq!(r.phase(), Phase::Resyncing);
        assert_eq!(r.replica_state(), ReplicaState::Inconsistent);
        let t = r.next_copy().unwrap();
        assert_eq!(t.block, 3);
        let s = r.copy_ready(t, G, 1).unwrap();
        r.on_ack(s, s, 1);
        assert_eq!(r.phase(), Phase::Streaming);
        assert_eq!(
            r.replica_state(),
            ReplicaState::Inconsistent,
            "not announced yet"
        );
        let a = r.announce_up_to_date(2).unwrap();
        r.on_ack(a, a, 2);
        assert_eq!(r.replica_state(), ReplicaState::UpToDate);
    }

    #[test]
    fn async_backlog_overflow_falls_behind_then_catches_up() {
        let mut r = rep(Mode::Async, 3 * G);
        r.on_connect(Relation::InSync, 0);
        for b in 0..3 {
            assert_eq!(
                r.on_write(ext(b), G, 0),
                WriteDecision::Stream {
                    seq: b + 1,
                    wait: false
                }
            );
        }
        assert_eq!(r.on_write(ext(3), G, 0), WriteDecision::Overflow);
        let st = r.status();
        assert!(st.behind && st.backlog_bytes == 0);
        assert_eq!(st.replica, ReplicaState::Inconsistent);
        assert_eq!(r.dirty_map().dirty_blocks(), 4);
        assert_eq!(r.on_write(ext(9), G, 0), WriteDecision::Dirty);
        while let Some(t) = r.next_copy() {
            let s = r.copy_ready(t, G, 1).unwrap();
            r.on_ack(s, 0, 1);
        }
        // Caught up, but the peer is told so by a flush: up to date once it is durable.
        assert_eq!(r.replica_state(), ReplicaState::Inconsistent);
        let a = r.announce_up_to_date(1).unwrap();
        r.on_ack(a, a - 1, 1);
        assert_eq!(r.replica_state(), ReplicaState::Inconsistent);
        r.on_ack(a, a, 1);
        assert_eq!(r.replica_state(), ReplicaState::UpToDate);
        assert!(matches!(
            r.on_write(ext(0), G, 2),
            WriteDecision::Stream { .. }
        ));
    }

    #[test]
    fn a_silent_peer_is_declared_failed() {
        let mut r = rep(Mode::Sync, 1 << 20);
        r.on_connect(Relation::InSync, 0);
        assert_eq!(r.tick(5000), None, "nothing outstanding: silence is fine");
        r.on_write(ext(0), G, 10_000);
        assert_eq!(r.tick(10_500), None);
        r.on_ack(1, 0, 10_900);
        assert_eq!(r.tick(11_800), None);
        r.on_write(ext(1), G, 12_000);
        assert_eq!(
            r.tick(13_001),
            Some(TickAction::PeerFailed { silent_ms: 1001 })
        );
    }

    #[test]
    fn refuses_to_be_source_when_behind_or_split() {
        let mut r = rep(Mode::Sync, 1 << 20);
        assert!(!r.on_connect(Relation::Behind, 0));
        assert!(!r.on_connect(Relation::SplitBrain, 0));
        assert_eq!(r.phase(), Phase::SplitBrain);
        assert_eq!(r.on_write(ext(0), G, 0), WriteDecision::Dirty);
    }

    #[test]
    fn pessimistic_map_is_what_tracks_says() {
        let mut r = rep(Mode::Sync, 1 << 20);
        r.dirty.mark_block(2);
        r.on_connect(Relation::Ahead, 0);
        let copying = r.next_copy().unwrap();
        r.on_write(
            Extent {
                offset: 5 * G + 10,
                length: G,
            },
            G,
            1,
        );
        let m = r.pessimistic_dirty_map();
        for b in 0..16 {
            assert_eq!(m.is_dirty(b), r.tracks(b), "block {b}");
        }
        assert!(m.is_dirty(copying.block) && m.is_dirty(5) && m.is_dirty(6));
    }

    #[test]
    fn a_block_written_again_is_kept_once_until_its_newest_write_is_durable() {
        let mut r = rep(Mode::Sync, 1 << 20);
        r.on_connect(Relation::InSync, 0);
        let first = match r.on_write(ext(2), G, 0) {
            WriteDecision::Stream { seq, .. } => seq,
            d => panic!("{d:?}"),
        };
        for _ in 0..100 {
            r.on_write(ext(2), G, 0);
        }
        assert_eq!(r.status().unconfirmed_blocks, 1, "one block, many writes");
        assert!(
            !r.flush_due(0),
            "100 writes of one block are not 100 extents"
        );
        let newest = match r.on_write(ext(2), G, 0) {
            WriteDecision::Stream { seq, .. } => seq,
            d => panic!("{d:?}"),
        };
        r.on_ack(newest, first, 1);
        assert!(r.tracks(2), "only an older write of the block is durable");
        r.on_disconnect();
        assert!(
            r.dirty_map().is_dirty(2),
            "its newest write goes to the dirty map"
        );
        assert_eq!(r.dirty_map().dirty_blocks(), 1);
    }

    #[test]
    fn unconfirmed_extents_ask_for_a_flush() {
        let mut r = rep(Mode::Sync, 1 << 20);
        r.on_connect(Relation::InSync, 0);
        for b in 0..4 {
            r.on_write(ext(b), G, 0);
        }
        assert!(r.flush_due(0));
        let f = r.on_flush(0).unwrap();
        assert!(!r.flush_due(0), "one flush in flight is enough");
        r.on_ack(f, f, 1);
        assert!(!r.flush_due(1));
        r.on_write(ext(9), G, 2);
        assert!(!r.flush_due(2));
        r.cfg.flush_interval_ms = 100;
        assert!(r.flush_due(100), "old unconfirmed extents get a flush");
    }

    mod sim {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Write(u64),
            Flush,
            Deliver,
            Ack,
            CopyStart,
            CopyFinish,
            Disconnect,
            Connect,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0u64..16).prop_map(Op::Write),
                1 => Just(Op::Flush),
                6 => Just(Op::Deliver),
                3 => Just(Op::Ack),
                3 => Just(Op::CopyStart),
                3 => Just(Op::CopyFinish),
                1 => Just(Op::Disconnect),
                1 => Just(Op::Connect),
            ]
        }

        /// A frame in flight: (seq, block and version written, or a flush).
        type Frame = (u64, Option<(u64, u64)>);

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Simulated link with a peer that applies frames in order and a
            /// network that can drop the connection at any point: every block
            /// whose content differs on the peer is always tracked (dirty, being
            /// copied or unconfirmed), and once connected and drained the two
            /// copies are equal.
            #[test]
            fn no_difference_is_ever_forgotten(ops in proptest::collection::vec(op(), 1..200), async_mode: bool) {
                let mode = if async_mode { Mode::Async } else { Mode::Sync };
                let mut r = rep(mode, 5 * G);
                let mut ver = [0u64; 16];
                let mut peer = [0u64; 16];
                let mut wire: VecDeque<Frame> = VecDeque::new();
                let (mut received, mut durable) = (0u64, 0u64);
                let mut copies: Vec<(CopyTask, u64)> = vec![];
                let mut now = 0;
                r.on_connect(Relation::InSync, now);
                for op in ops {
                    now += 1;
                    match op {
                        Op::Write(b) => {
                            ver[b as usize] += 1;
                            if let WriteDecision::Stream { seq, .. } = r.on_write(ext(b), G, now) {
                                wire.push_back((seq, Some((b, ver[b as usize]))));
                            }
                            if r.flush_due(now) {
                                let s = r.on_flush(now).unwrap();
                                wire.push_back((s, None));
                            }
                        }
                        Op::Flush => {
                            if let Some(s) = r.on_flush(now) { wire.push_back((s, None)); }
                        }
                        Op::Deliver => {
                            if let Some((seq, what)) = wire.pop_front() {
                                match what {
                                    Some((b, v)) => peer[b as usize] = v,
                                    None => durable = seq,
                                }
                                received = seq;
                            }
                        }
                        Op::Ack => r.on_ack(received, durable, now),
                        Op::CopyStart => {
                            if let Some(t) = r.next_copy() {
                                copies.push((t, ver[t.block as usize]));
                            }
                        }
                        Op::CopyFinish => {
                            if let Some((t, v)) = copies.pop() {
                                if let Some(seq) = r.copy_ready(t, G, now) {
                                    wire.push_back((seq, Some((t.block, v))));
                                }
                            }
                        }
                        Op::Disconnect => {
                            wire.clear();
                            copies.clear();
                            received = 0;
                            durable = 0;
                            r.on_disconnect();
                        }
                        Op::Connect => {
                            if r.phase() == Phase::Disconnected {
                                received = 0;
                                durable = 0;
                                r.on_connect(Relation::InSync, now);
                            }
                        }
                    }
                    for b in 0..16u64 {
                        if peer[b as usize] != ver[b as usize] {
                            prop_assert!(r.tracks(b), "block {} differs but is not tracked after {:?}", b, r.status());
                        }
                    }
                }
                // Heal: reconnect and drain everything.
                if r.phase() == Phase::Disconnected {
                    wire.clear();
                    received = 0;
                    durable = 0;
                    r.on_connect(Relation::InSync, now);
                }
                for (t, v) in copies.drain(..) {
                    if let Some(seq) = r.copy_ready(t, G, now) { wire.push_back((seq, Some((t.block, v)))); }
                }
                for _ in 0..1000 {
                    while let Some((seq, what)) = wire.pop_front() {
                        match what { Some((b, v)) => peer[b as usize] = v, None => durable = seq }
                        received = seq;
                    }
                    r.on_ack(received, durable, now);
                    match r.next_copy() {
                        Some(t) => {
                            let v = ver[t.block as usize];
                            let seq = r.copy_ready(t, G, now).unwrap();
                            wire.push_back((seq, Some((t.block, v))));
                        }
                        None if wire.is_empty() => break,
                        None => {}
                    }
                }
                let f = r.announce_up_to_date(now).unwrap();
                r.on_ack(f, f, now);
                prop_assert_eq!(peer, ver);
                prop_assert_eq!(r.replica_state(), ReplicaState::UpToDate);
                prop_assert_eq!(r.status().unconfirmed_blocks, 0);
            }
        }
    }
}
