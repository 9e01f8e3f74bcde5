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
//! ([`super::tls_io::SharedTls`]), so a sender blocked on a full socket never
//! keeps the reader from decrypting acknowledgements.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::generation::Relation;
use ferry_core::link::{Mode, Phase, TickAction};
use ferry_core::GenerationHistory;
use ferry_wire::{FrameHeader, Hello, HelloReply, Kind, PROTOCOL_VERSION};

use super::primary::{Out, PrimaryVolume};
use super::tls_io::SharedTls;
use crate::agent::AgentCtx;

/// Flag on a Flush frame: the peer is now up to date at generation `offset`.
pub const FLAG_UP_TO_DATE: u16 = 1;
/// Flag on a Flush frame: an armed snapshot of the replica is taken here.
pub const FLAG_SNAPSHOT: u16 = 2;
/// Idle links send a ping this often, so a dead peer is noticed.
const PING_INTERVAL_MS: u64 = 1000;
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
    /// Encrypts and writes `frames`; returns the plaintext bytes sent.
    pub fn send(&self, frames: &[Out]) -> io::Result<u64> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "link is down"));
        }
        let mut bytes = 0u64;
        let mut rest = frames;
        while !rest.is_empty() {
            // Large batches (the copier's) are sealed and written in pieces.
            let mut n = 0;
            let mut chunk = 0u64;
            while n < rest.len() && (n == 0 || chunk < CIPHER_FLUSH_BYTES) {
                chunk += rest[n].wire_bytes();
                n += 1;
            }
            let (now, later) = rest.split_at(n);
            self.tls
                .send_with(|w| now.iter().try_for_each(|o| encode_out(w, o)))?;
            bytes += chunk;
            rest = later;
        }
        Ok(bytes)
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

fn encode_out(w: &mut dyn Write, o: &Out) -> io::Result<()> {
    match o {
        Out::Data {
            kind,
            seq,
            offset,
            data,
        } => {
            let h = FrameHeader::new(*kind, *seq, *offset, data.len() as u32);
            w.write_all(&h.encode())?;
            w.write_all(data)?;
            w.write_all(&ferry_wire::trailer(data))?;
        }
        Out::Zero {
            seq,
            offset,
            length,
        } => {
            w.write_all(&ferry_wire::encode_frame(
                Kind::Zero,
                *seq,
                *offset,
                &length.to_be_bytes(),
            ))?;
        }
        Out::Flush {
            seq,
            up_to_date_generation,
            snapshot,
        } => {
            let mut h = FrameHeader::new(Kind::Flush, *seq, up_to_date_generation.unwrap_or(0), 0);
            if up_to_date_generation.is_some() {
                h.flags |= FLAG_UP_TO_DATE;
            }
            if *snapshot {
                h.flags |= FLAG_SNAPSHOT;
            }
            w.write_all(&h.encode())?;
        }
    }
    Ok(())
}

/// Runs the link of `vol` until it is stopped, reconnecting with backoff.
pub fn run(vol: Arc<PrimaryVolume>, ctx: Arc<AgentCtx>) {
    vol.start_copier();
    let mut backoff_ms = 100;
    loop {
        let (stop, peer) = {
            let l = vol.link.lock();
            (l.stop, l.peer.clone())
        };
        let Some(peer) = peer.filter(|_| !stop) else {
            vol.link_down(None);
            return;
        };
        let result = connect_and_serve(&vol, &ctx, &peer, &mut backoff_ms);
        let msg = result.err().map(|e| format!("{e:#}"));
        if let Some(m) = &msg {
            tracing::warn!(volume = %vol.name, %peer, error = %m, "replication.link.down");
        }
        vol.link_down(msg);
        if let Err(e) = vol.save_dirty_map(true) {
            tracing::error!(volume = %vol.name, error = %e, "replication.dirty_map.save_failed");
        }
        std::thread::sleep(Duration::from_millis(backoff_ms));
        backoff_ms = (backoff_ms * 2).min(vol.settings.reconnect_backoff_max_ms.max(100));
    }
}

fn connect_and_serve(
    vol: &Arc<PrimaryVolume>,
    ctx: &Arc<AgentCtx>,
    peer_name: &str,
    backoff_ms: &mut u64,
) -> Result<()> {
    let peer = ctx
        .peers
        .get(peer_name)
        .ok_or_else(|| anyhow!("node {peer_name:?} is not registered (ferry node add)"))?;
    let addr = peer
        .replication
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            anyhow!(
                "bad replication address {:?} for {}",
                peer.replication,
                peer.name
            )
        })?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {} at {}", peer.name, peer.replication))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let tls_cfg = crate::agent::tls::client_config(&ctx.identity, peer.fingerprint.clone())?;
    let conn = rustls::ClientConnection::new(tls_cfg, crate::agent::tls::server_name())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .with_context(|| format!("TLS handshake with {} failed", peer.name))?;
    }

    let (generation, mode) = {
        let meta = vol.meta.lock().unwrap_or_else(|p| p.into_inner());
        (meta.state().generation.clone(), meta.state().mode)
    };
    let hello = Hello {
        protocol_versions: vec![PROTOCOL_VERSION],
        node_name: ctx.identity.node_name.clone(),
        volume: vol.name.clone(),
        volume_id: vol.id.clone(),
        size_bytes: ferry_nbd::BlockDevice::size(&vol.local),
        granularity_bytes: vol.settings.granularity_bytes,
        generation: generation.current(),
        ancestors: generation.ancestors().collect(),
        mode: if mode == Mode::Sync { "sync" } else { "async" }.into(),
    };
    tls.write_all(&ferry_wire::encode_frame(
        Kind::Hello,
        0,
        0,
        &hello.to_bytes(),
    ))?;
    tls.flush()?;
    let frame_max = vol.settings.frame_bytes_max;
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
        bail!("{} refused the link: {reason}", peer.name);
    }
    let peer_gen = GenerationHistory::from_parts(reply.generation, reply.ancestors.clone(), 16);
    let mut relation = generation.relate(&peer_gen);

    let rustls::StreamOwned { conn, sock } = tls;
    sock.set_read_timeout(Some(Duration::from_millis(TICK_MS)))?;
    let wire = Arc::new(Wire {
        tls: SharedTls::new(conn, &sock)?,
        ctl: sock.try_clone()?,
        send_token: Mutex::new(()),
        dead: AtomicBool::new(false),
        error: Mutex::new(None),
    });
    {
        let now = vol.now_ms();
        let mut l = vol.link.lock();
        if relation == Relation::PeerBlank && l.checksum_baseline {
            // The dirty map already says exactly which blocks differ.
            relation = Relation::InSync;
        }
        l.checksum_baseline = false;
        if !l.rep.on_connect(relation, now) {
            l.stats.split_brain = relation == Relation::SplitBrain;
            let why = match relation {
                Relation::SplitBrain => "split brain: both copies were written separately; nothing is resynced until an operator resolves it",
                _ => "the peer holds newer data than this node; refusing to overwrite it",
            };
            drop(l);
            *backoff_ms = 30_000;
            bail!("{why}");
        }
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
        l.bumped_while_down = false;
        l.stats.last_error = None;
        l.stats.split_brain = false;
        l.stats.connected_since = Some(Instant::now());
        l.stats.resync_total_bytes = l.rep.dirty_map().dirty_bytes();
        l.wire = Some(wire.clone());
        tracing::info!(volume = %vol.name, peer = %peer.name, ?relation,
            resync_bytes = l.stats.resync_total_bytes, "replication.link.up");
    }
    *backoff_ms = 100;
    vol.link.copier.notify_all();
    vol.link.pump();
    let result = read_acks(vol, &wire, sock, frame_max);
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

/// Reads acknowledgements until the link fails; ticks the state machine.
fn read_acks(
    vol: &Arc<PrimaryVolume>,
    wire: &Wire,
    mut sock: TcpStream,
    frame_max: u32,
) -> Result<()> {
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
            used += len;
            match hdr.kind {
                Kind::Ack => on_ack(vol, hdr.seq, hdr.offset),
                Kind::Error => bail!("peer reported: {}", String::from_utf8_lossy(payload)),
                other => bail!("unexpected {other:?} frame from the peer"),
            }
        }
        plain.drain(..used);
        if dead_since.is_some() {
            continue;
        }
        // Tick: ack timeout, periodic flush, keep-alive.
        let now = vol.now_ms();
        {
            let mut l = vol.link.lock();
            if l.stop || l.peer.is_none() {
                drop(l);
                wire.fail("stopped");
                return Ok(());
            }
            if let Some(TickAction::PeerFailed { silent_ms }) = l.rep.tick(now) {
                bail!(
                    "peer silent for {silent_ms} ms (peer_ack_timeout_ms {})",
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
        vol.link.pump();
    }
}

fn on_ack(vol: &Arc<PrimaryVolume>, received: u64, durable: u64) {
    let now = vol.now_ms();
    let mut l = vol.link.lock();
    l.rep.on_ack(received, durable, now);
    if l.rep.phase() == Phase::Streaming && !l.announced_up_to_date {
        // Lock order is meta → link everywhere: read the generation without
        // holding the link, then look again.
        drop(l);
        let g = vol
            .meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state()
            .generation
            .current();
        l = vol.link.lock();
        if l.rep.phase() != Phase::Streaming || l.announced_up_to_date {
            let done = vol.link.wake_acked(&mut l);
            drop(l);
            vol.finish_confirmed(done);
            return;
        }
        if let Some(seq) = l.rep.announce_up_to_date(now) {
            l.queue.push_back(Out::Flush {
                seq,
                up_to_date_generation: Some(g),
                snapshot: false,
            });
            l.announced_up_to_date = true;
            tracing::info!(volume = %vol.name, "replication.resync.done: peer up to date");
        }
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
