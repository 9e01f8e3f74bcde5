//! A share's link: the primary's side (connect, resync, stream, acks) and the
//! replica's side (apply in order, make flushes durable, answer manifest
//! requests).
//!
//! ```text
//!  primary                                         replica
//!   ShareHello{share, id, generation}        ─▶
//!                                            ◀─  HelloReply{generation it is up to date at, or 0}
//!   ManifestRequest{path}  (resync)          ─▶  (in stream order)
//!                                            ◀─  Manifest{entries}…
//!   FileOp… (differences, then live ops)     ─▶  applied in order
//!   Flush{UP_TO_DATE, generation}            ─▶  syncfs, record "up to date"
//!                                            ◀─  Ack{received, durable}
//! ```
//!
//! Resync compares the replica's manifest with the primary's tree: entries
//! with another type, size, mtime, mode or owner are sent again (files whole,
//! in chunks), entries the primary lacks are removed. Live operations go on
//! meanwhile; the paths they touch are compared once more afterwards, until
//! none are left; then the replica is declared up to date. After an outage
//! only the journal's paths are compared — unless either side stopped
//! uncleanly, which makes the whole tree the journal.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_wire::{
    EntryKind, FileOp, Kind, ManifestEntry, Owner, ShareHello, SharePath, StampedOp, Target,
    PROTOCOL_VERSION,
};

use super::inbox::{Inbox, Work};
use super::primary::{now_unix, PrimaryShare, Taken};
use super::tree::{FileCache, Tree};
use super::Host;
use crate::transport::tls_io::SharedTls;
use crate::volume::link::FLAG_UP_TO_DATE;

/// Bytes of file data per Write op while resyncing.
const RESYNC_CHUNK_BYTES: usize = 1 << 20;
/// Manifest entries per Manifest frame.
const MANIFEST_FRAME_ENTRIES: usize = 16_384;
/// Block sums per Sums frame (20 bytes each).
const SUMS_FRAME_ENTRIES: usize = 65_536;
/// Largest delta block a replica computes sums for.
const SUMS_BLOCK_BYTES_MAX: u32 = 1 << 20;
/// Resync passes over paths touched meanwhile before giving up the link (it
/// reconnects and tries again).
const RESYNC_PASSES_MAX: usize = 64;
/// Keep-alive ping interval.
const PING_INTERVAL_MS: u64 = 200;

/// Runs the primary's link to `peer` until the share stops replicating.
pub fn run<H: Host + ?Sized>(share: Arc<PrimaryShare>, ctx: Arc<H>, peer: String) {
    let mut backoff_ms = 100u64;
    let max_ms = ctx.link_settings().reconnect_backoff_max_ms;
    loop {
        if share.link().stop {
            return;
        }
        match connect_and_serve(&share, &ctx, &peer) {
            Ok(()) => backoff_ms = 100,
            Err(e) => {
                let msg = format!("{e:#}");
                share.link().last_error = Some(msg.clone());
                tracing::warn!(share = %share.name, peer = %peer, error = %msg, "share.link.failed");
            }
        }
        share.link_lost("link closed");
        if share.link().stop {
            return;
        }
        std::thread::sleep(Duration::from_millis(backoff_ms));
        backoff_ms = (backoff_ms * 2).min(max_ms.max(100));
    }
}

fn connect_and_serve(share: &Arc<PrimaryShare>, ctx: &dyn Host, peer_name: &str) -> Result<()> {
    let (peer, mut tls) = ctx.dialer().connect(peer_name)?;
    let (id, mode) = {
        let r = share.rec.lock().unwrap_or_else(|p| p.into_inner());
        (r.id.clone(), r.mode.clone())
    };
    let generation = share.generation();
    let hello = ShareHello {
        protocol_versions: vec![PROTOCOL_VERSION],
        node_name: ctx.node_name().to_string(),
        share: share.name.clone(),
        share_id: id,
        generation,
        ancestors: vec![],
        mode,
        path: share
            .rec
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .path
            .to_string_lossy()
            .into_owned(),
    };
    tls.write_all(&ferry_wire::encode_frame(
        Kind::ShareHello,
        0,
        0,
        &hello.to_bytes(),
    ))?;
    tls.flush()?;
    let max = ctx.link_settings().frame_bytes_max;
    let mut body = Vec::new();
    let hdr = ferry_wire::read_frame(&mut tls, max, &mut body)
        .with_context(|| format!("{} did not answer the handshake", peer.name))?;
    if hdr.kind != Kind::HelloReply {
        bail!("expected HelloReply, got {:?}", hdr.kind);
    }
    let reply = ferry_wire::HelloReply::from_bytes(&body[..hdr.len as usize])?;
    if let Some(why) = reply.refused {
        bail!("{} refused share {:?}: {why}", peer.name, share.name);
    }
    if reply.node_name != peer.name {
        bail!(
            "peer calls itself {:?}, expected {:?}",
            reply.node_name,
            peer.name
        );
    }
    let leftover = leftover_plaintext(tls.conn.reader());
    let rustls::StreamOwned { conn, sock } = tls;
    // The replica answers every ping (PING_INTERVAL_MS): silence past
    // peer_ack_timeout_ms is a dead or cut-off peer (invariant 1: a stalled
    // replica cannot hold the primary's calls forever; a silently dropped
    // connection would otherwise only fail after TCP's retransmissions).
    let silent_ms = ctx
        .link_settings()
        .peer_ack_timeout_ms
        .max(PING_INTERVAL_MS * 3);
    sock.set_read_timeout(Some(Duration::from_millis(silent_ms)))?;
    let wire = Arc::new(SharedTls::new(conn, &sock)?);
    let ctl = sock.try_clone()?;
    tracing::info!(share = %share.name, peer = %peer.name, "share.link.up");
    share.link_up(wire.clone());

    let (man_tx, man_rx) = mpsc::channel::<(u64, Reply)>();
    std::thread::scope(|s| -> Result<()> {
        // Reader: acknowledgements and manifests.
        let reader = {
            let wire = wire.clone();
            let share = share.clone();
            let mut sock = sock.try_clone()?;
            std::thread::Builder::new()
                .name(format!("share-ack-{}", share.name))
                .spawn_scoped(s, move || {
                    let r = read_replies(&share, &wire, &mut sock, leftover, max, &man_tx)
                        .map_err(|e| match e.downcast_ref::<std::io::Error>().map(|e| e.kind()) {
                            Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => anyhow!(
                                "the replica sent nothing for {silent_ms} ms (replication.peer_ack_timeout_ms)"
                            ),
                            _ => e,
                        });
                    if r.is_err() {
                        // Writers blocked on a dead connection wake up.
                        let _ = sock.shutdown(Shutdown::Both);
                    }
                    share.link_lost(&match &r {
                        Ok(()) => "the replica closed the link".to_string(),
                        Err(e) => format!("{e:#}"),
                    });
                    r
                })?
        };
        // Sender: queued frames no caller sent itself.
        let sender = {
            let share = share.clone();
            let ctl = ctl.try_clone()?;
            std::thread::Builder::new()
                .name(format!("share-out-{}", share.name))
                .spawn_scoped(s, move || {
                    while share.wait_frames() {
                        share.send_until_empty();
                    }
                    let _ = ctl.shutdown(Shutdown::Both);
                })?
        };
        let pinger = {
            let wire = wire.clone();
            let share = share.clone();
            std::thread::Builder::new()
                .name(format!("share-ping-{}", share.name))
                .spawn_scoped(s, move || loop {
                    std::thread::sleep(Duration::from_millis(PING_INTERVAL_MS));
                    {
                        let l = share.link();
                        if l.stop || !l.connected {
                            break;
                        }
                    }
                    let ping = ferry_wire::FrameHeader::new(Kind::Ping, 0, 0, 0).encode();
                    // Sent directly: a ping must not wait behind a large queue
                    // (SharedTls keeps records whole and in order).
                    if wire.send(&ping).is_err() {
                        break;
                    }
                })?
        };
        let resynced = resync(share, &man_rx, reply.generation).and_then(|()| {
            if share.mode_sync() {
                Ok(())
            } else {
                pump(share, &man_rx)
            }
        });
        if let Err(e) = &resynced {
            share.link_lost(&format!("resync failed: {e:#}"));
        }
        // Wait for the link to end.
        let _ = sender.join();
        let _ = ctl.shutdown(Shutdown::Both);
        let _ = pinger.join();
        let r = reader
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the reader panicked")));
        resynced.and(r)
    })
}

/// Plaintext rustls already decrypted past the handshake reply.
fn leftover_plaintext(mut reader: rustls::Reader<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    // Ends with WouldBlock once the buffered plaintext is read: what was read stays in `v`.
    let _ = reader.read_to_end(&mut v);
    v
}

fn read_replies(
    share: &PrimaryShare,
    wire: &SharedTls,
    sock: &mut TcpStream,
    leftover: Vec<u8>,
    max: u32,
    man_tx: &mpsc::Sender<(u64, Reply)>,
) -> Result<()> {
    let mut plain = leftover;
    let mut raw = vec![0u8; 256 * 1024];
    let mut partial: HashMap<u64, Reply> = HashMap::new();
    loop {
        let mut used = 0;
        while let Some((hdr, payload, len)) = ferry_wire::split_frame(&plain[used..], max)? {
            match hdr.kind {
                Kind::Ack => share.on_ack(hdr.seq, hdr.offset, hdr.flags & ACK_APPLIED != 0),
                Kind::Manifest | Kind::Sums => {
                    let part = if hdr.kind == Kind::Manifest {
                        Reply::Manifest(ferry_wire::decode_manifest(payload)?)
                    } else {
                        Reply::Sums(ferry_wire::decode_sums(payload)?)
                    };
                    let whole = match (partial.remove(&hdr.seq), part) {
                        (None, p) => p,
                        (Some(Reply::Manifest(mut a)), Reply::Manifest(b)) => {
                            a.extend(b);
                            Reply::Manifest(a)
                        }
                        (Some(Reply::Sums(mut a)), Reply::Sums(b)) => {
                            a.sums.extend(b.sums);
                            Reply::Sums(a)
                        }
                        _ => bail!("the replica mixed reply kinds for request {}", hdr.seq),
                    };
                    if hdr.flags & 1 == 0 {
                        let _ = man_tx.send((hdr.seq, whole));
                    } else {
                        partial.insert(hdr.seq, whole);
                    }
                }
                Kind::Ping => share.replica_free_report(hdr.offset),
                Kind::Failed => {
                    let p = SharePath::new(payload.to_vec())
                        .map_err(|e| anyhow!("bad path in a Failed frame: {e}"))?;
                    share.replica_failed(p);
                }
                Kind::Error => bail!("replica reported: {}", String::from_utf8_lossy(payload)),
                k => bail!("unexpected {k:?} frame from the replica"),
            }
            used += len;
        }
        plain.drain(..used);
        {
            let l = share.link();
            if l.stop || !l.connected {
                return Ok(());
            }
        }
        let n = match sock.read(&mut raw) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        wire.open(&raw[..n], &mut plain)?;
    }
}

/// A reply to a request the primary put on the stream.
#[derive(Debug)]
enum Reply {
    Manifest(Vec<ManifestEntry>),
    Sums(ferry_wire::FileSums),
}

type Replies = mpsc::Receiver<(u64, Reply)>;

/// Puts a request on the stream and waits for its reply.
fn request(share: &PrimaryShare, replies: &Replies, kind: Kind, payload: &[u8]) -> Result<Reply> {
    let seq = {
        let mut o = share.order();
        share
            .push_raw(&mut o, kind, payload)
            .ok_or_else(|| anyhow!("link lost"))?
    };
    loop {
        match replies.recv_timeout(Duration::from_millis(200)) {
            Ok((s, r)) if s == seq => return Ok(r),
            Ok(_) => continue,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !share.link().connected {
                    bail!("link lost waiting for the replica's reply");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("link lost waiting for the replica's reply")
            }
        }
    }
}

/// The replica's manifest of `path` (its subtree with `deep`).
fn request_manifest(
    share: &PrimaryShare,
    replies: &Replies,
    path: &SharePath,
    deep: bool,
) -> Result<Vec<ManifestEntry>> {
    let mut req = vec![u8::from(deep)];
    req.extend_from_slice(path.as_bytes());
    match request(share, replies, Kind::ManifestRequest, &req)? {
        Reply::Manifest(m) => Ok(m),
        Reply::Sums(_) => bail!("the replica answered a manifest request with sums"),
    }
}

/// The replica's block sums of the file at `path`.
fn request_sums(
    share: &PrimaryShare,
    replies: &Replies,
    path: &SharePath,
    block: u32,
) -> Result<ferry_wire::FileSums> {
    let mut req = block.to_le_bytes().to_vec();
    req.extend_from_slice(path.as_bytes());
    match request(share, replies, Kind::SumsRequest, &req)? {
        Reply::Sums(s) if s.block == block => Ok(s),
        _ => bail!("the replica answered a sums request with something else"),
    }
}

/// Seconds of slack below `level_at` for ctime comparisons (the kernel's
/// file times are coarse and clocks step).
const UNSURE_SLACK_S: i64 = 2;

/// One comparison pass: what to compare by content besides entries whose
/// type, size or mtime differ.
struct Pass<'a> {
    share: &'a PrimaryShare,
    replies: &'a Replies,
    /// Paths known to have changed: files among them are compared by content.
    force: &'a BTreeSet<SharePath>,
    /// Files whose ctime is at or after this unix second are compared by content.
    unsure_since: Option<i64>,
    /// Files compared by content go whole (exact even while live writes
    /// go on), not as deltas.
    whole: bool,
}

impl Pass<'_> {
    fn by_content(&self, e: &ManifestEntry, forced_links: &std::collections::HashSet<u64>) -> bool {
        if self.force.contains(&e.path) || (e.link_id != 0 && forced_links.contains(&e.link_id)) {
            return true;
        }
        let Some(since) = self.unsure_since else {
            return false;
        };
        self.share
            .tree
            .lstat(&Target::Path(e.path.clone()))
            .map(|st| st.st_ctime >= since)
            .unwrap_or(false)
    }

    /// Compares `deep` subtrees and `shallow` directories; `roots` cover
    /// the shallow ones already.
    fn run(&self, deep: &BTreeSet<SharePath>, shallow: &BTreeSet<SharePath>) -> Result<()> {
        let roots = minimal_roots(deep);
        for p in &roots {
            sync_subtree(self, p, true)?;
        }
        for p in shallow {
            if !roots.iter().any(|r| p.starts_with(r)) {
                sync_subtree(self, p, false)?;
            }
        }
        Ok(())
    }
}

fn resync(share: &Arc<PrimaryShare>, replies: &Replies, replica_generation: u64) -> Result<()> {
    let started = std::time::Instant::now();
    let started_unix = now_unix();
    // An async share's watcher sees nothing while the agent is down: every
    // start compares the whole tree (by content only what changed since the
    // replica was last level).
    let full = replica_generation != share.generation() || !share.mode_sync();
    let taken = share.journal_take();
    let r = resync_passes(share, replies, full, &taken);
    match r {
        Ok(passes) => {
            share.journal_compact();
            share.clear_level_exact();
            share.set_level_at(started_unix, true);
            tracing::info!(share = %share.name, full, passes, ms = started.elapsed().as_millis() as u64,
                files = share.stats.resync_files.load(Ordering::Relaxed), "share.resync.done");
            Ok(())
        }
        Err(e) => {
            share.journal_put_back(taken);
            Err(e)
        }
    }
}

fn resync_passes(
    share: &Arc<PrimaryShare>,
    replies: &Replies,
    full: bool,
    journal: &Taken,
) -> Result<usize> {
    let (mut todo, mut shallow, mut force) = if full {
        (
            [SharePath::root()].into(),
            BTreeSet::new(),
            journal.by_content.clone(),
        )
    } else {
        (
            journal.deep.clone(),
            journal.shallow.clone(),
            journal.by_content.clone(),
        )
    };
    let mut unsure_since =
        (full && !share.level_exact()).then(|| share.level_at() - UNSURE_SLACK_S);
    tracing::info!(share = %share.name, full, paths = todo.len(), "share.resync.start");
    let mut passes = 0;
    while !todo.is_empty() || !shallow.is_empty() {
        passes += 1;
        if passes > RESYNC_PASSES_MAX {
            bail!("paths kept changing through {RESYNC_PASSES_MAX} resync passes");
        }
        let pass = Pass {
            share,
            replies,
            force: &force,
            unsure_since,
            whole: passes > 1,
        };
        pass.run(&todo, &shallow)?;
        // Everything sent is applied (or reported failed) before the paths
        // to compare again are taken.
        if !share.wait_acked(share.last_seq()) {
            bail!("link lost during resync");
        }
        let mut l = share.link();
        if !l.connected {
            bail!("link lost during resync");
        }
        // Paths live operations touched meanwhile: their content may have
        // changed behind what the pass sent, so compare them by content.
        todo = std::mem::take(&mut l.again);
        shallow = std::mem::take(&mut l.again_shallow);
        force = std::mem::take(&mut l.again_by_content);
        todo.extend(force.iter().cloned());
        unsure_since = None;
        if todo.is_empty() && shallow.is_empty() {
            l.resyncing = false;
        }
    }
    // Everything up to here is level: make it durable and say so.
    let seq = {
        let mut o = share.order();
        share
            .push_flush(&mut o, true)
            .ok_or_else(|| anyhow!("link lost"))?
    };
    share.send_queued();
    let (tx, rx) = mpsc::channel();
    share.wait_durable(
        Some(seq),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => {
                r?;
                break;
            }
            Err(_) if !share.link().connected => bail!("link lost during resync"),
            Err(_) => {}
        }
    }
    let mut l = share.link();
    if !l.connected {
        bail!("link lost before the replica was up to date");
    }
    l.up_to_date = true;
    Ok(passes)
}

/// Async shares, once level: sends what the watcher reports, batch by
/// batch, until the link ends.
fn pump(share: &Arc<PrimaryShare>, replies: &Replies) -> Result<()> {
    loop {
        // Wait for changes.
        let (renames, unsure_since, since) = {
            let mut l = share.link();
            loop {
                if l.stop || !l.connected {
                    return Ok(());
                }
                if l.pending_since.is_some() {
                    break;
                }
                l = share
                    .cv
                    .wait_timeout(l, Duration::from_millis(200))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let since = l.pending_since.take();
            l.pass_since = since;
            (std::mem::take(&mut l.renames), l.unsure_since.take(), since)
        };
        let started_unix = now_unix();
        let taken = share.journal_take();
        let r = (|| -> Result<()> {
            for (from, to) in &renames {
                send_op(
                    share,
                    FileOp::Rename {
                        from: from.clone(),
                        to: to.clone(),
                        flags: 0,
                    },
                    vec![],
                )?;
            }
            // Renamed entries are compared where they landed (not by content:
            // a rename changes no data).
            let mut deep = taken.deep.clone();
            for (from, to) in &renames {
                deep.insert(from.clone());
                deep.insert(to.clone());
            }
            // A file with other names: its link group spans the tree, which
            // only a whole-tree comparison sees.
            let linked = deep.iter().any(|p| {
                share
                    .tree
                    .lstat(&Target::Path(p.clone()))
                    .is_ok_and(|st| st.st_mode & libc::S_IFMT != libc::S_IFDIR && st.st_nlink > 1)
            });
            if unsure_since.is_some() || linked {
                deep.insert(SharePath::root());
            }
            let pass = Pass {
                share,
                replies,
                force: &taken.by_content,
                unsure_since,
                whole: false,
            };
            let before = share.stats.resync_bytes.load(Ordering::Relaxed);
            pass.run(&deep, &taken.shallow)?;
            // What the application changed (a pass sends it like a resync).
            let sent = share
                .stats
                .resync_bytes
                .load(Ordering::Relaxed)
                .saturating_sub(before);
            share.stats.pumped_bytes.fetch_add(sent, Ordering::Relaxed);
            if !share.wait_acked(share.last_seq()) {
                bail!("link lost waiting for the replica");
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                share.journal_compact();
                let mut l = share.link();
                l.pass_since = None;
                let lag = since.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
                l.last_lag_ms = lag;
                l.lags_ms.push_back(lag);
                if l.lags_ms.len() > LAGS_KEPT {
                    l.lags_ms.pop_front();
                }
                let idle = l.pending_since.is_none();
                drop(l);
                if idle {
                    share.set_level_at(started_unix, false);
                }
            }
            Err(e) => {
                share.journal_put_back(taken);
                let ends: Vec<SharePath> = renames.into_iter().flat_map(|(a, b)| [a, b]).collect();
                share.journal_add(&ends);
                let mut l = share.link();
                l.pass_since = None;
                if let Some(u) = unsure_since {
                    l.unsure_since = Some(l.unsure_since.map_or(u, |x| x.min(u)));
                }
                return Err(e);
            }
        }
    }
}

/// Change-to-replica times kept for the status' percentiles.
const LAGS_KEPT: usize = 1024;

/// The paths of `set` not below another one of it.
fn minimal_roots(set: &BTreeSet<SharePath>) -> Vec<SharePath> {
    let mut out: Vec<SharePath> = Vec::new();
    for p in set {
        // BTreeSet order puts "a" before "a/b" (and before "a-b", which is not below it).
        if !out.iter().any(|r| p.starts_with(r)) {
            out.push(p.clone());
        }
    }
    out
}

fn entry_time(st: &libc::stat) -> ferry_wire::Time {
    ferry_wire::Time {
        secs: st.st_mtime,
        nanos: st.st_mtime_nsec as u32,
    }
}

/// Makes the replica's `path` (a subtree; with `deep` false, the entry
/// alone — a directory whose times changed) equal to the primary's.
fn sync_subtree(pass: &Pass<'_>, path: &SharePath, deep: bool) -> Result<()> {
    let share = pass.share;
    let theirs = request_manifest(share, pass.replies, path, deep)?;
    if !deep {
        let mine = share.tree.manifest_entry(path).ok();
        return match (mine, theirs.first()) {
            (None, _) => Ok(()), // gone here: its parent's resync removes it
            (Some(m), Some(t)) if m.kind == t.kind => fix_attrs(share, &m, Some(t)),
            _ => sync_subtree(pass, path, true),
        };
    }
    let theirs: HashMap<SharePath, ManifestEntry> =
        theirs.into_iter().map(|e| (e.path.clone(), e)).collect();
    let crate::share::tree::Manifest {
        entries: mine,
        unlisted,
    } = share
        .tree
        .manifest_lenient(path)
        .with_context(|| format!("cannot walk {}", path.display()))?;
    // Directories this agent may not list: reported; what the replica holds
    // below them stays (nothing here says it is gone).
    let unlisted: Vec<SharePath> = unlisted
        .into_iter()
        .map(|(dir, e)| unreadable(share, &dir, e).map(|()| dir))
        .collect::<Result<_>>()?;
    let hidden = |p: &SharePath| unlisted.iter().any(|d| p != d && p.starts_with(d));
    let mine_paths: BTreeSet<&SharePath> = mine.iter().map(|e| &e.path).collect();
    // Directories whose entries this pass changed on the replica: their
    // times there are new, whatever the manifest said.
    let mut changed_dirs: std::collections::HashSet<SharePath> = Default::default();
    // Entries the replica has and the primary does not: remove (the top-most).
    let mut gone: Vec<&SharePath> = theirs
        .keys()
        .filter(|p| !mine_paths.contains(p) && !hidden(p))
        .collect();
    gone.sort();
    let mut removed: Vec<SharePath> = Vec::new();
    for p in gone {
        if removed.iter().any(|r| p.starts_with(r)) {
            continue;
        }
        entry_op(
            share,
            FileOp::RemoveTree { path: p.clone() },
            &mut changed_dirs,
        )?;
        removed.push(p.clone());
    }
    // A hard-link group changed through any of its names is compared by content.
    let forced_links: std::collections::HashSet<u64> = mine
        .iter()
        .filter(|e| e.link_id != 0 && pass.force.contains(&e.path))
        .map(|e| e.link_id)
        .collect();
    // Hard links: the first path seen of each primary inode, and its replica link id.
    let mut first_link: HashMap<u64, (SharePath, u64)> = HashMap::new();
    let mut dirs = Vec::new();
    for e in &mine {
        let t = theirs.get(&e.path);
        if e.link_id != 0 {
            if let Some((first, their_id)) = first_link.get(&e.link_id) {
                let same = t.is_some_and(|t| t.link_id != 0 && t.link_id == *their_id);
                if !same {
                    let link = FileOp::Link {
                        existing: first.clone(),
                        new: e.path.clone(),
                    };
                    replace_entry(share, &e.path, link, &mut changed_dirs)?;
                }
                continue;
            }
            first_link.insert(
                e.link_id,
                (e.path.clone(), t.map(|t| t.link_id).unwrap_or(0)),
            );
        }
        let same_kind = t.is_some_and(|t| match (&t.kind, &e.kind) {
            (EntryKind::File { .. }, EntryKind::File { .. }) => true,
            (EntryKind::Dir, EntryKind::Dir) => true,
            (EntryKind::Symlink { target: a }, EntryKind::Symlink { target: b }) => a == b,
            (EntryKind::Special { rdev: a }, EntryKind::Special { rdev: b }) => {
                a == b && t.mode & libc::S_IFMT == e.mode & libc::S_IFMT
            }
            _ => false,
        });
        let owner = Owner {
            uid: e.uid,
            gid: e.gid,
        };
        let mut rewritten = false;
        let mut attrs_sent = false;
        match &e.kind {
            EntryKind::Dir => {
                if !same_kind && !e.path.is_root() {
                    entry_op(
                        share,
                        FileOp::Mkdir {
                            path: e.path.clone(),
                            mode: e.mode & 0o7777,
                            owner,
                        },
                        &mut changed_dirs,
                    )?;
                }
                dirs.push(e);
            }
            EntryKind::File { .. } => {
                let looks_same =
                    same_kind && t.is_some_and(|t| t.kind == e.kind && t.mtime == e.mtime);
                if !same_kind {
                    changed_dirs.extend(e.path.split_last().map(|(d, _)| d));
                    match send_file(share, &e.path, false, e.mode, owner)? {
                        Sent::Whole => attrs_sent = true,
                        Sent::Content => {}
                        Sent::Nothing => continue,
                    }
                } else if pass.whole && pass.force.contains(&e.path) {
                    if send_file(share, &e.path, true, e.mode, owner)? == Sent::Nothing {
                        continue;
                    }
                    rewritten = true;
                } else if !looks_same || pass.by_content(e, &forced_links) {
                    send_delta(pass, &e.path, e.mode, owner)?;
                    rewritten = true;
                }
            }
            EntryKind::Symlink { target } => {
                if !same_kind {
                    entry_op(
                        share,
                        FileOp::Symlink {
                            path: e.path.clone(),
                            target: target.clone(),
                            owner,
                        },
                        &mut changed_dirs,
                    )?;
                }
            }
            EntryKind::Special { rdev } => {
                if !same_kind {
                    let node = FileOp::Mknod {
                        path: e.path.clone(),
                        mode: e.mode,
                        rdev: *rdev,
                        owner,
                    };
                    replace_entry(share, &e.path, node, &mut changed_dirs)?;
                }
            }
        }
        if !matches!(e.kind, EntryKind::Dir) && !attrs_sent {
            // What the replica had before a rewrite says nothing of its times now.
            fix_attrs(share, e, if rewritten || !same_kind { None } else { t })?;
        }
    }
    // Directories last, deepest first: their times change as children come and go.
    for e in dirs.iter().rev() {
        let t = theirs
            .get(&e.path)
            .filter(|_| !changed_dirs.contains(&e.path));
        fix_attrs(share, e, t)?;
    }
    // The subtree's own parent, when an entry was made or removed in it (a
    // file that was there all along but is new to the replica, say).
    for d in changed_dirs.iter().filter(|d| !d.starts_with(path)) {
        if let Ok(m) = share.tree.manifest_entry(d) {
            fix_attrs(share, &m, None)?;
        }
    }
    Ok(())
}

/// Sends mode/owner/mtime where the replica's differ (taken from the
/// primary's current state, under the order lock).
fn fix_attrs(share: &PrimaryShare, e: &ManifestEntry, t: Option<&ManifestEntry>) -> Result<()> {
    let mut o = share.order();
    let target = Target::Path(e.path.clone());
    let Ok(st) = share.tree.lstat(&target) else {
        return Ok(()); // gone meanwhile: the live op that removed it is on the stream
    };
    let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
    let t_mode = t.map(|t| t.mode & 0o7777);
    let t_owner = t.map(|t| (t.uid, t.gid));
    let t_mtime = t.map(|t| t.mtime);
    let mode = (!is_link && t_mode != Some(st.st_mode & 0o7777)).then_some(st.st_mode & 0o7777);
    let owner_differs = t_owner != Some((st.st_uid, st.st_gid));
    let mtime = entry_time(&st);
    if mode.is_none() && !owner_differs && t_mtime == Some(mtime) {
        return Ok(());
    }
    let op = FileOp::SetAttr {
        target,
        mode,
        uid: owner_differs.then_some(st.st_uid),
        gid: owner_differs.then_some(st.st_gid),
        atime: None,
        mtime: Some(mtime),
    };
    share
        .push_resync(&mut o, op, vec![])
        .ok_or_else(|| anyhow!("link lost"))?;
    Ok(())
}

/// Sends an op that adds or removes an entry, noting the directories it changes.
fn entry_op(
    share: &PrimaryShare,
    op: FileOp,
    changed_dirs: &mut std::collections::HashSet<SharePath>,
) -> Result<()> {
    changed_dirs.extend(op.parents());
    send_op(share, op, vec![])
}

/// Whatever the replica has at `path` goes, then `op` makes the entry.
fn replace_entry(
    share: &PrimaryShare,
    path: &SharePath,
    op: FileOp,
    changed_dirs: &mut std::collections::HashSet<SharePath>,
) -> Result<()> {
    let remove = FileOp::RemoveTree { path: path.clone() };
    entry_op(share, remove, changed_dirs)?;
    entry_op(share, op, changed_dirs)
}

fn send_op(share: &PrimaryShare, op: FileOp, stamps: Vec<ferry_wire::Stamp>) -> Result<()> {
    let mut o = share.order();
    share
        .push_resync(&mut o, op, stamps)
        .ok_or_else(|| anyhow!("link lost"))?;
    Ok(())
}

/// Files smaller than this are sent whole rather than as a delta (a delta
/// costs a round trip and the replica's read of the file).
const DELTA_MIN_BYTES: u64 = 64 * 1024;

/// Sends a file the replica has in an older version: only the blocks that
/// differ (rsync's algorithm, applied in place on the replica: inode, hard
/// links and xattrs stay).
fn send_delta(pass: &Pass<'_>, path: &SharePath, mode: u32, owner: Owner) -> Result<()> {
    let share = pass.share;
    let target = Target::Path(path.clone());
    let f = match share.tree.open_file(&target, libc::O_RDONLY, 0) {
        Ok(f) => f,
        Err(e) => return unreadable(share, path, e),
    };
    let size = f.metadata()?.len();
    if size < DELTA_MIN_BYTES {
        return send_file(share, path, true, mode, owner).map(drop);
    }
    let block = ferry_core::delta::block_size_for(size);
    let sums = request_sums(share, pass.replies, path, block)?;
    let Some(their_size) = sums.size else {
        // Not a file there any more: the ops that changed it are on the stream.
        return send_file(share, path, false, mode, owner).map(drop);
    };
    if their_size == 0 {
        return send_file(share, path, true, mode, owner).map(drop);
    }
    share.stats.resync_files.fetch_add(1, Ordering::Relaxed);
    // A live operation on the file from here on may land between blocks the
    // delta reuses: noticed below, and the file goes whole next pass.
    share.link().again.remove(path);
    let stats = ferry_core::delta::diff(
        &sums.sums,
        block as usize,
        &f,
        super::tree::strong_hash,
        RESYNC_CHUNK_BYTES,
        |piece| -> Result<()> {
            let op = match piece {
                ferry_core::delta::Piece::Data { to, data } => {
                    share
                        .stats
                        .resync_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    FileOp::Write {
                        target: target.clone(),
                        offset: to,
                        data,
                    }
                }
                ferry_core::delta::Piece::Copy { from, to, len } => FileOp::CopyWithin {
                    target: target.clone(),
                    from,
                    to,
                    len,
                },
            };
            send_op(share, op, vec![])?;
            pace(share);
            Ok(())
        },
    )
    .map_err(|e| match e {
        ferry_core::delta::DiffError::Read(e) => anyhow!("reading {}: {e}", path.display()),
        ferry_core::delta::DiffError::Emit(e) => e,
    })?;
    share
        .stats
        .delta_reused_bytes
        .fetch_add(stats.kept_bytes + stats.moved_bytes, Ordering::Relaxed);
    {
        let mut l = share.link();
        if l.resyncing && l.again.contains(path) {
            l.again_by_content.insert(path.clone());
        }
    }
    if stats.size != their_size {
        send_op(
            share,
            FileOp::Truncate {
                target,
                size: stats.size,
            },
            vec![],
        )?;
    }
    Ok(())
}

/// A file the primary cannot read: reported (status, log), not fatal.
fn unreadable(share: &PrimaryShare, path: &SharePath, e: std::io::Error) -> Result<()> {
    if e.raw_os_error() != Some(libc::ENOENT) {
        share.stats.unreadable.fetch_add(1, Ordering::Relaxed);
        let msg = format!("cannot read {}: {e}", path.display());
        tracing::warn!(share = %share.name, error = %msg, "share.file.unreadable");
        share.link().last_error = Some(msg);
    }
    // Gone meanwhile: the change that removed it is (or will be) on the stream.
    Ok(())
}

/// Waits while a lot is in flight (the async backlog, sync pacing).
fn pace(share: &PrimaryShare) {
    let mut l = share.link();
    while l.connected && l.inflight_bytes > 32 * RESYNC_CHUNK_BYTES as u64 {
        l = share
            .cv
            .wait_timeout(l, Duration::from_millis(50))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// What [`send_file`] sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Content, mode, owner and times, in one op.
    Whole,
    /// The content; attributes are the caller's to send.
    Content,
    /// Nothing: the file cannot be read here (reported); the replica's
    /// entry, if any, is left as it is.
    Nothing,
}

/// Sends a file's content: recreated (or truncated when it exists as a file
/// on the replica), then in chunks read under the order lock, so live writes
/// interleave in the right order.
fn send_file(
    share: &PrimaryShare,
    path: &SharePath,
    exists_as_file: bool,
    mode: u32,
    owner: Owner,
) -> Result<Sent> {
    let target = Target::Path(path.clone());
    let f = match share.tree.open_file(&target, libc::O_RDONLY, 0) {
        Ok(f) => f,
        Err(e) => return unreadable(share, path, e).map(|()| Sent::Nothing),
    };
    if !exists_as_file && put_whole(share, path, &f)? {
        return Ok(Sent::Whole);
    }
    {
        let mut o = share.order();
        let op = if exists_as_file {
            FileOp::Truncate {
                target: target.clone(),
                size: 0,
            }
        } else {
            FileOp::Create {
                path: path.clone(),
                mode: mode & 0o7777,
                owner,
            }
        };
        share
            .push_resync(&mut o, op, vec![])
            .ok_or_else(|| anyhow!("link lost"))?;
    }
    share.stats.resync_files.fetch_add(1, Ordering::Relaxed);
    let mut buf = vec![0u8; RESYNC_CHUNK_BYTES];
    let mut off = 0u64;
    loop {
        let mut o = share.order();
        // Holes stay holes: skip to the next data.
        // SAFETY: valid descriptor; lseek with SEEK_DATA only reads the offset.
        let data = unsafe {
            libc::lseek(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                off as i64,
                libc::SEEK_DATA,
            )
        };
        if data < 0 {
            // ENXIO: no data past `off`: set the size (a trailing hole).
            // SAFETY: zeroed `stat` is a valid out-parameter.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid descriptor and out pointer.
            if unsafe { libc::fstat(std::os::fd::AsRawFd::as_raw_fd(&f), &mut st) } == 0
                && st.st_size as u64 > off
            {
                share
                    .push_resync(
                        &mut o,
                        FileOp::Truncate {
                            target: target.clone(),
                            size: st.st_size as u64,
                        },
                        vec![],
                    )
                    .ok_or_else(|| anyhow!("link lost"))?;
            }
            break;
        }
        off = data as u64;
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        share
            .push_resync(
                &mut o,
                FileOp::Write {
                    target: target.clone(),
                    offset: off,
                    data: buf[..n].to_vec(),
                },
                vec![],
            )
            .ok_or_else(|| anyhow!("link lost"))?;
        share
            .stats
            .resync_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        off += n as u64;
        drop(o);
        pace(share);
    }
    Ok(Sent::Content)
}

/// Files up to this size without holes go in one op when new on the replica.
const PUT_FILE_BYTES_MAX: u64 = 1 << 20;

/// A small new file in one `PutFile` op (content, mode, owner and mtime read
/// under the order lock: one consistent state). False when it does not
/// qualify (larger, or sparse).
fn put_whole(share: &PrimaryShare, path: &SharePath, f: &std::fs::File) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let mut o = share.order();
    let m = f.metadata()?;
    if m.len() > PUT_FILE_BYTES_MAX || m.blocks() * 512 < m.len() {
        return Ok(false);
    }
    let mut data = vec![0u8; m.len() as usize];
    let mut got = 0;
    while got < data.len() {
        match f.read_at(&mut data[got..], got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    data.truncate(got);
    share
        .stats
        .resync_bytes
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    let op = FileOp::PutFile {
        path: path.clone(),
        mode: m.mode() & 0o7777,
        owner: Owner {
            uid: m.uid(),
            gid: m.gid(),
        },
        mtime: ferry_wire::Time {
            secs: m.mtime(),
            nanos: m.mtime_nsec() as u32,
        },
        data,
    };
    share
        .push_resync(&mut o, op, vec![])
        .ok_or_else(|| anyhow!("link lost"))?;
    drop(o);
    share.stats.resync_files.fetch_add(1, Ordering::Relaxed);
    pace(share);
    Ok(true)
}

// ---------------------------------------------------------------- replica side

/// A share replica's on-disk state while a link applies to it.
pub fn serve_replica(
    ctx: &dyn Host,
    peer_name: &str,
    hello: ShareHello,
    mut tls: rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    control: TcpStream,
) -> Result<()> {
    let me = ctx.node_name().to_string();
    let store = super::ShareStore::new(ctx.data_dir());
    let refuse = |tls: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
                  why: String| {
        crate::transport::inbound::refuse(tls, &me, why)
    };
    if !hello.protocol_versions.contains(&PROTOCOL_VERSION) {
        return refuse(
            &mut tls,
            format!(
                "protocol versions {:?} not supported",
                hello.protocol_versions
            ),
        );
    }
    let share_name = match super::check_name(&hello.share) {
        Ok(n) => n,
        Err(e) => return refuse(&mut tls, e.to_string()),
    };
    let _guard = match ctx.shares().claim_replica(&hello.share) {
        Some(g) => g,
        None => {
            return refuse(
                &mut tls,
                format!(
                    "share {:?} is primary here or already has a link",
                    hello.share
                ),
            )
        }
    };
    let mut rec = match store.load(&hello.share) {
        Ok(r) => r,
        Err(super::ShareError::NotFound(_)) => {
            let r = super::ShareRecord {
                name: share_name.clone(),
                id: hello.share_id.clone(),
                mode: hello.mode.clone(),
                path: if hello.path.starts_with('/') {
                    std::path::PathBuf::from(&hello.path)
                } else {
                    store.data_dir(&share_name)
                },
                role: "replica".into(),
                peer: Some(peer_name.to_string()),
                generation: 0,
                clean: true,
                level_at: 0,
                received_at: 0,
                suspect_since: None,
                level_exact: false,
                bind_data: false,
            };
            if let Err(e) = store.create(&r) {
                return refuse(&mut tls, e.to_string());
            }
            r
        }
        Err(e) => return refuse(&mut tls, e.to_string()),
    };
    if rec.role != "replica" {
        return refuse(
            &mut tls,
            format!("share {:?} is primary on {me}", hello.share),
        );
    }
    if rec.id != hello.share_id {
        return refuse(
            &mut tls,
            format!(
                "share {:?} here has another identity (a different share of the same name)",
                hello.share
            ),
        );
    }
    let tree = Tree::open(&store.data_dir(&rec.name), &store.orphans_dir(&rec.name))?.for_replica();
    let their_gen = rec.generation;
    // From here until the primary declares it up to date, the copy is not one.
    rec.generation = 0;
    rec.peer = Some(peer_name.to_string());
    rec.mode = hello.mode.clone();
    store.save(&rec)?;
    ctx.shares().set_replica_state(&rec.name, false, None);
    let reply = ferry_wire::HelloReply {
        protocol_version: PROTOCOL_VERSION,
        node_name: me.clone(),
        refused: None,
        generation: their_gen,
        ancestors: vec![],
        dirty_map: None,
    };
    tls.write_all(&ferry_wire::encode_frame(
        Kind::HelloReply,
        0,
        0,
        &reply.to_bytes(),
    ))?;
    tls.flush()?;
    tracing::info!(share = %rec.name, peer = %peer_name, "share.inbound.up");
    let leftover = leftover_plaintext(tls.conn.reader());
    let rustls::StreamOwned { conn, mut sock } = tls;
    control.set_read_timeout(None)?;
    let wire = SharedTls::new(conn, &sock)?;
    let max = ctx.link_settings().frame_bytes_max;
    let r = apply_stream(
        ctx, &store, &mut rec, &tree, &wire, &mut sock, leftover, max,
    );
    if let Err(e) = &r {
        let msg = format!("{e:#}");
        ctx.shares()
            .set_replica_state(&rec.name, false, Some(msg.clone()));
        let _ = wire.send(&ferry_wire::encode_frame(Kind::Error, 0, 0, msg.as_bytes()));
    }
    let _ = control.shutdown(Shutdown::Both);
    r
}

/// Ack flag: `seq` is applied, not only received (the apply thread's acks).
pub const ACK_APPLIED: u16 = 1;

/// Flush flag (beside `FLAG_UP_TO_DATE`, `FLAG_SNAPSHOT`): an fdatasync —
/// the replica syncs the data of the files it covers, not their times.
pub const FLAG_DATA_ONLY: u16 = 4;

/// File data applied after which the apply thread acknowledges it even
/// while more is queued.
const APPLIED_ACK_BYTES: u64 = 4 << 20;

/// ...or this many items (a stream of metadata ops).
const APPLIED_ACK_ITEMS: u64 = 256;

/// Serves an inbound link: this thread receives, queues and acknowledges
/// receipt; a second thread applies in order (see [`super::inbox`]). Small
/// ops and flushes that find the inbox idle are applied on the receive
/// thread itself (no wake-up of the other).
#[allow(clippy::too_many_arguments)]
fn apply_stream(
    ctx: &dyn Host,
    store: &super::ShareStore,
    rec: &mut super::ShareRecord,
    tree: &Tree,
    wire: &SharedTls,
    sock: &mut TcpStream,
    leftover: Vec<u8>,
    max: u32,
) -> Result<()> {
    let name = rec.name.clone();
    let inbox = Arc::new(Inbox::new(
        ctx.share_settings().replica_apply_queue_bytes_max,
    ));
    ctx.shares().set_inbox(&name, Some(inbox.clone()));
    let durable = AtomicU64::new(0);
    let applier = Mutex::new(Applier {
        ctx,
        store,
        rec,
        tree,
        wire,
        durable: &durable,
        files: FileCache::default(),
        since_flush: Unflushed::default(),
        failures: 0,
        applied: 0,
        acked: 0,
        unacked_bytes: 0,
        unacked_items: 0,
        link_gone: false,
    });
    let ctl = sock.try_clone()?;
    let r = std::thread::scope(|s| -> Result<()> {
        let thread = std::thread::Builder::new()
            .name(format!("share-apply-{name}"))
            .spawn_scoped(s, || {
                let r = apply_inbox(&applier, &inbox);
                if let Err(e) = &r {
                    // What is queued was acknowledged and will not be
                    // applied: not an up-to-date copy any more (first).
                    let why = format!("{e:#}");
                    lock(&applier).outdate(&why);
                    // Nothing more is taken; the receive side stops reading.
                    inbox.discard(&why);
                    let _ = ctl.shutdown(Shutdown::Both);
                }
                r
            })?;
        // What was received (and acknowledged) is applied before the link
        // ends — also when this side fails or panics (it applied nothing
        // out of order): the apply thread drains the inbox, then stops.
        let received = {
            let _end = EndInbox(&inbox);
            receive_stream(
                ctx, &name, wire, sock, leftover, max, tree, &inbox, &applier, &durable,
            )
        };
        let applied = thread
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the apply thread panicked")));
        // The apply thread's failure is the cause (it shut the socket down).
        applied.and(received)
    });
    ctx.shares().set_inbox(&name, None);
    r
}

/// Bytes an op may take on the replica's filesystem (written data, or an
/// allocating fallocate's length): the free-space report leaves out what
/// is still queued.
fn space_bytes(op: &FileOp) -> u64 {
    match op {
        FileOp::Fallocate { mode, length, .. }
            if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_COLLAPSE_RANGE) == 0 =>
        {
            *length
        }
        _ => op.data_bytes(),
    }
}

/// Ends an inbox when dropped (the receive side returned or unwound).
struct EndInbox<'a>(&'a Inbox);

impl Drop for EndInbox<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Ops carrying at most this much file data (and flushes) are applied on
/// the receive thread when the inbox is idle.
const INLINE_APPLY_BYTES_MAX: u64 = 64 * 1024;

/// The receive side of [`apply_stream`]: frames go to the inbox in order
/// (or, small and finding it idle, are applied here); each batch read with
/// ops or pings is acknowledged as received, after a free-space report that
/// leaves out the file data still to be written.
#[allow(clippy::too_many_arguments)]
fn receive_stream(
    ctx: &dyn Host,
    name: &str,
    wire: &SharedTls,
    sock: &mut TcpStream,
    leftover: Vec<u8>,
    max: u32,
    tree: &Tree,
    inbox: &Inbox,
    applier: &Mutex<Applier<'_>>,
    durable: &AtomicU64,
) -> Result<()> {
    let receipt = |received: u64| send_receipt(wire, tree, inbox, received, durable);
    let mut plain = leftover;
    let mut raw = vec![0u8; 1 << 20];
    let mut received = 0u64;
    let mut acked = 0u64;
    loop {
        if ctx.shares().primary(name).is_some() {
            bail!("share {name:?} was promoted here: the old primary's stream ends");
        }
        let mut used = 0;
        // Ops or pings came: answered with a receipt (pings keep the link
        // alive and fetch the free-space report).
        let mut answer = false;
        let mut applied_here = false;
        while let Some((hdr, payload, len)) = ferry_wire::split_frame(&plain[used..], max)? {
            used += len;
            let (work, data) = match hdr.kind {
                Kind::Ping => {
                    answer = true;
                    continue;
                }
                Kind::FileOp => {
                    let op = StampedOp::decode(payload)?;
                    let data = space_bytes(&op.op);
                    answer = true;
                    (Work::Op { seq: hdr.seq, op }, data)
                }
                // Answered by the apply side (durable ack, manifest, sums).
                Kind::Flush | Kind::ManifestRequest | Kind::SumsRequest => (
                    Work::Frame {
                        hdr,
                        payload: payload.to_vec(),
                    },
                    0,
                ),
                k => bail!("unexpected {k:?} frame on a share link"),
            };
            received = hdr.seq;
            let small = match &work {
                Work::Op { .. } => data <= INLINE_APPLY_BYTES_MAX,
                Work::Frame { hdr, .. } => hdr.kind == Kind::Flush,
            };
            // Only this thread queues: idle now, it can claim the apply side.
            let inline = small && inbox.is_idle();
            if inline && matches!(work, Work::Frame { .. }) && answer && received > acked {
                // A flush waits for the device: what came before it is
                // acknowledged as received first.
                receipt(received)?;
                acked = received;
                answer = false;
            }
            if inline && inbox.claim_idle() {
                let r = {
                    let mut ap = lock(applier);
                    let r = ap.apply(work);
                    if let Err(e) = &r {
                        ap.outdate(&format!("{e:#}"));
                    }
                    r
                };
                inbox.applied();
                r?;
                applied_here = true;
            } else {
                inbox
                    .push(work, len as u64, data)
                    .map_err(|why| anyhow!("{why}"))?;
            }
        }
        plain.drain(..used);
        if answer {
            receipt(received)?;
            acked = received;
        }
        if applied_here && inbox.is_idle() {
            lock(applier).ack_applied();
        }
        let n = match sock.read(&mut raw) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        wire.open(&raw[..n], &mut plain)?;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The free-space report (first: the primary has it before the ack that
/// answers what freed or took it; it leaves out the file data still queued)
/// and the receipt ack, in one send: one record, one wake-up over there.
fn send_receipt(
    wire: &SharedTls,
    tree: &Tree,
    inbox: &Inbox,
    received: u64,
    durable: &AtomicU64,
) -> Result<()> {
    let mut out = Vec::with_capacity(2 * ferry_wire::HEADER_BYTES);
    if let Some(free) = tree.free_bytes() {
        let free = free.saturating_sub(inbox.pending_data_bytes());
        out.extend_from_slice(&ferry_wire::FrameHeader::new(Kind::Ping, 0, free, 0).encode());
    }
    let d = durable.load(Ordering::Acquire);
    out.extend_from_slice(&ferry_wire::FrameHeader::new(Kind::Ack, received, d, 0).encode());
    wire.send(&out)?;
    Ok(())
}

/// Acknowledges everything up to `seq` as applied (and `durable`).
fn send_applied(wire: &SharedTls, seq: u64, durable: u64) -> Result<()> {
    let mut h = ferry_wire::FrameHeader::new(Kind::Ack, seq, durable, 0);
    h.flags = ACK_APPLIED;
    wire.send(&h.encode())?;
    Ok(())
}

/// The apply side of [`apply_stream`]: applies the inbox in order and
/// acknowledges what it applied whenever the inbox runs dry (or every
/// [`APPLIED_ACK_BYTES`]).
fn apply_inbox(applier: &Mutex<Applier<'_>>, inbox: &Inbox) -> Result<()> {
    loop {
        let work = match inbox.try_pop() {
            Some(w) => w,
            None => {
                lock(applier).ack_applied();
                match inbox.pop() {
                    Some(w) => w,
                    None => return Ok(()),
                }
            }
        };
        let r = lock(applier).apply(work);
        inbox.applied();
        r?;
    }
}

/// What applying a replica's stream keeps between items (applied one at a
/// time, in stream order, on either thread of [`apply_stream`]).
struct Applier<'a> {
    ctx: &'a dyn Host,
    store: &'a super::ShareStore,
    rec: &'a mut super::ShareRecord,
    tree: &'a Tree,
    wire: &'a SharedTls,
    /// Flushed (durable) up to this seq.
    durable: &'a AtomicU64,
    files: FileCache,
    since_flush: Unflushed,
    failures: u64,
    /// Applied up to this seq; acknowledged as applied up to `acked`.
    applied: u64,
    acked: u64,
    unacked_bytes: u64,
    unacked_items: u64,
    /// A send failed: the link is gone, and what was received is still
    /// applied (it was acknowledged), without answers.
    link_gone: bool,
}

impl Applier<'_> {
    /// Sends an answer; once a send failed (the link is gone) nothing more
    /// is sent, and applying goes on.
    fn send(&mut self, send: impl FnOnce(&SharedTls) -> Result<()>) {
        if self.link_gone {
            return;
        }
        if let Err(e) = send(self.wire) {
            tracing::info!(share = %self.rec.name, error = %e, "share.replica.link_gone_applying_the_rest");
            self.link_gone = true;
        }
    }

    /// This copy is not up to date any more (what it acknowledged may not
    /// all be applied): recorded before anything else, in place when the
    /// disk is full.
    fn outdate(&mut self, why: &str) {
        self.ctx
            .shares()
            .set_replica_state(&self.rec.name, false, Some(why.to_string()));
        if self.rec.generation == 0 {
            return;
        }
        self.rec.generation = 0;
        if let Err(e) = self
            .store
            .save(self.rec)
            .or_else(|_| self.store.save_in_place(self.rec))
        {
            tracing::error!(share = %self.rec.name, error = %e, "share.replica.outdate_not_saved");
        }
    }

    /// Acknowledges what was applied since the last such ack.
    fn ack_applied(&mut self) {
        if self.applied > self.acked {
            let (seq, durable) = (self.applied, self.durable.load(Ordering::Acquire));
            self.send(|w| send_applied(w, seq, durable));
            self.acked = self.applied;
            self.unacked_bytes = 0;
            self.unacked_items = 0;
        }
    }

    /// Applies one item and acknowledges it when it was a flush (an fsync
    /// waits for it) or [`APPLIED_ACK_BYTES`] were applied since the last ack.
    fn apply(&mut self, work: Work) -> Result<()> {
        let (seq, bytes, flushed) = self.apply_one(work)?;
        self.applied = seq;
        self.unacked_bytes += bytes;
        self.unacked_items += 1;
        if flushed
            || self.unacked_bytes >= APPLIED_ACK_BYTES
            || self.unacked_items >= APPLIED_ACK_ITEMS
        {
            self.ack_applied();
        }
        Ok(())
    }

    /// Returns the item's seq, its file data bytes and whether it was a flush.
    fn apply_one(&mut self, work: Work) -> Result<(u64, u64, bool)> {
        let (ctx, store, tree) = (self.ctx, self.store, self.tree);
        let (hdr, payload) = match work {
            Work::Op { seq, op } => {
                self.since_flush.note(&op);
                let r = tree
                    .apply(&op.op, &mut self.files)
                    .and_then(|_| op.stamps.iter().try_for_each(|s| tree.set_stamp(s)));
                if let Err(e) = r {
                    let msg = format!("applying {:?} failed: {e}", op_name(&op.op));
                    if self.rec.generation != 0 && self.rec.mode == "sync" {
                        // An up-to-date copy of a sync share must take every op
                        // (an async share's watcher compares what it touched).
                        // It was acknowledged as received: from now on this is
                        // not an up-to-date copy (recorded before anything else).
                        self.outdate(&msg);
                        bail!("{msg}");
                    }
                    // Resyncing (or async): the primary compares what this
                    // touched again, by content.
                    self.failures += 1;
                    tracing::info!(share = %self.rec.name, error = %msg, "share.apply.failed_compared_again");
                    for p in op.op.touched() {
                        let f = ferry_wire::encode_frame(Kind::Failed, seq, 0, p.as_bytes());
                        self.send(|w| Ok(w.send(&f)?));
                    }
                }
                let bytes = op.op.data_bytes();
                ctx.shares().add_applied(&self.rec.name, bytes);
                return Ok((seq, bytes, false));
            }
            Work::Frame { hdr, payload } => (hdr, payload),
        };
        let rec = &mut *self.rec;
        let files = &mut self.files;
        match hdr.kind {
            Kind::Flush => {
                let full = hdr.flags & FLAG_UP_TO_DATE != 0;
                let data_only = hdr.flags & FLAG_DATA_ONLY != 0;
                self.since_flush
                    .make_durable(tree, files, full, data_only)?;
                files.clear();
                self.durable.store(hdr.seq, Ordering::Release);
                if full {
                    rec.generation = hdr.offset;
                    rec.suspect_since = None;
                    store.save(rec)?;
                    ctx.shares().set_replica_state(&rec.name, true, None);
                    tracing::info!(share = %rec.name, skipped = self.failures, "share.replica.up_to_date");
                }
                return Ok((hdr.seq, 0, true));
            }
            Kind::ManifestRequest => {
                let (deep, path) = payload
                    .split_first()
                    .ok_or_else(|| anyhow!("empty manifest request"))?;
                let path =
                    SharePath::new(path.to_vec()).map_err(|e| anyhow!("bad manifest path: {e}"))?;
                files.clear();
                let mut entries = if *deep == 1 {
                    tree.manifest(&path).unwrap_or_default()
                } else {
                    tree.manifest_entry(&path).into_iter().collect()
                };
                if let Some(since) = rec.suspect_since {
                    mark_suspects(tree, &mut entries, since);
                }
                let bodies: Vec<Vec<u8>> = if entries.is_empty() {
                    vec![ferry_wire::encode_manifest(&[])]
                } else {
                    entries
                        .chunks(MANIFEST_FRAME_ENTRIES)
                        .map(ferry_wire::encode_manifest)
                        .collect()
                };
                let seq = hdr.seq;
                self.send(|w| send_reply(w, Kind::Manifest, seq, bodies));
            }
            Kind::SumsRequest => {
                if payload.len() < 4 {
                    bail!("short sums request");
                }
                let block = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if !(1..=SUMS_BLOCK_BYTES_MAX).contains(&block) {
                    bail!("sums request with a block of {block} bytes");
                }
                let path = SharePath::new(payload[4..].to_vec())
                    .map_err(|e| anyhow!("bad sums path: {e}"))?;
                let (size, sums) = match tree.sums(&path, block) {
                    Ok(Some((size, sums))) => (Some(size), sums),
                    Ok(None) => (None, vec![]),
                    Err(e) => {
                        tracing::debug!(share = %rec.name, error = %e, "share.sums.unreadable");
                        (None, vec![])
                    }
                };
                let bodies: Vec<Vec<u8>> = if sums.is_empty() {
                    vec![ferry_wire::encode_sums(size, block, &[])]
                } else {
                    sums.chunks(SUMS_FRAME_ENTRIES)
                        .map(|c| ferry_wire::encode_sums(size, block, c))
                        .collect()
                };
                let seq = hdr.seq;
                self.send(|w| send_reply(w, Kind::Sums, seq, bodies));
            }
            k => bail!("unexpected {k:?} frame in the inbox"),
        }
        Ok((hdr.seq, 0, false))
    }
}

/// What changed on a replica since its last flush, to make a flush cost
/// what it covers: a few files' contents are `fsync`ed one by one; anything
/// else (entries made, removed or renamed, many files) is a `syncfs`.
#[derive(Default)]
struct Unflushed {
    files: std::collections::HashSet<Target>,
    /// Files a data-only flush synced: their times, mode and owner still
    /// wait for a full one.
    meta: std::collections::HashSet<Target>,
    namespace: bool,
}

/// Files fsynced one by one at a flush before a `syncfs` is cheaper.
const FLUSH_FILES_MAX: usize = 64;

impl Unflushed {
    fn note(&mut self, op: &StampedOp) {
        match &op.op {
            FileOp::Write { target, .. }
            | FileOp::Truncate { target, .. }
            | FileOp::Fallocate { target, .. }
            | FileOp::CopyWithin { target, .. }
            | FileOp::SetAttr { target, .. }
            | FileOp::SetXattr { target, .. }
            | FileOp::RemoveXattr { target, .. } => {
                self.files.insert(target.clone());
            }
            FileOp::Stamps => {}
            _ => self.namespace = true,
        }
        // Stamps set times on other entries (parent directories).
        for s in &op.stamps {
            self.files.insert(s.target.clone());
        }
    }

    /// `data_only`: the files' data (fdatasync), not their times.
    fn make_durable(
        &mut self,
        tree: &Tree,
        files: &mut FileCache,
        full: bool,
        data_only: bool,
    ) -> Result<()> {
        if !data_only {
            let meta = std::mem::take(&mut self.meta);
            self.files.extend(meta);
        }
        let each = !full && !self.namespace && self.files.len() <= FLUSH_FILES_MAX;
        let mut whole = !each;
        if each {
            for t in &self.files {
                match tree.open_file(t, libc::O_RDONLY, 0) {
                    Ok(f) if data_only => f.sync_data().context("fdatasync on the replica")?,
                    Ok(f) => f.sync_all().context("fsync on the replica")?,
                    // A directory (a parent's times) or gone: the whole filesystem.
                    Err(_) => {
                        whole = true;
                        break;
                    }
                }
            }
        }
        if whole {
            files.clear();
            tree.sync().context("syncfs on the replica")?;
            *self = Unflushed::default();
        } else if data_only {
            let synced = std::mem::take(&mut self.files);
            self.meta.extend(synced);
        } else {
            self.files.clear();
        }
        Ok(())
    }
}

/// A copy that was primary before: files it changed at or after `since`
/// may hold data the new primary never received, even with its size and
/// mtime. Their mtime is reported as unknown so the primary compares them
/// by content.
fn mark_suspects(tree: &Tree, entries: &mut [ManifestEntry], since: i64) {
    for e in entries {
        if !matches!(e.kind, EntryKind::File { .. }) {
            continue;
        }
        let recent = tree
            .lstat(&Target::Path(e.path.clone()))
            .map(|st| st.st_ctime >= since)
            .unwrap_or(true);
        if recent {
            e.mtime = ferry_wire::Time {
                secs: i64::MIN,
                nanos: 0,
            };
        }
    }
}

/// Sends a reply of one or more frames (flag 1: more follow).
fn send_reply(wire: &SharedTls, kind: Kind, seq: u64, bodies: Vec<Vec<u8>>) -> Result<()> {
    let n = bodies.len();
    for (i, body) in bodies.into_iter().enumerate() {
        let mut h = ferry_wire::FrameHeader::new(
            kind,
            seq,
            0,
            u32::try_from(body.len()).map_err(|_| anyhow!("{kind:?} frame too large"))?,
        );
        if i + 1 < n {
            h.flags = 1;
        }
        let mut f = h.encode().to_vec();
        f.extend_from_slice(&body);
        if !body.is_empty() {
            f.extend_from_slice(&ferry_wire::trailer(&body));
        }
        wire.send(&f)?;
    }
    Ok(())
}

fn op_name(op: &FileOp) -> String {
    let s = format!("{op:?}");
    s.split([' ', '{', '(']).next().unwrap_or("op").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::Owner;

    #[test]
    fn a_data_only_flush_leaves_the_files_times_for_the_next_full_one() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let tree = Tree::open(&dir.path().join("d"), &dir.path().join("o"))
            .unwrap()
            .for_replica();
        let mut files = FileCache::default();
        let path = SharePath::new(b"f".to_vec()).unwrap();
        let t = Target::Path(path.clone());
        let mut u = Unflushed::default();
        for op in [
            FileOp::Create {
                path: path.clone(),
                mode: 0o600,
                owner: Owner::default(),
            },
            FileOp::Write {
                target: t.clone(),
                offset: 0,
                data: b"abc".to_vec(),
            },
        ] {
            tree.apply(&op, &mut files).unwrap();
            u.note(&StampedOp { op, stamps: vec![] });
        }
        // The create makes the next flush a whole-filesystem one.
        u.make_durable(&tree, &mut files, false, true).unwrap();
        assert!(u.files.is_empty() && u.meta.is_empty() && !u.namespace);
        let w = FileOp::Write {
            target: t.clone(),
            offset: 1,
            data: b"x".to_vec(),
        };
        tree.apply(&w, &mut files).unwrap();
        u.note(&StampedOp {
            op: w,
            stamps: vec![],
        });
        u.make_durable(&tree, &mut files, false, true).unwrap();
        assert!(u.files.is_empty());
        assert!(u.meta.contains(&t), "its times still wait for a full flush");
        u.make_durable(&tree, &mut files, false, false).unwrap();
        assert!(u.files.is_empty() && u.meta.is_empty());
    }
}
