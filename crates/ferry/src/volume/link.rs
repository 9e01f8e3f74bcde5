//! The network side of a primary's link: a thread per replicated volume that
//! connects to the peer with TLS, runs the handshake, then reads
//! acknowledgements until the link fails, and reconnects with backoff.
//!
//! Frames are *sent* by whichever thread queued them ([`super::primary::Link::pump`]):
//! an NBD worker encrypts and writes its own write frame, so a replicated write
//! costs no thread hand-off on the way out, and the ack reader wakes only the
//! writers whose acknowledgement arrived on the way back.
//!
//! One rustls connection is shared by the sender and the reader
//! ([`crate::transport::tls_io::SharedTls`]), so a sender blocked on a full socket never
//! keeps the reader from decrypting acknowledgements.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::generation::Relation;
use ferry_core::link::{Mode, Phase, TickAction};
use ferry_core::DirtyMap;
use ferry_core::GenerationHistory;
use ferry_wire::{FrameHeader, Hello, HelloReply, Kind, PROTOCOL_VERSION};

use super::primary::{Group, Out, PrimaryVolume};
use crate::transport::dial::Dialer;
use crate::transport::tls_io::SharedTls;

/// Frame flags above this shift carry the member's tag (its index in the
/// group); acknowledgements carry it back.
pub const TAG_SHIFT: u16 = 8;
/// Volumes one stream carries at most (the tag is 8 bits).
pub const GROUP_VOLUMES_MAX: usize = 255;

/// The member tag of a frame.
pub fn tag_of(h: &FrameHeader) -> usize {
    usize::from(h.flags >> TAG_SHIFT)
}

/// The flags bits that carry member `tag`.
pub fn tag_flags(tag: u16) -> u16 {
    tag << TAG_SHIFT
}

/// Flag on a Flush frame: the peer is now up to date at generation `offset`.
pub const FLAG_UP_TO_DATE: u16 = 1;
/// Flag on a Flush frame: the replica's snapshot armed with the token in
/// `offset` is taken here.
pub const FLAG_SNAPSHOT: u16 = 2;
/// Links send a ping this often, so a dead peer is noticed (and the HA
/// cluster counts the answers as a heartbeat path).
const PING_INTERVAL_MS: u64 = 100;
/// Plaintext sealed and written at a time while sending a large batch.
const CIPHER_FLUSH_BYTES: u64 = 1 << 20;
/// How often the reader wakes to tick the state machine when nothing arrives.
const TICK_MS: u64 = 50;

/// A live TLS connection to the peer.
pub struct Wire {
    tls: SharedTls,
    ctl: TcpStream,
    /// Held by the one thread currently sending (see `Link::pump`).
    pub send_token: Mutex<()>,
    dead: AtomicBool,
    error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wire")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Wire {
    /// Encrypts and writes `frames`, each `(member tag, frame)`.
    pub fn send(&self, frames: &[(u16, Out)]) -> io::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "link is down"));
        }
        let mut rest = frames;
        while !rest.is_empty() {
            // Large batches (the copier's) are sealed and written in pieces.
            let mut n = 0;
            let mut chunk = 0u64;
            while n < rest.len() && (n == 0 || chunk < CIPHER_FLUSH_BYTES) {
                chunk += rest[n].1.wire_bytes();
                n += 1;
            }
            let (now, later) = rest.split_at(n);
            self.tls
                .send_with(|w| now.iter().try_for_each(|(t, o)| encode_out(w, *t, o)))?;
            rest = later;
        }
        Ok(())
    }

    /// Marks the connection failed. Sending stops at once; the reader keeps
    /// reading briefly, so a last Error frame from the peer (say, its disk is
    /// full) is what the operator sees. `"stopped"` closes both directions.
    pub fn fail(&self, why: &str) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            *lock(&self.error) = Some(why.to_string());
        }
        let how = if why == "stopped" {
            Shutdown::Both
        } else {
            Shutdown::Write
        };
        let _ = self.ctl.shutdown(how);
    }
}

fn encode_out(w: &mut dyn Write, tag: u16, o: &Out) -> io::Result<()> {
    let tag = tag_flags(tag);
    match o {
        Out::Data {
            kind,
            seq,
            offset,
            data,
        } => {
            let mut h = FrameHeader::new(*kind, *seq, *offset, data.len() as u32);
            h.flags = tag;
            w.write_all(&h.encode())?;
            w.write_all(data)?;
            w.write_all(&ferry_wire::trailer(data))?;
        }
        Out::Zero {
            seq,
            offset,
            length,
        } => {
            let payload = length.to_be_bytes();
            let mut h = FrameHeader::new(Kind::Zero, *seq, *offset, payload.len() as u32);
            h.flags = tag;
            w.write_all(&h.encode())?;
            w.write_all(&payload)?;
            w.write_all(&ferry_wire::trailer(&payload))?;
        }
        Out::Flush {
            seq,
            up_to_date_generation,
            snapshot,
        } => {
            // `offset` carries the generation (up to date) or the snapshot's token.
            let mut h = FrameHeader::new(
                Kind::Flush,
                *seq,
                up_to_date_generation.or(*snapshot).unwrap_or(0),
                0,
            );
            h.flags = tag;
            if up_to_date_generation.is_some() {
                h.flags |= FLAG_UP_TO_DATE;
            }
            if snapshot.is_some() {
                h.flags |= FLAG_SNAPSHOT;
            }
            w.write_all(&h.encode())?;
        }
    }
    Ok(())
}

/// Why a group's link ends: a member was stopped, lost its peer, or now
/// replicates elsewhere.
fn group_stopped(group: &Group) -> Option<String> {
    let first = group.members.first()?.link.lock().peer.clone();
    for m in &group.members {
        let l = m.link.lock();
        if l.stop || l.regroup || l.peer.is_none() || l.peer != first {
            return None;
        }
    }
    first
}

/// Runs the link of `group` until one of its members is stopped,
/// reconnecting with backoff.
pub fn run(group: Arc<Group>, dialer: Dialer) {
    for m in &group.members {
        m.start_copier();
    }
    let mut backoff_ms = 100;
    loop {
        let Some(peer) = group_stopped(&group) else {
            for m in &group.members {
                m.link_down(None);
            }
            return;
        };
        let result = connect_and_serve(&group, &dialer, &peer, &mut backoff_ms);
        let msg = result.err().map(|e| format!("{e:#}"));
        if let Some(m) = &msg {
            tracing::warn!(group = %group.name, %peer, error = %m, "replication.link.down");
        }
        group.set_wire(None);
        for vol in &group.members {
            vol.link_down(msg.clone());
            if let Err(e) = vol.save_dirty_map(true) {
                tracing::error!(volume = %vol.name, error = %e, "replication.dirty_map.save_failed");
            }
        }
        // Back off, but end at once when stopped or regrouped, or when an
        // operator resolved a split brain.
        let split = |g: &Group| g.members.iter().any(|m| m.link.lock().stats.split_brain);
        let was_split = split(&group);
        let until = Instant::now() + Duration::from_millis(backoff_ms);
        while Instant::now() < until
            && group_stopped(&group).is_some()
            && (!was_split || split(&group))
        {
            std::thread::sleep(Duration::from_millis(TICK_MS));
        }
        let max = group.members[0].settings.reconnect_backoff_max_ms.max(100);
        backoff_ms = (backoff_ms * 2).min(max);
    }
}

fn hello_of(vol: &PrimaryVolume, node_name: &str, group: &Group) -> Hello {
    let (generation, mode) = {
        let meta = vol.meta.lock().unwrap_or_else(|p| p.into_inner());
        (meta.state().generation.clone(), meta.state().mode)
    };
    Hello {
        protocol_versions: vec![PROTOCOL_VERSION],
        node_name: node_name.to_string(),
        volume: vol.name.clone(),
        volume_id: vol.id.clone(),
        size_bytes: ferry_nbd::BlockDevice::size(&vol.local),
        granularity_bytes: vol.settings.granularity_bytes,
        generation: generation.current(),
        ancestors: generation.ancestors().collect(),
        mode: if mode == Mode::Sync { "sync" } else { "async" }.into(),
        group: (group.members.len() > 1).then(|| group.name.clone()),
        group_size: group.members.len() as u16,
    }
}

fn connect_and_serve(
    group: &Arc<Group>,
    dialer: &Dialer,
    peer_name: &str,
    backoff_ms: &mut u64,
) -> Result<()> {
    let (peer, mut tls) = dialer.connect(peer_name)?;

    // One Hello per member, in tag order; one reply each.
    let mut hellos = Vec::new();
    for vol in &group.members {
        let hello = hello_of(vol, dialer.node_name(), group);
        tls.write_all(&ferry_wire::encode_frame(
            Kind::Hello,
            0,
            0,
            &hello.to_bytes(),
        ))?;
        hellos.push(hello);
    }
    tls.flush()?;
    let frame_max = group.members[0].settings.frame_bytes_max;
    let mut relations = Vec::new();
    for (vol, hello) in group.members.iter().zip(&hellos) {
        let mut body = Vec::new();
        let hdr = ferry_wire::read_frame(&mut tls, frame_max, &mut body)
            .with_context(|| format!("{} did not answer the handshake", peer.name))?;
        if hdr.kind != Kind::HelloReply {
            bail!(
                "{} answered the handshake with a {:?} frame",
                peer.name,
                hdr.kind
            );
        }
        let reply = HelloReply::from_bytes(&body[..hdr.len as usize])?;
        if reply.node_name != peer.name {
            bail!(
                "the peer at {} calls itself {:?}, not {:?}",
                peer.replication,
                reply.node_name,
                peer.name
            );
        }
        if let Some(reason) = reply.refused {
            if reason.starts_with("split brain") {
                // Shown in status until an operator resolves it; no point
                // asking again soon.
                vol.link.lock().stats.split_brain = true;
                *backoff_ms = 30_000;
            }
            bail!("{} refused the link: {reason}", peer.name);
        }
        let mine = GenerationHistory::from_parts(hello.generation, hello.ancestors.clone(), 16);
        let peer_gen = GenerationHistory::from_parts(reply.generation, reply.ancestors.clone(), 16);
        let relation = mine.relate(&peer_gen);
        if matches!(
            relation,
            Relation::SplitBrain | Relation::Behind | Relation::SelfBlank
        ) {
            // Refuse before any member goes up (the state machine records
            // a split brain).
            let mut l = vol.link.lock();
            l.stats.split_brain = relation == Relation::SplitBrain;
            let _ = l.rep.on_connect(relation, vol.now_ms());
            drop(l);
            *backoff_ms = 30_000;
            bail!(
                "volume {}: {}",
                vol.name,
                match relation {
                    Relation::SplitBrain => "split brain: both copies were written separately; nothing is resynced until an operator resolves it",
                    _ => "the peer holds newer data than this node; refusing to overwrite it",
                }
            );
        }
        relations.push((relation, reply.dirty_map));
    }

    let rustls::StreamOwned { conn, sock } = tls;
    sock.set_read_timeout(Some(Duration::from_millis(TICK_MS)))?;
    let wire = Arc::new(Wire {
        tls: SharedTls::new(conn, &sock)?,
        ctl: sock.try_clone()?,
        send_token: Mutex::new(()),
        dead: AtomicBool::new(false),
        error: Mutex::new(None),
    });
    group.set_wire(Some(wire.clone()));
    for (tag, ((vol, (relation, suspect)), hello)) in
        group.members.iter().zip(relations).zip(&hellos).enumerate()
    {
        member_up(
            group,
            tag as u16,
            vol,
            (relation, hello.generation),
            suspect,
            &wire,
            &peer.name,
        )?;
    }
    *backoff_ms = 100;
    for vol in &group.members {
        vol.link.copier.notify_all();
    }
    group.pump();
    let result = read_acks(group, &wire, sock, frame_max);
    wire.fail("link closed");
    let err = lock(&wire.error).clone();
    match result {
        Err(e) => Err(e),
        Ok(()) => match err {
            Some(e) if e != "link closed" && e != "stopped" => bail!("{e}"),
            _ => Ok(()),
        },
    }
}

/// One member of a connected group goes up: its state machine learns the
/// relation, and its frames join the stream under `tag`.
fn member_up(
    group: &Arc<Group>,
    tag: u16,
    vol: &Arc<PrimaryVolume>,
    (mut relation, sent_generation): (Relation, u64),
    suspect: Option<Vec<u8>>,
    wire: &Arc<Wire>,
    peer: &str,
) -> Result<()> {
    let now = vol.now_ms();
    // Meta before link, the order a generation bump takes them: a write
    // acknowledged alone while the handshake ran may have recorded a new
    // generation after the Hello was built. The peer would adopt the old
    // one and the next meeting would look like a split brain: start over.
    let meta = vol.meta.lock().unwrap_or_else(|p| p.into_inner());
    if meta.state().generation.current() != sent_generation {
        bail!(
            "volume {}: its generation changed during the handshake; reconnecting",
            vol.name
        );
    }
    let mut l = vol.link.lock();
    if relation == Relation::PeerBlank && l.checksum_baseline {
        // The dirty map already says exactly which blocks differ.
        relation = Relation::InSync;
    }
    l.checksum_baseline = false;
    if !l.rep.on_connect(relation, now) {
        bail!("volume {}: the link cannot start ({relation:?})", vol.name);
    }
    // From here writes stream to the peer: no more bumps for this link.
    drop(meta);
    if relation == Relation::PeerBlank {
        // The peer's fresh image reads as zeroes: holes need not be sent.
        let mut runs = Vec::new();
        let size = ferry_nbd::BlockDevice::size(&vol.local);
        let mut pos = 0;
        while pos < size {
            runs.clear();
            ferry_nbd::BlockDevice::block_status(&vol.local, pos, size - pos, 1024, &mut runs)?;
            if runs.is_empty() {
                break;
            }
            for r in &runs {
                if r.hole {
                    l.rep.assume_equal(ferry_core::Extent {
                        offset: pos,
                        length: r.length,
                    });
                }
                pos += r.length;
            }
        }
    }
    if let Some(bytes) = suspect {
        // The peer is an old primary: it may hold blocks this node never
        // saw (its writes before it failed). Resend them.
        let size = ferry_nbd::BlockDevice::size(&vol.local);
        let g = l.rep.dirty_map().granularity_bytes();
        match DirtyMap::decode(&bytes, size, g) {
            Ok(map) => {
                for idx in map.iter() {
                    l.rep.resync_extent(map.block_extent(idx));
                }
                tracing::info!(volume = %vol.name, %peer, suspect_bytes = map.dirty_bytes(), "replication.peer_suspect_blocks: resending what the old primary may hold alone");
            }
            Err(e) => {
                tracing::warn!(volume = %vol.name, %peer, error = %e, "replication.peer_suspect_map_unreadable: resending everything");
                l.rep.resync_extent(ferry_core::Extent {
                    offset: 0,
                    length: size,
                });
            }
        }
    }
    l.bumped_while_down = false;
    l.stats.last_error = None;
    l.stats.split_brain = false;
    l.stats.connected_since = Some(Instant::now());
    l.stats.resync_total_bytes = l.rep.dirty_map().dirty_bytes();
    l.wire = Some(wire.clone());
    l.group = Some(group.clone());
    l.tag = tag;
    tracing::info!(volume = %vol.name, group = %group.name, tag, %peer, ?relation,
        resync_bytes = l.stats.resync_total_bytes, "replication.link.up");
    Ok(())
}

/// Reads acknowledgements until the link fails; ticks the members' state machines.
fn read_acks(group: &Arc<Group>, wire: &Wire, mut sock: TcpStream, frame_max: u32) -> Result<()> {
    let mut raw = vec![0u8; 64 * 1024];
    let mut plain: Vec<u8> = Vec::new();
    let mut last_ping = Instant::now();
    let mut dead_since: Option<Instant> = None;
    loop {
        if wire.dead.load(Ordering::SeqCst) {
            let since = *dead_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                return Ok(());
            }
        }
        match sock.read(&mut raw) {
            Ok(0) if wire.dead.load(Ordering::SeqCst) => return Ok(()),
            Ok(0) => bail!("the peer closed the connection"),
            Ok(n) => wire.tls.open(&raw[..n], &mut plain)?,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        // Whole frames in `plain`.
        let mut used = 0;
        while let Some((hdr, payload, len)) = ferry_wire::split_frame(&plain[used..], frame_max)? {
            if used == 0 {
                let now = Instant::now();
                for vol in &group.members {
                    vol.link.lock().stats.last_rx = Some(now);
                }
            }
            used += len;
            match hdr.kind {
                Kind::Ack => {
                    let vol = group.members.get(tag_of(&hdr)).ok_or_else(|| {
                        anyhow!(
                            "the peer acknowledged member {} of a group of {}",
                            tag_of(&hdr),
                            group.members.len()
                        )
                    })?;
                    on_ack(vol, hdr.seq, hdr.offset)
                }
                Kind::Error => bail!("peer reported: {}", String::from_utf8_lossy(payload)),
                other => bail!("unexpected {other:?} frame from the peer"),
            }
        }
        plain.drain(..used);
        if dead_since.is_some() {
            continue;
        }
        // Tick: ack timeout, periodic flush, keep-alive.
        if group_stopped(group).is_none() {
            wire.fail("stopped");
            return Ok(());
        }
        for vol in &group.members {
            let now = vol.now_ms();
            let mut l = vol.link.lock();
            if let Some(TickAction::PeerFailed { silent_ms }) = l.rep.tick(now) {
                bail!(
                    "peer silent for {silent_ms} ms about {} (peer_ack_timeout_ms {})",
                    vol.name,
                    vol.settings.peer_ack_timeout_ms
                );
            }
            vol.link.maybe_flush(&mut l, now);
        }
        if last_ping.elapsed() >= Duration::from_millis(PING_INTERVAL_MS) {
            last_ping = Instant::now();
            wire.tls
                .send(&FrameHeader::new(Kind::Ping, 0, 0, 0).encode())?;
        }
        group.pump();
    }
}

fn on_ack(vol: &Arc<PrimaryVolume>, received: u64, durable: u64) {
    let now = vol.now_ms();
    let mut l = vol.link.lock();
    l.rep.on_ack(received, durable, now);
    if l.rep.phase() == Phase::Streaming && !l.announced_up_to_date {
        // Lock order is meta → link everywhere: take both, so no generation
        // bump (meta, then link) slips in between reading the generation and
        // announcing it — the replica would be declared up to date at a
        // generation the primary has already left (a false split brain at
        // the next role change).
        drop(l);
        let meta = vol.meta.lock().unwrap_or_else(|p| p.into_inner());
        let g = meta.state().generation.current();
        l = vol.link.lock();
        if l.rep.phase() != Phase::Streaming || l.announced_up_to_date {
            drop(meta);
            let done = vol.link.wake_acked(&mut l);
            drop(l);
            vol.finish_confirmed(done);
            return;
        }
        if let Some(seq) = l.rep.announce_up_to_date(now) {
            vol.link.push(
                &mut l,
                Out::Flush {
                    seq,
                    up_to_date_generation: Some(g),
                    snapshot: None,
                },
            );
            l.announced_up_to_date = true;
            tracing::info!(volume = %vol.name, "replication.resync.done: peer up to date");
        }
        drop(meta);
    }
    let done = vol.link.wake_acked(&mut l);
    // The copier has nothing to gain from an ack when no block is dirty.
    let copier_work = l.rep.dirty_map().dirty_blocks() > 0;
    drop(l);
    vol.finish_confirmed(done);
    if copier_work {
        vol.link.copier.notify_all();
    }
}
